"""Where a kernel can run, and small helpers shared by the kernel families.

Every public kernel function dispatches on its inputs: CUDA tensors run the
Triton kernel; CPU tensors run it too when ``TRITON_INTERPRET=1`` was set
before triton was imported (how the tests exercise the kernels without a
GPU); anything else falls back to the PyTorch reference with the same
signature, so models built on tritium run anywhere.

Two debug hooks make "the kernel ran, and wrote everything it returns" checkable (tests use both;
engine and training code can too):

* **Launch ledger.** Every launcher starts its Triton kernels through :func:`launch`, which records
  the launch by kernel name when someone is counting::

      from tritium.kernels._runtime import count_launches
      with count_launches() as ledger:
          y = rms_norm(x, w)
      ledger.require("_rms_norm_fwd_kernel")   # AssertionError if the reference ran instead
      ledger["_rms_norm_fwd_kernel"]           # a Counter: launches per kernel name

  Counting is process-wide (every thread). Processes started elsewhere (DeepSpeed ranks) count
  when ``TRITIUM_LAUNCH_LEDGER=<folder>`` is set: each process writes ``<folder>/launches-<pid>.json``
  (kernel name -> launches) at exit; :func:`read_launch_ledgers` sums them. Off, the cost of a
  launch is one truth test of a list.
* **Output sentinels.** Launchers allocate outputs and gradients with :func:`empty` /
  :func:`empty_like`. With ``TRITIUM_DEBUG_SENTINEL=1`` in the environment, or inside
  ``with sentinel_outputs():``, these come pre-filled with NaN (floats) or the dtype's minimum
  (integers), so an element a kernel forgot to write shows up in any comparison.
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import functools
import json
import os
import threading
from pathlib import Path
from typing import Any, Iterator

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


# ---------------------------------------------------------------------------------- launch ledger
class LaunchLedger(collections.Counter):
    """Kernel name -> number of Triton launches recorded while the ledger was open."""

    def require(self, *names: str) -> None:
        """Assert that each kernel in ``names`` launched at least once, naming the missing ones."""
        missing = [name for name in names if self[name] <= 0]
        if missing:
            hint = ("" if interpreter_enabled() or torch.cuda.is_available() else
                    " (on a CPU the kernels run only with TRITON_INTERPRET=1 set before triton is imported)")
            raise AssertionError(f"Triton kernel(s) {missing} never launched; the PyTorch reference ran "
                                 f"instead{hint}. Launched: {dict(self) or 'nothing'}")


_ledgers: list[LaunchLedger] = []
_ledger_lock = threading.Lock()


def kernel_name(kernel: Any) -> str:
    """The Python name of a ``@triton.jit`` function, seen through autotuner/heuristics wrappers."""
    while not hasattr(kernel, "__name__") and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return getattr(kernel, "__name__", type(kernel).__name__)


def launch(kernel: Any, grid: Any) -> Any:
    """``kernel[grid]``, recorded in every open ledger: use as ``launch(kernel, grid)(*args, **meta)``."""
    if _ledgers:
        name = kernel_name(kernel)
        with _ledger_lock:
            for ledger in _ledgers:
                ledger[name] += 1
    return kernel[grid]


@contextlib.contextmanager
def count_launches() -> Iterator[LaunchLedger]:
    """Count Triton launches (all threads) inside the ``with`` block; yields the live ledger."""
    ledger = LaunchLedger()
    with _ledger_lock:
        _ledgers.append(ledger)
    try:
        yield ledger
    finally:
        with _ledger_lock:
            _ledgers.remove(ledger)


def _start_process_ledger(folder: str) -> None:
    ledger = LaunchLedger()
    _ledgers.append(ledger)

    def write() -> None:
        path = Path(folder) / f"launches-{os.getpid()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(ledger)))

    atexit.register(write)


def read_launch_ledgers(folder: str | os.PathLike) -> LaunchLedger:
    """Sum of the ``launches-<pid>.json`` files that processes run with ``TRITIUM_LAUNCH_LEDGER=folder``
    wrote at exit."""
    total = LaunchLedger()
    for path in sorted(Path(folder).glob("launches-*.json")):
        total.update(json.loads(path.read_text()))
    return total


if os.environ.get("TRITIUM_LAUNCH_LEDGER"):
    _start_process_ledger(os.environ["TRITIUM_LAUNCH_LEDGER"])


# ------------------------------------------------------------------------------- output sentinels
_sentinel_depth = [1 if os.environ.get("TRITIUM_DEBUG_SENTINEL", "0") == "1" else 0]


@contextlib.contextmanager
def sentinel_outputs() -> Iterator[None]:
    """Inside the block, :func:`empty` / :func:`empty_like` return NaN-filled (floats) or
    minimum-filled (integers) tensors instead of uninitialised memory."""
    _sentinel_depth[0] += 1
    try:
        yield
    finally:
        _sentinel_depth[0] -= 1


def sentinels_enabled() -> bool:
    return _sentinel_depth[0] > 0


def _fill_sentinel(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    if t.dtype != torch.bool:
        return t.fill_(torch.iinfo(t.dtype).min)
    return t


def empty(*shape: Any, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty`` for kernel outputs: sentinel-filled in debug mode (see the module docstring)."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    return _fill_sentinel(t) if _sentinel_depth[0] else t


def empty_like(t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``torch.empty_like`` for kernel outputs: sentinel-filled in debug mode."""
    out = torch.empty_like(t, **kwargs)
    return _fill_sentinel(out) if _sentinel_depth[0] else out


def triton_runs_on(device: torch.device | str) -> bool:
    """Whether tritium's Triton kernels (rather than their PyTorch references) run for tensors on
    ``device``: CUDA, or CPU under ``TRITON_INTERPRET=1`` -- the rule ``can_use_triton`` applies per call."""
    device_type = torch.device(device).type
    if not triton_importable():
        return False
    return device_type == "cuda" or (device_type == "cpu" and interpreter_enabled())
