"""Tests of the live curves, the static plot and the progress bar.

The notebook tests start a real IPython kernel over IPC sockets and read the
messages it sends, which is what Jupyter renders.
"""

from __future__ import annotations

import io
import sys
import textwrap

import nbformat
import pytest
from matplotlib.figure import Figure
from nbclient import NotebookClient

from course_lib.history import History
from course_lib.plotting import LiveCurves, in_notebook, plot_history, progress_bar

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_history(epochs: int = 5) -> History:
    return History(
        {
            "epoch": epoch,
            "train_loss": 1.0 / epoch,
            "train_acc": 0.5 + 0.05 * epoch,
            "val_loss": 1.2 / epoch,
            "val_acc": 0.45 + 0.05 * epoch,
            "train_macro_f1": 0.4 + 0.05 * epoch,
            "val_macro_f1": 0.35 + 0.05 * epoch,
        }
        for epoch in range(1, epochs + 1)
    )


def legend_labels(axes) -> list[str]:
    return [text.get_text() for text in axes.get_legend().get_texts()]


def lines_by_label(axes) -> dict:
    return {line.get_label(): line for line in axes.get_lines()}


def test_not_in_notebook():
    assert in_notebook() is False


def test_curves_write_png(tmp_path):
    path = tmp_path / "curves.png"
    curves = LiveCurves(save_path=path, min_interval=0)

    curves.update(make_history())

    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_curves_plot_train_and_val(tmp_path):
    history = make_history()
    curves = LiveCurves(save_path=tmp_path / "curves.png")

    curves.update(history)
    loss_lines = lines_by_label(curves.loss_axes)
    metric_lines = lines_by_label(curves.metric_axes)

    assert list(loss_lines["train"].get_ydata()) == history["train_loss"]
    assert list(loss_lines["val"].get_ydata()) == history["val_loss"]
    assert list(metric_lines["val"].get_xdata()) == history["epoch"]
    assert list(metric_lines["val"].get_ydata()) == history["val_acc"]


def test_curves_mark_best_and_stop(tmp_path):
    curves = LiveCurves(save_path=tmp_path / "curves.png")

    curves.update(make_history(), best_epoch=2, stopped_epoch=5)

    for axes in (curves.loss_axes, curves.metric_axes):
        labels = legend_labels(axes)
        lines = lines_by_label(axes)
        assert "best (epoch 2)" in labels
        assert "early stop (epoch 5)" in labels
        assert list(lines["best (epoch 2)"].get_xdata()) == [2, 2]
        assert list(lines["early stop (epoch 5)"].get_xdata()) == [5, 5]


def test_curves_no_marks_by_default(tmp_path):
    curves = LiveCurves(save_path=tmp_path / "curves.png")

    curves.update(make_history())

    assert legend_labels(curves.loss_axes) == ["train", "val"]


def test_curves_redraw_replaces_marks(tmp_path):
    # Each update clears the axes, so an old best epoch does not linger.
    curves = LiveCurves(save_path=tmp_path / "curves.png")

    curves.update(make_history(3), best_epoch=1)
    curves.update(make_history(4), best_epoch=4)
    labels = legend_labels(curves.metric_axes)

    assert "best (epoch 4)" in labels
    assert "best (epoch 1)" not in labels
    assert len(curves.metric_axes.get_lines()) == 3


def test_curves_axis_labels(tmp_path):
    curves = LiveCurves(save_path=tmp_path / "curves.png", metric="macro_f1")

    curves.update(make_history())

    assert curves.loss_axes.get_xlabel() == "epoch"
    assert curves.loss_axes.get_ylabel() == "Loss"
    assert curves.metric_axes.get_ylabel() == "Macro F1"
    assert legend_labels(curves.metric_axes) == ["train", "val"]


def test_curves_throttle_writes(tmp_path):
    path = tmp_path / "curves.png"
    curves = LiveCurves(save_path=path, min_interval=3600)

    curves.update(make_history(1))
    path.unlink()
    curves.update(make_history(2))

    assert not path.exists()

    curves.close(make_history(3))

    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_curves_save_without_path():
    curves = LiveCurves()

    with pytest.raises(ValueError):
        curves.save()


def test_curves_no_display_outside_notebook():
    assert LiveCurves().display is False


def test_plot_history_figure():
    figure = plot_history(make_history(), best_epoch=3)

    assert isinstance(figure, Figure)
    assert len(figure.axes) == 2
    assert "best (epoch 3)" in legend_labels(figure.axes[0])


def test_plot_history_title():
    figure = plot_history(make_history(), title="MLP on mnist_5k")

    assert figure.get_suptitle() == "MLP on mnist_5k"


