"""Checks for the exercise notebooks: immediate, specific feedback in a cell.

Every check cell of an exercise calls one ``check_*`` function from here. On
success it prints one line that states what passed. On a mistake it raises
`CheckFailed`, an AssertionError whose message states what is wrong and what
to do. When a part of the exercise is not written yet (its code still raises
NotImplementedError, or an answer is still None) it raises
`ExerciseIncomplete` and names the part to complete.

Running the student's code and scoring its results are separate steps, so a
grading tool can run them in different processes. Each ``check_x`` is
``score_x(run_x(...))``: ``run_x`` calls the student's code and returns a
JSON-serializable dict (and, for the resume exercise, weights files that load
with ``weights_only=True``); ``score_x`` reads only that dict and returns the
success line or raises. `CHECKS` maps each check's name to its two steps:
``python -m course_lib grade`` runs the first in the student's kernel and the
second in its own process.
"""

from __future__ import annotations

import math
import traceback
from typing import Any, Callable, Mapping, NamedTuple

import torch
from torch import nn

from . import trajectories
from .metrics import binary_metrics


class CheckFailed(AssertionError):
    """A mistake found by a check, with a message that states what to change."""


class ExerciseIncomplete(CheckFailed):
    """A part of the exercise that is not written yet, named in the message."""


def _passed(line: str) -> None:
    print(f"passed: {line}")


def _call(function: Callable, *args) -> dict[str, Any]:
    """Call student code and return ``{"value": ...}`` or ``{"error": ...}``."""
    try:
        return {"value": function(*args)}
    except Exception as err:  # noqa: BLE001 - any student error is reported
        return {"error": _describe_error(err)}


def _describe_error(err: BaseException) -> dict[str, str]:
    frames = traceback.extract_tb(err.__traceback__)
    where = f"{frames[-1].name}, line {frames[-1].lineno}" if frames else "unknown"
    return {"type": type(err).__name__, "message": str(err), "where": where}


def _raise_for_error(error: Mapping[str, str], part: str, what: str) -> None:
    if error["type"] == "NotImplementedError":
        raise ExerciseIncomplete(
            f"Complete {part}: {what} still raises NotImplementedError "
            f"({error['message']}). Replace the 'YOUR CODE HERE' stub and rerun."
        )
    raise CheckFailed(
        f"{what} raised {error['type']}: {error['message']} (in {error['where']}). "
        f"Fix {part} and rerun this check."
    )


# ---------------------------------------------------------------------------
# Exercise 18.5.1: read the two curves
# ---------------------------------------------------------------------------

CONDITIONS = ("underfitting", "overfitting", "undertraining", "instability")

FIXES = (
    "use a larger model",
    "stop early and keep the best checkpoint",
    "train for more epochs",
    "lower the learning rate",
    "weight the loss by class",
    "resume from last.pt",
)

LESSONS = {
    1: "the five-step core",
    2: "train and validation phases",
    3: "the complete loop: schedule, best checkpoint, early stopping",
    4: "losses and metrics",
    5: "checkpoint and resume",
    6: "reading the curves",
    7: "Lightning",
    8: "weight averaging",
}

# The expected condition, fix and accepted lessons of each plotted run.
_CURVE_KEY = {
    "a": ("underfitting", "use a larger model", (6,)),
    "b": ("overfitting", "stop early and keep the best checkpoint", (3,)),
    "c": ("undertraining", "train for more epochs", (3, 6)),
    "d": ("instability", "lower the learning rate", (6,)),
}
_CURVE_HINTS = {
    "a": "both curves are low, close together and flat",
    "b": "train accuracy ends far above validation accuracy, which falls after "
    "its peak",
    "c": "both curves are close together and still rising at the last epoch",
    "d": "both curves fall and recover by large steps, again and again",
}


def empty_curve_answers() -> dict[str, dict[str, Any]]:
    """Return the dict for part 1 of exercise 18.5.1, with every value None."""
    return {key: {"condition": None, "fix": None, "lesson": None} for key in _CURVE_KEY}


def answer_form(answers: dict[str, dict[str, Any]]):
    """Return ipywidgets dropdowns that write into `answers` as they change.

    One row per run with a condition, a fix and a lesson. The dropdowns start
    from the values already in `answers`.
    """
    import ipywidgets as widgets

    options = {
        "condition": [("choose", None)] + [(c, c) for c in CONDITIONS],
        "fix": [("choose", None)] + [(f, f) for f in FIXES],
        "lesson": [("choose", None)]
        + [(f"{n}: {title}", n) for n, title in LESSONS.items()],
    }
    rows = []
    for key in _CURVE_KEY:
        boxes = []
        for field, choices in options.items():
            dropdown = widgets.Dropdown(
                options=choices, value=answers[key].get(field), description=field,
                layout=widgets.Layout(width="auto"),
            )

            def store(change, key=key, field=field):
                answers[key][field] = change["new"]

            dropdown.observe(store, names="value")
            boxes.append(dropdown)
        rows.append(widgets.HBox([widgets.Label(f"({key})")] + boxes))
    return widgets.VBox(rows)


def check_curve_answers(answers: Mapping[str, Mapping[str, Any]]) -> None:
    """Check the condition, fix and lesson named for each of the four runs."""
    _passed(score_curve_answers(run_curve_answers(answers)["answers"]))


def run_curve_answers(answers: Any) -> dict[str, Any]:
    """Return the answers of part 1 of exercise 18.5.1 as plain JSON values."""
    return {"answers": _plain(answers)}


