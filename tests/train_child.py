"""Train a small MLP into an out_dir with resume=True, for the resume tests.

The tests run this script in a subprocess and kill it with SIGKILL at chosen
moments, then run it again to resume. Every run uses the same seeds, so an
interrupted and resumed run must end with the same weights and history as an
uninterrupted one.

After each epoch the script saves the weights and the history row to
``STATUS_DIR/epoch-N``, so the parent can tell how far the run got and compare
every epoch. At the end it saves the returned weights, the history and the
test results to RESULT_PATH. The padding buffer is left out of both.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from course_lib import MLP, Split, TensorLoader, load_dataset, seed_everything, train_model

EPOCHS = 5
PADDING = "padding"
BLOCK_SECONDS = 600


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="run folder passed to train_model")
    parser.add_argument("result_path", type=Path, help="file for the final results")
    parser.add_argument("--status-dir", type=Path, required=True,
                        help="folder for the per-epoch marker files")
    parser.add_argument("--block-at", type=int, default=None,
                        help="epoch whose on_epoch_end waits to be killed, for at most "
                             f"{BLOCK_SECONDS} s (default: none)")
    parser.add_argument("--padding", type=int, default=0,
                        help="float32 zeros in an extra model buffer, to make each "
                             "checkpoint write slow (default: 0, no buffer)")
    parser.add_argument("--batch-delay", type=float, default=0.0,
                        help="seconds to sleep before each forward pass (default: 0)")
    return parser.parse_args()


def subset(split: Split, size: int, seed: int) -> Split:
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    return Split(split.images[order[:size]], split.labels[order[:size]])


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k != PADDING}


def main() -> None:
    args = parse_args()
    # One thread keeps the float reductions in the same order in every run.
    torch.set_num_threads(1)
    seed_everything(0)

    splits = load_dataset()
    train = subset(splits.train, 512, seed=1)
    val = subset(splits.val, 128, seed=2)
    test = subset(splits.test, 128, seed=3)

    model = MLP(hidden=64, dropout=0.2)
    if args.padding:
        model.register_buffer(PADDING, torch.zeros(args.padding))
    if args.batch_delay:
        model.register_forward_pre_hook(lambda module, inputs: time.sleep(args.batch_delay))

    def on_epoch_end(epoch: int, row: dict) -> None:
        # Written under another name first, so a kill here leaves no
        # partial epoch file.
        partial = args.status_dir / f"partial-epoch-{epoch}"
        torch.save({"model": weights_of(model), "row": row}, partial)
        os.replace(partial, args.status_dir / f"epoch-{epoch}")
        if epoch == args.block_at:
            (args.status_dir / "blocked").touch()
            # The parent kills the process here. The time limit only ends a
            # child whose parent died first.
            time.sleep(BLOCK_SECONDS)
            sys.exit(f"blocked for {BLOCK_SECONDS} s at epoch {epoch} without being killed")

    result = train_model(
        model,
        TensorLoader.from_split(train, batch_size=32, shuffle=True, seed=0),
        TensorLoader.from_split(val, batch_size=64),
        TensorLoader.from_split(test, batch_size=64),
        epochs=EPOCHS,
        out_dir=args.out_dir,
        resume=True,
        device="cpu",
        live_plot=False,
        progress=False,
        on_epoch_end=on_epoch_end,
    )

    torch.save(
        {
            "model": weights_of(model),
            "history": result.history.state_dict(),
            "best_epoch": result.best_epoch,
            "test_loss": result.test_loss,
            "test_accuracy": result.test_accuracy,
        },
        args.result_path,
    )


if __name__ == "__main__":
    main()
