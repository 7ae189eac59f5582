"""Resume tests: runs killed with SIGKILL must resume to the uninterrupted result.

The slow tests start tests/train_child.py in subprocesses, kill them at an
epoch boundary, at a random moment and in the middle of a checkpoint write,
and resume them. Weights, optimizer state and history (except the wall-clock
"seconds" column) must then equal those of one uninterrupted run, bit for bit.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from course_lib import MLP, History, TensorLoader, load_checkpoint, train_model

CHILD = Path(__file__).with_name("train_child.py")
EPOCHS = 5
RUN_TIMEOUT = 180.0
# 25 million float32 zeros make a 100 MB checkpoint. On a 2-core test machine
# torch.save wrote it in 2 MB steps and the write with fsync took roughly
# 0.4 s, so the parent can catch it halfway.
PADDING = 25_000_000


STARTED: list[Child] = []


@pytest.fixture(autouse=True)
def kill_leftover_children():
    # A test that fails between starting and killing a child must not leave
    # it running, because a blocked child would wait for minutes.
    yield
    while STARTED:
        child = STARTED.pop()
        if child.process.poll() is None:
            child.kill()


class Child:
    """One run of train_child.py, with its output in files under `work`."""

    def __init__(self, out_dir: Path, work: Path, name: str, *options: str):
        self.status_dir = work / f"{name}-status"
        self.status_dir.mkdir()
        self.result_path = work / f"{name}-result.pt"
        self.log_path = work / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(CHILD), str(out_dir), str(self.result_path),
                 "--status-dir", str(self.status_dir), *options],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        STARTED.append(self)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def epochs_done(self) -> list[int]:
        names = (path.name for path in self.status_dir.glob("epoch-*"))
        return sorted(int(name.split("-")[1]) for name in names)

    def epoch_states(self) -> dict[int, dict]:
        """Return the weights and history row saved after each epoch of this run."""
        return {
            epoch: torch.load(self.status_dir / f"epoch-{epoch}", weights_only=True)
            for epoch in self.epochs_done()
        }

    def wait_until(self, condition, what: str, poll: float = 0.01):
        """Poll `condition` until it returns a true value, and return that value."""
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            if self.process.poll() is not None:
                pytest.fail(f"child exited ({self.process.returncode}) before "
                            f"{what}:\n{self.log()}")
            time.sleep(poll)
        self.kill()
        pytest.fail(f"timed out after {RUN_TIMEOUT} s waiting for {what}:\n{self.log()}")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def finish(self) -> dict:
        try:
            code = self.process.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"child still running after {RUN_TIMEOUT} s:\n{self.log()}")
        assert code == 0, self.log()
        return torch.load(self.result_path, weights_only=True)


def without_seconds(rows) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


def model_weights(state: dict) -> dict:
    return {key: value for key, value in state.items() if key != "padding"}


def equal_tensors(left: dict, right: dict) -> bool:
    return left.keys() == right.keys() and all(
        torch.equal(left[key], right[key]) for key in left
    )


def optimizer_tensors(state: dict) -> dict:
    return {
        f"{index}.{name}": value
        for index, slots in state["state"].items()
        for name, value in slots.items()
    }


def load_run(out_dir: Path, result: dict) -> dict:
    last = load_checkpoint(out_dir / "last.pt")
    best = load_checkpoint(out_dir / "best.pt")
    return {
        "result": result,
        "last_model": model_weights(last["model"]),
        "last_optimizer": optimizer_tensors(last["optimizer"]),
        "last_scheduler": last["scheduler"],
        "best_model": model_weights(best["model"]),
        "best_epoch": best["epoch"],
        "csv": without_seconds(History.read_csv(out_dir / "history.csv")),
    }


def assert_same_run(run: dict, reference: dict, note: str = "") -> None:
    result, expected = run["result"], reference["result"]
    assert without_seconds(result["history"]) == without_seconds(expected["history"]), note
    assert run["csv"] == reference["csv"], note
    assert equal_tensors(run["last_model"], reference["last_model"]), note
    assert equal_tensors(run["last_optimizer"], reference["last_optimizer"]), note
    assert run["last_scheduler"] == reference["last_scheduler"], note
    assert equal_tensors(run["best_model"], reference["best_model"]), note
    assert run["best_epoch"] == reference["best_epoch"], note
    assert equal_tensors(result["model"], expected["model"]), note
    assert result["test_loss"] == expected["test_loss"], note
    assert result["test_accuracy"] == expected["test_accuracy"], note


def assert_same_epochs(child: Child, reference: dict) -> None:
    # Finds the first epoch at which a resumed run departs from the reference.
    for epoch, state in child.epoch_states().items():
        expected = reference["epochs"][epoch]
        assert equal_tensors(state["model"], expected["model"]), f"epoch {epoch}"
        row, expected_row = without_seconds([state["row"], expected["row"]])
        assert row == expected_row, f"epoch {epoch}"


def temp_files(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob(".*.tmp"))


def growing_last_tmp(out_dir: Path) -> Path | None:
    """Return a temporary last.pt file that already has bytes in it, if any."""
    for path in out_dir.glob(".last.pt.*.tmp"):
        try:
            if path.stat().st_size > 0:
                return path
        except FileNotFoundError:
            pass
    return None


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One uninterrupted run of the child script."""
    work = tmp_path_factory.mktemp("reference")
    out_dir = work / "run"
    child = Child(out_dir, work, "only")
    result = child.finish()
    assert child.epochs_done() == list(range(1, EPOCHS + 1))
    return {
        "out_dir": out_dir,
        "epochs": child.epoch_states(),
        **load_run(out_dir, result),
    }


