"""Command line: ``python -m course_lib train``."""

from __future__ import annotations

import argparse
import errno
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .checkpoint import CheckpointError, CheckpointWriteError
from .data import (
    DATASET_CHOICES,
    DatasetUnavailableError,
    load_dataset,
    make_loaders,
    random_shift,
)
from .device import DEVICE_CHOICES, pick_device, pick_precision
from .exercises import add_parser as add_exercises_parser
from .exercises import run_command as run_exercises_command
from .grading.command import add_parser as add_grade_parser
from .grading.command import run_command as run_grade_command
from .loop import NonFiniteLossError, prepare_run_folder, train_model
from .models import MODEL_CHOICES, build_model, count_parameters

logger = logging.getLogger("course_lib")


class _StdoutHandler(logging.StreamHandler):
    """A handler that writes to whatever sys.stdout is at the time of the call.

    Jupyter replaces sys.stdout per cell, so a handler that kept the stream
    from its creation would write into an old cell.
    """

    def emit(self, record: logging.LogRecord) -> None:
        # Not setStream, which flushes the old stream first: a finished cell's
        # stream may be closed by then.
        self.stream = sys.stdout
        super().emit(record)


def configure_logging(level: int = logging.INFO) -> None:
    """Send course_lib's log lines to standard output as plain text.

    Calling it again replaces the handler instead of adding a second one.
    """
    root = logging.getLogger("course_lib")
    root.handlers = [h for h in root.handlers if not isinstance(h, _StdoutHandler)]
    handler = _StdoutHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: X)" only for options whose default is a value."""

    def _get_help_string(self, action: argparse.Action) -> str:
        # "is", not "in (None, False)": 0 == False, and --seed defaults to 0.
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


# np.random.seed, which seed_everything calls, accepts only this range.
MAX_SEED = 2**32 - 1
# The default widths are 32 (CNN) and 256 (MLP), so a --width above this is
# most likely a typing error, such as an extra zero.
MAX_WIDTH = 1024


# The argparse types below raise ArgumentTypeError, whose message argparse
# prints after "argument --OPTION: ", so the messages leave out the option name.
def _int_in_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """Return an argparse type that accepts integers from `low` to `high`."""
    if high is None:
        accepted = f"an integer of at least {low}"
    else:
        accepted = f"an integer from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {accepted}, got {text!r}"
            ) from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {accepted}, got {text}")
        return value

    return parse


def _finite_float(text: str, accepted: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {accepted}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {accepted}, got {text}")
    return value


def _positive_float(text: str) -> float:
    """Parse a finite number above 0, such as a learning rate."""
    accepted = "a finite number above 0"
    value = _finite_float(text, accepted)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be {accepted}, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    """Parse a finite number of at least 0, such as a weight decay."""
    accepted = "a finite number of at least 0"
    value = _finite_float(text, accepted)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be {accepted}, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m course_lib",
        description="The Training Loop course: reference training command.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="train a model and save best.pt, last.pt, history.csv and curves.png",
        formatter_class=_HelpFormatter,
    )
    # Errors found after parsing are reported with this subcommand's usage line.
    train.set_defaults(subparser=train)
    train.add_argument("--dataset", default="mnist_5k", choices=DATASET_CHOICES,
                       help="data set; mnist_5k is bundled, the others download")
    train.add_argument("--model", default="cnn", choices=MODEL_CHOICES,
                       help="model architecture")
    train.add_argument("--seed", type=_int_in_range(0, MAX_SEED), default=0,
                       help="seed for weights, data split and data order, "
                       f"0 to {MAX_SEED}")
    train.add_argument("--width", type=_int_in_range(1, MAX_WIDTH), default=None,
                       help="channels of the CNN's first block (default 32) or "
                       f"hidden units of the MLP (default 256), 1 to {MAX_WIDTH}")
    train.add_argument("--epochs", type=_int_in_range(1), default=20,
                       help="maximum number of epochs")
    train.add_argument("--batch-size", type=_int_in_range(1), default=64,
                       help="training batch size in samples")
    train.add_argument("--lr", type=_positive_float, default=1e-3,
                       help="AdamW learning rate at the start of the cosine schedule")
    train.add_argument("--weight-decay", type=_non_negative_float, default=0.01,
                       help="AdamW weight decay")
    # EarlyStopping needs a patience of at least 1.
    train.add_argument("--patience", type=_int_in_range(1), default=5,
                       help="epochs without a better --monitor value before stopping")
    train.add_argument("--monitor", default="val_loss", choices=("val_loss", "val_acc"),
                       help="validation figure that picks best.pt and drives early "
                       "stopping; val_loss is less noisy than accuracy on 500 images")
    train.add_argument("--no-augment", action="store_true",
                       help="turn off the random shifts of up to 2 pixels that are "
                       "applied to training images")
    train.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                       help="auto picks cuda, then mps, then cpu")
    train.add_argument("--out", type=Path, default=None,
                       help="run folder (default: runs/DATASET-MODEL-TIMESTAMP)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last.pt")
    train.add_argument("--data-dir", type=Path, default=None,
                       help="download cache for torchvision data sets "
                       "(default: $COURSE_DATA_DIR or ~/.cache/course_lib)")
    train.add_argument("--no-progress", action="store_true",
                       help="hide the per-batch progress bars")
    add_exercises_parser(commands)
    add_grade_parser(commands)
    return parser


