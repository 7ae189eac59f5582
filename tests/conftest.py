"""Shared fixtures: small, fixed subsets of the bundled MNIST digits."""

from __future__ import annotations

import logging

import pytest
import torch

from course_lib import DataSplits, Split, load_dataset

# One intra-op thread: on a machine with few cores that also runs other jobs,
# idle OpenMP threads spin and slowed a 512-sample MLP epoch from 0.05 s to
# 4 s (2 cores, load average 6). Bitwise comparisons also rely on a fixed
# thread count.
torch.set_num_threads(1)


def _subset(split: Split, size: int, seed: int) -> Split:
    # The bundled splits are sorted by index, which groups digits, so a prefix
    # would hold few classes. A seeded permutation keeps every class.
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    keep = order[:size]
    return Split(split.images[keep], split.labels[keep])


@pytest.fixture(scope="session")
def mnist() -> DataSplits:
    """The bundled 5,000 digits, split 4,000 / 500 / 500."""
    return load_dataset()


@pytest.fixture(scope="session")
def small_splits(mnist: DataSplits) -> tuple[Split, Split, Split]:
    """384 train, 128 validation and 128 test digits, shared: do not modify them."""
    return (
        _subset(mnist.train, 384, seed=1),
        _subset(mnist.val, 128, seed=2),
        _subset(mnist.test, 128, seed=3),
    )


@pytest.fixture(autouse=True)
def restore_course_logger():
    """Undo what cli.main's configure_logging does to the course_lib logger.

    Without this, a test that calls cli.main in-process leaves a handler and
    propagate=False behind, and later tests that read caplog see nothing.
    """
    logger = logging.getLogger("course_lib")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved
