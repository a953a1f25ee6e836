"""Where a kernel can run, and small helpers shared by the kernel families.

Every public kernel function dispatches on its inputs: CUDA tensors run the
Triton kernel; CPU tensors run it too when ``TRITON_INTERPRET=1`` was set
before triton was imported (how the tests exercise the kernels without a
GPU); anything else falls back to the PyTorch reference with the same
signature, so models built on tritium run anywhere.
"""
from __future__ import annotations

import functools
import os

import torch


@functools.cache
def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a hard dependency, but broken installs happen
        return False
    return True


def can_use_triton(*tensors: torch.Tensor | None) -> bool:
    """True when the Triton path can run on all of ``tensors`` (None entries ignored)."""
    present = [t for t in tensors if t is not None]
    if not present or not triton_importable():
        return False
    if all(t.is_cuda for t in present):
        return True
    return interpreter_enabled() and all(t.device.type == "cpu" for t in present)


def check_tensor(name: str, tensor: torch.Tensor, *, dtypes: tuple[torch.dtype, ...] | None = None,
                 ndim: int | tuple[int, ...] | None = None, device: torch.device | None = None) -> None:
    """Raise a clear error naming ``name`` when ``tensor`` has the wrong type, dtype, rank or device."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if dtypes is not None and tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(tensor.dtype).replace('torch.', '')}")
    if ndim is not None:
        allowed_ndim = (ndim,) if isinstance(ndim, int) else ndim
        if tensor.dim() not in allowed_ndim:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed_ndim))} dimensions, "
                             f"got shape {tuple(tensor.shape)}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the other inputs are on {device}")


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_runs_on(device: torch.device | str) -> bool:
    """Whether tritium's Triton kernels (rather than their PyTorch references) run for tensors on
    ``device``: CUDA, or CPU under ``TRITON_INTERPRET=1`` -- the rule ``can_use_triton`` applies per call."""
    device_type = torch.device(device).type
    if not triton_importable():
        return False
    return device_type == "cuda" or (device_type == "cpu" and interpreter_enabled())
