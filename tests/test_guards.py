"""Guards that keep a run's files and the notebook checks from being lost."""

from pathlib import Path

import nbformat
import pytest
import torch

from course_lib import CheckpointError, MLP, TensorLoader, train_model
from course_lib.checkpoint import remove_stale_temp_files

ROOT = Path(__file__).resolve().parents[1]
HIDING_MARKERS = ("NBVAL_SKIP", "NBVAL_RAISES_EXCEPTION")


def tiny_loaders():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(64, 1, 4, 4, generator=generator)
    labels = torch.randint(0, 3, (64,), generator=generator)
    loader = TensorLoader(images, labels, batch_size=16, shuffle=True, seed=0)
    return loader, TensorLoader(images, labels, batch_size=32)


def train_tiny(out_dir, **kwargs):
    train, val = tiny_loaders()
    torch.manual_seed(0)
    model = MLP((1, 4, 4), 3, hidden=8)
    return train_model(
        model, train, val, epochs=2, out_dir=out_dir, live_plot=False,
        progress=False, **kwargs,
    )


def test_resume_without_last_keeps_best(tmp_path):
    train_tiny(tmp_path)
    (tmp_path / "last.pt").unlink()
    best_before = (tmp_path / "best.pt").read_bytes()

    with pytest.raises(CheckpointError, match="best.pt but no last.pt"):
        train_tiny(tmp_path, resume=True)

    assert (tmp_path / "best.pt").read_bytes() == best_before


def test_resume_rejects_changed_setting(tmp_path):
    train_tiny(tmp_path, run_config={"seed": 0})
    last_before = (tmp_path / "last.pt").read_bytes()

    with pytest.raises(CheckpointError, match="seed"):
        train_tiny(tmp_path, resume=True, run_config={"seed": 7})

    assert (tmp_path / "last.pt").read_bytes() == last_before


def test_stale_temp_cleanup_spares_other_files(tmp_path):
    own = tmp_path / ".last.pt.abc123.tmp"
    other = tmp_path / ".notes.tmp"
    own.write_bytes(b"partial")
    other.write_text("keep me")

    removed = remove_stale_temp_files(tmp_path)

    assert removed == [own]
    assert other.exists()


@pytest.mark.parametrize(
    "path",
    sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "solutions").glob("*.ipynb")),
    ids=lambda path: path.name,
)
def test_notebook_hides_no_cell(path):
    # NBVAL_SKIP or NBVAL_RAISES_EXCEPTION on an assert cell would let a broken
    # lesson pass under nbval, so no committed notebook may use them.
    notebook = nbformat.read(path, as_version=4)
    marked = [
        index
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and any(m in cell.source for m in HIDING_MARKERS)
    ]
    assert marked == []
