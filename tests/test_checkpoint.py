"""Tests of checkpoint files: atomic writes, safe loading and what last.pt stores."""

from __future__ import annotations

import argparse
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from course_lib import (
    MLP,
    CheckpointError,
    SmallCNN,
    TensorLoader,
    capture_rng_state,
    load_checkpoint,
    load_weights,
    restore_rng_state,
    save_checkpoint,
    train_model,
)

TEMP_NAME = re.compile(r"\.last\.pt\..+\.tmp")
LAST_KEYS = {
    "model", "optimizer", "scheduler", "scaler", "epoch", "best_metric",
    "early_stopping", "history", "rng", "config", "finished",
}


def make_mlp(seed: int = 0, hidden: int = 32) -> MLP:
    torch.manual_seed(seed)
    return MLP(hidden=hidden, dropout=0.1)


def quiet_train(model, train_loader, val_loader, **kwargs):
    return train_model(
        model, train_loader, val_loader, device="cpu", live_plot=False,
        progress=False, **kwargs,
    )


def write_marker(path: str) -> str:
    """Create `path`. A checkpoint that calls this on load has run foreign code."""
    Path(path).write_text("this file was created while unpickling\n")
    return path


class Trap:
    """Pickles to a call of `write_marker`, as a malicious checkpoint might."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (write_marker, (str(self.marker),))


class WriteFailed(Exception):
    """Raised while pickling, to stop a checkpoint write halfway."""


class FailsToPickle:
    def __reduce__(self):
        raise WriteFailed("this object cannot be saved")


# --- save_checkpoint -------------------------------------------------------


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_save_checkpoint_atomic(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def spy_fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def spy_replace(source, target):
        events.append(("replace", os.path.realpath(source), os.path.realpath(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    target = tmp_path / "last.pt"

    save_checkpoint({"weights": torch.arange(6.0)}, target)

    monkeypatch.undo()
    replaces = [event for event in events if event[0] == "replace"]
    assert len(replaces) == 1
    _, source, destination = replaces[0]
    folder = os.path.realpath(tmp_path)
    assert destination == os.path.join(folder, "last.pt")
    assert os.path.dirname(source) == folder
    assert TEMP_NAME.fullmatch(os.path.basename(source))
    replace_at = events.index(replaces[0])
    assert ("fsync", source) in events[:replace_at]
    assert ("fsync", folder) in events[replace_at:]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.pt"]
    assert torch.equal(load_checkpoint(target)["weights"], torch.arange(6.0))


def test_save_checkpoint_failure_keeps_old(tmp_path):
    target = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, target)
    before = target.read_bytes()

    with pytest.raises(WriteFailed):
        save_checkpoint({"epoch": 2, "part": FailsToPickle()}, target)

    assert target.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.pt"]


def test_save_checkpoint_detaches(tmp_path):
    weight = torch.nn.Parameter(torch.ones(3))
    state = {"nested": [(weight * 2,), {"inner": weight}]}

    save_checkpoint(state, tmp_path / "c.pt")

    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    doubled, inner = loaded["nested"][0][0], loaded["nested"][1]["inner"]
    assert not doubled.requires_grad
    assert not inner.requires_grad
    assert type(inner) is torch.Tensor
    assert torch.equal(doubled, torch.full((3,), 2.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_save_checkpoint_cuda_to_cpu(tmp_path):
    state = {"model": {"w": torch.ones(4, device="cuda")}, "rng": [torch.zeros(2).cuda()]}

    save_checkpoint(state, tmp_path / "c.pt")

    # No map_location: every tensor comes back on the device it was saved from.
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    assert loaded["model"]["w"].device.type == "cpu"
    assert loaded["rng"][0].device.type == "cpu"
    moved = load_checkpoint(tmp_path / "c.pt", map_location="cuda")
    assert moved["model"]["w"].device.type == "cuda"


# --- load_checkpoint -------------------------------------------------------


def test_load_checkpoint_map_location(tmp_path):
    save_checkpoint({"model": {"w": torch.ones(2, 3)}}, tmp_path / "c.pt")

    loaded = load_checkpoint(tmp_path / "c.pt", map_location="meta")

    assert loaded["model"]["w"].device.type == "meta"
    assert loaded["model"]["w"].shape == (2, 3)


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_load_checkpoint_required_keys(tmp_path):
    save_checkpoint({"model": {}}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"lacks the keys \['optimizer'\]"):
        load_checkpoint(tmp_path / "c.pt", required_keys=("model", "optimizer"))


def test_load_checkpoint_not_a_dict(tmp_path):
    torch.save([torch.ones(1)], tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="contains a list"):
        load_checkpoint(tmp_path / "c.pt")


@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "zip_header_only"])
def test_load_checkpoint_damaged(tmp_path, kind):
    good = tmp_path / "good.pt"
    save_checkpoint({"model": MLP(hidden=8).state_dict()}, good)
    data = good.read_bytes()
    contents = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "text": b"epoch,loss\n1,0.5\n",
        "zip_header_only": data[:4],
    }[kind]
    path = tmp_path / "bad.pt"
    path.write_bytes(contents)

    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)

    assert str(path) in str(caught.value)


def test_load_checkpoint_unsafe_global(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"model": {}, "args": argparse.Namespace(lr=0.1)}, path)

    with pytest.raises(CheckpointError, match="argparse.Namespace"):
        load_checkpoint(path)


def test_load_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "c.pt"
    torch.save({"model": {}, "trap": Trap(marker)}, path)

    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)

    assert f"{__name__}.write_marker" in str(caught.value)
    assert "add_safe_globals" in str(caught.value)
    assert not marker.exists()
    # The trap is real: plain unpickling does run it.
    probe = tmp_path / "probe.txt"
    pickle.loads(pickle.dumps(Trap(probe)))
    assert probe.exists()


# --- load_weights ----------------------------------------------------------


def test_load_weights_other_architecture():
    torch.manual_seed(0)
    with pytest.raises(CheckpointError) as caught:
        load_weights(SmallCNN(width=4), make_mlp().state_dict(), source="best.pt")
    message = str(caught.value)
    assert "best.pt" in message
    assert "SmallCNN" in message
    assert "missing keys [features.0.0.weight" in message
    assert "unexpected keys [1.weight, 1.bias, 4.weight, 4.bias]" in message


def test_load_weights_shape_mismatch():
    model = make_mlp(hidden=16)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(CheckpointError) as caught:
        load_weights(model, make_mlp(hidden=32).state_dict())
    message = str(caught.value)
    assert "1.weight (checkpoint (32, 784), model (16, 784))" in message
    assert "4.weight (checkpoint (10, 32), model (10, 16))" in message
    assert "missing keys" not in message
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_load_weights_same_architecture():
    model = make_mlp(seed=1)
    source = make_mlp(seed=2).state_dict()
    load_weights(model, source)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.items())


# --- random-number states --------------------------------------------------


def draw_all(generator: torch.Generator) -> tuple:
    return (
        torch.rand(4),
        np.random.rand(4),
        random.random(),
        torch.randperm(20, generator=generator),
    )


def test_rng_state_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(11)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    state = capture_rng_state(generator)
    expected = draw_all(generator)
    save_checkpoint({"rng": state}, tmp_path / "rng.pt")
    draw_all(generator)

    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"], generator)
    again = draw_all(generator)

    assert torch.equal(again[0], expected[0])
    assert np.array_equal(again[1], expected[1])
    assert again[2] == expected[2]
    assert torch.equal(again[3], expected[3])


# --- last.pt and best.pt from a real run ------------------------------------


@pytest.fixture(scope="module")
def finished_run(small_splits, tmp_path_factory):
    """A two-epoch run, with every random state read right after it returns."""
    train, val, _ = small_splits
    out_dir = tmp_path_factory.mktemp("finished")
    train_loader = TensorLoader.from_split(train, batch_size=64, shuffle=True, seed=4)
    model = make_mlp()
    result = quiet_train(
        model, train_loader, TensorLoader.from_split(val, batch_size=64),
        epochs=2, out_dir=out_dir,
    )
    return {
        "result": result,
        "out_dir": out_dir,
        "model": model,
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "data_order": train_loader.generator.get_state(),
    }


def test_last_pt_contents(finished_run):
    last = load_checkpoint(finished_run["out_dir"] / "last.pt")
    result = finished_run["result"]

    assert LAST_KEYS <= set(last)
    assert last["epoch"] == 2
    assert last["scaler"] is None
    assert last["finished"] is True
    assert last["config"] == {"epochs": 2, "monitor": "val_acc"}
    assert last["best_metric"] == max(result.history["val_acc"])
    assert last["early_stopping"]["best"] == last["best_metric"]
    assert last["early_stopping"]["best_epoch"] == result.best_epoch
    assert last["history"] == result.history.state_dict()
    assert last["scheduler"]["last_epoch"] == 2
    assert len(last["optimizer"]["state"]) == len(list(finished_run["model"].parameters()))
    assert last["model"].keys() == finished_run["model"].state_dict().keys()


def test_last_pt_tensors_on_cpu(finished_run):
    last = torch.load(finished_run["out_dir"] / "last.pt", weights_only=True)
    devices = set()

    def collect(value):
        if isinstance(value, torch.Tensor):
            devices.add(value.device.type)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                collect(item)

    collect(last)
    assert devices == {"cpu"}


def test_last_pt_rng_states(finished_run):
    rng = load_checkpoint(finished_run["out_dir"] / "last.pt")["rng"]
    numpy_state = finished_run["numpy"]
    python_state = finished_run["python"]

    assert set(rng) == {"torch", "cuda", "numpy", "python", "data_order"}
    assert torch.equal(rng["torch"], finished_run["torch"])
    assert torch.equal(rng["data_order"], finished_run["data_order"])
    assert np.array_equal(rng["numpy"]["keys"].numpy(), numpy_state[1].astype(np.int64))
    assert rng["numpy"]["pos"] == numpy_state[2]
    assert tuple(rng["python"]["internal"]) == python_state[1]
    if torch.cuda.is_available():
        assert len(rng["cuda"]) == torch.cuda.device_count()
    else:
        assert rng["cuda"] == []


def test_best_pt_contents(finished_run):
    best = load_checkpoint(finished_run["out_dir"] / "best.pt")
    result = finished_run["result"]

    assert best["epoch"] == result.best_epoch
    assert best["monitor"] == "val_acc"
    assert best["metric"] == result.best_metric
    model_state = finished_run["model"].state_dict()
    assert all(torch.equal(best["model"][k], v) for k, v in model_state.items())


# --- resuming from a checkpoint that does not fit --------------------------


class FirstEpochDone(Exception):
    """Ends a run after its first epoch, as if it had been interrupted there."""


def stop_after_first(epoch, row):
    raise FirstEpochDone


@pytest.fixture
def interrupted_run(small_splits, tmp_path):
    """A three-epoch run in tmp_path that stopped after writing epoch 1."""
    train, val, _ = small_splits
    loaders = (
        TensorLoader.from_split(train, batch_size=64),
        TensorLoader.from_split(val, batch_size=64),
    )
    with pytest.raises(FirstEpochDone):
        quiet_train(make_mlp(), *loaders, epochs=3, out_dir=tmp_path,
                    on_epoch_end=stop_after_first)
    return loaders, tmp_path


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def test_resume_other_epochs(interrupted_run):
    loaders, out_dir = interrupted_run
    before = folder_snapshot(out_dir)

    with pytest.raises(CheckpointError) as caught:
        quiet_train(make_mlp(), *loaders, epochs=5, out_dir=out_dir, resume=True)

    message = str(caught.value)
    assert "epochs=3" in message
    assert "epochs=5" in message
    assert folder_snapshot(out_dir) == before


def test_resume_other_monitor(interrupted_run):
    loaders, out_dir = interrupted_run
    before = folder_snapshot(out_dir)

    with pytest.raises(CheckpointError, match="monitor='val_acc'"):
        quiet_train(make_mlp(), *loaders, epochs=3, monitor="val_loss",
                    out_dir=out_dir, resume=True)

    assert folder_snapshot(out_dir) == before


def test_resume_other_architecture(interrupted_run):
    loaders, out_dir = interrupted_run
    before = folder_snapshot(out_dir)
    torch.manual_seed(0)

    with pytest.raises(CheckpointError) as caught:
        quiet_train(SmallCNN(width=4), *loaders, epochs=3, out_dir=out_dir,
                    resume=True)

    message = str(caught.value)
    assert str(out_dir / "last.pt") in message
    assert "missing keys [features.0.0.weight" in message
    assert "unexpected keys [1.weight" in message
    assert folder_snapshot(out_dir) == before


# --- resuming from a damaged last.pt ------------------------------------------


class SecondEpochDone(Exception):
    """Ends a run after its second epoch, as if it had been interrupted there."""


def stop_after_second(epoch, row):
    if epoch == 2:
        raise SecondEpochDone


def damaged_run_loaders(small_splits):
    train, val, _ = small_splits
    return (
        TensorLoader.from_split(train, batch_size=64, shuffle=True, seed=4),
        TensorLoader.from_split(val, batch_size=64),
    )


@pytest.fixture(scope="module")
def two_epoch_folder(small_splits, tmp_path_factory):
    """A three-epoch run that stopped after writing epoch 2, never modified."""
    out_dir = tmp_path_factory.mktemp("two_epochs")
    with pytest.raises(SecondEpochDone):
        quiet_train(make_mlp(), *damaged_run_loaders(small_splits), epochs=3,
                    out_dir=out_dir, on_epoch_end=stop_after_second)
    return out_dir


def without(*keys):
    """Return a change that deletes the field at the path `keys`."""
    def change(state):
        *parents, last = keys
        for key in parents:
            state = state[key]
        del state[last]

    return change


def replaced(value, *keys):
    """Return a change that sets the field at the path `keys` to `value`."""
    def change(state):
        *parents, last = keys
        for key in parents:
            state = state[key]
        state[last] = value

    return change


def extra_param_group(state):
    groups = state["optimizer"]["param_groups"]
    groups.append({**groups[0], "params": [99]})


def mixed_history_columns(state):
    del state["history"][1]["lr"]


def short_python_state(state):
    state["rng"]["python"]["internal"] = state["rng"]["python"]["internal"][:10]


# Each case: the change to last.pt, then the text that the error must contain.
DAMAGED_FIELDS = {
    "no_model": (without("model"), "has no field model,"),
    "no_optimizer": (without("optimizer"), "has no field optimizer,"),
    "no_epoch": (without("epoch"), "has no field epoch,"),
    "no_early_stopping": (without("early_stopping"), "has no field early_stopping,"),
    "no_history": (without("history"), "has no field history,"),
    "no_rng": (without("rng"), "has no field rng,"),
    "no_config": (without("config"), "has no field config,"),
    "no_counter": (
        without("early_stopping", "counter"), "has no field early_stopping.counter,"
    ),
    "no_param_groups": (
        without("optimizer", "param_groups"), "has no field optimizer.param_groups,"
    ),
    "no_numpy_state": (without("rng", "numpy"), "has no field rng.numpy,"),
    "model_tensor": (
        replaced(torch.zeros(3), "model"),
        "field model is a torch.float32 tensor of shape (3,), but a resume needs a "
        "dict of tensors",
    ),
    "optimizer_list": (
        replaced([], "optimizer"), "field optimizer is the list [], but a resume needs"
    ),
    "epoch_text": (
        replaced("2", "epoch"),
        "field epoch is the str '2', but a resume needs an integer of at least 1",
    ),
    "epoch_zero": (replaced(0, "epoch"), "field epoch is the int 0,"),
    "early_stopping_none": (
        replaced(None, "early_stopping"), "field early_stopping is the NoneType None,"
    ),
    "counter_float": (
        replaced(1.5, "early_stopping", "counter"),
        "field early_stopping.counter is the float 1.5,",
    ),
    "history_dict": (replaced({}, "history"), "field history is the dict {},"),
    "history_short": (
        replaced([], "history"), "has 0 history rows but its epoch field is 2"
    ),
    "history_columns": (mixed_history_columns, "field history is the list"),
    "config_text": (replaced("epochs=3", "config"), "field config is the str"),
    "scheduler_number": (replaced(5, "scheduler"), "field scheduler is the int 5,"),
    "finished_text": (replaced("no", "finished"), "field finished is the str 'no',"),
    "torch_rng_short": (
        replaced(torch.zeros(8, dtype=torch.uint8), "rng", "torch"),
        "field rng.torch is a torch.uint8 tensor of shape (8,)",
    ),
    "numpy_keys_float": (
        replaced(torch.zeros(624), "rng", "numpy", "keys"),
        "field rng.numpy.keys is a torch.float32 tensor of shape (624,)",
    ),
    "python_state_short": (short_python_state, "field rng.python.internal is"),
    "extra_param_group": (
        extra_param_group,
        "field optimizer.param_groups has groups of [4, 1] parameters, but this "
        "run's optimizer has [4]",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGED_FIELDS))
def test_resume_damaged_field_named(case, two_epoch_folder, small_splits, tmp_path):
    change, expected = DAMAGED_FIELDS[case]
    out_dir = tmp_path / "run"
    shutil.copytree(two_epoch_folder, out_dir)
    last_path = out_dir / "last.pt"
    state = torch.load(last_path, weights_only=True)
    change(state)
    torch.save(state, last_path)
    before = folder_snapshot(out_dir)
    model = make_mlp()
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.get_rng_state()

    with pytest.raises(CheckpointError) as caught:
        quiet_train(model, *damaged_run_loaders(small_splits), epochs=3,
                    out_dir=out_dir, resume=True)

    message = str(caught.value)
    assert message.startswith(f"{last_path} "), message
    assert expected in message
    assert message.endswith("or start a new run in another folder (--out)")
    assert folder_snapshot(out_dir) == before
    assert all(torch.equal(v, weights_before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_resume_undamaged_copy(two_epoch_folder, small_splits, tmp_path):
    # The same copy-and-resume steps as above, without a change, must work, so
    # that the failures above come from the damage alone.
    out_dir = tmp_path / "run"
    shutil.copytree(two_epoch_folder, out_dir)
    last_path = out_dir / "last.pt"
    torch.save(torch.load(last_path, weights_only=True), last_path)

    result = quiet_train(make_mlp(), *damaged_run_loaders(small_splits), epochs=3,
                         out_dir=out_dir, resume=True)

    assert result.history["epoch"] == [1, 2, 3]
