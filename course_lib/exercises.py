"""Generate the student notebooks in exercises/ from the solved ones in solutions/.

A solution notebook marks what the student writes:

- A code cell tagged ``solution`` (cell metadata ``tags``) may contain regions
  between the lines ``# BEGIN SOLUTION: <what to write>`` and
  ``# END SOLUTION``. Each region becomes a stub with the same indentation::

      # YOUR CODE HERE
      raise NotImplementedError("<what to write>")

- A code cell tagged ``solution`` without regions is replaced as a whole. Its
  leading comment lines stay and form the stub's message, so such a cell must
  start with a comment that states what to write.
- A markdown cell tagged ``solution`` (a model answer or solution notes) is
  left out of the exercise.

Every exercise cell loses its outputs and execution count, and the Colab badge
points to exercises/ instead of solutions/. Untagged cells are copied as they
are.

``python -m course_lib exercises`` writes the exercise notebooks that are
missing. It exits with status 2 and changes nothing if it would overwrite a
notebook whose text differs from the generated one or delete a notebook that
has no solution, because such a notebook may hold a student's work.
``--force`` overwrites and deletes them, which is how exercises/ is regenerated
after a solution changes.
``python -m course_lib exercises --check`` exits with status 1 when exercises/
differs from what the generator would write.
"""

from __future__ import annotations

import argparse
import copy
import logging
import re
import textwrap
from pathlib import Path

logger = logging.getLogger(__name__)

SOLUTION_TAG = "solution"
STUB_COMMENT = "# YOUR CODE HERE"
_BEGIN = re.compile(r"^(?P<indent>[ \t]*)# BEGIN SOLUTION(?::[ \t]*(?P<hint>.*))?$")
_END = re.compile(r"^[ \t]*# END SOLUTION[ \t]*$")
_BADGE_PATH = ("/blob/main/solutions/", "/blob/main/exercises/")
_HINT_WIDTH = 64


class ExerciseSourceError(ValueError):
    """A solution notebook's markers cannot be turned into an exercise."""


class ExerciseOverwriteError(RuntimeError):
    """Error raised when writing exercises would replace or delete notebooks.

    `differing` names the exercise files whose text differs from the generated
    one, and `orphans` the notebooks that have no solution notebook.
    """

    def __init__(self, message: str, differing: list[str], orphans: list[str]):
        super().__init__(message)
        self.differing = differing
        self.orphans = orphans


def stub_lines(indent: str, hint: str) -> list[str]:
    """Return the lines that replace one solution region."""
    message = hint.strip().rstrip(".") + "."
    chunks = textwrap.wrap(message, _HINT_WIDTH, break_on_hyphens=False) or [message]
    # Each chunk but the last keeps a trailing space, so that the implicit
    # concatenation of the string literals gives the message back.
    chunks = [chunk + " " for chunk in chunks[:-1]] + chunks[-1:]
    if len(chunks) == 1:
        return [f"{indent}{STUB_COMMENT}",
                f"{indent}raise NotImplementedError({chunks[0]!r})"]
    lines = [f"{indent}{STUB_COMMENT}", f"{indent}raise NotImplementedError("]
    lines += [f"{indent}    {chunk!r}" for chunk in chunks]
    lines.append(f"{indent})")
    return lines


def strip_regions(source: str, where: str) -> str:
    """Replace every BEGIN/END SOLUTION region of `source` with a stub.

    Raises:
        ExerciseSourceError: for a region without a message, a nested or
            unclosed region, or an END without a BEGIN; `where` names the
            notebook and cell in the message.
    """
    output: list[str] = []
    open_region: re.Match | None = None
    for number, line in enumerate(source.splitlines(), start=1):
        begin, end = _BEGIN.match(line), _END.match(line)
        if begin:
            if open_region is not None:
                raise ExerciseSourceError(
                    f"{where}, line {number}: BEGIN SOLUTION inside another region; "
                    "close the first region with # END SOLUTION"
                )
            if not (begin.group("hint") or "").strip():
                raise ExerciseSourceError(
                    f"{where}, line {number}: BEGIN SOLUTION needs a message, as in "
                    "'# BEGIN SOLUTION: return the F1 of class 1'"
                )
            open_region = begin
        elif end:
            if open_region is None:
                raise ExerciseSourceError(
                    f"{where}, line {number}: END SOLUTION without a BEGIN SOLUTION"
                )
            output += stub_lines(open_region.group("indent"), open_region.group("hint"))
            open_region = None
        elif open_region is None:
            output.append(line)
    if open_region is not None:
        raise ExerciseSourceError(
            f"{where}: a BEGIN SOLUTION region is never closed; add # END SOLUTION"
        )
    return "\n".join(output)


