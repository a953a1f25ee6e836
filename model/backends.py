"""Backend name -> the functions the model binds to (attention, norm, mlp, rope, loss).

The model never imports a kernel directly: when it is built, moved to another device, or
``set_backend`` is called, it asks ``resolve_backend(spec, device)`` for a ``Kernels`` table and
hands it to its layers, whose forwards then call those functions directly.  Swapping kernels is a
one-word change (``Transformer(cfg, backend="sdpa")``).

A spec is a base name, optionally followed by per-component overrides::

    "auto"                        the fastest correct path for the device: triton on CUDA,
                                  sdpa attention + PyTorch ops on CPU (measured: bench/NOTES.md)
    "triton"                      every component on tritium's Triton kernels
    "torch"                       every component on the PyTorch references (eager; torch.compile-able)
    "sdpa"                        torch references, attention on F.scaled_dot_product_attention
    "flash_attn"                  torch references, attention on the flash-attn package
    "torch,attention=sdpa"        base, then component=implementation overrides
    "triton,attention=flash_attn"

Components: attention (dense and varlen), norm (RMSNorm with optional fused residual add), mlp
(the SwiGLU activation), rope, loss (fused linear cross-entropy).  ``sdpa`` and ``flash_attn``
name attention implementations only; as a base they leave the other components on ``torch`` so a
benchmark of "sdpa" measures exactly one change against "torch".  ``eager`` (norm, rope) is plain
PyTorch with a hand-written backward: the references' math in about half as many tensor ops, which
is what costs time on a CPU (each op is a pass over memory and a thread-pool round trip).

What is requested is not always what runs: tritium's Triton kernels run on CUDA, and on CPU only
under ``TRITON_INTERPRET=1``; elsewhere each kernel would silently run its PyTorch reference.
``Kernels.choices`` therefore records the *effective* implementation per component, and resolving
logs one warning line per (spec, device) when a requested implementation falls back.
"""
from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tritium.kernels import (
    apply_rope,
    apply_rope_ref,
    attention_ref,
    flash_attn_func,
    flash_attn_varlen_func,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_ref,
    rms_norm,
    rms_norm_ref,
    swiglu,
    swiglu_ref,
    triton_runs_on,
    varlen_attention_ref,
)

log = logging.getLogger("tritium.model")

COMPONENTS = ("attention", "norm", "mlp", "rope", "loss")
IMPLEMENTATIONS = {
    "attention": ("torch", "triton", "sdpa", "flash_attn", "auto"),
    "norm": ("torch", "triton", "eager", "auto"),
    "mlp": ("torch", "triton", "auto"),
    "rope": ("torch", "triton", "eager", "auto"),
    "loss": ("torch", "triton", "auto"),
}
BASES = ("auto", "torch", "triton", "sdpa", "flash_attn")
# What "auto" means per device type (chosen by measurement, see the README's Backends section).
AUTO = {
    "cuda": dict.fromkeys(COMPONENTS, "triton"),
    "cpu": {**dict.fromkeys(COMPONENTS, "torch"), "attention": "sdpa", "norm": "eager", "rope": "eager"},
}


@dataclass(frozen=True)
class Kernels:
    """The functions one backend resolves to on one device type, with the tritium.kernels signatures."""

    spec: str  # the spec string this table was resolved from
    device_type: str  # "cuda", "cpu", "meta", ...
    choices: tuple[tuple[str, str], ...]  # (component, implementation that really runs)
    fallbacks: tuple[tuple[str, str], ...]  # (component, requested implementation that could not run)
    attention: Callable  # (q, k, v) on (B, T, H, D), causal -> (B, T, Hq, D)
    varlen_attention: Callable  # (q, k, v, cu_seqlens, max_seqlen) on packed (N, H, D), causal -> (N, Hq, D)
    rms_norm: Callable  # (x, weight, eps, residual=None) -> y or (y, x + residual)
    swiglu: Callable  # (gate, up) -> silu(gate) * up
    apply_rope: Callable  # (q, k, cos, sin) with cos/sin (T, D) or (B, T, D) -> (q, k)
    linear_cross_entropy: Callable  # (hidden (N, H), weight (V, H), targets (N,), ignore_index, reduction)

    @property
    def effective(self) -> dict[str, str]:
        """{component: implementation that really runs}."""
        return dict(self.choices)


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


