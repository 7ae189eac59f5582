"""Tests of the bundled data set, the splits, TensorLoader and the binary view."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from course_lib.data import (
    DATASET_CHOICES,
    Split,
    TensorLoader,
    load_bundled_mnist,
    load_dataset,
    make_imbalanced_binary,
    make_loaders,
    random_shift,
)

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Undo the MNIST normalization, giving back the stored pixel values."""
    return ((images * MNIST_STD + MNIST_MEAN) * 255).round().to(torch.uint8)


def image_keys(images: torch.Tensor) -> list[bytes]:
    """Identify each image by its raw pixel bytes."""
    return [row.numpy().tobytes() for row in to_uint8(images).flatten(1)]


@pytest.fixture(scope="module")
def bundled():
    return load_bundled_mnist()


@pytest.fixture(scope="module")
def splits():
    return load_dataset("mnist_5k", seed=0)


def test_bundled_shape_and_dtype(bundled):
    images, labels = bundled

    assert images.shape == (5000, 1, 28, 28)
    assert images.dtype == torch.uint8
    assert labels.dtype == torch.int64


def test_bundled_500_per_class(bundled):
    _, labels = bundled

    assert labels.bincount(minlength=10).tolist() == [500] * 10


def test_bundled_images_unique(bundled):
    # The split tests below identify images by their pixels, which needs this.
    images, _ = bundled
    keys = {row.numpy().tobytes() for row in images.flatten(1)}

    assert len(keys) == 5000


def test_split_sizes(splits):
    assert splits.sizes() == {"train": 4000, "val": 500, "test": 500}
    assert splits.num_classes == 10
    assert splits.input_shape == (1, 28, 28)


def test_split_dtypes(splits):
    for split in (splits.train, splits.val, splits.test):
        assert split.images.dtype == torch.float32
        assert split.labels.dtype == torch.int64


def test_split_disjoint(splits):
    train = set(image_keys(splits.train.images))
    val = set(image_keys(splits.val.images))
    test = set(image_keys(splits.test.images))

    assert not train & val
    assert not train & test
    assert not val & test


def test_split_covers_bundled_set(splits, bundled):
    images, _ = bundled
    all_keys = {row.numpy().tobytes() for row in images.flatten(1)}
    split_keys = set()
    for split in (splits.train, splits.val, splits.test):
        split_keys |= set(image_keys(split.images))

    assert split_keys == all_keys


def test_split_labels_match_images(splits, bundled):
    images, labels = bundled
    label_of = {
        row.numpy().tobytes(): int(label)
        for row, label in zip(images.flatten(1), labels)
    }
    keys = image_keys(splits.val.images)

    assert [label_of[key] for key in keys] == splits.val.labels.tolist()


def test_split_keeps_class_balance(splits):
    assert splits.train.labels.bincount(minlength=10).tolist() == [400] * 10
    assert splits.val.labels.bincount(minlength=10).tolist() == [50] * 10
    assert splits.test.labels.bincount(minlength=10).tolist() == [50] * 10


def test_split_other_fractions():
    other = load_dataset("mnist_5k", val_fraction=0.2, test_fraction=0.1)

    assert other.sizes() == {"train": 3500, "val": 1000, "test": 500}
    assert other.val.labels.bincount(minlength=10).tolist() == [100] * 10


def test_split_same_seed_same_result(splits):
    again = load_dataset("mnist_5k", seed=0)

    assert torch.equal(again.train.images, splits.train.images)
    assert torch.equal(again.val.labels, splits.val.labels)
    assert torch.equal(again.test.images, splits.test.images)


def test_split_other_seed_differs(splits):
    other = load_dataset("mnist_5k", seed=1)

    assert set(image_keys(other.val.images)) != set(image_keys(splits.val.images))
    assert set(image_keys(other.test.images)) != set(image_keys(splits.test.images))


def test_split_ignores_global_rng():
    torch.manual_seed(123)
    first = load_dataset("mnist_5k", seed=0)
    torch.manual_seed(456)
    second = load_dataset("mnist_5k", seed=0)

    assert torch.equal(first.val.images, second.val.images)


def test_split_normalized(splits):
    images = splits.train.images

    assert abs(float(images.mean())) < 0.1
    assert abs(float(images.std()) - 1.0) < 0.1


def test_dataset_name_spellings():
    assert load_dataset("MNIST-5k").name == "mnist_5k"