def _plain(value: Any, depth: int = 0) -> Any:
    """Return `value` as JSON values; anything else becomes its short repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth < 4 and isinstance(value, Mapping):
        return {str(key): _plain(item, depth + 1) for key, item in value.items()}
    if depth < 4 and isinstance(value, (list, tuple)):
        return [_plain(item, depth + 1) for item in value]
    return repr(value)[:200]


def score_curve_answers(answers: Mapping[str, Mapping[str, Any]]) -> str:
    """Score part 1 of exercise 18.5.1 from its JSON-serializable dict."""
    if not isinstance(answers, Mapping):
        raise ExerciseIncomplete(
            "Complete part 1: answers must be a dict with keys 'a' to 'd', each a "
            "dict of condition, fix and lesson."
        )
    missing, problems = [], []
    for key, (condition, fix, lessons) in _CURVE_KEY.items():
        given = answers.get(key) or {}
        empty = [f for f in ("condition", "fix", "lesson") if given.get(f) is None]
        if empty:
            missing.append(f"({key}) {', '.join(empty)}")
            continue
        problems += _curve_answer_problems(key, given, condition, fix, lessons)
    if missing:
        raise ExerciseIncomplete(
            "Complete part 1: these answers are still None: "
            + "; ".join(missing)
            + ". Set them in the answers cell or with the dropdowns."
            + (" Also: " + " ".join(problems) if problems else "")
        )
    if problems:
        raise CheckFailed(" ".join(problems))
    return "all four runs named correctly, each with its most likely fix and lesson"


def _curve_answer_problems(key, given, condition, fix, lessons) -> list[str]:
    problems = []
    if given["condition"] not in CONDITIONS:
        problems.append(
            f"({key}) condition {given['condition']!r} is not one of {CONDITIONS}."
        )
    elif given["condition"] != condition:
        problems.append(
            f"({key}) is not {given['condition']}: look again, {_CURVE_HINTS[key]}."
        )
    if given["fix"] not in FIXES:
        problems.append(f"({key}) fix {given['fix']!r} is not one of FIXES.")
    elif given["fix"] != fix and given["condition"] == condition:
        problems.append(
            f"({key}) {given['fix']!r} is not the most likely fix for "
            f"{condition}: pick the one change that removes the cause."
        )
    lesson = given["lesson"]
    if isinstance(lesson, str) and lesson[:2].isdigit():
        lesson = int(lesson[:2])
    if lesson not in LESSONS:
        problems.append(
            f"({key}) lesson {given['lesson']!r} is not a lesson number 1 to 8."
        )
    elif lesson not in lessons and given["fix"] == fix:
        problems.append(
            f"({key}) lesson {lesson} ({LESSONS[lesson]}) does not teach "
            f"{fix!r}; see the lesson list above the answers."
        )
    return problems


def check_diagnose(diagnose: Callable) -> None:
    """Run `diagnose` on the recorded runs and on hidden variants, and score it."""
    _passed(score_diagnose(run_diagnose(diagnose)))


def run_diagnose(diagnose: Callable) -> dict[str, Any]:
    """Call `diagnose` on every case of the bank and collect what it returns."""
    results = []
    for case in trajectories.diagnosis_cases():
        outcome = _call(diagnose, case["history"])
        if "value" in outcome and not isinstance(outcome["value"], str):
            outcome = {"value": repr(outcome["value"])}
        results.append({"id": case["id"], **outcome})
    return {"results": results}


def score_diagnose(results: Mapping[str, Any]) -> str:
    """Score the output of `run_diagnose` against the bank's labels."""
    cases = {case["id"]: case for case in trajectories.diagnosis_cases()}
    outcomes = {item["id"]: item for item in results["results"]}
    missing = [case_id for case_id in cases if case_id not in outcomes]
    if missing:
        raise CheckFailed(f"no result for the cases {missing}; run the check again")

    for case_id, outcome in outcomes.items():
        if "error" in outcome:
            _raise_for_error(
                outcome["error"], "part 2", f"diagnose(history) on case {case_id}"
            )
    for case_id, outcome in outcomes.items():
        if outcome["value"] not in trajectories.LABELS:
            raise CheckFailed(
                f"diagnose returned {outcome['value']!r} for case {case_id}; it must "
                f"return one of {trajectories.LABELS}, as a lowercase string."
            )

    wrong = [
        case_id for case_id, case in cases.items()
        if outcomes[case_id]["value"] != case["label"]
    ]
    # Cases that the notebook plots come first, because they are easiest to debug.
    wrong.sort(key=lambda case_id: not cases[case_id]["seen"])
    if wrong:
        details = [_describe_case(cases[c], outcomes[c]["value"]) for c in wrong[:3]]
        more = f" ({len(wrong) - 3} more not shown.)" if len(wrong) > 3 else ""
        raise CheckFailed(
            f"diagnose is wrong on {len(wrong)} of {len(cases)} histories. "
            + " ".join(details) + more
            + " Compare these numbers with the rules in part 2, applied in order."
        )
    seen = sum(case["seen"] for case in cases.values())
    return (
        f"diagnose labelled all {seen} recorded runs and "
        f"{len(cases) - seen} hidden histories correctly"
    )


