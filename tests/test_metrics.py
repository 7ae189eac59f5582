"""Tests of the confusion-matrix metrics, checked against torchmetrics."""

from __future__ import annotations

import doctest

import pytest
import torch
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_f1_score,
    binary_precision,
    binary_recall,
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

import course_lib.metrics
from course_lib.metrics import (
    ConfusionMatrix,
    accuracy,
    binary_metrics,
    confusion_matrix,
    macro_f1,
    metrics_from_counts,
    precision_recall_f1,
)

NUM_CASES = 300


def random_cases(seed: int = 0):
    """Yield (preds, targets, num_classes) with gaps in both tensors.

    Each case draws predictions and targets from random subsets of the
    classes, so many cases have classes that are never predicted, classes
    absent from the targets, or both.
    """
    generator = torch.Generator().manual_seed(seed)
    for _ in range(NUM_CASES):
        num_classes = int(torch.randint(2, 9, (1,), generator=generator))
        n = int(torch.randint(1, 60, (1,), generator=generator))
        target_pool = _random_subset(num_classes, generator)
        pred_pool = _random_subset(num_classes, generator)
        targets = target_pool[torch.randint(len(target_pool), (n,), generator=generator)]
        preds = pred_pool[torch.randint(len(pred_pool), (n,), generator=generator)]
        yield preds, targets, num_classes


def _random_subset(num_classes: int, generator: torch.Generator) -> torch.Tensor:
    size = int(torch.randint(1, num_classes + 1, (1,), generator=generator))
    return torch.randperm(num_classes, generator=generator)[:size]


def as_tensor(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64)


def close(actual, expected) -> bool:
    return torch.allclose(as_tensor(actual), expected.double(), atol=1e-6)


def test_random_cases_have_gaps():
    # The comparisons below only mean something if the cases include missing
    # classes of every kind, so this checks the generator.
    never_predicted = absent_from_targets = absent_from_both = 0
    for preds, targets, num_classes in random_cases():
        predicted = torch.bincount(preds, minlength=num_classes) > 0
        actual = torch.bincount(targets, minlength=num_classes) > 0
        never_predicted += int((actual & ~predicted).any())
        absent_from_targets += int((predicted & ~actual).any())
        absent_from_both += int((~predicted & ~actual).any())

    assert never_predicted > 50
    assert absent_from_targets > 50
    assert absent_from_both > 50


def test_counts_match_torchmetrics():
    for preds, targets, k in random_cases():
        expected = multiclass_confusion_matrix(preds, targets, num_classes=k)
        assert torch.equal(confusion_matrix(preds, targets, k), expected)


def test_accuracy_matches_torchmetrics():
    for preds, targets, k in random_cases():
        expected = multiclass_accuracy(preds, targets, num_classes=k, average="micro")
        assert close(accuracy(preds, targets, k), expected)


def test_per_class_match_torchmetrics():
    for preds, targets, k in random_cases():
        precision, recall, f1 = precision_recall_f1(preds, targets, k)
        options = {"num_classes": k, "average": None, "zero_division": 0}

        assert close(precision, multiclass_precision(preds, targets, **options))
        assert close(recall, multiclass_recall(preds, targets, **options))
        assert close(f1, multiclass_f1_score(preds, targets, **options))


def test_macro_f1_matches_torchmetrics():
    for preds, targets, k in random_cases():
        expected = multiclass_f1_score(
            preds, targets, num_classes=k, average="macro", zero_division=0
        )
        assert close(macro_f1(preds, targets, k), expected)


def test_binary_matches_torchmetrics():
    generator = torch.Generator().manual_seed(1)
    for _ in range(NUM_CASES):
        n = int(torch.randint(1, 40, (1,), generator=generator))
        # A low rate of ones makes cases with no positive target or no
        # positive prediction common.
        targets = (torch.rand(n, generator=generator) < 0.15).long()
        preds = (torch.rand(n, generator=generator) < 0.15).long()
        result = binary_metrics(preds, targets)

        assert close(result["precision"], binary_precision(preds, targets, zero_division=0))
        assert close(result["recall"], binary_recall(preds, targets, zero_division=0))
        assert close(result["f1"], binary_f1_score(preds, targets, zero_division=0))
        assert close(result["accuracy"], binary_accuracy(preds, targets))