def resolve_backend(spec: str, device: torch.device | str = "cpu") -> Kernels:
    """The ``Kernels`` table for ``spec`` on ``device``: "auto" resolved for the device type, and
    every "triton" that cannot run there replaced by "torch" (one warning line logged)."""
    return _resolve(spec, torch.device(device).type)


@functools.lru_cache(maxsize=64)
def _resolve(spec: str, device_type: str) -> Kernels:
    requested = parse_backend(spec)
    auto = AUTO.get(device_type, AUTO["cpu"])
    choices = {c: (auto[c] if impl == "auto" else impl) for c, impl in requested.items()}
    if choices["attention"] == "flash_attn" and device_type != "meta":  # a meta model never runs: check on the move
        _require_flash_attn(device_type)
    fallbacks = {}
    if not triton_runs_on(device_type):
        fallbacks = {c: impl for c, impl in choices.items() if impl == "triton"}
        choices.update(dict.fromkeys(fallbacks, "torch"))
        # "meta" models are never run: only warn where a forward would really take the fallback.
        if fallbacks and device_type != "meta":
            hint = " (set TRITON_INTERPRET=1 before importing triton to run them on CPU)" if device_type == "cpu" else ""
            log.warning("backend %r: Triton kernels cannot run on %s%s; %s fall back to the PyTorch references",
                        spec, device_type, hint, ", ".join(fallbacks))
    attention, varlen = _ATTENTION[choices["attention"]]
    return Kernels(
        spec=spec,
        device_type=device_type,
        choices=tuple(choices.items()),
        fallbacks=tuple(fallbacks.items()),
        attention=attention,
        varlen_attention=varlen,
        rms_norm={"triton": rms_norm, "eager": rms_norm_eager, "torch": rms_norm_ref}[choices["norm"]],
        swiglu=swiglu if choices["mlp"] == "triton" else swiglu_ref,
        apply_rope={"triton": apply_rope, "eager": apply_rope_eager, "torch": apply_rope_ref}[choices["rope"]],
        linear_cross_entropy=_triton_loss if choices["loss"] == "triton" else _torch_loss,
    )


# --------------------------------------------------------------------------- attention
def _torch_attention(q, k, v):
    return attention_ref(q, k, v, causal=True)


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen):
    return varlen_attention_ref(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)


def _triton_attention(q, k, v):
    return flash_attn_func(q, k, v, causal=True)


def _triton_varlen(q, k, v, cu_seqlens, max_seqlen):
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # SDPA wants (B, H, T, D).  enable_gqa lets the kernel read each kv head for its whole query
    # group instead of materialising repeat_interleave'd copies (a third of the CPU attention time).
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1]).transpose(1, 2)


def _sdpa_varlen(q, k, v, cu_seqlens, max_seqlen):
    # SDPA has no varlen entry point: run each packed document on its own (causal within the
    # document), which is exactly block-diagonal causal attention without an (N, N) mask.
    bounds = cu_seqlens.tolist()
    outs = [_sdpa(q[None, s:e], k[None, s:e], v[None, s:e])[0] for s, e in itertools.pairwise(bounds) if e > s]
    return torch.cat(outs) if outs else torch.empty_like(q)


def _flash_attn_package():
    import flash_attn  # optional CUDA-only package: imported only when asked for

    return flash_attn


def _flash_attention(q, k, v):
    return _flash_attn_package().flash_attn_func(q, k, v, causal=True)


def _flash_varlen(q, k, v, cu_seqlens, max_seqlen):
    return _flash_attn_package().flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                                        causal=True)


def _require_flash_attn(device_type: str) -> None:
    try:
        _flash_attn_package()
    except ImportError:
        raise ImportError("backend attention=flash_attn needs the flash-attn package "
                          "(pip install 'tritium[flash]', CUDA only); use 'sdpa' or 'triton' instead") from None
    if device_type != "cuda":
        raise ValueError(f"backend attention=flash_attn runs on CUDA only, not on {device_type!r}; "
                         "use 'sdpa' or 'torch' there")


_ATTENTION = {"torch": (_torch_attention, _torch_varlen), "triton": (_triton_attention, _triton_varlen),
              "sdpa": (_sdpa, _sdpa_varlen), "flash_attn": (_flash_attention, _flash_varlen)}


# --------------------------------------------------------------------------- eager norm and rope
def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # fp32 for 16-bit inputs, as the references


