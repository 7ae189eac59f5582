"""Tests of device selection, precision choice and batch copies.

This machine has neither CUDA nor MPS, so the tests check the CPU paths and
the errors for devices that are missing. The float64 to float32 conversion
for MPS cannot run here.
"""

from __future__ import annotations

import pytest
import torch

from course_lib.device import (
    DEVICE_CHOICES,
    Precision,
    pick_device,
    pick_precision,
    to_device,
)

needs_no_cuda = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the error for a missing CUDA device"
)
needs_no_accelerator = pytest.mark.skipif(
    torch.cuda.is_available() or torch.backends.mps.is_available(),
    reason="checks the CPU fallback of auto",
)


@needs_no_accelerator
@pytest.mark.parametrize("requested", ["auto", "AUTO", None])
def test_auto_is_cpu(requested):
    assert pick_device(requested) == torch.device("cpu")


@pytest.mark.parametrize("requested", ["cpu", " CPU "])
def test_cpu_by_name(requested):
    assert pick_device(requested) == torch.device("cpu")


def test_device_object_kept():
    device = torch.device("cpu")

    assert pick_device(device) is device


@pytest.mark.parametrize("requested", ["tpu", "gpu", "foo"])
def test_unknown_name(requested):
    with pytest.raises(ValueError) as excinfo:
        pick_device(requested)
    message = str(excinfo.value)

    assert repr(requested) in message
    for choice in DEVICE_CHOICES:
        assert choice in message


@pytest.mark.parametrize("requested", ["xla", "meta"])
def test_unsupported_torch_device(requested):
    with pytest.raises(ValueError) as excinfo:
        pick_device(requested)

    assert repr(requested) in str(excinfo.value)


@needs_no_cuda
@pytest.mark.parametrize("requested", ["cuda", "cuda:0"])
def test_missing_cuda(requested):
    with pytest.raises(ValueError) as excinfo:
        pick_device(requested)
    message = str(excinfo.value)

    assert repr(requested) in message
    assert "CUDA is not available" in message
    assert "--device cpu" in message


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS exists here")
def test_missing_mps():
    with pytest.raises(ValueError) as excinfo:
        pick_device("mps")
    message = str(excinfo.value)

    assert "MPS is not available" in message
    assert "--device cpu" in message


@pytest.mark.parametrize("enabled", [True, False])
def test_cpu_precision_float32(enabled):
    precision = pick_precision(torch.device("cpu"), enabled=enabled)

    assert precision.dtype is None
    assert precision.use_grad_scaler is False
    assert precision.name == "float32"


def test_precision_names():
    assert Precision(torch.bfloat16, use_grad_scaler=False).name == "bfloat16"
    assert Precision(torch.float16, use_grad_scaler=True).name == "float16"


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.float16, torch.int64, torch.uint8]
)
def test_to_device_keeps_dtype(dtype):
    tensor = torch.arange(6).to(dtype)

    moved = to_device(tensor, torch.device("cpu"))

    assert moved.dtype == dtype
    assert moved.device == torch.device("cpu")
    assert torch.equal(moved, tensor)