def _describe_case(case: Mapping[str, Any], returned: str) -> str:
    history = case["history"]
    train, val = list(history["train_acc"]), list(history["val_acc"])
    features = trajectories.curve_features(train, val)
    kind = "recorded run" if case["seen"] else "hidden case"
    return (
        f"The {kind} {case['id']} is {case['label']}, but diagnose returned "
        f"{returned!r}: {len(train)} epochs, train_acc {train[0]:.2f} -> "
        f"{train[-1]:.2f}, val_acc {val[0]:.2f} -> {val[-1]:.2f}, final gap "
        f"{features['gap']:.3f}, gains {features['train_gain']:.3f} (train) and "
        f"{features['val_gain']:.3f} (val), falls of more than "
        f"{trajectories.DROP} {features['train_drops']} (train) and "
        f"{features['val_drops']} (val)."
    )


# ---------------------------------------------------------------------------
# Exercise 18.5.2: add resumption
# ---------------------------------------------------------------------------

# Words of which a good answer about the optimizer state uses at least one.
_OPTIMIZER_TERMS = (
    "moment", "momentum", "exp_avg", "running average", "running mean",
    "moving average", "step count", "buffer",
)
MIN_EXPLANATION_WORDS = 25


def check_optimizer_explanation(text: str | None) -> None:
    """Check that the answer on the optimizer state is written and on topic.

    This only screens the answer: it must have at least
    `MIN_EXPLANATION_WORDS` words and name what AdamW keeps between steps. Compare
    it with the model answer in the solution notebook.
    """
    _passed(score_optimizer_explanation(run_optimizer_explanation(text)))


def run_optimizer_explanation(text: Any) -> dict[str, Any]:
    """Return the answer of part 2, or the name of its type if it is no string."""
    if text is None or isinstance(text, str):
        return {"text": text}
    return {"text": None, "type": type(text).__name__}


def score_optimizer_explanation(result: Mapping[str, Any]) -> str:
    text = result.get("text")
    if result.get("type"):
        raise CheckFailed(
            f"why_optimizer_state must be a string, got {result['type']}."
        )
    if not isinstance(text, str) or not text.strip():
        raise ExerciseIncomplete(
            "Complete part 2: set why_optimizer_state to your answer, a string of "
            "a few sentences."
        )
    words = len(text.split())
    if words < MIN_EXPLANATION_WORDS:
        raise CheckFailed(
            f"the answer has {words} words; explain in at least "
            f"{MIN_EXPLANATION_WORDS} what the optimizer keeps between steps and "
            "what goes wrong when a resumed run starts without it."
        )
    lowered = text.lower()
    if not any(term in lowered for term in _OPTIMIZER_TERMS):
        raise CheckFailed(
            "the answer does not say what the optimizer stores: name AdamW's "
            "per-weight moment estimates (exp_avg, exp_avg_sq) and its step count, "
            "and say what a fresh optimizer does with its first steps."
        )
    return (
        f"your answer ({words} words) names the optimizer's state; compare it with "
        "the model answer in solutions/18_5_2_add_resumption.ipynb"
    )


def check_resume(module_path, *, epochs: int = 6) -> None:
    """Kill a run of the student's train_model, resume it, and compare.

    See `course_lib.resume_trial.run_resume_trial` for what runs where. The
    trial's folder is deleted after scoring.
    """
    import shutil
    import tempfile

    from .resume_trial import run_resume_trial

    work_dir = tempfile.mkdtemp(prefix="resume-check-")
    try:
        results = run_resume_trial(module_path, work_dir, epochs=epochs)
        line = score_resume(results)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    _passed(line)


def run_resume(module_path, work_dir=None) -> dict[str, Any]:
    """Run the kill-and-resume trial and keep its folder for scoring.

    The folder is `work_dir`, or a new folder under the current directory, so
    that the weights files stay next to the notebook that made them.
    """
    import os
    import tempfile

    from .resume_trial import run_resume_trial

    if work_dir is None:
        work_dir = tempfile.mkdtemp(prefix="resume-check-", dir=os.getcwd())
    return run_resume_trial(module_path, work_dir)


def score_resume(results: Mapping[str, Any]) -> str:
    """Score the output of `course_lib.resume_trial.run_resume_trial`."""
    runs = results["runs"]
    for name in ("uninterrupted", "killed", "resumed"):
        if runs[name] is not None:
            _raise_for_run_error(name, runs[name])

    reference = _epoch_events(runs["uninterrupted"])
    epochs = results["epochs"]
    if [event["epoch"] for event in reference] != list(range(1, epochs + 1)):
        raise CheckFailed(
            f"the uninterrupted run reported the epochs "
            f"{[event['epoch'] for event in reference]}, expected 1 to {epochs}; "
            "keep the given loop and its on_epoch_end call."
        )
    steps_per_epoch = reference[0]["steps"]

    finished = _epoch_events(runs["killed"])
    done = len(finished)
    if not runs["killed"]["killed"]:
        raise CheckFailed(
            f"the run to be killed ended on its own after {done} epochs, before "
            f"epoch {results['kill_epoch']}; keep the given loop over epochs."
        )
    _check_last_pt(results["last_pt"], done)

    resumed_events = _epoch_events(runs["resumed"])
    resumed_epochs = [event["epoch"] for event in resumed_events]
    first = resumed_epochs[0] if resumed_epochs else None
    if first == 1:
        raise CheckFailed(
            "the restarted run began again at epoch 1: at start-up, load last.pt "
            "if it exists and continue from the epoch after the saved one."
        )
    if first is not None and first <= done:
        raise CheckFailed(
            f"off-by-one on resume: the restarted run repeated epoch {first}, which "
            f"the killed run had already finished (last.pt contains epoch {done}). "
            "Start at the saved epoch + 1, so that no epoch runs twice."
        )
    if first is not None and first > done + 1:
        raise CheckFailed(
            f"off-by-one on resume: the restarted run skipped to epoch {first}, but "
            f"last.pt contains epoch {done}, so epoch {done + 1} never ran. Start at "
            "the saved epoch + 1."
        )
    if resumed_epochs != list(range(done + 1, epochs + 1)):
        raise CheckFailed(
            f"the restarted run trained the epochs {resumed_epochs}; it should "
            f"train {done + 1} to {epochs}."
        )

    problems = _first_step_problems(runs, done * steps_per_epoch)
    losses = _loss_jumps(reference, finished + resumed_events)
    weight_gap = _max_weight_difference(runs)
    evidence = []
    if losses:
        epoch, got, expected = losses[0]
        evidence.append(
            f"the loss of epoch {epoch} was {got:.4f} instead of {expected:.4f}"
        )
    if weight_gap is not None and weight_gap > _WEIGHT_TOLERANCE:
        evidence.append(f"the final weights differ by up to {weight_gap:.2e}")
    if problems or evidence:
        causes = problems or [
            "the resumed run does not repeat the uninterrupted one; restore every "
            "state that training reads, and change nothing else in the loop"
        ]
        detail = f" Evidence: {'; '.join(evidence)}." if evidence else ""
        raise CheckFailed(" ".join(causes) + detail)
    return (
        f"killed at epoch {results['kill_epoch']}, the run resumed from last.pt at "
        f"epoch {done + 1}; its losses and final weights match the uninterrupted "
        "run"
    )