def _width_option(args: argparse.Namespace) -> dict[str, int]:
    if args.model == "cnn":
        width = args.width if args.width is not None else 32
        return {"width": width}
    hidden = args.width if args.width is not None else 256
    return {"hidden": hidden}


# Errors of a write that a user can fix: disk full, quota, read-only, too large.
_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    if args.command == "exercises":
        return run_exercises_command(args)
    if args.command == "grade":
        return run_grade_command(args)
    try:
        return _train(args, args.subparser)
    except (ValueError, CheckpointError, DatasetUnavailableError,
            NonFiniteLossError) as err:
        logger.error("error: %s", err)
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted; resume with --resume --out of this run")
        return 130
    except OSError as err:
        if not (isinstance(err, CheckpointWriteError) or err.errno in _WRITE_ERRORS):
            raise
        # A full disk or a folder that became read-only during the run. The
        # checkpoints are written atomically, so the last complete ones remain.
        where = f" {err.filename}" if err.filename else ""
        logger.error("error: could not write%s (%s); free disk space or fix the "
                     "folder's permissions, then rerun with --resume to continue "
                     "from the last complete last.pt", where, err.strerror or err)
        return 2


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    # The numeric options were checked by their argparse types.
    if args.resume and args.out is None:
        parser.error("--resume needs --out, the folder of the run to continue")
    out_dir = args.out or Path("runs") / (
        f"{args.dataset}-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    )

    seed_everything(args.seed)
    device = pick_device(args.device)
    precision = pick_precision(device)
    splits = load_dataset(args.dataset, seed=args.seed, root=args.data_dir)
    prepare_run_folder(out_dir)
    train_loader, val_loader, test_loader = make_loaders(
        splits, batch_size=args.batch_size, seed=args.seed,
        pin_memory=device.type == "cuda",
        augment=None if args.no_augment else random_shift,
    )
    model = build_model(
        args.model, splits.input_shape, splits.num_classes, **_width_option(args)
    )

    sizes = splits.sizes()
    logger.info("device   %s (%s)", device, precision.name)
    logger.info(
        "data     %s: %d train, %d val, %d test, %d classes, input %s",
        splits.name, sizes["train"], sizes["val"], sizes["test"],
        splits.num_classes, "x".join(map(str, splits.input_shape)),
    )
    logger.info("model    %s, %s parameters", type(model).__name__,
                f"{count_parameters(model):,}")
    logger.info(
        "training AdamW lr %g, weight decay %g, batch %d, up to %d epochs, "
        "best by %s, %s",
        args.lr, args.weight_decay, args.batch_size, args.epochs, args.monitor,
        "no augmentation" if args.no_augment else "random shifts of up to 2 pixels",
    )
    logger.info("run      %s", out_dir)

    train_model(
        model, train_loader, val_loader, test_loader,
        epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
        patience=args.patience, monitor=args.monitor, device=device,
        out_dir=out_dir, resume=args.resume,
        run_config={
            "dataset": args.dataset, "model": args.model, "width": args.width,
            "seed": args.seed, "batch_size": args.batch_size, "lr": args.lr,
            "weight_decay": args.weight_decay, "augment": not args.no_augment,
            "patience": args.patience,
        },
        progress=False if args.no_progress else None,
    )
    # train_model logs the test accuracy of best.pt as its last line.
    return 0
