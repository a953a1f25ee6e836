"""Run selected cases and turn timings into rows: time, throughput, fraction
of the measured ceiling, and the ratio to the case's baseline from the same run."""
from __future__ import annotations

import gc
import traceback
from typing import Any

import torch

from tritium.bench.registry import Case, Skip
from tritium.bench.timing import Ceilings, time_ms


def sizes_for(case: Case, device: str, quick: bool) -> list[dict[str, Any]]:
    if device != "cuda":
        return case.cpu_sizes if case.cpu_sizes is not None else case.quick_sizes[:1]
    return case.quick_sizes if quick else case.sizes


def _peak_memory_mb(fn, device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_case(case: Case, device: str, dtype: torch.dtype, quick: bool, ceilings: Ceilings,
             log=print) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for size in sizes_for(case, device, quick):
        for mode in case.modes:
            group: list[dict[str, Any]] = []
            for provider, factory in case.providers.items():
                row: dict[str, Any] = {"case": case.name, "area": case.area, "size": case.label(size),
                                       "mode": mode, "provider": provider, "dtype": str(dtype).replace("torch.", ""),
                                       "metric": case.metric, "ms": None, "throughput": None,
                                       "fraction_of_ceiling": None, "speedup_vs_baseline": None,
                                       "peak_mem_mb": None, "status": "ok", "note": ""}
                try:
                    torch.manual_seed(0)
                    fn = factory(size, mode, device, dtype)
                    ms = time_ms(fn, device, rep_ms=50 if quick else 100)
                    row["ms"] = ms
                    row["peak_mem_mb"] = _peak_memory_mb(fn, device)
                    row["throughput"], row["fraction_of_ceiling"] = _throughput(case, size, mode, dtype, ms, ceilings)
                except Skip as skip:
                    row["status"], row["note"] = "skipped", str(skip)
                except torch.OutOfMemoryError:
                    row["status"], row["note"] = "skipped", "out of memory at this size"
                except Exception as exc:  # noqa: BLE001 - one broken provider must not sink the report
                    row["status"], row["note"] = "error", f"{type(exc).__name__}: {exc}"
                    log(f"[bench] {case.name} {row['size']} {mode} {provider}: {row['note']}")
                    if device == "cuda":
                        traceback.print_exc()
                group.append(row)
                fn = None
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
            base = next((r for r in group if r["provider"] == case.baseline and r["ms"]), None)
            for r in group:
                if base and r["ms"]:
                    r["speedup_vs_baseline"] = base["ms"] / r["ms"]
            rows.extend(group)
    return rows


def _throughput(case: Case, size, mode, dtype, ms: float, ceilings: Ceilings) -> tuple[float | None, float | None]:
    seconds = ms * 1e-3
    if case.metric == "GB/s" and case.bytes is not None:
        gbps = case.bytes(size, mode, dtype) / seconds / 1e9
        return gbps, gbps / ceilings.copy_gbps
    if case.metric == "TFLOP/s" and case.flops is not None:
        tflops = case.flops(size, mode) / seconds / 1e12
        return tflops, tflops / ceilings.matmul_tflops
    if case.metric == "tokens/s" and case.work is not None:
        tokens_per_s = case.work(size, mode) / seconds
        fraction = None
        if case.flops is not None:
            fraction = case.flops(size, mode) / seconds / 1e12 / ceilings.matmul_tflops  # MFU against measured peak
        return tokens_per_s, fraction
    return None, None