_WEIGHT_TOLERANCE = 1e-6
_RUN_NAMES = {
    "uninterrupted": "the uninterrupted run",
    "killed": "the run to be killed",
    "resumed": "the restarted run",
}


def _raise_for_run_error(name: str, run: Mapping[str, Any]) -> None:
    errors = [event for event in run["events"] if event["event"] == "error"]
    if errors:
        _raise_for_error(errors[0], "part 1", f"train_model in {_RUN_NAMES[name]}")
    if run.get("timed_out"):
        raise CheckFailed(
            f"{_RUN_NAMES[name]} timed out; check train_model for a loop that "
            "never ends."
        )
    expected_done = name != "killed"
    if expected_done and not any(e["event"] == "done" for e in run["events"]):
        tail = run["stderr_tail"].strip().splitlines()[-1:] or ["no output"]
        raise CheckFailed(
            f"{_RUN_NAMES[name]} exited with code {run['returncode']} before "
            f"finishing: {tail[0]}"
        )


def _epoch_events(run: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    if run is None:
        return []
    return [event for event in run["events"] if event["event"] == "epoch"]


def _check_last_pt(last_pt: Mapping[str, Any], done: int) -> None:
    if not last_pt["exists"]:
        raise CheckFailed(
            "the killed run left no last.pt in out_dir: save it at the end of every "
            "epoch, as out_dir / 'last.pt'."
        )
    if last_pt["error"]:
        raise CheckFailed(
            f"last.pt does not load with weights_only=True ({last_pt['error']}). "
            "Save only state_dicts, numbers and strings, with cl.save_checkpoint."
        )
    from .resume_trial import REQUIRED_KEYS

    missing = [key for key in REQUIRED_KEYS if key not in last_pt["keys"]]
    if missing:
        raise CheckFailed(
            f"last.pt lacks the keys {missing} (it has {last_pt['keys']}); save the "
            "model, optimizer and scheduler state_dicts and the epoch number."
        )
    if last_pt["epoch"] != done:
        raise CheckFailed(
            f"last.pt stores epoch {last_pt['epoch']!r}, but the killed run had "
            f"finished {done} epochs; store the number of the epoch just finished."
        )


def _first_step_problems(runs, reference_step: int) -> list[str]:
    """Compare the restarted run's first step with the same step of the reference."""
    reference_steps = [e for e in runs["uninterrupted"]["events"]
                       if e["event"] == "step"]
    resumed_steps = [e for e in runs["resumed"]["events"] if e["event"] == "step"]
    if reference_step >= len(reference_steps) or not resumed_steps:
        return []
    expected, got = reference_steps[reference_step], resumed_steps[0]
    problems = []
    if not math.isclose(got["param_sum"], expected["param_sum"], rel_tol=1e-9):
        problems.append(
            "model weights not restored: at the first step after the restart the "
            "weights differ from the uninterrupted run's. Load state['model'] with "
            "model.load_state_dict."
        )
    if got["state_entries"] == 0 and expected["state_entries"] > 0:
        problems.append(
            "optimizer state not restored: after the restart AdamW started with no "
            f"moment estimates and a step count of 0, where the uninterrupted run "
            f"had {expected['state_step']:.0f} steps of them. Load "
            "state['optimizer'] with optimizer.load_state_dict."
        )
    elif got["state_step"] != expected["state_step"]:
        problems.append(
            f"optimizer state from the wrong step: AdamW's step count was "
            f"{got['state_step']} after the restart, {expected['state_step']} in the "
            "uninterrupted run. Save the optimizer at the end of the epoch."
        )
    if not math.isclose(got["lr"], expected["lr"], rel_tol=1e-9):
        problems.append(
            f"scheduler state not restored: the learning rate after the restart was "
            f"{got['lr']:.3g}, the uninterrupted run used {expected['lr']:.3g} at "
            "that step. Load state['scheduler'] with scheduler.load_state_dict."
        )
    return problems


def _loss_jumps(reference, combined) -> list[tuple[int, float, float]]:
    expected = {event["epoch"]: event["loss"] for event in reference}
    jumps = []
    for event in combined:
        target = expected.get(event["epoch"])
        if target is not None and abs(event["loss"] - target) > 1e-6:
            jumps.append((event["epoch"], event["loss"], target))
    return jumps


def _max_weight_difference(runs) -> float | None:
    paths = [runs["uninterrupted"]["weights"], runs["resumed"]["weights"]]
    if None in paths:
        return None
    reference, resumed = (torch.load(p, map_location="cpu", weights_only=True)
                          for p in paths)
    if reference.keys() != resumed.keys():
        return math.inf
    return max(
        float((reference[key].double() - resumed[key].double()).abs().max())
        if reference[key].numel() else 0.0
        for key in reference
    )


# ---------------------------------------------------------------------------
# Exercise 18.5.3: loss down, metric flat
# ---------------------------------------------------------------------------

# Thresholds on the runs of exercise 18.5.3, chosen from measured runs; the
# solution notebook prints the measured values next to them.
PATHOLOGY_MAX_RECALL = 0.10
PATHOLOGY_MIN_ACCURACY = 0.93
PATHOLOGY_MAX_LOSS_RATIO = 0.90
FIXED_MIN_RECALL = 0.50
FIXED_MIN_F1 = 0.35
FIXED_MIN_RECALL_GAIN = 0.30
POSITIVE_FRACTION = (0.04, 0.06)
_METRIC_KEYS = ("precision", "recall", "f1")
_EVALUATE_KEYS = ("loss", "accuracy", "precision", "recall", "f1")


def check_imbalanced_data(train, val) -> None:
    """Check the binary splits of part 1: labels 0 and 1, about 5% ones."""
    _passed(score_imbalanced_data(run_imbalanced_data(train, val)))


def run_imbalanced_data(train, val) -> dict[str, Any]:
    summary = {}
    for name, split in (("train", train), ("val", val)):
        if split is None:
            summary[name] = None
            continue
        labels = split.labels
        summary[name] = {
            "size": int(len(labels)),
            "label_values": sorted(int(v) for v in torch.unique(labels)),
            "positives": int((labels == 1).sum()),
            "images_shape": list(split.images.shape),
        }
    return summary


def score_imbalanced_data(summary: Mapping[str, Any]) -> str:
    for name in ("train", "val"):
        if summary.get(name) is None:
            raise ExerciseIncomplete(
                f"Complete part 1: {name}_binary is still None; build it with "
                "cl.make_imbalanced_binary from the matching split."
            )
    for name in ("train", "val"):
        split = summary[name]
        if split["label_values"] != [0, 1]:
            raise CheckFailed(
                f"{name}_binary has labels {split['label_values']}; a binary set has "
                "labels 0 and 1. Use make_imbalanced_binary, which maps the "
                "positive digit to 1 and every other digit to 0."
            )
        fraction = split["positives"] / split["size"]
        low, high = POSITIVE_FRACTION
        if not low <= fraction <= high:
            raise CheckFailed(
                f"{name}_binary has {fraction:.1%} positives; the exercise needs "
                f"about 5% (between {low:.0%} and {high:.0%}). Pass "
                "positive_fraction=0.05."
            )
    return (
        f"binary splits with {summary['train']['positives']} of "
        f"{summary['train']['size']} (train) and {summary['val']['positives']} of "
        f"{summary['val']['size']} (val) positives"
    )


def _metric_cases() -> list[dict[str, Any]]:
    """Return hidden prediction cases with a description of each."""
    generator = torch.Generator().manual_seed(18053)

    def random_case(size, positive_rate, flip_rate):
        targets = (torch.rand(size, generator=generator) < positive_rate).long()
        flip = torch.rand(size, generator=generator) < flip_rate
        preds = torch.where(flip, 1 - targets, targets)
        return preds, targets

    cases = []
    for index, (size, rate, flip) in enumerate(
        ((200, 0.1, 0.15), (1000, 0.05, 0.04), (64, 0.5, 0.3), (333, 0.2, 0.1))
    ):
        preds, targets = random_case(size, rate, flip)
        cases.append({"name": f"random case {index + 1}", "preds": preds,
                      "targets": targets})
    targets = torch.tensor([0] * 18 + [1, 1])
    cases += [
        {"name": "no predicted positives (precision is 0/0)",
         "preds": torch.zeros(20, dtype=torch.long), "targets": targets},
        {"name": "no actual positives (recall is 0/0)",
         "preds": torch.tensor([0] * 17 + [1, 1, 0]),
         "targets": torch.zeros(20, dtype=torch.long)},
        {"name": "no positives at all (every ratio is 0/0)",
         "preds": torch.zeros(10, dtype=torch.long),
         "targets": torch.zeros(10, dtype=torch.long)},
        {"name": "every prediction right", "preds": targets.clone(),
         "targets": targets},
        {"name": "every prediction wrong", "preds": 1 - targets, "targets": targets},
    ]
    return cases


def _reference_metrics(preds: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    result = binary_metrics(preds, targets)
    return {key: result[key] for key in _METRIC_KEYS}


def check_positive_class_metrics(function: Callable) -> None:
    """Check ``function(preds, targets)`` on hidden cases, including 0/0 ones."""
    _passed(score_positive_class_metrics(run_positive_class_metrics(function)))


def run_positive_class_metrics(function: Callable) -> dict[str, Any]:
    results = []
    for case in _metric_cases():
        outcome = _call(function, case["preds"].clone(), case["targets"].clone())
        if "value" in outcome:
            outcome = _metrics_to_floats(outcome["value"], _METRIC_KEYS)
        results.append({"name": case["name"], **outcome})
    return {"results": results}


def _metrics_to_floats(value, keys) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        return {"bad_value": f"returned {type(value).__name__}, expected a dict"}
    missing = [key for key in keys if key not in value]
    if missing:
        return {"bad_value": f"the returned dict lacks the keys {missing}"}
    try:
        return {"value": {key: float(value[key]) for key in keys}}
    except (TypeError, ValueError, RuntimeError) as err:
        return {"bad_value": f"a value could not be converted to float ({err})"}


def score_positive_class_metrics(results: Mapping[str, Any]) -> str:
    cases = {case["name"]: case for case in _metric_cases()}
    for item in results["results"]:
        if "error" in item:
            _raise_for_error(
                item["error"], "part 2", "positive_class_metrics(preds, targets)"
            )
        if "bad_value" in item:
            raise CheckFailed(
                f"positive_class_metrics {item['bad_value']}; return a dict with "
                "float values for 'precision', 'recall' and 'f1'."
            )
    for item in results["results"]:
        case = cases[item["name"]]
        expected = _reference_metrics(case["preds"], case["targets"])
        for key in _METRIC_KEYS:
            got = item["value"][key]
            if math.isnan(got) or abs(got - expected[key]) > 1e-6:
                raise CheckFailed(_metric_mismatch(item["name"], key, got, expected))
    return (
        f"precision, recall and F1 match the reference on {len(cases)} hidden "
        "cases, including the zero-division ones"
    )


def _metric_mismatch(name, key, got, expected) -> str:
    message = (
        f"On the hidden case '{name}', {key} is {got:.4f} but should be "
        f"{expected[key]:.4f}."
    )
    if "0/0" in name or math.isnan(got):
        message += (
            " When a ratio has a zero denominator, the zero-division rule makes "
            "it 0.0 (torchmetrics and scikit-learn use the same default)."
        )
    else:
        message += (
            " Count TP, FP and FN for class 1 over all predictions; precision is "
            "TP / (TP + FP), recall TP / (TP + FN), F1 their harmonic mean."
        )
    return message


class _FixedLogits(nn.Module):
    """A model whose inputs are already its logits; it has one parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs * self.scale


def _evaluate_case() -> tuple[torch.Tensor, torch.Tensor, int]:
    """Return logits, targets and a batch size that split into uneven batches.

    The positives sit mostly in the first batch, and the last batch is short,
    so averages over batches differ from averages over samples.
    """
    generator = torch.Generator().manual_seed(18054)
    size, batch_size = 300, 64
    targets = torch.zeros(size, dtype=torch.long)
    targets[torch.tensor([2, 5, 9, 11, 17, 23, 30, 41, 50, 63, 100, 290])] = 1
    confidence = torch.randn(size, generator=generator) + 2.5 * (2 * targets - 1)
    confidence[torch.tensor([5, 17, 63, 290, 120, 200])] *= -1
    logits = torch.stack([-confidence / 2, confidence / 2], dim=1)
    return logits, targets, batch_size


def _evaluate_reference() -> dict[str, Any]:
    logits, targets, batch_size = _evaluate_case()
    preds = logits.argmax(dim=1)
    epoch = _reference_metrics(preds, targets)
    epoch["loss"] = float(nn.functional.cross_entropy(logits, targets))
    epoch["accuracy"] = float((preds == targets).double().mean())
    batch_values: dict[str, list[float]] = {key: [] for key in _EVALUATE_KEYS}
    for start in range(0, len(targets), batch_size):
        part = slice(start, start + batch_size)
        metrics = _reference_metrics(preds[part], targets[part])
        batch_loss = nn.functional.cross_entropy(logits[part], targets[part])
        metrics["loss"] = float(batch_loss)
        metrics["accuracy"] = float((preds[part] == targets[part]).double().mean())
        for key in _EVALUATE_KEYS:
            batch_values[key].append(metrics[key])
    per_batch = {key: sum(v) / len(v) for key, v in batch_values.items()}
    return {"epoch": epoch, "per_batch": per_batch}


def check_evaluate(evaluate: Callable) -> None:
    """Check ``evaluate(model, loader)`` on a fixed model and uneven batches."""
    _passed(score_evaluate(run_evaluate(evaluate)))


def run_evaluate(evaluate: Callable) -> dict[str, Any]:
    from .data import TensorLoader

    logits, targets, batch_size = _evaluate_case()
    loader = TensorLoader(logits, targets, batch_size=batch_size, shuffle=False)
    outcome = _call(evaluate, _FixedLogits(), loader)
    if "value" in outcome:
        outcome = _metrics_to_floats(outcome["value"], _EVALUATE_KEYS)
    return outcome


def score_evaluate(result: Mapping[str, Any]) -> str:
    if "error" in result:
        _raise_for_error(result["error"], "part 2", "evaluate(model, loader)")
    if "bad_value" in result:
        raise CheckFailed(
            f"evaluate {result['bad_value']}; return a dict with float values for "
            f"{', '.join(repr(k) for k in _EVALUATE_KEYS)}."
        )
    reference = _evaluate_reference()
    got = result["value"]
    wrong = [key for key in _EVALUATE_KEYS
             if abs(got[key] - reference["epoch"][key]) > 1e-5]
    per_batch = [key for key in wrong
                 if abs(got[key] - reference["per_batch"][key]) <= 1e-5]
    if "loss" in per_batch:
        raise CheckFailed(
            f"the loss is averaged per batch ({got['loss']:.4f} instead of "
            f"{reference['epoch']['loss']:.4f}), so the short last batch counts as "
            "much as a full one. Sum loss * batch size and divide by the number "
            "of samples."
        )
    if per_batch:
        names = " and ".join([", ".join(per_batch[:-1]), per_batch[-1]]
                             if len(per_batch) > 1 else per_batch)
        values = ", ".join(
            f"{key} {got[key]:.4f} instead of {reference['epoch'][key]:.4f}"
            for key in per_batch
        )
        raise CheckFailed(
            f"{names} {'are' if len(per_batch) > 1 else 'is'} averaged per batch "
            f"({values}). A batch with one positive then "
            "counts as much as one with ten, and a batch without positives adds 0. "
            "Collect the predictions and targets of the whole epoch (or its TP, "
            "FP and FN counts) and compute the metrics once, at the end."
        )
    if wrong:
        key = wrong[0]
        raise CheckFailed(
            f"evaluate returned {key} {got[key]:.4f}, expected "
            f"{reference['epoch'][key]:.4f} on a fixed model and loader. Compute "
            "the loss as the mean cross-entropy over all samples and the metrics "
            "from the epoch's predictions."
        )
    return "evaluate computes the loss and the class-1 metrics over the whole epoch"


def check_pathological_run(history: Mapping[str, list] | None) -> None:
    """Check that the unweighted run shows loss falling and recall near zero."""
    _passed(score_pathological_run(run_pathological_run(history)["history"]))


def run_pathological_run(history: Any) -> dict[str, Any]:
    """Return the columns of the unweighted run's history as lists of floats."""
    return {"history": _history_columns(history)}


def _history_columns(history) -> dict[str, list[float]] | None:
    if history is None:
        return None
    columns = history.columns if hasattr(history, "columns") else list(history)
    return {column: [float(x) for x in history[column]] for column in columns}


_RUN_COLUMNS = ("train_loss", "val_loss", "val_acc", "val_recall", "val_f1")


def _check_run_columns(history, name: str) -> None:
    if not history or not history.get("val_loss"):
        raise ExerciseIncomplete(
            f"Complete parts 1 and 2, then run the training cell: {name} is "
            "still empty."
        )
    missing = [column for column in _RUN_COLUMNS if column not in history]
    if missing:
        raise CheckFailed(
            f"{name} lacks the columns {missing}; use the fit function given in "
            "the notebook, which logs them every epoch."
        )


def score_pathological_run(history: Mapping[str, list] | None) -> str:
    _check_run_columns(history, "baseline_history")
    epochs = len(history["val_loss"])
    first_loss, last_loss = history["val_loss"][0], history["val_loss"][-1]
    if last_loss > PATHOLOGY_MAX_LOSS_RATIO * first_loss:
        raise CheckFailed(
            f"the validation loss went from {first_loss:.3f} to {last_loss:.3f}; "
            f"this run should show it falling below {PATHOLOGY_MAX_LOSS_RATIO:.0%} "
            "of its first value. Keep the settings given in the notebook."
        )
    if history["train_loss"][-1] >= history["train_loss"][0]:
        raise CheckFailed(
            "the training loss did not fall; keep the settings given in the notebook."
        )
    low_accuracy = min(history["val_acc"])
    if low_accuracy < PATHOLOGY_MIN_ACCURACY:
        raise CheckFailed(
            f"the validation accuracy fell to {low_accuracy:.3f}; this run should "
            f"stay above {PATHOLOGY_MIN_ACCURACY}. Check that the model is trained "
            "with the plain, unweighted cross-entropy."
        )
    high_recall = max(history["val_recall"])
    if high_recall > PATHOLOGY_MAX_RECALL:
        raise CheckFailed(
            f"class-1 recall reached {high_recall:.2f}, so this run does not show "
            f"the pathology (recall at most {PATHOLOGY_MAX_RECALL} every epoch). "
            "Keep the settings given in the notebook and the unweighted loss."
        )
    return (
        f"over {epochs} epochs the validation loss fell from {first_loss:.3f} to "
        f"{last_loss:.3f} and accuracy stayed at or above {low_accuracy:.3f}, "
        f"while class-1 recall never exceeded {high_recall:.2f}"
    )


def check_class_weights(function: Callable) -> None:
    """Check ``function(labels)`` on hidden label sets."""
    _passed(score_class_weights(run_class_weights(function)))


_WEIGHT_CASES = {
    "95% zeros": [0] * 95 + [1] * 5,
    "60% zeros": [0] * 60 + [1] * 40,
    "balanced": [0] * 50 + [1] * 50,
    "80% ones": [0] * 20 + [1] * 80,
}


def run_class_weights(function: Callable) -> dict[str, Any]:
    results = []
    for name, labels in _WEIGHT_CASES.items():
        outcome = _call(function, torch.tensor(labels))
        if "value" in outcome:
            value = outcome["value"]
            if not isinstance(value, torch.Tensor):
                outcome = {"bad_value": f"returned {type(value).__name__}, "
                                        "expected a tensor"}
            elif value.shape != (2,) or not value.is_floating_point():
                outcome = {"bad_value": f"returned a {value.dtype} tensor of shape "
                                        f"{tuple(value.shape)}"}
            else:
                outcome = {"value": [float(x) for x in value]}
        results.append({"name": name, **outcome})
    return {"results": results}


def score_class_weights(results: Mapping[str, Any]) -> str:
    for item in results["results"]:
        if "error" in item:
            _raise_for_error(item["error"], "part 3", "class_weights(labels)")
        if "bad_value" in item:
            raise CheckFailed(
                f"class_weights {item['bad_value']}; return a float tensor of shape "
                "(2,), as nn.CrossEntropyLoss(weight=...) expects."
            )
    for item in results["results"]:
        _check_weight_ratio(item["name"], item["value"])
    return "class weights are inversely proportional to the class counts"


def _check_weight_ratio(name: str, weights: list[float]) -> None:
    labels = _WEIGHT_CASES.get(name)
    counts = [labels.count(0), labels.count(1)] if labels else None
    if min(weights) <= 0:
        raise CheckFailed(
            f"class weights {weights} for the labels '{name}' include a weight of "
            "zero or less; every class needs a positive weight."
        )
    ratio = weights[1] / weights[0]
    if counts is None:
        return
    expected = counts[0] / counts[1]
    if abs(ratio - expected) <= 0.01 * expected:
        return
    if abs(ratio - 1 / expected) <= 0.01 / expected and expected != 1:
        raise CheckFailed(
            f"inverted class weights: for '{name}' (counts {counts}) you gave class 1 "
            f"{ratio:.3g} times the weight of class 0, but it should get "
            f"{expected:.3g} times. The rare class needs the larger weight: weight "
            "each class by the inverse of its count."
        )
    raise CheckFailed(
        f"for '{name}' (counts {counts}) class 1 gets {ratio:.3g} times the weight "
        f"of class 0; it should get {expected:.3g} times (count of class 0 / count "
        "of class 1). Weight each class by N / (2 * its count)."
    )


def check_fixed_run(
    history: Mapping[str, list] | None,
    baseline_history: Mapping[str, list] | None,
    weights: torch.Tensor | None,
) -> None:
    """Check that the weighted run lifts class-1 recall and F1 past thresholds."""
    _passed(score_fixed_run(run_fixed_run(history, baseline_history, weights)))


def run_fixed_run(history: Any, baseline_history: Any, weights: Any) -> dict[str, Any]:
    """Return both runs' histories and the class weights as JSON values."""
    return {
        "history": _history_columns(history),
        "baseline": _history_columns(baseline_history),
        "weights": [float(x) for x in weights] if weights is not None else None,
    }


def score_fixed_run(result: Mapping[str, Any]) -> str:
    weights = result.get("weights")
    if weights is None:
        raise ExerciseIncomplete(
            "Complete part 3: weights is still None; set it to "
            "class_weights(train_binary.labels)."
        )
    if len(weights) == 2 and weights[1] < weights[0]:
        raise CheckFailed(
            f"inverted class weights: the run used [{weights[0]:.3f}, "
            f"{weights[1]:.3f}], which gives class 0, "
            "the common class, the larger weight. Weight each class by the inverse "
            "of its count, so that class 1 gets the larger weight."
        )
    history = result.get("history")
    _check_run_columns(history, "weighted_history")
    recall, f1 = history["val_recall"][-1], history["val_f1"][-1]
    baseline = result.get("baseline")
    base_recall = baseline["val_recall"][-1] if baseline and baseline.get(
        "val_recall") else 0.0
    if recall < FIXED_MIN_RECALL or f1 < FIXED_MIN_F1:
        raise CheckFailed(
            f"at the last epoch class-1 recall is {recall:.2f} and F1 {f1:.2f}; the "
            f"weighted run should reach recall {FIXED_MIN_RECALL} and F1 "
            f"{FIXED_MIN_F1}. Pass weight=weights to nn.CrossEntropyLoss for "
            "training, and keep the other settings of the baseline run."
        )
    if recall < base_recall + FIXED_MIN_RECALL_GAIN:
        raise CheckFailed(
            f"class-1 recall rose only from {base_recall:.2f} to {recall:.2f}; the "
            f"weighted loss should add at least {FIXED_MIN_RECALL_GAIN}."
        )
    return (
        f"with class weights {weights[0]:.3f} and {weights[1]:.3f}, class-1 recall "
        f"rose from {base_recall:.2f} to {recall:.2f} and F1 reached {f1:.2f} "
        f"(thresholds {FIXED_MIN_RECALL} and {FIXED_MIN_F1})"
    )


# ---------------------------------------------------------------------------
# The run and score step of every check, by the name after ``check_``
# ---------------------------------------------------------------------------


class Check(NamedTuple):
    """The two steps of a check: `run` calls student code, `score` judges.

    `run` takes the check cell's arguments and returns JSON values only;
    `score` takes that dict and returns the success line or raises
    `CheckFailed`.
    """

    run: Callable[..., dict[str, Any]]
    score: Callable[[Mapping[str, Any]], str]


CHECKS: dict[str, Check] = {
    "curve_answers": Check(
        run_curve_answers, lambda result: score_curve_answers(result["answers"])
    ),
    "diagnose": Check(run_diagnose, score_diagnose),
    "resume": Check(run_resume, score_resume),
    "optimizer_explanation": Check(
        run_optimizer_explanation, score_optimizer_explanation
    ),
    "imbalanced_data": Check(run_imbalanced_data, score_imbalanced_data),
    "positive_class_metrics": Check(
        run_positive_class_metrics, score_positive_class_metrics
    ),
    "evaluate": Check(run_evaluate, score_evaluate),
    "pathological_run": Check(
        run_pathological_run, lambda result: score_pathological_run(result["history"])
    ),
    "class_weights": Check(run_class_weights, score_class_weights),
    "fixed_run": Check(run_fixed_run, score_fixed_run),
}
