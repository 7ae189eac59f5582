"""Loop overhead: `train_model` against the bare loop, epoch for epoch.

Both variants run in one process, in lockstep. `train_model` calls its
`on_epoch_end` callback after each epoch, and the callback runs one epoch of
the bare loop before it returns. The epochs therefore alternate (train_model,
bare, train_model, bare, ...), so load from other processes falls on both.
The callback's own time is outside both measurements.

NOTE: LiveCurves writes curves.png at most every 10 s of wall-clock time, and
the bare epochs run inside that time. With epochs shorter than 10 s,
train_model therefore writes curves.png up to twice as often as it would
alone, which overstates the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from course_lib import train_model
from course_lib.data import DataSplits
from course_lib.device import pick_precision

from bare_loop import BareLoop, fresh_run, timed


@dataclass
class Repetition:
    """Timings of one lockstep run of both variants, in seconds.

    Attributes:
        train_model_wall, bare_wall: wall time of each epoch. Epoch 1 of
            train_model also covers its setup (output folder, optimizer,
            figure).
        train_model_cpu, bare_cpu: process CPU time of each epoch.
        bare_setup_wall, bare_setup_cpu: building the bare loop's optimizer and
            schedule.
        teardown_wall, teardown_cpu: from train_model's last epoch to its
            return, which writes curves.png and loads best.pt back.
        max_weight_difference: the largest absolute difference between the
            two models' parameters and buffers after any epoch; 0 means the
            bare loop did exactly the same arithmetic.
    """

    train_model_wall: list[float] = field(default_factory=list)
    train_model_cpu: list[float] = field(default_factory=list)
    bare_wall: list[float] = field(default_factory=list)
    bare_cpu: list[float] = field(default_factory=list)
    bare_setup_wall: float = 0.0
    bare_setup_cpu: float = 0.0
    teardown_wall: float = 0.0
    teardown_cpu: float = 0.0
    max_weight_difference: float = 0.0

    @property
    def epochs(self) -> int:
        return len(self.train_model_wall)

    def total(self, variant: str, clock: str) -> float:
        """Return the seconds of a whole run.

        Args:
            variant: "train_model" for the call from start to return, or
                "bare" for the bare loop's setup and epochs.
            clock: "wall" or "cpu".
        """
        if variant == "train_model":
            epochs = self.train_model_wall if clock == "wall" else self.train_model_cpu
            end = self.teardown_wall if clock == "wall" else self.teardown_cpu
            return sum(epochs) + end
        epochs = self.bare_wall if clock == "wall" else self.bare_cpu
        start = self.bare_setup_wall if clock == "wall" else self.bare_setup_cpu
        return start + sum(epochs)

    def ratio(self, clock: str) -> float:
        """Return train_model's whole-run time over the bare loop's."""
        return self.total("train_model", clock) / self.total("bare", clock)


def run_repetition(
    splits: DataSplits,
    settings: argparse.Namespace,
    device: torch.device,
    epochs: int,
    work_dir: Path,
) -> Repetition:
    """Train fresh, identically seeded models with both variants in lockstep.

    `train_model` runs with its defaults as the train command uses them:
    checkpoints every epoch, history.csv, curves.png, no progress bars (the
    command's output is not a terminal here) and log lines at INFO level.
    Early stopping ends both variants at the same epoch.
    """
    timed_run = fresh_run(splits, settings, device)
    bare_run = fresh_run(splits, settings, device)
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    bare = BareLoop(
        bare_run,
        device=device,
        precision=pick_precision(device),
        epochs=epochs,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
    )
    setup_wall = time.perf_counter() - started_wall
    setup_cpu = time.process_time() - started_cpu
    lockstep = _Lockstep(timed_run.model, bare, device)
    lockstep.result.bare_setup_wall = setup_wall
    lockstep.result.bare_setup_cpu = setup_cpu

    lockstep.start()
    train_model(
        timed_run.model,
        timed_run.train_loader,
        timed_run.val_loader,
        epochs=epochs,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        patience=settings.patience,
        monitor=settings.monitor,
        device=device,
        out_dir=Path(tempfile.mkdtemp(prefix="train_model-", dir=work_dir)),
        progress=False,
        on_epoch_end=lockstep.on_epoch_end,
    )
    lockstep.result.teardown_wall = time.perf_counter() - lockstep.mark_wall
    lockstep.result.teardown_cpu = time.process_time() - lockstep.mark_cpu
    return lockstep.result


def summary_rows(
    repetitions: list[Repetition],
) -> list[tuple[str, list[float], str]]:
    """Return (label, one value per repetition, number format) table rows.

    Each repetition is one pair, compared over the whole run, so that work
    done once per run (setup, the last curves.png, reloading best.pt) or every
    few epochs (curves.png at most every 10 s) counts as in a real run. A
    median over single epochs would drop the periodic work.
    """

    def per_epoch(variant: str, clock: str) -> list[float]:
        return [r.total(variant, clock) / r.epochs for r in repetitions]

    def after_epoch_1(r: Repetition) -> float:
        return statistics.fmean(r.train_model_wall[1:]) / statistics.fmean(
            r.bare_wall[1:]
        )

    return [
        ("train_model, s per epoch", per_epoch("train_model", "wall"), "{:.3f}"),
        ("bare loop, s per epoch", per_epoch("bare", "wall"), "{:.3f}"),
        ("train_model, CPU s per epoch", per_epoch("train_model", "cpu"), "{:.3f}"),
        ("bare loop, CPU s per epoch", per_epoch("bare", "cpu"), "{:.3f}"),
        (
            "ratio train_model / bare, wall time",
            [r.ratio("wall") for r in repetitions],
            "{:.3f}",
        ),
        (
            "ratio train_model / bare, CPU time",
            [r.ratio("cpu") for r in repetitions],
            "{:.3f}",
        ),
        (
            "ratio over epochs 2 to last, wall time",
            [after_epoch_1(r) for r in repetitions],
            "{:.3f}",
        ),
        (
            "train_model epoch 1 with setup, s",
            [r.train_model_wall[0] for r in repetitions],
            "{:.3f}",
        ),
        (
            "bare loop epoch 1 with setup, s",
            [r.bare_setup_wall + r.bare_wall[0] for r in repetitions],
            "{:.3f}",
        ),
        (
            "train_model after the last epoch, s",
            [r.teardown_wall for r in repetitions],
            "{:.3f}",
        ),
    ]


class _Lockstep:
    """The `on_epoch_end` callback that times train_model and runs the bare loop.

    Dropout draws from the global random generator, which both variants
    share. The callback swaps the generator state around each bare epoch, so
    each variant draws the numbers it would draw alone and both models get
    the same dropout masks.
    """

    def __init__(self, model: torch.nn.Module, bare: BareLoop, device: torch.device):
        self.model = model
        self.bare = bare
        self.device = device
        self.result = Repetition()
        # fresh_run seeded both runs alike, so the current state is the one
        # that each variant starts from.
        self.bare_random_state = _random_state(device)
        self.mark_wall = self.mark_cpu = 0.0

    def start(self) -> None:
        self.mark_wall, self.mark_cpu = time.perf_counter(), time.process_time()

    def on_epoch_end(self, epoch: int, row: dict) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.result.train_model_wall.append(wall - self.mark_wall)
        self.result.train_model_cpu.append(cpu - self.mark_cpu)

        timed_random_state = _random_state(self.device)
        _set_random_state(self.bare_random_state, self.device)
        bare_wall, bare_cpu = timed(self.bare.epoch)
        self.bare_random_state = _random_state(self.device)
        _set_random_state(timed_random_state, self.device)
        self.result.bare_wall.append(bare_wall)
        self.result.bare_cpu.append(bare_cpu)

        difference = _max_difference(self.model, self.bare.model)
        self.result.max_weight_difference = max(
            self.result.max_weight_difference, difference
        )
        self.start()


def _random_state(device: torch.device) -> dict[str, torch.Tensor]:
    # NOTE: the MPS generator is not swapped, so on MPS the two variants draw
    # different dropout masks and max_weight_difference is not 0.
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_random_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _max_difference(first: torch.nn.Module, second: torch.nn.Module) -> float:
    second_state = second.state_dict()
    largest = 0.0
    for name, tensor in first.state_dict().items():
        difference = (tensor.double() - second_state[name].double()).abs().max()
        largest = max(largest, float(difference))
    return largest
