"""Loader speed: `TensorLoader` against ``DataLoader(TensorDataset(...))``."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, TensorDataset

from course_lib import TensorLoader
from course_lib.data import DataSplits
from course_lib.device import pick_precision

from bare_loop import BareLoop, fresh_run, synchronize, timed


@dataclass
class LoaderTimings:
    """Wall times in seconds, one entry per measured pair, warm-up left out."""

    tensor_loader: list[float] = field(default_factory=list)
    data_loader: list[float] = field(default_factory=list)


def build_loaders(
    splits: DataSplits, settings: argparse.Namespace
) -> tuple[TensorLoader, DataLoader]:
    """Return both loaders over the training split, shuffled, seeded alike."""
    images, labels = splits.train.tensors()
    tensor_loader = TensorLoader(
        images, labels, batch_size=settings.batch_size, shuffle=True, seed=settings.seed
    )
    data_loader = DataLoader(
        TensorDataset(images, labels),
        batch_size=settings.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(settings.seed),
    )
    if len(tensor_loader) != len(data_loader):
        raise RuntimeError(
            f"TensorLoader yields {len(tensor_loader)} batches but DataLoader "
            f"{len(data_loader)}; both must cover the same samples"
        )
    return tensor_loader, data_loader


def time_iteration(
    splits: DataSplits, settings: argparse.Namespace, *, pairs: int, warmup: int
) -> LoaderTimings:
    """Time one pass over every batch with each loader, alternating.

    Each pair runs both loaders back to back, and the one that goes first
    alternates from pair to pair, so neither always follows the other.
    """
    tensor_loader, data_loader = build_loaders(splits, settings)
    return _alternate(
        lambda: _consume(tensor_loader),
        lambda: _consume(data_loader),
        pairs=pairs,
        warmup=warmup,
    )


def time_training(
    splits: DataSplits,
    settings: argparse.Namespace,
    device: torch.device,
    *,
    pairs: int,
    warmup: int,
) -> LoaderTimings:
    """Time one bare train epoch over each loader, alternating.

    Each loader trains its own model, and both models start from the same seed.
    """
    tensor_loader, data_loader = build_loaders(splits, settings)
    precision = pick_precision(device)
    loops = []
    for _ in range(2):
        loops.append(
            BareLoop(
                fresh_run(splits, settings, device),
                device=device,
                precision=precision,
                epochs=pairs + warmup,
                lr=settings.lr,
                weight_decay=settings.weight_decay,
            )
        )

    def train_with(loop: BareLoop, loader) -> None:
        loop.train_epoch(loader)
        synchronize(device)

    return _alternate(
        lambda: train_with(loops[0], tensor_loader),
        lambda: train_with(loops[1], data_loader),
        pairs=pairs,
        warmup=warmup,
    )


def _consume(loader) -> None:
    for _batch in loader:
        pass


def _alternate(run_tensor_loader, run_data_loader, *, pairs, warmup) -> LoaderTimings:
    timings = LoaderTimings()
    for index in range(warmup + pairs):
        if index % 2 == 0:
            tensor_seconds, _ = timed(run_tensor_loader)
            data_seconds, _ = timed(run_data_loader)
        else:
            data_seconds, _ = timed(run_data_loader)
            tensor_seconds, _ = timed(run_tensor_loader)
        if index >= warmup:
            timings.tensor_loader.append(tensor_seconds)
            timings.data_loader.append(data_seconds)
    return timings
