"""Fused flash attention: forward, backward, GQA/MQA, varlen, sliding window, softcap.

Drop-in with flash-attn's conventions (``flash_attn_func`` / ``flash_attn_varlen_func``):
q (B, T, Hq, D), k/v (B, S, Hkv, D) with Hq a multiple of Hkv; packed (total, H, D) with
``cu_seqlens`` for varlen. Query i may attend key j iff

    i + (S - T) - window_left <= j <= i + (S - T) + window_right

where ``causal`` sets window_right = 0 (causal aligned to the bottom-right corner, as flash-attn
does when T != S) and -1 means "no limit" on that side. Rows with no allowed key (e.g. causal
with T > S) produce a zero output and lse = +inf, exactly like flash-attn, so their gradients
are zero and nothing is NaN.

Math (per head, s = scores, P = softmax(s) with the row logsumexp ``lse``):
    s_ij   = scale * q_i.k_j                    (softcap c > 0: s_ij = c * tanh(scale * q_i.k_j / c))
    O      = P V,  P_ij = exp(s_ij - lse_i)
    dV     = P^T dO
    dP     = dO V^T,  delta_i = rowsum(dO_i * O_i)
    dS     = P * (dP - delta)                   (softcap: times 1 - tanh^2, the tanh derivative)
    dQ     = scale * dS K,   dK = scale * dS^T Q
Under GQA, dK/dV of a kv head sum over the q heads of its group. The dK/dV kernel loops over
the group's q heads itself, so the sum happens in registers in a fixed order: the backward is
deterministic by construction (no atomics), and ``deterministic=True`` costs nothing.

The kernels work on exp2 (scores pre-multiplied by log2(e)); lse is stored in natural-log units
(flash-attn's convention). Accumulators and row statistics are fp32; P and dS are rounded to the
input dtype before their matmuls (tensor-core inputs), as flash-attn does; outputs are cast back to
the input dtype. Dropout is not implemented (``dropout_p > 0`` raises NotImplementedError).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from tritium.kernels._runtime import (
    FLOAT_DTYPES,
    can_use_triton,
    empty,
    empty_like,
    interpreter_enabled,
    launch,
)

LOG2E = 1.4426950408889634
# The same constants for use inside kernels (jit code may only read constexpr globals).
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

# Fixed small tiles under the interpreter: every program instance is Python + NumPy there,
# so fewer, larger tiles are faster, but they must stay small enough that the odd test lengths
# (17, 129) cross tile boundaries.
INTERPRET_BLOCK_M = 32
INTERPRET_BLOCK_N = 32
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------
# 1. Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    # tanh through the sigmoid: portable (interpreter and GPU) and saturates cleanly at +-1.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _allowed(offs_m, offs_n, seqlen_q, seqlen_k, diag, window_left, window_right,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask: query row i may see key j (bounds, causal and window)."""
    mask = (offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k)
    if HAS_RIGHT:
        mask = mask & (offs_n[None, :] <= offs_m[:, None] + diag + window_right)
    if HAS_LEFT:
        mask = mask & (offs_n[None, :] >= offs_m[:, None] + diag - window_left)
    return mask


@triton.jit
def _seq_bounds(cu_seqlens, seq_idx, fixed_len, IS_VARLEN: tl.constexpr):
    """(first row of the sequence in the packed tensor, its length).

    The start is int64: start * row stride overflows int32 beyond ~2^31 / (H * D) packed tokens.
    """
    if IS_VARLEN:
        start = tl.load(cu_seqlens + seq_idx)
        length = tl.load(cu_seqlens + seq_idx + 1) - start
    else:
        start = seq_idx * fixed_len
        length = fixed_len
    return start.to(tl.int64), length


