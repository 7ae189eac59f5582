"""The grade command, end to end on a class of submissions, and its parts.

The class (tests/grading_class.py) is graded once by a real
``python -m course_lib grade`` process, two students at a time, with real
kernels; every row of its table is asserted. The faster tests below check
the merging, the reading of bad files, the scoring of forged results and the
nbval plugin on small notebooks.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest

from course_lib import cli
from course_lib.grading import submissions
from course_lib.grading.scoring import (
    feedback_text,
    outcome_row,
    score_notebook,
    write_table,
)
from course_lib.grading.worker import Limits, WorkerResult, run_student

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grading_class as klass  # noqa: E402

LABELS = list(klass.LABELS.values())
# Ten times what the slowest check cell (the kill-and-resume trial) takes on an
# idle 2-core machine, for runs on a loaded one.
CELL_TIMEOUT = 120


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*")) if path.is_file()
    }


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("grading")
    class_dir = klass.build_class(root / "class")
    before = _snapshot(class_dir)
    scratch = root / "tmp"
    scratch.mkdir()
    env = {**os.environ, klass.SECRET_NAME: klass.SECRET_VALUE, "TMPDIR": str(scratch),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = root / "out" / "grades.csv"
    process = subprocess.run(
        [sys.executable, "-m", "course_lib", "grade", str(class_dir), "--out",
         str(out), "--exercises", str(klass.EXERCISES), "--jobs", "2",
         "--cell-timeout", str(CELL_TIMEOUT), "--notebook-timeout", "600",
         "--memory-limit", "2"],
        capture_output=True, text=True, env=env, cwd=root, timeout=1800,
    )
    with open(out, encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    return SimpleNamespace(root=root, class_dir=class_dir, before=before,
                           process=process, rows=rows, out=out,
                           feedback=out.parent / "feedback", scratch=scratch)


# --- the class, end to end -------------------------------------------------


@pytest.mark.slow
def test_every_row_of_the_class(graded):
    assert graded.process.returncode == 0, graded.process.stderr[-3000:]
    table = {(row["student"], row["exercise"]): row for row in graded.rows}

    assert len(graded.rows) == len(table) == len(klass.STUDENTS) * len(LABELS)
    for student in klass.STUDENTS:
        for label in LABELS:
            row = table[(student, label)]
            status, points, words = klass.EXPECTED.get(
                (student, label), ("missing", 0, f"no notebook of exercise {label}"))
            got = (row["status"], int(row["points"]))
            assert got == (status, points), (student, label, row["reason"])
            assert words in row["reason"], (student, label, row["reason"])
            maximum = {"18.5.1": 5, "18.5.2": 5, "18.5.3": 9}[label]
            assert int(row["max_points"]) == maximum


@pytest.mark.slow
def test_summary_names_every_student(graded):
    lines = graded.process.stdout.splitlines()

    for student in klass.STUDENTS:
        assert any(line.startswith(student + " ") for line in lines), student
    assert "rows: 6 passed, 12 failed, 13 error, 1 timed out, 40 missing" in lines
    assert any(line.startswith(f"graded {len(klass.STUDENTS)} submissions")
               for line in lines)


@pytest.mark.slow
def test_feedback_file_per_student(graded):
    files = sorted(path.name for path in graded.feedback.iterdir())

    assert len(files) == len(klass.STUDENTS)
    solved = (graded.feedback / "solved.md").read_text("utf-8")
    assert solved.count("passed.") == 11
    assert "Points: 19 of 19." in solved
    infinite = (graded.feedback / "infinite_loop.md").read_text("utf-8")
    limit = f"answer cell 2 ran past the cell time limit of {CELL_TIMEOUT} s"
    assert limit in infinite


@pytest.mark.slow
def test_secrets_are_cleared(graded):
    fake = (graded.feedback / "fake_passed.md").read_text("utf-8")

    assert "condition 'cleared' is not one of" in fake
    everything = [graded.process.stdout, graded.process.stderr,
                  graded.out.read_text("utf-8")]
    everything += [path.read_text("utf-8") for path in graded.feedback.iterdir()]
    assert not any(klass.SECRET_VALUE in text for text in everything)


@pytest.mark.slow
def test_submissions_untouched_and_nothing_left(graded):
    assert _snapshot(graded.class_dir) == graded.before
    assert list(graded.scratch.iterdir()) == []
    leftovers = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(graded.scratch) in text:
            leftovers.append(text)
    assert leftovers == []


# --- merging -----------------------------------------------------------------


@pytest.fixture(scope="module")
def exercises():
    return {exercise.file_name: exercise
            for exercise in submissions.load_exercises(klass.EXERCISES)}


def test_merge_ignores_tampering(exercises):
    exercise = exercises[klass.CURVES]
    graded, notes = submissions.merge(exercise, klass._tampered())

    assert notes == []
    assert graded.cells[0].source == submissions.PREAMBLE
    released = [cell for cell in exercise.notebook.cells]
    assert len(graded.cells) == len(released) + 1
    for cell, original in zip(graded.cells[1:], released):
        assert cell.metadata == {}
        if cell.cell_type != "code":
            assert cell.source == original.source
            continue
        assert cell.outputs == []
        assert "NBVAL" not in cell.source
        if cell.id in exercise.answer_ids:
            assert cell.source == submissions.strip_markers(original.source)
    checks = {check.cell_id: check for check in exercise.checks}
    diagnose = next(cell for cell in graded.cells if cell.id == klass.DIAGNOSE_CHECK)
    assert diagnose.source == '__record_check__("diagnose", diagnose)'
    assert checks[klass.CURVE_CHECK].points == 2
    assert graded.metadata.kernelspec == exercise.notebook.metadata.kernelspec


def test_merge_finds_answers_without_cell_ids(exercises):
    exercise = exercises[klass.CURVES]
    solved = klass.solved(klass.CURVES)
    answers = {cell["id"]: "".join(cell["source"]) for cell in solved["cells"]}

    graded, notes = submissions.merge(exercise, klass._without_ids(solved))

    assert notes == []
    for cell_id in exercise.answer_ids:
        cell = next(cell for cell in graded.cells if cell.get("id") == cell_id)
        assert cell.source == answers[cell_id]


def test_merge_notes_a_deleted_answer(exercises):
    exercise = exercises[klass.CURVES]
    notebook = klass.solved(klass.CURVES)
    notebook["cells"] = [cell for cell in notebook["cells"]
                         if cell.get("id") != klass.DIAGNOSE]

    graded, notes = submissions.merge(exercise, notebook)

    assert notes == ["answer cell 2 was not found in the notebook, so its unsolved "
                     "version ran"]
    cell = next(cell for cell in graded.cells if cell.id == klass.DIAGNOSE)
    assert "NotImplementedError" in cell.source


def test_merge_ignores_malformed_cells(exercises):
    notebook = klass.solved(klass.CURVES)
    notebook["cells"].insert(0, {"id": ["not", "a", "string"], "cell_type": "code",
                                 "source": 42})
    notebook["cells"].insert(0, {"id": klass.DIAGNOSE, "cell_type": "markdown",
                                 "source": "def diagnose(history): pass"})

    graded, notes = submissions.merge(exercises[klass.CURVES], notebook)

    assert notes == []
    cell = next(cell for cell in graded.cells if cell.id == klass.DIAGNOSE)
    assert "def falls(values)" in cell.source


@pytest.mark.parametrize("content, words", [
    (b"[1, 2]", "not a Jupyter notebook"),
    (b'{"cells": [], "nbformat": 3}', "not a Jupyter notebook"),
    (b'{"cells": "none", "nbformat": 4}', "not a Jupyter notebook"),
    (b'{"cells": [', "not valid notebook JSON"),
    (b"\xff\xfe{}", "not valid UTF-8 (byte 0xff at offset 0)"),
    (b"[" * 100_000, "nests its JSON too deeply"),
])
def test_unreadable_notebooks_named(tmp_path, content, words):
    path = tmp_path / "work.ipynb"
    path.write_bytes(content)

    with pytest.raises(submissions.UnreadableNotebook, match="^shown/work.ipynb") as err:
        submissions.read_notebook(path, "shown/work.ipynb")
    assert words in str(err.value)


def test_oversized_notebook_refused(tmp_path):
    path = tmp_path / "big.ipynb"
    path.write_bytes(b" " * (submissions.MAX_NOTEBOOK_BYTES + 1))

    with pytest.raises(submissions.UnreadableNotebook, match="clear its outputs"):
        submissions.read_notebook(path, "big.ipynb")


def test_identify_by_content_not_name(exercises):
    lesson = json.loads((klass.ROOT / "notebooks" / "01_five_step_core.ipynb").read_text("utf-8"))

    found = submissions.identify(klass.unsolved(klass.RESUME), list(exercises.values()))

    assert found.file_name == klass.RESUME
    assert submissions.identify(lesson, list(exercises.values())) is None


def test_release_without_checks_refused(tmp_path):
    notebook = nbformat.read(klass.EXERCISES / klass.CURVES, as_version=4)
    for cell in notebook.cells:
        cell.metadata.pop("tags", None)
    nbformat.write(notebook, tmp_path / klass.CURVES)

    with pytest.raises(submissions.ReleaseError, match="no cells tagged"):
        submissions.load_exercises(tmp_path)


# --- scoring forged results ------------------------------------------------


def _worker(cells, work_dir) -> WorkerResult:
    return WorkerResult(cells=cells, finished=True, timed_out=False, returncode=0,
                        seconds=1.0, log_tail="", work_dir=work_dir)


def _record(cell_id, payload, outcome="passed", reply="ok") -> dict:
    return {"notebook": klass.CURVES, "cell": 1, "cell_id": cell_id,
            "outcome": outcome, "reply_status": reply, "timed_out": False,
            "check_result": payload if isinstance(payload, str) or payload is None
            else json.dumps(payload)}


CORRECT_ANSWERS = {
    "a": {"condition": "underfitting", "fix": "use a larger model", "lesson": 6},
    "b": {"condition": "overfitting",
          "fix": "stop early and keep the best checkpoint", "lesson": 3},
    "c": {"condition": "undertraining", "fix": "train for more epochs", "lesson": 6},
    "d": {"condition": "instability", "fix": "lower the learning rate", "lesson": 6},
}


@pytest.mark.parametrize("record, words", [
    (_record(klass.CURVE_CHECK, "{not json"), "not valid JSON"),
    (_record(klass.CURVE_CHECK, {"check": "diagnose", "result": {}}),
     "belongs to another check"),
    (_record(klass.CURVE_CHECK, {"check": "curve_answers", "result": {}}),
     "could not be scored (KeyError"),
    (_record(klass.CURVE_CHECK, {"check": "curve_answers",
                                 "result": {"answers": CORRECT_ANSWERS}},
             outcome="failed", reply="error"), "ended with an error"),
    (_record(klass.CURVE_CHECK, None), "recorded no result"),
])
def test_forged_or_broken_results_fail(exercises, tmp_path, record, words):
    student = submissions.Student(name="x", entry="x/")
    row = score_notebook(student, exercises[klass.CURVES],
                         _worker([record], tmp_path), [])

    first = row.checks[0]
    assert (first.status, first.points) == ("failed", 0)
    assert words in first.message


def test_result_scored_in_grader(exercises, tmp_path):
    student = submissions.Student(name="x", entry="x/")
    record = _record(klass.CURVE_CHECK, {"check": "curve_answers",
                                         "result": {"answers": CORRECT_ANSWERS}})

    row = score_notebook(student, exercises[klass.CURVES], _worker([record], tmp_path),
                         [])

    assert (row.checks[0].status, row.checks[0].points) == ("passed", 2)
    assert row.checks[1].message == "the check cell did not run"
    assert (row.status, row.points) == ("failed", 2)


def test_resume_weights_outside_scratch_refused(exercises, tmp_path):
    outside = tmp_path / "elsewhere.pt"
    outside.write_bytes(b"x")
    run = {"returncode": 0, "timed_out": False, "events": [], "weights": str(outside),
           "stderr_tail": ""}
    result = {"epochs": 6, "kill_epoch": 4, "kill_step": 3, "last_pt": {},
              "runs": {"uninterrupted": run, "killed": run, "resumed": run}}
    check = exercises[klass.RESUME].checks[0]
    record = {"notebook": klass.RESUME, "cell": 5, "cell_id": check.cell_id,
              "outcome": "passed", "reply_status": "ok", "timed_out": False,
              "check_result": json.dumps({"check": "resume", "result": result})}
    work = tmp_path / "work"
    work.mkdir()

    row = score_notebook(submissions.Student(name="x", entry="x/"),
                         exercises[klass.RESUME], _worker([record], work), [])

    assert row.checks[0].status == "failed"
    assert "cannot be compared" in row.checks[0].message


# --- the worker and its nbval plugin ------------------------------------------


def _notebook(*sources: str):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    notebook.metadata.kernelspec = {"name": "python3", "display_name": "Python 3",
                                    "language": "python"}
    return notebook


def _by_notebook(result: WorkerResult) -> dict[str, list[dict]]:
    cells: dict[str, list[dict]] = {}
    for record in result.cells:
        cells.setdefault(record["notebook"], []).append(record)
    return cells


@pytest.mark.slow
def test_worker_catches_what_nbval_misses(tmp_path):
    notebooks = {
        "hidden.ipynb": _notebook(
            "get_ipython().showtraceback = lambda *args, **kwargs: None",
            "raise ValueError('no traceback shown')",
            "print('after')",
        ),
        "dies.ipynb": _notebook("import os\nos._exit(1)", "print('never')"),
        "loud.ipynb": _notebook("for _ in range(8):\n    print('y' * 2**20)",
                                "print('quiet')"),
    }

    result = run_student(tmp_path / "a", None, notebooks,
                         Limits(cell_timeout=60, notebook_timeout=120,
                                memory_bytes=2 * 2**30))
    cells = _by_notebook(result)

    assert result.finished and not result.timed_out
    hidden = cells["hidden.ipynb"]
    assert [c["outcome"] for c in hidden] == ["passed", "failed", "passed"]
    assert hidden[1]["reply_status"] == "error"
    dies = cells["dies.ipynb"]
    assert dies[0]["kernel_died"] and dies[0]["seconds"] < 30
    assert (dies[1]["outcome"], dies[1]["stopped_by"]) == ("not run", "kernel died")
    loud = cells["loud.ipynb"]
    assert loud[0]["output_dropped"] and loud[0]["outcome"] == "passed"
    assert not loud[1]["output_dropped"]


@pytest.mark.slow
def test_worker_stops_after_a_timeout(tmp_path):
    notebooks = {"loop.ipynb": _notebook("x = 1", "while True:\n    pass",
                                         "print('never')")}

    result = run_student(tmp_path / "a", None, notebooks,
                         Limits(cell_timeout=3, notebook_timeout=60))
    cells = result.cells

    assert [c["outcome"] for c in cells] == ["passed", "failed", "not run"]
    assert cells[1]["timed_out"] and cells[1]["time_limit"] == 3
    assert cells[2]["stopped_by"] == "timed out"


@pytest.mark.slow
def test_worker_stops_at_notebook_limit(tmp_path):
    sleep = "import time\ntime.sleep(4)"
    notebooks = {"slow.ipynb": _notebook(*[sleep] * 6)}

    result = run_student(tmp_path / "a", None, notebooks,
                         Limits(cell_timeout=60, notebook_timeout=14))
    cells = result.cells
    cut = [index for index, cell in enumerate(cells) if cell["timed_out"]]

    assert len(cells) == 6
    assert len(cut) == 1
    assert cells[cut[0]]["notebook_time_limit"]
    assert cells[cut[0]]["time_limit"] < 14
    after = cells[cut[0] + 1:]
    assert after and all(cell["outcome"] == "not run" for cell in after)
    assert all(cell["stopped_by"] == "timed out" for cell in after)


@pytest.mark.slow
def test_by_hand_nbval_lax_run_fails_unsolved(tmp_path):
    target = tmp_path / klass.CURVES
    target.write_bytes((klass.EXERCISES / klass.CURVES).read_bytes())

    process = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider",
         "-o", "addopts=", "--nbval-current-env", str(target)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )

    assert process.returncode == 1
    assert "ExerciseIncomplete" in process.stdout


# --- the command line ----------------------------------------------------------


def test_missing_submissions_folder(tmp_path, capsys):
    status = cli.main(["grade", str(tmp_path / "nowhere"), "--out",
                       str(tmp_path / "grades.csv")])

    assert status == 2
    assert "submissions folder" in capsys.readouterr().out


def test_exercises_folder_without_notebooks(tmp_path, capsys):
    status = cli.main(["grade", str(tmp_path), "--exercises", str(tmp_path),
                       "--out", str(tmp_path / "grades.csv")])

    assert status == 2
    assert "no exercise notebooks" in capsys.readouterr().out


def test_unwritable_table_rejected_before_grading(tmp_path, capsys):
    status = cli.main(["grade", str(tmp_path), "--exercises", str(klass.EXERCISES),
                       "--out", "/proc/no-such-folder/grades.csv"])

    assert status == 2
    assert "pass another --out" in capsys.readouterr().out


@pytest.mark.parametrize("option", ["--jobs=0", "--cell-timeout=-1",
                                    "--memory-limit=nan"])
def test_bad_limits_rejected(tmp_path, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["grade", str(tmp_path), option])

    assert exit_info.value.code == 2
    assert option.split("=")[0] in capsys.readouterr().err


# --- odd submissions folders -------------------------------------------------


def test_undecodable_folder_name_graded_and_written(exercises, tmp_path):
    submitted = tmp_path / "class"
    folder = Path(os.fsdecode(bytes(submitted) + b"/j\xfcrgen"))
    folder.mkdir(parents=True)

    students = submissions.find_students(submitted, list(exercises.values()))
    rows = [outcome_row(students[0], exercise, students[0].outcomes[name])
            for name, exercise in exercises.items()]
    write_table(rows, tmp_path / "grades.csv")

    assert students[0].name == "j\ufffdrgen"
    assert "j\ufffdrgen" in (tmp_path / "grades.csv").read_text("utf-8")
    assert feedback_text(students[0], rows).startswith("# Feedback for j\ufffdrgen")


def test_fifo_entry_is_an_error_row(exercises, tmp_path):
    os.mkfifo(tmp_path / "pipe.ipynb")

    student, = submissions.find_students(tmp_path, list(exercises.values()))

    assert {outcome.status for outcome in student.outcomes.values()} == {"error"}
    assert "not a regular file" in student.outcomes[klass.CURVES].reason


def test_deeply_nested_folder_is_an_error_row(exercises, tmp_path):
    deep = tmp_path / "deep"
    deep.mkdir()
    os.chdir(deep)
    try:
        for _ in range(1200):
            os.mkdir("d")
            os.chdir("d")
    finally:
        os.chdir(tmp_path)

    try:
        student, = submissions.find_students(tmp_path, list(exercises.values()))
    finally:
        _remove_chain(deep)

    assert student.outcomes[klass.CURVES].status == "error"
    assert "could not be read" in student.outcomes[klass.CURVES].reason


def _remove_chain(top: Path) -> None:
    # shutil.rmtree recurses once per level and fails on this depth, as would
    # pytest's own clean-up of tmp_path, so the chain is removed from the bottom.
    os.chdir(top)
    depth = 0
    while os.path.isdir("d"):
        os.chdir("d")
        depth += 1
    for _ in range(depth):
        os.chdir("..")
        os.rmdir("d")
    os.chdir(top.parent)
    os.rmdir(top)


def test_notebook_copy_does_not_replace_original(exercises, tmp_path):
    folder = tmp_path / "alice"
    folder.mkdir()
    klass._write(klass.solved(klass.CURVES), folder / klass.CURVES)
    klass._write(klass.unsolved(klass.CURVES),
                 folder / "18_5_1_read_the_curves-Copy1.ipynb")

    student, = submissions.find_students(tmp_path, list(exercises.values()))

    assert student.notebooks[klass.CURVES][0] == folder / klass.CURVES
    assert klass.CURVES not in student.outcomes
    assert "Copy1.ipynb was not graded" in student.notes[0]


@pytest.mark.parametrize("out", ["folder", "inside"])
def test_bad_output_paths_rejected_before_grading(tmp_path, capsys, out):
    (tmp_path / "class").mkdir()
    (tmp_path / "folder").mkdir()
    target = {"folder": tmp_path / "folder",
              "inside": tmp_path / "class" / "grades.csv"}[out]

    status = cli.main(["grade", str(tmp_path / "class"), "--exercises",
                       str(klass.EXERCISES), "--out", str(target)])

    assert status == 2
    assert "error: --out" in capsys.readouterr().out
