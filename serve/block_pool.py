"""Which KV blocks belong to whom: a block pool and per-sequence block tables, without any tensors.

vLLM splits the paged KV cache the same way: the block pool (free list, reference counts) and the
KV-cache manager (each sequence's block table) decide *which* physical blocks a sequence uses; the
tensors holding keys and values (``serve/kv_cache.PagedKVCache``) only store and attend. So the
accounting is testable on its own and the scheduler can plan a step without touching the model.

* ``BlockPool``: physical block ids ``0 .. num_blocks - 1``, a free list and a reference count per
  block. A block returns to the free list when its count drops to zero.
* ``BlockManager``: a block table (list of block ids) per sequence, grown as the sequence's token
  count grows (``block_size`` tokens per block) and released in one call.
"""
from __future__ import annotations

from collections.abc import Hashable


class BlockPool:
    """``num_blocks`` block ids with a free list and reference counts (no tensors)."""

    def __init__(self, num_blocks: int) -> None:
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"BlockPool: num_blocks must be a positive integer, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def allocate(self, count: int) -> list[int]:
        """``count`` fresh blocks, each with reference count 1; ValueError when fewer are free."""
        if count > len(self._free):
            raise ValueError(f"BlockPool: {count} blocks requested but only {len(self._free)} are free")
        blocks = [self._free.pop() for _ in range(count)]
        for block in blocks:
            self._ref_counts[block] = 1
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks nobody references go back to the free list.

        Blocks are released last-first so that a sequence's early blocks are handed out again first.
        """
        for block in reversed(blocks):
            if self._ref_counts[block] <= 0:
                raise RuntimeError(f"BlockPool: block {block} freed more often than it was allocated")
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free.append(block)


class BlockManager:
    """Per-sequence block tables over a ``BlockPool`` (vLLM's KV-cache manager, minus the tensors)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"BlockManager: block_size must be a positive integer, got {block_size!r}")
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self._tables: dict[Hashable, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq_id: Hashable, num_tokens: int) -> int:
        """Extra blocks ``seq_id`` needs to hold ``num_tokens`` tokens in total."""
        return max(0, self.blocks_for(num_tokens) - len(self._tables.get(seq_id, ())))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.pool.num_free

    def allocate(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Grow ``seq_id``'s table to hold ``num_tokens`` tokens; False (and no change) when blocks run out."""
        needed = self.blocks_needed(seq_id, num_tokens)
        if needed > self.pool.num_free:
            return False
        self._tables.setdefault(seq_id, []).extend(self.pool.allocate(needed))
        return True

    def shrink(self, seq_id: Hashable, num_tokens: int) -> int:
        """Release the blocks of ``seq_id``'s table past the first ``num_tokens`` tokens (what speculative
        decoding reserved for rejected tokens); returns how many were released."""
        table = self._tables.get(seq_id)
        keep = self.blocks_for(num_tokens)
        if table is None or len(table) <= keep:
            return 0
        tail = table[keep:]
        del table[keep:]
        self.pool.free(tail)
        return len(tail)

    def free(self, seq_id: Hashable) -> int:
        """Release ``seq_id``'s blocks; returns how many its table held (0 for an unknown id)."""
        table = self._tables.pop(seq_id, [])
        self.pool.free(table)
        return len(table)

    def table(self, seq_id: Hashable) -> list[int]:
        """``seq_id``'s block table (the live list: read it, do not change it)."""
        return self._tables.get(seq_id, [])

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables
