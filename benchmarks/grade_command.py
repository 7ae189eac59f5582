"""Grading time of ``grade_class``, the engine of ``python -m course_lib grade``.

The class is built from the repository's own notebooks: solved students
submit copies of solutions/, the full and passing work that runs every check
to the end, and unsolved students submit copies of exercises/, whose checks
fail early. The same class is graded once per job count, in one process.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
KINDS = {"solved": REPOSITORY / "solutions", "unsolved": REPOSITORY / "exercises"}


@dataclass
class GradingRun:
    """One grading of the whole class with `jobs` students at a time.

    `wall` is the time of the `grade_class` call in seconds. `seconds` maps
    each kind of student to the `Row.seconds` of each student of that kind:
    the time of that student's pytest process, without merging and scoring.
    """

    jobs: int
    wall: float
    seconds: dict[str, list[float]]

    @property
    def students(self) -> int:
        return sum(len(values) for values in self.seconds.values())


def build_class(folder: Path, students_per_kind: int) -> dict[str, str]:
    """Write one folder per student into `folder`; return each name's kind.

    The names alternate between the kinds (s01-solved, s02-unsolved, ...),
    and the grader takes students in name order, so with 2 jobs a solved and
    an unsolved student usually run side by side, as in a mixed class.
    """
    kinds = {}
    for index in range(students_per_kind * len(KINDS)):
        kind = list(KINDS)[index % len(KINDS)]
        name = f"s{index + 1:02d}-{kind}"
        _write_student(folder / name, kind)
        kinds[name] = kind
    return kinds


def _write_student(student_folder: Path, kind: str) -> None:
    student_folder.mkdir(parents=True)
    for notebook in sorted(KINDS[kind].glob("*.ipynb")):
        shutil.copyfile(notebook, student_folder / notebook.name)


def time_grading(
    work_dir: Path,
    *,
    students_per_kind: int,
    job_counts: tuple[int, ...],
    warmup: bool,
) -> list[GradingRun]:
    """Grade the same class once per job count; return one run per count.

    With `warmup`, one unsolved student is graded alone first and left out,
    so that the first measured run does not pay alone for reading Python,
    torch and Jupyter from a cold disk cache.

    Raises:
        RuntimeError: if a row is not what the grader should give: every
            exercise passed with full points for a solved student, failed
            with 0 points for an unsolved one.
    """
    from course_lib.grading.submissions import load_exercises

    exercises = load_exercises(REPOSITORY / "exercises")
    submissions = work_dir / "class"
    kinds = build_class(submissions, students_per_kind)

    if warmup:
        warmup_class = work_dir / "warm-up"
        _write_student(warmup_class / "warm-up", "unsolved")
        _grade(
            warmup_class,
            exercises,
            {"warm-up": "unsolved"},
            jobs=1,
            out_dir=work_dir / "warm-up-out",
        )

    return [
        _grade(submissions, exercises, kinds, jobs, work_dir / f"jobs-{jobs}")
        for jobs in job_counts
    ]


def summary_rows(runs: list[GradingRun]) -> list[tuple[str, list[float], str]]:
    """Return (label, one value per student, number format) table rows."""
    rows = []
    for run in runs:
        for kind, values in run.seconds.items():
            label = f"{kind} student, s, {_jobs_text(run.jobs)}"
            rows.append((label, values, "{:.1f}"))
    return rows


def speedup(runs: list[GradingRun], jobs: int) -> float:
    """Return the wall time with 1 job divided by the wall time with `jobs`."""
    by_jobs = {run.jobs: run.wall for run in runs}
    return by_jobs[1] / by_jobs[jobs]


def wall_text(run: GradingRun) -> str:
    """Return the class's wall time and that time divided by its students."""
    return (
        f"{run.wall:.1f} s for {run.students} students, "
        f"{run.wall / run.students:.1f} s per student"
    )


class ProgressLines(logging.Filter):
    """Pass only the grader's start line and its line for each graded student."""

    def filter(self, record: logging.LogRecord) -> bool:
        return str(record.msg).startswith(("grading %d submissions", "graded %s"))


def _grade(
    submissions: Path,
    exercises: list,
    kinds: dict[str, str],
    jobs: int,
    out_dir: Path,
) -> GradingRun:
    from course_lib.grading.command import grade_class
    from course_lib.grading.worker import Limits

    started = time.perf_counter()
    rows = grade_class(
        submissions,
        exercises,
        limits=Limits(),
        jobs=jobs,
        out=out_dir / "grades.csv",
        feedback=out_dir / "feedback",
    )
    wall = time.perf_counter() - started

    _check_rows(rows, kinds, len(exercises))
    seconds: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for name, kind in kinds.items():
        # Every row of a student carries the time of the student's one process.
        student_seconds = [row.seconds for row in rows if row.student == name]
        seconds[kind].append(student_seconds[0])
    return GradingRun(jobs, wall, {k: v for k, v in seconds.items() if v})


def _check_rows(rows: list, kinds: dict[str, str], exercise_count: int) -> None:
    expected = {"solved": "passed", "unsolved": "failed"}
    wrong = []
    for row in rows:
        kind = kinds.get(row.student)
        full = row.exercise.max_points if kind == "solved" else 0
        if (
            kind is None
            or row.status != expected[kind]
            or row.points != full
            or row.seconds is None
        ):
            wrong.append(
                f"{row.student} {row.exercise.label}: {row.status}, "
                f"{row.points} points, {row.seconds} s: {row.reason}"
            )
    if len(rows) != len(kinds) * exercise_count:
        wrong.append(
            f"{len(rows)} rows for {len(kinds)} students and {exercise_count} "
            "exercises"
        )
    if wrong:
        raise RuntimeError(
            "the grader gave rows that do not match the submitted notebooks:\n"
            + "\n".join(wrong)
        )


def _jobs_text(jobs: int) -> str:
    return "1 job" if jobs == 1 else f"{jobs} jobs"

