"""Tests of run_epoch, EarlyStopping and train_model with small real models."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from course_lib import (
    MLP,
    EarlyStopping,
    History,
    NonFiniteLossError,
    SmallCNN,
    Split,
    TensorLoader,
    load_checkpoint,
    run_epoch,
    train_model,
)

HISTORY_COLUMNS = [
    "epoch", "train_loss", "train_acc", "train_macro_f1",
    "val_loss", "val_acc", "val_macro_f1", "lr", "seconds",
]


def make_mlp(seed: int = 0, dropout: float = 0.0) -> MLP:
    torch.manual_seed(seed)
    return MLP(hidden=32, dropout=dropout)


def states_equal(left: dict, right: dict) -> bool:
    return left.keys() == right.keys() and all(
        torch.equal(left[key], right[key]) for key in left
    )


class CountingLoader:
    """Wraps a loader and counts the passes and batches drawn from it.

    `on_pass` is called at the start of every pass, before the first batch.
    """

    def __init__(self, loader, on_pass=None):
        self.loader = loader
        self.on_pass = on_pass
        self.passes = 0
        self.batches = 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.passes += 1
        if self.on_pass is not None:
            self.on_pass()
        for batch in self.loader:
            self.batches += 1
            yield batch


class NaNAtLoader:
    """Yields the wrapped loader's batches, with NaN inputs in one batch of one pass."""

    def __init__(self, loader, bad_pass: int, bad_batch: int):
        self.loader = loader
        self.bad_pass = bad_pass
        self.bad_batch = bad_batch
        self.passes = 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.passes += 1
        for index, (inputs, targets) in enumerate(self.loader):
            if self.passes == self.bad_pass and index == self.bad_batch:
                inputs = torch.full_like(inputs, math.nan)
            yield inputs, targets


# --- run_epoch -------------------------------------------------------------


@pytest.mark.parametrize("train", [False, True])
def test_run_epoch_short_last_batch(small_splits, train):
    split = small_splits[0]
    images, labels = split.images[:65], split.labels[:65]
    loader = TensorLoader(images, labels, batch_size=16)
    model = make_mlp()
    criterion = nn.CrossEntropyLoss()
    # lr=0 keeps the weights fixed, so every train batch uses the same model.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    loss, accuracy = run_epoch(model, loader, criterion, optimizer, "cpu", train=train)

    with torch.no_grad():
        logits = model(images)
        full_loss = criterion(logits, labels).item()
        correct = (logits.argmax(dim=1) == labels).sum().item()
        batch_losses = [criterion(model(x), y).item() for x, y in loader]
    assert len(loader) == 5
    assert len(labels) % 16 == 1
    # Guard: a plain mean of the batch losses differs from the true average.
    assert abs(sum(batch_losses) / len(batch_losses) - full_loss) > 1e-3
    assert loss == pytest.approx(full_loss, rel=1e-6)
    assert accuracy == correct / 65


def test_run_epoch_no_grad_accumulation(small_splits):
    split = small_splits[0]
    images, labels = split.images[:48], split.labels[:48]
    loader = TensorLoader(images, labels, batch_size=16)
    model = make_mlp()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    run_epoch(model, loader, criterion, optimizer, "cpu", train=True)

    params = list(model.parameters())
    seen = [p.grad.clone() for p in params]
    last_loss = criterion(model(images[32:]), labels[32:])
    expected = torch.autograd.grad(last_loss, params)
    for got, want in zip(seen, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_run_epoch_matches_five_steps(small_splits):
    split = small_splits[0]
    loader = TensorLoader(split.images[:96], split.labels[:96], batch_size=16)
    criterion = nn.CrossEntropyLoss()
    model = make_mlp()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)

    run_epoch(model, loader, criterion, optimizer, "cpu", train=True)

    reference.train()
    for inputs, targets in loader:
        reference_optimizer.zero_grad(set_to_none=True)
        logits = reference(inputs)
        loss = criterion(logits, targets)
        loss.backward()
        reference_optimizer.step()
    assert states_equal(model.state_dict(), reference.state_dict())


