"""Which KV blocks belong to whom: a block pool and per-sequence block tables, without any tensors.

vLLM splits the paged KV cache the same way: the block pool (free list, reference counts) and the
KV-cache manager (each sequence's block table) decide *which* physical blocks a sequence uses; the
tensors holding keys and values (``serve/kv_cache.PagedKVCache``) only store and attend. So the
accounting is testable on its own and the scheduler can plan a step without touching the model.

* ``BlockPool``: physical block ids ``0 .. num_blocks - 1``, a free list and a reference count per
  block. A block returns to the free list when its count drops to zero.
* ``BlockManager``: a block table (list of block ids) per sequence, grown as the sequence's token
  count grows (``block_size`` tokens per block) and released in one call.

Automatic prefix caching (vLLM's, on by default): a full block is named by a hash chained over its
parent's hash and its own token ids (plus a ``namespace`` for anything else that changes the keys,
such as the model), registered once its keys are computed (``commit``). A new sequence takes the
longest chain of cached blocks that covers its tokens (``allocate_prefix``) and only computes the
rest. Shared blocks are read-only: a sequence writes only past its cached prefix, and the block that
holds its last token is never shared, so that token is always computed (its logits are needed).
When the last reference to a cached block goes, the block keeps its keys and hash and waits in an
LRU list; it is evicted (the hash forgotten) only when a fresh block is needed and the free list is
empty, so ``num_free`` counts those blocks as free.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable


class BlockPool:
    """``num_blocks`` block ids with a free list, reference counts and the prefix-cache map (no tensors)."""

    def __init__(self, num_blocks: int) -> None:
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"BlockPool: num_blocks must be a positive integer, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._ref_counts = [0] * num_blocks
        self._hash_of: dict[int, int] = {}  # block -> its prefix hash (cached blocks only)
        self._block_of: dict[int, int] = {}  # prefix hash -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first

    @property
    def num_free(self) -> int:
        """Blocks a fresh allocation can take: the free list plus cached blocks nobody references."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def allocate(self, count: int) -> list[int]:
        """``count`` fresh blocks, each with reference count 1; ValueError when fewer are free.

        The free list goes first; then the least recently released cached blocks are evicted.
        """
        if count > self.num_free:
            raise ValueError(f"BlockPool: {count} blocks requested but only {self.num_free} are free")
        blocks = []
        for _ in range(count):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._block_of[self._hash_of.pop(block)]
            self._ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; a block nobody references goes back to the free list, or,
        when it is cached, to the end of the LRU list.

        Blocks are released last-first, so a sequence's tail is evicted before its shared head.
        """
        for block in reversed(blocks):
            if self._ref_counts[block] <= 0:
                raise RuntimeError(f"BlockPool: block {block} freed more often than it was allocated")
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def lookup(self, block_hash: int) -> int | None:
        return self._block_of.get(block_hash)

    def share(self, block: int) -> None:
        """One more reference to a cached block (taking it off the LRU list if nobody held it)."""
        if self._ref_counts[block] == 0:
            del self._evictable[block]
        self._ref_counts[block] += 1

    def register(self, block: int, block_hash: int) -> None:
        """Name a full, computed block by its prefix hash (a hash already cached keeps its block)."""
        if block_hash not in self._block_of and block not in self._hash_of:
            self._block_of[block_hash] = block
            self._hash_of[block] = block_hash


class BlockManager:
    """Per-sequence block tables over a ``BlockPool`` (vLLM's KV-cache manager, minus the tensors)."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 namespace: Hashable = None) -> None:
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"BlockManager: block_size must be a positive integer, got {block_size!r}")
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.namespace = namespace  # part of every chain's first hash (e.g. the model id)
        self._tables: dict[Hashable, list[int]] = {}
        self._hashes: dict[Hashable, list[int]] = {}  # chain hashes of each sequence's registered blocks
        # Called with the seq_id on every ``free`` (finish, abort, preemption): state kept per sequence
        # elsewhere (a speculative draft model's own cache) is released on the same events.
        self.free_listeners: list[Callable[[Hashable], None]] = []

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
        self._hashes.pop(seq_id, None)
        self.pool.free(table)
        for listener in self.free_listeners:
            listener(seq_id)
        return len(table)

    # ------------------------------------------------------------------ prefix caching
    def _chain(self, parent: int | None, tokens) -> int:
        return hash((parent if parent is not None else ("root", self.namespace), tuple(tokens)))

    def allocate_prefix(self, seq_id: Hashable, token_ids: list[int], reserve: int = 0) -> int | None:
        """Admit a sequence with no blocks yet: reuse the longest cached chain of full blocks of
        ``token_ids`` (never the block holding the last token) and allocate the rest, keeping
        ``reserve`` blocks free. Returns the number of tokens whose keys are already cached, or None
        (and no change) when the blocks do not fit."""
        if seq_id in self._tables:
            raise ValueError(f"BlockManager: {seq_id!r} already holds blocks")
        hits, hashes = [], []
        if self.enable_prefix_caching:
            parent = None
            for i in range((len(token_ids) - 1) // self.block_size):
                parent = self._chain(parent, token_ids[i * self.block_size:(i + 1) * self.block_size])
                block = self.pool.lookup(parent)
                if block is None:
                    break
                hits.append(block)
                hashes.append(parent)
        fresh = self.blocks_for(len(token_ids)) - len(hits)
        revived = sum(1 for b in hits if self.pool.ref_count(b) == 0)  # leave the free count when shared
        if fresh + revived + reserve > self.pool.num_free:
            return None
        for block in hits:
            self.pool.share(block)
        self._tables[seq_id] = hits + self.pool.allocate(fresh)
        self._hashes[seq_id] = hashes
        return len(hits) * self.block_size

    def commit(self, seq_id: Hashable, num_computed: int, tokens: Callable[[int, int], list[int]]) -> None:
        """Register ``seq_id``'s blocks that are full and computed (the first ``num_computed`` tokens);
        ``tokens(start, count)`` gives the sequence's token ids ``[start, start + count)``."""
        if not self.enable_prefix_caching:
            return
        hashes, table = self._hashes.setdefault(seq_id, []), self._tables.get(seq_id, [])
        for i in range(len(hashes), min(num_computed // self.block_size, len(table))):
            block_hash = self._chain(hashes[-1] if hashes else None, tokens(i * self.block_size, self.block_size))
            self.pool.register(table[i], block_hash)
            hashes.append(block_hash)

    def table(self, seq_id: Hashable) -> list[int]:
        """``seq_id``'s block table (the live list: read it, do not change it)."""
        return self._tables.get(seq_id, [])

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables
