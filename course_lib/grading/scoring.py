"""Award points in the grader's process and write the table and feedback.

Each check cell of a graded notebook left a record: its outcome, its error
and the JSON result of the check's run step. Here each result is scored with
the same ``score_*`` function that the check cells of the exercise notebook
use, so a notebook that passes its checks for the student passes here too.
Only a score that succeeds here earns points; what the kernel printed or
claimed does not count.

Statuses of a row (one student, one exercise):

- ``passed``: every check passed.
- ``failed``: a check failed or was not completed.
- ``timed out``: a cell, the notebook or the student's process ran out of
  time; the checks that did not run earn nothing.
- ``error``: the notebook could not be graded (unreadable file, another
  exercise's notebook, duplicate student names, a dead kernel).
- ``missing``: no notebook for the exercise.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import checks
from ..checkpoint import write_text_atomic
from .submissions import CheckCell, Exercise, Outcome, Student
from .worker import WorkerResult

STATUSES = ("passed", "failed", "error", "timed out", "missing")
COLUMNS = ("student", "submission", "exercise", "points", "max_points", "status",
           "reason")
MAX_REASON = 240
MAX_WEIGHTS_BYTES = 64 * 2**20
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class CheckScore:
    """The outcome of one check: its status, points and message."""

    check: CheckCell
    status: str
    points: int
    message: str


@dataclass
class Row:
    """One student and one exercise in the grade table."""

    student: str
    submission: str
    exercise: Exercise
    points: int
    status: str
    reason: str
    checks: list[CheckScore] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    answer_errors: list[str] = field(default_factory=list)
    # Seconds of the student's whole grading process, the same on each of
    # the student's rows; None when no notebook of the student ran.
    seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "student": self.student, "submission": self.submission,
            "exercise": self.exercise.label, "points": self.points,
            "max_points": self.exercise.max_points, "status": self.status,
            "reason": _shorten(self.reason),
        }


def outcome_row(student: Student, exercise: Exercise, outcome: Outcome) -> Row:
    """Return the row of an exercise that could not be run."""
    return Row(student.name, student.entry, exercise, 0, outcome.status,
               outcome.reason)


def score_notebook(
    student: Student,
    exercise: Exercise,
    worker: WorkerResult,
    notes: list[str],
) -> Row:
    """Score the checks of one merged notebook from the worker's records."""
    records = [cell for cell in worker.cells
               if cell.get("notebook") == exercise.file_name]
    by_id = {cell.get("cell_id"): cell for cell in records}
    answer_errors = [
        _answer_error(exercise, by_id[cell_id])
        for cell_id in exercise.answer_ids
        if cell_id in by_id and by_id[cell_id].get("error")
    ]
    scores = [
        _score_check(check, by_id.get(check.cell_id), worker)
        for check in exercise.checks
    ]
    points = sum(score.points for score in scores)
    died = [cell for cell in records if cell.get("kernel_died")]
    problems = [score for score in scores if score.status != "passed"]
    if not problems:
        status, reason = "passed", f"all {len(scores)} checks passed"
    elif any(score.status == "timed out" for score in problems):
        status = "timed out"
        reason = next(s for s in problems if s.status == "timed out").message
        slow = [cell for cell in records if cell.get("timed_out")]
        if slow:
            limit = ("notebook time limit" if slow[0].get("notebook_time_limit")
                     else f"cell time limit of {slow[0].get('time_limit'):g} s")
            reason = (f"{_describe_cell(exercise, slow[0])} ran past the {limit}; "
                      "the checks after it did not run")
    elif died:
        status = "error"
        reason = (f"the kernel died in {_describe_cell(exercise, died[0])}, so the "
                  "checks after it did not run (os._exit, a crash or the memory "
                  "limit)")
    elif any(score.status == "error" for score in problems):
        status = "error"
        reason = next(s for s in problems if s.status == "error").message
    else:
        status = "failed"
        first = problems[0]
        reason = f"check {first.check.name}: {first.message}"
        unfinished = "raised NotImplementedError"
        crashed = [error for error in answer_errors if unfinished not in error]
        if crashed:
            reason = f"{crashed[0]}; {reason}"
    return Row(student.name, student.entry, exercise, points, status, reason,
               scores, notes, answer_errors, worker.seconds)


def _describe_cell(exercise: Exercise, record: dict[str, Any]) -> str:
    """Return the cell's name in the student's terms: answer, check or code cell."""
    cell_id = record.get("cell_id")
    if cell_id in exercise.answer_ids:
        return f"answer cell {exercise.answer_ids.index(cell_id) + 1}"
    for check in exercise.checks:
        if check.cell_id == cell_id:
            return f"the check cell of check_{check.name}"
    # Code cell 0 of a graded notebook is the grader's own first cell, so the
    # others keep their numbers in the released notebook, counted from 1.
    return f"code cell {record.get('cell')}"


def _answer_error(exercise: Exercise, record: dict[str, Any]) -> str:
    number = exercise.answer_ids.index(record["cell_id"]) + 1
    error = record["error"]
    return f"answer cell {number} raised {error.get('ename')}: {error.get('evalue')}"


def _score_check(check: CheckCell, record: dict[str, Any] | None,
                 worker: WorkerResult) -> CheckScore:
    def result(status: str, message: str, points: int = 0) -> CheckScore:
        return CheckScore(check, status, points, message)

    if record is None:
        if worker.timed_out:
            return result("timed out", "the student's grading process ran out of "
                          "time before this check")
        if not worker.finished:
            return result("error", "the grading process ended before this check "
                          f"(exit code {worker.returncode})")
        return result("failed", "the check cell did not run")
    if record.get("outcome") == "not run":
        status = "timed out" if record.get("stopped_by") == "timed out" else "failed"
        return result(status, str(record.get("reason") or "the check did not run"))
    if record.get("timed_out"):
        limit = ("the notebook time limit" if record.get("notebook_time_limit")
                 else "the cell time limit")
        return result("timed out", f"the check cell ran past {limit}")
    text = record.get("check_result")
    if not isinstance(text, str):
        error = record.get("error") or {}
        if error:
            return result("failed", f"the check cell raised {error.get('ename')}: "
                          f"{_plain(error.get('evalue'))}")
        return result("failed", "the check cell recorded no result")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError:
        return result("failed", "the check's recorded result is not valid JSON")
    if not isinstance(payload, dict) or payload.get("check") != check.name:
        return result("failed", "the recorded result belongs to another check")
    if "raised" in payload:
        raised = payload["raised"] if isinstance(payload["raised"], dict) else {}
        return result("failed", f"the check raised {raised.get('type')}: "
                      f"{raised.get('message')}")
    try:
        data = payload["result"]
        if check.name == "resume":
            data = _contained_weights(data, worker.work_dir)
        line = checks.CHECKS[check.name].score(data)
    except checks.CheckFailed as err:
        return result("failed", str(err))
    except Exception as err:  # noqa: BLE001 - a forged result must not stop grading
        return result("failed", "the recorded result could not be scored "
                      f"({type(err).__name__}: {str(err)[:200]})")
    if record.get("outcome") != "passed" or record.get("reply_status") not in (
            None, "ok"):
        return result("failed", "the check cell ended with an error after its "
                      "result was recorded")
    return result("passed", line, check.points)


def _contained_weights(data: Any, root: Path) -> Any:
    """Check that the resume trial's weights files are real files under `root`.

    The paths come from the student's process, so a path outside the
    student's scratch folder, a link or an oversized file fails the check
    instead of being loaded.
    """
    root = root.resolve()
    for name in ("uninterrupted", "resumed"):
        run = data["runs"][name]
        if run is None:
            continue
        path = run.get("weights")
        if path is None:
            continue
        path = Path(path)
        resolved = path.resolve()
        if (path.is_symlink() or not resolved.is_file()
                or not resolved.is_relative_to(root)
                or resolved.stat().st_size > MAX_WEIGHTS_BYTES):
            raise checks.CheckFailed(
                f"the final weights of the {name} run are not a file of the trial "
                "in the student's folder, so they cannot be compared"
            )
    return data


