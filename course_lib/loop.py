"""The training loop: `run_epoch` for one phase and `train_model` for a run."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .checkpoint import (
    CheckpointError,
    capture_rng_state,
    check_last_checkpoint,
    check_weights_fit,
    load_checkpoint,
    load_weights,
    remove_stale_temp_files,
    restore_rng_state,
    save_checkpoint,
)
from .device import Precision, pick_device, pick_precision, to_device
from .history import History
from .metrics import ConfusionMatrix
from .plotting import LiveCurves, progress_bar

logger = logging.getLogger(__name__)

BEST_NAME = "best.pt"
LAST_NAME = "last.pt"
HISTORY_NAME = "history.csv"
CURVES_NAME = "curves.png"


class NonFiniteLossError(RuntimeError):
    """Error raised when the loss becomes NaN or infinite.

    `epoch` and `batch` give the first batch where it happened.
    """

    def __init__(self, message: str, epoch: int | None, batch: int, phase: str):
        super().__init__(message)
        self.epoch = epoch
        self.batch = batch
        self.phase = phase


@dataclass
class EpochResult:
    """Averages of one phase, weighted by the number of samples."""

    loss: float
    accuracy: float
    samples: int
    confusion: ConfusionMatrix | None = None


def run_epoch(
    model: nn.Module,
    loader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    device: torch.device | str,
    train: bool,
    *,
    scaler: torch.amp.GradScaler | None = None,
    precision: Precision | None = None,
    confusion: ConfusionMatrix | None = None,
    epoch: int | None = None,
    progress: bool = False,
) -> tuple[float, float]:
    """Run one train or validation phase over `loader`.

    Returns the average loss and the accuracy over the phase, both weighted
    by the number of samples, so a short last batch counts for what it holds.
    `criterion` must average over the batch (``reduction="mean"``, the default).
    Accuracy is NaN when the targets are not class indices (regression or
    multi-label losses).

    Args:
        train: True runs the five-step update on every batch; False only
            evaluates, with no graph and no change to BatchNorm statistics.
        scaler: GradScaler for fp16 training, or None.
        precision: autocast settings from `pick_precision`; None is float32.
        confusion: a ConfusionMatrix to fill with this phase's predictions.
        epoch: the epoch number, used in progress and error messages.
        progress: show a tqdm progress bar over batches.

    Raises:
        ValueError: if the loader yields no batches, a label is outside the
            model's classes, or `train` is True without an optimizer.
        NonFiniteLossError: if a loss is NaN or infinite; it names the first
            such batch.
    """
    result = _run_phase(
        model, loader, criterion, optimizer, torch.device(device), train,
        scaler=scaler, precision=precision, confusion=confusion, epoch=epoch,
        progress=progress,
    )
    return result.loss, result.accuracy


def _run_phase(
    model, loader, criterion, optimizer, device, train, *,
    scaler=None, precision=None, confusion=None, epoch=None, progress=False,
) -> EpochResult:
    if train and optimizer is None:
        raise ValueError("train=True needs an optimizer; pass one, or use train=False")

    # train() turns on dropout and batch statistics; eval() turns them off and
    # freezes the BatchNorm running averages. Each module's own mode is put
    # back afterwards, so a phase leaves the model as the caller had it.
    saved_modes = [(module, module.training) for module in model.modules()]
    model.train(train)
    try:
        return _run_batches(
            model, loader, criterion, optimizer, device, train,
            scaler=scaler, precision=precision, confusion=confusion, epoch=epoch,
            progress=progress,
        )
    finally:
        for module, mode in saved_modes:
            module.training = mode


def _run_batches(
    model, loader, criterion, optimizer, device, train, *,
    scaler, precision, confusion, epoch, progress,
) -> EpochResult:
    phase = "train" if train else "val"
    autocast_dtype = precision.dtype if precision is not None else None

    # Sums stay on the device: reading them with .item() each batch would
    # make the host wait for the GPU every step.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)
    first_bad_value = torch.zeros((), dtype=torch.float32, device=device)
    samples = 0
    classify = True
    batch_index = -1

    batches = progress_bar(
        loader, enabled=progress, desc=_phase_label(phase, epoch), total=_safe_len(loader)
    )
    with torch.set_grad_enabled(train):
        for batch_index, (inputs, targets) in enumerate(batches):
            targets_on_host = targets
            inputs = to_device(inputs, device)
            targets = to_device(targets, device)

            if train:
                # 1. Clear the gradients of the last step; backward() adds to them.
                optimizer.zero_grad(set_to_none=True)

            with torch.autocast(
                device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                # 2. Forward pass.
                logits = model(inputs)
                classify = _is_classification(logits, targets)
                if classify:
                    _check_labels(targets_on_host, logits.shape[1], batch_index, epoch)
                # 3. Loss.
                loss = criterion(logits, targets)

            if train:
                # 4. Backward pass: fill .grad of every parameter.
                # 5. Step: update the parameters from their gradients.
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()

            # The loss is a batch mean, so weight it by the batch size.
            batch_size = targets.shape[0]
            samples += batch_size
            loss_value = loss.detach().to(torch.float64)
            loss_sum += loss_value * batch_size
            bad = ~torch.isfinite(loss_value)
            take = bad & (first_bad < 0)
            first_bad = torch.where(take, batch_index, first_bad)
            first_bad_value = torch.where(take, loss.detach().float(), first_bad_value)
            if classify:
                predictions = logits.detach().argmax(dim=1)
                correct += (predictions == targets).sum()
                if confusion is not None:
                    confusion.update(predictions, targets, num_classes=logits.shape[1])

    if batch_index < 0:
        raise ValueError(
            f"the {phase} loader yielded no batches; check that its data set is "
            "not empty and that drop_last does not drop the only batch"
        )

    bad_batch = int(first_bad.item())
    if bad_batch >= 0:
        where = f"epoch {epoch}, " if epoch is not None else ""
        raise NonFiniteLossError(
            f"the {phase} loss became {first_bad_value.item()} at {where}batch "
            f"{bad_batch}; lower the learning rate or check the inputs for NaN",
            epoch=epoch, batch=bad_batch, phase=phase,
        )

    average_loss = loss_sum.item() / samples
    accuracy = correct.item() / samples if classify else math.nan
    return EpochResult(average_loss, accuracy, samples, confusion)


def _is_classification(logits: torch.Tensor, targets: torch.Tensor) -> bool:
    return (
        logits.ndim == 2
        and targets.ndim == 1
        and not torch.is_floating_point(targets)
        and not torch.is_complex(targets)
    )


def _check_labels(targets: torch.Tensor, num_classes: int, batch: int, epoch) -> None:
    # Checked on the host copy of the labels, so no device sync is needed.
    # An out-of-range label on CUDA is a device-side assert that kills the
    # process, so it is caught here first.
    if targets.device.type != "cpu" or targets.numel() == 0:
        return
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        where = f"epoch {epoch}, " if epoch is not None else ""
        raise ValueError(
            f"label {bad} at {where}batch {batch} is outside the model's "
            f"{num_classes} classes (0..{num_classes - 1}); remap the labels to "
            f"0..{num_classes - 1} or build the model with more outputs"
        )


def _phase_label(phase: str, epoch: int | None) -> str:
    return f"epoch {epoch} {phase}" if epoch is not None else phase


def _safe_len(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


class EarlyStopping:
    """Stop when the monitored value has not improved for `patience` epochs.

    Args:
        patience: epochs without improvement before stopping (at least 1).
        mode: "min" for losses, "max" for accuracy-like metrics.
        min_delta: the smallest change that counts as an improvement.
    """

    def __init__(self, patience: int = 5, mode: str = "max", min_delta: float = 0.0):
        _check_positive_int("patience", patience)
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.patience = patience
        self.mode = mode
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.counter = 0

    def step(self, value: float, epoch: int) -> bool:
        """Record one epoch's value; return True if it is a new best.

        A NaN value is never a new best, so it counts against the patience.
        """
        if math.isnan(value):
            self.counter += 1
            return False
        if self.best is None or self._improves(value, self.best):
            self.best = value
            self.best_epoch = epoch
            self.counter = 0
            return True
        self.counter += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.counter >= self.patience

    def _improves(self, value: float, best: float) -> bool:
        if math.isnan(value):
            return False
        if self.mode == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "counter": self.counter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
        self.best_epoch = state["best_epoch"]
        self.counter = state["counter"]


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer of at least 1, got {value!r}")


@dataclass
class TrainResult:
    """Result of a `train_model` run.

    Attributes:
        history: one row per epoch trained, including epochs before a resume.
        best_epoch: the epoch whose weights are in best.pt and in the model.
        best_metric: the monitored value at `best_epoch`.
        monitor: the history column that chose the best epoch.
        stopped_early: whether early stopping ended the run.
        test_loss, test_accuracy, test_metrics: the single test evaluation of
            the best weights, or None without a test loader.
        out_dir: the run folder.
    """

    history: History
    best_epoch: int | None
    best_metric: float | None
    monitor: str
    stopped_early: bool
    test_loss: float | None
    test_accuracy: float | None
    test_metrics: dict[str, Any] | None
    out_dir: Path
    extras: dict[str, Any] = field(default_factory=dict)


def train_model(
    model: nn.Module,
    train_loader,
    val_loader,
    test_loader=None,
    *,
    epochs: int = 10,
    lr: float = 3e-4,
    weight_decay: float = 0.01,
    patience: int = 5,
    monitor: str = "val_acc",
    criterion: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = "cosine",
    device: str | torch.device | None = "auto",
    out_dir: str | os.PathLike = "runs/train",
    resume: bool = False,
    mixed_precision: bool = True,
    live_plot: bool | LiveCurves | None = "auto",
    progress: bool | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    run_config: dict[str, Any] | None = None,
) -> TrainResult:
    """Train `model`, keep the best weights, and test them once.

    Each epoch runs a train phase and a validation phase, steps the
    learning-rate schedule, appends a row to the history, saves best.pt when
    the monitored metric improves, and saves last.pt with everything a resume
    needs. After the last epoch, or an early stop, the model gets the best
    weights back and `test_loader` is evaluated exactly once.

    Args:
        epochs: the maximum number of epochs (at least 1).
        lr, weight_decay: AdamW settings, used when `optimizer` is None.
        patience: epochs without improvement before early stopping.
        monitor: history column to select the best epoch: "val_loss"
            (minimized) or "val_acc", "val_macro_f1", "val_pos_f1",
            "val_pos_recall" (maximized).
        criterion: the loss; cross-entropy by default.
        optimizer: an optimizer over `model`'s parameters; AdamW by default.
        scheduler: "cosine" for CosineAnnealingLR with ``T_max=epochs``,
            None for a constant learning rate, or a scheduler over `optimizer`
            that is stepped once per epoch.
        device: "auto" picks cuda, then mps, then cpu.
        out_dir: the run folder for best.pt, last.pt and history.csv.
        resume: continue from out_dir/last.pt if it exists. A run that already
            finished trains no more epochs.
        mixed_precision: use bf16 or fp16 autocast on CUDA.
        live_plot: "auto" draws live curves in Jupyter and saves curves.png
            elsewhere; True or False force it on or off; a LiveCurves object is
            used as given.
        progress: show progress bars; None shows them on a terminal or in Jupyter.
        on_epoch_end: called with the epoch and its history row after the
            epoch's checkpoints are written.
        run_config: further settings (numbers and strings) stored in last.pt;
            a resume with a different value for any of them is rejected.

    Raises:
        ValueError: for epochs or patience below 1, an unknown monitor, an
            unwritable out_dir, an out_dir that contains another run while
            `resume` is False, or one that another process is training into.
        CheckpointError: if last.pt cannot be resumed from: a field is missing
            or invalid, or the run's settings, model or optimizer differ.
        NonFiniteLossError: if the loss becomes NaN or infinite. The checkpoints
            of the last good epoch stay as they were.
    """
    _check_positive_int("epochs", epochs)
    _check_positive_int("patience", patience)
    mode = "min" if monitor.endswith("loss") else "max"
    _check_monitor(monitor)

    out_dir = Path(out_dir)
    prepare_run_folder(out_dir)
    # A second run in the same folder would overwrite this run's checkpoints.
    with hold_run_folder(out_dir):
        last_path, best_path = out_dir / LAST_NAME, out_dir / BEST_NAME
        if not resume and (last_path.exists() or best_path.exists()):
            raise ValueError(
                f"{out_dir} already contains checkpoints of another run; pass resume=True "
                "(--resume) to continue it, or choose a new out_dir (--out)"
            )
        for stale in remove_stale_temp_files(out_dir):
            logger.info("removed %s, left by an interrupted checkpoint write", stale)

        device = pick_device(device)
        precision = pick_precision(device, enabled=mixed_precision)
        model.to(device)
        criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        if optimizer is None:
            optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        if scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        elif isinstance(scheduler, str):
            raise ValueError(f"unknown scheduler {scheduler!r}; use 'cosine', None or an object")
        scaler = torch.amp.GradScaler("cuda") if precision.use_grad_scaler else None
        data_order = getattr(train_loader, "generator", None)

        stopper = EarlyStopping(patience=patience, mode=mode)
        history = History()
        start_epoch = 1
        finished = False
        config = {**(run_config or {}), "epochs": epochs, "monitor": monitor}

        if resume and last_path.exists():
            state = load_checkpoint(last_path, map_location=device)
            # Every check comes before the first change to the model, the
            # optimizer, the random states or the run folder.
            check_last_checkpoint(state, last_path)
            _check_resume_config(state["config"], config, last_path)
            check_weights_fit(model, state["model"], source=str(last_path))
            _check_optimizer_groups(state["optimizer"], optimizer, last_path)
            load_weights(model, state["model"], source=str(last_path))
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state.get("scheduler") is not None:
                scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            stopper.load_state_dict(state["early_stopping"])
            history = History.from_state_dict(state["history"])
            restore_rng_state(state["rng"], data_order)
            # last.pt is written before history.csv, so a kill between the two
            # writes leaves the CSV one row short. Rewriting it here repairs that.
            history.to_csv(out_dir / HISTORY_NAME)
            start_epoch = state["epoch"] + 1
            finished = bool(state.get("finished"))
            logger.info(
                "resumed %s at epoch %d of %d%s", last_path, state["epoch"], epochs,
                " (the run had finished)" if finished else "",
            )
        elif resume and best_path.exists():
            raise CheckpointError(
                f"{out_dir} has best.pt but no last.pt, so the run cannot be resumed "
                "and a new run would overwrite best.pt; copy best.pt elsewhere or "
                "choose a new out_dir"
            )
        elif resume:
            logger.info("no %s yet; starting a new run", last_path)

        plot = _make_plot(live_plot, out_dir)
        show_progress = progress if progress is not None else _progress_default()
        # A run whose patience ran out at its last epoch ended by the epoch count,
        # as the loop below decides too.
        stopped_early = finished and stopper.should_stop and start_epoch - 1 < epochs

        logger.info(_header_line())
        if plot is not None and len(history):
            plot.update(history, best_epoch=stopper.best_epoch)

        epoch = start_epoch
        while not finished and epoch <= epochs:
            lr_now = optimizer.param_groups[0]["lr"]
            started = time.perf_counter()

            train_cm = ConfusionMatrix(device=device)
            val_cm = ConfusionMatrix(device=device)
            train_result = _run_phase(
                model, train_loader, criterion, optimizer, device, True,
                scaler=scaler, precision=precision, confusion=train_cm, epoch=epoch,
                progress=show_progress,
            )
            val_result = _run_phase(
                model, val_loader, criterion, None, device, False,
                precision=precision, confusion=val_cm, epoch=epoch, progress=show_progress,
            )
            if scheduler is not None:
                scheduler.step()

            row = _history_row(epoch, train_result, val_result, lr_now,
                               time.perf_counter() - started)
            if monitor != "val_loss" and math.isnan(row[monitor]) and not _has_accuracy(row):
                raise ValueError(
                    f"monitor {monitor!r} is NaN because the targets are not class "
                    "indices (a regression or multi-label loss); pass monitor='val_loss'"
                )
            history.append(row)
            improved = stopper.step(row[monitor], epoch)
            if improved:
                save_checkpoint(
                    {
                        "model": model.state_dict(),
                        "epoch": epoch,
                        "metric": row[monitor],
                        "monitor": monitor,
                        "model_class": type(model).__name__,
                    },
                    best_path,
                )
            stopped_early = stopper.should_stop and epoch < epochs
            finished = stopper.should_stop or epoch == epochs
            save_checkpoint(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "epoch": epoch,
                    "best_metric": stopper.best,
                    "early_stopping": stopper.state_dict(),
                    "history": history.state_dict(),
                    "rng": capture_rng_state(data_order),
                    "config": config,
                    "finished": finished,
                    "model_class": type(model).__name__,
                },
                last_path,
            )
            history.to_csv(out_dir / HISTORY_NAME)

            logger.info(_epoch_line(row, epochs, monitor, improved))
            if plot is not None:
                plot.update(
                    history,
                    best_epoch=stopper.best_epoch,
                    stopped_epoch=epoch if stopped_early else None,
                )
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
            if stopped_early:
                logger.info(
                    "early stop: %s has not improved for %d epochs (best %.4f at epoch %d)",
                    monitor, patience, stopper.best, stopper.best_epoch,
                )
            epoch += 1

        if plot is not None:
            plot.close(
                history, best_epoch=stopper.best_epoch,
                stopped_epoch=history["epoch"][-1] if stopped_early and len(history) else None,
            )

        if best_path.exists():
            best = load_checkpoint(best_path, map_location=device, required_keys=("model",))
            load_weights(model, best["model"], source=str(best_path))

        test_loss = test_accuracy = test_metrics = None
        if test_loader is not None:
            test_cm = ConfusionMatrix(device=device)
            test_result = _run_phase(
                model, test_loader, criterion, None, device, False,
                precision=precision, confusion=test_cm, progress=show_progress,
            )
            test_loss, test_accuracy = test_result.loss, test_result.accuracy
            test_metrics = test_cm.compute() if test_cm.counts is not None else None
            logger.info("test loss of best.pt: %.4f", test_loss)
            logger.info(
                "test accuracy of best.pt (epoch %s): %.2f%%",
                stopper.best_epoch, 100 * test_accuracy,
            )

        return TrainResult(
            history=history,
            best_epoch=stopper.best_epoch,
            best_metric=stopper.best,
            monitor=monitor,
            stopped_early=stopped_early,
            test_loss=test_loss,
            test_accuracy=test_accuracy,
            test_metrics=test_metrics,
            out_dir=out_dir,
        )


_MAXIMIZED = ("val_acc", "val_macro_f1", "val_pos_f1", "val_pos_recall", "val_pos_precision")


def _has_accuracy(row: dict) -> bool:
    """Return True if the row has classification metrics (accuracy is a number)."""
    return not math.isnan(row["val_acc"])


def _check_monitor(monitor: str) -> None:
    if monitor != "val_loss" and monitor not in _MAXIMIZED:
        raise ValueError(
            f"unknown monitor {monitor!r}; use val_loss or one of {', '.join(_MAXIMIZED)}"
        )


def prepare_run_folder(out_dir: str | os.PathLike) -> Path:
    """Create the run folder if needed and check that files can be written in it.

    Raises:
        ValueError: naming the folder, if it is a file or cannot be written.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(
            f"output folder {out_dir} is a file, not a folder; pass a folder path "
            "as out_dir (--out)"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".write-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(
            f"output folder {out_dir} is not writable ({type(err).__name__}: "
            f"{err.strerror or err}); pass a writable folder as out_dir (--out)"
        ) from None
    return out_dir


