"""Find each student's notebooks and merge their answers into the released ones.

A submissions folder holds one entry per student: a folder (named for the
student) with that student's exercise notebooks, or a single notebook file
(named for the student, ``alice.ipynb``). Entries whose name starts with a
dot are ignored.

Student files are untrusted input. They are read as bytes with a size limit,
decoded as UTF-8 and parsed as JSON here; nothing in them runs in this
process. A notebook belongs to the exercise whose released cells it shares
(cells are matched by id), whatever its file name says.

Grading merges instead of running the submitted file: the graded notebook is
the released exercise notebook, with its markdown, its check cells and its
kernel, into which only the student's answer cells are copied, matched by
cell id, without their tags, metadata or nbval markers. Edited or deleted
check cells, added NBVAL_SKIP markers, a changed kernelspec and pre-filled
outputs therefore change nothing.
"""

from __future__ import annotations

import ast
import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

NOTEBOOK_SUFFIX = ".ipynb"
MAX_NOTEBOOK_BYTES = 20 * 2**20
ANSWER_TAG = "solution"
CHECK_TAG = "check"
RECORD_FUNCTION = "__record_check__"
PREAMBLE = (
    "# Added by the grader: the check cells below record their results, which\n"
    "# the grader scores in its own process.\n"
    f"from course_lib.grading.kernel import record as {RECORD_FUNCTION}"
)
# The points of each check, by the name after ``checks.check_``.
POINTS = {
    "curve_answers": 2,
    "diagnose": 3,
    "resume": 4,
    "optimizer_explanation": 1,
    "imbalanced_data": 1,
    "positive_class_metrics": 2,
    "evaluate": 2,
    "pathological_run": 1,
    "class_weights": 1,
    "fixed_run": 1,
}
_MARKER_LINE = re.compile(
    r"^[ \t]*#[ \t]*(NBVAL_[A-Z_]+|PYTEST_VALIDATE_IGNORE_OUTPUT)\b.*(\n|$)",
    re.MULTILINE,
)


class ReleaseError(ValueError):
    """A released exercise notebook cannot be used for grading."""


@dataclass
class CheckCell:
    """A check cell of a released notebook: its id, check name and points."""

    cell_id: str
    name: str
    arguments: str
    points: int


@dataclass
class Exercise:
    """A released exercise notebook and what grading needs to know of it."""

    file_name: str
    label: str
    notebook: Any
    answer_ids: list[str]
    checks: list[CheckCell]

    @property
    def max_points(self) -> int:
        return sum(check.points for check in self.checks)

    @property
    def cell_ids(self) -> set[str]:
        return {cell.get("id") for cell in self.notebook.cells if cell.get("id")}


@dataclass
class Outcome:
    """Why an exercise of a student cannot be graded: status and reason."""

    status: str
    reason: str


@dataclass
class Student:
    """One entry of the submissions folder and its notebooks by exercise."""

    name: str
    entry: str
    notebooks: dict[str, tuple[Path, dict]] = field(default_factory=dict)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    folder: Path | None = None


def printable(text: str) -> str:
    """Return `text` with undecodable bytes of a file name shown as U+FFFD.

    Python keeps such bytes as surrogates, which cannot be written as UTF-8.
    """
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def exercise_label(file_name: str) -> str:
    """Return "18.5.1" for "18_5_1_read_the_curves.ipynb"."""
    numbers = re.match(r"^(\d+(?:_\d+)*)", file_name)
    return numbers.group(1).replace("_", ".") if numbers else Path(file_name).stem


def load_exercises(folder: Path) -> list[Exercise]:
    """Read every released exercise notebook in `folder`.

    Raises:
        ReleaseError: if the folder has no notebooks, or a notebook has no
            answer or check cells, or a check cell is not one call of
            ``checks.check_<name>(...)``.
    """
    folder = Path(folder)
    paths = sorted(folder.glob(f"*{NOTEBOOK_SUFFIX}"))
    if not paths:
        raise ReleaseError(
            f"no exercise notebooks in {folder}; pass the folder of the released "
            "exercises with --exercises"
        )
    return [_load_exercise(path) for path in paths]