def has_regions(source: str) -> bool:
    return any(_BEGIN.match(line) for line in source.splitlines())


def strip_whole_cell(source: str, where: str) -> str:
    """Replace a tagged cell without regions, keeping its leading comments."""
    lines = source.splitlines()
    kept = []
    for line in lines:
        if line.startswith("%%") or line.startswith("#"):
            kept.append(line)
        else:
            break
    hint = " ".join(
        line.lstrip("#").strip() for line in kept
        if line.startswith("#") and not line.startswith("%%")
        and "NBVAL" not in line
    )
    if not hint:
        raise ExerciseSourceError(
            f"{where}: a cell tagged '{SOLUTION_TAG}' without BEGIN/END SOLUTION "
            "regions must start with a comment saying what to write"
        )
    return "\n".join(kept + stub_lines("", hint))


def make_exercise(notebook, name: str = "notebook"):
    """Return the exercise version of a solution notebook (an nbformat node).

    Raises:
        ExerciseSourceError: if the notebook has no solution cells, or a
            region marker is misplaced.
    """
    exercise = copy.deepcopy(notebook)
    # Widget state saved by an executed solution would reveal the solution.
    exercise.metadata.pop("widgets", None)
    cells = []
    solution_cells = 0
    for index, cell in enumerate(exercise.cells):
        where = f"{name}, cell {index}"
        tagged = SOLUTION_TAG in cell.get("metadata", {}).get("tags", [])
        solution_cells += tagged
        if cell.cell_type == "markdown":
            if tagged:
                continue
            cell.source = cell.source.replace(*_BADGE_PATH)
        elif cell.cell_type == "code":
            if has_regions(cell.source) and not tagged:
                raise ExerciseSourceError(
                    f"{where} has BEGIN SOLUTION regions but no '{SOLUTION_TAG}' tag; "
                    "tag the cell so that readers of the solution see which cells "
                    "change"
                )
            if tagged:
                cell.source = (strip_regions(cell.source, where)
                               if has_regions(cell.source)
                               else strip_whole_cell(cell.source, where))
            cell.outputs = []
            cell.execution_count = None
            cell.metadata.pop("execution", None)
        cells.append(cell)
    if not solution_cells:
        raise ExerciseSourceError(
            f"{name} has no cells tagged '{SOLUTION_TAG}', so its exercise would be "
            "the solution itself"
        )
    exercise.cells = cells
    return exercise