def test_validation_keeps_batchnorm_stats(small_splits):
    split = small_splits[1]
    loader = TensorLoader(split.images[:64], split.labels[:64], batch_size=16)
    torch.manual_seed(0)
    model = SmallCNN(width=4)
    model.train()
    before = copy.deepcopy(model.state_dict())

    run_epoch(model, loader, nn.CrossEntropyLoss(), None, "cpu", train=False)

    after = model.state_dict()
    for key in ("features.0.1.running_mean", "features.0.1.running_var",
                "features.0.1.num_batches_tracked", "features.1.1.running_mean"):
        assert torch.equal(after[key], before[key]), key
    assert states_equal(after, before)
    assert model.training


@pytest.mark.parametrize("train", [False, True])
def test_run_epoch_restores_module_modes(small_splits, train):
    split = small_splits[1]
    loader = TensorLoader(split.images[:32], split.labels[:32], batch_size=16)
    torch.manual_seed(0)
    model = SmallCNN(width=4)
    model.eval()
    model.classifier.train()
    before = {name: module.training for name, module in model.named_modules()}
    modes_in_phase = set()

    def record_modes(module, inputs):
        modes_in_phase.update(m.training for m in model.modules())

    model.register_forward_pre_hook(record_modes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    run_epoch(model, loader, nn.CrossEntropyLoss(), optimizer, "cpu", train=train)

    after = {name: module.training for name, module in model.named_modules()}
    assert after == before
    assert modes_in_phase == {train}


def test_validation_builds_no_graph(small_splits):
    split = small_splits[1]
    loader = TensorLoader(split.images[:32], split.labels[:32], batch_size=16)
    model = make_mlp()
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    outputs_need_grad = []

    def record_output(module, inputs, output):
        outputs_need_grad.append(output.requires_grad)

    model.register_forward_hook(record_output)

    run_epoch(model, loader, nn.CrossEntropyLoss(), optimizer, "cpu", train=False)

    assert outputs_need_grad == [False, False]
    assert all(p.grad is None for p in model.parameters())
    assert states_equal(model.state_dict(), before)


@pytest.mark.parametrize("size, drop_last", [(0, False), (5, True)])
def test_run_epoch_empty_loader(small_splits, size, drop_last):
    split = small_splits[1]
    loader = TensorLoader(
        split.images[:size], split.labels[:size], batch_size=8, drop_last=drop_last
    )
    with pytest.raises(ValueError, match="no batches") as caught:
        run_epoch(make_mlp(), loader, nn.CrossEntropyLoss(), None, "cpu", train=False)
    assert "not empty" in str(caught.value)
    assert "drop_last" in str(caught.value)


@pytest.mark.parametrize("bad_label", [10, -3])
def test_run_epoch_label_out_of_range(small_splits, bad_label):
    split = small_splits[1]
    labels = split.labels[:32].clone()
    labels[20] = bad_label
    loader = TensorLoader(split.images[:32], labels, batch_size=16)
    with pytest.raises(ValueError) as caught:
        run_epoch(
            make_mlp(), loader, nn.CrossEntropyLoss(), None, "cpu", train=False, epoch=4
        )
    message = str(caught.value)
    assert f"label {bad_label} " in message
    assert "epoch 4, batch 1" in message
    assert "0..9" in message


def test_run_epoch_torch_dataloader(small_splits):
    split = small_splits[1]
    images, labels = split.images[:50], split.labels[:50]
    model = make_mlp()
    criterion = nn.CrossEntropyLoss()
    torch_loader = DataLoader(TensorDataset(images, labels), batch_size=16)
    own_loader = TensorLoader(images, labels, batch_size=16)

    loss, accuracy = run_epoch(model, torch_loader, criterion, None, "cpu", train=False)
    own_loss, own_accuracy = run_epoch(
        model, own_loader, criterion, None, "cpu", train=False
    )

    assert loss == pytest.approx(own_loss, rel=1e-9)
    assert accuracy == own_accuracy


def test_run_epoch_trains_dataloader(small_splits):
    split = small_splits[0]
    loader = DataLoader(
        TensorDataset(split.images[:64], split.labels[:64]), batch_size=16
    )
    model = make_mlp()
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    loss, accuracy = run_epoch(
        model, loader, nn.CrossEntropyLoss(), optimizer, "cpu", train=True
    )

    assert math.isfinite(loss)
    assert 0.0 <= accuracy <= 1.0
    assert not states_equal(model.state_dict(), before)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("bad_batch", [0, 2])
def test_run_epoch_nan_loss(small_splits, train, bad_batch):
    split = small_splits[0]
    images = split.images[:80].clone()
    images[16 * bad_batch + 3] = math.nan
    loader = TensorLoader(images, split.labels[:80], batch_size=16)
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    with pytest.raises(NonFiniteLossError) as caught:
        run_epoch(
            model, loader, nn.CrossEntropyLoss(), optimizer, "cpu", train=train, epoch=7
        )

    assert caught.value.epoch == 7
    assert caught.value.batch == bad_batch
    assert caught.value.phase == ("train" if train else "val")
    assert f"batch {bad_batch};" in str(caught.value)


def test_run_epoch_train_needs_optimizer(small_splits):
    split = small_splits[1]
    loader = TensorLoader(split.images[:16], split.labels[:16], batch_size=16)
    with pytest.raises(ValueError, match="optimizer"):
        run_epoch(make_mlp(), loader, nn.CrossEntropyLoss(), None, "cpu", train=True)


# --- EarlyStopping ---------------------------------------------------------


def first_stop(stopper: EarlyStopping, values: list[float]) -> int | None:
    for epoch, value in enumerate(values, start=1):
        stopper.step(value, epoch)
        if stopper.should_stop:
            return epoch
    return None


@pytest.mark.parametrize(
    "mode, values, patience, stop_epoch, best_epoch",
    [
        ("min", [1.0, 0.8, 0.9, 0.85, 0.81, 0.7], 3, 5, 2),
        ("min", [1.0, 0.9, 0.8, 0.7, 0.6], 1, None, 5),
        ("min", [0.5, 0.5, 0.6], 2, 3, 1),
        ("max", [0.5, 0.6, 0.6, 0.55, 0.7], 2, 4, 2),
        ("max", [0.5, 0.4, 0.6, 0.5, 0.7, 0.69, 0.68], 3, None, 5),
        ("max", [0.9, 0.1], 1, 2, 1),
    ],
)
def test_early_stopping_sequence(mode, values, patience, stop_epoch, best_epoch):
    stopper = EarlyStopping(patience=patience, mode=mode)
    assert first_stop(stopper, values) == stop_epoch
    assert stopper.best_epoch == best_epoch


def test_early_stopping_min_delta():
    stopper = EarlyStopping(patience=2, mode="max", min_delta=0.01)
    assert stopper.step(0.50, 1)
    assert not stopper.step(0.505, 2)
    assert stopper.step(0.52, 3)
    assert stopper.best == 0.52
    assert stopper.counter == 0


def test_early_stopping_nan_not_best():
    stopper = EarlyStopping(patience=3, mode="min")
    stopper.step(0.5, 1)
    assert not stopper.step(math.nan, 2)
    assert stopper.best == 0.5
    assert stopper.counter == 1


def test_early_stopping_state_round_trip():
    stopper = EarlyStopping(patience=3, mode="min")
    first_stop(stopper, [1.0, 0.5, 0.7])
    restored = EarlyStopping(patience=3, mode="min")
    restored.load_state_dict(stopper.state_dict())
    assert restored.state_dict() == {"best": 0.5, "best_epoch": 2, "counter": 1}
    assert first_stop(restored, [0.6, 0.6]) == 2


@pytest.mark.parametrize("patience", [0, -1, 1.5, True])
def test_early_stopping_bad_patience(patience):
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=patience)