@pytest.mark.slow
def test_resume_after_kills_at_epochs(reference, tmp_path):
    out_dir = tmp_path / "run"
    first_epoch = 1
    # Each run after the first resumes the one killed before it.
    for kill_epoch in (1, 2, 4):
        child = Child(out_dir, tmp_path, f"to-{kill_epoch}", "--block-at", str(kill_epoch))
        child.wait_until(lambda: (child.status_dir / "blocked").exists(), "the block")
        child.kill()

        assert load_checkpoint(out_dir / "last.pt")["epoch"] == kill_epoch
        assert child.epochs_done() == list(range(first_epoch, kill_epoch + 1))
        assert_same_epochs(child, reference)
        first_epoch = kill_epoch + 1

    final = Child(out_dir, tmp_path, "final")
    run = load_run(out_dir, final.finish())

    assert final.epochs_done() == list(range(first_epoch, EPOCHS + 1))
    assert_same_epochs(final, reference)
    assert_same_run(run, reference)


@pytest.mark.slow
def test_resume_after_random_kills(reference, tmp_path):
    out_dir = tmp_path / "run"
    chooser = random.Random()
    delays = []
    # 20 ms per batch makes an epoch last about 0.4 s, so a delay drawn from
    # [0, 0.5) s lands anywhere in the next epoch or its checkpoint writes.
    slow = ("--batch-delay", "0.02")
    for name in ("first", "second"):
        child = Child(out_dir, tmp_path, name, *slow)
        child.wait_until(child.epochs_done, "the first finished epoch")
        delays.append(chooser.uniform(0.0, 0.5))
        time.sleep(delays[-1])
        child.kill()
        load_checkpoint(out_dir / "last.pt", required_keys=("model", "epoch"))
        assert_same_epochs(child, reference)

    last = Child(out_dir, tmp_path, "last", *slow)
    run = load_run(out_dir, last.finish())

    assert_same_epochs(last, reference)
    assert_same_run(run, reference, note=f"killed after delays {delays} s")


@pytest.mark.slow
def test_resume_after_kill_mid_write(reference, tmp_path):
    out_dir = tmp_path / "run"
    padding = ("--padding", str(PADDING))
    try:
        # Kill while last.pt of epoch 2 is written, then while that of epoch 4 is.
        for name, epoch_before in (("first", 1), ("second", 3)):
            child = Child(out_dir, tmp_path, name, *padding)
            child.wait_until(
                lambda: (child.status_dir / f"epoch-{epoch_before}").exists(),
                f"epoch {epoch_before}",
            )
            partial = child.wait_until(
                lambda: growing_last_tmp(out_dir), "a temporary last.pt", poll=0.001
            )
            child.kill()

            last = load_checkpoint(out_dir / "last.pt")
            assert partial.exists()
            assert partial.stat().st_size < (out_dir / "last.pt").stat().st_size
            assert last["epoch"] == epoch_before
            assert torch.count_nonzero(last["model"]["padding"]) == 0
            assert_same_epochs(child, reference)

        final = Child(out_dir, tmp_path, "final", *padding)
        run = load_run(out_dir, final.finish())

        assert final.epochs_done() == [4, 5]
        assert_same_epochs(final, reference)
        assert temp_files(out_dir) == []
        assert_same_run(run, reference)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


