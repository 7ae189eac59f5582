"""course_lib: the reference training loop of "The Training Loop" course."""

from .checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    load_weights,
    restore_rng_state,
    save_checkpoint,
)
from .cli import configure_logging, seed_everything
from .data import (
    DataSplits,
    DatasetUnavailableError,
    Split,
    TensorLoader,
    load_dataset,
    make_imbalanced_binary,
    make_loaders,
)
from .device import pick_device, pick_precision, to_device
from .history import History
from .loop import (
    EarlyStopping,
    NonFiniteLossError,
    TrainResult,
    run_epoch,
    train_model,
)
from .metrics import ConfusionMatrix, metrics_from_counts
from .models import MLP, SmallCNN, build_model, count_parameters
from .plotting import LiveCurves, plot_history, progress_bar

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfusionMatrix", "DataSplits", "DatasetUnavailableError",
    "EarlyStopping", "History", "LiveCurves", "MLP", "NonFiniteLossError",
    "SmallCNN", "Split", "TensorLoader", "TrainResult", "build_model",
    "capture_rng_state", "configure_logging", "count_parameters", "load_checkpoint",
    "load_dataset", "load_weights", "make_imbalanced_binary", "make_loaders",
    "metrics_from_counts", "pick_device", "pick_precision", "plot_history",
    "progress_bar", "restore_rng_state", "run_epoch", "save_checkpoint",
    "seed_everything", "to_device", "train_model",
]