def test_progress_off_without_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    batches = [1, 2, 3]

    assert progress_bar(batches) is batches


class TerminalStream(io.StringIO):
    """A text stream that reports itself as a terminal."""

    def isatty(self) -> bool:
        return True


def test_progress_on_in_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", TerminalStream())
    batches = [1, 2, 3]

    bar = progress_bar(batches)
    try:
        assert bar is not batches
        assert list(bar) == batches
    finally:
        bar.close()


def test_progress_forced_off(monkeypatch):
    monkeypatch.setattr(sys, "stderr", TerminalStream())
    batches = [1, 2, 3]

    assert progress_bar(batches, enabled=False) is batches


NOTEBOOK_CELL = textwrap.dedent(
    """
    from course_lib import History, LiveCurves

    history = History()
    curves = LiveCurves()
    for epoch in range(1, 5):
        history.append({"epoch": epoch, "train_loss": 1 / epoch, "val_loss": 2 / epoch,
                        "train_acc": 0.1 * epoch, "val_acc": 0.1 * epoch})
        print(f"line for epoch {epoch}")
        curves.update(history, best_epoch=epoch)
    """
)


@pytest.fixture(scope="module")
def kernel_messages(tmp_path_factory):
    """Run the cell in a fresh kernel and return its iopub messages in order."""
    from jupyter_client.manager import KernelManager

    folder = tmp_path_factory.mktemp("kernel")
    manager = KernelManager(
        kernel_name="python3", transport="ipc", ip=str(folder / "socket")
    )
    manager.start_kernel(cwd=str(folder))
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)
        msg_id = client.execute(NOTEBOOK_CELL)
        messages = []
        while True:
            message = client.get_iopub_msg(timeout=120)
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            messages.append(message)
            content = message["content"]
            if message["msg_type"] == "status" and content["execution_state"] == "idle":
                break
        reply = client.get_shell_msg(timeout=120)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    assert reply["content"]["status"] == "ok", reply["content"]
    return messages


def of_type(messages, msg_type: str) -> list[dict]:
    return [m for m in messages if m["msg_type"] == msg_type]


def test_kernel_one_display(kernel_messages):
    displays = of_type(kernel_messages, "display_data")

    assert len(displays) == 1
    assert "image/png" in displays[0]["content"]["data"]
    assert displays[0]["content"]["transient"]["display_id"]


def test_kernel_updates_same_display(kernel_messages):
    display_id = of_type(kernel_messages, "display_data")[0]["content"]["transient"][
        "display_id"
    ]
    updates = of_type(kernel_messages, "update_display_data")

    assert len(updates) == 3
    for update in updates:
        assert update["content"]["transient"]["display_id"] == display_id
        assert "image/png" in update["content"]["data"]


def test_kernel_no_clear_output(kernel_messages):
    assert of_type(kernel_messages, "clear_output") == []


def test_kernel_prints_stay(kernel_messages):
    text = "".join(
        m["content"]["text"]
        for m in of_type(kernel_messages, "stream")
        if m["content"]["name"] == "stdout"
    )

    assert text.splitlines() == [f"line for epoch {epoch}" for epoch in range(1, 5)]


def test_kernel_display_after_first_print(kernel_messages):
    # The figure appears once, after the first epoch's line, and the later
    # lines follow it instead of being replaced by it.
    kinds = [m["msg_type"] for m in kernel_messages]

    assert kinds.index("stream") < kinds.index("display_data")
    assert kinds.count("stream") == 4


def test_notebook_outputs_keep_lines(tmp_path):
    from jupyter_client.manager import KernelManager

    notebook = nbformat.v4.new_notebook()
    notebook.cells.append(nbformat.v4.new_code_cell(NOTEBOOK_CELL))
    manager = KernelManager(
        kernel_name="python3", transport="ipc", ip=str(tmp_path / "socket")
    )
    client = NotebookClient(
        notebook,
        km=manager,
        timeout=120,
        resources={"metadata": {"path": str(tmp_path)}},
    )

    # A client that did not create the kernel manager leaves the kernel
    # running unless cleanup_kc=True. The finally block covers a failed start.
    try:
        client.execute(cleanup_kc=True)
    finally:
        if manager.has_kernel:
            manager.shutdown_kernel(now=True)
    outputs = notebook.cells[0].outputs
    text = "".join(o["text"] for o in outputs if o["output_type"] == "stream")
    displays = [o for o in outputs if o["output_type"] == "display_data"]

    assert text.splitlines() == [f"line for epoch {epoch}" for epoch in range(1, 5)]
    assert len(displays) == 1
    assert "image/png" in displays[0]["data"]
