"""One end-to-end run of ``python -m course_lib train`` in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_TEST_LINE = re.compile(r"test accuracy of best\.pt \(epoch (\d+)\): ([\d.]+)%")


@dataclass
class CommandResult:
    """Wall time in seconds, epochs run, and the test accuracy of best.pt."""

    wall: float
    epochs_run: int
    best_epoch: int
    test_accuracy_percent: float


def run_train_command(
    out_dir: Path,
    *,
    device: str,
    epochs: int | None = None,
    threads: int | None = None,
) -> CommandResult:
    """Run the train command with its defaults and time it from start to exit.

    Its output goes to a pipe, not a terminal, so it shows no progress bars,
    as in a log file or CI.

    Raises:
        RuntimeError: if the command fails or prints no test accuracy line.
    """
    command = [sys.executable, "-m", "course_lib", "train", "--out", str(out_dir)]
    command += ["--device", device]
    if epochs is not None:
        command += ["--epochs", str(epochs)]
    environment = dict(os.environ)
    if threads is not None:
        environment["OMP_NUM_THREADS"] = str(threads)

    started = time.perf_counter()
    completed = subprocess.run(
        command, capture_output=True, text=True, env=environment, check=False
    )
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed with exit code {completed.returncode}:\n"
            f"{completed.stdout[-2000:]}{completed.stderr[-2000:]}"
        )

    match = _TEST_LINE.search(completed.stdout)
    if match is None:
        raise RuntimeError(
            "found no 'test accuracy of best.pt' line in the train command's "
            "output. If that log line changed, update _TEST_LINE in "
            "benchmarks/train_command.py. The output ends with:\n"
            + completed.stdout[-2000:]
        )
    history_lines = (out_dir / "history.csv").read_text().strip().splitlines()
    return CommandResult(
        wall=wall,
        epochs_run=len(history_lines) - 1,
        best_epoch=int(match.group(1)),
        test_accuracy_percent=float(match.group(2)),
    )
