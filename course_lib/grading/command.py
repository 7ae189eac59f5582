"""``python -m course_lib grade SUBMISSIONS --out grades.csv``.

Grades every student in SUBMISSIONS against the released notebooks in
exercises/, several students at a time, and writes the grade table, one
feedback file per student (next to the table, in ``feedback/``) and a
summary on the terminal.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .scoring import Row
    from .submissions import Exercise, Student
    from .worker import Limits

logger = logging.getLogger(__name__)


def _positive(kind):
    """Return an argparse type for numbers of `kind` above 0."""
    accepted = "an integer above 0" if kind is int else "a number above 0"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {accepted}, got {text!r}") from None
        # "not value > 0" also rejects nan.
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be {accepted}, got {text}")
        return value

    return parse


def add_parser(commands) -> argparse.ArgumentParser:
    """Add the ``grade`` subcommand to the CLI's subparsers."""
    parser = commands.add_parser(
        "grade",
        help="grade a folder of students' exercise notebooks",
        description="Grade each student's exercise notebooks: their answer cells "
        "run inside the released notebooks, one student per process, and the "
        "checks are scored in this process.",
    )
    parser.add_argument("submissions", type=Path,
                        help="folder with one subfolder or notebook per student")
    parser.add_argument("--out", type=Path, default=Path("grades.csv"),
                        help="the grade table to write (default: grades.csv)")
    parser.add_argument("--feedback", type=Path, default=None,
                        help="folder for one feedback file per student (default: "
                        "feedback/ next to --out)")
    parser.add_argument("--exercises", type=Path, default=Path("exercises"),
                        help="folder of the released exercise notebooks "
                        "(default: exercises)")
    parser.add_argument("--jobs", type=_positive(int), default=None,
                        help="students graded at once (default: the number of CPU "
                        "cores, at most 8)")
    parser.add_argument("--cell-timeout", type=_positive(float), default=300.0,
                        help="seconds one cell may run (default: 300)")
    parser.add_argument("--notebook-timeout", type=_positive(float), default=900.0,
                        help="seconds one notebook may run in all (default: 900)")
    parser.add_argument("--memory-limit", type=_positive(float), default=4.0,
                        help="GiB of memory that each process of a student (the "
                        "kernel and every process it starts) may allocate "
                        "(default: 4)")
    parser.add_argument("--keep-scratch", action="store_true",
                        help="keep the scratch folders of the students' runs and "
                        "print where they are")
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run the ``grade`` subcommand; return the exit status."""
    try:
        from .submissions import ReleaseError, load_exercises
        from .worker import Limits
    except ImportError as err:
        logger.error("error: grading needs nbformat, nbval and pytest (%s); install "
                     "them with pip install 'course-lib[grading]'", err)
        return 2
    if not args.submissions.is_dir():
        logger.error("error: submissions folder %s not found; pass a folder with one "
                     "subfolder or notebook per student", args.submissions)
        return 2
    try:
        exercises = load_exercises(args.exercises)
    except (ReleaseError, OSError) as err:
        logger.error("error: %s", err)
        return 2
    limits = Limits(cell_timeout=args.cell_timeout,
                    notebook_timeout=args.notebook_timeout,
                    memory_bytes=int(args.memory_limit * 2**30))
    jobs = args.jobs or min(os.cpu_count() or 1, 8)
    feedback = args.feedback or args.out.parent / "feedback"
    # Find out now, not after an hour of grading, that the results cannot be saved.
    if args.out.is_dir():
        logger.error("error: --out %s is a folder; pass the path of the CSV file to "
                     "write, such as grades.csv", args.out)
        return 2
    submissions = args.submissions.resolve()
    for path, option in ((args.out, "--out"), (feedback, "--feedback")):
        if path.resolve().is_relative_to(submissions):
            logger.error("error: %s %s is inside the submissions folder, where it "
                         "would be graded as a student; pass a path outside %s",
                         option, path, args.submissions)
            return 2
    for folder, option in ((args.out.parent, "--out"), (feedback, "--feedback")):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            logger.error("error: cannot create %s (%s); pass another %s", folder,
                         err.strerror, option)
            return 2
        if not os.access(folder, os.W_OK):
            logger.error("error: %s is not writable; pass another %s", folder, option)
            return 2
    rows = grade_class(args.submissions, exercises, limits=limits, jobs=jobs,
                       out=args.out, feedback=feedback,
                       keep_scratch=args.keep_scratch)
    logger.info("grade table: %s; feedback: %s", args.out, feedback)
    return 0 if rows else 1


def grade_class(
    submissions: Path,
    exercises: list[Exercise],
    *,
    limits: Limits,
    jobs: int,
    out: Path,
    feedback: Path,
    keep_scratch: bool = False,
) -> list[Row]:
    """Grade every student in `submissions`; write the table and feedback.

    Returns:
        The rows of the table, students in the order of their entries.
    """
    from .scoring import feedback_name, feedback_text, summary_lines, write_table
    from .submissions import find_students

    started = time.monotonic()
    students = find_students(submissions, exercises)
    scratch = Path(tempfile.mkdtemp(prefix="course-grade-"))
    logger.info("grading %d submission%s, %d at a time, in %s", len(students),
                "" if len(students) == 1 else "s", jobs, scratch)
    possible = sum(exercise.max_points for exercise in exercises)
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {
                pool.submit(_grade_student, student, exercises, limits,
                            scratch / f"{number:04d}"): student
                for number, student in enumerate(students)
            }
            by_student = {}
            for future in as_completed(futures):
                student, rows = futures[future], future.result()
                by_student[id(student)] = rows
                seconds = next((row.seconds for row in rows if row.seconds), 0.0)
                logger.info("graded %s: %d of %d points (%.0f s)", student.entry,
                            sum(row.points for row in rows), possible, seconds)
            graded = [(student, by_student[id(student)]) for student in students]
    finally:
        if keep_scratch:
            logger.info("scratch folders kept in %s", scratch)
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    rows = [row for _, student_rows in graded for row in student_rows]
    write_table(rows, out)
    feedback.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    for student, student_rows in graded:
        name = feedback_name(student, taken)
        (feedback / name).write_text(feedback_text(student, student_rows),
                                     encoding="utf-8")
    for line in summary_lines(rows, exercises, time.monotonic() - started, jobs):
        logger.info("%s", line)
    return rows


def _grade_student(student: Student, exercises: list[Exercise], limits: Limits,
                   root: Path) -> list[Row]:
    """Merge, run and score one student's notebooks.

    A failure in merging, running or scoring becomes an error row of this
    student, so the other students are still graded.
    """
    from .scoring import outcome_row, score_notebook
    from .submissions import Outcome, merge
    from .worker import WorkerResult, run_student

    merged, notes = {}, {}
    for exercise in exercises:
        if exercise.file_name not in student.notebooks:
            continue
        _, submitted = student.notebooks[exercise.file_name]
        try:
            merged[exercise.file_name], notes[exercise.file_name] = merge(
                exercise, submitted)
        except Exception as err:  # noqa: BLE001 - the notebook is student input
            logger.exception("merging %s of %s failed", exercise.label,
                             student.entry)
            student.outcomes[exercise.file_name] = Outcome(
                "error", f"the answer cells could not be copied into the released "
                f"notebook ({type(err).__name__}); resubmit the notebook as saved "
                "by Jupyter")
    worker = None
    if merged:
        try:
            worker = run_student(root, student.folder, merged, limits)
        except Exception as err:  # noqa: BLE001 - one student's row, not the run
            logger.exception("grading %s failed", student.entry)
            worker = WorkerResult([], False, False, None, 0.0,
                                  f"{type(err).__name__}: {err}", root / "work")
    rows = []
    for exercise in exercises:
        if exercise.file_name not in merged:
            rows.append(outcome_row(student, exercise,
                                    student.outcomes[exercise.file_name]))
            continue
        try:
            rows.append(score_notebook(student, exercise, worker,
                                       notes[exercise.file_name]))
        except Exception as err:  # noqa: BLE001 - the records come from student code
            logger.exception("scoring %s of %s failed", exercise.label,
                             student.entry)
            reason = (f"the grading records of this notebook could not be read "
                      f"({type(err).__name__}); grade the student again")
            rows.append(outcome_row(student, exercise, Outcome("error", reason)))
    return rows
