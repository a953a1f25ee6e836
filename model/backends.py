"""Backend name -> the functions the model calls (attention, norm, mlp, rope, loss).

The model never imports a kernel directly: it asks ``resolve_backend(spec,
device)`` for an ``Ops`` table and calls through it, so swapping kernels is a
one-word change (``Transformer(cfg, backend="sdpa")``).

A spec is a base name, optionally followed by per-component overrides::

    "triton"                      every component on tritium's Triton kernels
    "torch"                       every component on the PyTorch references (eager; torch.compile-able)
    "sdpa"                        torch references, attention on F.scaled_dot_product_attention
    "flash_attn"                  torch references, attention on the flash-attn package
    "auto"                        triton on CUDA, torch elsewhere (resolved per input device)
    "torch,attention=sdpa"        base, then component=implementation overrides
    "triton,attention=flash_attn"

Components: attention (dense and varlen), norm (RMSNorm with optional fused
residual add), mlp (the SwiGLU activation), rope, loss (fused linear
cross-entropy).  ``sdpa`` and ``flash_attn`` name attention implementations
only; as a base they leave the other components on ``torch`` so a benchmark of
"sdpa" measures exactly one change against "torch".
"""
from __future__ import annotations

import functools
import importlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

COMPONENTS = ("attention", "norm", "mlp", "rope", "loss")
IMPLEMENTATIONS = {
    "attention": ("torch", "triton", "sdpa", "flash_attn", "auto"),
    "norm": ("torch", "triton", "auto"),
    "mlp": ("torch", "triton", "auto"),
    "rope": ("torch", "triton", "auto"),
    "loss": ("torch", "triton", "auto"),
}
BASES = ("auto", "torch", "triton", "sdpa", "flash_attn")


@dataclass(frozen=True)
class Ops:
    """The functions one backend resolves to, all with the tritium.kernels signatures."""

    spec: str  # the spec string this table was resolved from
    choices: tuple[tuple[str, str], ...]  # (component, implementation) after resolving "auto"
    attention: Callable  # (q, k, v, causal=True) on (B, T, H, D) -> (B, T, Hq, D)
    varlen_attention: Callable  # (q, k, v, cu_seqlens, max_seqlen) on packed (N, H, D) -> (N, Hq, D)
    rms_norm: Callable  # (x, weight, eps, residual=None) -> y or (y, x + residual)
    swiglu: Callable  # (gate, up) -> silu(gate) * up
    apply_rope: Callable  # (q, k, cos, sin, position_ids=None) -> (q, k)
    linear_cross_entropy: Callable  # (hidden (N, H), weight (V, H), targets (N,), ignore_index, reduction)