def test_dataset_unknown_name():
    with pytest.raises(ValueError) as excinfo:
        load_dataset("imagenet")
    message = str(excinfo.value)

    assert "'imagenet'" in message
    for choice in DATASET_CHOICES:
        assert choice in message


@pytest.mark.parametrize(
    ("val_fraction", "test_fraction"),
    [(0.0, 0.1), (0.1, 1.0), (-0.1, 0.1), (0.6, 0.4)],
)
def test_dataset_bad_fractions(val_fraction, test_fraction):
    with pytest.raises(ValueError):
        load_dataset(
            "mnist_5k", val_fraction=val_fraction, test_fraction=test_fraction
        )


def test_torchvision_offline_fails_fast(tmp_path):
    # A fresh cache folder, so the set can only come from a download. Host
    # name lookups fail in the child process, as they do on a machine without
    # internet, so no machine downloads MNIST here. The subprocess timeout
    # keeps a stalled download from hanging the test run.
    script = textwrap.dedent(
        f"""
        import socket
        import sys

        def offline(*args, **kwargs):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

        socket.getaddrinfo = offline

        from course_lib.data import DatasetUnavailableError, load_dataset

        try:
            load_dataset("mnist", root={str(tmp_path / "cache")!r})
        except DatasetUnavailableError as err:
            print("MESSAGE:", err)
            sys.exit(0)
        print("LOADED")
        sys.exit(1)
        """
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("loading a torchvision set offline did not fail within 120 s")

    assert done.returncode == 0, done.stderr
    assert "MESSAGE:" in done.stdout
    assert "mnist_5k" in done.stdout.split("MESSAGE:", 1)[1]


class CountingTensor(torch.Tensor):
    """A tensor that counts the indexing calls made on it."""

    getitem_calls = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__:
            CountingTensor.getitem_calls += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def epoch_labels(loader: TensorLoader) -> list[int]:
    return torch.cat([labels for _, labels in loader]).tolist()


def test_loader_covers_each_sample_once():
    labels = torch.arange(10)
    loader = TensorLoader(torch.zeros(10, 2), labels, batch_size=3, shuffle=True)

    for _ in range(3):
        assert sorted(epoch_labels(loader)) == list(range(10))


def test_loader_images_follow_labels():
    images = torch.arange(10, dtype=torch.float32).view(10, 1) * 2
    loader = TensorLoader(images, torch.arange(10), batch_size=4, shuffle=True)

    for batch_images, batch_labels in loader:
        assert torch.equal(batch_images.flatten(), batch_labels.float() * 2)


def test_loader_without_shuffle_keeps_order():
    loader = TensorLoader(torch.zeros(7, 1), torch.arange(7), batch_size=3)

    assert epoch_labels(loader) == list(range(7))


def test_loader_shuffle_changes_per_epoch():
    loader = TensorLoader(torch.zeros(50, 1), torch.arange(50), shuffle=True)

    assert epoch_labels(loader) != epoch_labels(loader)


def test_loader_shuffle_reproducible():
    first = TensorLoader(torch.zeros(50, 1), torch.arange(50), shuffle=True, seed=3)
    second = TensorLoader(torch.zeros(50, 1), torch.arange(50), shuffle=True, seed=3)

    assert epoch_labels(first) == epoch_labels(second)
    assert epoch_labels(first) == epoch_labels(second)


def test_loader_seed_changes_order():
    first = TensorLoader(torch.zeros(50, 1), torch.arange(50), shuffle=True, seed=3)
    second = TensorLoader(torch.zeros(50, 1), torch.arange(50), shuffle=True, seed=4)

    assert epoch_labels(first) != epoch_labels(second)


def test_loader_ignores_global_rng():
    first = TensorLoader(torch.zeros(50, 1), torch.arange(50), shuffle=True, seed=3)
    second = TensorLoader(torch.zeros(50, 1), torch.arange(50), shuffle=True, seed=3)

    torch.manual_seed(1)
    order_first = epoch_labels(first)
    torch.manual_seed(2)
    order_second = epoch_labels(second)

    assert order_first == order_second


def test_loader_leaves_global_rng_alone():
    loader = TensorLoader(torch.zeros(50, 1), torch.arange(50), shuffle=True)
    before = torch.get_rng_state()

    epoch_labels(loader)

    assert torch.equal(torch.get_rng_state(), before)


def test_loader_generator_state_replays_order():
    loader = TensorLoader(torch.zeros(50, 1), torch.arange(50), shuffle=True)
    epoch_labels(loader)
    state = loader.generator.get_state()
    expected = epoch_labels(loader)

    loader.generator.set_state(state)

    assert epoch_labels(loader) == expected


def test_loader_short_last_batch():
    loader = TensorLoader(torch.zeros(10, 1), torch.arange(10), batch_size=4)
    sizes = [len(labels) for _, labels in loader]

    assert sizes == [4, 4, 2]
    assert len(loader) == 3


def test_loader_drop_last():
    loader = TensorLoader(
        torch.zeros(10, 1), torch.arange(10), batch_size=4, drop_last=True
    )
    sizes = [len(labels) for _, labels in loader]

    assert sizes == [4, 4]
    assert len(loader) == 2


def test_loader_drop_last_exact_fit():
    loader = TensorLoader(
        torch.zeros(8, 1), torch.arange(8), batch_size=4, drop_last=True
    )

    assert len(loader) == 2
    assert len(list(loader)) == 2


def test_loader_len_matches_batches():
    for n in (1, 63, 64, 65, 200):
        loader = TensorLoader(torch.zeros(n, 1), torch.arange(n), batch_size=64)
        assert len(loader) == len(list(loader))


def test_loader_dataset_size():
    loader = TensorLoader(torch.zeros(10, 1), torch.arange(10), batch_size=4)

    assert loader.dataset_size == 10


@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_one_index_per_batch(shuffle):
    images = torch.zeros(100, 1, 4, 4).as_subclass(CountingTensor)
    labels = torch.arange(100)
    loader = TensorLoader(images, labels, batch_size=32, shuffle=shuffle)
    CountingTensor.getitem_calls = 0

    batches = list(loader)

    # One indexing call per batch, where a per-sample Dataset would make 100.
    assert len(batches) == 4
    assert CountingTensor.getitem_calls == 4


def test_loader_from_split():
    split = Split(torch.zeros(5, 1), torch.arange(5))
    loader = TensorLoader.from_split(split, batch_size=2)

    assert epoch_labels(loader) == [0, 1, 2, 3, 4]


def test_loader_length_mismatch():
    with pytest.raises(ValueError) as excinfo:
        TensorLoader(torch.zeros(10, 1), torch.arange(9))

    assert "10 vs 9" in str(excinfo.value)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, "8", True, None])