def _plain(text: Any) -> str:
    return _ANSI.sub("", str(text or ""))


def _shorten(text: str) -> str:
    text = " ".join(_plain(text).split())
    return text if len(text) <= MAX_REASON else text[:MAX_REASON - 3] + "..."


# --- output --------------------------------------------------------------------


def write_table(rows: list[Row], path: Path) -> Path:
    """Write the grade table as CSV, one row per student and exercise."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row.as_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(buffer.getvalue(), path)


def feedback_name(student: Student, taken: set[str]) -> str:
    """Return a file name for the student's feedback, unique within `taken`."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", student.name).strip("._") or "student"
    name, number = f"{stem}.md", 2
    while name.casefold() in taken:
        name, number = f"{stem}-{number}.md", number + 1
    taken.add(name.casefold())
    return name


def feedback_text(student: Student, rows: list[Row]) -> str:
    """Return the Markdown feedback of one student."""
    total = sum(row.points for row in rows)
    possible = sum(row.exercise.max_points for row in rows)
    lines = [f"# Feedback for {student.name}", "",
             f"Submission: `{student.entry}`. Points: {total} of {possible}.", ""]
    for note in student.notes:
        lines.append(f"- Note: {_plain(note)}")
    for row in rows:
        lines += ["", f"## Exercise {row.exercise.label}: {row.status}, "
                  f"{row.points} of {row.exercise.max_points} points", ""]
        if not row.checks:
            lines.append(_plain(row.reason))
            continue
        for number, score in enumerate(row.checks, start=1):
            lines.append(f"- Check {number}, `check_{score.check.name}` "
                         f"({score.points} of {score.check.points}): {score.status}. "
                         f"{_plain(score.message)}")
        for error in row.answer_errors:
            lines.append(f"- Your {_plain(error)}")
        for note in row.notes:
            lines.append(f"- Note: {note}")
        if row.status in ("error", "timed out"):
            lines.append(f"- {_plain(row.reason)}")
    lines += ["", "Only the answer cells of your notebook were graded, inside the "
              "released exercise notebook; cells you added or changed elsewhere "
              "did not run. Run the check cells of your notebook to see the same "
              "results before you submit."]
    return "\n".join(lines) + "\n"


def summary_lines(rows: list[Row], exercises: list[Exercise], seconds: float,
                  jobs: int) -> list[str]:
    """Return the terminal summary: one line per student and the status counts."""
    students: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        students.setdefault((row.student, row.submission), []).append(row)
    width = max([len("student")] + [len(name) for name, _ in students]) + 2
    header = "student".ljust(width) + "".join(
        exercise.label.ljust(20) for exercise in exercises) + "points"
    lines = [header]
    for (name, _), student_rows in students.items():
        by_exercise = {row.exercise.file_name: row for row in student_rows}
        cells = ""
        for exercise in exercises:
            row = by_exercise[exercise.file_name]
            cells += f"{row.points}/{exercise.max_points} {row.status}".ljust(20)
        total = sum(row.points for row in student_rows)
        possible = sum(exercise.max_points for exercise in exercises)
        lines.append(name.ljust(width) + cells + f"{total}/{possible}")
    counts = {status: sum(row.status == status for row in rows) for status in STATUSES}
    lines.append("rows: " + ", ".join(f"{count} {status}"
                                      for status, count in counts.items()))
    minutes, rest = divmod(math.ceil(seconds), 60)
    lines.append(f"graded {len(students)} submissions in {minutes} min {rest} s "
                 f"with {jobs} in parallel")
    return lines
