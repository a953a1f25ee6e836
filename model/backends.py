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
from dataclasses import dataclass
from typing import Callable

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
    try:
        from tritium.kernels.rope import rope_cos_sin as tables
    except ModuleNotFoundError:  # TEMPORARY until kernels/rope.py lands
        tables = _PRIVATE["rope_cos_sin_ref"]
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
    outs = [_sdpa(q[None, s:e], k[None, s:e], v[None, s:e])[0] for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
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
        import importlib

        try:
            return getattr(importlib.import_module(f"tritium.kernels.{module}"), name)
        except (ModuleNotFoundError, AttributeError):
            if name.endswith("_ref") and name in _PRIVATE:  # TEMPORARY until the kernel file lands
                return _PRIVATE[name]
            raise
    return get


def _loss(name):
    def get():
        fn = _kernel("cross_entropy", name)()
        return lambda hidden, weight, targets, ignore_index=-100, reduction="mean": fn(
            hidden, weight, targets, ignore_index=ignore_index, reduction=reduction)
    return get


_NORM = {"torch": _kernel("rms_norm", "rms_norm_ref"), "triton": _kernel("rms_norm", "rms_norm")}
_MLP = {"torch": _kernel("swiglu", "swiglu_ref"), "triton": _kernel("swiglu", "swiglu")}
_ROPE = {"torch": _kernel("rope", "apply_rope_ref"), "triton": _kernel("rope", "apply_rope")}
_LOSS = {"torch": _loss("fused_linear_cross_entropy_ref"), "triton": _loss("fused_linear_cross_entropy")}


# --------------------------------------------------------------------------- TEMPORARY private references
def _rms_norm_ref(x, weight, eps=1e-6, residual=None):
    if residual is not None:
        x = x + residual
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return (y, x) if residual is not None else y


def _swiglu_ref(gate, up):
    return F.silu(gate.float()).to(gate.dtype) * up


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope_ref(q, k, cos, sin, position_ids=None):
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]  # (B, T, D)
    elif cos.dim() == 2:
        cos, sin = cos[: q.shape[1]], sin[: q.shape[1]]
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()  # broadcast over heads
    rot = lambda x: (x.float() * cos + _rotate_half(x.float()) * sin).to(x.dtype)  # noqa: E731
    return rot(q), rot(k)


def _rope_cos_sin(seq_len, head_dim, theta=10000.0, scaling=None, device=None, dtype=torch.float32):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind != "default":
        raise ValueError(f"rope_scaling type {kind!r} is not supported by the private reference")
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _attention_ref(q, k, v, causal=True, **_):
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) / q.shape[-1] ** 0.5
    if causal:
        T, S = q.shape[1], k.shape[1]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v.float()).to(q.dtype)


def _varlen_attention_ref(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, **_):
    bounds = cu_q.tolist()
    return torch.cat([_attention_ref(q[None, s:e], k[None, s:e], v[None, s:e], causal)[0]
                      for s, e in zip(bounds[:-1], bounds[1:])])


def _flce_ref(hidden, weight, targets, ignore_index=-100, reduction="mean"):
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


_PRIVATE = {"rms_norm_ref": _rms_norm_ref, "swiglu_ref": _swiglu_ref, "apply_rope_ref": _apply_rope_ref,
            "rope_cos_sin_ref": _rope_cos_sin, "attention_ref": _attention_ref,
            "varlen_attention_ref": _varlen_attention_ref, "fused_linear_cross_entropy_ref": _flce_ref}