@pytest.mark.slow
def test_resume_finished_run(reference, tmp_path):
    out_dir = tmp_path / "run"
    shutil.copytree(reference["out_dir"], out_dir)
    before = {path.name: path.read_bytes() for path in out_dir.iterdir()}

    child = Child(out_dir, tmp_path, "again")
    run = load_run(out_dir, child.finish())

    assert child.epochs_done() == []
    assert len(run["result"]["history"]) == EPOCHS
    assert_same_run(run, reference)
    after = {path.name: path.read_bytes() for path in out_dir.iterdir()}
    assert after == before


# --- in-process resume checks ----------------------------------------------


def frozen_run(small_splits, out_dir: Path, resume: bool, epochs: int = 3):
    """Train with lr=0, so every epoch has the same validation loss.

    With patience 2 the run stops after epoch 3.
    """
    train, val, _ = small_splits
    torch.manual_seed(0)
    model = MLP(hidden=16)
    result = train_model(
        model,
        TensorLoader.from_split(train, batch_size=128),
        TensorLoader.from_split(val, batch_size=128),
        epochs=epochs, patience=2, monitor="val_loss",
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0), scheduler=None,
        out_dir=out_dir, resume=resume, device="cpu", live_plot=False, progress=False,
    )
    return result, model


def test_resume_finished_stop_flag(small_splits, tmp_path):
    # Patience runs out exactly at the last epoch, so the epoch count ended
    # the run, not early stopping.
    first, _ = frozen_run(small_splits, tmp_path, resume=False)
    again, _ = frozen_run(small_splits, tmp_path, resume=True)

    assert first.history["val_loss"][0] == first.history["val_loss"][2]
    assert not first.stopped_early
    assert not again.stopped_early
    assert again.history == first.history


def test_resume_early_stopped_run(small_splits, tmp_path):
    first, _ = frozen_run(small_splits, tmp_path, resume=False, epochs=6)
    again, _ = frozen_run(small_splits, tmp_path, resume=True, epochs=6)

    assert first.stopped_early
    assert first.history["epoch"] == [1, 2, 3]
    assert again.stopped_early
    assert again.history == first.history


def test_resume_finished_rewrites_csv(small_splits, tmp_path):
    # A kill between writing the final last.pt and history.csv leaves the
    # CSV one row short; resuming the finished run must complete it.
    first, _ = frozen_run(small_splits, tmp_path, resume=False)
    csv_path = tmp_path / "history.csv"
    lines = csv_path.read_text().splitlines(keepends=True)
    csv_path.write_text("".join(lines[:-1]))

    frozen_run(small_splits, tmp_path, resume=True)

    assert History.read_csv(csv_path) == first.history


def test_resume_without_last_pt(small_splits, tmp_path):
    out_dir = tmp_path / "new"
    result, _ = frozen_run(small_splits, out_dir, resume=True)
    assert result.history["epoch"] == [1, 2, 3]
    assert os.path.exists(out_dir / "last.pt")


@pytest.mark.slow
def test_second_run_in_locked_folder_rejected(reference, tmp_path):
    out_dir = tmp_path / "run"
    first = Child(out_dir, tmp_path, "first", "--block-at", "2")
    first.wait_until(lambda: (first.status_dir / "blocked").exists(), "the block")
    before = {path.name: path.read_bytes() for path in out_dir.iterdir()}

    second = Child(out_dir, tmp_path, "second")
    code = second.process.wait(timeout=RUN_TIMEOUT)

    assert code != 0
    assert "another training run is writing to" in second.log()
    assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == before

    first.kill()
    final = Child(out_dir, tmp_path, "final")
    run = load_run(out_dir, final.finish())

    assert final.epochs_done() == list(range(3, EPOCHS + 1))
    assert_same_run(run, reference)