def test_early_stopping_bad_mode():
    with pytest.raises(ValueError, match="'min' or 'max'"):
        EarlyStopping(mode="lowest")


# --- train_model -----------------------------------------------------------


def quiet_train(model, train_loader, val_loader, test_loader=None, **kwargs):
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("live_plot", False)
    kwargs.setdefault("progress", False)
    return train_model(model, train_loader, val_loader, test_loader, **kwargs)


def plain_loaders(small_splits, batch_size: int = 32):
    train, val, test = small_splits
    return (
        TensorLoader.from_split(train, batch_size=batch_size),
        TensorLoader.from_split(val, batch_size=64),
        TensorLoader.from_split(test, batch_size=64),
    )


def cosine_lr(epoch: int, epochs: int, lr0: float, eta_min: float = 0.0) -> float:
    return eta_min + (lr0 - eta_min) * (1 + math.cos(math.pi * (epoch - 1) / epochs)) / 2


class StopTraining(Exception):
    """Raised from on_epoch_end to end a run early, like a crash after a checkpoint."""


def test_train_model_default_optimizer(small_splits, tmp_path):
    train_loader, val_loader, _ = plain_loaders(small_splits)
    quiet_train(make_mlp(), train_loader, val_loader, epochs=3, out_dir=tmp_path / "a")

    model = make_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=3)
    quiet_train(
        model, train_loader, val_loader, epochs=3, out_dir=tmp_path / "b",
        optimizer=optimizer, scheduler=scheduler,
    )

    default_last = load_checkpoint(tmp_path / "a" / "last.pt")
    explicit_last = load_checkpoint(tmp_path / "b" / "last.pt")
    assert states_equal(default_last["model"], explicit_last["model"])
    group = default_last["optimizer"]["param_groups"][0]
    assert group["initial_lr"] == 3e-4
    assert group["weight_decay"] == 0.01
    assert group["decoupled_weight_decay"] is True
    assert default_last["scheduler"]["T_max"] == 3
    assert default_last["scheduler"]["eta_min"] == 0


