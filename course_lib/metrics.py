"""Classification metrics computed from a confusion matrix.

Every metric here comes from counts accumulated over a whole phase, never from
an average of per-batch values. A per-batch F1 weights a batch with one positive
the same as a batch with fifty, so the mean of batch F1 values is not the F1 of
the epoch.

Zero-division rule: when a ratio has a zero denominator (precision of a class
that is never predicted, recall of a class that never occurs, F1 when both
precision and recall are 0), its value is 0.0. torchmetrics uses the same
default (``zero_division=0``).
"""

from __future__ import annotations

import torch


class ConfusionMatrix:
    """Counts of (true class, predicted class) pairs, accumulated on the device.

    ``update`` keeps the counts on the device. It reads back only the min and
    max class index of the batch, to reject indices outside 0..num_classes - 1.
    ``compute`` reads the counts once.

    Example:
        >>> cm = ConfusionMatrix(num_classes=3)
        >>> cm.update(torch.tensor([[2.0, 0.1, 0.3]]), torch.tensor([0]))
        >>> cm.compute()["accuracy"]
        1.0
    """

    def __init__(
        self, num_classes: int | None = None, device: torch.device | str = "cpu"
    ) -> None:
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes!r}")
        self.num_classes = num_classes
        self.device = torch.device(device)
        self.counts: torch.Tensor | None = None
        if num_classes is not None:
            self.reset()

    def reset(self) -> None:
        """Set every count to zero."""
        if self.num_classes is not None:
            self.counts = torch.zeros(
                self.num_classes, self.num_classes, dtype=torch.int64, device=self.device
            )

    def update(
        self,
        logits_or_preds: torch.Tensor,
        targets: torch.Tensor,
        num_classes: int | None = None,
    ) -> None:
        """Add a batch of predictions.

        Args:
            logits_or_preds: logits of shape (N, C), or predicted class indices
                of shape (N,).
            targets: true class indices of shape (N,).
            num_classes: sets the number of classes on the first update of a
                matrix created without one; logits of shape (N, C) set it too.

        Raises:
            ValueError: if a predicted or true class index is outside
                0..num_classes - 1. The counts stay as they were.
        """
        if logits_or_preds.ndim == 2:
            num_classes = num_classes or logits_or_preds.shape[1]
            preds = logits_or_preds.argmax(dim=1)
        else:
            preds = logits_or_preds
        if self.counts is None and num_classes is None:
            raise ValueError(
                "this ConfusionMatrix has no num_classes yet; pass logits of "
                "shape (N, C) or num_classes=C to the first update"
            )
        k = self.num_classes if self.counts is not None else max(int(num_classes), 2)
        preds = preds.to(self.device).long()
        targets = targets.to(self.device).long()
        _check_class_range(preds, targets, k)

        if self.counts is None:
            self.num_classes = k
            self.reset()
        # Every index is below k * k after the range check, so bincount
        # returns exactly k * k bins.
        index = targets * k + preds
        self.counts += torch.bincount(index, minlength=k * k).view(k, k)

    def compute(self, positive_class: int | None = None) -> dict[str, float]:
        """Return the metrics of everything added so far. See `metrics_from_counts`."""
        if self.counts is None:
            raise ValueError("this ConfusionMatrix is empty; call update() first")
        return metrics_from_counts(self.counts, positive_class=positive_class)


def _check_class_range(
    preds: torch.Tensor, targets: torch.Tensor, num_classes: int
) -> None:
    """Raise ValueError for the first class index outside 0..num_classes - 1.

    One aminmax per tensor and a single read of the four results limit the
    check to one device synchronization per update, whatever the batch size.
    """
    candidates = {"preds": preds, "targets": targets}
    # aminmax rejects an empty tensor, and an empty one has nothing to check.
    tensors = {name: values for name, values in candidates.items() if values.numel()}
    if not tensors:
        return
    bounds = torch.stack([torch.stack(torch.aminmax(v)) for v in tensors.values()])
    for name, (low, high) in zip(tensors, bounds.tolist()):
        if low >= 0 and high < num_classes:
            continue
        bad = low if low < 0 else high
        last = num_classes - 1
        if name == "preds":
            fix = (
                f"pass predicted class indices in 0..{last}, such as "
                "logits.argmax(dim=1)"
            )
        else:
            fix = f"remap the labels to 0..{last}"
        if bad >= num_classes:
            fix += f", or create the ConfusionMatrix with num_classes={bad + 1}"
        raise ValueError(
            f"{name} contain the class index {bad}, outside 0..{last} of this "
            f"{num_classes}-class ConfusionMatrix; {fix}"
        )