def parse_backend(spec: str) -> dict[str, str]:
    """``"torch,attention=sdpa"`` -> {component: implementation}; raises ValueError naming the bad part."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"backend must be a non-empty string such as 'auto' or 'torch,attention=sdpa', got {spec!r}")
    parts = [p.strip() for p in spec.split(",")]
    base = "auto"
    if "=" not in parts[0]:
        base = parts.pop(0)
    if base not in BASES:
        raise ValueError(f"backend {spec!r}: unknown base {base!r}; choose one of {BASES}")
    attention_base = base
    rest_base = "torch" if base in ("sdpa", "flash_attn") else base
    choices = {c: (attention_base if c == "attention" else rest_base) for c in COMPONENTS}
    for part in parts:
        component, sep, impl = (s.strip() for s in part.partition("="))
        if not sep:
            raise ValueError(f"backend {spec!r}: {part!r} must be component=implementation "
                             "(only the first entry may be a bare base name)")
        if component not in IMPLEMENTATIONS:
            raise ValueError(f"backend {spec!r}: unknown component {component!r}; choose from {COMPONENTS}")
        if impl not in IMPLEMENTATIONS[component]:
            raise ValueError(f"backend {spec!r}: {component} cannot use {impl!r}; "
                             f"choose from {IMPLEMENTATIONS[component]}")
        choices[component] = impl
    return choices


def resolve_backend(spec: str, device: torch.device | str = "cpu") -> Ops:
    """The ``Ops`` table for ``spec`` on ``device`` ("auto" = triton on CUDA, torch otherwise)."""
    return _resolve(spec, torch.device(device).type)


@functools.lru_cache(maxsize=64)
def _resolve(spec: str, device_type: str) -> Ops:
    choices = parse_backend(spec)
    auto = "triton" if device_type == "cuda" else "torch"
    choices = {c: (auto if impl == "auto" else impl) for c, impl in choices.items()}
    if choices["attention"] == "flash_attn":
        _require_flash_attn(device_type)
    attention, varlen = _ATTENTION[choices["attention"]]()
    return Ops(
        spec=spec,
        choices=tuple(choices.items()),
        attention=attention,
        varlen_attention=varlen,
        rms_norm=_NORM[choices["norm"]](),
        swiglu=_MLP[choices["mlp"]](),
        apply_rope=_ROPE[choices["rope"]](),
        linear_cross_entropy=_LOSS[choices["loss"]](),
    )


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, scaling: dict | None, device) -> tuple:
    """fp32 (seq_len, head_dim) cos/sin tables in the Hugging Face rotate_half layout."""
    from tritium.kernels.rope import rope_cos_sin as tables

    return tables(seq_len, head_dim, theta=theta, scaling=scaling, device=device, dtype=torch.float32)


# --------------------------------------------------------------------------- attention
# Kernel modules are imported lazily, inside these getters: importing the model
# costs no triton import until a backend is resolved.

def _attention_torch():
    attention_ref = _kernel("attention", "attention_ref")()
    varlen_attention_ref = _kernel("attention", "varlen_attention_ref")()

    return (lambda q, k, v, causal=True: attention_ref(q, k, v, causal=causal),
            lambda q, k, v, cu, max_len: varlen_attention_ref(q, k, v, cu, cu, max_len, max_len, causal=True))


def _attention_triton():
    from tritium.kernels.attention import flash_attn_func, flash_attn_varlen_func

    return (lambda q, k, v, causal=True: flash_attn_func(q, k, v, causal=causal),
            lambda q, k, v, cu, max_len: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True))


def _attention_flash_attn():
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    return (lambda q, k, v, causal=True: flash_attn_func(q, k, v, causal=causal),
            lambda q, k, v, cu, max_len: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    # SDPA wants (B, H, T, D) and equal head counts; repeating kv heads (as HF's sdpa path does)
    # keeps this working on every torch >= 2.4 rather than relying on enable_gqa.
    group = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)


def _sdpa_varlen(q, k, v, cu_seqlens, max_seqlen):
    # SDPA has no varlen entry point: run each packed document on its own (causal within the
    # document), which is exactly block-diagonal causal attention without an (N, N) mask.
    bounds = cu_seqlens.tolist()
    outs = [_sdpa(q[None, s:e], k[None, s:e], v[None, s:e])[0] for s, e in itertools.pairwise(bounds) if e > s]
    return torch.cat(outs) if outs else torch.empty_like(q)


def _require_flash_attn(device_type: str) -> None:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        raise ImportError("backend attention=flash_attn needs the flash-attn package "
                          "(pip install 'tritium[flash]', CUDA only); use 'sdpa' or 'triton' instead") from None
    if device_type != "cuda":
        raise ValueError(f"backend attention=flash_attn runs on CUDA only, not on {device_type!r}; "
                         "use 'sdpa' or 'torch' there")


_ATTENTION = {"torch": _attention_torch, "triton": _attention_triton, "sdpa": lambda: (_sdpa, _sdpa_varlen),
              "flash_attn": _attention_flash_attn}


# --------------------------------------------------------------------------- norm, mlp, rope, loss
def _kernel(module: str, name: str):
    def get():
        return getattr(importlib.import_module(f"tritium.kernels.{module}"), name)
    return get


def _loss(name):
    def get():
        fn = _kernel("loss", name)()
        return lambda hidden, weight, targets, ignore_index=-100, reduction="mean": fn(
            hidden, weight, targets, ignore_index=ignore_index, reduction=reduction)
    return get


_NORM = {"torch": _kernel("norm", "rms_norm_ref"), "triton": _kernel("norm", "rms_norm")}
_MLP = {"torch": _kernel("mlp", "swiglu_ref"), "triton": _kernel("mlp", "swiglu")}
_ROPE = {"torch": _kernel("rope", "apply_rope_ref"), "triton": _kernel("rope", "apply_rope")}
_LOSS = {"torch": _loss("fused_linear_cross_entropy_ref"), "triton": _loss("fused_linear_cross_entropy")}
