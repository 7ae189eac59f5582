"""The bare loop that `train_model` is timed against, and the shared run setup."""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import nn

from course_lib import build_model, make_loaders, seed_everything
from course_lib.cli import _width_option, build_parser
from course_lib.data import DataSplits, Split, random_shift
from course_lib.device import Precision


def train_command_defaults() -> argparse.Namespace:
    """Return the settings that ``python -m course_lib train`` uses by default."""
    return build_parser().parse_args(["train"])


@dataclass
class Run:
    """A freshly seeded model with its own loaders, ready to train."""

    model: nn.Module
    train_loader: object
    val_loader: object
    test_loader: object


def fresh_run(
    splits: DataSplits, settings: argparse.Namespace, device: torch.device
) -> Run:
    """Seed, then build the loaders and the model as the train command does.

    Two calls with the same arguments return identical weights and loaders
    that yield the same batches, and leave the global random state the same.
    """
    seed_everything(settings.seed)
    train_loader, val_loader, test_loader = make_loaders(
        splits,
        batch_size=settings.batch_size,
        seed=settings.seed,
        pin_memory=device.type == "cuda",
        augment=None if settings.no_augment else random_shift,
    )
    # The command's own helper turns --width into the model's keyword, so the
    # model here has the command's default width.
    model = build_model(
        settings.model,
        splits.input_shape,
        splits.num_classes,
        **_width_option(settings),
    )
    return Run(model, train_loader, val_loader, test_loader)


def head_of_splits(
    splits: DataSplits, train_samples: int, val_samples: int
) -> DataSplits:
    """Return `splits` cut to the first samples of the train and val splits."""

    def head(split: Split, count: int) -> Split:
        return Split(split.images[:count], split.labels[:count])

    return dataclasses.replace(
        splits,
        train=head(splits.train, train_samples),
        val=head(splits.val, val_samples),
    )


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class BareLoop:
    """The five steps per batch, a forward-only validation pass, a scheduler step.

    It builds the optimizer and schedule that `train_model` builds by default
    (AdamW, cosine over `epochs`) and uses the same autocast settings, but
    keeps no sums, metrics, checkpoints, history or plot.
    """

    def __init__(
        self,
        run: Run,
        *,
        device: torch.device,
        precision: Precision,
        epochs: int,
        lr: float,
        weight_decay: float,
    ) -> None:
        self.model = run.model.to(device)
        self.train_loader = run.train_loader
        self.val_loader = run.val_loader
        self.device = device
        self.precision = precision
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=lr, weight_decay=weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=epochs
        )
        self.scaler = (
            torch.amp.GradScaler("cuda") if precision.use_grad_scaler else None
        )

    def train_epoch(self, loader=None) -> None:
        """Run the five steps on every batch of `loader` (the train loader)."""
        self.model.train()
        for inputs, targets in loader if loader is not None else self.train_loader:
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)

            self.optimizer.zero_grad(set_to_none=True)

            with self._autocast():
                logits = self.model(inputs)
                loss = self.criterion(logits, targets)

            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()

    def validate(self) -> None:
        """Run the forward pass over the validation batches, nothing else."""
        self.model.eval()
        with torch.no_grad():
            for inputs, _ in self.val_loader:
                inputs = inputs.to(self.device, non_blocking=True)
                with self._autocast():
                    self.model(inputs)

    def epoch(self) -> None:
        """Run one train phase, one validation pass and one scheduler step."""
        self.train_epoch()
        self.validate()
        self.scheduler.step()
        synchronize(self.device)

    def _autocast(self) -> torch.autocast:
        dtype = self.precision.dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)


def timed(function, *args) -> tuple[float, float]:
    """Call `function` and return its wall time and process CPU time in seconds.

    The CPU time adds up all threads of this process, so with several threads
    it can exceed the wall time. It leaves out time spent waiting for the disk
    or for other processes.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    function(*args)
    return time.perf_counter() - wall, time.process_time() - cpu