def test_loader_bad_batch_size(batch_size):
    with pytest.raises(ValueError) as excinfo:
        TensorLoader(torch.zeros(10, 1), torch.arange(10), batch_size=batch_size)

    assert repr(batch_size) in str(excinfo.value)


def dot_images(n: int, channels: int = 1) -> torch.Tensor:
    """Return n blank 28x28 images with one bright pixel at row 10, column 12."""
    images = torch.zeros(n, channels, 28, 28)
    images[:, :, 10, 12] = 1.0
    return images


def dot_positions(images: torch.Tensor) -> list[tuple[int, int]]:
    """Return the (row, column) of the bright pixel of each image."""
    positions = []
    for image in images[:, 0]:
        bright = torch.nonzero(image == 1.0)
        assert len(bright) == 1
        positions.append((int(bright[0, 0]), int(bright[0, 1])))
    return positions


def test_shift_keeps_shape_and_dtype():
    images = torch.randn(5, 3, 32, 32)

    shifted = random_shift(images, torch.Generator().manual_seed(0))

    assert shifted.shape == images.shape
    assert shifted.dtype == images.dtype


def test_shift_zero_is_identity():
    images = torch.randn(5, 1, 28, 28)

    shifted = random_shift(images, torch.Generator().manual_seed(0), max_shift=0)

    assert torch.equal(shifted, images)


def test_shift_moves_within_limit():
    shifted = random_shift(dot_images(64), torch.Generator().manual_seed(0))
    positions = dot_positions(shifted)
    offsets = {(row - 10, col - 12) for row, col in positions}

    assert all(abs(dy) <= 2 and abs(dx) <= 2 for dy, dx in offsets)
    # 64 draws from 25 offsets that are all alike mean one shift per batch.
    assert len(offsets) > 5