def test_train_model_cosine_lr_resume(small_splits, tmp_path):
    train_loader, val_loader, _ = plain_loaders(small_splits)

    def stop_at_two(epoch, row):
        if epoch == 2:
            raise StopTraining

    with pytest.raises(StopTraining):
        quiet_train(
            make_mlp(), train_loader, val_loader, epochs=4, lr=1e-3,
            out_dir=tmp_path, on_epoch_end=stop_at_two,
        )
    first_lrs = load_checkpoint(tmp_path / "last.pt")["history"]
    result = quiet_train(
        make_mlp(), train_loader, val_loader, epochs=4, lr=1e-3,
        out_dir=tmp_path, resume=True,
    )

    assert [row["lr"] for row in first_lrs] == result.history["lr"][:2]
    assert result.history["epoch"] == [1, 2, 3, 4]
    for epoch, lr in zip(result.history["epoch"], result.history["lr"]):
        assert lr == pytest.approx(cosine_lr(epoch, 4, 1e-3), rel=1e-9), epoch


def shift_labels(split: Split) -> Split:
    # Labels one digit off: as the model learns the true digits, the
    # validation loss on these labels rises, so the first epoch is the best.
    return Split(split.images, (split.labels + 1) % 10)


@pytest.fixture(scope="module")
def early_stopped_run(small_splits, tmp_path_factory):
    """A run whose validation loss is best at an early epoch and that stops early.

    Returns the result, the out_dir, every epoch's state_dict, the test loader
    wrapper and the weights the model had when the test pass started.
    """
    train, val, test = small_splits
    out_dir = tmp_path_factory.mktemp("early_stopped")
    model = make_mlp()
    snapshots = {}
    test_weights = []

    def snapshot(epoch, row):
        snapshots[epoch] = copy.deepcopy(model.state_dict())

    test_loader = CountingLoader(
        TensorLoader.from_split(test, batch_size=48),
        on_pass=lambda: test_weights.append(copy.deepcopy(model.state_dict())),
    )
    result = quiet_train(
        model,
        TensorLoader.from_split(train, batch_size=32, shuffle=True),
        TensorLoader.from_split(shift_labels(val), batch_size=64),
        test_loader,
        epochs=8, lr=2e-3, patience=2, monitor="val_loss", out_dir=out_dir,
        on_epoch_end=snapshot,
    )
    return {
        "result": result, "out_dir": out_dir, "model": model, "snapshots": snapshots,
        "test_loader": test_loader, "test_weights": test_weights,
    }


