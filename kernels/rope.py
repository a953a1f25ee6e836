"""Rotary position embeddings (RoPE) in the Hugging Face Llama "rotate_half" layout.

The head dimension is split in halves ``x = [x1, x2]`` (not interleaved pairs) and
``rope(x) = x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``, where
``cos``/``sin`` rows are ``cat(freqs, freqs)`` as ``LlamaRotaryEmbedding`` returns them.
One kernel program rotates every query and key head of one token, so GQA (fewer key heads
than query heads) costs nothing extra.

Casting: the rotation is computed in fp32 and rounded once to q's dtype (HF rounds after
each product in the input dtype; the difference is one rounding, within test tolerances).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from tritium.kernels._runtime import FLOAT_DTYPES, can_use_triton, check_tensor, empty, launch


# --------------------------------------------------------------------------------------------------
# 1. Triton kernel
# --------------------------------------------------------------------------------------------------
@triton.jit
def _rotate_heads(X, XO, stride_h, stride_oh, num_heads, d, d_mask, c1, c2, a, bb,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate the heads of one token: X/XO point at its first head, halves (x1, x2) at d and HALF + d."""
    h = tl.arange(0, BLOCK_H)[:, None]
    mask = (h < num_heads) & d_mask[None, :]
    x_ptr = X + h * stride_h + d[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    out_ptr = XO + h * stride_oh + d[None, :]
    tl.store(out_ptr, (x1 * c1 - x2 * a).to(XO.dtype.element_ty), mask=mask)
    tl.store(out_ptr + HALF, (x2 * c2 + x1 * bb).to(XO.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, COS, SIN, POS, QO, KO,
                 T, num_q_heads, num_kv_heads,
                 stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                 stride_qob, stride_qot, stride_qoh, stride_kob, stride_kot, stride_koh,
                 stride_cb, stride_ct, stride_pb, stride_pt,
                 HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
                 BLOCK_HKV: tl.constexpr, HAS_POSITION_IDS: tl.constexpr, BACKWARD: tl.constexpr):
    """One program per token (b, t): rotates all q and k heads of that token.

    With c = cos[row], s = sin[row] split in halves (c1, c2), (s1, s2):
        forward:  y1 = x1 c1 - x2 s1,   y2 = x2 c2 + x1 s2
        backward (transpose of the forward map):
                  dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1
    row = position_ids[b, t] when HAS_POSITION_IDS else t; cos has a batch stride of 0 when it
    is shared across the batch. In-place is safe (QO == Q): each program loads its token's two
    halves before storing them.
    """
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    if HAS_POSITION_IDS:
        row = tl.load(POS + b * stride_pb + t * stride_pt).to(tl.int64)
    else:
        row = t
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    cos_row = COS + b * stride_cb + row * stride_ct
    sin_row = SIN + b * stride_cb + row * stride_ct
    c1 = tl.load(cos_row + d, mask=d_mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + HALF + d, mask=d_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row + d, mask=d_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + HALF + d, mask=d_mask, other=0.0).to(tl.float32)
    if BACKWARD:
        a = -s2
        bb = -s1
    else:
        a = s1
        bb = s2
    a = a[None, :]
    bb = bb[None, :]
    c1 = c1[None, :]
    c2 = c2[None, :]

    _rotate_heads(Q + b * stride_qb + t * stride_qt, QO + b * stride_qob + t * stride_qot, stride_qh, stride_qoh,
                  num_q_heads, d, d_mask, c1, c2, a, bb, HALF, BLOCK_HQ)
    _rotate_heads(K + b * stride_kb + t * stride_kt, KO + b * stride_kob + t * stride_kot, stride_kh, stride_koh,
                  num_kv_heads, d, d_mask, c1, c2, a, bb, HALF, BLOCK_HKV)


# --------------------------------------------------------------------------------------------------
# 2. Launcher
# --------------------------------------------------------------------------------------------------
def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _validate(q, k, cos, sin, position_ids) -> None:
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor("k", k, dtypes=(q.dtype,), ndim=4, device=q.device)
    check_tensor("cos", cos, dtypes=FLOAT_DTYPES, ndim=(2, 3), device=q.device)
    check_tensor("sin", sin, dtypes=(cos.dtype,), ndim=(2, 3), device=q.device)
    B, T, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k must be (B={B}, T={T}, num_kv_heads, D={D}) like q, got {tuple(k.shape)}")
    if D % 2:
        raise ValueError(f"the head dim must be even for rotate_half RoPE, got {D}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    if cos.shape[-1] != D:
        raise ValueError(f"cos/sin last dim must equal the head dim {D}, got {cos.shape[-1]}")
    if cos.dim() == 3 and cos.shape[0] not in (1, B):
        raise ValueError(f"3-D cos/sin must be (B={B} or 1, positions, {D}), got {tuple(cos.shape)}")
    if position_ids is not None:
        check_tensor("position_ids", position_ids, dtypes=(torch.int32, torch.int64), ndim=2, device=q.device)
        if position_ids.shape != (B, T):
            raise ValueError(f"position_ids must be (B={B}, T={T}), got {tuple(position_ids.shape)}")
    elif cos.shape[-2] < T:
        raise ValueError(f"cos/sin cover {cos.shape[-2]} positions but q has T={T} (pass position_ids "
                         "or build cos/sin for at least T positions)")


def rope_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             position_ids: torch.Tensor | None = None, backward: bool = False,
             out_q: torch.Tensor | None = None, out_k: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the rotation (``backward=True`` applies the transpose, i.e. the gradient map).

    q (B, T, Hq, D), k (B, T, Hkv, D) may be strided views (e.g. HF's transposed heads) as long
    as the last dim is contiguous. ``out_q``/``out_k`` may be q/k themselves (in place).
    Positions are not bounds-checked on the device: rows must be < cos.shape[-2].
    """
    _validate(q, k, cos, sin, position_ids)
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    cos, sin = cos.contiguous(), sin.contiguous()
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    qo = empty(q.shape, dtype=q.dtype, device=q.device) if out_q is None else out_q
    ko = empty(k.shape, dtype=k.dtype, device=k.device) if out_k is None else out_k
    if q.numel() == 0:
        return qo, ko
    stride_cb = cos.stride(0) if (cos.dim() == 3 and cos.shape[0] > 1) else 0
    pos = position_ids if position_ids is not None else q  # dummy pointer when unused
    half = D // 2
    block_half = triton.next_power_of_2(half)
    block_hq, block_hkv = triton.next_power_of_2(Hq), triton.next_power_of_2(max(Hkv, 1))
    num_warps = 4 if block_hq * block_half <= 2048 else 8
    launch(_rope_kernel, (B * T,))(
        q, k, cos, sin, pos, qo, ko,
        T, Hq, Hkv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        stride_cb, cos.stride(-2),
        position_ids.stride(0) if position_ids is not None else 0,
        position_ids.stride(1) if position_ids is not None else 0,
        HALF=half, BLOCK_HALF=block_half, BLOCK_HQ=block_hq, BLOCK_HKV=block_hkv,
        HAS_POSITION_IDS=position_ids is not None, BACKWARD=backward, num_warps=num_warps)
    return qo, ko


@torch.library.custom_op("tritium::rope", mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             position_ids: torch.Tensor | None, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_fwd(q, k, cos, sin, position_ids, backward)


@_rope_op.register_fake
def _(q, k, cos, sin, position_ids, backward):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("tritium::rope_", mutates_args=("q", "k"))
def _rope_inplace_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     position_ids: torch.Tensor | None) -> None:
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("in-place RoPE needs q and k with a contiguous last dim")
    rope_fwd(q, k, cos, sin, position_ids, False, out_q=q, out_k=k)


@_rope_inplace_op.register_fake
def _(q, k, cos, sin, position_ids):
    return None


# --------------------------------------------------------------------------------------------------
# 3. Autograd
# --------------------------------------------------------------------------------------------------
class RoPEFunction(torch.autograd.Function):
    """cos/sin/position_ids are constants (no gradient); backward is the inverse rotation."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids):
        ctx.save_for_backward(cos, sin, position_ids)
        return _rope_op(q, k, cos, sin, position_ids, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, position_ids = ctx.saved_tensors
        dq, dk = _rope_op(dq, dk, cos, sin, position_ids, True)
        return dq, dk, None, None, None


# --------------------------------------------------------------------------------------------------
# 4. Public functions
# --------------------------------------------------------------------------------------------------
def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               position_ids: torch.Tensor | None = None, inplace: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, T, Hq, D) and k (B, T, Hkv, D) by RoPE (HF rotate_half layout).

    cos/sin: (P, D) shared by the batch, or (B or 1, P, D) per sequence (what HF's rotary
    embedding returns). Without ``position_ids`` token t uses row t (P >= T); with
    ``position_ids`` (B, T) token (b, t) uses row ``position_ids[b, t]`` (decode offsets, packed
    documents), so cos/sin must cover the largest position. cos/sin get no gradient.

    ``inplace=True`` overwrites q and k and returns them; it is only allowed when no gradient
    flows to q or k (inference, e.g. writing a KV cache), because autograd would otherwise see a
    tensor modified after use. Views with a strided head/time layout (HF's ``transpose(1, 2)``)
    are handled without copies as long as the last dim is contiguous.
    """
    if inplace:
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            raise ValueError("apply_rope(inplace=True) is only safe without autograd: q or k requires grad")
        if can_use_triton(q, k, cos, sin, position_ids) and q.stride(-1) == 1 and k.stride(-1) == 1:
            _rope_inplace_op(q, k, cos, sin, position_ids)
            return q, k
        q_new, k_new = apply_rope_ref(q, k, cos, sin, position_ids)
        q.copy_(q_new)
        k.copy_(k_new)
        return q, k
    if not can_use_triton(q, k, cos, sin, position_ids):
        return apply_rope_ref(q, k, cos, sin, position_ids)
    return RoPEFunction.apply(q, k, cos, sin, position_ids)


def _inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None, seq_len: int) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    factor = float(scaling["factor"]) if "factor" in scaling else None
    if factor is None or not factor > 0:
        raise ValueError(f"rope scaling {kind!r} needs a positive 'factor', got {scaling!r}")
    if kind == "linear":
        return inv_freq / factor
    if kind == "dynamic":
        # NTK-aware: grow the base once the sequence exceeds the trained context (HF "dynamic").
        original = int(scaling.get("original_max_position_embeddings", seq_len))
        if seq_len <= original:
            return inv_freq
        base = theta * ((factor * seq_len / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if kind == "llama3":
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        original = int(scaling.get("original_max_position_embeddings", 8192))
        low_freq_wavelen, high_freq_wavelen = original / low, original / high
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling type {kind!r}; supported: default, linear, dynamic, llama3")


def rope_cos_sin(seq_len: int, head_dim: int, theta: float = 10000.0, scaling: dict[str, Any] | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (seq_len, head_dim), rows = positions 0..seq_len-1, HF Llama layout.

    ``theta`` is ``rope_theta``; ``scaling`` an HF ``rope_scaling`` dict with ``rope_type`` (or
    ``type``) in {default, linear, dynamic, llama3} and its fields (``factor``,
    ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``).
    Frequencies and angles are computed in fp32 and cast to ``dtype`` at the end.
    """
    if seq_len < 0 or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"seq_len must be >= 0 and head_dim positive and even, got {seq_len}, {head_dim}")
    if not theta > 0:
        raise ValueError(f"theta must be > 0, got {theta!r}")
    inv_freq = _inv_freq(head_dim, float(theta), scaling, seq_len).to(device)
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# --------------------------------------------------------------------------------------------------
# 5. Reference
# --------------------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   position_ids: torch.Tensor | None = None, inplace: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch RoPE: ``x * cos + rotate_half(x) * sin`` in fp32, rounded to q's dtype."""
    _validate(q, k, cos, sin, position_ids)
    B, T = q.shape[:2]
    if position_ids is not None:
        if cos.dim() == 2:
            cos_rows, sin_rows = cos[position_ids], sin[position_ids]
        else:
            batch = torch.arange(B, device=q.device)[:, None] if cos.shape[0] > 1 else torch.zeros(
                B, 1, dtype=torch.long, device=q.device)
            cos_rows, sin_rows = cos[batch, position_ids], sin[batch, position_ids]
    else:
        cos_rows, sin_rows = cos[..., :T, :], sin[..., :T, :]
    if cos_rows.dim() == 2:
        cos_rows, sin_rows = cos_rows[None], sin_rows[None]
    cos_rows, sin_rows = cos_rows[:, :, None, :].float(), sin_rows[:, :, None, :].float()  # (B, T, 1, D)
    q_out = (q.float() * cos_rows + _rotate_half(q.float()) * sin_rows).to(q.dtype)
    k_out = (k.float() * cos_rows + _rotate_half(k.float()) * sin_rows).to(k.dtype)
    if inplace:
        q.copy_(q_out)
        k.copy_(k_out)
        return q, k
    return q_out, k_out
