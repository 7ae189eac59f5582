"""The grader's side of a check cell, run inside the student's kernel.

In a notebook merged for grading, each check cell calls `record` instead of
``checks.check_<name>``. `record` runs only the check's run step (the part
that calls the student's code) and shows its JSON result as an output of
the cell, under `MIME_TYPE`. The grader reads that output and scores it in
its own process, so patching the check or scoring functions in the kernel,
or printing a fake "passed" line, earns nothing.

The run steps are looked up once, when the grader's first cell imports this
module and before any student code runs.

NOTE: student code runs in the same kernel, so a student who deliberately
rebinds `record` or edits `_RUN_STEPS` can show forged results. Scoring in the
grader stops fake output and patched checks, not this.
"""

from __future__ import annotations

import json
from typing import Any

from .. import checks

MIME_TYPE = "application/x-course-lib-check-result"
MAX_MESSAGE = 4000

_RUN_STEPS = {name: check.run for name, check in checks.CHECKS.items()}


def record(name: str, *args: Any) -> None:
    """Run the run step of check `name` on `args` and show its result."""
    from IPython.display import display

    try:
        payload = {"check": name, "result": _RUN_STEPS[name](*args)}
    except Exception as err:  # noqa: BLE001 - any failure is reported as it is
        payload = {"check": name, "raised": {
            "type": type(err).__name__, "message": str(err)[:MAX_MESSAGE],
        }}
    text = json.dumps(payload, default=repr)
    display({MIME_TYPE: text,
             "text/plain": f"check {name}: result recorded for grading"},
            raw=True)