def test_binary_positive_class_zero():
    preds = torch.tensor([0, 0, 1, 1, 0])
    targets = torch.tensor([0, 1, 1, 0, 0])
    result = binary_metrics(preds, targets, positive_class=0)
    # Class 0 as the positive class is class 1 with both tensors flipped.
    flipped = binary_metrics(1 - preds, 1 - targets)

    assert result == flipped


def test_pos_figures_are_class_one():
    preds = torch.tensor([1, 0, 1, 1, 0, 0])
    targets = torch.tensor([1, 1, 0, 1, 0, 0])
    result = metrics_from_counts(confusion_matrix(preds, targets, 2))

    assert result["pos_precision"] == pytest.approx(2 / 3)
    assert result["pos_recall"] == pytest.approx(2 / 3)
    assert result["pos_f1"] == pytest.approx(2 / 3)
    assert result["pos_precision"] == result["precision"][1]


def test_multiclass_has_no_pos_figures():
    counts = torch.eye(3, dtype=torch.int64)

    assert "pos_f1" not in metrics_from_counts(counts)
    assert "pos_f1" in metrics_from_counts(counts, positive_class=2)


@pytest.mark.parametrize("positive_class", [-1, 3])
def test_positive_class_out_of_range(positive_class):
    with pytest.raises(ValueError) as excinfo:
        metrics_from_counts(torch.eye(3, dtype=torch.int64), positive_class=positive_class)

    assert repr(positive_class) in str(excinfo.value)


def test_zero_division_never_predicted():
    # Class 2 occurs twice but is never predicted.
    preds = torch.tensor([0, 1, 0, 1])
    targets = torch.tensor([0, 1, 2, 2])
    precision, recall, f1 = precision_recall_f1(preds, targets, 3)

    assert precision[2] == 0.0
    assert recall[2] == 0.0
    assert f1[2] == 0.0


def test_zero_division_absent_from_targets():
    # Class 2 is predicted once but never occurs.
    preds = torch.tensor([0, 1, 2])
    targets = torch.tensor([0, 1, 1])
    precision, recall, f1 = precision_recall_f1(preds, targets, 3)

    assert precision[2] == 0.0
    assert recall[2] == 0.0
    assert f1[2] == 0.0


def test_zero_division_binary_all_negative():
    preds = torch.zeros(5, dtype=torch.int64)
    targets = torch.zeros(5, dtype=torch.int64)
    result = binary_metrics(preds, targets)

    assert result["precision"] == 0.0
    assert result["recall"] == 0.0
    assert result["f1"] == 0.0
    assert result["accuracy"] == 1.0


def test_zero_division_empty_matrix():
    result = ConfusionMatrix(num_classes=3).compute()

    assert result["accuracy"] == 0.0
    assert result["macro_f1"] == 0.0
    assert result["f1"] == [0.0, 0.0, 0.0]


def test_macro_f1_skips_unseen_class():
    # Class 2 is neither predicted nor present, so it has no F1 to average.
    preds = torch.tensor([0, 1, 1])
    targets = torch.tensor([0, 1, 0])
    f1 = precision_recall_f1(preds, targets, 3)[2]

    assert macro_f1(preds, targets, 3) == pytest.approx((f1[0] + f1[1]) / 2)


def test_support_counts_targets():
    preds = torch.tensor([0, 0, 0, 1])
    targets = torch.tensor([0, 1, 1, 1])
    result = metrics_from_counts(confusion_matrix(preds, targets, 3))

    assert result["support"] == [1, 3, 0]


def test_matrix_rows_are_targets():
    counts = confusion_matrix(torch.tensor([1]), torch.tensor([0]), 2)

    assert counts.tolist() == [[0, 1], [0, 0]]


def test_matrix_batches_equal_whole():
    for preds, targets, k in random_cases(seed=2):
        whole = ConfusionMatrix(num_classes=k)
        whole.update(preds, targets)
        batched = ConfusionMatrix(num_classes=k)
        for start in range(0, len(targets), 7):
            batched.update(preds[start : start + 7], targets[start : start + 7])

        assert torch.equal(batched.counts, whole.counts)
        assert batched.compute() == whole.compute()


def test_matrix_from_logits():
    logits = torch.tensor([[2.0, 0.1, 0.3], [0.0, 0.2, 5.0], [1.0, 3.0, 0.0]])
    targets = torch.tensor([0, 1, 1])
    cm = ConfusionMatrix()
    cm.update(logits, targets)

    assert cm.num_classes == 3
    assert torch.equal(cm.counts, confusion_matrix(logits.argmax(1), targets, 3))