def _load_exercise(path: Path) -> Exercise:
    notebook = nbformat.read(path, as_version=4)
    answer_ids, checks = [], []
    for index, cell in enumerate(notebook.cells):
        tags = cell.get("metadata", {}).get("tags", [])
        if cell.cell_type != "code":
            continue
        if not cell.get("id"):
            raise ReleaseError(f"{path}, cell {index} has no id; save it with "
                               "nbformat 4.5 or later")
        if ANSWER_TAG in tags:
            answer_ids.append(cell.id)
        elif CHECK_TAG in tags:
            name, arguments = parse_check_call(cell.source, f"{path}, cell {index}")
            checks.append(CheckCell(cell.id, name, arguments, POINTS.get(name, 1)))
    if not answer_ids or not checks:
        raise ReleaseError(
            f"{path} has no cells tagged '{ANSWER_TAG}' or '{CHECK_TAG}'; grading "
            "needs both"
        )
    return Exercise(path.name, exercise_label(path.name), notebook, answer_ids,
                    checks)


def parse_check_call(source: str, where: str) -> tuple[str, str]:
    """Return the check name and argument source of ``checks.check_x(...)``."""
    from .. import checks

    try:
        tree = ast.parse(strip_markers(source))
    except SyntaxError as err:
        raise ReleaseError(f"{where}: the check cell does not parse ({err})") from err
    calls = [node.value for node in tree.body
             if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)]
    if len(tree.body) != 1 or len(calls) != 1:
        raise ReleaseError(f"{where}: a check cell must be one checks.check_x(...) "
                           "call")
    function = calls[0].func
    if not (isinstance(function, ast.Attribute)
            and isinstance(function.value, ast.Name)
            and function.value.id == "checks"
            and function.attr.startswith("check_")
            and function.attr[len("check_"):] in checks.CHECKS):
        raise ReleaseError(f"{where}: the check cell must call checks.check_<name> "
                           f"with a name from {sorted(checks.CHECKS)}")
    arguments = [ast.unparse(arg) for arg in calls[0].args]
    arguments += [f"{kw.arg}={ast.unparse(kw.value)}" for kw in calls[0].keywords]
    return function.attr[len("check_"):], ", ".join(arguments)


def strip_markers(source: str) -> str:
    """Remove nbval's comment markers (``# NBVAL_SKIP`` and the like)."""
    return _MARKER_LINE.sub("", source)


# --- reading one file --------------------------------------------------------


class UnreadableNotebook(ValueError):
    """A submitted file that is not a notebook; the message gives the reason."""


