"""CUDA paths: autocast dtype, GradScaler, device placement of checkpoints.

These run only where CUDA is available; on a CPU-only machine they are skipped.
"""

import pytest
import torch

import course_lib as cl

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"
)


@pytest.fixture(scope="module")
def splits():
    return cl.load_dataset("mnist_5k")


def test_auto_picks_cuda():
    assert cl.pick_device("auto").type == "cuda"


def test_precision_matches_hardware():
    precision = cl.pick_precision(torch.device("cuda"))
    if torch.cuda.is_bf16_supported(including_emulation=False):
        assert precision.dtype == torch.bfloat16
        assert not precision.use_grad_scaler
    else:
        assert precision.dtype == torch.float16
        assert precision.use_grad_scaler


def test_train_model_on_cuda(splits, tmp_path):
    cl.seed_everything(0)
    train, val, test = cl.make_loaders(splits, batch_size=128, pin_memory=True)
    model = cl.SmallCNN(splits.input_shape, splits.num_classes)
    result = cl.train_model(
        model, train, val, test, epochs=3, device="cuda", out_dir=tmp_path,
        live_plot=False, progress=False,
    )
    assert result.test_accuracy > 0.8
    assert next(model.parameters()).device.type == "cuda"


def test_checkpoint_tensors_saved_on_cpu(splits, tmp_path):
    cl.seed_everything(0)
    train, val, _ = cl.make_loaders(splits, batch_size=128)
    model = cl.MLP(splits.input_shape, splits.num_classes)
    cl.train_model(model, train, val, epochs=1, device="cuda", out_dir=tmp_path,
                   live_plot=False, progress=False)
    on_cpu = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert all(t.device.type == "cpu" for t in on_cpu["model"].values())
    on_gpu = cl.load_checkpoint(tmp_path / "last.pt", map_location="cuda")
    assert all(t.device.type == "cuda" for t in on_gpu["model"].values())


class _StopAfterFirstEpoch(Exception):
    pass


def _stop_after_first(epoch, row):
    if epoch == 1:
        raise _StopAfterFirstEpoch


def test_resume_on_cuda_continues(splits, tmp_path):
    train, val, _ = cl.make_loaders(splits, batch_size=128)
    cl.seed_everything(0)
    with pytest.raises(_StopAfterFirstEpoch):
        cl.train_model(
            cl.MLP(splits.input_shape, splits.num_classes), train, val, epochs=2,
            device="cuda", out_dir=tmp_path, live_plot=False, progress=False,
            on_epoch_end=_stop_after_first,
        )
    resumed = cl.train_model(
        cl.MLP(splits.input_shape, splits.num_classes), train, val, epochs=2,
        device="cuda", out_dir=tmp_path, resume=True, live_plot=False, progress=False,
    )
    assert resumed.history["epoch"] == [1, 2]
