"""One registry of benchmark cases.

A case declares its sizes (full and quick), how to count its FLOPs and the
bytes it must move, and its providers: ``tritium`` plus the baselines a user
would otherwise reach for.  A provider is a factory ``(size, mode, device,
dtype) -> fn``; ``fn()`` runs one timed call.  A factory raises ``Skip`` with
a reason when the provider cannot run here (flash-attn not installed,
torch.compile on CPU, ...); the report keeps the reason.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class Skip(Exception):
    """Raised by a provider factory that cannot run in this environment."""


Size = dict[str, Any]
Factory = Callable[[Size, str, str, torch.dtype], Callable[[], object]]


@dataclass
class Case:
    name: str  # e.g. "rms_norm"
    area: str  # kernels | attention | model | train | generation
    sizes: list[Size]  # the full sweep on a GPU
    quick_sizes: list[Size]  # a minute-long pass (also what CPU runs)
    providers: dict[str, Factory]  # provider name -> factory; "tritium" is ours
    metric: str = "GB/s"  # what the throughput column means: GB/s, TFLOP/s or tokens/s
    modes: tuple[str, ...] = ("fwd",)  # subset of fwd, bwd, fwd+bwd
    flops: Callable[[Size, str], float] | None = None  # FLOPs of one call in a mode
    bytes: Callable[[Size, str, torch.dtype], float] | None = None  # bytes that must move in a mode
    work: Callable[[Size, str], float] | None = None  # items (tokens) per call when metric is tokens/s
    baseline: str = "torch"  # the provider ratios are taken against
    cpu_sizes: list[Size] | None = None  # sizes small enough for CPU; defaults to quick_sizes[:1]
    note: str = ""  # shown in the report
    extra: dict[str, Any] = field(default_factory=dict)

    def label(self, size: Size) -> str:
        return ",".join(f"{k}={v}" for k, v in size.items())


REGISTRY: dict[str, Case] = {}


def register(case: Case) -> Case:
    if case.name in REGISTRY:
        raise ValueError(f"benchmark case {case.name!r} registered twice")
    REGISTRY[case.name] = case
    return case


def load_all() -> dict[str, Case]:
    """Import every cases_* module so their cases register themselves."""
    from tritium.bench import cases_attention, cases_kernels, cases_model  # noqa: F401

    try:
        from tritium.bench import cases_generation, cases_speculative  # noqa: F401
    except ImportError:  # serve extra missing: generation cases are simply absent
        pass
    try:
        from tritium.bench import cases_structured  # noqa: F401
    except ImportError:  # serve extra missing
        pass
    try:
        from tritium.bench import cases_train  # noqa: F401
    except ImportError:  # deepspeed missing (e.g. a bare GPU box): training cases are absent
        pass
    return REGISTRY


def select(filter_text: str | None) -> list[Case]:
    cases = list(load_all().values())
    if not filter_text:
        return cases
    wanted = [w.strip() for w in filter_text.split(",") if w.strip()]
    chosen = [c for c in cases if any(w in c.name or w == c.area for w in wanted)]
    if not chosen:
        raise ValueError(f"--filter {filter_text!r} matches no benchmark; cases: {', '.join(c.name for c in cases)}")
    return chosen


def fwd_bwd(forward: Callable[[], torch.Tensor], mode: str, grad_inputs: list[torch.Tensor]) -> Callable[[], object]:
    """Turn a forward closure into the closure timed for ``mode``.

    For ``bwd`` the forward runs once outside the timing and the backward is
    replayed with ``retain_graph`` (the usual way to time a backward alone).
    """
    if mode == "fwd":
        def run_fwd():
            with torch.no_grad():
                return forward()
        return run_fwd
    out = forward()
    grad = torch.randn_like(out)
    if mode == "bwd":
        def run_bwd():
            for t in grad_inputs:
                t.grad = None
            out.backward(grad, retain_graph=True)
        return run_bwd
    if mode == "fwd+bwd":
        def run_both():
            for t in grad_inputs:
                t.grad = None
            forward().backward(grad)
        return run_both
    raise ValueError(f"unknown mode {mode!r}; expected fwd, bwd or fwd+bwd")


def compiled(fn: Callable, device: str) -> Callable:
    """``torch.compile`` of a reference, or Skip where compile cannot run."""
    if device != "cuda":
        raise Skip("torch.compile baseline runs on CUDA only (CPU numbers are code-path checks)")
    return torch.compile(fn, dynamic=False)


def need_cuda(device: str, what: str = "Triton kernels") -> None:
    if device != "cuda":
        raise Skip(f"{what} are timed on CUDA only; on CPU they would run in the interpreter or fall back")