def test_shift_same_for_all_channels():
    shifted = random_shift(dot_images(16, channels=3), torch.Generator().manual_seed(0))

    assert torch.equal(shifted[:, 0], shifted[:, 1])
    assert torch.equal(shifted[:, 0], shifted[:, 2])


def test_shift_reproducible():
    images = torch.randn(8, 1, 28, 28)

    first = random_shift(images, torch.Generator().manual_seed(5))
    second = random_shift(images, torch.Generator().manual_seed(5))

    assert torch.equal(first, second)


def test_loader_augment_keeps_labels():
    labels = torch.arange(40)
    plain = TensorLoader(dot_images(40), labels, batch_size=16, shuffle=True, seed=1)
    shifted = TensorLoader(
        dot_images(40), labels, batch_size=16, shuffle=True, seed=1,
        augment=random_shift,
    )

    # The first epoch's order is drawn before any shift, so it matches.
    first_plain = [batch_labels for _, batch_labels in plain]
    first_shifted = list(shifted)

    for expected, (_, batch_labels) in zip(first_plain, first_shifted):
        assert torch.equal(batch_labels, expected)
    positions = [
        position for images, _ in first_shifted for position in dot_positions(images)
    ]

    assert len(positions) == 40
    assert any(position != (10, 12) for position in positions)


def test_loader_augment_reproducible():
    loaders = [
        TensorLoader(
            dot_images(40), torch.arange(40), batch_size=16, shuffle=True, seed=2,
            augment=random_shift,
        )
        for _ in range(2)
    ]
    epochs = [[images for images, _ in loader] for loader in loaders]

    for first, second in zip(*epochs):
        assert torch.equal(first, second)


def test_make_loaders_augment_train_only(splits):
    train, val, test = make_loaders(splits, augment=random_shift)

    assert train.augment is random_shift
    assert val.augment is None
    assert test.augment is None


def test_make_loaders_shuffle_train_only(splits):
    train, val, test = make_loaders(splits, batch_size=32)

    assert train.shuffle is True
    assert val.shuffle is False
    assert test.shuffle is False
    assert train.batch_size == 32


@pytest.fixture(scope="module")
def binary(splits):
    return make_imbalanced_binary(splits.train)


def test_binary_labels(binary):
    assert set(binary.labels.unique().tolist()) == {0, 1}
    assert binary.labels.dtype == torch.int64


def test_binary_positive_fraction(binary):
    fraction = float(binary.labels.float().mean())

    assert abs(fraction - 0.05) < 0.005


def test_binary_keeps_all_negatives(splits, binary):
    negatives = int((splits.train.labels != 8).sum())

    assert int((binary.labels == 0).sum()) == negatives


def test_binary_positives_are_digit(splits, binary):
    # The images labelled 1 must be eights from the source split.
    eights = set(image_keys(splits.train.images[splits.train.labels == 8]))
    positives = image_keys(binary.images[binary.labels == 1])

    assert set(positives) <= eights


def test_binary_other_digit_and_fraction(splits):
    binary = make_imbalanced_binary(
        splits.train, positive_digit=3, positive_fraction=0.1
    )
    threes = set(image_keys(splits.train.images[splits.train.labels == 3]))
    positives = image_keys(binary.images[binary.labels == 1])

    assert abs(float(binary.labels.float().mean()) - 0.1) < 0.005
    assert set(positives) <= threes


def test_binary_deterministic(splits, binary):
    again = make_imbalanced_binary(splits.train)

    assert torch.equal(again.images, binary.images)
    assert torch.equal(again.labels, binary.labels)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 1.5])
def test_binary_bad_fraction(splits, fraction):
    with pytest.raises(ValueError) as excinfo:
        make_imbalanced_binary(splits.train, positive_fraction=fraction)

    assert repr(fraction) in str(excinfo.value)


def test_binary_fraction_too_high(splits):
    # 400 eights cannot make up half of a split with 3,600 other digits.
    with pytest.raises(ValueError) as excinfo:
        make_imbalanced_binary(splits.train, positive_fraction=0.5)

    assert "0.5" in str(excinfo.value)


@pytest.mark.parametrize("digit", [10, -1])
def test_binary_absent_digit(splits, digit):
    with pytest.raises(ValueError) as excinfo:
        make_imbalanced_binary(splits.train, positive_digit=digit)

    assert repr(digit) in str(excinfo.value)
