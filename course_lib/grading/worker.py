"""Run one student's merged notebooks in a separate process with limits.

The process is pytest with nbval and `course_lib.grading.nbval_plugin`,
started with:

- a scratch copy of the student's folder as the kernel's working folder,
  so that the submission itself is never changed;
- an environment rebuilt from a short list of harmless variables (no
  tokens, keys or passwords of the grader's shell), with HOME and TMPDIR in
  the scratch folder and one torch thread;
- limits inherited by the kernel and everything it starts: memory
  (RLIMIT_DATA), file size and no core files;
- a time limit per cell and per notebook (enforced by the plugin) and one
  for the whole process, after which its process group and its kernels are
  killed.

This isolates students from each other's crashes, loops and memory bombs.
It is not a sandbox: student code runs as the grader's user and can read or
write whatever that user can. Grade untrusted classes in a container or
under a separate account.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat

import course_lib

MAX_RESULTS_BYTES = 64 * 2**20
MAX_COPIED_BYTES = 200 * 2**20
# Variables a kernel needs that carry no secrets.
KEPT_VARIABLES = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "CUDA_VISIBLE_DEVICES",
                  "COURSE_DATA_DIR")
# Sets the limits, then becomes the pytest process; the limits are inherited
# by the kernels it starts. Runs in the grader's own scratch folder.
_LAUNCH = (
    "import os, resource, sys\n"
    "memory, file_size = int(sys.argv[1]), int(sys.argv[2])\n"
    "resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))\n"
    "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
    "os.execv(sys.executable, [sys.executable] + sys.argv[3:])\n"
)


@dataclass
class Limits:
    """Time and memory limits of one student's grading process."""

    cell_timeout: float = 300.0
    notebook_timeout: float = 900.0
    memory_bytes: int = 4 * 2**30
    file_bytes: int = 2**30
    output_bytes: int = 2**20


@dataclass
class WorkerResult:
    """The cell records of one student's process and how the process ended."""

    cells: list[dict[str, Any]]
    finished: bool
    timed_out: bool
    returncode: int | None
    seconds: float
    log_tail: str
    work_dir: Path


def copy_submission(source: Path | None, work_dir: Path) -> list[str]:
    """Copy the regular files of `source` into `work_dir`; return what was left out.

    Symbolic links are not followed, and copying stops at `MAX_COPIED_BYTES`.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    if source is None:
        return skipped
    copied = 0
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_symlink():
            skipped.append(f"{relative} (a symbolic link)")
            continue
        if not path.is_file():
            continue
        size = path.stat().st_size
        if copied + size > MAX_COPIED_BYTES:
            skipped.append(f"{relative} (over the {MAX_COPIED_BYTES // 2**20} MB "
                           "copied per student)")
            continue
        target = work_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        copied += size
    return skipped


def clean_environment(root: Path) -> dict[str, str]:
    """Return the environment of a student's process, rooted in `root`."""
    env = {name: os.environ[name] for name in KEPT_VARIABLES if name in os.environ}
    home = root / "home"
    tmp = root / "tmp"
    for folder in (home, tmp):
        folder.mkdir(parents=True, exist_ok=True)
    package_parent = str(Path(course_lib.__file__).resolve().parent.parent)
    env.update({
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "PYTHONPATH": package_parent,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": str(home / ".matplotlib"),
        "IPYTHONDIR": str(home / ".ipython"),
        "JUPYTER_CONFIG_DIR": str(home / ".jupyter"),
        "JUPYTER_DATA_DIR": str(home / ".jupyter-data"),
        "JUPYTER_RUNTIME_DIR": str(home / ".jupyter-runtime"),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    })
    env.setdefault("PATH", os.defpath)
    return env


def run_student(
    root: Path,
    source: Path | None,
    notebooks: dict[str, Any],
    limits: Limits,
) -> WorkerResult:
    """Write `notebooks` (file name to merged notebook) and run them in `root`."""
    work_dir = root / "work"
    grader_dir = root / "grader"
    skipped = copy_submission(source, work_dir)
    grader_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for file_name, notebook in notebooks.items():
        path = work_dir / file_name
        nbformat.write(notebook, path)
        paths.append(path)
    (grader_dir / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    results = grader_dir / "results.json"
    log = grader_dir / "pytest.log"
    command = [
        sys.executable, "-c", _LAUNCH, str(limits.memory_bytes),
        str(limits.file_bytes),
        "-m", "pytest", "-p", "nbval.plugin",
        "-p", "course_lib.grading.nbval_plugin", "-p", "no:cacheprovider",
        "--noconftest", "-c", str(grader_dir / "pytest.ini"),
        "--rootdir", str(grader_dir), "-q", "--tb=no", "--nbval-lax",
        "--nbval-current-env", f"--nbval-cell-timeout={limits.cell_timeout:g}",
        "--nbval-kernel-startup-timeout=120",
        f"--grade-results={results}",
        f"--grade-notebook-timeout={limits.notebook_timeout:g}",
        f"--grade-output-limit={limits.output_bytes}",
        *map(str, paths),
    ]
    wall_limit = len(paths) * limits.notebook_timeout + 120
    started = time.monotonic()
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command, cwd=grader_dir, env=clean_environment(root),
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        timed_out = False
        try:
            process.wait(timeout=wall_limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(process.pid)
            process.wait()
    seconds = time.monotonic() - started
    _kill_kernels(Path(f"{results}.kernels"))
    data = _read_results(results)
    result = WorkerResult(
        cells=data.get("cells", []), finished=bool(data.get("finished")),
        timed_out=timed_out, returncode=process.returncode, seconds=seconds,
        log_tail=_tail(log), work_dir=work_dir,
    )
    if skipped:
        result.log_tail = "not copied: " + ", ".join(skipped) + "\n" + result.log_tail
    return result


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_kernels(pid_file: Path) -> None:
    """Kill the process group of every kernel the worker started.

    Kernels start in sessions of their own, so killing the worker's group
    leaves them running. What a kernel started (the resume trial's runs, a
    student's subprocesses) is in the kernel's group and ends with it.
    """
    if not pid_file.exists():
        return
    for line in pid_file.read_text("utf-8", errors="replace").split():
        if line.isdigit():
            _kill_group(int(line))


def _read_results(path: Path) -> dict[str, Any]:
    if not path.exists() or path.stat().st_size > MAX_RESULTS_BYTES:
        return {}
    try:
        data = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("cells", []), list):
        return {}
    data["cells"] = [cell for cell in data.get("cells", []) if isinstance(cell, dict)]
    return data


def _tail(path: Path, size: int = 4000) -> str:
    if not path.exists():
        return ""
    with open(path, "rb") as file:
        file.seek(max(0, path.stat().st_size - size))
        return file.read().decode("utf-8", errors="replace")
