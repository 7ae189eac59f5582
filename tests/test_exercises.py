"""Tests of the exercise notebooks, their checks and the exercise generator.

The solved notebooks in solutions/ run under nbval with the rest of the suite.
These tests cover what nbval cannot: that exercises/ is what the generator
writes, that every check of an unsolved exercise fails with a "complete this
part" message, and that typical wrong solutions (tests/fixtures/wrong_solutions)
fail with a message that names the mistake.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from course_lib import checks, cli, trajectories
from course_lib.exercises import (
    ExerciseOverwriteError,
    ExerciseSourceError,
    make_exercise,
    stale_exercises,
    strip_regions,
    strip_whole_cell,
    write_exercises,
)

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "solutions"
EXERCISES = ROOT / "exercises"
WRONG = Path(__file__).resolve().parent / "fixtures" / "wrong_solutions"
NOTEBOOKS = sorted(path.name for path in SOLUTIONS.glob("18_5_*.ipynb"))


def load_fixture(name: str):
    spec = importlib.util.spec_from_file_location(f"wrong_{name}", WRONG / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_diagnose(history) -> str:
    features = trajectories.curve_features(history["train_acc"], history["val_acc"])
    return trajectories.label_from_features(features)


# --- the generator ------------------------------------------------------------


def test_exercises_folder_up_to_date():
    status = cli.main(["exercises", "--check", "--solutions", str(SOLUTIONS),
                       "--exercises", str(EXERCISES)])

    assert status == 0, (
        "run python -m course_lib exercises --force and commit exercises/"
    )


def test_check_reports_changed_solution(tmp_path):
    solutions, exercises = tmp_path / "solutions", tmp_path / "exercises"
    shutil.copytree(SOLUTIONS, solutions)
    write_exercises(solutions, exercises)
    assert stale_exercises(solutions, exercises) == []

    path = solutions / NOTEBOOKS[0]
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(nbformat.v4.new_markdown_cell("A new paragraph."))
    nbformat.write(notebook, path)
    (exercises / "orphan.ipynb").write_text("{}", encoding="utf-8")

    assert stale_exercises(solutions, exercises) == [NOTEBOOKS[0], "orphan.ipynb"]
    status = cli.main(["exercises", "--check", "--solutions", str(solutions),
                       "--exercises", str(exercises)])
    assert status == 1


def test_force_removes_orphan_exercise(tmp_path):
    solutions, exercises = tmp_path / "solutions", tmp_path / "exercises"
    shutil.copytree(SOLUTIONS, solutions)
    exercises.mkdir()
    (exercises / "orphan.ipynb").write_text("{}", encoding="utf-8")

    write_exercises(solutions, exercises, force=True)

    assert sorted(p.name for p in exercises.glob("*.ipynb")) == NOTEBOOKS


@pytest.fixture
def generated(tmp_path):
    """Copies of solutions/ and of the exercises generated from it."""
    solutions, exercises = tmp_path / "solutions", tmp_path / "exercises"
    shutil.copytree(SOLUTIONS, solutions)
    write_exercises(solutions, exercises)
    return solutions, exercises


def edit_exercise(path: Path) -> None:
    """Fill the first stub of an exercise notebook, as a student would."""
    notebook = nbformat.read(path, as_version=4)
    cell = next(c for c in notebook.cells if "raise NotImplementedError" in c.source)
    cell.source = "answer = 42"
    nbformat.write(notebook, path)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def run_exercises(solutions: Path, exercises: Path, *options: str) -> int:
    return cli.main(["exercises", "--solutions", str(solutions),
                     "--exercises", str(exercises), *options])


def test_write_keeps_edited_exercise(generated, capsys):
    solutions, exercises = generated
    edit_exercise(exercises / NOTEBOOKS[0])
    (exercises / "notes.ipynb").write_text("{}", encoding="utf-8")
    (exercises / NOTEBOOKS[1]).unlink()
    before = folder_bytes(exercises)

    status = run_exercises(solutions, exercises)

    errors = [line for line in capsys.readouterr().out.splitlines() if "error" in line]
    assert status == 2
    assert folder_bytes(exercises) == before
    assert len(errors) == 1
    assert f"overwrite {NOTEBOOKS[0]}, which differs from what" in errors[0]
    assert "delete notes.ipynb, which has no solution notebook" in errors[0]
    assert NOTEBOOKS[1] not in errors[0]
    assert errors[0].endswith("python -m course_lib exercises --force")


def test_write_overwrite_error_lists_files(generated):
    solutions, exercises = generated
    edit_exercise(exercises / NOTEBOOKS[2])
    edit_exercise(exercises / NOTEBOOKS[0])
    (exercises / "b.ipynb").write_text("{}", encoding="utf-8")
    (exercises / "a.ipynb").write_text("{}", encoding="utf-8")

    with pytest.raises(ExerciseOverwriteError) as caught:
        write_exercises(solutions, exercises)

    assert caught.value.differing == [NOTEBOOKS[0], NOTEBOOKS[2]]
    assert f"{NOTEBOOKS[0]}, {NOTEBOOKS[2]}, which differ" in str(caught.value)
    assert caught.value.orphans == ["a.ipynb", "b.ipynb"]
    assert "delete a.ipynb, b.ipynb, which have no solution" in str(caught.value)


def test_write_keeps_orphan_exercise(generated):
    solutions, exercises = generated
    (exercises / "notes.ipynb").write_text("{}", encoding="utf-8")

    with pytest.raises(ExerciseOverwriteError, match="delete notes.ipynb"):
        write_exercises(solutions, exercises)

    assert (exercises / "notes.ipynb").read_text(encoding="utf-8") == "{}"


def test_write_adds_missing_exercise(generated):
    solutions, exercises = generated
    (exercises / NOTEBOOKS[1]).unlink()
    before = folder_bytes(exercises)
    (exercises / "notes.txt").write_text("not a notebook\n", encoding="utf-8")

    changed = write_exercises(solutions, exercises)

    assert changed == [exercises / NOTEBOOKS[1]]
    assert stale_exercises(solutions, exercises) == []
    after = folder_bytes(exercises)
    assert {name: after[name] for name in before} == before
    assert after["notes.txt"] == b"not a notebook\n"


def test_force_regenerates_edited_exercise(generated, capsys):
    solutions, exercises = generated
    expected = folder_bytes(exercises)
    edit_exercise(exercises / NOTEBOOKS[0])
    (exercises / "notes.ipynb").write_text("{}", encoding="utf-8")

    status = run_exercises(solutions, exercises, "--force")

    output = capsys.readouterr().out
    assert status == 0
    assert folder_bytes(exercises) == expected
    assert f"wrote {exercises / NOTEBOOKS[0]}" in output
    assert f"removed {exercises / 'notes.ipynb'}" in output


def test_changed_solution_needs_force(generated):
    solutions, exercises = generated
    path = solutions / NOTEBOOKS[0]
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(nbformat.v4.new_markdown_cell("A new paragraph."))
    nbformat.write(notebook, path)
    before = folder_bytes(exercises)

    refused = run_exercises(solutions, exercises)
    unchanged = folder_bytes(exercises)
    forced = run_exercises(solutions, exercises, "--force")

    assert refused == 2
    assert unchanged == before
    assert forced == 0
    assert stale_exercises(solutions, exercises) == []
    assert "A new paragraph." in (exercises / NOTEBOOKS[0]).read_text("utf-8")


def test_region_becomes_indented_stub():
    source = (
        "def f(x):\n"
        "    y = 1\n"
        "    # BEGIN SOLUTION: Return x plus y\n"
        "    return x + y\n"
        "    # END SOLUTION\n"
        "print(f(1))"
    )

    stubbed = strip_regions(source, "test")

    assert stubbed.splitlines() == [
        "def f(x):",
        "    y = 1",
        "    # YOUR CODE HERE",
        "    raise NotImplementedError('Return x plus y.')",
        "print(f(1))",
    ]


def test_long_hint_wraps_into_valid_code():
    hint = "Part 2: " + "write the code that does one more thing " * 5
    source = f"# BEGIN SOLUTION: {hint}\nx = 1\n# END SOLUTION"

    stubbed = strip_regions(source, "test")

    assert max(len(line) for line in stubbed.splitlines()) <= 88
    with pytest.raises(NotImplementedError) as raised:
        exec(compile(stubbed, "stub", "exec"), {})
    assert str(raised.value) == " ".join(hint.split()) + "."


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("# BEGIN SOLUTION\nx = 1\n# END SOLUTION", "needs a message"),
        ("# BEGIN SOLUTION: a\n# BEGIN SOLUTION: b\n# END SOLUTION", "inside another"),
        ("x = 1\n# END SOLUTION", "without a BEGIN"),
        ("# BEGIN SOLUTION: a\nx = 1", "never closed"),
    ],
)
def test_bad_markers_rejected(source, message):
    with pytest.raises(ExerciseSourceError, match=message):
        strip_regions(source, "test")


def test_whole_cell_keeps_leading_comments():
    stubbed = strip_whole_cell("# Build the model.\nmodel = 1", "test")

    assert stubbed.splitlines() == [
        "# Build the model.",
        "# YOUR CODE HERE",
        "raise NotImplementedError('Build the model.')",
    ]


def test_whole_cell_needs_comment():
    with pytest.raises(ExerciseSourceError, match="must start with a comment"):
        strip_whole_cell("model = 1", "test")


def test_untagged_region_rejected():
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("# BEGIN SOLUTION: a\n# END SOLUTION")]

    with pytest.raises(ExerciseSourceError, match="no 'solution' tag"):
        make_exercise(notebook)


def test_notebook_without_solutions_rejected():
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("x = 1")]

    with pytest.raises(ExerciseSourceError, match="no cells tagged"):
        make_exercise(notebook)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_exercise_hides_solutions(name):
    solution = nbformat.read(SOLUTIONS / name, as_version=4)
    exercise = nbformat.read(EXERCISES / name, as_version=4)
    tagged = [c for c in solution.cells if "solution" in c.metadata.get("tags", [])]
    stubs = [c for c in exercise.cells if "solution" in c.metadata.get("tags", [])]

    assert "/blob/main/exercises/" in exercise.cells[0].source
    assert len(stubs) == sum(c.cell_type == "code" for c in tagged)
    for cell in stubs:
        assert "raise NotImplementedError" in cell.source
        assert "BEGIN SOLUTION" not in cell.source
    for cell in exercise.cells:
        if cell.cell_type == "code":
            assert cell.outputs == []
            assert cell.execution_count is None


# --- unsolved exercises -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_unsolved_exercise_checks_ask_to_complete(name, tmp_path):
    notebook = nbformat.read(EXERCISES / name, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", allow_errors=True,
        resources={"metadata": {"path": str(tmp_path)}},
    )

    client.execute()

    check_cells = [c for c in notebook.cells if "check" in c.metadata.get("tags", [])]
    assert check_cells
    for cell in check_cells:
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert len(errors) == 1, cell.source
        assert errors[0].ename == "ExerciseIncomplete", (cell.source, errors[0].evalue)
        assert "Complete part" in errors[0].evalue, errors[0].evalue
    for cell in notebook.cells:
        if "solution" in cell.metadata.get("tags", []):
            errors = [o for o in cell.outputs if o.output_type == "error"]
            if errors:
                assert errors[0].ename == "NotImplementedError", cell.source


# --- exercise 18.5.1 ----------------------------------------------------------


def test_recorded_runs_match_their_settings():
    runs = trajectories.load_trajectories()

    assert list(runs) == list(trajectories.RUNS)
    for key, run in runs.items():
        settings = trajectories.RUNS[key]
        assert run["label"] == settings["label"]
        assert run["title"] == settings["title"]
        assert run["settings"] == {
            k: v for k, v in settings.items() if k not in ("label", "title")
        }
        assert len(run["history"]) == settings["epochs"]


@pytest.mark.slow
def test_recorded_run_reproduces():
    # The undertrained run is the shortest. Retraining it shows that the
    # stored file comes from the settings in RUNS.
    stored = trajectories.load_trajectories()["c"]["history"]

    columns = trajectories.train_trajectory("c")

    for column in ("train_acc", "val_acc", "train_loss", "val_loss"):
        for got, expected in zip(columns[column], stored[column]):
            assert got == pytest.approx(expected, abs=0.01), column


def test_bank_labels_hold_with_margin():
    cases = trajectories.diagnosis_cases()

    assert len({case["id"] for case in cases}) == len(cases) == 40
    for case in cases:
        features = trajectories.curve_features(
            case["history"]["train_acc"], case["history"]["val_acc"]
        )
        assert trajectories.label_from_features(features) == case["label"], case["id"]


def test_diagnose_scores_separate_from_run():
    results = json.loads(json.dumps(checks.run_diagnose(reference_diagnose)))

    assert "5 recorded runs and 35 hidden" in checks.score_diagnose(results)


def test_diagnose_wrong_label_named():
    expected = "recorded run recorded-a is underfitting"

    with pytest.raises(checks.CheckFailed, match=expected):
        checks.check_diagnose(lambda history: "healthy")


def test_diagnose_unfinished_asks_to_complete():
    def unfinished(history):
        raise NotImplementedError("Part 2: apply the rules")

    with pytest.raises(checks.ExerciseIncomplete, match="Complete part 2"):
        checks.check_diagnose(unfinished)


def test_diagnose_loss_columns_rejected():
    def uses_loss(history):
        history["val_loss"]
        return reference_diagnose(history)

    with pytest.raises(checks.CheckFailed, match="raised KeyError"):
        checks.check_diagnose(uses_loss)


def test_curve_answers_missing_named():
    answers = checks.empty_curve_answers()
    answers["a"] = {"condition": "underfitting", "fix": "use a larger model",
                    "lesson": 6}

    expected = r"\(b\) condition, fix, lesson"

    with pytest.raises(checks.ExerciseIncomplete, match=expected):
        checks.check_curve_answers(answers)


def test_curve_answers_wrong_condition_hinted():
    answers = {
        "a": {"condition": "underfitting", "fix": "use a larger model", "lesson": 6},
        "b": {"condition": "underfitting", "fix": "use a larger model", "lesson": 6},
        "c": {"condition": "undertraining", "fix": "train for more epochs",
              "lesson": 3},
        "d": {"condition": "instability", "fix": "lower the learning rate",
              "lesson": 6},
    }

    with pytest.raises(checks.CheckFailed, match=r"\(b\) is not underfitting"):
        checks.check_curve_answers(answers)


# --- exercise 18.5.3 ----------------------------------------------------------


def correct_metrics(preds, targets):
    return load_fixture("f1_per_batch").positive_class_metrics(preds, targets)


def run_history(recall, f1, epochs=6):
    return {
        "epoch": list(range(1, epochs + 1)),
        "train_loss": [0.3 - 0.02 * e for e in range(epochs)],
        "val_loss": [0.23 - 0.012 * e for e in range(epochs)],
        "val_acc": [0.949] * epochs,
        "val_recall": [recall] * epochs,
        "val_f1": [f1] * epochs,
    }


def test_f1_per_batch_named():
    wrong = load_fixture("f1_per_batch")

    with pytest.raises(checks.CheckFailed, match="f1 are averaged per batch"):
        checks.check_evaluate(wrong.evaluate)


def test_inverted_class_weights_named():
    wrong = load_fixture("inverted_class_weights")

    with pytest.raises(checks.CheckFailed, match="^inverted class weights"):
        checks.check_class_weights(wrong.class_weights)


def test_inverted_weights_fail_run_check():
    wrong = load_fixture("inverted_class_weights")
    weights = wrong.class_weights(torch.tensor([0] * 95 + [1] * 5))

    with pytest.raises(checks.CheckFailed, match="^inverted class weights"):
        checks.check_fixed_run(run_history(0.9, 0.6), run_history(0.0, 0.0), weights)


def test_metrics_zero_division_named():
    def nan_when_undefined(preds, targets):
        true_pos = int(((preds == 1) & (targets == 1)).sum())
        predicted, actual = int((preds == 1).sum()), int((targets == 1).sum())
        precision = true_pos / predicted if predicted else math.nan
        recall = true_pos / actual if actual else math.nan
        f1 = 2 * true_pos / (predicted + actual) if predicted + actual else math.nan
        return {"precision": precision, "recall": recall, "f1": f1}

    expected = "no predicted positives.*zero-division"

    with pytest.raises(checks.CheckFailed, match=expected):
        checks.check_positive_class_metrics(nan_when_undefined)


def test_metrics_scores_separate_from_run():
    results = json.loads(json.dumps(checks.run_positive_class_metrics(correct_metrics)))

    assert "9 hidden cases" in checks.score_positive_class_metrics(results)


def test_evaluate_scores_separate_from_run():
    wrong = load_fixture("f1_per_batch")
    results = json.loads(json.dumps(checks.run_evaluate(wrong.evaluate)))

    with pytest.raises(checks.CheckFailed, match="averaged per batch"):
        checks.score_evaluate(results)


def test_pathological_run_rejects_recall():
    with pytest.raises(checks.CheckFailed, match="recall reached 0.40"):
        checks.check_pathological_run(run_history(0.4, 0.5))


def test_fixed_run_rejects_low_f1():
    weights = torch.tensor([0.5, 10.0])

    with pytest.raises(checks.CheckFailed, match="F1 0.20"):
        checks.check_fixed_run(run_history(0.9, 0.2), run_history(0.0, 0.0), weights)


def test_fixed_run_unfinished_asks_to_complete():
    with pytest.raises(checks.ExerciseIncomplete, match="Complete part 3"):
        checks.check_fixed_run(None, None, None)


# --- exercise 18.5.2 ----------------------------------------------------------


@pytest.mark.slow
def test_resume_without_optimizer_named():
    expected = "^optimizer state not restored"

    with pytest.raises(checks.CheckFailed, match=expected) as raised:
        checks.check_resume(WRONG / "resume_without_optimizer.py")

    assert "scheduler state not restored" in str(raised.value)
    assert "the final weights differ" in str(raised.value)


@pytest.mark.slow
def test_resume_off_by_one_named():
    expected = "off-by-one on resume.*repeated epoch 3"

    with pytest.raises(checks.CheckFailed, match=expected):
        checks.check_resume(WRONG / "resume_off_by_one.py")


def trial_results(resumed_epochs, last_epoch=3, weights=None):
    """Return run_resume_trial output for a killed run that finished 3 epochs."""
    def epoch_events(epochs, first_step):
        events = []
        for index, epoch in enumerate(epochs):
            steps = [{"event": "step", "step": first_step + 8 * index + k, "lr": 1e-3,
                      "state_entries": 6, "state_step": 24.0, "param_sum": 1.0}
                     for k in range(8)]
            events += steps + [{"event": "epoch", "epoch": epoch, "loss": 1.0,
                                "steps": first_step + 8 * index + 7}]
        return events

    return {
        "epochs": 6, "kill_epoch": 4, "kill_step": 3,
        "runs": {
            "uninterrupted": {"events": epoch_events(range(1, 7), 1)
                              + [{"event": "done"}],
                              "weights": weights, "timed_out": False,
                              "returncode": 0, "stderr_tail": ""},
            "killed": {"events": epoch_events(range(1, 4), 1), "killed": True,
                       "weights": None, "timed_out": False, "returncode": -9,
                       "stderr_tail": ""},
            "resumed": {"events": epoch_events(resumed_epochs, 1)
                        + [{"event": "done"}],
                        "weights": weights, "timed_out": False,
                        "returncode": 0, "stderr_tail": ""},
        },
        "last_pt": {"exists": True, "keys": ["epoch", "model", "optimizer",
                                             "scheduler"],
                    "epoch": last_epoch, "error": None},
    }


def test_resume_skipped_epoch_named():
    with pytest.raises(checks.CheckFailed, match="skipped to epoch 5"):
        checks.score_resume(trial_results([5, 6]))


def test_resume_restart_from_scratch_named():
    with pytest.raises(checks.CheckFailed, match="began again at epoch 1"):
        checks.score_resume(trial_results(range(1, 7)))


def test_resume_wrong_saved_epoch_named():
    with pytest.raises(checks.CheckFailed, match="last.pt stores epoch 2"):
        checks.score_resume(trial_results([4, 5, 6], last_epoch=2))


def test_resume_missing_key_named():
    results = trial_results([4, 5, 6])
    results["last_pt"]["keys"] = ["epoch", "model"]

    with pytest.raises(checks.CheckFailed, match=r"lacks the keys \['optimizer', "):
        checks.score_resume(results)


def test_resume_unfinished_asks_to_complete():
    results = trial_results([4, 5, 6])
    results["runs"]["uninterrupted"]["events"] = [
        {"event": "error", "type": "NotImplementedError",
         "message": "Part 1 (resume): load last.pt", "where": "train_model, line 30"}
    ]

    with pytest.raises(checks.ExerciseIncomplete, match="Complete part 1"):
        checks.score_resume(results)


def test_resume_matching_trial_passes(tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save({"weight": torch.ones(3)}, weights)
    results = json.loads(json.dumps(trial_results([4, 5, 6], weights=str(weights))))

    assert "resumed from last.pt at epoch 4" in checks.score_resume(results)


def test_explanation_too_short_rejected():
    with pytest.raises(checks.CheckFailed, match="has 4 words"):
        checks.check_optimizer_explanation("It keeps momentum buffers.")


def test_explanation_missing_asks_to_complete():
    with pytest.raises(checks.ExerciseIncomplete, match="Complete part 2"):
        checks.check_optimizer_explanation(None)