@triton.jit
def _load_tile(ptrs, rows, limit, d_mask, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile; interior tiles skip the row mask (and the d mask when D is a pow2)."""
    if MASKED:
        return tl.load(ptrs, mask=(rows[:, None] < limit) & d_mask, other=0.0)
    elif EVEN_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=d_mask, other=0.0)


@triton.jit
def _interior_key_tiles(lo, hi, row0, seqlen_k, diag, window_left, window_right,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Split key tiles [lo, hi) for query rows [row0, row0 + BLOCK_M) into masked [lo, a),
    interior [a, b) (every row sees every key: no mask, no bounds checks) and masked [b, hi).

    Causal attention at T = S spends all but one tile per row block in the interior, so the
    where/compare work and the -inf bookkeeping only run on the diagonal tiles.
    """
    a = lo
    b = (seqlen_k // BLOCK_N) * BLOCK_N  # the last partial tile holds padding columns
    if HAS_LEFT:
        first = tl.maximum(row0 + BLOCK_M - 1 + diag - window_left, 0)  # every row sees keys >= first
        a = tl.maximum(a, ((first + BLOCK_N - 1) // BLOCK_N) * BLOCK_N)
    if HAS_RIGHT:
        last = tl.maximum(row0 + diag + window_right + 1, 0)  # every row sees keys < last
        b = tl.minimum(b, (last // BLOCK_N) * BLOCK_N)
    a = tl.minimum(a, hi)
    b = tl.maximum(tl.minimum(b, hi), a)
    return a, b


@triton.jit
def _attn_fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d, d_mask,
                    seqlen_q, seqlen_k, diag, window_left, window_right, score_scale, softcap_log2,
                    tile_lo, tile_hi,
                    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) over key tiles [tile_lo, tile_hi)."""
    for start_n in range(tile_lo, tile_hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base + cols[:, None] * stride_kt + offs_d[None, :], cols, seqlen_k, d_mask,
                       MASKED, EVEN_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if HAS_SOFTCAP:
            s = _tanh(qk * score_scale) * softcap_log2
        else:
            s = qk * score_scale
        if MASKED:
            allowed = _allowed(offs_m, cols, seqlen_q, seqlen_k, diag, window_left, window_right,
                               HAS_LEFT, HAS_RIGHT)
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no allowed key yet keeps m = -inf; shift by 0 so exp2 stays finite.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base + cols[:, None] * stride_vt + offs_d[None, :], cols, seqlen_k, d_mask,
                       MASKED, EVEN_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, cu_seqlens_q, cu_seqlens_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_lse_h,
    fixed_seqlen_q, fixed_seqlen_k, seqlen_bucket,
    score_scale, softcap_log2, window_left, window_right,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program = BLOCK_M query rows of one (sequence, q head): online softmax over key tiles.

    m_i (running max, log2 units), l_i (running sum) and acc are fp32; lse_i = (m_i + log2 l_i) ln 2.
    """
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start, seqlen_q = _seq_bounds(cu_seqlens_q, seq, fixed_seqlen_q, IS_VARLEN)
    if pid_m * BLOCK_M >= seqlen_q:
        return
    k_start, seqlen_k = _seq_bounds(cu_seqlens_k, seq, fixed_seqlen_k, IS_VARLEN)
    kv_head = head // GROUP
    diag = seqlen_k - seqlen_q  # bottom-right alignment

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d[None, :] < HEAD_DIM
    q_ptrs = Q + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < seqlen_q) & d_mask, other=0.0)
    k_base = K + k_start * stride_kt + kv_head * stride_kh
    v_base = V + k_start * stride_vt + kv_head * stride_vh

    # Only the key tiles that some row of this block may see.
    lo, hi, a, b = _key_tiles(pid_m * BLOCK_M, seqlen_k, diag, window_left, window_right,
                              BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Masked tiles before the interior (left window edge), the interior, masked tiles after it
    # (causal diagonal / right window edge / the partial last tile).
    acc, l_i, m_i = _attn_fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n,
                                    offs_d, d_mask, seqlen_q, seqlen_k, diag, window_left, window_right,
                                    score_scale, softcap_log2, lo, a, BLOCK_N, True, EVEN_D,
                                    HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n,
                                    offs_d, d_mask, seqlen_q, seqlen_k, diag, window_left, window_right,
                                    score_scale, softcap_log2, a, b, BLOCK_N, False, EVEN_D,
                                    HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n,
                                    offs_d, d_mask, seqlen_q, seqlen_k, diag, window_left, window_right,
                                    score_scale, softcap_log2, b, hi, BLOCK_N, True, EVEN_D,
                                    HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, DOT_PRECISION)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * _LN2)
    row_mask = offs_m < seqlen_q
    o_ptrs = O + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_mask[:, None] & d_mask)
    tl.store(LSE + head * stride_lse_h + q_start + offs_m, lse, mask=row_mask)


@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh,
                                stride_delta_h, total_q,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = rowsum(dO_i * O_i) in fp32, over the packed rows of one head."""
    pid = tl.program_id(0)
    head = tl.program_id(1)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < total_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head * stride_delta_h + rows, delta, mask=rows < total_q)


@triton.jit
def _key_tiles(row0, seqlen_k, diag, window_left, window_right,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key range [lo, hi) that some query row in [row0, row0 + BLOCK_M) may see (lo tile-aligned),
    with its unmasked interior [a, b) from ``_interior_key_tiles``: the forward and dQ kernels' loop."""
    lo = 0
    hi = seqlen_k
    if HAS_RIGHT:
        hi = tl.minimum(seqlen_k, row0 + BLOCK_M + diag + window_right)
    if HAS_LEFT:
        lo = tl.maximum(0, row0 + diag - window_left)
        lo = (lo // BLOCK_N) * BLOCK_N
    a, b = _interior_key_tiles(lo, hi, row0, seqlen_k, diag, window_left, window_right,
                               BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    return lo, hi, a, b


@triton.jit
def _interior_query_tiles(lo, hi, col0, seqlen_q, diag, window_left, window_right,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Transpose of _interior_key_tiles: split query tiles [lo, hi) for keys [col0, col0 + BLOCK_N)
    into masked [lo, a), interior [a, b) (every row sees every key) and masked [b, hi)."""
    a = lo
    b = (seqlen_q // BLOCK_M) * BLOCK_M
    if HAS_RIGHT:
        first = tl.maximum(col0 + BLOCK_N - 1 - diag - window_right, 0)  # rows >= first see the whole block
        a = tl.maximum(a, ((first + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
    if HAS_LEFT:
        last = tl.maximum(col0 - diag + window_left + 1, 0)  # rows < last see the whole block
        b = tl.minimum(b, (last // BLOCK_M) * BLOCK_M)
    a = tl.minimum(a, hi)
    b = tl.maximum(tl.minimum(b, hi), a)
    return a, b


@triton.jit
def _probs_and_dscores(q, k, v, do, lse, delta, rows, cols, seqlen_q, seqlen_k, diag,
                       window_left, window_right, score_scale, softcap_log2,
                       MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                       HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Backward tile math shared by the dK/dV and dQ passes (FlashAttention-2, Dao 2023, Alg. 2).

    Recomputes P = exp(S - lse) from the forward's log-sum-exp and returns (P, dS) with
    dS = P * (dO V^T - delta), times the softcap's tanh derivative when HAS_SOFTCAP.
    lse = +inf on rows without keys makes P = 0 there.
    """
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if HAS_SOFTCAP:
        t = _tanh(qk * score_scale)
        s = t * softcap_log2
    else:
        s = qk * score_scale
    p = tl.math.exp2(s - lse[:, None] * _LOG2E)
    if MASKED:
        allowed = _allowed(rows, cols, seqlen_q, seqlen_k, diag, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    return p, ds


@triton.jit
def _attn_bwd_dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                         offs_m, offs_n, offs_d, d_mask, seqlen_q, seqlen_k, diag, window_left, window_right,
                         score_scale, softcap_log2, tile_lo, tile_hi,
                         BLOCK_M: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
                         HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """Accumulate dK (unscaled) and dV of one key block over query tiles [tile_lo, tile_hi) of one head."""
    for start_m in range(tile_lo, tile_hi, BLOCK_M):
        rows = start_m + offs_m
        q = _load_tile(q_base + rows[:, None] * stride_qt + offs_d[None, :], rows, seqlen_q, d_mask,
                       MASKED, EVEN_D)
        do = _load_tile(do_base + rows[:, None] * stride_dot + offs_d[None, :], rows, seqlen_q, d_mask,
                        MASKED, EVEN_D)
        if MASKED:
            lse = tl.load(lse_base + rows, mask=rows < seqlen_q, other=float("inf"))
            delta = tl.load(delta_base + rows, mask=rows < seqlen_q, other=0.0)
        else:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        p, ds = _probs_and_dscores(q, k, v, do, lse, delta, rows, offs_n, seqlen_q, seqlen_k, diag,
                                   window_left, window_right, score_scale, softcap_log2,
                                   MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, DOT_PRECISION)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, cu_seqlens_q, cu_seqlens_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lse_h,
    fixed_seqlen_q, fixed_seqlen_k, seqlen_bucket,
    sm_scale, score_scale, softcap_log2, window_left, window_right,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program = BLOCK_N keys of one (sequence, kv head); loops over the group's q heads and the
    q tiles that can see these keys, accumulating dK and dV in fp32 registers (no atomics)."""
    pid_n = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)
    k_start, seqlen_k = _seq_bounds(cu_seqlens_k, seq, fixed_seqlen_k, IS_VARLEN)
    if pid_n * BLOCK_N >= seqlen_k:
        return
    q_start, seqlen_q = _seq_bounds(cu_seqlens_q, seq, fixed_seqlen_q, IS_VARLEN)
    diag = seqlen_k - seqlen_q

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d[None, :] < HEAD_DIM
    kv_mask = (offs_n[:, None] < seqlen_k) & d_mask
    # Padding keys load as 0; they only touch their own (unstored) dK/dV rows.
    k = tl.load(K + (k_start + offs_n)[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + (k_start + offs_n)[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                mask=kv_mask, other=0.0)

    # Query rows that can see at least one key of this block (inverse of the forward's key range).
    lo = 0
    hi = seqlen_q
    if HAS_RIGHT:
        lo = tl.maximum(0, pid_n * BLOCK_N - diag - window_right)
        lo = (lo // BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        hi = tl.minimum(seqlen_q, pid_n * BLOCK_N + BLOCK_N - diag + window_left)
    a, b = _interior_query_tiles(lo, hi, pid_n * BLOCK_N, seqlen_q, diag, window_left, window_right,
                                 BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):
        head = kv_head * GROUP + g
        q_base = Q + q_start * stride_qt + head * stride_qh
        do_base = DO + q_start * stride_dot + head * stride_doh
        lse_base = LSE + head * stride_lse_h + q_start
        delta_base = DELTA + head * stride_lse_h + q_start
        dk, dv = _attn_bwd_dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                                      stride_dot, offs_m, offs_n, offs_d, d_mask, seqlen_q, seqlen_k, diag,
                                      window_left, window_right, score_scale, softcap_log2, lo, a, BLOCK_M,
                                      True, EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, DOT_PRECISION)
        dk, dv = _attn_bwd_dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                                      stride_dot, offs_m, offs_n, offs_d, d_mask, seqlen_q, seqlen_k, diag,
                                      window_left, window_right, score_scale, softcap_log2, a, b, BLOCK_M,
                                      False, EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, DOT_PRECISION)
        dk, dv = _attn_bwd_dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                                      stride_dot, offs_m, offs_n, offs_d, d_mask, seqlen_q, seqlen_k, diag,
                                      window_left, window_right, score_scale, softcap_log2, b, hi, BLOCK_M,
                                      True, EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, DOT_PRECISION)
    dk = dk * sm_scale
    tl.store(DK + (k_start + offs_n)[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + (k_start + offs_n)[:, None] * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                       d_mask, seqlen_q, seqlen_k, diag, window_left, window_right, score_scale, softcap_log2,
                       tile_lo, tile_hi,
                       BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
                       HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Accumulate dQ (unscaled) of one query block over key tiles [tile_lo, tile_hi)."""
    for start_n in range(tile_lo, tile_hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base + cols[:, None] * stride_kt + offs_d[None, :], cols, seqlen_k, d_mask,
                       MASKED, EVEN_D)
        v = _load_tile(v_base + cols[:, None] * stride_vt + offs_d[None, :], cols, seqlen_k, d_mask,
                       MASKED, EVEN_D)
        p, ds = _probs_and_dscores(q, k, v, do, lse, delta, rows, cols, seqlen_q, seqlen_k, diag,
                                   window_left, window_right, score_scale, softcap_log2,
                                   MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, DOT_PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, cu_seqlens_q, cu_seqlens_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lse_h,
    fixed_seqlen_q, fixed_seqlen_k, seqlen_bucket,
    sm_scale, score_scale, softcap_log2, window_left, window_right,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program = BLOCK_M query rows of one (sequence, q head); loops over visible key tiles."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start, seqlen_q = _seq_bounds(cu_seqlens_q, seq, fixed_seqlen_q, IS_VARLEN)
    if pid_m * BLOCK_M >= seqlen_q:
        return
    k_start, seqlen_k = _seq_bounds(cu_seqlens_k, seq, fixed_seqlen_k, IS_VARLEN)
    kv_head = head // GROUP
    diag = seqlen_k - seqlen_q

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d[None, :] < HEAD_DIM
    row_mask = rows < seqlen_q
    q = tl.load(Q + (q_start + rows)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_mask[:, None] & d_mask, other=0.0)
    do = tl.load(DO + (q_start + rows)[:, None] * stride_dot + head * stride_doh + offs_d[None, :],
                 mask=row_mask[:, None] & d_mask, other=0.0)
    lse = tl.load(LSE + head * stride_lse_h + q_start + rows, mask=row_mask, other=float("inf"))
    delta = tl.load(DELTA + head * stride_lse_h + q_start + rows, mask=row_mask, other=0.0)
    k_base = K + k_start * stride_kt + kv_head * stride_kh
    v_base = V + k_start * stride_vt + kv_head * stride_vh

    lo, hi, a, b = _key_tiles(pid_m * BLOCK_M, seqlen_k, diag, window_left, window_right,
                              BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _attn_bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                            d_mask, seqlen_q, seqlen_k, diag, window_left, window_right, score_scale,
                            softcap_log2, lo, a, BLOCK_N, True, EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                            DOT_PRECISION)
    dq = _attn_bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                            d_mask, seqlen_q, seqlen_k, diag, window_left, window_right, score_scale,
                            softcap_log2, a, b, BLOCK_N, False, EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                            DOT_PRECISION)
    dq = _attn_bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                            d_mask, seqlen_q, seqlen_k, diag, window_left, window_right, score_scale,
                            softcap_log2, b, hi, BLOCK_N, True, EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                            DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + (q_start + rows)[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_mask[:, None] & d_mask)


# Autotuned variants for the GPU. Pruning keeps the search short: tiles that cannot fit shared
# memory at large head dims, and configs that only make sense for big tiles, are dropped.
_TUNE_KEY = ["HEAD_DIM", "GROUP", "seqlen_bucket", "IS_VARLEN", "HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP"]


def _fwd_configs() -> list:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=stages, num_warps=warps)
            for bm in (64, 128) for bn in (32, 64, 128) for stages in (2, 3, 4) for warps in (4, 8)]


def _bwd_configs() -> list:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=stages, num_warps=warps)
            for bm in (32, 64) for bn in (64, 128) for stages in (2, 3) for warps in (4, 8)]


def _prune(configs, named_args, **kwargs):
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
    q = named_args.get("Q")
    if q is not None and q.element_size() == 4:
        block_d *= 2  # fp32 tiles take twice the shared memory of bf16 ones
    kept = []
    for cfg in configs:
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        if block_d >= 256 and (bm * bn > 64 * 64 or cfg.num_stages > 2):
            continue  # shared memory: two 256-wide tiles x stages overflow 228 KB
        if cfg.num_warps == 8 and bm * bn < 128 * 64:
            continue  # 8 warps idle on small tiles
        kept.append(cfg)
    return kept or configs[:1]


def autotune_enabled() -> bool:
    """TRITIUM_AUTOTUNE=0 swaps autotuning for one fixed config per kernel (the GPU test run uses it:
    autotuning every small test shape would compile dozens of configs for nothing)."""
    return os.environ.get("TRITIUM_AUTOTUNE", "1") != "0"


def fixed_config(block_d: int, element_size: int, backward: bool) -> dict:
    """A safe, reasonable config without tuning: fits shared memory at every head dim and dtype."""
    wide = block_d * element_size // 2 >= 256
    if backward:
        return {"BLOCK_M": 32 if wide else 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": 64 if wide else 128, "BLOCK_N": 32 if wide else 64, "num_warps": 4 if wide else 8,
            "num_stages": 2 if wide else 3}


_PRUNE = {"early_config_prune": _prune}
_attn_fwd_tuned = triton.autotune(_fwd_configs(), key=_TUNE_KEY, prune_configs_by=_PRUNE)(_attn_fwd_kernel)
_attn_bwd_dkdv_tuned = triton.autotune(_bwd_configs(), key=_TUNE_KEY, prune_configs_by=_PRUNE)(
    _attn_bwd_dkdv_kernel)
_attn_bwd_dq_tuned = triton.autotune(_bwd_configs(), key=_TUNE_KEY, prune_configs_by=_PRUNE)(
    _attn_bwd_dq_kernel)


# ----------------------------------------------------------------------------------------------
# 2. Launchers (validation lives in _check_attention_args, shared with the reference path)
# ----------------------------------------------------------------------------------------------
def _check_attention_args(q, k, v, dropout_p, softmax_scale, window_size, softcap, *, packed: bool):
    ndim = 3 if packed else 4
    layout = "(total, H, D)" if packed else "(B, T, H, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not packed and q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k batch sizes differ: {q.shape[0]} vs {k.shape[0]}")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"q and k head dims differ: {head_dim} vs {k.shape[-1]}")
    if head_dim % 8 != 0 or not 8 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be a multiple of 8 in [8, {MAX_HEAD_DIM}] (e.g. 32, 64, 80, 96, "
                         f"128, 256), got {head_dim}")
    num_heads, num_kv_heads = q.shape[-2], k.shape[-2]
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"number of q heads ({num_heads}) must be a multiple of the number of kv heads "
                         f"({num_kv_heads})")
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p={dropout_p}: attention dropout is not implemented in tritium "
                                  "(pass dropout_p=0.0)")
    _check_score_options(softmax_scale, window_size, softcap)


