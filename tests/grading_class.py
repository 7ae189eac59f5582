"""A class of submissions for the grade command, with the row each must get.

`build_class(folder)` writes the class, built from the committed solution and
exercise notebooks so that it follows them when they change. Every student
is here for a reason: the solutions, the unsolved exercises, the wrong
solutions that the exercise tests use, hostile notebooks and bad input.

`EXPECTED` maps (student, exercise) to (status, points, words of the
reason). Exercises a student did not submit are "missing" with 0 points
unless listed.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "solutions"
EXERCISES = ROOT / "exercises"
WRONG = Path(__file__).resolve().parent / "fixtures" / "wrong_solutions"

CURVES = "18_5_1_read_the_curves.ipynb"
RESUME = "18_5_2_add_resumption.ipynb"
IMBALANCE = "18_5_3_loss_down_metric_flat.ipynb"
LABELS = {CURVES: "18.5.1", RESUME: "18.5.2", IMBALANCE: "18.5.3"}

# Answer cells, by id, in the released notebooks.
CURVE_ANSWERS, DIAGNOSE = "27941307", "c7147f4a"
TRAIN_SCRIPT = "421b741c"
METRICS, EVALUATE, CLASS_WEIGHTS = "77c37681", "0f4abd30", "9e25e1d0"
# Check cells of exercise 18.5.1.
CURVE_CHECK, DIAGNOSE_CHECK = "c30b442c", "12a7b77d"

SECRET_NAME, SECRET_VALUE = "GRADER_TEST_TOKEN", "do-not-leak-8d1f"
FAKE_PASS = "passed: all four runs named correctly, each with its most likely fix"

EXPECTED: dict[tuple[str, str], tuple[str, int, str]] = {
    ("solved", "18.5.1"): ("passed", 5, "all 2 checks passed"),
    ("solved", "18.5.2"): ("passed", 5, "all 2 checks passed"),
    ("solved", "18.5.3"): ("passed", 9, "all 7 checks passed"),
    ("unsolved", "18.5.1"): ("failed", 0, "Complete part 1"),
    ("unsolved", "18.5.2"): ("failed", 0, "still raises NotImplementedError"),
    ("unsolved", "18.5.3"): ("failed", 0, "Complete part 1"),
    # The wrong solutions of the exercise tests, inside the solved notebooks.
    ("f1_per_batch", "18.5.3"): ("failed", 7, "averaged per batch"),
    ("inverted_weights", "18.5.3"): ("failed", 6, "inverted class weights"),
    ("resume_off_by_one", "18.5.2"): ("failed", 1, "off-by-one on resume"),
    ("resume_without_optimizer", "18.5.2"): (
        "failed", 1, "optimizer state not restored"),
    # Hostile notebooks.
    ("tampered_checks", "18.5.1"): ("failed", 0, "Complete part 1"),
    ("fake_passed", "18.5.1"): ("failed", 0, "Complete part 1"),
    ("monkeypatched", "18.5.1"): ("failed", 0, "Complete part 1"),
    ("sys_exit", "18.5.1"): ("failed", 0, "raised SystemExit"),
    ("os_exit", "18.5.1"): ("error", 2, "the kernel died"),
    ("infinite_loop", "18.5.1"): ("timed out", 2, "time limit"),
    ("memory_hog", "18.5.1"): ("failed", 2, "raised MemoryError"),
    ("huge_output", "18.5.1"): ("passed", 5, "all 2 checks passed"),
    ("no_cell_ids", "18.5.1"): ("passed", 5, "all 2 checks passed"),
    ("single_file", "18.5.1"): ("passed", 5, "all 2 checks passed"),
    ("single_file", "18.5.2"): ("missing", 0, "holds only exercise 18.5.1"),
    ("single_file", "18.5.3"): ("missing", 0, "holds only exercise 18.5.1"),
    # Bad input.
    ("malformed", "18.5.1"): ("error", 0, "not valid notebook JSON"),
    ("not_utf8", "18.5.1"): ("error", 0, "not valid UTF-8"),
    ("wrong_exercise", "18.5.2"): (
        "error", 0, "holds the notebook of exercise 18.5.1"),
    ("empty", "18.5.1"): ("missing", 0, "is empty"),
    ("empty", "18.5.2"): ("missing", 0, "is empty"),
    ("empty", "18.5.3"): ("missing", 0, "is empty"),
    ("essay_only", "18.5.1"): ("missing", 0, "no notebook in essay_only/"),
    ("essay_only", "18.5.2"): ("missing", 0, "no notebook in essay_only/"),
    ("essay_only", "18.5.3"): ("missing", 0, "no notebook in essay_only/"),
    ("not_a_notebook", "18.5.1"): ("error", 0, "is not a notebook"),
    ("not_a_notebook", "18.5.2"): ("error", 0, "is not a notebook"),
    ("not_a_notebook", "18.5.3"): ("error", 0, "is not a notebook"),
}
for _exercise in LABELS.values():
    for _entry in ("twin", "Twin"):
        EXPECTED[(_entry, _exercise)] = ("error", 0, "both name the student")
STUDENTS = sorted({student for student, _ in EXPECTED})


def _read(path: Path) -> dict:
    return json.loads(path.read_text("utf-8"))


def _write(notebook: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(notebook, indent=1), encoding="utf-8")


def _cell(notebook: dict, cell_id: str) -> dict:
    return next(cell for cell in notebook["cells"] if cell.get("id") == cell_id)


def _set(notebook: dict, cell_id: str, source: str) -> dict:
    _cell(notebook, cell_id)["source"] = source
    return notebook


def solved(name: str) -> dict:
    return _read(SOLUTIONS / name)


def unsolved(name: str) -> dict:
    return _read(EXERCISES / name)


def _wrong(fixture: str) -> str:
    return (WRONG / f"{fixture}.py").read_text("utf-8")


def _tampered() -> dict:
    """Check cells print a pass, carry skip markers and pre-filled outputs."""
    notebook = unsolved(CURVES)
    notebook["metadata"]["kernelspec"] = {"name": "no-such-kernel",
                                          "display_name": "x", "language": "python"}
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        cell["metadata"]["tags"] = ["nbval-skip", "raises-exception"]
        cell["source"] = "# NBVAL_SKIP\n# NBVAL_RAISES_EXCEPTION\n" + "".join(
            cell["source"])
    _set(notebook, CURVE_CHECK, f"# NBVAL_SKIP\nprint({FAKE_PASS!r})")
    _cell(notebook, CURVE_CHECK)["outputs"] = [
        {"output_type": "stream", "name": "stdout", "text": FAKE_PASS + "\n"}]
    notebook["cells"].remove(_cell(notebook, DIAGNOSE_CHECK))
    return notebook


def _fake_passed() -> dict:
    """Prints the success line, and shows what the environment holds."""
    notebook = unsolved(CURVES)
    _set(notebook, CURVE_ANSWERS,
         "import os\n"
         f"print({FAKE_PASS!r})\n"
         "answers['a'] = {'fix': 'use a larger model', 'lesson': 6,\n"
         f"                'condition': os.environ.get({SECRET_NAME!r}, 'cleared')}}\n")
    _set(notebook, DIAGNOSE,
         "def diagnose(history):\n"
         "    print('passed: diagnose labelled all recorded runs')\n"
         "    return 'overfitting'\n")
    return notebook


def _monkeypatched() -> dict:
    """Replaces the checks, the assertion classes and the traceback display."""
    notebook = unsolved(CURVES)
    _set(notebook, CURVE_ANSWERS,
         "import builtins\n"
         "from course_lib import checks as patched\n"
         "\n"
         "def fake_check(*args, **kwargs):\n"
         f"    print({FAKE_PASS!r})\n"
         "\n"
         "for name in dir(patched):\n"
         "    if name.startswith(('check_', 'score_')):\n"
         "        setattr(patched, name, fake_check)\n"
         "patched.run_diagnose = lambda function: {'results': []}\n"
         "patched.CHECKS.clear()\n"
         "patched.CheckFailed = type('CheckFailed', (Exception,), {})\n"
         "builtins.AssertionError = type('AssertionError', (Exception,), {})\n"
         "get_ipython().showtraceback = lambda *args, **kwargs: None\n")
    _set(notebook, DIAGNOSE, "def diagnose(history):\n    return 'overfitting'\n")
    return notebook


def _sys_exit() -> dict:
    """Deletes the files of its folder, then exits."""
    notebook = unsolved(CURVES)
    _set(notebook, CURVE_ANSWERS,
         "import pathlib\nimport sys\n"
         "for path in pathlib.Path('.').glob('*'):\n"
         "    if path.is_file():\n"
         "        path.unlink()\n"
         "sys.exit('leaving early')\n")
    return notebook


def _with_prefix(cell_id: str, prefix: str) -> dict:
    notebook = solved(CURVES)
    cell = _cell(notebook, cell_id)
    cell["source"] = prefix + "".join(cell["source"])
    return notebook


def _without_ids(notebook: dict) -> dict:
    notebook["nbformat_minor"] = 4
    for cell in notebook["cells"]:
        cell.pop("id", None)
    return notebook


def build_class(folder: Path) -> Path:
    """Write the class into `folder` and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in LABELS:
        _write(solved(name), folder / "solved" / name)
        _write(unsolved(name), folder / "unsolved" / name)

    f1_per_batch = solved(IMBALANCE)
    _set(f1_per_batch, METRICS, _wrong("f1_per_batch"))
    _set(f1_per_batch, EVALUATE, "# evaluate is defined in the cell above.\n")
    _write(f1_per_batch, folder / "f1_per_batch" / IMBALANCE)
    _write(_set(solved(IMBALANCE), CLASS_WEIGHTS, _wrong("inverted_class_weights")),
           folder / "inverted_weights" / IMBALANCE)
    for fixture in ("resume_off_by_one", "resume_without_optimizer"):
        script = "%%writefile {module_path}\n" + _wrong(fixture)
        _write(_set(solved(RESUME), TRAIN_SCRIPT, script),
               folder / fixture / RESUME)

    _write(_tampered(), folder / "tampered_checks" / CURVES)
    _write(_fake_passed(), folder / "fake_passed" / CURVES)
    _write(_monkeypatched(), folder / "monkeypatched" / CURVES)
    _write(_sys_exit(), folder / "sys_exit" / CURVES)
    (folder / "sys_exit" / "notes.txt").write_text("kept\n", encoding="utf-8")
    _write(_with_prefix(DIAGNOSE, "import os\nos._exit(3)\n"),
           folder / "os_exit" / CURVES)
    _write(_set(solved(CURVES), DIAGNOSE, "while True:\n    pass\n"),
           folder / "infinite_loop" / CURVES)
    _write(_with_prefix(DIAGNOSE, "hog = []\nwhile True:\n"
                        "    hog.append(bytearray(2**27))\n"),
           folder / "memory_hog" / CURVES)
    _write(_with_prefix(CURVE_ANSWERS, "for _ in range(48):\n"
                        "    print('x' * 2**20)\n"),
           folder / "huge_output" / CURVES)
    _write(_without_ids(solved(CURVES)), folder / "no_cell_ids" / CURVES)
    _write(solved(CURVES), folder / "single_file.ipynb")

    text = json.dumps(unsolved(CURVES), indent=1)
    (folder / "malformed").mkdir()
    (folder / "malformed" / CURVES).write_text(text[: len(text) // 2], "utf-8")
    (folder / "not_utf8").mkdir()
    (folder / "not_utf8" / CURVES).write_bytes(
        text.encode("utf-8").replace(b"Exercise", b"Exerc\xefse", 1))
    _write(unsolved(CURVES), folder / "wrong_exercise" / RESUME)
    (folder / "empty").mkdir()
    (folder / "essay_only").mkdir()
    (folder / "essay_only" / "essay.docx").write_bytes(b"PK\x03\x04 not a notebook")
    (folder / "not_a_notebook.pdf").write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    _write(unsolved(CURVES), folder / "twin" / CURVES)
    _write(unsolved(CURVES), folder / "Twin.ipynb")
    return folder
