"""How fast and how well a run goes: peak FLOP/s for MFU, JSONL/TensorBoard logging, memory, the loss plot.

MFU (model FLOPs utilisation, PaLM 2022) = achieved model FLOP/s / peak FLOP/s.
Model FLOPs per token come from ``tritium.model.sizing.flops_per_token``
(6N for the matmuls plus the attention term), so recomputation under
activation checkpointing does not inflate it.  The peak is the device's dense
bf16/fp16 tensor-core number from its datasheet for GPUs we know, a
``--peak-flops`` given by the user, or -- on CPU, where there is no datasheet
-- the instruction-set bound of this rank's cores (``cpu_peak_flops``), labelled
``cpu-isa-bound:...`` in metrics.jsonl.  An MFU above 100% is never reported
(``model_flops_utilization``): it would mean the peak is wrong.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from tritium.train.checkpoints import writing

# Dense (no sparsity) peak FLOP/s per device, from vendor datasheets: (16-bit tensor core, TF32/fp32).
GPU_PEAKS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 494.5e12),
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 494.5e12),  # SXM
    "H800": (989e12, 494.5e12),
    "GH200": (989e12, 494.5e12),
    "A100": (312e12, 156e12),
    "A800": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "L4": (121e12, 60e12),
    "A10": (125e12, 62.5e12),
    "RTX 4090": (165e12, 82.6e12),
    "RTX 3090": (71e12, 35.6e12),
    "V100": (125e12, 15.7e12),
    "T4": (65e12, 8.1e12),
}


@functools.cache
def measure_cpu_matmul_flops(size: int = 512, repeats: int = 8) -> float:
    """fp32 matmul FLOP/s on this process's torch threads (best of ``repeats``, after a warm-up)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / max(best, 1e-9)


def model_flops_utilization(model_flops_per_s: float, peak_flops_per_s: float) -> tuple[float | None, str | None]:
    """(MFU, None), or (None, why) when the peak is unknown or the ratio exceeds 1.

    An MFU above 100% is impossible, so it means the peak is wrong -- typically a CPU matmul rate
    measured while other processes shared the cores -- and is never reported as a number.
    """
    if not model_flops_per_s > 0:
        return None, "model FLOPs per token unknown"
    if not peak_flops_per_s or not math.isfinite(peak_flops_per_s):
        return None, "peak FLOP/s unknown: pass --peak-flops"
    mfu = model_flops_per_s / peak_flops_per_s
    if mfu > 1.0:
        return None, (f"above 100% ({mfu:.0%}) against a peak of {peak_flops_per_s / 1e9:,.1f} GFLOP/s: the peak is "
                      "too low (on CPU, a matmul rate measured on shared cores); pass --peak-flops")
    return mfu, None


def cpu_peak_flops() -> tuple[float, str] | None:
    """fp32 peak of the cores this rank may use: cores x clock x FLOPs per cycle, from /proc/cpuinfo.

    A CPU has no datasheet number to look up, and a matmul measured on shared cores swings several-fold
    between runs (44.7 to 221 GFLOP/s on one 2-core box), which once made MFU read 157%.  The
    instruction-set bound is steady and never below what the cores can do: FMA units x vector width x 2
    -- 64 FLOP/cycle with AVX-512 (two FMA units), 32 with AVX2+FMA, 16 with AVX, 8 otherwise.  Cores:
    this rank's torch threads, at most its share of the machine (``LOCAL_WORLD_SIZE`` / ``LOCAL_SIZE`` ranks).  None
    where /proc/cpuinfo is missing (macOS, Windows).
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    mhz = [float(line.split(":", 1)[1]) for line in text.splitlines() if line.startswith("cpu MHz")]
    if not mhz:
        return None
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 16 if "avx" in flags else 8
    local_ranks = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1"  # torchrun, deepspeed
    share = max(1, (os.cpu_count() or 1) // max(1, int(local_ranks)))
    cores = max(1, min(torch.get_num_threads(), share))
    ghz = max(mhz) / 1e3
    return cores * ghz * 1e9 * per_cycle, f"cpu-isa-bound:{cores}x{ghz:.2f}GHzx{per_cycle}"


def device_peak_flops(precision: str, override: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device for ``precision``, where the number came from)."""
    if override:
        return float(override), "user"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, (half, single) in GPU_PEAKS.items():  # ordered: "H100 PCIe" before "H100"
            if key in name:
                return (half if precision in ("bf16", "fp16") else single), f"datasheet:{key}"
        return math.nan, f"unknown-gpu:{name}"
    bound = cpu_peak_flops()
    # the reported clock can sit below turbo: never let a measured rate exceed the bound we divide by
    return (max(bound[0], measure_cpu_matmul_flops()), bound[1]) if bound else (measure_cpu_matmul_flops(),
                                                                                 "measured-cpu-matmul")


def memory_stats() -> dict[str, float]:
    """Peak accelerator memory (GiB) on CUDA; resident set size (GiB) of this process on CPU."""
    if torch.cuda.is_available():
        return {"mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                "mem_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    try:
        import psutil

        return {"mem_gib": psutil.Process(os.getpid()).memory_info().rss / 2**30}
    except ImportError:  # pragma: no cover - psutil comes with deepspeed
        import resource

        return {"mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class MetricsWriter:
    """metrics.jsonl (one JSON object per logged step, appended, flushed) and optional TensorBoard."""

    def __init__(self, run_dir: str | Path | None, *, tensorboard: bool = False, enabled: bool = True):
        self.enabled = enabled and run_dir is not None
        self.path = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        with writing(self.path, "log"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - appended to for the whole run
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                print("tritium train: --tensorboard ignored (pip install tensorboard)", flush=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with writing(self.path, "log"):
            self._file.write(json.dumps(_jsonable(record), sort_keys=False) + "\n")
            self._file.flush()
        if self._tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            with writing(self.path, "log"):
                file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in record.items():
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None  # JSON has no NaN/inf
        out[key] = value
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (for tests, plots and reports)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_loss(records: list[dict[str, Any]], path: str | Path, title: str = "training loss") -> Path | None:
    """Train (and validation) loss against step, saved as a PNG; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
