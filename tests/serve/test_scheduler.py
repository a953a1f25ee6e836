"""Scheduler and block accounting without a model: admission limits, chunked prefill, preemption order,
and the pool back at idle after every workload."""
from __future__ import annotations

import random

import pytest

from tritium.serve.block_pool import BlockManager, BlockPool
from tritium.serve.scheduler import Scheduler, SchedulerRequest


class FakeRequest(SchedulerRequest):
    """A request that 'generates' by bumping a counter: prompt_len prompt tokens, max_tokens outputs."""

    def __init__(self, request_id, arrival, prompt_len, max_tokens):
        super().__init__(request_id, arrival)
        self.prompt_len, self.max_tokens, self.num_output = prompt_len, max_tokens, 0

    @property
    def num_tokens(self):
        return self.prompt_len + self.num_output


def run_step(scheduler):
    """What the engine does with a plan: advance computed counts, 'sample' where a row is complete."""
    plan = scheduler.schedule()
    finished = []
    for request in plan.decodes:
        request.num_computed += 1
    for request, chunk in plan.prefills:
        request.num_computed += chunk
    for request in plan.decodes + [r for r, _ in plan.prefills if r.pending == 0]:
        request.num_output += 1
        if request.num_output == request.max_tokens:
            scheduler.finish(request)
            finished.append(request)
    return plan, finished


def make(num_blocks=16, block_size=4, max_num_seqs=4, max_prefill_tokens=8):
    blocks = BlockManager(num_blocks, block_size)
    return blocks, Scheduler(blocks, max_num_seqs=max_num_seqs, max_prefill_tokens=max_prefill_tokens)


def test_block_pool_free_list_and_ref_counts():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert a == [0, 1, 2] and pool.num_free == 1 and all(pool.ref_count(b) == 1 for b in a)
    with pytest.raises(ValueError, match="only 1 are free"):
        pool.allocate(2)
    pool.free(a)
    assert pool.num_free == 4 and pool.allocate(1) == [0]  # a sequence's first block is reused first
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([3])
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)


def test_block_manager_tables():
    blocks = BlockManager(num_blocks=5, block_size=4)
    assert blocks.allocate("a", 9) and blocks.table("a") == [0, 1, 2]
    assert not blocks.allocate("b", 9) and "b" not in blocks and blocks.num_free_blocks == 2
    assert blocks.blocks_needed("a", 12) == 0 and blocks.blocks_needed("a", 13) == 1
    assert blocks.allocate("b", 8) and blocks.num_free_blocks == 0
    assert blocks.free("a") == 3 and blocks.num_free_blocks == 3 and blocks.free("a") == 0
    assert blocks.allocate("a", 1) and blocks.num_used_blocks == 3
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)


def test_admission_respects_max_num_seqs_and_fifo():
    blocks, scheduler = make(num_blocks=64, max_num_seqs=2, max_prefill_tokens=100)
    requests = [FakeRequest(f"r{i}", i, prompt_len=5, max_tokens=3) for i in range(4)]
    for r in requests:
        scheduler.add(r)
    plan, _ = run_step(scheduler)
    assert [r.request_id for r, _ in plan.prefills] == ["r0", "r1"]  # only max_num_seqs admitted, in order
    assert [r.request_id for r in scheduler.waiting] == ["r2", "r3"]
    plan, _ = run_step(scheduler)
    assert [r.request_id for r in plan.decodes] == ["r0", "r1"] and not plan.prefills


def test_admission_waits_for_blocks_and_head_is_not_overtaken():
    blocks, scheduler = make(num_blocks=4, block_size=4, max_num_seqs=8, max_prefill_tokens=100)
    big = FakeRequest("big", 0, prompt_len=12, max_tokens=2)  # 3 blocks
    head = FakeRequest("head", 1, prompt_len=8, max_tokens=1)  # 2 blocks: does not fit next to big
    small = FakeRequest("small", 2, prompt_len=2, max_tokens=1)  # 1 block: would fit, must still wait
    for r in (big, head, small):
        scheduler.add(r)
    plan, _ = run_step(scheduler)
    assert [r.request_id for r, _ in plan.prefills] == ["big"]
    assert [r.request_id for r in scheduler.waiting] == ["head", "small"]


def test_chunked_prefill_splits_long_prompts_under_the_budget():
    blocks, scheduler = make(num_blocks=64, max_prefill_tokens=8)
    long, short = FakeRequest("long", 0, prompt_len=20, max_tokens=2), FakeRequest("short", 1, 3, 2)
    scheduler.add(long)
    scheduler.add(short)
    chunks = []
    for _ in range(4):
        plan, _ = run_step(scheduler)
        assert sum(c for _, c in plan.prefills) <= 8
        chunks.append([(r.request_id, c) for r, c in plan.prefills])
    assert chunks[0] == [("long", 8)]  # the whole budget: short waits for the next step
    assert chunks[1] == [("long", 8)]
    assert chunks[2] == [("long", 4), ("short", 3)]  # the remainder, and the next request shares the step
    assert chunks[3] == []  # both decode now
    assert long.num_computed == 21 and short.num_computed == 4


def test_preemption_takes_the_newest_and_oldest_progresses():
    # 6 blocks of 2 tokens; three requests of 3-token prompts each growing to 9 tokens cannot all fit.
    blocks, scheduler = make(num_blocks=6, block_size=2, max_num_seqs=3, max_prefill_tokens=100)
    requests = [FakeRequest(f"r{i}", i, prompt_len=3, max_tokens=6) for i in range(3)]
    for r in requests:
        scheduler.add(r)
    preempted, finish_order = [], []
    for _ in range(200):
        if not scheduler.has_unfinished():
            break
        running_before = [r.request_id for r in scheduler.running]  # oldest first
        plan, finished = run_step(scheduler)
        victims = [r.request_id for r in plan.preempted]
        assert victims == running_before[::-1][:len(victims)]  # always the newest running request
        preempted += victims
        finish_order += [r.request_id for r in finished]
        assert blocks.num_used_blocks <= 6
        for r in scheduler.running:  # every running request holds blocks for what it has computed
            assert len(blocks.table(r.request_id)) * 2 >= r.num_computed
    assert preempted
    assert scheduler.num_preemptions == len(preempted)
    assert finish_order[0] == "r0"  # the oldest is never starved
    assert sorted(finish_order) == ["r0", "r1", "r2"]
    assert all(r.num_output == r.max_tokens for r in requests)
    assert blocks.num_free_blocks == 6 and not scheduler.running and not scheduler.waiting


def test_abort_anywhere_returns_blocks():
    blocks, scheduler = make(num_blocks=8, block_size=4, max_num_seqs=1)
    running, queued = FakeRequest("a", 0, 6, 10), FakeRequest("b", 1, 6, 10)
    scheduler.add(running)
    scheduler.add(queued)
    run_step(scheduler)
    assert blocks.num_used_blocks == 2
    scheduler.abort(queued)
    scheduler.abort(running)
    assert blocks.num_used_blocks == 0 and not scheduler.has_unfinished()


@pytest.mark.parametrize("seed", range(3))
def test_random_workloads_finish_and_pool_returns_to_idle(seed):
    rng = random.Random(seed)
    blocks, scheduler = make(num_blocks=rng.randint(12, 30), block_size=rng.choice((2, 4, 8)),
                             max_num_seqs=rng.randint(1, 6), max_prefill_tokens=rng.randint(4, 32))
    capacity = blocks.num_blocks * blocks.block_size
    requests = []
    for i in range(20):
        prompt = rng.randint(1, min(30, capacity - 1))
        requests.append(FakeRequest(f"r{i}", i, prompt, rng.randint(1, min(20, capacity - prompt))))
    pending = list(requests)
    steps = 0
    while pending or scheduler.has_unfinished():
        if pending and rng.random() < 0.5:
            scheduler.add(pending.pop(0))
        plan, _ = run_step(scheduler)
        assert len(scheduler.running) <= scheduler.max_num_seqs
        assert sum(c for _, c in plan.prefills) <= scheduler.max_prefill_tokens
        steps += 1
        assert steps < 5000, "no progress"
    assert all(r.num_output == r.max_tokens for r in requests)
    assert blocks.num_used_blocks == 0


def test_prefix_cache_shares_full_blocks_and_evicts_least_recently_released():
    blocks = BlockManager(num_blocks=6, block_size=2)
    prompt = [1, 2, 3, 4, 5]  # blocks [1,2] [3,4] and the last token's block [5]
    assert blocks.allocate_prefix("a", prompt) == 0
    blocks.commit("a", 5, lambda start, count: prompt[start:start + count])
    assert blocks.pool.num_cached == 2
    # A sibling with the same first 4 tokens shares two read-only blocks and computes only the rest.
    assert blocks.allocate_prefix("b", [1, 2, 3, 4, 9]) == 4
    assert blocks.table("b")[:2] == blocks.table("a")[:2] and blocks.table("b")[2] != blocks.table("a")[2]
    assert blocks.pool.ref_count(blocks.table("a")[0]) == 2 and blocks.num_used_blocks == 4
    # A fully cached prompt still computes its last token: its block is never shared.
    assert blocks.allocate_prefix("c", [1, 2, 3, 4]) == 2
    blocks.free("a")
    blocks.free("b")
    blocks.free("c")
    assert blocks.num_used_blocks == 0 and blocks.pool.num_cached == 2  # freed, but still cached
    assert blocks.allocate_prefix("d", [1, 2, 3, 4, 7]) == 4  # revived from the LRU list
    blocks.free("d")
    # Needing every block evicts the cached ones (their hashes are forgotten), then nothing hits.
    assert blocks.allocate_prefix("e", list(range(10, 22))) == 0 and blocks.pool.num_cached == 0
    blocks.free("e")
    assert blocks.allocate_prefix("f", [1, 2, 3, 4, 5]) == 0
    with pytest.raises(ValueError, match="already holds"):
        blocks.allocate_prefix("f", [1])


def test_prefix_cache_chain_depends_on_every_earlier_token():
    blocks = BlockManager(num_blocks=8, block_size=2)
    first = [1, 2, 3, 4, 5]
    blocks.allocate_prefix("a", first)
    blocks.commit("a", 4, lambda start, count: first[start:start + count])
    assert blocks.allocate_prefix("b", [9, 2, 3, 4, 5]) == 0  # same second block, different parent
    assert blocks.allocate_prefix("c", [1, 2, 3, 4, 5]) == 4
    assert BlockManager(8, 2, enable_prefix_caching=False).allocate_prefix("x", first) == 0
