"""LLMEngine / AsyncEngine: continuous batching over the paged cache gives the same tokens as the
no-cache greedy reference, under chunked prefill, queueing, preemption and aborts."""
from __future__ import annotations

import asyncio

import pytest

from tritium.serve.engine import AsyncEngine, LLMEngine
from tritium.serve.generator import Generator
from tritium.serve.sampling import SamplingParams

MAX_TOKENS = (10, 4, 8, 6, 9)


@pytest.fixture(scope="module")
def requests(tiny_tokenizer, serve_prompts):
    prompts = [tiny_tokenizer.encode(p, bos=True) for p in serve_prompts + ["for i in range(10):\n    print(i)"]]
    return [(f"r{i}", ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            for i, (ids, n) in enumerate(zip(prompts, MAX_TOKENS))]


@pytest.fixture(scope="module")
def expected(requests, greedy_reference):
    return {rid: greedy_reference(ids, p.max_tokens) for rid, ids, p in requests}


def _run(engine, requests, stagger=True):
    """Add requests over the first steps (they join a running batch) and collect final outputs."""
    pending = list(requests)
    final, max_waiting = {}, 0
    while pending or engine.has_unfinished():
        if pending:
            engine.add_request(*pending.pop(0))
            if not stagger:
                while pending:
                    engine.add_request(*pending.pop(0))
        for out in engine.step():
            assert out.completion_tokens == len(out.token_ids)
            if out.finished:
                final[out.request_id] = out
        max_waiting = max(max_waiting, engine.stats()["num_waiting"])
    return final, max_waiting


def test_engine_greedy_equals_reference(serve_model, tiny_tokenizer, requests, expected):
    engine = LLMEngine(serve_model, tiny_tokenizer, block_size=4, num_blocks=64, max_num_seqs=8,
                       max_prefill_tokens=7)  # chunked prefill: prompts span several steps
    final, _ = _run(engine, requests)
    for rid, _, _ in requests:
        assert final[rid].token_ids == expected[rid], rid
        assert final[rid].finish_reason == "length"
        assert final[rid].text == tiny_tokenizer.decode(expected[rid])
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["num_preemptions"] == 0 and stats["num_finished"] == len(requests)


def test_cache_exhaustion_queues_and_preempts(serve_model, tiny_tokenizer, requests, expected):
    # 16 blocks x 4 tokens = 64 tokens of cache for ~100 tokens of work: requests must queue and the
    # newest running one must be preempted and recomputed; outputs stay exact.
    engine = LLMEngine(serve_model, tiny_tokenizer, block_size=4, num_blocks=16, max_num_seqs=5,
                       max_prefill_tokens=16)
    final, max_waiting = _run(engine, requests, stagger=False)
    assert max_waiting > 0
    assert engine.stats()["num_preemptions"] > 0
    for rid, _, _ in requests:
        assert final[rid].token_ids == expected[rid], rid
    assert engine.stats()["kv_blocks_used"] == 0


def test_engine_stream_text_and_seeded_sampling_match_generator(serve_model, tiny_tokenizer, requests):
    # Mixed per-request settings in one batch, penalties included (they read each row's own history).
    sampled = [(rid, ids, SamplingParams(max_tokens=12, temperature=1.0, seed=i, ignore_eos=True, logprobs=True,
                                         stop=("\n\n",), top_k=(0, 40)[i % 2], top_p=(1.0, 0.9)[i % 2],
                                         repetition_penalty=(1.0, 1.3)[i % 2], frequency_penalty=(0.0, 0.5)[i % 2]))
               for i, (rid, ids, _) in enumerate(requests)]
    engine = LLMEngine(serve_model, tiny_tokenizer, block_size=4, num_blocks=24, max_num_seqs=3,
                       max_prefill_tokens=8)
    for r in sampled:
        engine.add_request(*r)
    streamed = {rid: "" for rid, _, _ in sampled}
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            streamed[out.request_id] += out.text_delta
            assert out.text == streamed[out.request_id]
            assert len(out.logprobs) == len(out.token_ids)
            if out.finished:
                final[out.request_id] = out
    reference = Generator(serve_model, tiny_tokenizer).generate([ids for _, ids, _ in sampled],
                                                                [p for _, _, p in sampled])
    for (rid, _, _), ref in zip(sampled, reference):
        assert final[rid].token_ids == ref.token_ids
        assert final[rid].text == ref.text == streamed[rid]
        assert final[rid].finish_reason == ref.finish_reason


def test_abort_frees_blocks(serve_model, tiny_tokenizer, requests, expected):
    engine = LLMEngine(serve_model, tiny_tokenizer, block_size=4, num_blocks=32, max_num_seqs=8)
    for r in requests[:3]:
        engine.add_request(*r)
    engine.step()
    engine.step()
    used = engine.stats()["kv_blocks_used"]
    own = len(engine.blocks.table("r1"))
    assert own > 0 and engine.abort_request("r1") and not engine.abort_request("r1")
    assert engine.stats()["kv_blocks_used"] == used - own
    outs = engine.step()
    aborted = [o for o in outs if o.request_id == "r1"]
    assert len(aborted) == 1 and aborted[0].finished and aborted[0].finish_reason == "abort"
    final = engine.run_to_completion()
    assert "r1" not in final
    assert final["r0"].token_ids == expected["r0"] and final["r2"].token_ids == expected["r2"]
    assert engine.stats()["kv_blocks_used"] == 0


def test_add_request_validation(serve_model, tiny_tokenizer):
    engine = LLMEngine(serve_model, tiny_tokenizer, block_size=4, num_blocks=8)
    with pytest.raises(ValueError, match="context"):
        engine.add_request("a", [1] * 90, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="KV cache"):
        engine.add_request("a", [1] * 30, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("a", [1, 10**6], SamplingParams())
    engine.add_request("a", [1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already"):
        engine.add_request("a", [1, 2], SamplingParams())
    with pytest.raises(ValueError, match="block_size"):
        LLMEngine(serve_model, tiny_tokenizer, block_size=0)


def test_async_engine(serve_model, tiny_tokenizer, requests, expected):
    engine = LLMEngine(serve_model, tiny_tokenizer, block_size=4, num_blocks=16, max_num_seqs=4)
    async_engine = AsyncEngine(engine)

    async def consume(rid, ids, params):
        text, last = "", None
        async for out in async_engine.generate(rid, ids, params):
            text += out.text_delta
            last = out
        return rid, last, text

    async def cancel_early(rid, ids):
        async for _ in async_engine.generate(rid, ids, SamplingParams(max_tokens=40, temperature=0.0,
                                                                        ignore_eos=True)):
            break  # the client disconnects: the request must be aborted and its blocks freed

    async def main():
        with pytest.raises(ValueError, match="context"):
            async for _ in async_engine.generate("bad", [1] * 95, SamplingParams(max_tokens=5)):
                pass
        results = await asyncio.gather(*(consume(*r) for r in requests),
                                       cancel_early("gone", requests[0][1]))
        return results[:-1]

    results = asyncio.run(main())
    for rid, last, text in results:
        assert last.finished and last.token_ids == expected[rid] and last.text == text
    for _ in range(100):  # the abort is processed by the engine thread
        if engine.stats()["kv_blocks_used"] == 0 and not engine.has_unfinished():
            break
        import time
        time.sleep(0.02)
    assert engine.stats()["kv_blocks_used"] == 0
    async_engine.shutdown(graceful=True, timeout=10)
    assert not async_engine.is_running


@pytest.mark.gpu
def test_engine_on_cuda_matches_generator(tiny_tokenizer, serve_prompts):
    """The Triton paths (paged decode kernel in the engine, contiguous + CUDA graph in the generator)
    agree on greedy tokens; fp32 so that no near-tie can flip."""
    import torch

    from tritium.model.config import ModelConfig
    from tritium.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, ffn_hidden=256,
                      vocab_size=tiny_tokenizer.vocab_size, max_seq_len=256, initializer_range=0.2)
    model = Transformer(cfg).to("cuda").eval()
    prompts = [tiny_tokenizer.encode(p, bos=True) for p in serve_prompts]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (20, 7, 15, 11)]
    reference = Generator(model, tiny_tokenizer).generate(prompts, params)
    engine = LLMEngine(model, tiny_tokenizer, block_size=16, num_blocks=4, max_num_seqs=4, max_prefill_tokens=16)
    for i, (ids, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", ids, p)
    final = engine.run_to_completion()
    assert [final[f"r{i}"].token_ids for i in range(4)] == [r.token_ids for r in reference]
    assert engine.stats()["kv_blocks_used"] == 0


def test_engine_runs_the_triton_decode_kernel(triton_serve_model, tiny_tokenizer, requests, expected,
                                              decode_launches):
    """backend="triton" on CPU: the paged cache attends through the Triton decode kernel (interpreter),
    under chunked prefill and decodes, and greedy tokens still equal the no-cache torch model's."""
    engine = LLMEngine(triton_serve_model, tiny_tokenizer, block_size=4, num_blocks=32, max_num_seqs=3,
                       max_prefill_tokens=8)
    for rid, ids, params in requests[:3]:
        engine.add_request(rid, ids, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    final = engine.run_to_completion()
    for rid, _, _ in requests[:3]:
        assert final[rid].token_ids == expected[rid][:4], rid
    assert decode_launches.launches >= engine.stats()["num_steps"] * triton_serve_model.config.num_layers
    assert engine.stats()["kv_blocks_used"] == 0


@pytest.fixture(scope="module")
def shared_prefix_requests(tiny_tokenizer, serve_prompts):
    """Five requests behind one long shared 'system prompt' (two of them identical), distinct tails."""
    system = tiny_tokenizer.encode("You are a careful assistant. Answer in Python.\n" * 2, bos=True)[:41]
    tails = [tiny_tokenizer.encode(p) for p in serve_prompts] + [tiny_tokenizer.encode(serve_prompts[0])]
    return [(f"p{i}", system + tail[:6], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
            for i, tail in enumerate(tails)]


@pytest.mark.parametrize("num_blocks", [64, 15], ids=["roomy", "preempting"])
def test_prefix_caching_keeps_greedy_outputs(serve_model, tiny_tokenizer, greedy_reference,
                                             shared_prefix_requests, num_blocks):
    """Cached blocks are reused across requests (chunked prefill, concurrent sharing, preemption), the
    outputs equal the no-cache model's, usage reports cached tokens, and the pool returns to idle."""
    expected = {rid: greedy_reference(ids, p.max_tokens) for rid, ids, p in shared_prefix_requests}
    results = {}
    for caching in (True, False):
        engine = LLMEngine(serve_model, tiny_tokenizer, block_size=4, num_blocks=num_blocks, max_num_seqs=5,
                           max_prefill_tokens=7, enable_prefix_caching=caching)
        final, _ = _run(engine, shared_prefix_requests)
        for rid, _, _ in shared_prefix_requests:
            assert final[rid].token_ids == expected[rid], (caching, rid)
        stats = engine.stats()
        assert stats["kv_blocks_used"] == 0
        results[caching] = (final, stats)
    final, stats = results[True]
    assert stats["prefix_cache_hits"] >= 4 * 40  # the 41-token system prompt: 10 full blocks of 4, for 4 of 5
    assert stats["prompt_tokens_processed"] < results[False][1]["prompt_tokens_processed"]
    assert final["p0"].cached_tokens == 0 and final["p4"].cached_tokens >= 40
    assert results[False][1]["prefix_cache_hits"] == 0
    if num_blocks == 15:
        assert stats["num_preemptions"] > 0


def test_prefill_padding_groups_are_the_cheapest_split():
    # Prefill chunks go to forward passes padded to their longest chunk: the split minimises padded
    # tokens + a fixed cost per pass, checked against every split of a small sorted list.
    import itertools
    import random

    from tritium.serve.engine import _padding_groups

    rng = random.Random(4)
    for forward_cost in (0, 40, 10_000):
        for _ in range(20):
            chunks = [(f"r{i}", rng.randint(1, 130)) for i in range(rng.randint(1, 7))]
            groups = _padding_groups(chunks, forward_cost)
            assert sorted(c for g in groups for c in g) == sorted(chunks)  # every chunk once
            cost = sum(forward_cost + len(g) * max(c for _, c in g) for g in groups)
            ordered = sorted((c for _, c in chunks), reverse=True)
            best = min(sum(forward_cost + (b - a) * ordered[a] for a, b in itertools.pairwise((0, *cuts, len(ordered))))
                       for k in range(len(ordered)) for cuts in itertools.combinations(range(1, len(ordered)), k))
            assert cost == best
    assert len(_padding_groups([("a", 128), ("b", 16)], 40)) == 2  # 112 pad tokens cost more than a pass
    assert len(_padding_groups([("a", 128), ("b", 120)], 40)) == 1
