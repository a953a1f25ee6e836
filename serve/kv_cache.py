"""Key/value tensors that the model attends through: contiguous and paged caches.

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
* ``PagedKVCache``: a pool of fixed-size blocks per layer (vLLM's PagedAttention
  layout).  It only holds tensors: which blocks a sequence owns is decided by
  ``serve/block_pool.BlockManager``, and the caller hands the block tables to
  ``prepare`` before each forward pass.  Used by ``LLMEngine``.

There is one attention path: ``tritium.kernels.flash_attn_with_kvcache`` (the
Triton flash-decoding kernel, which falls back to its PyTorch reference
``kvcache_attention_ref`` only where Triton cannot run).  A model whose backend
puts attention on the PyTorch references (``torch``, ``sdpa``; ``auto`` on CPU)
gets the reference directly, so a cache attends the way its model does.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tritium.kernels import flash_attn_with_kvcache, kvcache_attention_ref
from tritium.model.backends import parse_backend


def kvcache_attention_for(model: torch.nn.Module) -> Callable:
    """The KV-cache attention matching ``model``'s backend: the Triton kernel when its attention is
    ``triton`` (``auto`` on CUDA), else the PyTorch reference."""
    device = next(model.parameters()).device
    impl = parse_backend(getattr(model, "backend", "auto"))["attention"]
    if impl == "auto":
        impl = "triton" if device.type == "cuda" else "torch"
    return flash_attn_with_kvcache if impl in ("triton", "flash_attn") else kvcache_attention_ref


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
        self.attention = attention or flash_attn_with_kvcache

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_seq_len: int | None = None,
                  attention=None) -> ContiguousKVCache:
        cfg = model.config
        param = next(model.parameters())
        return cls(cfg.num_layers, batch_size, max_seq_len or cfg.max_seq_len, cfg.num_kv_heads, cfg.head_dim,
                   dtype=param.dtype, device=param.device, attention=attention or kvcache_attention_for(model))

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
    """``num_blocks`` blocks of ``block_size`` tokens per layer: (num_blocks + 1, block_size, Hkv, D) tensors.

    The extra block (``scratch_block``) is never handed out: block tables are padded with it, so the
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
        self.attention = attention or flash_attn_with_kvcache
        # Set by prepare() for the next forward pass.
        self.block_table: torch.Tensor | None = None
        self.seqlens: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model: torch.nn.Module, num_blocks: int, block_size: int = 16,
                  attention=None) -> PagedKVCache:
        cfg = model.config
        param = next(model.parameters())
        return cls(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                   dtype=param.dtype, device=param.device, attention=attention or kvcache_attention_for(model))

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def prepare(self, block_tables: Sequence[Sequence[int]], cache_seqlens: Sequence[int], query_len: int) -> None:
        """Set the block tables and lengths for a forward pass of ``query_len`` new positions per row.

        Rows shorter than ``query_len`` are right-padded; their pad keys land in blocks past their real
        tokens or in the scratch block, and are overwritten or never read. Each table must already hold
        the row's real tokens (``BlockManager.allocate``).
        """
        width = max(-(-(s + query_len) // self.block_size) for s in cache_seqlens)
        scratch = self.scratch_block
        rows = [list(table[:width]) + [scratch] * (width - len(table)) for table in block_tables]
        self.block_table = torch.tensor(rows, dtype=torch.int32).to(self.device)
        self.seqlens = torch.tensor(list(cache_seqlens), dtype=torch.int32).to(self.device)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.block_table is None:
            raise RuntimeError("PagedKVCache.attend called before prepare()")
        return self.attention(q, self.k[layer_idx], self.v[layer_idx], k, v, cache_seqlens=self.seqlens,
                              block_table=self.block_table, causal=True)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
