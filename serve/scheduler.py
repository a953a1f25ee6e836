"""Who runs this step: admission, chunked prefill, preemption -- testable without a model.

``Scheduler.schedule()`` plans one engine step (the Orca/vLLM iteration-level design) from token
counts and the ``BlockManager`` alone; the engine then runs the model on the plan:

1. Decodes first: every running request whose tokens are all in the cache but the last sampled
   one gets one more token. It first needs room for one more key/value; when the block pool is
   empty the NEWEST running request is preempted -- its blocks are freed and it goes back to the
   queue, to be recomputed later from prompt + generated tokens (recomputation beats swapping for
   short sequences, and it never crashes). The oldest request always makes progress, so nothing
   starves.
2. Prefills: requests still consuming their prompt, then new ones from the FIFO queue, get chunks
   of at most ``max_prefill_tokens`` tokens in total, so a long prompt is spread over several
   steps instead of stalling every running decode (chunked prefill, Sarathi). A queued request is
   admitted only when blocks for its whole prompt are free (keeping a small reserve so running
   decodes can grow) and fewer than ``max_num_seqs`` are running; otherwise it waits, and later
   requests do not overtake it. With prefix caching, admission reuses the cached blocks of the
   request's longest cached prefix and only the rest is prefilled.

The engine advances ``num_computed`` after its forward passes and calls ``finish`` when a request
is done; ``abort`` may come at any time.
"""
from __future__ import annotations

import bisect
from collections.abc import Hashable
from dataclasses import dataclass, field

from tritium.serve.block_pool import BlockManager


class SchedulerRequest:
    """What the scheduler needs of a request: its id, arrival order and token counts.

    ``num_tokens`` is every token the request has (prompt + generated so far); ``num_computed``
    counts those whose keys/values are in the cache. Subclasses say where ``num_tokens`` comes from.
    """

    def __init__(self, request_id: Hashable, arrival: int) -> None:
        self.request_id = request_id
        self.arrival = arrival  # admission order; preemption picks the largest
        self.num_computed = 0
        self.num_admissions = 0  # > 1 after a preemption
        self.num_cached_tokens = 0  # tokens found in the prefix cache at the first admission

    @property
    def num_tokens(self) -> int:
        raise NotImplementedError

    def token_ids(self) -> list[int] | None:
        """All tokens (prompt + output so far), for prefix caching; None opts out."""
        return None

    @property
    def pending(self) -> int:
        """Tokens not yet in the cache: 1 for a decode, more while the prompt is being prefilled."""
        return self.num_tokens - self.num_computed


@dataclass
class SchedulerOutput:
    decodes: list = field(default_factory=list)  # requests that feed one token (their last sampled one)
    prefills: list = field(default_factory=list)  # (request, chunk): feed tokens[num_computed:+chunk]
    preempted: list = field(default_factory=list)  # sent back to the queue by this step

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(chunk for _, chunk in self.prefills)


class Scheduler:
    """Waiting and running queues over a ``BlockManager``; see the module docstring for the policy."""

    def __init__(self, blocks: BlockManager, *, max_num_seqs: int, max_prefill_tokens: int,
                 watermark_blocks: int | None = None) -> None:
        for name, value in (("max_num_seqs", max_num_seqs), ("max_prefill_tokens", max_prefill_tokens)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Scheduler: {name} must be a positive integer, got {value!r}")
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.watermark_blocks = max(1, blocks.num_blocks // 100) if watermark_blocks is None else watermark_blocks
        self.waiting: list[SchedulerRequest] = []  # sorted by arrival (preempted requests go back in order)
        self.running: list[SchedulerRequest] = []  # sorted by arrival
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # tokens looked up in the prefix cache at admission
        self.prefix_cache_hits = 0  # of which were cached (not computed)

    # ------------------------------------------------------------------ queue changes
    def add(self, request: SchedulerRequest) -> None:
        bisect.insort(self.waiting, request, key=lambda r: r.arrival)

    def finish(self, request: SchedulerRequest) -> None:
        """A running request is done: it leaves the batch and its blocks are released."""
        self.running.remove(request)
        self.blocks.free(request.request_id)

    def abort(self, request: SchedulerRequest) -> None:
        """Remove ``request`` wherever it is (queued or running) and release its blocks."""
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.running:
            self.running.remove(request)
        self.blocks.free(request.request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_prefilling(self) -> int:
        return sum(1 for r in self.running if r.pending > 1)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        out.decodes = self._schedule_decodes(out.preempted)
        out.prefills = self._schedule_prefills()
        return out

    def _preempt(self, request: SchedulerRequest, preempted: list) -> None:
        self.running.remove(request)
        self.blocks.free(request.request_id)
        request.num_computed = 0  # recompute prompt + output when readmitted
        bisect.insort(self.waiting, request, key=lambda r: r.arrival)
        self.num_preemptions += 1
        preempted.append(request)

    def _schedule_decodes(self, preempted: list) -> list[SchedulerRequest]:
        decodes = []
        for request in list(self.running):
            if request not in self.running or request.pending != 1:
                continue
            while not self.blocks.allocate(request.request_id, request.num_computed + 1):
                victim = self.running[-1]  # newest
                self._preempt(victim, preempted)
                if victim is request:
                    break
            else:
                decodes.append(request)
        return [r for r in decodes if r in self.running]

    def _schedule_prefills(self) -> list[tuple[SchedulerRequest, int]]:
        budget = self.max_prefill_tokens
        chunks = []
        for request in self.running:  # continue prompts already admitted (blocks already held)
            if budget == 0:
                break
            if request.pending > 1:
                chunk = min(request.pending, budget)
                chunks.append((request, chunk))
                budget -= chunk
        while budget > 0 and self.waiting and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            # A small reserve of free blocks lets running decodes grow without preempting the request
            # just admitted; with nothing running the reserve is waived so a request filling the whole
            # cache still gets in.
            reserve = min(len(self.running), self.watermark_blocks)
            token_ids = request.token_ids() if self.blocks.enable_prefix_caching else None
            if token_ids is not None:
                cached = self.blocks.allocate_prefix(request.request_id, token_ids, reserve)
                if cached is None:
                    break  # FIFO: the head waits for blocks, later requests do not overtake it
                request.num_computed = cached
                if request.num_admissions == 0:
                    request.num_cached_tokens = cached
                self.prefix_cache_queries += len(token_ids)
                self.prefix_cache_hits += cached
            else:
                needed = self.blocks.blocks_needed(request.request_id, request.num_tokens)
                if needed + reserve > self.blocks.num_free_blocks or \
                        not self.blocks.allocate(request.request_id, request.num_tokens):
                    break
            self.waiting.pop(0)
            request.num_admissions += 1
            bisect.insort(self.running, request, key=lambda r: r.arrival)
            chunk = min(request.pending, budget)
            chunks.append((request, chunk))
            budget -= chunk
        return chunks
