"""Kill-and-resume trials of a student's ``train_model``, for exercise 18.5.2.

`run_resume_trial` runs the student's module in three real processes:

1. an uninterrupted run, the reference;
2. a run killed with SIGKILL in the middle of an epoch (by default at the
   third optimizer step of epoch 4), while the reference trains alongside;
3. a restart in the killed run's folder, which must resume from its last.pt.

Each process is this module run as a script (``python -m
course_lib.resume_trial``). It imports the module file, registers a global
optimizer step pre-hook that records the learning rate, the optimizer's state
and a checksum of the weights before every step, and calls
``train_model(out_dir=..., epochs=..., on_epoch_end=...)``. Records are JSON
lines, flushed one by one, so a killed process leaves every line it wrote.
The final weights go to a file that loads with ``weights_only=True``.

The returned dict holds only JSON-serializable values and file paths;
`course_lib.checks.score_resume` scores it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

LAST_NAME = "last.pt"
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "epoch")


def run_resume_trial(
    module_path: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    epochs: int = 6,
    kill_epoch: int = 4,
    kill_step: int = 3,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """Run the reference, the killed and the resumed run of `module_path`.

    Args:
        module_path: a Python file that defines ``train_model(out_dir, epochs,
            on_epoch_end)`` and returns the trained model.
        work_dir: an empty folder for the run folders, records and weights.
        epochs: epochs of every run.
        kill_epoch, kill_step: the killed run is stopped before this optimizer
            step (counted from 1) of this epoch, so ``kill_epoch - 1`` epochs
            have finished.
        timeout: seconds each process may take.

    Returns:
        A dict with ``epochs``, ``kill_epoch``, ``kill_step``, ``runs`` and
        ``last_pt``. ``runs`` maps "uninterrupted", "killed" and "resumed" to
        ``returncode``, ``timed_out``, ``events``, ``weights`` and
        ``stderr_tail``, plus ``killed`` for the killed run. The resumed run is
        None when the killed run ended before it could be killed. ``last_pt``
        has ``exists``, ``keys``, ``epoch`` and ``error`` of the checkpoint
        that the killed run left.
    """
    module_path = Path(module_path).resolve()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    run_dir = work_dir / "interrupted"
    reference_dir = work_dir / "uninterrupted"
    run_dir.mkdir()
    reference_dir.mkdir()
    marker = work_dir / "blocked"

    children = []
    try:
        reference = _start(module_path, reference_dir, work_dir / "uninterrupted",
                           epochs)
        children.append(reference)
        killed = _start(module_path, run_dir, work_dir / "killed", epochs,
                        block=(kill_epoch, kill_step, marker))
        children.append(killed)
        killed_info = _kill_when_blocked(killed, marker, timeout)
        last_pt = _inspect_last(run_dir / LAST_NAME)
        resumed_info = None
        if killed_info["killed"]:
            resumed = _start(module_path, run_dir, work_dir / "resumed", epochs)
            children.append(resumed)
            resumed_info = _finish(resumed, timeout)
        reference_info = _finish(reference, timeout)
    finally:
        # Only reached with live children when the parent itself fails.
        for child in children:
            if child["process"].poll() is None:
                child["process"].kill()
                child["process"].wait()

    return {
        "epochs": epochs,
        "kill_epoch": kill_epoch,
        "kill_step": kill_step,
        "runs": {
            "uninterrupted": reference_info,
            "killed": killed_info,
            "resumed": resumed_info,
        },
        "last_pt": last_pt,
    }


def _start(module_path: Path, out_dir: Path, prefix: Path, epochs: int,
           block: tuple[int, int, Path] | None = None) -> dict[str, Any]:
    record = prefix.with_suffix(".jsonl")
    weights = prefix.with_suffix(".pt")
    stderr = prefix.with_suffix(".stderr")
    command = [
        sys.executable, "-m", "course_lib.resume_trial", str(module_path),
        str(out_dir), "--epochs", str(epochs), "--record", str(record),
        "--weights", str(weights),
    ]
    if block is not None:
        epoch, step, marker = block
        command += ["--block-epoch", str(epoch), "--block-step", str(step),
                    "--marker", str(marker)]
    # The children use one thread, so the float sums run in the same order in
    # every process, as the bit-for-bit comparison of weights needs.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(stderr, "wb") as err_file:
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=err_file, env=env
        )
    return {"process": process, "record": record, "weights": weights,
            "stderr": stderr, "started": time.monotonic()}


def _kill_when_blocked(child: dict[str, Any], marker: Path, timeout: float) -> dict:
    process = child["process"]
    deadline = child["started"] + timeout
    killed = timed_out = False
    while process.poll() is None:
        if marker.exists():
            # kill() sends SIGKILL on POSIX, which the process cannot catch.
            process.kill()
            killed = True
            break
        if time.monotonic() > deadline:
            process.kill()
            timed_out = True
            break
        time.sleep(0.05)
    process.wait()
    info = _collect(child, timed_out=timed_out)
    info["killed"] = killed
    return info


def _finish(child: dict[str, Any], timeout: float) -> dict[str, Any]:
    process = child["process"]
    remaining = max(1.0, child["started"] + timeout - time.monotonic())
    timed_out = False
    try:
        process.wait(timeout=remaining)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        timed_out = True
    return _collect(child, timed_out=timed_out)


def _collect(child: dict[str, Any], timed_out: bool) -> dict[str, Any]:
    events = []
    if child["record"].exists():
        for line in child["record"].read_text("utf-8").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                # A kill in the middle of a write can cut the last line short.
                break
    stderr = ""
    if child["stderr"].exists():
        stderr = child["stderr"].read_text("utf-8", errors="replace")
    weights = child["weights"]
    return {
        "returncode": child["process"].returncode,
        "timed_out": timed_out,
        "events": events,
        "weights": str(weights) if weights.exists() else None,
        "stderr_tail": stderr[-2000:],
    }


def _inspect_last(path: Path) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"exists": path.exists(), "keys": None, "epoch": None,
                            "error": None}
    if not path.exists():
        return info
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - reported to the student as it is
        info["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        return info
    if not isinstance(state, dict):
        info["error"] = f"it contains a {type(state).__name__}, not a dict"
        return info
    info["keys"] = sorted(str(key) for key in state)
    epoch = state.get("epoch")
    if isinstance(epoch, torch.Tensor) and epoch.numel() == 1:
        epoch = epoch.item()
    if isinstance(epoch, int) and not isinstance(epoch, bool):
        info["epoch"] = epoch
    return info


# --- the child process -------------------------------------------------------


def _snapshot(optimizer) -> dict[str, Any]:
    import torch

    params = [p for group in optimizer.param_groups for p in group["params"]]
    first_state = optimizer.state.get(params[0], {}) if params else {}
    step = first_state.get("step")
    with torch.no_grad():
        checksum = sum(float(p.detach().double().abs().sum()) for p in params)
    return {
        "lr": float(optimizer.param_groups[0]["lr"]),
        "state_entries": len(optimizer.state),
        "state_step": float(step) if step is not None else None,
        "param_sum": checksum,
    }


def _child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m course_lib.resume_trial",
        description="Run a student's train_model once and record every step.",
    )
    parser.add_argument("module", type=Path, help="file that defines train_model")
    parser.add_argument("out_dir", type=Path, help="run folder for last.pt")
    parser.add_argument("--epochs", type=int, required=True, help="epochs to train")
    parser.add_argument("--record", type=Path, required=True,
                        help="JSON-lines file for the step and epoch records")
    parser.add_argument("--weights", type=Path, required=True,
                        help="file for the returned model's state_dict")
    parser.add_argument("--block-epoch", type=int, default=None,
                        help="epoch in which to stop and wait to be killed")
    parser.add_argument("--block-step", type=int, default=None,
                        help="optimizer step of that epoch (from 1) to stop before")
    parser.add_argument("--marker", type=Path, default=None,
                        help="file created once the run waits to be killed")
    args = parser.parse_args(argv)

    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    torch.set_num_threads(1)
    record = open(args.record, "a", encoding="utf-8")

    def write(event: dict[str, Any]) -> None:
        record.write(json.dumps(event) + "\n")
        record.flush()

    counters = {"steps": 0, "in_epoch": 0, "epochs_done": 0}

    def before_step(optimizer, step_args, step_kwargs) -> None:
        counters["steps"] += 1
        counters["in_epoch"] += 1
        write({"event": "step", "step": counters["steps"], **_snapshot(optimizer)})
        blocked = (
            args.block_epoch is not None
            and counters["epochs_done"] == args.block_epoch - 1
            and counters["in_epoch"] == args.block_step
        )
        if blocked:
            args.marker.touch()
            while True:
                time.sleep(60)

    def on_epoch_end(epoch, loss) -> None:
        counters["epochs_done"] += 1
        counters["in_epoch"] = 0
        write({"event": "epoch", "epoch": int(epoch), "loss": float(loss),
               "steps": counters["steps"]})

    register_optimizer_step_pre_hook(before_step)
    try:
        spec = importlib.util.spec_from_file_location("student_resume", args.module)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.train_model(
            out_dir=args.out_dir, epochs=args.epochs, on_epoch_end=on_epoch_end
        )
    except Exception as err:  # noqa: BLE001 - recorded for the scorer
        frames = traceback.extract_tb(err.__traceback__)
        where = f"{frames[-1].name}, line {frames[-1].lineno}" if frames else "unknown"
        write({"event": "error", "type": type(err).__name__, "message": str(err),
               "where": where})
        return 1
    if not isinstance(model, torch.nn.Module):
        write({"event": "error", "type": "TypeError",
               "message": f"train_model returned {type(model).__name__}, "
                          "not the trained model", "where": "train_model"})
        return 1
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    torch.save(state, args.weights)
    write({"event": "done"})
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_main())
