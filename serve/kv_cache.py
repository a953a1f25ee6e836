"""Key/value caches that the model attends through: contiguous and paged.

Both implement the model's ``kv_cache`` protocol, ``attend(layer_idx, q, k, v)``:
q (B, T, Hq, D) and the new k/v (B, T, Hkv, D), already RoPE-rotated, are
written into the cache at each row's current length and attended causally
(bottom-right aligned) over cached + new keys.  The model never advances the
cache; the caller does, after the forward pass, so every layer sees the same
lengths.

* ``ContiguousKVCache``: one preallocated (B, S_max, Hkv, D) tensor per layer
  in the model's dtype, with a per-row length, so prompts of different lengths
  share a batch: rows are right-padded, each row's length says where its next
  token goes, and pad keys past a row's length are never attended (decode
  overwrites them).  Used by ``Generator``.
* ``PagedKVCache``: a pool of fixed-size blocks per layer and a block table per
  sequence (vLLM's PagedAttention layout), so memory is taken as sequences
  grow instead of reserved for the maximum length.  Used by ``LLMEngine``.

Attention itself is ``tritium.kernels.decode.flash_attn_with_kvcache`` on CUDA
(flash-decoding) and its PyTorch reference on CPU (the Triton interpreter is
far too slow for generation); ``kvcache_attention_torch`` below stands in when
the kernel module is missing.
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F


def kvcache_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                            cache_seqlens: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
                            softmax_scale: float | None = None, causal: bool = True, **_: object) -> torch.Tensor:
    """PyTorch version of ``flash_attn_with_kvcache`` (same conventions; writes k/v in place)."""
    B, T, Hq, D = q.shape
    device = q.device
    seqlens = (torch.zeros(B, dtype=torch.long, device=device) if cache_seqlens is None
               else cache_seqlens.to(device=device, dtype=torch.long))
    positions = seqlens[:, None] + torch.arange(T, device=device)[None, :]  # (B, T)
    if block_table is None:
        if k is not None:
            rows = torch.arange(B, device=device)[:, None].expand(B, T)
            k_cache[rows, positions] = k.to(k_cache.dtype)
            v_cache[rows, positions] = v.to(v_cache.dtype)
        S = int((seqlens.max() + T).item()) if k is not None else k_cache.shape[1]
        keys, values = k_cache[:B, :S], v_cache[:B, :S]  # (B, S, Hkv, D)
    else:
        block_size = k_cache.shape[1]
        table = block_table.long()
        if k is not None:
            blocks = table.gather(1, positions // block_size)
            k_cache[blocks, positions % block_size] = k.to(k_cache.dtype)
            v_cache[blocks, positions % block_size] = v.to(v_cache.dtype)
        keys = k_cache[table].flatten(1, 2)  # (B, W * block_size, Hkv, D)
        values = v_cache[table].flatten(1, 2)
        S = keys.shape[1]
    total = seqlens + (T if k is not None else 0)  # keys that exist per row
    key_pos = torch.arange(S, device=device)
    mask = key_pos[None, None, :] < total[:, None, None]  # (B, 1, S)
    if causal:
        query_pos = total[:, None] - T + torch.arange(T, device=device)[None, :]  # bottom-right aligned
        mask = mask & (key_pos[None, None, :] <= query_pos[:, :, None])  # (B, T, S)
    group = Hq // keys.shape[2]
    qh = q.transpose(1, 2).float()  # (B, Hq, T, D)
    kh = keys.repeat_interleave(group, dim=2).transpose(1, 2).float()
    vh = values.repeat_interleave(group, dim=2).transpose(1, 2).float()
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask[:, None].expand(B, 1, T, S), scale=scale)
    return out.transpose(1, 2).to(q.dtype)  # (B, T, Hq, D)


def _resolve_attention(device: torch.device):
    """The attention function for caches on ``device``: the Triton kernel on CUDA, a reference on CPU."""
    try:
        from tritium.kernels import decode
    except ImportError:
        return kvcache_attention_torch
    if device.type == "cuda":
        return decode.flash_attn_with_kvcache
    # On CPU the vectorised PyTorch version below (tested equal to decode.kvcache_attention_ref, which
    # loops over rows) keeps CPU generation and the tests fast.
    return kvcache_attention_torch


class ContiguousKVCache:
    """Per-layer (B, S_max, Hkv, D) buffers and per-row lengths ``seqlens`` (B,) int32."""

    def __init__(self, num_layers: int, batch_size: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 attention=None) -> None:
        if min(num_layers, batch_size, max_seq_len, num_kv_heads, head_dim) <= 0:
            raise ValueError("ContiguousKVCache: all sizes must be positive")
        self.device = torch.device(device)
        shape = (batch_size, max_seq_len, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=self.device)
        self.max_seq_len = max_seq_len
        self.attention = attention or _resolve_attention(self.device)

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_seq_len: int | None = None,
                  attention=None) -> ContiguousKVCache:
        cfg = model.config
        param = next(model.parameters())
        return cls(cfg.num_layers, batch_size, max_seq_len or cfg.max_seq_len, cfg.num_kv_heads, cfg.head_dim,
                   dtype=param.dtype, device=param.device, attention=attention)

    @property
    def batch_size(self) -> int:
        return self.seqlens.shape[0]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.attention(q, self.k[layer_idx], self.v[layer_idx], k, v, cache_seqlens=self.seqlens,
                              causal=True)

    def advance(self, num_tokens: int | torch.Tensor) -> None:
        """Lengths grow by ``num_tokens`` (an int, or (B,) per row) after a forward pass."""
        if isinstance(num_tokens, torch.Tensor):
            num_tokens = num_tokens.to(device=self.device, dtype=self.seqlens.dtype)
        self.seqlens.add_(num_tokens)

    def reset(self) -> None:
        self.seqlens.zero_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class PagedKVCache:
    """A pool of ``num_blocks`` blocks of ``block_size`` tokens per layer, handed out to sequences.

    The pool holds one extra block that is never allocated: block tables are padded with it, so the
    pad positions of a right-padded prefill batch write there instead of into someone else's block.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 attention=None) -> None:
        if num_blocks <= 0:
            raise ValueError(f"PagedKVCache: num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"PagedKVCache: block_size must be positive, got {block_size}")
        self.device = torch.device(device)
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.scratch_block = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._tables: dict[Hashable, list[int]] = {}
        self.attention = attention or _resolve_attention(self.device)
        # Set by prepare() for the next forward pass.
        self.block_table: torch.Tensor | None = None
        self.seqlens: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model: torch.nn.Module, num_blocks: int, block_size: int = 16,
                  attention=None) -> PagedKVCache:
        cfg = model.config
        param = next(model.parameters())
        return cls(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                   dtype=param.dtype, device=param.device, attention=attention)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    # ------------------------------------------------------------------ allocation
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq_id: Hashable, num_tokens: int) -> int:
        """Extra blocks ``seq_id`` needs to hold ``num_tokens`` tokens in total."""
        return max(0, self.blocks_for(num_tokens) - len(self._tables.get(seq_id, ())))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Grow ``seq_id``'s table to hold ``num_tokens`` tokens; False (and no change) when blocks run out."""
        needed = self.blocks_needed(seq_id, num_tokens)
        if needed > len(self._free):
            return False
        table = self._tables.setdefault(seq_id, [])
        for _ in range(needed):
            table.append(self._free.pop())
        return True

    def free(self, seq_id: Hashable) -> int:
        """Return ``seq_id``'s blocks to the free list; returns how many were freed."""
        table = self._tables.pop(seq_id, [])
        self._free.extend(reversed(table))
        return len(table)

    def table(self, seq_id: Hashable) -> list[int]:
        return list(self._tables.get(seq_id, ()))

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    # ------------------------------------------------------------------ forward
    def prepare(self, seq_ids: Sequence[Hashable], cache_seqlens: Sequence[int], query_len: int) -> None:
        """Set the block table and lengths for a forward pass over ``seq_ids`` with ``query_len`` new
        positions per row (rows shorter than that are right-padded; their pad keys land in blocks past
        their real tokens or in the scratch block, and are overwritten or never read)."""
        width = max(self.blocks_for(s + query_len) for s in cache_seqlens)
        rows = []
        for seq_id in seq_ids:
            table = self._tables.get(seq_id, [])
            rows.append(table[:width] + [self.scratch_block] * (width - len(table)))
        self.block_table = torch.tensor(rows, dtype=torch.int32, device=self.device)
        self.seqlens = torch.tensor(list(cache_seqlens), dtype=torch.int32, device=self.device)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.block_table is None:
            raise RuntimeError("PagedKVCache.attend called before prepare()")
        return self.attention(q, self.k[layer_idx], self.v[layer_idx], k, v, cache_seqlens=self.seqlens,
                              block_table=self.block_table, causal=True)
