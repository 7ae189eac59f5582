"""A pytest plugin that turns an nbval run into a record of every cell.

Loaded with ``-p course_lib.grading.nbval_plugin`` next to ``--nbval-lax``
in the grading worker. It writes, after every cell, a JSON file
(``--grade-results``) with each cell's outcome, error and recorded check
result, and it closes four gaps of plain nbval that a hostile notebook
could use:

- A cell counts as failed when the kernel's execute reply has the status
  ``error``, even if the kernel sent no traceback (nbval looks only at the
  error messages on the output channel).
- After a cell times out, nbval runs the remaining cells as expected
  failures; here they are not run and count as failed.
- A notebook has a time limit as a whole (``--grade-notebook-timeout``):
  each cell's timeout is cut to what is left of it.
- A dead kernel (``os._exit``, a crash) is noticed within a second instead
  of after the cell timeout, and output beyond ``--grade-output-limit``
  bytes per cell is dropped instead of kept in memory.

The ids of the kernel processes are written as they start
(``<results>.kernels``), so the grader can kill kernels that outlive a
killed worker.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from queue import Empty
from typing import Any

import pytest

from ..checkpoint import write_text_atomic
from .kernel import MIME_TYPE

MAX_CHECK_RESULT = 8 * 2**20
_TRACEBACK_TAIL = 30


class KernelDied(RuntimeError):
    """The kernel process ended while a cell was running."""


class _Recorder:
    def __init__(self, path: Path, notebook_timeout: float, output_limit: int):
        self.path = path
        self.notebook_timeout = notebook_timeout
        self.output_limit = output_limit
        self.cells: list[dict[str, Any]] = []
        self.notebooks: dict[str, dict[str, Any]] = {}
        self.item = None
        self.cell_timeout: float | None = None

    def write(self, finished: bool = False) -> None:
        data = {"cells": self.cells, "notebooks": self.notebooks,
                "finished": finished}
        write_text_atomic(json.dumps(data), self.path)


_recorder: _Recorder | None = None


def pytest_addoption(parser) -> None:
    group = parser.getgroup("course_lib grading")
    group.addoption("--grade-results", default=None,
                    help="file for the JSON record of every cell")
    group.addoption("--grade-notebook-timeout", type=float, default=1800.0,
                    help="seconds each notebook may run in all (default: 1800)")
    group.addoption("--grade-output-limit", type=int, default=2**20,
                    help="bytes of output kept per cell (default: 1 MiB)")


def pytest_configure(config) -> None:
    global _recorder
    if not config.option.grade_results:
        return
    _recorder = _Recorder(Path(config.option.grade_results),
                          config.option.grade_notebook_timeout,
                          config.option.grade_output_limit)
    _recorder.cell_timeout = config.option.nbval_cell_timeout
    _recorder.write()
    _patch_nbval()


def _patch_nbval() -> None:
    from nbval import kernel as nbval_kernel
    from nbval import plugin as nbval_plugin

    original_get = nbval_kernel.RunningKernel.get_message
    original_init = nbval_kernel.RunningKernel.__init__
    original_kernel_message = nbval_plugin.IPyNbFile.get_kernel_message

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        provisioner = getattr(self.km, "provisioner", None)
        pid = getattr(provisioner, "pid", None)
        if pid is not None:
            with open(f"{_recorder.path}.kernels", "a", encoding="utf-8") as file:
                file.write(f"{pid}\n")

    def get_message(self, stream, timeout=None):
        # Wait in short slices, so that a dead kernel is noticed at once.
        if stream != "shell" or timeout is None:
            return original_get(self, stream, timeout=timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                message = original_get(
                    self, stream, timeout=max(0.0, min(1.0, deadline - time.monotonic()))
                )
            except Empty:
                if not self.is_alive():
                    raise KernelDied("the kernel died while running this cell "
                                     "(os._exit, a crash or the memory limit)")
                if time.monotonic() >= deadline:
                    raise
                continue
            item = _recorder.item
            if item is not None and message["msg_type"] == "execute_reply":
                content = message["content"]
                item.grade_reply = {"status": content.get("status"),
                                    "ename": content.get("ename"),
                                    "evalue": content.get("evalue")}
            return message

    def get_kernel_message(self, timeout=None, stream="iopub"):
        message = original_kernel_message(self, timeout=timeout, stream=stream)
        item = _recorder.item
        if item is not None and stream == "iopub":
            _limit_output(item, message)
        return message

    nbval_kernel.RunningKernel.__init__ = init
    nbval_kernel.RunningKernel.get_message = get_message
    nbval_plugin.IPyNbFile.get_kernel_message = get_kernel_message


def _limit_output(item, message: dict) -> None:
    content = message.get("content", {})
    kind = message.get("msg_type")
    if kind == "stream":
        size = len(content.get("text", ""))
    elif kind in ("display_data", "execute_result", "update_display_data"):
        data = content.get("data", {})
        if MIME_TYPE in data and len(data[MIME_TYPE]) <= MAX_CHECK_RESULT:
            return
        size = sum(len(str(value)) for value in data.values())
    elif kind == "error":
        content["evalue"] = str(content.get("evalue", ""))[:2000]
        content["traceback"] = [str(line)[:500] for line in
                                content.get("traceback", [])[-_TRACEBACK_TAIL:]]
        return
    else:
        return
    used = getattr(item, "grade_output_bytes", 0) + size
    item.grade_output_bytes = used
    if used > _recorder.output_limit:
        item.grade_output_dropped = True
        if kind == "stream":
            content["text"] = ""
        else:
            content["data"] = {"text/plain": ""}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    if _recorder is None or not hasattr(item, "cell"):
        return
    _recorder.item = item
    notebook = item.parent
    info = _recorder.notebooks.setdefault(
        notebook.path.name, {"started": time.time(), "stopped": None})
    stop = getattr(notebook, "grade_stop", None)
    if stop is None and notebook.timed_out:
        stop = ("timed out", "not run: an earlier cell timed out")
    elif stop is None and notebook.kernel is not None and not notebook.kernel.is_alive():
        stop = ("kernel died", "not run: the kernel had died in an earlier cell")
    left = info["started"] + _recorder.notebook_timeout - time.time()
    if stop is None and left <= 0:
        stop = ("timed out", f"not run: the notebook time limit of "
                f"{_recorder.notebook_timeout:g} s was reached")
    if stop is not None:
        notebook.grade_stop = stop
        item.grade_stopped_by = stop[0]
        pytest.skip(stop[1])
    item.grade_cut_by_notebook = left < _recorder.cell_timeout
    item.config.option.nbval_cell_timeout = min(_recorder.cell_timeout, left)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _recorder is None or not hasattr(item, "cell"):
        return
    if report.when == "setup" and report.skipped:
        _store(item, "not run", _skip_reason(report), call.duration)
    elif report.when == "call":
        _store(item, report.outcome, None, call.duration, call.excinfo)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _store(item, outcome: str, reason: str | None, seconds: float,
           excinfo=None) -> None:
    outputs = item.test_outputs or []
    errors = [out for out in outputs if out.get("output_type") == "error"]
    reply = getattr(item, "grade_reply", None) or {}
    timed_out = bool(item.parent.timed_out) and outcome == "failed"
    record: dict[str, Any] = {
        "notebook": item.parent.path.name,
        "cell": item.cell_num,
        "cell_id": item.cell.get("id"),
        "outcome": outcome,
        "reply_status": reply.get("status"),
        "seconds": round(seconds, 3),
        "timed_out": timed_out,
        "time_limit": item.config.option.nbval_cell_timeout,
        "notebook_time_limit": timed_out and getattr(item, "grade_cut_by_notebook",
                                                     False),
        "output_dropped": getattr(item, "grade_output_dropped", False),
        "reason": reason,
        "stopped_by": getattr(item, "grade_stopped_by", None),
        "error": None,
        "check_result": None,
    }
    if errors:
        error = errors[-1]
        record["error"] = {
            "ename": str(error.get("ename", "")),
            "evalue": str(error.get("evalue", ""))[:2000],
            "traceback": [str(line)[:500] for line in
                          error.get("traceback", [])[-_TRACEBACK_TAIL:]],
        }
    elif reply.get("status") == "error":
        # The reply has the status error although no traceback was sent.
        record["error"] = {"ename": str(reply.get("ename") or "error"),
                           "evalue": str(reply.get("evalue") or "")[:2000],
                           "traceback": []}
        record["outcome"] = "failed"
    elif outcome == "failed" and excinfo is not None:
        record["error"] = {"ename": excinfo.type.__name__,
                           "evalue": str(excinfo.value)[:2000], "traceback": []}
    if excinfo is not None and excinfo.errisinstance(KernelDied):
        record["kernel_died"] = True
    if reply.get("status") not in (None, "ok"):
        record["outcome"] = "failed"
    results = [out["data"][MIME_TYPE] for out in outputs
               if out.get("output_type") in ("display_data", "execute_result")
               and MIME_TYPE in out.get("data", {})]
    if results:
        record["check_result"] = results[-1]
    _recorder.cells.append(record)
    _recorder.item = None
    _recorder.write()


def pytest_sessionfinish(session, exitstatus) -> None:
    if _recorder is not None:
        _recorder.write(finished=True)


def pytest_collection_modifyitems(session, config, items) -> None:
    # Only notebook cells are graded; nothing else may run in this session.
    if _recorder is not None:
        items[:] = [item for item in items if hasattr(item, "cell")]