def read_notebook(path: Path, shown: str) -> dict:
    """Read `path` as notebook JSON without running or trusting any of it.

    Raises:
        UnreadableNotebook: with a message that names `shown` (the path as
            the table shows it) and what to resubmit.
    """
    if path.suffix != NOTEBOOK_SUFFIX:
        raise UnreadableNotebook(
            f"{shown} is not a notebook (.ipynb); submit the exercise notebooks "
            "as saved by Jupyter or Colab"
        )
    try:
        size = path.stat().st_size
        data = path.read_bytes() if size <= MAX_NOTEBOOK_BYTES else b""
    except OSError as err:
        raise UnreadableNotebook(
            f"{shown} could not be read ({err.strerror}); check its permissions "
            "and grade again"
        ) from None
    if size > MAX_NOTEBOOK_BYTES:
        raise UnreadableNotebook(
            f"{shown} has {size / 2**20:.0f} MB, more than the "
            f"{MAX_NOTEBOOK_BYTES // 2**20} MB a notebook may have; clear its "
            "outputs and submit it again"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UnreadableNotebook(
            f"{shown} is not valid UTF-8 (byte {data[err.start]:#04x} at offset "
            f"{err.start}); download the notebook again from Jupyter or Colab "
            "and submit that file"
        ) from None
    try:
        notebook = json.loads(text)
    except json.JSONDecodeError as err:
        raise UnreadableNotebook(
            f"{shown} is not valid notebook JSON ({err.msg} at line {err.lineno}, "
            f"column {err.colno}); download the notebook again and submit that "
            "file"
        ) from None
    except RecursionError:
        raise UnreadableNotebook(
            f"{shown} nests its JSON too deeply to be a notebook; submit the .ipynb "
            "file that Jupyter or Colab saves"
        ) from None
    cells = notebook.get("cells") if isinstance(notebook, dict) else None
    if (not isinstance(cells, list)
            or not all(isinstance(cell, dict) for cell in cells)
            or notebook.get("nbformat") != 4):
        raise UnreadableNotebook(
            f"{shown} is JSON but not a Jupyter notebook in format 4 (no list of "
            "cells); submit the .ipynb file that Jupyter or Colab saves"
        )
    return notebook


def _has_id(cell: dict) -> bool:
    return isinstance(cell.get("id"), str) and bool(cell["id"])


def cell_source(cell: dict) -> str | None:
    """Return a cell's source as one string, or None if it is malformed."""
    source = cell.get("source", "")
    if isinstance(source, list) and all(isinstance(part, str) for part in source):
        return "".join(source)
    return source if isinstance(source, str) else None


def identify(notebook: dict, exercises: list[Exercise]) -> Exercise | None:
    """Return the exercise whose released cells the notebook shares most.

    Cells are matched by id. Notebooks whose cells lost their ids (some tools
    write them without) are matched by the released cells' exact sources.
    """
    ids = {cell.get("id") for cell in notebook["cells"] if _has_id(cell)}
    sources = {cell_source(cell) for cell in notebook["cells"]}
    best, best_score = None, 0
    for exercise in exercises:
        released = exercise.notebook.cells
        score = len(ids & exercise.cell_ids)
        if score == 0:
            score = sum(1 for cell in released
                        if cell.source.strip() and cell.source in sources)
        if score > best_score:
            best, best_score = exercise, score
    # A few shared cells (the setup cell of every exercise) prove nothing.
    return best if best_score >= 5 else None


# --- finding the students ----------------------------------------------------


def find_students(folder: Path, exercises: list[Exercise]) -> list[Student]:
    """Return one `Student` per entry of `folder`, with problems recorded.

    Nothing is left out: an entry that cannot be graded gets an `Outcome` for
    every exercise, with the reason.
    """
    entries = sorted(
        (entry for entry in Path(folder).iterdir() if not entry.name.startswith(".")),
        key=lambda entry: entry.name,
    )
    by_name: dict[str, list[Path]] = {}
    for entry in entries:
        name = printable(entry.name if entry.is_dir() else entry.stem)
        by_name.setdefault(name.casefold(), []).append(entry)

    students = []
    for entry in entries:
        name = printable(entry.name if entry.is_dir() else entry.stem)
        shown = printable(entry.name) + ("/" if entry.is_dir() else "")
        student = Student(name=name, entry=shown)
        twins = by_name[name.casefold()]
        if len(twins) > 1:
            others = " and ".join(printable(t.name) + ("/" if t.is_dir() else "")
                                  for t in twins)
            reason = (f"{others} both name the student {name!r}; rename or merge "
                      "them and grade again")
            for exercise in exercises:
                student.outcomes[exercise.file_name] = Outcome("error", reason)
        elif entry.is_symlink():
            reason = f"{shown} is a symbolic link; submit the files themselves"
            for exercise in exercises:
                student.outcomes[exercise.file_name] = Outcome("error", reason)
        elif entry.is_dir():
            student.folder = entry
            try:
                _collect_folder(student, entry, exercises)
            except (OSError, RecursionError) as err:
                student.notebooks.clear()
                reason = (f"{shown} could not be read ({type(err).__name__}); "
                          "flatten or fix the folder and grade again")
                for exercise in exercises:
                    student.outcomes[exercise.file_name] = Outcome("error", reason)
        elif not entry.is_file():
            reason = f"{shown} is not a regular file; submit the notebook itself"
            for exercise in exercises:
                student.outcomes[exercise.file_name] = Outcome("error", reason)
        else:
            _collect_file(student, entry, exercises)
        students.append(student)
    return students


def _collect_file(student: Student, path: Path, exercises: list[Exercise]) -> None:
    try:
        notebook = read_notebook(path, student.entry)
    except UnreadableNotebook as err:
        for exercise in exercises:
            student.outcomes[exercise.file_name] = Outcome("error", str(err))
        return
    exercise = identify(notebook, exercises)
    if exercise is None:
        reason = (f"{student.entry} is not one of the exercise notebooks: it "
                  "shares no cells with them")
        for other in exercises:
            student.outcomes[other.file_name] = Outcome("error", reason)
        return
    student.notebooks[exercise.file_name] = (path, notebook)
    for other in exercises:
        if other is not exercise:
            student.outcomes[other.file_name] = Outcome(
                "missing", f"{student.entry} holds only exercise {exercise.label}"
            )


def _collect_folder(student: Student, folder: Path, exercises: list[Exercise]) -> None:
    by_file_name = {exercise.file_name: exercise for exercise in exercises}
    files = sorted(
        path for path in folder.rglob("*")
        if path.is_file() and not path.is_symlink()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    notebooks = [path for path in files if path.suffix == NOTEBOOK_SUFFIX]
    unusable = []
    # A notebook under its released name comes first, so that a copy such as
    # "18_5_1_read_the_curves-Copy1.ipynb" never replaces it.
    notebooks.sort(key=lambda path: (path.name not in by_file_name, str(path)))
    for path in notebooks:
        shown = printable(f"{student.entry}{path.relative_to(folder)}")
        named = by_file_name.get(path.name)
        try:
            notebook = read_notebook(path, shown)
        except UnreadableNotebook as err:
            if named is not None:
                student.outcomes[named.file_name] = Outcome("error", str(err))
            else:
                unusable.append(str(err))
            continue
        exercise = identify(notebook, exercises)
        if named is not None and exercise is not named:
            what = (f"the notebook of exercise {exercise.label}" if exercise
                    else "a notebook that shares no cells with it")
            student.outcomes[named.file_name] = Outcome(
                "error", f"{shown} is named for exercise {named.label} but holds "
                f"{what}; submit the {named.label} notebook under this name"
            )
            continue
        if exercise is None:
            unusable.append(f"{shown} is not one of the exercise notebooks")
            continue
        if exercise.file_name in student.notebooks:
            first = student.notebooks[exercise.file_name][0]
            if first.name == exercise.file_name:
                student.notes.append(
                    f"{shown} was not graded: {printable(first.name)} is the "
                    f"notebook of exercise {exercise.label}")
                continue
            student.notebooks.pop(exercise.file_name)
            student.outcomes[exercise.file_name] = Outcome(
                "error", f"two notebooks for exercise {exercise.label}: "
                f"{printable(student.entry + str(first.relative_to(folder)))} and "
                f"{shown}; keep one and grade again"
            )
            continue
        if exercise.file_name not in student.outcomes:
            student.notebooks[exercise.file_name] = (path, notebook)

    student.notes += unusable
    for exercise in exercises:
        if exercise.file_name in student.notebooks or (
                exercise.file_name in student.outcomes):
            continue
        if not files:
            reason = f"the folder {student.entry} is empty"
        elif not notebooks:
            found = ", ".join(printable(path.name) for path in files[:3])
            reason = f"no notebook in {student.entry} (found {found})"
        else:
            reason = f"no notebook of exercise {exercise.label} in {student.entry}"
            if unusable:
                reason += f" ({unusable[0]})"
        student.outcomes[exercise.file_name] = Outcome("missing", reason)


# --- merging -----------------------------------------------------------------


def merge(exercise: Exercise, submitted: dict) -> tuple[Any, list[str]]:
    """Return the notebook to run for grading and notes on what was not found.

    The result is the released notebook with the student's answer cells
    copied in and each check cell turned into a call that records its
    result. Cells matched by id; cells without ids by the released cells
    around them.
    """
    graded = copy.deepcopy(exercise.notebook)
    graded.metadata = nbformat.from_dict({
        "kernelspec": exercise.notebook.metadata.get("kernelspec", {}),
        "language_info": {"name": "python"},
    })
    submitted_cells = [cell for cell in submitted["cells"] if isinstance(cell, dict)]
    by_id = {cell["id"]: cell for cell in submitted_cells
             if _has_id(cell) and cell.get("cell_type") == "code"}
    checks = {check.cell_id: check for check in exercise.checks}
    notes = []
    for index, cell in enumerate(graded.cells):
        cell.metadata = nbformat.from_dict({})
        if cell.cell_type != "code":
            continue
        cell.outputs = []
        cell.execution_count = None
        cell.source = strip_markers(cell.source)
        if cell.id in checks:
            check = checks[cell.id]
            cell.source = (f'{RECORD_FUNCTION}("{check.name}", {check.arguments})'
                           if check.arguments else
                           f'{RECORD_FUNCTION}("{check.name}")')
        elif cell.id in exercise.answer_ids:
            answer = by_id.get(cell.id)
            source = cell_source(answer) if answer is not None else _between_anchors(
                exercise.notebook.cells, index, submitted_cells)
            if source is None:
                notes.append(
                    f"answer cell {exercise.answer_ids.index(cell.id) + 1} was not "
                    "found in the notebook, so its unsolved version ran"
                )
            else:
                cell.source = strip_markers(source)
    preamble = nbformat.v4.new_code_cell(PREAMBLE)
    preamble.id = "grader-preamble"
    graded.cells.insert(0, preamble)
    return graded, notes


def _between_anchors(released: list, index: int, submitted: list[dict]) -> str | None:
    """Find an answer by the unchanged released cells just before and after it."""
    sources = [cell_source(cell) for cell in submitted]

    def position(cell) -> int | None:
        matches = [i for i, source in enumerate(sources) if source == cell.source]
        return matches[0] if len(matches) == 1 else None

    before = position(released[index - 1]) if index > 0 else None
    after = position(released[index + 1]) if index + 1 < len(released) else None
    if before is None or after is None or after <= before + 1:
        return None
    code = [sources[i] for i in range(before + 1, after)
            if submitted[i].get("cell_type") == "code" and sources[i] is not None]
    return "\n\n".join(code) if code else None
