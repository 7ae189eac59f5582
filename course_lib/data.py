"""Data sets and loaders: the bundled MNIST subset, torchvision sets, batching.

The default data set, ``mnist_5k``, ships with the package: 5,000 MNIST digits,
500 per class, stored as uint8 in ``course_lib/data/mnist_5k.npz``. It works
offline, so every test and notebook runs on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

BUNDLED = "mnist_5k"
TORCHVISION_SETS = ("mnist", "fashion_mnist", "cifar10")
DATASET_CHOICES = (BUNDLED, *TORCHVISION_SETS)

# Per-channel mean and standard deviation of each training set, on [0, 1] pixels.
_NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
_CLASSES = {
    "mnist": tuple(str(digit) for digit in range(10)),
    "fashion_mnist": (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
    "cifar10": (
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    ),
}


class DatasetUnavailableError(RuntimeError):
    """A torchvision data set could not be found in the cache or downloaded."""


@dataclass
class Split:
    """Images and labels of one split, held in memory.

    Attributes:
        images: float32 tensor of shape (N, C, H, W), normalized.
        labels: int64 tensor of shape (N,).
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images, self.labels


@dataclass
class DataSplits:
    """Train, validation and test splits of one data set."""

    name: str
    train: Split
    val: Split
    test: Split
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.images.shape[1:])

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def default_cache_dir() -> Path:
    """Return the folder that torchvision downloads go to.

    ``COURSE_DATA_DIR`` overrides the default ``~/.cache/course_lib``.
    """
    env = os.environ.get("COURSE_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "course_lib"


def load_dataset(
    name: str = BUNDLED,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    download: bool = True,
) -> DataSplits:
    """Load a data set as normalized tensors split into train, val and test.

    ``mnist_5k`` is the bundled subset, split per class with a fixed seed
    (with the defaults: 4,000 train, 500 val, 500 test). The torchvision sets
    ``mnist``, ``fashion_mnist`` and ``cifar10`` come from the cache folder
    (`default_cache_dir`), downloaded on first use. Their official test set is
    the test split, and `val_fraction` of their training set is held out for
    validation.

    NOTE: the bundled splits keep the file's order, which is sorted by class,
    so ``splits.train.images[:64]`` are all zeros. The training loader
    shuffles, but draw a random sample before showing or batching images by hand.

    Raises:
        ValueError: for an unknown name or fractions outside (0, 1).
        DatasetUnavailableError: when a torchvision set is neither cached nor
            downloadable, for example offline.
    """
    key = name.strip().lower().replace("-", "_")
    if key not in DATASET_CHOICES:
        raise ValueError(
            f"unknown data set {name!r}; use one of {', '.join(DATASET_CHOICES)}"
        )
    for label, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"{label} must be between 0 and 1, got {fraction!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be below 1, got "
            f"{val_fraction} + {test_fraction}"
        )

    if key == BUNDLED:
        images, labels = load_bundled_mnist()
        generator = torch.Generator().manual_seed(seed)
        train_idx, val_idx, test_idx = _stratified_split(
            labels, (val_fraction, test_fraction), generator
        )
        images = _normalize(images, "mnist")
        return DataSplits(
            name=BUNDLED,
            train=Split(images[train_idx], labels[train_idx]),
            val=Split(images[val_idx], labels[val_idx]),
            test=Split(images[test_idx], labels[test_idx]),
            classes=_CLASSES["mnist"],
        )

    train_images, train_labels, test_images, test_labels = _load_torchvision(
        key, Path(root) if root is not None else default_cache_dir(), download
    )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_labels), generator=generator)
    n_val = int(round(val_fraction * len(order)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    train_images = _normalize(train_images, key)
    test_images = _normalize(test_images, key)
    return DataSplits(
        name=key,
        train=Split(train_images[train_idx], train_labels[train_idx]),
        val=Split(train_images[val_idx], train_labels[val_idx]),
        test=Split(test_images, test_labels),
        classes=_CLASSES[key],
    )


def load_bundled_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """Return the bundled 5,000 digits as uint8 (N, 1, 28, 28) and int64 labels."""
    with resources.files("course_lib").joinpath("data/mnist_5k.npz").open("rb") as f:
        archive = np.load(f)
        images = torch.from_numpy(archive["images"].copy()).unsqueeze(1)
        labels = torch.from_numpy(archive["labels"].astype(np.int64))
    return images, labels


def _normalize(images_uint8: torch.Tensor, stats_name: str) -> torch.Tensor:
    mean, std = _NORMALIZATION[stats_name]
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return (images_uint8.float() / 255.0 - mean_t) / std_t


def _stratified_split(
    labels: torch.Tensor,
    fractions: tuple[float, float],
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split indices per class so each split keeps the class balance."""
    val_fraction, test_fraction = fractions
    parts: tuple[list, list, list] = ([], [], [])
    for cls in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_val = int(round(val_fraction * len(idx)))
        n_test = int(round(test_fraction * len(idx)))
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val : n_val + n_test])
        parts[0].append(idx[n_val + n_test :])
    # Sorting keeps the split independent of the class loop order.
    train, val, test = (torch.cat(p).sort().values for p in parts)
    return train, val, test


def _load_torchvision(key: str, root: Path, download: bool):
    from torchvision import datasets

    constructor = {
        "mnist": datasets.MNIST,
        "fashion_mnist": datasets.FashionMNIST,
        "cifar10": datasets.CIFAR10,
    }[key]
    try:
        root.mkdir(parents=True, exist_ok=True)
        train = constructor(str(root), train=True, download=download)
        test = constructor(str(root), train=False, download=download)
    except (OSError, RuntimeError) as err:
        raise DatasetUnavailableError(
            f"could not load {key!r} from {root} ({type(err).__name__}: {err}). "
            "Downloading needs internet; offline, use the bundled set with "
            f"load_dataset({BUNDLED!r}) or --dataset {BUNDLED}, or copy the files "
            "into that folder (set COURSE_DATA_DIR to use another one)."
        ) from err

    def to_tensors(ds):
        data = ds.data
        images = torch.as_tensor(np.asarray(data))
        if images.ndim == 3:  # MNIST-style (N, H, W)
            images = images.unsqueeze(1)
        else:  # CIFAR-style (N, H, W, C)
            images = images.permute(0, 3, 1, 2).contiguous()
        labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
        return images, labels

    return (*to_tensors(train), *to_tensors(test))


def make_imbalanced_binary(
    split: Split,
    *,
    positive_digit: int = 8,
    positive_fraction: float = 0.05,
    seed: int = 0,
) -> Split:
    """Return a binary, imbalanced view of a split for the loss-versus-metric lessons.

    Label 1 (the positive class) is `positive_digit`; label 0 is every other
    digit. All negatives are kept and positives are subsampled so that they make
    up `positive_fraction` of the result (5% by default, so 95% is class 0).

    Raises:
        ValueError: for a fraction outside (0, 1), a digit absent from the
            split, or a fraction that needs more positives than the split has.
    """
    if not 0.0 < positive_fraction < 1.0:
        raise ValueError(
            f"positive_fraction must be between 0 and 1, got {positive_fraction!r}"
        )
    present = torch.unique(split.labels).tolist()
    if positive_digit not in present:
        raise ValueError(
            f"positive_digit {positive_digit!r} does not occur in the split; "
            f"use one of {present}"
        )
    generator = torch.Generator().manual_seed(seed)
    positives = torch.nonzero(split.labels == positive_digit).flatten()
    negatives = torch.nonzero(split.labels != positive_digit).flatten()
    n_pos = round(positive_fraction * len(negatives) / (1.0 - positive_fraction))
    if n_pos > len(positives):
        reachable = len(positives) / (len(positives) + len(negatives))
        raise ValueError(
            f"positive_fraction {positive_fraction!r} needs {n_pos} samples of digit "
            f"{positive_digit}, but the split has {len(positives)}; use a "
            f"positive_fraction of at most {reachable:.3f}"
        )
    n_pos = max(1, n_pos)
    positives = positives[torch.randperm(len(positives), generator=generator)[:n_pos]]
    keep = torch.cat([negatives, positives]).sort().values
    binary = (split.labels[keep] == positive_digit).long()
    return Split(split.images[keep], binary)


class TensorLoader:
    """Batches of in-memory tensors, without per-sample ``__getitem__`` calls.

    Each epoch draws one permutation from the loader's own `torch.Generator`,
    so the data order is reproducible and can be saved in a checkpoint
    (``loader.generator.get_state()``). Indexing whole batches at once avoids
    the per-sample Python overhead of ``DataLoader(TensorDataset(...))``.

    Args:
        images: tensor whose first dimension is the sample index.
        labels: tensor with the same first dimension.
        batch_size: samples per batch; the last batch may be shorter.
        shuffle: draw a new order every epoch.
        seed: seed of the loader's generator.
        drop_last: drop a short last batch.
        pin_memory: keep tensors in page-locked memory for faster,
            non-blocking copies to CUDA. Only takes effect when CUDA exists.
        augment: a function ``augment(images, generator)`` applied to each
            batch, such as `random_shift`. It draws from the loader's generator,
            so augmented runs stay reproducible and resumable.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int = 64,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        pin_memory: bool = False,
        augment=None,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(
                f"images and labels differ in length ({len(images)} vs {len(labels)}); "
                "pass tensors with one label per image"
            )
        # bool is a subclass of int, but True is no batch size.
        is_int = isinstance(batch_size, int) and not isinstance(batch_size, bool)
        if not is_int or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if pin_memory and torch.cuda.is_available():
            images, labels = images.pin_memory(), labels.pin_memory()
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_split(cls, split: Split, **kwargs) -> "TensorLoader":
        return cls(split.images, split.labels, **kwargs)

    @property
    def dataset_size(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        n = len(self.labels)
        if self.drop_last:
            return n // self.batch_size
        return -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator)
        else:
            order = None
        for batch_index in range(len(self)):
            start = batch_index * self.batch_size
            stop = min(start + self.batch_size, n)
            if order is None:
                images, labels = self.images[start:stop], self.labels[start:stop]
            else:
                idx = order[start:stop]
                images, labels = self.images[idx], self.labels[idx]
            if self.augment is not None:
                images = self.augment(images, self.generator)
            yield images, labels


def random_shift(
    images: torch.Tensor, generator: torch.Generator, max_shift: int = 2
) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels in x and y, independently.

    The border is filled by repeating the edge pixels, which for digits is
    background. Works on a whole batch (N, C, H, W) with one indexing call.
    """
    n, channels, height, width = images.shape
    padded = torch.nn.functional.pad(
        images, (max_shift,) * 4, mode="replicate"
    )
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = dy[:, None] + torch.arange(height)
    cols = dx[:, None] + torch.arange(width)
    return padded[
        torch.arange(n)[:, None, None, None],
        torch.arange(channels)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def make_loaders(
    splits: DataSplits,
    *,
    batch_size: int = 64,
    eval_batch_size: int | None = None,
    seed: int = 0,
    pin_memory: bool = False,
    augment=None,
) -> tuple[TensorLoader, TensorLoader, TensorLoader]:
    """Return train (shuffled), val and test loaders over in-memory splits.

    `augment` applies to the training loader only.
    """
    eval_size = eval_batch_size or max(batch_size, 256)
    train = TensorLoader.from_split(
        splits.train, batch_size=batch_size, shuffle=True, seed=seed,
        pin_memory=pin_memory, augment=augment,
    )
    val = TensorLoader.from_split(splits.val, batch_size=eval_size, pin_memory=pin_memory)
    test = TensorLoader.from_split(splits.test, batch_size=eval_size, pin_memory=pin_memory)
    return train, val, test
