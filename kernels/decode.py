"""Decode attention over a KV cache: flash-decoding (split-K) with contiguous or paged caches.

``flash_attn_with_kvcache`` follows flash-attn: q (B, Tq, Hq, D); the cache is either contiguous
(B, S_max, Hkv, D) or paged (num_blocks, block_size, Hkv, D) with ``block_table`` (B, max_blocks)
int32 mapping logical block i of sequence b to a physical block. ``cache_seqlens`` (B,) int32 counts
the tokens already in the cache; new k/v (B, Tq, Hkv, D), when given, are written in place at
positions cache_seqlens[b] .. cache_seqlens[b] + Tq - 1 and attended too. The caller advances
cache_seqlens. The queries sit at the end of the sequence, so causal masking is bottom-right
aligned: query t sees key j iff j <= t + seqlen_k - Tq (and the window, as in attention.py).

Why split-K: at batch 1, one program per (batch, kv head) leaves most SMs idle while it streams
a long cache. The key range is cut into ``num_splits`` chunks, each program writes a partial
(out_s, lse_s) for its chunk, and a combine kernel merges them exactly:
    lse = log sum_s exp(lse_s),   out = sum_s exp(lse_s - lse) out_s
GQA: one program loads each K/V tile of a kv head once and uses it for all GROUP q heads and Tq
query tokens of that head (the rows of the tile are (q head, token) pairs), so cache bytes are
read once per kv head, not once per q head. Inference only: no autograd.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

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
from tritium.kernels.attention import (
    _LN2,
    LOG2E,
    MAX_HEAD_DIM,
    _allowed,
    _check_score_options,
    _dot_precision,
    _tanh,
    _window,
    autotune_enabled,
)

INTERPRET_BLOCK_N = 32
# Key ranges per split are multiples of this, so every autotuned BLOCK_N divides them.
SPLIT_ALIGN = 128
MAX_SPLITS = 128


# ----------------------------------------------------------------------------------------------
# 1. Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _decode_split_kernel(
    Q, K_cache, V_cache, cache_seqlens, block_table, O, LSE, O_part, LSE_part,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh, stride_bt,
    batch, seqlen_q, num_new, full_seqlen_k, split_len, page_size,
    score_scale, softcap_log2, window_left, window_right,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr, HAS_SEQLENS: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program = BLOCK_M (q head of the group, query token) rows x one kv head x one key chunk.

    SPLIT: writes the chunk's normalised partial output and its lse (log2 units, -inf when the
    chunk has no visible key) to O_part/LSE_part; otherwise writes the final O and lse (natural).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // NUM_KV_HEADS).to(tl.int64)  # int64: b * stride of a large cache overflows int32
    kv_head = pid_bh % NUM_KV_HEADS
    if HAS_SEQLENS:
        seqlen_k = tl.load(cache_seqlens + b) + num_new
    else:
        seqlen_k = full_seqlen_k
    diag = seqlen_k - seqlen_q

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < GROUP * seqlen_q
    g = rows // seqlen_q
    t = rows % seqlen_q
    head = kv_head * GROUP + g
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d[None, :] < HEAD_DIM
    q = tl.load(Q + b * stride_qb + t[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_valid[:, None] & d_mask, other=0.0)

    # This chunk's keys, narrowed to what the (bottom-right aligned) queries 0..Tq-1 can see.
    lo = pid_s * split_len
    hi = tl.minimum(seqlen_k, lo + split_len)  # the right window never cuts: the last query is last
    if HAS_LEFT:
        lo = tl.maximum(lo, ((diag - window_left) // BLOCK_N) * BLOCK_N)

    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_valid = cols < seqlen_k
        if PAGED:
            # Logical position -> (physical block, offset); a gather, so any page size works.
            blocks = tl.load(block_table + b * stride_bt + cols // page_size, mask=col_valid, other=0)
            k_rows = blocks.to(tl.int64) * stride_kb + (cols % page_size) * stride_kt
            v_rows = blocks.to(tl.int64) * stride_vb + (cols % page_size) * stride_vt
        else:
            k_rows = b * stride_kb + cols * stride_kt
            v_rows = b * stride_vb + cols * stride_vt
        kv_mask = col_valid[:, None] & d_mask
        k = tl.load(K_cache + k_rows[:, None] + kv_head * stride_kh + offs_d[None, :], mask=kv_mask,
                    other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if HAS_SOFTCAP:
            s = _tanh(qk * score_scale) * softcap_log2
        else:
            s = qk * score_scale
        allowed = _allowed(t, cols, seqlen_q, seqlen_k, diag, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        s = tl.where(allowed & row_valid[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V_cache + v_rows[:, None] + kv_head * stride_vh + offs_d[None, :], mask=kv_mask,
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if SPLIT:
        lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
        part_row = ((pid_s * batch + b) * seqlen_q + t) * (NUM_KV_HEADS * GROUP) + head
        tl.store(O_part + part_row[:, None] * HEAD_DIM + offs_d[None, :], out,
                 mask=row_valid[:, None] & d_mask)
        tl.store(LSE_part + part_row, lse2, mask=row_valid)
    else:
        lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * _LN2)
        tl.store(O + b * stride_ob + t[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_valid[:, None] & d_mask)
        tl.store(LSE + (b * NUM_KV_HEADS * GROUP + head) * seqlen_q + t, lse, mask=row_valid)


@triton.jit
def _decode_combine_kernel(O_part, LSE_part, O, LSE, stride_ob, stride_ot, stride_oh,
                           num_rows, num_heads, seqlen_q, num_splits,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program = one (b, t, head) row: lse-weighted sum of the split partials."""
    row = tl.program_id(0)  # = (b * Tq + t) * Hq + head
    head = row % num_heads
    t = (row // num_heads) % seqlen_q
    b = row // (num_heads * seqlen_q)
    splits = tl.arange(0, BLOCK_S)
    split_mask = splits < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    lse_s = tl.load(LSE_part + splits * num_rows + row, mask=split_mask, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse_s - m_safe)
    total = tl.sum(w, 0)
    o_s = tl.load(O_part + (splits[:, None] * num_rows + row) * HEAD_DIM + offs_d[None, :],
                  mask=split_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    total_safe = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(o_s * w[:, None], 0) / total_safe
    lse = tl.where(total == 0.0, float("inf"), (m_safe + tl.math.log2(total_safe)) * _LN2)
    tl.store(O + b * stride_ob + t * stride_ot + head * stride_oh + offs_d, out.to(O.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
    tl.store(LSE + (b * num_heads + head) * seqlen_q + t, lse)


def _decode_configs() -> list:
    return [triton.Config({"BLOCK_N": bn}, num_stages=stages, num_warps=warps)
            for bn in (32, 64, 128) for stages in (2, 3, 4) for warps in (4, 8)]


def _prune_decode(configs, named_args, **kwargs):
    block_d = kwargs.get("BLOCK_D", 128)
    q = named_args.get("Q")
    if q is not None and q.element_size() == 4:
        block_d *= 2  # fp32 tiles take twice the shared memory of bf16 ones
    kept = [c for c in configs
            if not (block_d >= 256 and (c.kwargs["BLOCK_N"] > 64 or c.num_stages > 3))
            and not (c.num_warps == 8 and c.kwargs["BLOCK_N"] < 64)]
    return kept or configs[:1]


_decode_split_tuned = triton.autotune(
    _decode_configs(), key=["HEAD_DIM", "GROUP", "BLOCK_M", "PAGED", "SPLIT", "HAS_LEFT", "HAS_SOFTCAP"],
    prune_configs_by={"early_config_prune": _prune_decode})(_decode_split_kernel)


# ----------------------------------------------------------------------------------------------
# 2. Launchers
# ----------------------------------------------------------------------------------------------
def _device_sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # interpreter: small, so default tests still exercise the split path


def num_splits_heuristic(num_programs: int, max_seqlen_k: int, num_sms: int) -> int:
    """Enough splits to give every SM ~2 programs, but at least SPLIT_ALIGN keys per split.

    Uses only host-side sizes (S_max or max_blocks * block_size), never cache_seqlens, so
    choosing a split count needs no device sync.
    """
    if num_programs >= num_sms:
        return 1
    by_occupancy = triton.cdiv(2 * num_sms, num_programs)
    by_length = triton.cdiv(max_seqlen_k, SPLIT_ALIGN)
    return max(1, min(by_occupancy, by_length, MAX_SPLITS))


def append_to_cache(k_cache, v_cache, k, v, cache_seqlens, block_table):
    """Write k/v (B, Tq, Hkv, D) into the cache at cache_seqlens[b] + 0..Tq-1, in place."""
    batch, num_new = k.shape[:2]
    positions = cache_seqlens.long()[:, None] + torch.arange(num_new, device=k.device)  # (B, Tq)
    if block_table is None:
        batch_idx = torch.arange(batch, device=k.device)[:, None].expand(batch, num_new)
        k_cache[batch_idx, positions] = k.to(k_cache.dtype)
        v_cache[batch_idx, positions] = v.to(v_cache.dtype)
    else:
        page_size = k_cache.shape[1]
        blocks = torch.gather(block_table.long(), 1, positions // page_size)
        k_cache[blocks, positions % page_size] = k.to(k_cache.dtype)
        v_cache[blocks, positions % page_size] = v.to(v_cache.dtype)


def decode_fwd(q, k_cache, v_cache, cache_seqlens, block_table, num_new, softmax_scale, causal, window_size,
               softcap, num_splits):
    """Launch split-K decode attention (the cache already holds the new tokens). -> (out, lse)."""
    batch, seqlen_q, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    paged = block_table is not None
    max_seqlen_k = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    left, right = _window(causal, window_size)
    if softcap > 0:
        score_scale, softcap_log2 = scale / softcap, softcap * LOG2E
    else:
        score_scale, softcap_log2 = scale * LOG2E, 0.0
    block_m = max(16, min(64, triton.next_power_of_2(group * seqlen_q)))
    m_blocks = triton.cdiv(group * seqlen_q, block_m)
    if num_splits <= 0:
        num_splits = num_splits_heuristic(batch * num_kv_heads * m_blocks, max_seqlen_k,
                                          _device_sm_count(q.device))
    split_len = triton.cdiv(triton.cdiv(max_seqlen_k, num_splits), SPLIT_ALIGN) * SPLIT_ALIGN
    num_splits = max(1, triton.cdiv(max_seqlen_k, split_len))  # drop splits that would start past S_max
    split = num_splits > 1

    out = empty_like(q)
    lse = empty((batch, num_heads, seqlen_q), device=q.device, dtype=torch.float32)
    num_rows = batch * seqlen_q * num_heads
    if split:
        o_part = empty((num_splits, num_rows, head_dim), device=q.device, dtype=torch.float32)
        lse_part = empty((num_splits, num_rows), device=q.device, dtype=torch.float32)
    else:
        o_part = lse_part = lse  # unused
    has_seqlens = cache_seqlens is not None
    args = (q, k_cache, v_cache, cache_seqlens if has_seqlens else q, block_table if paged else q,
            out, lse, o_part, lse_part,
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            out.stride(0), out.stride(1), out.stride(2), block_table.stride(0) if paged else 0,
            batch, seqlen_q, num_new, max_seqlen_k, split_len, k_cache.shape[1] if paged else 1,
            score_scale, softcap_log2, max(left, 0), max(right, 0))
    block_d = max(16, triton.next_power_of_2(head_dim))
    meta = {"NUM_KV_HEADS": num_kv_heads, "GROUP": group, "HEAD_DIM": head_dim, "BLOCK_D": block_d,
            "BLOCK_M": block_m, "PAGED": paged, "HAS_SEQLENS": has_seqlens, "HAS_LEFT": left >= 0,
            "HAS_RIGHT": right >= 0, "HAS_SOFTCAP": softcap > 0, "SPLIT": split,
            "DOT_PRECISION": _dot_precision(q.dtype)}
    grid = (m_blocks, batch * num_kv_heads, num_splits)
    if interpreter_enabled():
        launch(_decode_split_kernel, grid)(*args, **meta, BLOCK_N=INTERPRET_BLOCK_N)
    elif autotune_enabled():
        launch(_decode_split_tuned, grid)(*args, **meta)
    else:
        block_n = 64 if block_d * q.element_size() // 2 < 256 else 32
        launch(_decode_split_kernel, grid)(*args, **meta, BLOCK_N=block_n, num_warps=4, num_stages=2)
    if split:
        launch(_decode_combine_kernel, (num_rows,))(
            o_part, lse_part, out, lse, out.stride(0), out.stride(1), out.stride(2),
            num_rows, num_heads, seqlen_q, num_splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(num_splits)))
    return out, lse


# ----------------------------------------------------------------------------------------------
# 3. Public function and reference
# ----------------------------------------------------------------------------------------------
def _check_kvcache_args(q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale, window_size,
                        softcap):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        if t is None and name in ("k", "v"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"q, k_cache, v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, "
                        f"{v_cache.dtype}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache shapes differ: {tuple(k_cache.shape)} vs "
                         f"{tuple(v_cache.shape)}")
    batch, seqlen_q, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"q head_dim {head_dim} != k_cache head_dim {k_cache.shape[3]}")
    if head_dim % 8 != 0 or not 8 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be a multiple of 8 in [8, {MAX_HEAD_DIM}], got {head_dim}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"number of q heads ({num_heads}) must be a multiple of the number of kv heads "
                         f"({num_kv_heads})")
    if (k is None) != (v is None):
        raise ValueError("pass both k and v (new tokens to append) or neither")
    if k is not None:
        if k.shape != (batch, seqlen_q, num_kv_heads, head_dim) or v.shape != k.shape:
            raise ValueError(f"k/v must be (B, Tq, Hkv, D) = {(batch, seqlen_q, num_kv_heads, head_dim)}, "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        if cache_seqlens is None:
            raise ValueError("cache_seqlens is required when appending k/v (where do the new tokens go?)")
    if cache_seqlens is not None:
        if cache_seqlens.dtype != torch.int32 or cache_seqlens.shape != (batch,):
            raise TypeError(f"cache_seqlens must be int32 of shape ({batch},), got {cache_seqlens.dtype} "
                            f"{tuple(cache_seqlens.shape)}")
        if cache_seqlens.device != q.device:
            raise ValueError(f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    if block_table is not None:
        if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != batch:
            raise TypeError(f"block_table must be int32 (B={batch}, max_blocks), got {block_table.dtype} "
                            f"{tuple(block_table.shape)}")
        if block_table.device != q.device:
            raise ValueError(f"block_table is on {block_table.device} but q is on {q.device}")
    elif k_cache.shape[0] != batch:
        raise ValueError(f"contiguous k_cache batch {k_cache.shape[0]} != q batch {batch} "
                         "(pass block_table for a paged cache)")
    _check_score_options(softmax_scale, window_size, softcap)


def _as_seqlens(cache_seqlens, batch, device):
    if isinstance(cache_seqlens, int):
        return torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    return cache_seqlens


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, block_table=None,
                            softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0, num_splits=0,
                            return_lse=False):
    """Append k/v to the cache in place and attend q over cache[:cache_seqlens + Tq].

    -> out (B, Tq, Hq, D) [, lse (B, Hq, Tq) fp32]. ``num_splits=0`` picks a split count from the
    cache capacity and SM count; 1 disables split-K. Without cache_seqlens the whole cache
    (S_max, or max_blocks * block_size when paged) is attended.
    """
    cache_seqlens = _as_seqlens(cache_seqlens, q.shape[0], q.device)
    _check_kvcache_args(q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale, window_size,
                        softcap)
    if not can_use_triton(q, k_cache, v_cache, k, v, cache_seqlens, block_table):
        return kvcache_attention_ref(q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale,
                                     causal, window_size, softcap, num_splits, return_lse)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in the head dim (they are written in place)")
    out, lse = _kvcache_op(q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale, causal,
                           int(window_size[0]), int(window_size[1]), float(softcap), int(num_splits))
    return (out, lse) if return_lse else out


# A custom op that declares its in-place cache writes, so torch.compile keeps it opaque and ordered.
@torch.library.custom_op("tritium::flash_attn_with_kvcache", mutates_args=("k_cache", "v_cache"))
def _kvcache_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor | None,
                v: torch.Tensor | None, cache_seqlens: torch.Tensor | None, block_table: torch.Tensor | None,
                softmax_scale: float | None, causal: bool, window_left: int, window_right: int,
                softcap: float, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    if q.stride(-1) != 1:
        q = q.contiguous()
    num_new = 0
    if k is not None:
        append_to_cache(k_cache, v_cache, k, v, cache_seqlens, block_table)
        num_new = k.shape[1]
    return decode_fwd(q, k_cache, v_cache, cache_seqlens, block_table, num_new, softmax_scale, causal,
                      (window_left, window_right), softcap, num_splits)


@_kvcache_op.register_fake
def _(q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale, causal, window_left, window_right,
      softcap, num_splits):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return out, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@dataclass(frozen=True)
class _RefIndex:
    """What the reference derives from the lengths and the block table alone, so that every layer of
    one forward pass (same ``cache_seqlens`` and ``block_table`` tensors) reuses it."""

    write_slots: torch.Tensor | None  # (B * Tq,) cache slot of each new token, in the (slots, Hkv, D) view
    read_rows: torch.Tensor  # (B * Hkv * S,) rows of the (slots * Hkv, D) view, heads-first per sequence
    max_len: int  # S: keys gathered per row (the longest row)
    mask: torch.Tensor  # (B, 1, 1, Tq, S) True where query t of row b sees key s
    empty: torch.Tensor  # (B, 1, 1, Tq) rows with no visible key
    bias: torch.Tensor  # (B, 1, 1, Tq, S) fp32: 0 where visible, -inf where not (0 on empty rows)
    any_empty: bool


_REF_INDEX: list = []  # one entry: (key, copies of cache_seqlens and block_table, _RefIndex)


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is b is None or (a is not None and b is not None and a.shape == b.shape and torch.equal(a, b))


def _ref_index(k_cache, cache_seqlens, block_table, batch, seqlen_q, num_new, causal, window_size) -> _RefIndex:
    # Keyed on values, not tensor versions: inference-mode tensors carry no version counter.
    key = (tuple(k_cache.shape), k_cache.device, batch, seqlen_q, num_new, causal, tuple(window_size))
    if _REF_INDEX:
        old_key, old_seqlens, old_table, index = _REF_INDEX[0]
        if old_key == key and _same(old_seqlens, cache_seqlens) and _same(old_table, block_table):
            return index
    device = k_cache.device
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    capacity = block_table.shape[1] * page_size if block_table is not None else k_cache.shape[1]
    if cache_seqlens is None:
        total = torch.full((batch,), capacity, dtype=torch.long, device=device)
        max_len = capacity
    else:
        total = cache_seqlens.long() + num_new  # (B,) keys each row has
        max_len = min(capacity, int(total.max()))

    if block_table is None:  # slot of (row b, position p) in the cache viewed as (slots, Hkv, D)
        row_slots = torch.arange(batch, device=device)[:, None] * k_cache.shape[1] + \
            torch.arange(k_cache.shape[1], device=device)  # (B, S_max)
    else:
        width = -(-max_len // page_size)
        row_slots = ((block_table[:, :width].long() * page_size)[:, :, None]
                     + torch.arange(page_size, device=device)).flatten(1)  # (B, width * page_size)
    write_slots = None
    if num_new:
        write_slots = row_slots.gather(1, cache_seqlens.long()[:, None]
                                       + torch.arange(num_new, device=device)).flatten()
    # One gather builds the (B, Hkv, S, D) layout the matmuls want: no transpose copy afterwards.
    read_rows = row_slots[:, None, :max_len] * num_kv_heads + torch.arange(num_kv_heads, device=device)[:, None]
    key_pos = torch.arange(max_len, device=device)
    visible = key_pos < total[:, None]  # (B, S)
    left, right = _window(causal, window_size)
    if seqlen_q == 1 and left < 0 and right <= 0 and num_new:
        # One new query at the end sees every key: no causal mask, and no row is empty.
        mask = visible[:, None, None, None, :]  # (B, 1, 1, 1, S)
        empty = torch.zeros(mask.shape[:-1], dtype=torch.bool, device=device)
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_fill_(~mask, float("-inf"))
        index = _RefIndex(write_slots, read_rows.flatten(), max_len, mask, empty, bias, False)
        _REF_INDEX[:] = [(key, cache_seqlens.clone(), None if block_table is None else block_table.clone(), index)]
        return index
    query_pos = total[:, None] - seqlen_q + torch.arange(seqlen_q, device=device)  # (B, Tq) bottom-right
    mask = visible[:, None, :]  # (B, 1, S)
    if right >= 0:
        mask = mask & (key_pos[None, None, :] <= query_pos[:, :, None] + right)  # (B, Tq, S)
    if left >= 0:
        mask = mask & (key_pos[None, None, :] >= query_pos[:, :, None] - left)
    mask = mask.expand(batch, seqlen_q, max_len)[:, None, None]  # (B, 1, 1, Tq, S)
    empty = ~mask.any(dim=-1)
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_fill_(~mask & ~empty[..., None],
                                                                                   float("-inf"))
    index = _RefIndex(write_slots, read_rows.flatten(), max_len, mask, empty, bias, bool(empty.any()))
    _REF_INDEX[:] = [(key, None if cache_seqlens is None else cache_seqlens.clone(),
                      None if block_table is None else block_table.clone(), index)]
    return index


# One more row bucket in the one-token paged path costs about as much as this many padded keys
# (measured on the 2-core CPU box, tiny preset: ~10 small ops per layer against ~0.1-0.35 us a key).
DECODE_BUCKET_KEYS = 256


@dataclass(frozen=True)
class _PagedDecodeIndex:
    """The one-token paged decode's indices (see ``_paged_decode_ref``), shared by every layer."""

    write_slots: torch.Tensor  # (B,) slot of each new token in the cache viewed as (slots, Hkv, D)
    # (first row, end row, read_blocks (rows * W,), bias (rows, 1, W * page) fp32: 0 for the row's keys,
    # -inf past its length); W = blocks of the bucket's longest row
    buckets: tuple[tuple[int, int, torch.Tensor, torch.Tensor], ...]


def _decode_buckets(total: list[int]) -> list[tuple[int, int]]:
    """Row ranges attended separately: every row reads as many keys as the longest of its bucket, so
    when rows come longest first (``LLMEngine`` orders its decodes so) the short tail gets its own
    bucket where the keys that saves outweigh ``DECODE_BUCKET_KEYS``. Unordered rows: one bucket."""
    n = len(total)
    if n < 2 or any(a < b for a, b in zip(total, total[1:])):
        return [(0, n)]
    best, split = n * total[0], n
    for i in range(1, n):
        cost = i * total[0] + DECODE_BUCKET_KEYS + (n - i) * total[i]
        if cost < best:
            best, split = cost, i
    return [(0, split), (split, n)] if split < n else [(0, n)]


def _paged_decode_index(k_cache, cache_seqlens, block_table, batch) -> _PagedDecodeIndex:
    # Tensors made under inference_mode cannot be updated in place or saved for backward outside it:
    # cache per mode.
    key = ("paged-decode", tuple(k_cache.shape), k_cache.device, batch, torch.is_inference_mode_enabled())
    if _REF_INDEX:
        old_key, old_seqlens, old_table, index = _REF_INDEX[0]
        if old_key == key and _same(old_seqlens, cache_seqlens) and _same(old_table, block_table):
            return index
    page, device = k_cache.shape[1], k_cache.device
    lengths = cache_seqlens.long()
    total = lengths + 1  # keys each row attends: its cache and the new token
    table = block_table.long()
    write_slots = table.gather(1, (lengths // page)[:, None]).squeeze(1) * page + lengths % page
    buckets = []
    for first, end in _decode_buckets(total.tolist()):
        width = min(block_table.shape[1], -(-int(total[first:end].max()) // page))
        key_pos = torch.arange(width * page, device=device)
        bias = torch.zeros(end - first, 1, width * page, dtype=torch.float32, device=device)
        bias.masked_fill_((key_pos >= total[first:end, None])[:, None, :], float("-inf"))
        buckets.append((first, end, table[first:end, :width].flatten(), bias))
    index = _PagedDecodeIndex(write_slots, tuple(buckets))
    _REF_INDEX[:] = [(key, cache_seqlens.clone(), block_table.clone(), index)]
    return index


# Per thread, grow-only buffers the one-token path gathers keys and values into: every layer of every
# step gathers the same few MB, and a fresh allocation that size (page faults, a cold buffer) measured
# ~1.5x the gather itself on the 2-core CPU box.
_GATHER_BUFFERS = threading.local()


def _gather_blocks(cache: torch.Tensor, read_blocks: torch.Tensor, name: str) -> torch.Tensor:
    flat = cache.view(cache.shape[0], -1)
    buffers = _GATHER_BUFFERS.__dict__.setdefault("buffers", {})
    # A buffer made under inference_mode cannot be written outside it (and vice versa is wasteful): per mode.
    key = (name, flat.dtype, flat.device, torch.is_inference_mode_enabled())
    numel = read_blocks.numel() * flat.shape[1]
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = torch.empty(numel, dtype=flat.dtype, device=flat.device)
    return torch.index_select(flat, 0, read_blocks, out=buffer[:numel].view(-1, flat.shape[1]))


def _attend_blocks(q, k_cache, v_cache, read_blocks, bias, scale, compute):
    """q (n, 1, Hq, D) over the keys/values of ``read_blocks`` (n * W blocks) -> (n, Hkv, G, D), a view."""
    rows, _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group, num_slots = num_heads // num_kv_heads, bias.shape[-1]
    keys = _gather_blocks(k_cache, read_blocks, "k").view(rows, num_slots, -1)
    values = _gather_blocks(v_cache, read_blocks, "v").view(rows, num_slots, -1)
    keys, values = keys.to(compute), values.to(compute)
    spread = q.new_zeros((rows, num_kv_heads, group, num_kv_heads, head_dim), dtype=compute)
    spread.diagonal(dim1=1, dim2=3).copy_(q.view(rows, num_kv_heads, group, head_dim).permute(0, 2, 3, 1))
    scores = torch.baddbmm(bias, spread.view(rows, num_heads, -1), keys.transpose(1, 2), alpha=scale)
    out = torch.bmm(torch.softmax(scores, dim=-1), values).view(rows, num_kv_heads, group, num_kv_heads, head_dim)
    return out.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # (n, Hkv, G, D)


def _paged_decode_ref(q, k_cache, v_cache, k, v, cache_seqlens, block_table, scale, compute):
    """One new token per row over a paged cache, the reference's math in fewer and larger memory moves.

    Keys and values are gathered by whole blocks (one contiguous page * Hkv * D row per block instead
    of one D row per (slot, head)), leaving them (B, S, Hkv * D). The query is spread block-diagonally
    to (B, Hq, Hkv * D) (zeros outside its kv head's D columns), so one batched matmul per side scores
    every head against that layout with no transpose copy; the diagonal blocks of the output are each q
    head's result. That costs Hkv times the (tiny) score flops, which is why only Hkv <= 2 takes it:
    measured on a 2-core CPU at 32 rows x 160 keys (tiny preset) it is ~25% faster than the slot gather.
    Rows ordered longest first are attended in up to two buckets (``_decode_buckets``), so short rows
    do not read as many keys as the longest.
    """
    batch, _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    index = _paged_decode_index(k_cache, cache_seqlens, block_table, batch)
    flat_k, flat_v = k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim)
    flat_k.index_copy_(0, index.write_slots, k.view(batch, num_kv_heads, head_dim).to(k_cache.dtype))
    flat_v.index_copy_(0, index.write_slots, v.view(batch, num_kv_heads, head_dim).to(v_cache.dtype))
    if len(index.buckets) == 1:
        _, _, read_blocks, bias = index.buckets[0]
        out = _attend_blocks(q, k_cache, v_cache, read_blocks, bias, scale, compute)
    else:
        out = q.new_empty((batch, num_kv_heads, num_heads // num_kv_heads, head_dim), dtype=compute)
        for first, end, read_blocks, bias in index.buckets:
            out[first:end] = _attend_blocks(q[first:end], k_cache, v_cache, read_blocks, bias, scale, compute)
    return out.reshape(batch, 1, num_heads, head_dim).to(q.dtype)


def kvcache_attention_ref(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, block_table=None,
                          softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0, num_splits=0,
                          return_lse=False, *, upcast=True):
    """The PyTorch reference of ``flash_attn_with_kvcache`` (same signature and conventions; writes k/v
    into the cache in place), and the path caches take where Triton cannot run.

    Vectorised over the batch: each row's keys are gathered to (B, Hkv, S, D) with S = the longest row
    (``cache_seqlens + Tq``, or the capacity when ``cache_seqlens`` is None) and masked per row. GQA
    never repeats kv heads: q is viewed as (B, Hkv, GROUP * Tq, D), so each kv head's keys serve its
    GROUP q heads in one matmul (fused SDPA unless lse or softcap is asked for). The gather/write
    indices and the mask depend only on the lengths and the block table, so consecutive calls with
    the same (unmodified) ``cache_seqlens`` and ``block_table`` tensors -- every layer of a forward
    pass -- compute them once. ``upcast=True`` computes in fp32 (the ground truth); ``upcast=False``
    in the input dtype (the same-dtype baseline of the tolerance rule). Rows with no visible key give
    out 0 and lse +inf, as flash-attn. -> out (B, Tq, Hq, D) [, lse (B, Hq, Tq) fp32].
    """
    cache_seqlens = _as_seqlens(cache_seqlens, q.shape[0], q.device)
    _check_kvcache_args(q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale, window_size,
                        softcap)
    batch, seqlen_q, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("kvcache_attention_ref needs contiguous k_cache and v_cache (it views them as slots)")
    num_new = seqlen_q if k is not None else 0
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    compute = torch.float32 if upcast else q.dtype
    if (block_table is not None and seqlen_q == 1 and num_new and num_kv_heads <= 2 and not return_lse
            and softcap == 0 and _window(causal, window_size)[0] < 0):  # the last query sees every key
        return _paged_decode_ref(q, k_cache, v_cache, k, v, cache_seqlens, block_table, scale, compute)
    index = _ref_index(k_cache, cache_seqlens, block_table, batch, seqlen_q, num_new, causal, window_size)
    flat_k, flat_v = k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim)
    if num_new:
        flat_k.index_copy_(0, index.write_slots, k.reshape(-1, num_kv_heads, head_dim).to(k_cache.dtype))
        flat_v.index_copy_(0, index.write_slots, v.reshape(-1, num_kv_heads, head_dim).to(v_cache.dtype))
    S = index.max_len
    dtype = q.dtype
    keys = flat_k.view(-1, head_dim).index_select(0, index.read_rows).view(batch, num_kv_heads, S, head_dim)
    values = flat_v.view(-1, head_dim).index_select(0, index.read_rows).view(batch, num_kv_heads, S, head_dim)
    keys, values = keys.to(compute), values.to(compute)
    # (B, Tq, Hkv, G, D) -> (B, Hkv, G, Tq, D) -> (B, Hkv, G * Tq, D): rows are (q head, token) pairs
    qg = q.view(batch, seqlen_q, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    qg = qg.reshape(batch, num_kv_heads, group * seqlen_q, head_dim).to(compute)
    mask, empty = index.mask, index.empty
    if not return_lse and softcap == 0:
        # Fast path (what caches on CPU run): an additive mask, in-place scale and softmax. Measured on
        # CPU at decode shapes (Tq * GROUP rows per kv head) it beats fused SDPA, whose per-call setup
        # dominates for so few query rows.
        scores = torch.matmul(qg, keys.transpose(-1, -2))  # (B, Hkv, G * Tq, S)
        scores.view(batch, num_kv_heads, group, seqlen_q, S).mul_(scale).add_(index.bias)
        out = torch.matmul(torch.softmax(scores, dim=-1), values).view(batch, num_kv_heads, group, seqlen_q,
                                                                          head_dim)
        if index.any_empty:
            out = out.masked_fill(empty[..., None], 0.0)
        return out.permute(0, 3, 1, 2, 4).reshape(batch, seqlen_q, num_heads, head_dim).to(dtype)
    scores = torch.matmul(qg, keys.transpose(-1, -2)) * scale  # (B, Hkv, G * Tq, S)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.view(batch, num_kv_heads, group, seqlen_q, S).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.masked_fill(empty[..., None], 0.0), dim=-1).masked_fill(empty[..., None], 0.0)
    out = torch.matmul(probs.view(batch, num_kv_heads, group * seqlen_q, S), values)  # (B, Hkv, G * Tq, D)
    out = out.view(batch, num_kv_heads, group, seqlen_q, head_dim).permute(0, 3, 1, 2, 4)
    out = out.reshape(batch, seqlen_q, num_heads, head_dim).to(dtype)
    if not return_lse:
        return out
    lse = torch.logsumexp(scores.float(), dim=-1).masked_fill(empty, float("inf"))  # (B, Hkv, G, Tq)
    return out, lse.reshape(batch, num_heads, seqlen_q)
