"""Live training curves and progress bars.

In Jupyter, `LiveCurves` shows one figure and redraws it in place through a
single display handle, so there are no stacked figures, no flicker, and lines
printed in the same cell stay visible (nothing calls ``clear_output``).
Outside Jupyter it writes the figure to a PNG file.
"""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .history import History


def in_notebook() -> bool:
    """Return True inside a Jupyter or Colab kernel."""
    ipython_module = sys.modules.get("IPython")
    if ipython_module is None:
        return False
    shell = ipython_module.get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def output_is_interactive() -> bool:
    """Return True when progress output has a reader: a notebook or a terminal."""
    if in_notebook():
        return True
    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


def progress_bar(iterable, *, enabled: bool | None = None, desc: str = "", total=None):
    """Wrap `iterable` in a ``tqdm.auto`` bar, or return it unchanged when off.

    `enabled` None turns the bar on only for a terminal or a notebook, so logs
    written to files and CI output stay free of bar updates.
    """
    if enabled is None:
        enabled = output_is_interactive()
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


class LiveCurves:
    """Train and validation loss and metric curves in one figure.

    Call `update` after each epoch and `close` at the end. In Jupyter the
    figure appears once and each update replaces it in place. Elsewhere it is
    saved as a PNG, and so it is at `close` whenever `save_path` is set.

    Args:
        save_path: where to write the PNG; None keeps it in the notebook only.
        metric: the history column suffix plotted on the right ("acc",
            "macro_f1", "pos_f1", ...).
        title: the figure title.
        min_interval: minimum seconds between PNG writes while training
            (the last write, at `close`, always happens). Redrawing costs about
            0.1 s, which matters when epochs take a second or two.
        display: show the figure in the notebook; None does so only in Jupyter.
    """

    def __init__(
        self,
        save_path: str | os.PathLike | None = None,
        metric: str = "acc",
        title: str = "Training curves",
        min_interval: float = 10.0,
        display: bool | None = None,
    ) -> None:
        self.save_path = Path(save_path) if save_path is not None else None
        self.metric = metric
        self.title = title
        self.min_interval = min_interval
        self.display = in_notebook() if display is None else display
        self.figure = Figure(figsize=(10, 3.8), layout="constrained")
        FigureCanvasAgg(self.figure)
        self.loss_axes, self.metric_axes = self.figure.subplots(1, 2)
        self._handle = None
        self._last_save = -float("inf")

    def update(
        self,
        history: History,
        best_epoch: int | None = None,
        stopped_epoch: int | None = None,
    ) -> None:
        """Redraw from `history`, marking the best epoch and an early stop."""
        self._draw(history, best_epoch, stopped_epoch)
        if self.display:
            self._show()
        now = time.monotonic()
        if self.save_path is not None and not self.display:
            if now - self._last_save >= self.min_interval:
                self.save()
                self._last_save = now

    def close(
        self,
        history: History | None = None,
        best_epoch: int | None = None,
        stopped_epoch: int | None = None,
    ) -> None:
        """Draw the final state and write the PNG if `save_path` is set."""
        if history is not None and len(history):
            self._draw(history, best_epoch, stopped_epoch)
            if self.display:
                self._show()
        if self.save_path is not None:
            self.save()

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the figure as a PNG to `path`, or to `save_path`."""
        target = Path(path) if path is not None else self.save_path
        if target is None:
            raise ValueError("no path given and save_path is None; pass a path")
        from .checkpoint import write_bytes_atomic

        write_bytes_atomic(self.png_bytes(), target)
        return target

    def png_bytes(self) -> bytes:
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=90)
        return buffer.getvalue()

    def _show(self) -> None:
        from IPython.display import Image, display

        image = Image(data=self.png_bytes(), format="png")
        if self._handle is None:
            self._handle = display(image, display_id=True)
        else:
            self._handle.update(image)

    def _draw(self, history: History, best_epoch, stopped_epoch) -> None:
        epochs = history["epoch"]
        panels = (
            (self.loss_axes, "loss", "Loss"),
            (self.metric_axes, self.metric, _metric_label(self.metric)),
        )
        for axes, suffix, label in panels:
            axes.clear()
            for phase, style in (("train", "-o"), ("val", "-s")):
                column = f"{phase}_{suffix}"
                if history.rows and column in history.rows[0]:
                    axes.plot(epochs, history[column], style, markersize=3, label=phase)
            if best_epoch is not None:
                axes.axvline(best_epoch, color="tab:green", linestyle=":",
                             label=f"best (epoch {best_epoch})")
            if stopped_epoch is not None:
                axes.axvline(stopped_epoch, color="tab:red", linestyle="--",
                             label=f"early stop (epoch {stopped_epoch})")
            axes.set_xlabel("epoch")
            axes.set_ylabel(label)
            axes.set_title(label)
            axes.grid(alpha=0.3)
            axes.legend(loc="best", fontsize="small")
        self.figure.suptitle(self.title)


def _metric_label(metric: str) -> str:
    return {
        "acc": "Accuracy",
        "macro_f1": "Macro F1",
        "pos_f1": "F1 (positive class)",
        "pos_recall": "Recall (positive class)",
        "pos_precision": "Precision (positive class)",
    }.get(metric, metric)


def plot_history(
    history: History,
    metric: str = "acc",
    best_epoch: int | None = None,
    stopped_epoch: int | None = None,
    title: str = "Training curves",
):
    """Return a static figure of a finished run's curves."""
    curves = LiveCurves(metric=metric, title=title, display=False)
    curves._draw(history, best_epoch, stopped_epoch)
    return curves.figure