def _check_score_options(softmax_scale, window_size, softcap) -> None:
    """The options shared by every attention entry point (dense, varlen, decode)."""
    if softmax_scale is not None and not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be positive, got {softmax_scale}")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 disables it), got {softcap}")
    if len(window_size) != 2 or any(int(w) != w or w < -1 for w in window_size):
        raise ValueError(f"window_size must be a pair of ints >= -1 (-1 = unlimited), got {window_size}")


def _check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device, max_seqlen: int | None = None) -> None:
    """Type, device and length always; the values too when ``cu`` lives on the CPU, where reading it
    costs no device synchronisation (on CUDA they are trusted, as flash-attn does)."""
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype != torch.int32:
        raise TypeError(f"{name} must be a 1-D int32 tensor, got "
                        f"{getattr(cu, 'dtype', type(cu).__name__)} {tuple(getattr(cu, 'shape', ()))}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    if cu.numel() < 2:
        raise ValueError(f"{name} needs at least 2 entries (0 and the total), got {cu.numel()}")
    if cu.device.type != "cpu":
        return
    bounds = cu.tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if bounds[0] < 0 or min(lengths) < 0:
        raise ValueError(f"{name} must start at >= 0 and never decrease, got {bounds}")
    if bounds[-1] > total:
        raise ValueError(f"{name} ends at {bounds[-1]} but the packed tensor has only {total} rows")
    if max_seqlen is not None and max(lengths) > max_seqlen:
        raise ValueError(f"{name} holds a sequence of {max(lengths)} rows, longer than its max_seqlen "
                         f"{max_seqlen}")


def _window(causal: bool, window_size) -> tuple[int, int]:
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    return left, right


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs are for testing: keep them exact (no TF32) so they match the fp32 reference.
    return "ieee" if dtype == torch.float32 else "tf32"


def _common_meta(q, k, softmax_scale, causal, window_size, softcap):
    head_dim = q.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    left, right = _window(causal, window_size)
    if softcap > 0:
        score_scale, softcap_log2 = scale / softcap, softcap * LOG2E
    else:
        score_scale, softcap_log2 = scale * LOG2E, 0.0
    block_d = max(16, triton.next_power_of_2(head_dim))
    meta = {"GROUP": q.shape[-2] // k.shape[-2], "HEAD_DIM": head_dim, "BLOCK_D": block_d,
            "EVEN_D": head_dim == block_d, "HAS_LEFT": left >= 0, "HAS_RIGHT": right >= 0,
            "HAS_SOFTCAP": softcap > 0, "DOT_PRECISION": _dot_precision(q.dtype)}
    return scale, score_scale, softcap_log2, max(left, 0), max(right, 0), meta


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, num_seqs, max_seqlen_q, max_seqlen_k,
                  softmax_scale, causal, window_size, softcap):
    """Launch the forward on packed q (Nq, Hq, D), k/v (Nk, Hkv, D).

    Dense batches pass cu_seqlens None and fixed lengths max_seqlen_*; returns (out, lse) with
    lse (Hq, Nq) fp32.
    """
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    total_q, num_heads, _ = q.shape
    is_varlen = cu_seqlens_q is not None
    if is_varlen:
        # Packed rows outside [cu_seqlens[0], cu_seqlens[-1]) belong to no sequence and no program
        # visits them: they read as zero output with lse = +inf (an empty row), never as stale memory.
        out = torch.zeros_like(q)
        lse = torch.full((num_heads, total_q), float("inf"), device=q.device, dtype=torch.float32)
    else:
        out = empty_like(q)
        lse = empty((num_heads, total_q), device=q.device, dtype=torch.float32)
    _, score_scale, softcap_log2, left, right, meta = _common_meta(q, k, softmax_scale, causal,
                                                                   window_size, softcap)
    args = (q, k, v, out, lse, cu_seqlens_q if is_varlen else q, cu_seqlens_k if is_varlen else q,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse.stride(0),
            max_seqlen_q, max_seqlen_k, triton.next_power_of_2(max(max_seqlen_q, max_seqlen_k)),
            score_scale, softcap_log2, left, right)
    if interpreter_enabled():
        grid = (triton.cdiv(max_seqlen_q, INTERPRET_BLOCK_M), num_heads, num_seqs)
        launch(_attn_fwd_kernel, grid)(*args, **meta, IS_VARLEN=is_varlen,
                               BLOCK_M=INTERPRET_BLOCK_M, BLOCK_N=INTERPRET_BLOCK_N)
    elif autotune_enabled():
        grid = lambda META: (triton.cdiv(max_seqlen_q, META["BLOCK_M"]), num_heads, num_seqs)
        launch(_attn_fwd_tuned, grid)(*args, **meta, IS_VARLEN=is_varlen)
    else:
        config = fixed_config(meta["BLOCK_D"], q.element_size(), backward=False)
        grid = (triton.cdiv(max_seqlen_q, config["BLOCK_M"]), num_heads, num_seqs)
        launch(_attn_fwd_kernel, grid)(*args, **meta, **config, IS_VARLEN=is_varlen)
    return out, lse