class _RMSNormEager(torch.autograd.Function):
    """y = weight * (x * rstd), rstd = 1 / sqrt(mean(x^2) + eps), HF Llama's rounding (normalise in
    fp32, round, then scale); backward dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * weight."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.to(_compute_dtype(x))
        rstd = torch.rsqrt(torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps))
        y = weight * (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(rstd.dtype) * rstd  # (N, D) in fp32 (or fp64)
        g = (dy * weight).to(rstd.dtype)
        dot = torch.linalg.vecdot(g, xhat, dim=-1).unsqueeze(-1).div_(-x.shape[-1])
        dx = torch.addcmul(g, xhat, dot).mul_(rstd).to(x.dtype)
        dweight = (dy * xhat.to(dy.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return dx, dweight, None


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rms_norm_eager(x, weight, eps=1e-6, residual=None):
    """``rms_norm_ref``'s signature and math with a hand-written backward (fewer tensor ops)."""
    h = x if residual is None else x + residual
    if h.dtype == weight.dtype == torch.float32 and not _needs_grad(h, weight):
        # Inference in fp32 (generation on CPU): one fused op, the same math (no rounding step in
        # between to reproduce), no autograd node. 16-bit inputs keep HF's round-then-scale below.
        y = F.rms_norm(h, (h.shape[-1],), weight, eps)
    else:
        y = _RMSNormEager.apply(h, weight, eps)
    return y if residual is None else (y, h)


class _RoPEEager(torch.autograd.Function):
    """rotate_half(x) * sin == roll(x, D/2) * sin_signed (first half of sin negated), so RoPE is
    one multiply, one roll and one fused multiply-add per tensor; the backward is the same with
    the roll after the multiply (a half-swap is its own transpose)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin_signed):
        ctx.save_for_backward(cos, sin_signed)
        half, acc = q.shape[-1] // 2, _compute_dtype(q)
        return tuple(torch.addcmul(t.to(acc) * cos, t.to(acc).roll(half, -1), sin_signed).to(t.dtype) for t in (q, k))

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin_signed = ctx.saved_tensors
        half, acc = dq.shape[-1] // 2, _compute_dtype(dq)
        grads = (torch.addcmul((d.to(acc) * sin_signed).roll(half, -1), d.to(acc), cos).to(d.dtype) for d in (dq, dk))
        return (*grads, None, None)


# The last (cos, sin) -> (cos, sin_signed) preparation: every layer of a forward pass gets the same
# cos/sin tensors from ``Transformer.rotary``, so it is done once per pass instead of once per layer.
# Held by identity (with the tensors themselves, so their ids cannot be reused while cached).
_ROPE_PREP: list = [None]


def _rope_tables(cos, sin, T, half, acc):
    entry = _ROPE_PREP[0]
    # Per inference mode too: tables made under inference_mode cannot be saved for backward outside it.
    mode = (T, acc, torch.is_inference_mode_enabled())
    if entry is not None and entry[0] is cos and entry[1] is sin and entry[2] == mode:
        return entry[3], entry[4]
    cos_t, sin_t = cos[..., :T, None, :].to(acc), sin[..., :T, None, :].to(acc)  # (.., T, 1, D): over heads
    sin_signed = torch.cat([-sin_t[..., :half], sin_t[..., half:]], dim=-1)
    if not (cos.requires_grad or sin.requires_grad):
        _ROPE_PREP[0] = (cos, sin, mode, cos_t, sin_signed)
    return cos_t, sin_signed


def apply_rope_eager(q, k, cos, sin, position_ids=None):
    """``apply_rope_ref``'s math on q (B, T, Hq, D), k (B, T, Hkv, D), cos/sin (T, D) or (B, T, D)."""
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]
    T, half = q.shape[1], q.shape[-1] // 2
    acc = _compute_dtype(q)
    cos, sin_signed = _rope_tables(cos, sin, T, half, acc)
    if q.dtype == acc and not _needs_grad(q, k):  # inference: the forward's ops without an autograd node
        return tuple(torch.addcmul(t * cos, t.roll(half, -1), sin_signed) for t in (q, k))
    return _RoPEEager.apply(q, k, cos, sin_signed)


def _torch_loss(hidden, weight, targets, ignore_index=-100, reduction="mean"):
    return fused_linear_cross_entropy_ref(hidden, weight, targets, ignore_index=ignore_index, reduction=reduction)


def _triton_loss(hidden, weight, targets, ignore_index=-100, reduction="mean"):
    return fused_linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, reduction=reduction)
