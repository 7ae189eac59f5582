"""Device selection, mixed precision and host-to-device copies."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def pick_device(requested: str | torch.device | None = "auto") -> torch.device:
    """Return the device to train on: cuda, then mps, then cpu for "auto".

    Args:
        requested: "auto", "cuda", "cuda:N", "mps", "cpu", or a torch.device,
            which is returned as it is.

    Raises:
        ValueError: if the name is unknown or the device is not available here.
    """
    if isinstance(requested, torch.device):
        return requested
    name = (requested or "auto").strip().lower()

    if name == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda")
        elif _mps_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
        logger.info("picked device %s (cuda, then mps, then cpu)", device)
        return device

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"unknown device {requested!r}; use one of {', '.join(DEVICE_CHOICES)}"
        ) from None
    if device.type not in ("cuda", "mps", "cpu"):
        raise ValueError(
            f"unsupported device {requested!r}; use one of {', '.join(DEVICE_CHOICES)}"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {requested!r} was requested but CUDA is not available here; "
            "use --device auto or --device cpu"
        )
    if device.type == "mps" and not _mps_available():
        raise ValueError(
            f"device {requested!r} was requested but MPS is not available here; "
            "use --device auto or --device cpu"
        )
    logger.info("using device %s", device)
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


@dataclass(frozen=True)
class Precision:
    """Mixed-precision settings for one device.

    Attributes:
        dtype: the autocast dtype, or None when autocast is off.
        use_grad_scaler: whether fp16 loss scaling is needed.
    """

    dtype: torch.dtype | None
    use_grad_scaler: bool

    @property
    def name(self) -> str:
        if self.dtype is None:
            return "float32"
        return "bfloat16" if self.dtype == torch.bfloat16 else "float16"


def pick_precision(device: torch.device, enabled: bool = True) -> Precision:
    """Choose mixed precision for `device`.

    On CUDA this is bf16 where the GPU supports it natively (Ampere and newer),
    otherwise fp16, which needs a GradScaler because fp16 gradients underflow.
    CPU and MPS train in float32.
    """
    if not enabled or device.type != "cuda":
        return Precision(dtype=None, use_grad_scaler=False)
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return Precision(dtype=torch.bfloat16, use_grad_scaler=False)
    return Precision(dtype=torch.float16, use_grad_scaler=True)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a batch tensor to `device` without blocking the host.

    MPS has no float64 support, so float64 inputs become float32 first.
    """
    if device.type == "mps" and tensor.dtype == torch.float64:
        tensor = tensor.to(torch.float32)
    return tensor.to(device, non_blocking=True)