def attention_bwd(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, num_seqs, max_seqlen_q,
                  max_seqlen_k, softmax_scale, causal, window_size, softcap):
    """Backward on packed tensors: returns (dq, dk, dv) in the input dtype."""
    do = _last_dim_contiguous(do)
    total_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    scale, score_scale, softcap_log2, left, right, meta = _common_meta(q, k, softmax_scale, causal,
                                                                       window_size, softcap)
    delta = empty_like(lse)
    pre_block = 32 if interpreter_enabled() else 64
    launch(_attn_bwd_preprocess_kernel, (triton.cdiv(total_q, pre_block), num_heads))(
        out, do, delta, out.stride(0), out.stride(1), do.stride(0), do.stride(1), delta.stride(0), total_q,
        HEAD_DIM=head_dim, BLOCK_D=meta["BLOCK_D"], BLOCK_M=pre_block)
    is_varlen = cu_seqlens_q is not None
    # Varlen: rows outside every sequence get no program, and their gradient is zero.
    alloc = torch.zeros_like if is_varlen else empty_like
    dq, dk, dv = alloc(q), alloc(k), alloc(v)
    cu_q = cu_seqlens_q if is_varlen else q
    cu_k = cu_seqlens_k if is_varlen else q
    common_tail = (max_seqlen_q, max_seqlen_k, triton.next_power_of_2(max(max_seqlen_q, max_seqlen_k)),
                   scale, score_scale, softcap_log2, left, right)
    dkdv_args = (q, k, v, do, lse, delta, dk, dv, cu_q, cu_k,
                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                 do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                 lse.stride(0)) + common_tail
    dq_args = (q, k, v, do, lse, delta, dq, cu_q, cu_k,
               q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), lse.stride(0)) + common_tail
    if interpreter_enabled() or not autotune_enabled():
        if interpreter_enabled():
            config = {"BLOCK_M": INTERPRET_BLOCK_M, "BLOCK_N": INTERPRET_BLOCK_N}
        else:
            config = fixed_config(meta["BLOCK_D"], q.element_size(), backward=True)
        dkdv_grid = (triton.cdiv(max_seqlen_k, config["BLOCK_N"]), num_kv_heads, num_seqs)
        dq_grid = (triton.cdiv(max_seqlen_q, config["BLOCK_M"]), num_heads, num_seqs)
        launch(_attn_bwd_dkdv_kernel, dkdv_grid)(*dkdv_args, **meta, **config, IS_VARLEN=is_varlen)
        launch(_attn_bwd_dq_kernel, dq_grid)(*dq_args, **meta, **config, IS_VARLEN=is_varlen)
    else:
        dkdv_grid = lambda M: (triton.cdiv(max_seqlen_k, M["BLOCK_N"]), num_kv_heads, num_seqs)
        dq_grid = lambda M: (triton.cdiv(max_seqlen_q, M["BLOCK_M"]), num_heads, num_seqs)
        launch(_attn_bwd_dkdv_tuned, dkdv_grid)(*dkdv_args, **meta, IS_VARLEN=is_varlen)
        launch(_attn_bwd_dq_tuned, dq_grid)(*dq_args, **meta, IS_VARLEN=is_varlen)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# 3. Custom ops (opaque to torch.compile) and autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("tritium::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
                       cu_seqlens_k: torch.Tensor | None, num_seqs: int, max_seqlen_q: int, max_seqlen_k: int,
                       softmax_scale: float | None, causal: bool, window_left: int, window_right: int,
                       softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, num_seqs, max_seqlen_q, max_seqlen_k,
                         softmax_scale, causal, (window_left, window_right), softcap)


