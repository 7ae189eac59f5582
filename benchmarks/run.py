"""Speed benchmarks of course_lib: loop overhead, loaders, train and grade commands.

Run from the repository root (``make benchmark`` does the same)::

    python benchmarks/run.py           # the full run
    python benchmarks/run.py --quick   # a smoke run on a data subset

It prints the machine and one table per measurement. docs/benchmarks.md
describes the method and records results.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from course_lib import count_parameters, load_dataset, pick_device, pick_precision
from course_lib.device import DEVICE_CHOICES

import breakdown
import grade_command
import loaders
import overhead
import train_command
from bare_loop import fresh_run, head_of_splits, train_command_defaults
from machine import describe_machine, load_average

OVERHEAD_GOAL = 1.05
SECTIONS = ("overhead", "breakdown", "loaders", "train-command", "grading")

# --quick trains on this many samples to keep the smoke run short. Its numbers
# only show that every part runs.
QUICK_TRAIN_SAMPLES = 320
QUICK_VAL_SAMPLES = 128

# The grading section grades its class once with each of these job counts.
GRADING_JOBS = (1, 2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time train_model against a bare loop, TensorLoader against "
        "DataLoader, the default train command, and the grade command per "
        "student.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_TRAIN_SAMPLES} training samples, 2 repetitions, "
        "a 1-epoch train command, 1 solved and 1 unsolved student to grade; the "
        "numbers are not representative",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        metavar="N",
        help="measured repetitions of the overhead comparison "
        "(default: 3, or 2 with --quick)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        metavar="N",
        help="epochs per repetition, at least 2 (default: the train command's "
        "default, or 2 with --quick)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=DEVICE_CHOICES,
        help="auto picks cuda, then mps, then cpu, as the train command does "
        "(default: auto)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch intra-op threads, also passed to the train command as "
        "OMP_NUM_THREADS (default: torch's choice)",
    )
    parser.add_argument(
        "--students",
        type=int,
        default=None,
        metavar="N",
        help="solved and unsolved students each in the grading section's class "
        "(default: 2, or 1 with --quick)",
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        metavar="SECTION",
        help="measurements to run, from: overhead (train_model against the "
        "bare loop), breakdown (each piece of train_model's extra work), "
        "loaders, train-command, grading (the grade command per student) "
        "(default: all five)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # None takes the train command's number of epochs.
    repeats, epochs = (2, 2) if args.quick else (3, None)
    if args.repeats is not None:
        repeats = args.repeats
    if args.epochs is not None:
        epochs = args.epochs
    students = 1 if args.quick else 2
    if args.students is not None:
        students = args.students
    if repeats < 1:
        parser.error(f"--repeats must be at least 1, got {repeats}")
    if students < 1:
        parser.error(f"--students must be at least 1, got {students}")
    if epochs is not None and epochs < 2:
        parser.error(f"--epochs must be at least 2, got {epochs}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    with contextlib.ExitStack() as stack:
        _send_course_lib_logs_to_devnull(stack)
        work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        _run_all(args, repeats, epochs, students, work_dir)
    return 0


def _run_all(
    args, repeats: int, epochs: int | None, students: int, work_dir: Path
) -> None:
    settings = train_command_defaults()
    device = pick_device(args.device)
    precision = pick_precision(device)
    splits = load_dataset(settings.dataset, seed=settings.seed)
    epochs = epochs if epochs is not None else settings.epochs
    if args.quick:
        splits = head_of_splits(splits, QUICK_TRAIN_SAMPLES, QUICK_VAL_SAMPLES)

    mode = "quick smoke run, numbers not representative" if args.quick else "full run"
    _print(f"course_lib speed benchmark ({mode})\n")
    _print_rows("Machine", describe_machine(device, precision))

    if "overhead" in args.sections:
        _print_overhead_section(splits, settings, device, repeats, epochs, work_dir)
    if "breakdown" in args.sections:
        _print_breakdown_section(splits, settings, device, args.quick, work_dir)
    if "loaders" in args.sections:
        _print_loader_section(splits, settings, device, args.quick)
    if "train-command" in args.sections:
        _print_train_command_section(args, work_dir)
    if "grading" in args.sections:
        _print_grading_section(students, not args.quick, work_dir)

    _print(f"\nload average at the end: {load_average()}")


def _print_overhead_section(splits, settings, device, repeats, epochs, work_dir):
    _print(
        f"\n1. Loop overhead: train_model against a bare loop\n"
        f"   {_describe_training(splits, settings, device)}\n"
        f"   {_count(repeats, 'repetition')} of up to {epochs} epochs with fresh "
        "models, the epochs of both variants alternating,\n"
        "   after one warm-up repetition of 2 epochs that is left out"
    )
    _report_overhead(splits, settings, device, repeats, epochs, work_dir)


def _describe_training(splits, settings, device) -> str:
    model = fresh_run(splits, settings, device).model
    augmentation = "off" if settings.no_augment else "random shifts"
    return (
        f"{type(model).__name__} ({count_parameters(model):,} parameters) on "
        f"{settings.dataset}, {len(splits.train)} train and {len(splits.val)} "
        f"val samples,\n   batch size {settings.batch_size}, AdamW lr "
        f"{settings.lr:g}, weight decay {settings.weight_decay:g}, monitor "
        f"{settings.monitor}, augmentation {augmentation}"
    )


def _print_breakdown_section(splits, settings, device, quick: bool, work_dir):
    calls, epoch_pairs = (3, 1) if quick else (9, 5)
    _print(
        "\n2. Where train_model's extra time goes: each piece timed alone\n"
        f"   medians of {calls} calls, and the min and max of the wall time;\n"
        f"   run_epoch: differences of {_count(epoch_pairs, 'pair')} against the "
        "bare phases, after 1 warm-up pair"
    )
    pieces = breakdown.time_pieces(
        splits, settings, device, work_dir, calls=calls, epoch_pairs=epoch_pairs
    )
    name_width = max(len(piece.name) for piece in pieces)
    _print(
        f"   {'':{name_width}}  {'wall ms':>8}  {'min':>8}  {'max':>8}"
        f"  {'CPU ms':>8}  how often"
    )
    for piece in pieces:
        cells = [
            f"{1000 * value:8.1f}"
            for value in (
                statistics.median(piece.wall),
                min(piece.wall),
                max(piece.wall),
                statistics.median(piece.cpu),
            )
        ]
        _print(f"   {piece.name:{name_width}}  {'  '.join(cells)}  {piece.when}")


def _print_loader_section(splits, settings, device, quick: bool) -> None:
    pairs, warmup = (5, 1) if quick else (30, 3)
    train_pairs, train_warmup = (1, 1) if quick else (4, 1)
    _print(
        f"\n3. Loader: TensorLoader against DataLoader(TensorDataset(...), "
        f"shuffle=True)\n"
        f"   {len(splits.train)} training samples, batch size "
        f"{settings.batch_size}; iteration: {_count(pairs, 'pair')} after "
        f"{warmup} warm-up;\n"
        f"   bare train epoch: {_count(train_pairs, 'pair')} after {train_warmup} "
        "warm-up"
    )
    iteration = loaders.time_iteration(splits, settings, pairs=pairs, warmup=warmup)
    training = loaders.time_training(
        splits, settings, device, pairs=train_pairs, warmup=train_warmup
    )
    _report_loaders(iteration, training)


def _print_train_command_section(args, work_dir: Path) -> None:
    command_epochs = 1 if args.quick else None
    _print(
        "\n4. python -m course_lib train "
        + (f"--epochs {command_epochs}" if command_epochs else "(all defaults)")
        + ", one run, full data set"
    )
    result = train_command.run_train_command(
        work_dir / "train-command",
        device=args.device,
        epochs=command_epochs,
        threads=args.threads,
    )
    _print_rows(
        None,
        [
            ("wall time", f"{result.wall:.1f} s, with start-up, data loading and test"),
            (
                "epochs run",
                f"{result.epochs_run}, {result.wall / result.epochs_run:.2f} s "
                "per epoch overall",
            ),
            (
                "test accuracy",
                f"{result.test_accuracy_percent:.2f}% (best.pt from epoch "
                f"{result.best_epoch})",
            ),
        ],
    )


def _print_grading_section(students: int, warmup: bool, work_dir: Path) -> None:
    jobs_text = " then ".join(map(str, GRADING_JOBS))
    header = (
        f"\n5. python -m course_lib grade: {students} solved and "
        f"{_count(students, 'unsolved student')}, jobs {jobs_text}\n"
        "   solved students submit solutions/, unsolved ones exercises/; the "
        "command's default limits"
    )
    if warmup:
        header += ",\n   after 1 warm-up unsolved student that is left out"
    _print(header)
    # The grader's start and per-student log lines show progress on standard error.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("   ... %(message)s"))
    handler.addFilter(grade_command.ProgressLines())
    grader_logger = logging.getLogger("course_lib.grading.command")
    grader_logger.addHandler(handler)
    try:
        runs = grade_command.time_grading(
            work_dir / "grading",
            students_per_kind=students,
            job_counts=GRADING_JOBS,
            warmup=warmup,
        )
    finally:
        grader_logger.removeHandler(handler)

    _print("   per student: Row.seconds, the time of the student's pytest process")
    _print_spread_table(grade_command.summary_rows(runs))
    rows = [
        (f"class wall time, {_count(run.jobs, 'job')}", grade_command.wall_text(run))
        for run in runs
    ]
    for jobs in GRADING_JOBS[1:]:
        rows.append(
            (
                f"speed-up of {jobs} jobs over 1",
                f"{grade_command.speedup(runs, jobs):.2f} (wall time with 1 job / "
                f"with {jobs})",
            )
        )
    _print_rows(None, rows)


def _report_overhead(splits, settings, device, repeats, epochs, work_dir) -> None:
    overhead.run_repetition(splits, settings, device, 2, work_dir)
    repetitions = []
    for index in range(repeats):
        repetition = overhead.run_repetition(splits, settings, device, epochs, work_dir)
        repetitions.append(repetition)
        ratio = repetition.ratio("wall")
        _progress(f"repetition {index + 1} of {repeats}: wall-time ratio {ratio:.3f}")

    rows = overhead.summary_rows(repetitions)
    _print_spread_table(rows)

    epochs_run = sorted({r.epochs for r in repetitions})
    _print(f"   epochs per run: {', '.join(map(str, epochs_run))} of {epochs}")
    difference = max(r.max_weight_difference for r in repetitions)
    same = "yes" if difference == 0 else "no"
    _print(
        f"   same weights in both variants after every epoch: {same} "
        f"(max |difference| {difference:.3g})"
    )
    median_ratio = statistics.median(r.ratio("wall") for r in repetitions)
    verdict = "met" if median_ratio <= OVERHEAD_GOAL else "not met"
    _print(
        f"   goal, median wall-time ratio at most {OVERHEAD_GOAL}: {verdict} "
        f"({median_ratio:.3f})"
    )


def _report_loaders(iteration, training) -> None:
    def ratios(timings):
        return [
            data / tensor
            for tensor, data in zip(
                timings.tensor_loader, timings.data_loader, strict=True
            )
        ]

    def milliseconds(values):
        return [1000 * value for value in values]

    rows = [
        ("TensorLoader, ms per epoch", milliseconds(iteration.tensor_loader), "{:.2f}"),
        ("DataLoader, ms per epoch", milliseconds(iteration.data_loader), "{:.2f}"),
        ("ratio DataLoader / TensorLoader", ratios(iteration), "{:.1f}"),
        ("train epoch, TensorLoader, s", training.tensor_loader, "{:.3f}"),
        ("train epoch, DataLoader, s", training.data_loader, "{:.3f}"),
        ("ratio DataLoader / TensorLoader, train", ratios(training), "{:.3f}"),
    ]
    _print_spread_table(rows)


def _send_course_lib_logs_to_devnull(stack: contextlib.ExitStack) -> None:
    # train_model formats and writes its INFO lines as under the train
    # command, which sends them to standard output, but here they would break
    # up the tables.
    sink = stack.enter_context(open(os.devnull, "w"))
    handler = logging.StreamHandler(sink)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("course_lib")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    stack.callback(logger.removeHandler, handler)


def _print_spread_table(rows: list[tuple[str, list[float], str]]) -> None:
    label_width = max(len(label) for label, _, _ in rows)
    _print(f"   {'':{label_width}}  {'median':>8}  {'min':>8}  {'max':>8}  n")
    for label, values, number_format in rows:
        cells = [
            number_format.format(value)
            for value in (statistics.median(values), min(values), max(values))
        ]
        _print(
            f"   {label:{label_width}}  {cells[0]:>8}  {cells[1]:>8}  {cells[2]:>8}"
            f"  {len(values)}"
        )


def _print_rows(title: str | None, rows: list[tuple[str, str]]) -> None:
    if title is not None:
        _print(title)
    label_width = max(len(label) for label, _ in rows)
    for label, value in rows:
        _print(f"   {label:{label_width}}  {value}")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _print(text: str) -> None:
    print(text, flush=True)


def _progress(text: str) -> None:
    # Standard error, so that standard output contains only the tables.
    print(f"   ... {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
