"""The cost of each piece of work that train_model does beyond the bare loop.

Each piece of per-epoch work that the bare loop does not do is timed alone,
through the same public function that `train_model` calls, with the files and
figure of a real run.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from course_lib import History, LiveCurves, load_checkpoint, run_epoch, train_model
from course_lib.checkpoint import save_checkpoint
from course_lib.data import DataSplits
from course_lib.device import pick_precision

from bare_loop import BareLoop, fresh_run, head_of_splits, synchronize, timed


@dataclass
class Piece:
    """Wall and CPU times of one piece of work, in seconds, one per sample."""

    name: str
    when: str
    wall: list[float]
    cpu: list[float]


def time_pieces(
    splits: DataSplits,
    settings: argparse.Namespace,
    device: torch.device,
    work_dir: Path,
    *,
    calls: int,
    epoch_pairs: int,
) -> list[Piece]:
    """Time each piece of train_model's extra work.

    The checkpoints, history and figure come from a 2-epoch train_model run
    on a few batches. Its last history row is then repeated up to the train
    command's number of epochs, so that the figure and history.csv have the
    size they reach at the end of a default run.
    """
    run_dir = Path(tempfile.mkdtemp(prefix="breakdown-", dir=work_dir))
    history = _sample_history(splits, settings, device, run_dir)
    last_state = load_checkpoint(run_dir / "last.pt")
    best_state = load_checkpoint(run_dir / "best.pt")
    last_state["history"] = history.state_dict()
    curves = LiveCurves(save_path=None, display=False)

    pieces = [
        _bookkeeping(splits, settings, device, pairs=epoch_pairs),
        _median_piece(
            "redraw the figure (LiveCurves.update)",
            "every epoch",
            lambda: curves.update(history, best_epoch=len(history)),
            calls,
        ),
        _median_piece(
            "render and write curves.png",
            "epoch 1, then at most every 10 s, and at the end",
            lambda: curves.save(run_dir / "curves.png"),
            calls,
        ),
        _median_piece(
            "write last.pt (save_checkpoint)",
            "every epoch",
            lambda: save_checkpoint(last_state, run_dir / "last.pt"),
            calls,
        ),
        _median_piece(
            "write best.pt (save_checkpoint)",
            "epochs that improve the monitored value",
            lambda: save_checkpoint(best_state, run_dir / "best.pt"),
            calls,
        ),
        _median_piece(
            "write history.csv (History.to_csv)",
            "every epoch",
            lambda: history.to_csv(run_dir / "history.csv"),
            calls,
        ),
    ]
    return pieces


def _sample_history(splits, settings, device, run_dir: Path) -> History:
    run = fresh_run(head_of_splits(splits, 256, 256), settings, device)
    result = train_model(
        run.model,
        run.train_loader,
        run.val_loader,
        epochs=2,
        monitor=settings.monitor,
        device=device,
        out_dir=run_dir,
        live_plot=False,
        progress=False,
    )
    row = result.history.rows[-1]
    return History(dict(row, epoch=epoch) for epoch in range(1, settings.epochs + 1))


def _median_piece(name: str, when: str, work, calls: int) -> Piece:
    work()
    samples = [timed(work) for _ in range(calls)]
    return Piece(name, when, [wall for wall, _ in samples], [cpu for _, cpu in samples])


def _bookkeeping(splits, settings, device, *, pairs: int) -> Piece:
    """Time run_epoch's train and val phases against the bare loop's.

    The difference is what run_epoch adds per epoch: loss and accuracy sums,
    the NaN check, label checks and the confusion matrix. Each pair runs both
    variants back to back on their own identically seeded models.
    """
    precision = pick_precision(device)
    loops = []
    for _ in range(2):
        loops.append(
            BareLoop(
                fresh_run(splits, settings, device),
                device=device,
                precision=precision,
                epochs=pairs + 1,
                lr=settings.lr,
                weight_decay=settings.weight_decay,
            )
        )
    course_loop, bare = loops
    criterion = nn.CrossEntropyLoss()

    def course_phases() -> None:
        for train, optimizer in ((True, course_loop.optimizer), (False, None)):
            loader = course_loop.train_loader if train else course_loop.val_loader
            run_epoch(
                course_loop.model,
                loader,
                criterion,
                optimizer,
                device,
                train,
                precision=precision,
            )
        synchronize(device)

    def bare_phases() -> None:
        bare.train_epoch()
        bare.validate()
        synchronize(device)

    wall_differences, cpu_differences = [], []
    for index in range(pairs + 1):
        if index % 2 == 0:
            course_wall, course_cpu = timed(course_phases)
            bare_wall, bare_cpu = timed(bare_phases)
        else:
            bare_wall, bare_cpu = timed(bare_phases)
            course_wall, course_cpu = timed(course_phases)
        if index > 0:
            wall_differences.append(course_wall - bare_wall)
            cpu_differences.append(course_cpu - bare_cpu)
    return Piece(
        "run_epoch's sums and checks, train and val",
        "every epoch",
        wall_differences,
        cpu_differences,
    )