@_flash_attn_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, num_seqs, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      window_left, window_right, softcap):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("tritium::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
                       cu_seqlens_k: torch.Tensor | None,
                       num_seqs: int, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float | None,
                       causal: bool, window_left: int, window_right: int, softcap: float,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, num_seqs, max_seqlen_q,
                         max_seqlen_k, softmax_scale, causal, (window_left, window_right), softcap)


@_flash_attn_bwd_op.register_fake
def _(dout, q, k, v, out, lse, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class FlashAttnFunction(torch.autograd.Function):
    """Packed (total, H, D) attention; dense batches pass cu_seqlens None and fixed lengths."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, num_seqs, max_seqlen_q, max_seqlen_k,
                softmax_scale, causal, window_size, softcap):
        args = (num_seqs, max_seqlen_q, max_seqlen_k, softmax_scale, causal, int(window_size[0]),
                int(window_size[1]), softcap)
        out, lse = _flash_attn_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, *args)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.args = args
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = _flash_attn_bwd_op(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# 4. Public functions
# ----------------------------------------------------------------------------------------------
def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, return_lse=False, deterministic=False):
    """Attention over q (B, T, Hq, D), k/v (B, S, Hkv, D) -> out (B, T, Hq, D) [, lse (B, Hq, T) fp32].

    ``deterministic`` is accepted for flash-attn compatibility; the backward is always deterministic.
    """
    _check_attention_args(q, k, v, dropout_p, softmax_scale, window_size, softcap, packed=False)
    if not can_use_triton(q, k, v):
        return attention_ref(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, return_lse)
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_kv_heads = k.shape[1], k.shape[2]
    out, lse = FlashAttnFunction.apply(
        q.reshape(batch * seqlen_q, num_heads, head_dim),  # (B*T, Hq, D): a view when B, T are dense
        k.reshape(batch * seqlen_k, num_kv_heads, head_dim),
        v.reshape(batch * seqlen_k, num_kv_heads, head_dim),
        None, None, batch, seqlen_q, seqlen_k, softmax_scale, causal, tuple(window_size), float(softcap))
    out = out.view(batch, seqlen_q, num_heads, head_dim)
    if return_lse:
        return out, lse.view(num_heads, batch, seqlen_q).transpose(0, 1)
    return out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           return_lse=False, deterministic=False):
    """Packed attention: q (total_q, Hq, D), k/v (total_k, Hkv, D); sequence b spans rows
    cu_seqlens[b]:cu_seqlens[b+1] and never sees another sequence. -> out (total_q, Hq, D)
    [, lse (Hq, total_q) fp32].

    Rows outside [cu_seqlens_q[0], cu_seqlens_q[-1]) (padding after the last sequence) belong to no
    sequence: their output is zero, their lse +inf and their gradient zero, in the kernel and in
    ``varlen_attention_ref`` alike. CPU-resident cu_seqlens are checked (int32, non-decreasing, within
    the row count, no sequence longer than max_seqlen; ValueError naming the argument); CUDA ones are
    trusted, as flash-attn does, since reading them would synchronise the device.
    """
    _check_attention_args(q, k, v, dropout_p, softmax_scale, window_size, softcap, packed=True)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device, int(max_seqlen_q))
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device, int(max_seqlen_k))
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    if not can_use_triton(q, k, v, cu_seqlens_q, cu_seqlens_k):
        return varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p, softmax_scale, causal, window_size, softcap, return_lse)
    out, lse = FlashAttnFunction.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, cu_seqlens_q.numel() - 1,
                                       int(max_seqlen_q), int(max_seqlen_k), softmax_scale, causal,
                                       tuple(window_size), float(softcap))
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------
# 5. References (ground truth for tests; the CPU fallback)
# ----------------------------------------------------------------------------------------------
def attention_mask(seqlen_q: int, seqlen_k: int, causal: bool, window_size, device=None) -> torch.Tensor:
    """(T, S) bool: True where query i may attend key j (flash-attn's bottom-right alignment)."""
    left, right = _window(causal, window_size)
    rows = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    cols = torch.arange(seqlen_k, device=device)[None, :]
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        mask &= cols <= rows + right
    if left >= 0:
        mask &= cols >= rows - left
    return mask


def attention_ref(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                  softcap=0.0, return_lse=False, deterministic=False, *, upcast=True):
    """Plain matmul + softmax attention with flash-attn semantics (same signature as flash_attn_func).

    ``upcast=True`` computes in fp32 and casts the output back (the ground truth); ``upcast=False``
    computes in the input dtype, the "same-dtype PyTorch" baseline of the tolerance rule.
    Empty rows give 0 output and lse = +inf, as flash-attn.
    """
    _check_attention_args(q, k, v, dropout_p, softmax_scale, window_size, softcap, packed=False)
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    mask = attention_mask(q.shape[1], k.shape[1], causal, window_size, device=q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores.float(), dim=-1)  # (B, H, T)
    empty = ~mask.any(dim=-1)  # (T,)
    probs = torch.softmax(scores.masked_fill(empty[:, None], 0.0), dim=-1).masked_fill(empty[:, None], 0.0)
    out = torch.einsum("bhts,bshd->bthd", probs.to(v.dtype), v).to(dtype)
    if not return_lse:
        return out
    return out, lse.masked_fill(empty, float("inf"))


def varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                         softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                         return_lse=False, deterministic=False, *, upcast=True):
    """Runs attention_ref on each packed sequence separately -> out (total_q, Hq, D) [, lse (Hq, total_q)].

    Rows outside [cu_seqlens_q[0], cu_seqlens_q[-1]) are zero with lse +inf, as in the kernel.
    """
    _check_attention_args(q, k, v, dropout_p, softmax_scale, window_size, softcap, packed=True)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device, int(max_seqlen_q))
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device, int(max_seqlen_k))
    bounds_q = cu_seqlens_q.tolist()
    bounds_k = cu_seqlens_k.tolist()
    out_dtype = q.dtype
    outs = [q.new_zeros((bounds_q[0],) + q.shape[1:], dtype=out_dtype)]
    lses = [q.new_full((q.shape[1], bounds_q[0]), float("inf"), dtype=torch.float32)]
    for b in range(len(bounds_q) - 1):
        qs, ks = slice(bounds_q[b], bounds_q[b + 1]), slice(bounds_k[b], bounds_k[b + 1])
        out, lse = attention_ref(q[None, qs], k[None, ks], v[None, ks], 0.0, softmax_scale, causal,
                                 window_size, softcap, True, upcast=upcast)
        outs.append(out[0])
        lses.append(lse[0])
    tail = q.shape[0] - bounds_q[-1]
    outs.append(q.new_zeros((tail,) + q.shape[1:], dtype=out_dtype))
    lses.append(q.new_full((q.shape[1], tail), float("inf"), dtype=torch.float32))
    out = torch.cat(outs, dim=0)
    lse = torch.cat(lses, dim=1)
    return (out, lse) if return_lse else out