def render_exercises(solutions_dir: Path) -> dict[str, str]:
    """Return the text of every exercise notebook, keyed by file name."""
    import nbformat

    rendered = {}
    for path in sorted(Path(solutions_dir).glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        exercise = make_exercise(notebook, name=str(path))
        rendered[path.name] = nbformat.writes(exercise) + "\n"
    return rendered


def compare_exercises(
    rendered: dict[str, str], exercises_dir: Path
) -> tuple[list[str], list[str], list[str]]:
    """Compare `exercises_dir` with the `rendered` exercise texts.

    Returns:
        The rendered names without a file, the names whose file has other
        text, and the notebooks in `exercises_dir` that were not rendered.
    """
    missing, differing = [], []
    for name, text in rendered.items():
        target = Path(exercises_dir) / name
        if not target.exists():
            missing.append(name)
        elif target.read_text("utf-8") != text:
            differing.append(name)
    orphans = [
        path.name for path in sorted(Path(exercises_dir).glob("*.ipynb"))
        if path.name not in rendered
    ]
    return missing, differing, orphans


def stale_exercises(solutions_dir: Path, exercises_dir: Path) -> list[str]:
    """Return the exercise files that are missing, outdated or have no solution."""
    rendered = render_exercises(solutions_dir)
    missing, differing, orphans = compare_exercises(rendered, exercises_dir)
    return [name for name in rendered if name in missing + differing] + orphans


def write_exercises(
    solutions_dir: Path, exercises_dir: Path, force: bool = False
) -> list[Path]:
    """Write every exercise notebook and return the paths written or removed.

    Exercise notebooks whose solution no longer exists are removed.

    Args:
        force: overwrite exercise files whose text differs from the generated
            one, and remove notebooks that have no solution. Without it, either
            case raises before anything is written.

    Raises:
        ExerciseSourceError: if a solution notebook cannot be converted.
        ExerciseOverwriteError: without `force`, if an existing file would be
            overwritten or removed. It names those files.
    """
    exercises_dir = Path(exercises_dir)
    rendered = render_exercises(solutions_dir)
    missing, differing, orphans = compare_exercises(rendered, exercises_dir)
    if (differing or orphans) and not force:
        raise ExerciseOverwriteError(
            _overwrite_message(exercises_dir, solutions_dir, differing, orphans),
            differing, orphans,
        )

    exercises_dir.mkdir(parents=True, exist_ok=True)
    changed = []
    for name, text in rendered.items():
        if name in missing or name in differing:
            target = exercises_dir / name
            target.write_text(text, encoding="utf-8")
            changed.append(target)
    for name in orphans:
        path = exercises_dir / name
        path.unlink()
        changed.append(path)
    return changed


def _overwrite_message(
    exercises_dir: Path, solutions_dir: Path, differing: list[str], orphans: list[str]
) -> str:
    actions = []
    if differing:
        differ = "differs" if len(differing) == 1 else "differ"
        actions.append(
            f"overwrite {', '.join(differing)}, which {differ} from what "
            f"{solutions_dir} generates"
        )
    if orphans:
        have = "has" if len(orphans) == 1 else "have"
        actions.append(
            f"delete {', '.join(orphans)}, which {have} no solution notebook"
        )
    return (
        f"{exercises_dir} was left unchanged because writing it would "
        f"{', and '.join(actions)}; copy any edits you want to keep elsewhere, "
        "then run python -m course_lib exercises --force"
    )


def add_parser(commands) -> argparse.ArgumentParser:
    """Add the ``exercises`` subcommand to the CLI's subparsers."""
    parser = commands.add_parser(
        "exercises",
        help="write exercises/ from solutions/, or check that it is up to date",
    )
    parser.add_argument("--solutions", type=Path, default=Path("solutions"),
                        help="folder of the solved notebooks (default: solutions)")
    parser.add_argument("--exercises", type=Path, default=Path("exercises"),
                        help="folder of the generated student notebooks "
                        "(default: exercises)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit with status 1 if any exercise "
                        "notebook is missing or differs from its solution")
    parser.add_argument("--force", action="store_true",
                        help="overwrite exercise notebooks that differ from the "
                        "generated ones and delete notebooks without a solution; "
                        "without it, the command changes nothing in that case")
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run the ``exercises`` subcommand; return the exit status."""
    if not args.solutions.is_dir():
        logger.error("error: solutions folder %s not found; pass --solutions",
                     args.solutions)
        return 2
    try:
        if args.check:
            stale = stale_exercises(args.solutions, args.exercises)
            if stale:
                logger.error(
                    "error: %s out of date with %s: %s; run python -m course_lib "
                    "exercises --force to regenerate", args.exercises, args.solutions,
                    ", ".join(stale),
                )
                return 1
            logger.info("%s is up to date with %s", args.exercises, args.solutions)
            return 0
        changed = write_exercises(args.solutions, args.exercises, force=args.force)
    except (ExerciseSourceError, ExerciseOverwriteError) as err:
        logger.error("error: %s", err)
        return 2
    for path in changed:
        logger.info("%s %s", "wrote" if path.exists() else "removed", path)
    if not changed:
        logger.info("%s was already up to date", args.exercises)
    return 0
