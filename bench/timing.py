"""Timing done one way for every case, and the device's two ceilings.

On CUDA: ``triton.testing.do_bench`` (CUDA events, warm-up excluded, the
median of the timed runs; it also flushes L2 between runs).  On CPU: a
wall-clock median after warm-up.  CPU numbers exercise the code paths; they
are never kernel speed.
"""
from __future__ import annotations

import math
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation, as ``numpy.percentile``'s default; None
    for no values.  Every p50/p99 in bench/ (engine workloads, serve-bench) comes from here."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def time_ms(fn: Callable[[], object], device: str, *, warmup_ms: float = 25, rep_ms: float = 100,
            max_reps: int = 200) -> float:
    """Median milliseconds per call of ``fn``."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=int(warmup_ms), rep=int(rep_ms), return_mode="median"))
    fn()  # warm-up: first-call allocations and dispatch caches
    samples: list[float] = []
    deadline = time.perf_counter() + rep_ms / 1000.0
    while len(samples) < 3 or (time.perf_counter() < deadline and len(samples) < max_reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(samples)


@dataclass
class Ceilings:
    copy_gbps: float  # device-to-device copy, bytes read + bytes written per second / 1e9
    matmul_tflops: float  # dense matmul at the bench dtype
    matmul_dtype: str
    matmul_size: int


def measure_ceilings(device: str, quick: bool = False) -> Ceilings:
    """Measure copy bandwidth and matmul throughput once per run (the denominators of every fraction)."""
    if device == "cuda":
        numel = 256 * 2**20  # 1 GiB of fp32: far beyond L2
        size, dtype = (4096 if quick else 8192), torch.bfloat16
    else:
        numel = 16 * 2**20
        size, dtype = 512, torch.float32
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    copy_gbps = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
    src = dst = None  # free the copy buffers before the matmul
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device)
    tflops = 2 * size**3 / (ms * 1e-3) / 1e12
    return Ceilings(copy_gbps=copy_gbps, matmul_tflops=tflops, matmul_dtype=str(dtype).replace("torch.", ""),
                    matmul_size=size)


def environment(device: str) -> dict[str, str]:
    """Device, driver and versions recorded beside every number."""
    import triton

    env = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()}, "
                                                                        f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda or "",
        "driver": "",
        "git_commit": _git_commit(),
    }
    if device == "cuda":
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            env["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else ""
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return env


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""