def test_matrix_num_classes_on_update():
    cm = ConfusionMatrix()
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 3]), num_classes=4)

    assert cm.counts.shape == (4, 4)


def test_matrix_needs_num_classes():
    cm = ConfusionMatrix()

    with pytest.raises(ValueError):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]))


def test_matrix_empty_compute():
    with pytest.raises(ValueError):
        ConfusionMatrix().compute()


@pytest.mark.parametrize("num_classes", [0, 1])
def test_matrix_too_few_classes(num_classes):
    with pytest.raises(ValueError) as excinfo:
        ConfusionMatrix(num_classes=num_classes)

    assert repr(num_classes) in str(excinfo.value)


def test_matrix_reset():
    cm = ConfusionMatrix(num_classes=2)
    cm.update(torch.tensor([0, 1]), torch.tensor([1, 1]))
    cm.reset()

    assert int(cm.counts.sum()) == 0


# Each case: preds, targets, the tensor named in the error, the index named.
OUT_OF_RANGE = {
    "preds_above": ([0, 3], [0, 1], "preds", 3),
    "preds_negative": ([0, -1], [0, 1], "preds", -1),
    "targets_above": ([0, 1], [0, 5], "targets", 5),
    "targets_negative": ([0, 1], [-2, 1], "targets", -2),
}


@pytest.mark.parametrize("case", list(OUT_OF_RANGE))
def test_matrix_rejects_out_of_range(case):
    preds, targets, name, bad = OUT_OF_RANGE[case]
    cm = ConfusionMatrix(num_classes=3)
    cm.update(torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0]))
    before = cm.counts.clone()

    with pytest.raises(ValueError) as caught:
        cm.update(torch.tensor(preds), torch.tensor(targets))

    message = str(caught.value)
    assert message.startswith(f"{name} contain the class index {bad}, ")
    assert "outside 0..2 of this 3-class ConfusionMatrix" in message
    assert torch.equal(cm.counts, before)


def test_matrix_out_of_range_fixes():
    cm = ConfusionMatrix(num_classes=3)

    with pytest.raises(ValueError) as high_pred:
        cm.update(torch.tensor([7]), torch.tensor([0]))
    with pytest.raises(ValueError) as low_target:
        cm.update(torch.tensor([0]), torch.tensor([-1]))

    assert "logits.argmax(dim=1)" in str(high_pred.value)
    assert "num_classes=8" in str(high_pred.value)
    assert "remap the labels to 0..2" in str(low_target.value)
    assert "num_classes=" not in str(low_target.value)


def test_matrix_first_update_rejected():
    cm = ConfusionMatrix()

    with pytest.raises(ValueError, match="^targets contain the class index 4, "):
        cm.update(torch.zeros(2, 3), torch.tensor([0, 4]))

    assert cm.counts is None
    assert cm.num_classes is None


def test_matrix_function_rejects_out_of_range():
    with pytest.raises(ValueError, match="^targets contain the class index 2, "):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([1, 2]), 2)


def test_matrix_accepts_edge_classes():
    cm = ConfusionMatrix(num_classes=4)
    cm.update(torch.tensor([0, 3], dtype=torch.uint8), torch.tensor([3, 0]))
    cm.update(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))

    assert cm.counts[3, 0] == 1
    assert cm.counts[0, 3] == 1
    assert int(cm.counts.sum()) == 2


def test_batch_mean_f1_differs_from_epoch_f1():
    # Batch 1 has one positive, found: F1 = 1. Batch 2 has three positives,
    # one found and no false positive: P = 1, R = 1/3, F1 = 0.5. The batch
    # mean is 0.75, but over the epoch TP = 2, FN = 2, FP = 0, so F1 = 2/3.
    batches = [
        (torch.tensor([1, 0, 0, 0]), torch.tensor([1, 0, 0, 0])),
        (torch.tensor([1, 0, 0, 0]), torch.tensor([1, 1, 1, 0])),
    ]
    batch_f1 = [binary_metrics(preds, targets)["f1"] for preds, targets in batches]
    epoch = ConfusionMatrix(num_classes=2)
    for preds, targets in batches:
        epoch.update(preds, targets)

    assert sum(batch_f1) / len(batch_f1) == pytest.approx(0.75)
    assert epoch.compute()["pos_f1"] == pytest.approx(2 / 3)


def test_docstring_example():
    result = doctest.testmod(course_lib.metrics)

    assert result.attempted > 0
    assert result.failed == 0
