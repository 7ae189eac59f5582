"""Recorded training curves and a bank of curve cases for the diagnosis exercise.

Exercise 18.5.1 shows five real runs on the bundled MNIST subset: one that
underfits, one that overfits, one that is undertrained, one that is unstable
and a healthy one. Training them takes about a minute, so their histories are
recorded once by this module and stored in ``course_lib/data/trajectories.json``:

    python -m course_lib.trajectories            # rewrite the JSON file

The same module builds the bank that `course_lib.checks` runs a student's
``diagnose`` on: the five recorded runs, perturbed copies of them and synthetic
curves, none of which the notebook shows except the recorded runs.

The diagnosis rules read only the ``train_acc`` and ``val_acc`` columns:

1. instability: either accuracy falls by more than `DROP` from one epoch to the
   next at least `MIN_DROPS` times;
2. overfitting: the final train accuracy is at least `GAP` above the final
   validation accuracy;
3. undertraining: both accuracies are still rising, each with a `gain` of at
   least `RISE`, where the gain is the mean of the last three epochs minus the
   mean of the three epochs before them;
4. underfitting: the final train accuracy is below `LOW`;
5. healthy: none of the above.

The first rule that matches wins.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

logger = logging.getLogger(__name__)

DATA_FILE = "data/trajectories.json"
LABELS = ("underfitting", "overfitting", "undertraining", "instability", "healthy")

# Thresholds of the diagnosis rules, which the module docstring states.
DROP = 0.05
MIN_DROPS = 3
GAP = 0.10
RISE = 0.015
LOW = 0.75
MIN_EPOCHS = 6

# Settings of the recorded runs. Each run is a cl.MLP trained by
# cl.train_model with patience equal to the epoch count, so none stops early.
RUNS: dict[str, dict[str, Any]] = {
    "a": {
        "label": "underfitting",
        "title": "(a) 3 hidden units",
        "hidden": 3, "dropout": 0.0, "train_size": None, "label_noise": 0.0,
        "optimizer": "AdamW", "lr": 5e-3, "weight_decay": 0.0, "momentum": 0.0,
        "scheduler": "cosine", "batch_size": 64, "epochs": 16, "seed": 1,
    },
    "b": {
        "label": "overfitting",
        "title": "(b) 500 images, 25% wrong labels",
        "hidden": 512, "dropout": 0.0, "train_size": 500, "label_noise": 0.25,
        "optimizer": "AdamW", "lr": 2e-4, "weight_decay": 0.0, "momentum": 0.0,
        "scheduler": None, "batch_size": 32, "epochs": 40, "seed": 0,
    },
    "c": {
        "label": "undertraining",
        "title": "(c) plain SGD at lr 0.005, 8 epochs",
        "hidden": 256, "dropout": 0.0, "train_size": None, "label_noise": 0.0,
        "optimizer": "SGD", "lr": 5e-3, "weight_decay": 0.0, "momentum": 0.0,
        "scheduler": None, "batch_size": 64, "epochs": 8, "seed": 0,
    },
    "d": {
        "label": "instability",
        "title": "(d) plain SGD at lr 0.8, 512 images",
        "hidden": 256, "dropout": 0.0, "train_size": 512, "label_noise": 0.0,
        "optimizer": "SGD", "lr": 0.8, "weight_decay": 0.0, "momentum": 0.0,
        "scheduler": None, "batch_size": 64, "epochs": 20, "seed": 2,
    },
    "healthy": {
        "label": "healthy",
        "title": "healthy: AdamW at lr 1e-3, cosine schedule",
        "hidden": 256, "dropout": 0.2, "train_size": None, "label_noise": 0.0,
        "optimizer": "AdamW", "lr": 1e-3, "weight_decay": 0.01, "momentum": 0.0,
        "scheduler": "cosine", "batch_size": 64, "epochs": 12, "seed": 0,
    },
}
# Seeds of the random training subsets and of the wrong labels.
SUBSET_SEED = 1
NOISE_SEED = 7
COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")


def curve_features(train_acc, val_acc) -> dict[str, float]:
    """Return the numbers that the diagnosis rules compare with their thresholds.

    Args:
        train_acc, val_acc: per-epoch accuracies as fractions, same length, at
            least `MIN_EPOCHS` epochs.

    Returns:
        ``train_drops`` and ``val_drops`` (falls larger than `DROP`),
        ``gap`` (final train minus final val accuracy), ``train_gain`` and
        ``val_gain`` (mean of the last three epochs minus the three before),
        ``final_train`` and ``epochs``.
    """
    train = [float(x) for x in train_acc]
    val = [float(x) for x in val_acc]
    if len(train) != len(val) or len(train) < MIN_EPOCHS:
        raise ValueError(
            f"need train and val accuracies of equal length, at least {MIN_EPOCHS} "
            f"epochs; got {len(train)} and {len(val)}"
        )
    return {
        "train_drops": _count_drops(train),
        "val_drops": _count_drops(val),
        "gap": train[-1] - val[-1],
        "train_gain": _gain(train),
        "val_gain": _gain(val),
        "final_train": train[-1],
        "epochs": len(train),
    }


def _count_drops(values: list[float]) -> int:
    return sum(1 for before, after in zip(values, values[1:]) if before - after > DROP)


def _gain(values: list[float]) -> float:
    return sum(values[-3:]) / 3 - sum(values[-6:-3]) / 3


def label_from_features(features: Mapping[str, float]) -> str:
    """Apply the diagnosis rules, in order, to `curve_features` output."""
    if max(features["train_drops"], features["val_drops"]) >= MIN_DROPS:
        return "instability"
    if features["gap"] >= GAP:
        return "overfitting"
    if min(features["train_gain"], features["val_gain"]) >= RISE:
        return "undertraining"
    if features["final_train"] < LOW:
        return "underfitting"
    return "healthy"


def has_margin(features: Mapping[str, float], label: str) -> bool:
    """Return True if `label` is true with a margin on every threshold.

    The bank keeps only cases whose label would not change if a rule's
    threshold moved a little, so a correct ``diagnose`` that rounds or compares
    with ``>`` instead of ``>=`` still gets every case right.
    """
    drops = max(features["train_drops"], features["val_drops"])
    unstable = drops >= MIN_DROPS + 1
    stable = drops <= MIN_DROPS - 2
    wide_gap = features["gap"] >= GAP + 0.03
    narrow_gap = features["gap"] <= GAP - 0.03
    rising = min(features["train_gain"], features["val_gain"]) >= RISE + 0.005
    flat = min(features["train_gain"], features["val_gain"]) <= RISE - 0.005
    low = features["final_train"] <= LOW - 0.05
    high = features["final_train"] >= LOW + 0.05
    if label == "instability":
        return unstable
    if label == "overfitting":
        return stable and wide_gap
    if label == "undertraining":
        return stable and narrow_gap and rising
    if label == "underfitting":
        return stable and narrow_gap and flat and low
    if label == "healthy":
        return stable and narrow_gap and flat and high
    raise ValueError(f"unknown label {label!r}; use one of {', '.join(LABELS)}")


def load_trajectories() -> dict[str, dict[str, Any]]:
    """Return the recorded runs by key ("a" to "d" and "healthy").

    Each value has ``label``, ``title``, ``settings`` (the `RUNS` entry) and
    ``history``, a `course_lib.History` with the columns in `COLUMNS`.
    """
    from .history import History

    text = resources.files("course_lib").joinpath(DATA_FILE).read_text("utf-8")
    stored = json.loads(text)
    runs = {}
    for key, run in stored["runs"].items():
        columns = run["history"]
        rows = [
            {column: columns[column][i] for column in COLUMNS}
            for i in range(len(columns["epoch"]))
        ]
        runs[key] = {
            "label": run["label"],
            "title": run["title"],
            "settings": run["settings"],
            "history": History(rows),
        }
    return runs


def recording_info() -> dict[str, str]:
    """Return the torch version and platform that recorded the stored runs."""
    text = resources.files("course_lib").joinpath(DATA_FILE).read_text("utf-8")
    return json.loads(text)["recorded_with"]


def train_trajectory(key: str) -> dict[str, list[float]]:
    """Train the recorded run `key` from `RUNS` again and return its columns."""
    from .cli import seed_everything
    from .data import Split, TensorLoader, load_dataset
    from .loop import train_model
    from .models import MLP

    settings = RUNS[key]
    splits = load_dataset("mnist_5k", seed=0)
    train = splits.train
    if settings["train_size"] is not None:
        # The split is sorted by class, so the subset is drawn at random.
        generator = torch.Generator().manual_seed(SUBSET_SEED)
        keep = torch.randperm(len(train), generator=generator)[: settings["train_size"]]
        train = Split(train.images[keep], train.labels[keep])
    if settings["label_noise"]:
        train = _with_wrong_labels(train, settings["label_noise"], splits.num_classes)

    seed_everything(settings["seed"])
    model = MLP(splits.input_shape, splits.num_classes,
                hidden=settings["hidden"], dropout=settings["dropout"])
    if settings["optimizer"] == "SGD":
        optimizer = torch.optim.SGD(model.parameters(), lr=settings["lr"],
                                    momentum=settings["momentum"])
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"],
                                      weight_decay=settings["weight_decay"])
    train_loader = TensorLoader.from_split(
        train, batch_size=settings["batch_size"], shuffle=True, seed=settings["seed"]
    )
    val_loader = TensorLoader.from_split(splits.val, batch_size=500)
    with tempfile.TemporaryDirectory(prefix="trajectory-") as out_dir:
        result = train_model(
            model, train_loader, val_loader,
            epochs=settings["epochs"], patience=settings["epochs"],
            optimizer=optimizer, scheduler=settings["scheduler"], device="cpu",
            out_dir=out_dir, live_plot=False, progress=False,
        )
    return {column: result.history[column] for column in COLUMNS}


def _with_wrong_labels(split, fraction: float, num_classes: int):
    # Each chosen image gets a label drawn uniformly from all classes, so about
    # one in num_classes of them keeps its true label by chance.
    from .data import Split

    generator = torch.Generator().manual_seed(NOISE_SEED)
    labels = split.labels.clone()
    chosen = torch.rand(len(labels), generator=generator) < fraction
    labels[chosen] = torch.randint(
        0, num_classes, (int(chosen.sum()),), generator=generator
    )
    return Split(split.images, labels)


def record_trajectories(path: str | Path | None = None, keys=None) -> Path:
    """Train the runs in `RUNS` and write their histories as JSON.

    Args:
        path: the output file; by default the package's data file.
        keys: the runs to train again; the others keep their stored history.
    """
    target = Path(path) if path is not None else _package_data_path()
    stored = {}
    if target.exists():
        stored = json.loads(target.read_text("utf-8")).get("runs", {})
    runs = {}
    for key, settings in RUNS.items():
        if keys is None or key in keys or key not in stored:
            logger.info("training run %s: %s", key, settings["title"])
            history = train_trajectory(key)
        else:
            history = stored[key]["history"]
        label = label_from_features(
            curve_features(history["train_acc"], history["val_acc"])
        )
        if label != settings["label"]:
            logger.warning(
                "run %s reads as %s, not %s; change its settings in RUNS",
                key, label, settings["label"],
            )
        public = {name: value for name, value in settings.items()
                  if name not in ("label", "title")}
        runs[key] = {
            "label": settings["label"],
            "title": settings["title"],
            "settings": public,
            "history": {
                column: [_rounded(value) for value in history[column]]
                for column in COLUMNS
            },
        }
    document = {
        "description": "Per-epoch histories written by "
        "python -m course_lib.trajectories",
        "recorded_with": {
            "torch": torch.__version__,
            "platform": f"{platform.system()} {platform.machine()}",
            "device": "cpu, 1 thread",
        },
        "runs": runs,
    }
    target.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    return target


def _rounded(value):
    return round(value, 6) if isinstance(value, float) else value


def _package_data_path() -> Path:
    return Path(__file__).resolve().parent / DATA_FILE


def diagnosis_cases() -> list[dict[str, Any]]:
    """Return the bank of labelled curves that ``diagnose`` is checked on.

    Each case is a dict with ``id``, ``label``, ``seen`` and ``history``.
    ``seen`` is True for the recorded runs that the notebook plots. The
    history is a `History` for cases derived from recorded runs, and a dict of
    lists with ``epoch``, ``train_acc`` and ``val_acc`` for synthetic ones.
    The bank is rebuilt the same way on every call, from fixed seeds.
    """
    from .history import History

    cases = []
    recorded = load_trajectories()
    for key, run in recorded.items():
        cases.append({"id": f"recorded-{key}", "label": run["label"], "seen": True,
                      "history": run["history"]})

    rng = np.random.default_rng(18051)
    for key, run in recorded.items():
        for variant, columns in _perturbed(run["history"], run["label"], rng):
            rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
            cases.append({"id": f"perturbed-{key}-{variant}", "label": run["label"],
                          "seen": False, "history": History(rows)})

    for label in LABELS:
        for index in range(4):
            cases.append({"id": f"synthetic-{label}-{index + 1}", "label": label,
                          "seen": False, "history": _synthetic(label, rng)})

    for case in cases:
        features = curve_features(case["history"]["train_acc"],
                                  case["history"]["val_acc"])
        if not has_margin(features, case["label"]):
            raise RuntimeError(
                f"bank case {case['id']} does not show {case['label']} with margin: "
                f"{features}; change its generator"
            )
    return cases


def _perturbed(history, label: str, rng: np.random.Generator):
    """Yield (variant name, columns) copies of a recorded history."""
    base = {column: list(history[column]) for column in history.columns}

    noisy = dict(base)
    for column in ("train_acc", "val_acc"):
        noise = rng.normal(0.0, 0.003, len(base[column]))
        noisy[column] = [_clip(x + n) for x, n in zip(base[column], noise)]
    yield "noise", noisy

    # Starting later shows the same condition over fewer epochs, except for
    # the undertrained run, which only has 8 epochs and is cut at the end.
    if label == "undertraining":
        cut = {column: values[:7] for column, values in base.items()}
    else:
        cut = {column: values[2:] for column, values in base.items()}
    cut["epoch"] = list(range(1, len(cut["epoch"]) + 1))
    yield "shorter", cut

    shift = {"underfitting": -0.12, "undertraining": -0.1, "healthy": -0.03,
             "overfitting": -0.05, "instability": 0.1}[label]
    shifted = dict(base)
    for column in ("train_acc", "val_acc"):
        offset = shift if column == "val_acc" or label != "overfitting" else 0.0
        shifted[column] = [_clip(x + offset) for x in base[column]]
    yield "shifted", shifted


def _synthetic(label: str, rng: np.random.Generator) -> dict[str, list[float]]:
    """Return one synthetic history that shows `label` with margin."""
    for _ in range(1000):
        epochs = int(rng.integers(8, 25))
        e = np.arange(1, epochs + 1, dtype=float)
        if label == "underfitting":
            level = rng.uniform(0.3, 0.65)
            train = level - (level - 0.12) * np.exp(-rng.uniform(0.9, 1.6) * e)
            val = train - rng.uniform(-0.02, 0.04)
        elif label == "healthy":
            level = rng.uniform(0.88, 0.995)
            train = level - (level - 0.5) * np.exp(-rng.uniform(0.7, 1.3) * e)
            val = train - rng.uniform(0.0, 0.06) * (1 - np.exp(-0.3 * e))
        elif label == "undertraining":
            epochs = int(rng.integers(6, 12))
            e = np.arange(1, epochs + 1, dtype=float)
            level = rng.uniform(0.85, 1.0)
            train = level - (level - 0.1) * np.exp(-rng.uniform(0.1, 0.22) * e)
            val = train - rng.uniform(-0.02, 0.04)
        elif label == "overfitting":
            peak_epoch = rng.uniform(3, max(4, epochs / 2))
            peak = rng.uniform(0.6, 0.9)
            train = 1.0 - 0.7 * np.exp(-rng.uniform(0.25, 0.6) * e)
            rise = peak * (1 - 0.6 * np.exp(-e / 2))
            fall = rng.uniform(0.002, 0.012) * np.maximum(e - peak_epoch, 0)
            val = np.minimum(rise, train - 0.02) - fall
        else:
            level = rng.uniform(0.3, 0.8)
            train = level + rng.uniform(0.08, 0.2) * rng.choice([-1, 1], epochs)
            val = train - rng.uniform(0.0, 0.05) + rng.normal(0, 0.05, epochs)
        train = train + rng.normal(0.0, 0.004, epochs)
        val = val + rng.normal(0.0, 0.004, epochs)
        columns = {
            "epoch": list(range(1, epochs + 1)),
            "train_acc": [_clip(x) for x in train],
            "val_acc": [_clip(x) for x in val],
        }
        if has_margin(curve_features(columns["train_acc"], columns["val_acc"]), label):
            return columns
    raise RuntimeError(f"no synthetic {label} history with margin in 1000 draws")


def _clip(value: float) -> float:
    return round(min(1.0, max(0.0, float(value))), 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m course_lib.trajectories",
        description="Train the runs of exercise 18.5.1 and store their histories.",
    )
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output JSON file (default: course_lib/{DATA_FILE})")
    parser.add_argument("--only", nargs="+", choices=sorted(RUNS), default=None,
                        help="train only these runs and keep the others as stored")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # One thread: the stored numbers then repeat exactly on the same machine,
    # and small models gain nothing from more.
    torch.set_num_threads(1)
    path = record_trajectories(args.out, keys=args.only)
    logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