def test_best_pt_holds_best_epoch(early_stopped_run):
    result = early_stopped_run["result"]
    snapshots = early_stopped_run["snapshots"]
    val_losses = result.history["val_loss"]
    best_epoch = 1 + val_losses.index(min(val_losses))
    last_epoch = result.history["epoch"][-1]
    best = load_checkpoint(early_stopped_run["out_dir"] / "best.pt")

    assert best_epoch < last_epoch
    assert result.best_epoch == best_epoch
    assert best["epoch"] == best_epoch
    assert best["metric"] == min(val_losses)
    assert states_equal(best["model"], snapshots[best_epoch])
    assert not states_equal(best["model"], snapshots[last_epoch])
    assert states_equal(early_stopped_run["model"].state_dict(), snapshots[best_epoch])


def test_early_stopping_stops_run(early_stopped_run):
    result = early_stopped_run["result"]
    val_losses = result.history["val_loss"]
    # The epoch at which `patience` epochs have passed without a new minimum.
    best_so_far, best_epoch, expected_stop = math.inf, 0, None
    for epoch, value in enumerate(val_losses, start=1):
        if value < best_so_far:
            best_so_far, best_epoch = value, epoch
        if epoch - best_epoch == 2:
            expected_stop = epoch
            break
    last = load_checkpoint(early_stopped_run["out_dir"] / "last.pt")

    assert expected_stop is not None
    assert len(result.history) == expected_stop
    assert expected_stop < 8
    assert result.stopped_early
    assert last["finished"] is True
    assert last["early_stopping"]["counter"] == 2


def test_test_set_evaluated_once(early_stopped_run):
    result = early_stopped_run["result"]
    test_loader = early_stopped_run["test_loader"]
    best_weights = early_stopped_run["snapshots"][result.best_epoch]

    assert test_loader.passes == 1
    assert test_loader.batches == len(test_loader.loader)
    assert states_equal(early_stopped_run["test_weights"][0], best_weights)

    model = make_mlp()
    model.load_state_dict(best_weights)
    loss, accuracy = run_epoch(
        model, test_loader.loader, nn.CrossEntropyLoss(), None, "cpu", train=False
    )
    assert result.test_loss == loss
    assert result.test_accuracy == accuracy


def test_history_table_and_csv(early_stopped_run):
    result = early_stopped_run["result"]
    history = result.history
    saved = History.read_csv(early_stopped_run["out_dir"] / "history.csv")
    table = str(history).splitlines()

    assert history.columns == HISTORY_COLUMNS
    assert saved == history
    assert table[0].split() == HISTORY_COLUMNS
    assert len(table) == len(history) + 1
    assert [int(line.split()[0]) for line in table[1:]] == history["epoch"]
    assert all(seconds > 0 for seconds in history["seconds"])
    assert all(0 <= acc <= 1 for acc in history["train_acc"] + history["val_acc"])


@pytest.mark.parametrize("name, value", [("epochs", 0), ("patience", 0), ("epochs", -2)])
def test_train_model_bad_counts(small_splits, tmp_path, name, value):
    train_loader, val_loader, _ = plain_loaders(small_splits)
    out_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=f"{name} must be an integer of at least 1"):
        quiet_train(make_mlp(), train_loader, val_loader, out_dir=out_dir,
                    **{name: value})
    assert not out_dir.exists()