@contextlib.contextmanager
def hold_run_folder(out_dir: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on a run folder while the block runs.

    The lock is an ``flock`` on the folder itself, so no lock file is left
    behind. The operating system releases it when the process ends, also on
    SIGKILL, so a killed run never leaves the folder locked.

    Raises:
        ValueError: naming the folder, if another process holds the lock.
    """
    try:
        import fcntl
    except ImportError:
        # NOTE: fcntl does not exist on Windows, so runs there are not locked.
        yield
        return
    folder = os.open(out_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"another training run is writing to {out_dir}; wait for it to "
                "finish, or pass another out_dir (--out)"
            ) from None
        yield
    finally:
        # Closing the descriptor releases the lock.
        os.close(folder)


def _check_resume_config(saved: dict, current: dict, path: Path) -> None:
    for key, value in current.items():
        if saved.get(key) != value:
            raise CheckpointError(
                f"{path} was written by a run with {key}={saved.get(key)!r}, but "
                f"this run has {key}={value!r}; resume with {key} set to "
                f"{saved.get(key)!r}, or start a new run in another folder"
            )


def _check_optimizer_groups(saved: dict, optimizer, path: Path) -> None:
    # Optimizer.load_state_dict raises a ValueError for the same mismatch, but
    # a resume calls it after it has replaced the model weights.
    saved_sizes = [len(group["params"]) for group in saved["param_groups"]]
    own_sizes = [len(group["params"]) for group in optimizer.param_groups]
    if saved_sizes != own_sizes:
        raise CheckpointError(
            f"{path} field optimizer.param_groups has groups of {saved_sizes} "
            f"parameters, but this run's optimizer has {own_sizes}; resume with the "
            "optimizer that wrote it, or start a new run in another folder (--out)"
        )


def _history_row(epoch, train: EpochResult, val: EpochResult, lr, seconds) -> dict:
    row: dict[str, Any] = {"epoch": epoch}
    for phase, result in (("train", train), ("val", val)):
        metrics = result.confusion.compute() if result.confusion is not None \
            and result.confusion.counts is not None else {}
        row[f"{phase}_loss"] = result.loss
        row[f"{phase}_acc"] = result.accuracy
        row[f"{phase}_macro_f1"] = metrics.get("macro_f1", math.nan)
        if "pos_f1" in metrics:
            row[f"{phase}_pos_precision"] = metrics["pos_precision"]
            row[f"{phase}_pos_recall"] = metrics["pos_recall"]
            row[f"{phase}_pos_f1"] = metrics["pos_f1"]
    row["lr"] = lr
    row["seconds"] = seconds
    return row


def _header_line() -> str:
    return (
        f"{'epoch':>7} | {'train loss':>10} {'train acc':>9} | "
        f"{'val loss':>8} {'val acc':>7} | {'lr':>8} | {'time':>6}"
    )


def _epoch_line(row: dict, epochs: int, monitor: str, improved: bool) -> str:
    mark = f"  * best {monitor}" if improved else ""
    epoch = f"{row['epoch']}/{epochs}"
    return (
        f"{epoch:>7} | {row['train_loss']:>10.4f} {100 * row['train_acc']:>8.2f}% | "
        f"{row['val_loss']:>8.4f} {100 * row['val_acc']:>6.2f}% | "
        f"{row['lr']:>8.2e} | {row['seconds']:>5.1f}s{mark}"
    )


def _progress_default() -> bool:
    from .plotting import output_is_interactive

    return output_is_interactive()


def _make_plot(live_plot, out_dir: Path) -> LiveCurves | None:
    if isinstance(live_plot, LiveCurves):
        return live_plot
    if live_plot is None or live_plot is False:
        return None
    if live_plot == "auto" or live_plot is True:
        return LiveCurves(save_path=out_dir / CURVES_NAME)
    raise ValueError(f"live_plot must be 'auto', True, False or a LiveCurves, got {live_plot!r}")