def metrics_from_counts(
    counts: torch.Tensor, positive_class: int | None = None
) -> dict[str, float | list[float]]:
    """Return accuracy, per-class precision, recall and F1, and macro F1.

    Args:
        counts: confusion matrix with true classes as rows and predicted
            classes as columns.
        positive_class: for a binary task, the class whose precision, recall
            and F1 are reported as ``pos_precision``, ``pos_recall`` and
            ``pos_f1``. Defaults to 1 when there are two classes.

    Returns:
        A dict with ``accuracy``, ``macro_f1``, lists ``precision``, ``recall``,
        ``f1`` and ``support`` (one entry per class) and, for two classes, the
        ``pos_*`` figures. Ratios with a zero denominator are 0.0. ``macro_f1``
        averages over the classes that occur in the targets or the predictions.
    """
    counts = counts.detach().to("cpu", torch.float64)
    total = counts.sum()
    true_pos = counts.diag()
    predicted = counts.sum(dim=0)
    actual = counts.sum(dim=1)

    precision = _safe_divide(true_pos, predicted)
    recall = _safe_divide(true_pos, actual)
    f1 = _safe_divide(2 * precision * recall, precision + recall)

    # A class that occurs neither in the targets nor in the predictions has no
    # F1 to measure, so the macro mean leaves it out, as torchmetrics does.
    seen = (predicted + actual) > 0
    macro_f1 = f1[seen].mean() if seen.any() else torch.zeros(())

    result: dict = {
        "accuracy": float(_safe_divide(true_pos.sum(), total)),
        "macro_f1": float(macro_f1),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": actual.long().tolist(),
    }
    num_classes = counts.shape[0]
    if positive_class is None and num_classes == 2:
        positive_class = 1
    if positive_class is not None:
        if not 0 <= positive_class < num_classes:
            raise ValueError(
                f"positive_class {positive_class!r} is outside 0..{num_classes - 1}"
            )
        result["pos_precision"] = float(precision[positive_class])
        result["pos_recall"] = float(recall[positive_class])
        result["pos_f1"] = float(f1[positive_class])
    return result


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    zero = denominator == 0
    return torch.where(zero, torch.zeros_like(numerator), numerator / torch.where(zero, 1, denominator))


def confusion_matrix(
    preds: torch.Tensor, targets: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Return the confusion matrix of class-index predictions."""
    cm = ConfusionMatrix(num_classes, device=targets.device)
    cm.update(preds, targets)
    return cm.counts


def accuracy(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> float:
    """Return the fraction of correct predictions."""
    return metrics_from_counts(confusion_matrix(preds, targets, num_classes))["accuracy"]


def precision_recall_f1(
    preds: torch.Tensor, targets: torch.Tensor, num_classes: int
) -> tuple[list[float], list[float], list[float]]:
    """Return per-class precision, recall and F1 (zero denominators give 0.0)."""
    result = metrics_from_counts(confusion_matrix(preds, targets, num_classes))
    return result["precision"], result["recall"], result["f1"]


def macro_f1(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> float:
    """Return the unweighted mean of the per-class F1 scores.

    Classes absent from both `preds` and `targets` are not counted.
    """
    return metrics_from_counts(confusion_matrix(preds, targets, num_classes))["macro_f1"]


def binary_metrics(
    preds: torch.Tensor, targets: torch.Tensor, positive_class: int = 1
) -> dict[str, float]:
    """Return precision, recall and F1 of the positive class of a binary task."""
    result = metrics_from_counts(
        confusion_matrix(preds, targets, 2), positive_class=positive_class
    )
    return {
        "precision": result["pos_precision"],
        "recall": result["pos_recall"],
        "f1": result["pos_f1"],
        "accuracy": result["accuracy"],
    }
