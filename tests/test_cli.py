"""Tests of ``python -m course_lib train``, run as a real subprocess."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from course_lib.device import pick_device
from course_lib.history import History
from course_lib.models import build_model, count_parameters

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EPOCH_LINE = re.compile(r"^\s*(\d+)/2 \|", re.MULTILINE)
TEST_LINE = re.compile(r"^test accuracy of best\.pt \(epoch (\d+)\): ([\d.]+)%$")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # One thread keeps the run from competing with other test processes.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "course_lib", "train", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """Train the MLP for two epochs and return the process and its run folder."""
    folder = tmp_path_factory.mktemp("cli")
    out_dir = folder / "run"
    done = run_cli(
        "--model", "mlp", "--epochs", "2", "--out", str(out_dir), cwd=folder
    )
    return done, out_dir


def output_lines(done: subprocess.CompletedProcess) -> list[str]:
    return done.stdout.splitlines()


@pytest.mark.slow
def test_train_exits_zero(finished_run):
    done, _ = finished_run

    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_train_no_traceback(finished_run):
    done, _ = finished_run

    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.slow
def test_train_header(finished_run):
    done, _ = finished_run
    lines = output_lines(done)
    parameters = count_parameters(build_model("mlp", (1, 28, 28), 10))

    assert f"device   {pick_device('auto')} (float32)" in lines
    assert any(
        line.startswith("data     mnist_5k: 4000 train, 500 val, 500 test")
        for line in lines
    )
    assert f"model    MLP, {parameters:,} parameters" in lines


@pytest.mark.slow
def test_train_header_before_epochs(finished_run):
    done, _ = finished_run
    first_epoch = EPOCH_LINE.search(done.stdout).start()

    for prefix in ("device ", "data ", "model "):
        assert done.stdout.index(prefix) < first_epoch


@pytest.mark.slow
def test_train_one_line_per_epoch(finished_run):
    done, _ = finished_run

    assert EPOCH_LINE.findall(done.stdout) == ["1", "2"]


@pytest.mark.slow
def test_train_ends_with_test_accuracy(finished_run):
    done, out_dir = finished_run
    match = TEST_LINE.match(output_lines(done)[-1])
    best = torch.load(out_dir / "best.pt", weights_only=True)

    assert match is not None, output_lines(done)[-1]
    assert int(match.group(1)) == best["epoch"]
    # Two epochs of the MLP reach about 89% on this split, and chance is 10%.
    assert float(match.group(2)) > 50.0


@pytest.mark.slow
def test_train_writes_run_files(finished_run):
    _, out_dir = finished_run

    for name in ("best.pt", "last.pt", "history.csv", "curves.png"):
        assert (out_dir / name).is_file(), name


@pytest.mark.slow
def test_train_curves_png(finished_run):
    _, out_dir = finished_run

    assert (out_dir / "curves.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.slow
def test_train_history_csv(finished_run):
    _, out_dir = finished_run
    history = History.read_csv(out_dir / "history.csv")

    assert history["epoch"] == [1, 2]
    assert all(0.0 <= value <= 1.0 for value in history["val_acc"])


@pytest.mark.slow
def test_train_last_checkpoint(finished_run):
    _, out_dir = finished_run
    last = torch.load(out_dir / "last.pt", weights_only=True)

    assert last["epoch"] == 2
    assert last["finished"] is True


@pytest.mark.slow
def test_train_best_loads_into_mlp(finished_run):
    _, out_dir = finished_run
    best = torch.load(out_dir / "best.pt", weights_only=True)
    model = build_model("mlp", (1, 28, 28), 10)

    model.load_state_dict(best["model"])


@pytest.mark.slow
def test_resume_finished_trains_nothing(finished_run, tmp_path):
    done, out_dir = finished_run
    copy = tmp_path / "run"
    shutil.copytree(out_dir, copy)
    history_before = (copy / "history.csv").read_bytes()
    last_before = (copy / "last.pt").read_bytes()

    resumed = run_cli(
        "--model", "mlp", "--epochs", "2", "--out", str(copy), "--resume",
        cwd=tmp_path,
    )

    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert EPOCH_LINE.findall(resumed.stdout) == []
    assert "the run had finished" in resumed.stdout
    assert (copy / "history.csv").read_bytes() == history_before
    assert (copy / "last.pt").read_bytes() == last_before
    assert output_lines(resumed)[-1] == output_lines(done)[-1]


@pytest.mark.slow
def test_resume_with_other_patience_rejected(finished_run, tmp_path):
    _, out_dir = finished_run
    copy = tmp_path / "run"
    shutil.copytree(out_dir, copy)
    last_before = (copy / "last.pt").read_bytes()

    resumed = run_cli(
        "--model", "mlp", "--epochs", "2", "--out", str(copy), "--resume",
        "--patience", "2", cwd=tmp_path,
    )
    errors = error_lines(resumed.stdout)

    assert resumed.returncode == 2
    assert len(errors) == 1, resumed.stdout
    assert "patience=5, but this run has patience=2" in errors[0]
    assert (copy / "last.pt").read_bytes() == last_before


@pytest.mark.slow
def test_existing_run_needs_resume(finished_run, tmp_path):
    _, out_dir = finished_run
    copy = tmp_path / "run"
    shutil.copytree(out_dir, copy)

    done = run_cli("--model", "mlp", "--epochs", "2", "--out", str(copy), cwd=tmp_path)
    errors = [line for line in done.stdout.splitlines() if "error:" in line]

    assert done.returncode != 0
    assert len(errors) == 1
    assert "--resume" in errors[0]
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.slow
def test_resume_damaged_last_pt(finished_run, tmp_path):
    _, out_dir = finished_run
    copy = tmp_path / "run"
    shutil.copytree(out_dir, copy)
    state = torch.load(copy / "last.pt", weights_only=True)
    del state["early_stopping"]
    torch.save(state, copy / "last.pt")

    done = run_cli(
        "--model", "mlp", "--epochs", "2", "--out", str(copy), "--resume",
        cwd=tmp_path,
    )
    errors = error_lines(done.stdout)

    assert done.returncode == 2
    assert "Traceback" not in done.stdout + done.stderr
    assert len(errors) == 1, done.stdout
    assert f"{copy / 'last.pt'} has no field early_stopping" in errors[0]


# Each case runs main() in one driver process, which pays for the torch import
# once. The driver prints a traceback for any exception that escapes main(),
# as the interpreter would. test_bad_argument_real_entry runs one case
# through ``python -m course_lib`` itself.
DRIVER = textwrap.dedent(
    """
    import json
    import sys
    import traceback

    from course_lib.cli import main

    for name, argv in json.loads(sys.argv[1]):
        print(f"=== start {name}", flush=True)
        print(f"=== start {name}", file=sys.stderr, flush=True)
        try:
            code = main(["train", *argv])
        except SystemExit as exit_error:
            code = exit_error.code
        except BaseException:
            traceback.print_exc()
            code = "exception"
        sys.stdout.flush()
        sys.stderr.flush()
        print(f"=== exit {name} {code}", flush=True)
    """
)

AT_LEAST_1 = "must be an integer of at least 1, got"
POSITIVE = "must be a finite number above 0, got"
NON_NEGATIVE = "must be a finite number of at least 0, got"

# Numeric options that their argparse types reject: each error names the
# option, the accepted range and the value.
OPTION_RANGES = {
    "epochs_zero": (["--epochs", "0"], f"argument --epochs: {AT_LEAST_1} 0"),
    "epochs_negative": (["--epochs", "-3"], f"argument --epochs: {AT_LEAST_1} -3"),
    "epochs_not_int": (["--epochs", "two"], f"argument --epochs: {AT_LEAST_1} 'two'"),
    "patience_zero": (["--patience", "0"], f"argument --patience: {AT_LEAST_1} 0"),
    "patience_negative": (
        ["--patience", "-1"], f"argument --patience: {AT_LEAST_1} -1"
    ),
    "batch_size_zero": (
        ["--batch-size", "0"], f"argument --batch-size: {AT_LEAST_1} 0"
    ),
    "width_zero": (
        ["--width", "0"], "argument --width: must be an integer from 1 to 1024, got 0"
    ),
    "width_too_large": (
        ["--width", "10240"],
        "argument --width: must be an integer from 1 to 1024, got 10240",
    ),
    "seed_negative": (
        ["--seed", "-1"],
        "argument --seed: must be an integer from 0 to 4294967295, got -1",
    ),
    "seed_too_large": (
        ["--seed", "4294967296"],
        "argument --seed: must be an integer from 0 to 4294967295, got 4294967296",
    ),
    "lr_negative": (["--lr", "-0.1"], f"argument --lr: {POSITIVE} -0.1"),
    "lr_zero": (["--lr", "0"], f"argument --lr: {POSITIVE} 0"),
    "lr_nan": (["--lr", "nan"], f"argument --lr: {POSITIVE} nan"),
    "lr_inf": (["--lr", "inf"], f"argument --lr: {POSITIVE} inf"),
    "weight_decay_negative": (
        ["--weight-decay", "-0.01"], f"argument --weight-decay: {NON_NEGATIVE} -0.01"
    ),
    "weight_decay_nan": (
        ["--weight-decay", "nan"], f"argument --weight-decay: {NON_NEGATIVE} nan"
    ),
}

BAD_ARGUMENTS = {
    **OPTION_RANGES,
    "unknown_dataset": (["--dataset", "imagenet"], "'imagenet'"),
    "unknown_device": (["--device", "tpu"], "'tpu'"),
    "resume_without_out": (["--resume"], "--resume needs --out"),
    "out_is_file": (["--out", "{file}"], "{file}"),
}
if not torch.cuda.is_available():
    BAD_ARGUMENTS["missing_cuda"] = (["--device", "cuda"], "'cuda'")


NOTES_TEXT = "not a run folder\n"


@dataclass
class BadArgumentRuns:
    """Exit codes and output of the bad-argument cases, by case name."""

    folder: Path
    codes: dict[str, str]
    outputs: dict[str, str]

    @property
    def notes(self) -> Path:
        """A regular file that the out_is_file case passes as --out."""
        return self.folder / "notes.txt"


@pytest.fixture(scope="module")
def bad_argument_runs(tmp_path_factory) -> BadArgumentRuns:
    folder = tmp_path_factory.mktemp("bad_arguments")
    runs = BadArgumentRuns(folder, codes={}, outputs={})
    runs.notes.write_text(NOTES_TEXT)
    # One epoch by default, so that a case that is wrongly accepted trains
    # briefly. A case's own --epochs comes later and takes precedence.
    cases = [
        (name, ["--model", "mlp", "--epochs", "1",
                *(a.format(file=runs.notes) for a in args)])
        for name, (args, _) in BAD_ARGUMENTS.items()
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=folder,
        env=env,
    )
    assert done.returncode == 0, done.stderr

    for name, _ in cases:
        stdout = _section(done.stdout, name)
        exit_line = re.search(rf"^=== exit {name} (\S+)$", stdout, re.MULTILINE)
        runs.codes[name] = exit_line.group(1)
        runs.outputs[name] = stdout[: exit_line.start()] + _section(done.stderr, name)
    return runs


def _section(text: str, name: str) -> str:
    marker = f"=== start {name}\n"
    start = text.index(marker) + len(marker)
    end = text.find("=== start ", start)
    return text[start:] if end < 0 else text[start:end]


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "error:" in line]


@pytest.mark.parametrize("name", list(BAD_ARGUMENTS))
def test_bad_argument(name, bad_argument_runs):
    code = bad_argument_runs.codes[name]
    output = bad_argument_runs.outputs[name]
    expected = BAD_ARGUMENTS[name][1].format(file=bad_argument_runs.notes)
    errors = error_lines(output)

    assert code not in ("0", "None", "exception"), output
    assert "Traceback" not in output
    assert len(errors) == 1, output
    assert expected in errors[0]


@pytest.mark.parametrize("name", list(OPTION_RANGES))
def test_bad_option_stops_at_parsing(name, bad_argument_runs):
    output = bad_argument_runs.outputs[name]

    assert bad_argument_runs.codes[name] == "2", output
    assert "usage: python -m course_lib train" in output
    # The "device" header line is the first one that a started run logs.
    assert not re.search(r"^device ", output, re.MULTILINE), output


def test_bad_argument_writes_nothing(bad_argument_runs):
    assert not (bad_argument_runs.folder / "runs").exists()
    assert bad_argument_runs.notes.read_text() == NOTES_TEXT


def test_bad_argument_real_entry(tmp_path):
    done = run_cli("--model", "mlp", "--epochs", "0", cwd=tmp_path)
    errors = error_lines(done.stderr)

    assert done.returncode == 2
    assert "Traceback" not in done.stdout + done.stderr
    assert len(errors) == 1, done.stderr
    assert "got 0" in errors[0]


def _limit_file_size() -> None:
    # Writes past the limit then fail with EFBIG, as on a full disk, instead
    # of killing the process with SIGXFSZ.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))


@pytest.mark.slow
def test_failed_checkpoint_write_named(tmp_path):
    out_dir = tmp_path / "run"
    process = subprocess.run(
        [sys.executable, "-m", "course_lib", "train", "--model", "mlp", "--width",
         "16", "--epochs", "2", "--out", str(out_dir), "--no-progress"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
        preexec_fn=_limit_file_size,
    )
    lines = process.stdout.strip().splitlines()

    assert process.returncode == 2
    assert "Traceback" not in process.stdout + process.stderr
    assert lines[-1].startswith(f"error: could not write {out_dir / 'last.pt'}")
    assert "writing stopped after" in lines[-1]
    assert not list(out_dir.glob(".*.tmp"))


def test_log_lines_follow_replaced_stdout(monkeypatch):
    import io
    import logging

    from course_lib.cli import configure_logging

    first = io.StringIO()
    monkeypatch.setattr(sys, "stdout", first)
    configure_logging()
    logging.getLogger("course_lib").info("first cell")
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stdout", second)

    logging.getLogger("course_lib").info("second cell")

    assert second.getvalue() == "second cell\n"


def test_help_shows_zero_default(capsys):
    from course_lib import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])

    help_text = " ".join(capsys.readouterr().out.split())
    assert "0 to 4294967295 (default: 0)" in help_text
