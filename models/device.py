"""Device choice and numerics shared by the models.

Training on CUDA uses bf16 autocast (and channels_last_3d for 3-D convolutions)
because that is where the time goes. Inference runs in float32 with TF32 turned
off on every device, so that the same artifact gives the same risk on a CPU and
on a GPU (within 5e-3): bf16 keeps ~3 significant digits, which is not enough.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["autocast", "exact_math", "resolve_device"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None -> CUDA when present, else CPU; anything else as given.

    Raises
    ------
    ValueError
        CUDA was asked for but is not available.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was requested but CUDA is not available; "
                         "use 'cpu' or 'auto'")
    return resolved


def autocast(device: torch.device, *, enabled: bool = True) -> contextlib.AbstractContextManager[
        object]:
    """bf16 autocast on CUDA when enabled (training); a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def exact_math() -> Iterator[None]:
    """float32 everywhere for inference: no TF32 in cuDNN convolutions or matmuls."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = conv
        torch.backends.cuda.matmul.allow_tf32 = matmul