@pytest.mark.parametrize("below_file", [True, False])
def test_train_model_out_dir_file(small_splits, tmp_path, below_file):
    train_loader, val_loader, _ = plain_loaders(small_splits)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a regular file, not a folder\n")
    out_dir = blocker / "run" if below_file else blocker

    with pytest.raises(ValueError, match="output folder") as caught:
        quiet_train(make_mlp(), train_loader, val_loader, epochs=1, out_dir=out_dir)

    assert str(out_dir) in str(caught.value)
    assert blocker.read_text() == "a regular file, not a folder\n"


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="root writes into folders without write permission",
)
def test_train_model_out_dir_read_only(small_splits, tmp_path):
    train_loader, val_loader, _ = plain_loaders(small_splits)
    out_dir = tmp_path / "locked"
    out_dir.mkdir()
    out_dir.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="not writable") as caught:
            quiet_train(make_mlp(), train_loader, val_loader, epochs=1, out_dir=out_dir)
    finally:
        out_dir.chmod(0o700)
    assert str(out_dir) in str(caught.value)


def test_train_model_existing_run(small_splits, tmp_path):
    train_loader, val_loader, _ = plain_loaders(small_splits)
    quiet_train(make_mlp(), train_loader, val_loader, epochs=1, out_dir=tmp_path)
    before = {
        path.name: (path.read_bytes(), path.stat().st_mtime_ns)
        for path in tmp_path.iterdir()
    }

    with pytest.raises(ValueError, match="resume=True"):
        quiet_train(make_mlp(seed=5), train_loader, val_loader, epochs=2,
                    out_dir=tmp_path)

    after = {
        path.name: (path.read_bytes(), path.stat().st_mtime_ns)
        for path in tmp_path.iterdir()
    }
    assert sorted(before) == ["best.pt", "history.csv", "last.pt"]
    assert after == before


def test_train_model_nan_keeps_checkpoints(small_splits, tmp_path):
    train, val, _ = small_splits
    train_loader = NaNAtLoader(
        TensorLoader.from_split(train, batch_size=32), bad_pass=3, bad_batch=4
    )
    val_loader = TensorLoader.from_split(val, batch_size=64)

    with pytest.raises(NonFiniteLossError) as caught:
        quiet_train(make_mlp(), train_loader, val_loader, epochs=5, out_dir=tmp_path)

    last = load_checkpoint(tmp_path / "last.pt")
    assert caught.value.epoch == 3
    assert caught.value.batch == 4
    assert last["epoch"] == 2
    assert all(
        torch.isfinite(tensor).all() for tensor in last["model"].values()
    )
    assert len(History.read_csv(tmp_path / "history.csv")) == 2


def test_early_stopping_nan_first_value():
    stopper = EarlyStopping(patience=3, mode="max")

    assert stopper.step(math.nan, epoch=1) is False
    assert stopper.best is None
    assert stopper.step(0.5, epoch=2) is True
    assert stopper.best_epoch == 2


def test_regression_monitor_needs_val_loss(tmp_path):
    torch.manual_seed(0)
    inputs, targets = torch.randn(64, 4), torch.randn(64, 1)
    loader = TensorLoader(inputs, targets, batch_size=16)
    with pytest.raises(ValueError, match="monitor='val_loss'"):
        train_model(
            nn.Linear(4, 1), loader, loader, epochs=2, criterion=nn.MSELoss(),
            out_dir=tmp_path / "acc", live_plot=False, progress=False,
        )

    result = train_model(
        nn.Linear(4, 1), loader, loader, epochs=2, criterion=nn.MSELoss(),
        out_dir=tmp_path / "loss", monitor="val_loss", live_plot=False, progress=False,
    )
    assert result.best_epoch is not None
    assert (tmp_path / "loss" / "best.pt").exists()
