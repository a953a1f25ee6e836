"""Speculative decoding: proposers, exact greedy, distribution-preserving sampling, cache rollback."""
from __future__ import annotations

import pytest
import torch

from tritium.model.transformer import Transformer
from tritium.serve.generator import Generator
from tritium.serve.sampling import SamplingParams
from tritium.serve.sequence import SequenceState
from tritium.serve.speculative import (
    Backoff,
    DraftModelProposer,
    NgramProposer,
    SpeculativeDecoder,
    verify_row,
)

K = 4


def _ids(tok, text):
    return tok.encode(text, bos=True)


class _ListProposer:
    """Proposes from a fixed per-prompt continuation (right: the greedy output; wrong: shifted ids)."""

    def __init__(self, continuations, shift=0, vocab=None):
        self.continuations, self.shift, self.vocab = continuations, shift, vocab
        self.calls = 0

    def propose(self, states, budgets):
        self.calls += 1
        out = []
        for state, k in zip(states, budgets):
            cont = self.continuations[tuple(state.prompt_ids)]
            n = len(state.output_ids)
            ids = cont[n:n + k]
            if self.shift:
                ids = [(t + self.shift) % self.vocab for t in ids]
            out.append(ids)
        return out, [None] * len(states)


@pytest.fixture(scope="module")
def plain(serve_model, tiny_tokenizer):
    return Generator(serve_model, tiny_tokenizer)


def _spec(model, tok, proposer, k=K, backoff=True):
    return Generator(model, tok, speculative=SpeculativeDecoder(proposer, k, backoff=backoff))


def test_ngram_proposer_takes_latest_longest_match():
    prop = NgramProposer(min_ngram=1, max_ngram=3)
    #            0  1  2  3  4  5  6  7  8  9
    ids = [5, 1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    assert prop.propose_ids(ids, 2) == [7, 8]  # latest occurrence of (1, 2, 3)
    assert prop.propose_ids([4, 6, 4, 9, 9, 6], 3) == [4, 9, 9]  # falls back to a 1-gram
    assert prop.propose_ids([1, 2, 3], 4) == []  # nothing repeats
    assert prop.propose_ids([7, 1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]  # a match near the end copies on into itself
    assert prop.propose_ids(ids, 0) == []
    with pytest.raises(ValueError, match="min_ngram"):
        NgramProposer(min_ngram=0)


def test_backoff_halves_then_skips_then_recovers():
    b = Backoff(4)
    assert b.budget() == 4
    b.update(4, 0)
    assert b.budget() == 2
    b.update(2, 0)
    b.update(1, 0)  # k hits zero: skip one step, then try a single token
    assert [b.budget(), b.budget()] == [0, 1]
    b.update(1, 0)  # second miss in a row: skip two steps
    assert [b.budget(), b.budget(), b.budget()] == [0, 0, 1]
    b.update(1, 1)
    assert b.budget() == 2
    b.update(2, 2)
    assert b.budget() == 4


def test_greedy_ngram_identical_to_plain(serve_model, tiny_tokenizer, plain, serve_prompts):
    prompts = [_ids(tiny_tokenizer, p) for p in serve_prompts]
    prompts.append(_ids(tiny_tokenizer, "abc abc abc abc abc abc"))  # repeats: the n-gram has matches
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (20, 5, 16, 1, 24)]
    spec = _spec(serve_model, tiny_tokenizer, NgramProposer(), backoff=False)
    want = [o.token_ids for o in plain.generate(prompts, params)]
    got = spec.generate(prompts, params)
    assert [o.token_ids for o in got] == want
    assert [o.text for o in got] == [o.text for o in plain.generate(prompts, params)]
    assert spec.speculative.stats.proposed > 0 and spec.speculative.stats.steps > 0
    # One row at a time too (a different padding pattern), and streaming.
    for prompt, p, w in zip(prompts, params, want):
        assert "".join(spec.stream(prompt, p)) == tiny_tokenizer.decode(w) or spec.last_completion.token_ids == w
        assert spec.last_completion.token_ids == w


def test_right_proposals_all_accepted_wrong_ones_none(serve_model, tiny_tokenizer, plain, serve_prompts):
    prompts = [_ids(tiny_tokenizer, p) for p in serve_prompts]
    params = SamplingParams(max_tokens=18, temperature=0.0, ignore_eos=True, logprobs=True)
    ref = plain.generate(prompts, params)
    continuations = {tuple(p): o.token_ids for p, o in zip(prompts, ref)}

    right = _spec(serve_model, tiny_tokenizer, _ListProposer(continuations))
    out = right.generate(prompts, params)
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]
    for o, r in zip(out, ref):
        torch.testing.assert_close(torch.tensor(o.logprobs), torch.tensor(r.logprobs), rtol=1e-4, atol=1e-4)
    stats = right.speculative.stats
    assert stats.acceptance_rate == 1.0 and stats.mean_accepted_length > 3.5
    assert stats.steps < 4 * 18 / 4  # ~5 tokens per forward instead of 1

    vocab = serve_model.config.vocab_size
    wrong = _spec(serve_model, tiny_tokenizer, _ListProposer(continuations, shift=1, vocab=vocab), backoff=False)
    assert [o.token_ids for o in wrong.generate(prompts, params)] == [o.token_ids for o in ref]
    assert wrong.speculative.stats.proposed > 0 and wrong.speculative.stats.accepted == 0
    assert wrong.speculative.stats.mean_accepted_length == 1.0


def test_rolled_back_entries_are_never_read(serve_model, tiny_tokenizer, plain, serve_prompts):
    """Rejected tokens' keys stay in the buffer past the row's length; poisoning everything past every
    row's length before each verify pass must not change a token, and the next request is unaffected."""
    prompts = [_ids(tiny_tokenizer, p) for p in serve_prompts]
    params = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
    ref = [o.token_ids for o in plain.generate(prompts, params)]
    continuations = {tuple(p): r for p, r in zip(prompts, ref)}
    inner = _ListProposer(continuations, shift=3, vocab=serve_model.config.vocab_size)
    gen = _spec(serve_model, tiny_tokenizer, inner, backoff=False)
    poisoned = []

    class Poisoning:
        def propose(self, states, budgets):
            cache = gen._cache
            for row, length in enumerate(cache.seqlens.tolist()):
                for layer in range(len(cache.k)):
                    cache.k[layer][row, length:] = 1e4
                    cache.v[layer][row, length:] = -1e4
            poisoned.append(True)
            return inner.propose(states, budgets)

    gen.speculative.proposer = Poisoning()
    assert [o.token_ids for o in gen.generate(prompts, params)] == ref
    assert poisoned and gen.speculative.stats.accepted == 0
    # The same generator (same cache buffers, stale rejected keys in them) serves the next request.
    gen.speculative.proposer = NgramProposer()
    assert gen.generate([prompts[0]], params)[0].token_ids == ref[0]


def test_greedy_with_penalties_and_stops_identical(serve_model, tiny_tokenizer, plain):
    prompt = _ids(tiny_tokenizer, "x = x + x + x + x + x")
    ref = plain.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0].token_ids
    for params in (SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, repetition_penalty=1.3,
                                  presence_penalty=0.5, frequency_penalty=0.4),
                   SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=(ref[7],)),
                   SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True,
                                  stop=(tiny_tokenizer.decode(ref[9:11]),))):
        want = plain.generate([prompt], params)[0]
        continuations = {tuple(prompt): want.token_ids + ref}
        for proposer in (NgramProposer(), _ListProposer(continuations)):
            got = _spec(serve_model, tiny_tokenizer, proposer).generate([prompt], params)[0]
            assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)


def test_draft_model_greedy_identical(serve_model, tiny_tokenizer, plain, serve_prompts):
    prompts = [_ids(tiny_tokenizer, p) for p in serve_prompts]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (16, 5, 12, 2)]
    ref = [o.token_ids for o in plain.generate(prompts, params)]
    # The target as its own draft: every proposal is right.
    same = Generator(serve_model, tiny_tokenizer, speculative=SpeculativeDecoder.draft(serve_model, K))
    assert [o.token_ids for o in same.generate(prompts, params)] == ref
    assert same.speculative.stats.acceptance_rate == 1.0
    # A different (random, smaller) draft: mostly wrong, output unchanged.
    torch.manual_seed(7)
    cfg = serve_model.config
    small_cfg = cfg.replace(num_layers=1, name="draft")
    draft = Transformer(small_cfg, backend="torch").eval()
    other = Generator(serve_model, tiny_tokenizer, speculative=SpeculativeDecoder.draft(draft, 3))
    assert [o.token_ids for o in other.generate(prompts, params)] == ref
    assert other.speculative.stats.acceptance_rate < 0.5
    # A draft with another vocabulary is refused.
    wrong_cfg = cfg.replace(vocab_size=cfg.vocab_size + 64)
    with pytest.raises(ValueError, match="vocab_size"):
        Generator(serve_model, tiny_tokenizer,
                  speculative=SpeculativeDecoder(DraftModelProposer(Transformer(wrong_cfg, backend="torch"), 2), 2))


# --------------------------------------------------------------------------- distribution tests

def _chi_square_p(counts_a: torch.Tensor, counts_b: torch.Tensor) -> float:
    """Two-sample chi-square test of homogeneity; p-value from the regularised upper gamma function."""
    keep = (counts_a + counts_b) > 0
    a, b = counts_a[keep].double(), counts_b[keep].double()
    na, nb = a.sum(), b.sum()
    pooled = (a + b) / (na + nb)
    stat = ((a - na * pooled) ** 2 / (na * pooled) + (b - nb * pooled) ** 2 / (nb * pooled)).sum()
    df = keep.sum().item() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def _same_distribution_p(a: list, b: list) -> float:
    """Chi-square p-value that two lists of sampled outcomes come from one distribution; outcomes seen
    fewer than 10 times in both lists together are merged into one cell, so every expected count is
    large enough for the test."""
    keys = sorted(set(a) | set(b))
    ca = torch.tensor([a.count(k) for k in keys], dtype=torch.float64)
    cb = torch.tensor([b.count(k) for k in keys], dtype=torch.float64)
    rare = (ca + cb) < 10
    ca = torch.cat([ca[~rare], ca[rare].sum().view(1)])
    cb = torch.cat([cb[~rare], cb[rare].sum().view(1)])
    return _chi_square_p(ca, cb)


def _goodness_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    keep = probs > 0
    assert counts[~keep].sum() == 0, "drew a token of probability zero"
    n = counts.sum().double()
    expected = n * probs[keep].double()
    stat = ((counts[keep].double() - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor((keep.sum().item() - 1) / 2, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("with_draft", [False, True])
def test_rejection_sampling_emits_exact_target_draws(with_draft):
    """verify_row on a 6-token vocabulary: the first emitted token (accepted or resampled) follows p
    exactly, for a point-mass proposal (n-gram) and a draft distribution q (chi-square, 3000 draws)."""
    gen = torch.Generator().manual_seed(0)
    V, N = 6, 3000
    logits = torch.randn(3, V, generator=gen) * 1.5
    params = SamplingParams(max_tokens=8, temperature=0.8, top_k=5, seed=11)
    from tritium.serve.sampling import process_logits
    p0 = process_logits(logits[:1], [params]).softmax(-1)[0]
    q = torch.softmax(torch.randn(2, V, generator=gen), -1)
    counts = torch.zeros(V)
    accepted = 0
    state = SequenceState([1, 2], params, _TokenizerStub())
    for _ in range(N):
        if with_draft:
            proposal = [int(torch.multinomial(q[0], 1, generator=gen)), int(torch.multinomial(q[1], 1, generator=gen))]
        else:
            proposal = [int(p0.argmax()), 3]
        emitted, n = verify_row(logits, proposal, state, q if with_draft else None)
        counts[emitted[0]] += 1
        accepted += n > 0
    assert _goodness_p(counts, p0) > 1e-3
    assert 0 < accepted < N  # both branches (accept, resample from the residual) ran


class _TokenizerStub:
    eos_id = -1
    end_of_turn_id = -1

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


class _GreedyProposer:
    """Proposes the model's own greedy continuation of each row's actual context: often right under
    sampling, often wrong, so both acceptance and residual resampling run."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def propose(self, states, budgets):
        out = []
        for state, k in zip(states, budgets):
            ids, proposal = list(state.all_ids), []
            for _ in range(k):
                proposal.append(int(self.model(torch.tensor([ids]))[0, -1].argmax()))
                ids.append(proposal[-1])
            out.append(proposal)
        return out, [None] * len(states)


def test_sampled_generation_follows_target_distribution(serve_model, tiny_tokenizer, plain):
    """End to end over 400 seeded rows in one batch: the joint distribution of the first two sampled
    tokens (the second one speculated) with speculation matches plain sampling (two-sample chi-square)."""
    prompt = _ids(tiny_tokenizer, "import os")
    rows = 400
    params = [SamplingParams(max_tokens=3, temperature=1.0, top_k=3, seed=1000 + i, ignore_eos=True,
                             repetition_penalty=1.1) for i in range(rows)]
    spec = _spec(serve_model, tiny_tokenizer, _GreedyProposer(serve_model), k=2, backoff=False)
    a = [tuple(o.token_ids[:2]) for o in plain.generate([prompt] * rows, params)]
    params_b = [SamplingParams(**{**p.__dict__, "seed": 50_000 + i}) for i, p in enumerate(params)]
    b = [tuple(o.token_ids[:2]) for o in spec.generate([prompt] * rows, params_b)]
    stats = spec.speculative.stats
    assert 0.2 * stats.proposed < stats.accepted < 0.9 * stats.proposed
    assert _same_distribution_p(a, b) > 1e-3


def test_cli_generate_speculative_flags(serve_model, tiny_tokenizer, plain, tmp_path, capsys):
    from tritium.cli import main

    serve_model.save_pretrained(tmp_path)
    tiny_tokenizer.save(tmp_path)
    prompt = "abc abc abc abc"
    expected = plain.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0].text
    base = ["generate", "--checkpoint", str(tmp_path), prompt, "--greedy", "--max-tokens", "12", "--ignore-eos",
            "--stats"]
    for extra in (["--speculative", "ngram", "--num-speculative-tokens", "3"],
                  ["--speculative", "draft", "--draft-checkpoint", str(tmp_path)]):
        assert main(base + extra) == 0
        captured = capsys.readouterr()
        assert captured.out == expected + "\n"
        assert "speculative: proposed" in captured.err and "acceptance rate" in captured.err
    assert "acceptance rate 100.0%" in captured.err  # the target as its own draft
    assert main(base + ["--speculative", "draft"]) == 2
    assert "--draft-checkpoint" in capsys.readouterr().err
    assert main(base + ["--num-speculative-tokens", "3"]) == 2  # without --speculative it would do nothing
    assert "--num-speculative-tokens needs --speculative" in capsys.readouterr().err


# --------------------------------------------------------------------------- the engine (paged cache)

class _OracleNgram(NgramProposer):
    """An n-gram proposer that knows each prompt's greedy continuation (right) or shifts it (wrong)."""

    def __init__(self, continuations, shift=0, vocab=1):
        super().__init__()
        self.continuations, self.shift, self.vocab = continuations, shift, vocab

    def propose_ids(self, ids, k):
        for prompt, cont in self.continuations.items():
            if tuple(ids[:len(prompt)]) == prompt and len(ids) >= len(prompt):
                n = len(ids) - len(prompt)
                return [(t + self.shift) % self.vocab for t in cont[n:n + k]]
        return []


def _engine_run(engine, requests):
    final = {}
    pending = list(requests)
    while pending or engine.has_unfinished():
        if pending:
            engine.add_request(*pending.pop(0))
        for out in engine.step():
            assert out.completion_tokens == len(out.token_ids)
            if out.finished:
                final[out.request_id] = out
    return final


@pytest.mark.parametrize("blocks,shift", [(64, 0), (64, 5), (14, 0)])
def test_engine_speculative_greedy_identical(serve_model, tiny_tokenizer, serve_prompts, greedy_reference,
                                             blocks, shift):
    """Speculative and plain requests share the batch under chunked prefill (and preemption with 14
    blocks); greedy outputs equal the no-cache reference, rejected blocks go back, the pool ends idle."""
    from tritium.serve.engine import LLMEngine

    prompts = [_ids(tiny_tokenizer, p) for p in serve_prompts + ["abc abc abc abc abc"]]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (14, 6, 12, 9, 16)]
    expected = [greedy_reference(p, sp.max_tokens) for p, sp in zip(prompts, params)]
    # The oracle knows three of the five prompts; the others run plainly (or get the real n-gram's guesses).
    oracle = _OracleNgram({tuple(p): e for p, e in list(zip(prompts, expected))[:3]}, shift,
                          serve_model.config.vocab_size)
    spec = SpeculativeDecoder(oracle, 3, backoff=False)
    engine = LLMEngine(serve_model, tiny_tokenizer, block_size=4, num_blocks=blocks, max_num_seqs=5,
                       max_prefill_tokens=7, speculative=spec)
    requests = [(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
    final = _engine_run(engine, requests)
    for i, want in enumerate(expected):
        assert final[f"r{i}"].token_ids == want, i
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["num_finished"] == len(requests)
    assert stats["spec_proposed"] > 0
    if shift:
        assert stats["spec_accepted"] == 0
    else:
        assert stats["spec_acceptance_rate"] == 1.0 and stats["spec_mean_accepted_length"] > 2.5
    if blocks == 14:
        assert stats["num_preemptions"] > 0
    with pytest.raises(ValueError, match="n-gram or the draft-model"):
        LLMEngine(serve_model, tiny_tokenizer, block_size=4, num_blocks=8,
                  speculative=SpeculativeDecoder(_ListProposer({}), 2))


def test_block_manager_shrink_returns_tail_blocks():
    from tritium.serve.block_pool import BlockManager

    blocks = BlockManager(8, 4)
    assert blocks.allocate("a", 14)  # 4 blocks
    head = list(blocks.table("a")[:2])
    assert blocks.shrink("a", 6) == 2 and blocks.table("a") == head and blocks.num_free_blocks == 6
    assert blocks.shrink("a", 8) == 0 and blocks.shrink("missing", 0) == 0
    freed = []
    blocks.free_listeners.append(freed.append)
    blocks.free("a")
    assert blocks.num_used_blocks == 0 and freed == ["a"]  # what a draft model's cache follows


def test_serve_speculative_ngram_flag_and_metrics(serve_model, tiny_tokenizer, tmp_path):
    import argparse

    from fastapi.testclient import TestClient

    from tritium.serve import cli_serve

    serve_model.save_pretrained(tmp_path)
    tiny_tokenizer.save(tmp_path)
    parser = argparse.ArgumentParser()
    cli_serve.add_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(tmp_path), "--speculative", "ngram", "--num-speculative-tokens",
                              "3", "--num-blocks", "32", "--block-size", "4"])
    app, _ = cli_serve.build_app(args)
    assert app.state.server.llm.speculative.num_speculative_tokens == 3
    with TestClient(app) as client:
        body = client.post("/v1/completions", json={"prompt": "abc abc abc abc abc", "max_tokens": 10,
                                                    "temperature": 0, "ignore_eos": True}).json()
        assert body["usage"]["completion_tokens"] == 10
        metrics = client.get("/metrics").text
    from serve_harness import metric_value

    # (The random model's output never repeats a token here, so nothing is proposed; the engine tests
    # above cover proposals. This checks the wiring: the gauges read the engine's counters.)
    proposed = app.state.server.llm.stats()["spec_proposed"]
    assert metric_value(metrics, "tritium_spec_proposed_tokens") == proposed
    assert "tritium_spec_acceptance_rate" in metrics and "tritium_spec_mean_accepted_length" in metrics


def test_sampled_draft_and_engine_paths_run_and_release(serve_model, tiny_tokenizer, serve_prompts):
    """Sampled requests through the draft proposer (the target as its own draft: q == p, so nearly every
    proposal is accepted) and through the engine next to greedy ones; the pool ends idle."""
    from tritium.serve.engine import LLMEngine

    prompts = [_ids(tiny_tokenizer, p) for p in serve_prompts]
    sampled = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True,
                             frequency_penalty=0.3)
    gen = Generator(serve_model, tiny_tokenizer, speculative=SpeculativeDecoder.draft(serve_model, 3))
    outs = gen.generate(prompts, sampled)
    assert all(o.completion_tokens == 12 for o in outs)
    assert gen.speculative.stats.acceptance_rate > 0.9
    repeat = _ids(tiny_tokenizer, "ab ab ab ab ab ab ab ab")
    greedy = Generator(serve_model, tiny_tokenizer).generate([repeat], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    engine = LLMEngine(serve_model, tiny_tokenizer, block_size=4, num_blocks=40, max_num_seqs=4, max_prefill_tokens=6,
                       speculative=SpeculativeDecoder(_OracleNgram({tuple(repeat): greedy[0].token_ids}), 3,
                                                      backoff=False))
    final = _engine_run(engine, [("s", repeat, sampled), ("g", prompts[0], SamplingParams(max_tokens=8, temperature=0)),
                                 ("t", repeat, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))])
    assert final["s"].completion_tokens == 12 and final["t"].completion_tokens == 10
    assert final["t"].token_ids == greedy[0].token_ids[:10]
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["spec_proposed"] > stats["spec_accepted"] > 0


# --------------------------------------------------------------------------- the engine with a draft model

def _random_draft(serve_model, seed=7):
    torch.manual_seed(seed)
    return Transformer(serve_model.config.replace(num_layers=1, name="draft"), backend="torch").eval()


@pytest.mark.parametrize("blocks,draft", [(64, "same"), (14, "same"), (14, "other")])
def test_engine_draft_greedy_identical(serve_model, tiny_tokenizer, serve_prompts, greedy_reference, blocks, draft):
    """The draft model inside the engine: greedy outputs equal the no-cache reference with chunked prefill
    (7 tokens a step, so the draft's own catch-up is chunked too), plain rows (back-off, a sampled row) in
    the batch and, with 14 blocks, preemption. Every greedy proposal equals the draft model's own no-cache
    greedy continuation, so its paged cache stayed in sync through catch-up, rollback and recompute; the
    target as its own draft accepts everything; both block pools end idle."""
    from tritium.serve.engine import LLMEngine

    prompts = [_ids(tiny_tokenizer, p) for p in serve_prompts + ["abc abc abc abc abc"]]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (14, 6, 12, 9, 16)]
    expected = [greedy_reference(p, sp.max_tokens) for p, sp in zip(prompts, params)]
    model = serve_model if draft == "same" else _random_draft(serve_model)
    spec = SpeculativeDecoder.draft(model, 3)
    spec.backoff = draft == "other"
    engine = LLMEngine(serve_model, tiny_tokenizer, block_size=4, num_blocks=blocks, max_num_seqs=6,
                       max_prefill_tokens=7, speculative=spec)
    paged, seen = spec.proposer.paged, []
    propose = paged.propose

    def recording(requests, budgets):
        proposals, qs = propose(requests, budgets)
        seen.extend((list(r.state.all_ids), p) for r, p in zip(requests, proposals)
                    if p and r.state.params.greedy)
        return proposals, qs

    paged.propose = recording
    requests = [(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
    requests.insert(2, ("s", prompts[1], SamplingParams(max_tokens=8, temperature=0.9, seed=3, ignore_eos=True)))
    final = _engine_run(engine, requests)
    for i, want in enumerate(expected):
        assert final[f"r{i}"].token_ids == want, i
    assert final["s"].completion_tokens == 8
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["spec_draft_kv_blocks_used"] == 0
    assert stats["spec_draft_kv_blocks_total"] == blocks and not paged.held
    assert stats["spec_proposed"] > 0 and len(seen) > 3
    with torch.no_grad():
        for ids, proposal in seen:
            ids, own = list(ids), []
            for _ in proposal:
                own.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
                ids.append(own[-1])
            assert proposal == own
    if blocks == 14:
        assert stats["num_preemptions"] > 0
    if draft == "same":
        assert stats["spec_acceptance_rate"] == 1.0 and stats["spec_mean_accepted_length"] > 2.5
    else:
        assert stats["spec_acceptance_rate"] < 0.5


def test_paged_draft_catches_up_in_chunks_and_rolls_back(serve_model, tiny_tokenizer):
    """PagedDraft alone, two rows batched: a long prompt is fed in max_prefill_tokens chunks (no proposal
    until it is in); after the target rejects the proposals and decodes on, the draft drops its stale
    tail; every proposal equals the draft's own no-cache greedy continuation; release frees the blocks."""
    from tritium.serve.speculative import PagedDraft

    draft = _random_draft(serve_model)
    paged = PagedDraft(draft, num_blocks=32, block_size=4, max_prefill_tokens=5)
    vocab = serve_model.config.vocab_size

    class Request:  # what PagedDraft reads of an engine request
        def __init__(self, request_id, text):
            self.request_id = request_id
            self.state = SequenceState(_ids(tiny_tokenizer, text),
                                       SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
                                       tiny_tokenizer)

    @torch.no_grad()
    def own(ids, k):
        ids, out = list(ids), []
        for _ in range(k):
            out.append(int(draft(torch.tensor([ids]))[0, -1].argmax()))
            ids.append(out[-1])
        return out

    a, b = Request("a", "def main():\n    return 0"), Request("b", "x")
    assert len(a.state.prompt_ids) >= 10 and len(b.state.prompt_ids) <= 4
    calls = 0
    while True:
        calls += 1
        (pa, pb), _ = paged.propose([a, b], [3, 2])
        assert pb == own(b.state.all_ids, 2)
        if pa:
            break
        assert paged.held["a"] == a.state.prompt_ids[:5 * calls]  # one chunk a step
    assert calls == -(-len(a.state.prompt_ids) // 5) and pa == own(a.state.all_ids, 3)
    # The target rejects a's first proposal and decodes two more tokens plainly; b accepts everything.
    for token in [(pa[0] + 1) % vocab, 5, 7]:
        a.state.append(token)
    for token in pb + [9]:
        b.state.append(token)
    (pa, pb), _ = paged.propose([a, b], [3, 2])
    assert pa == own(a.state.all_ids, 3) and pb == own(b.state.all_ids, 2)
    assert paged.held["a"] == a.state.all_ids + pa[:2]
    assert len(paged.blocks.table("a")) == paged.blocks.blocks_for(len(a.state.all_ids) + 2)
    paged.release("a")
    paged.release("b")
    assert paged.blocks.num_used_blocks == 0 and not paged.held


def test_engine_draft_abort_and_failure_free_draft_blocks(serve_model, tiny_tokenizer, serve_prompts,
                                                          greedy_reference):
    """An aborted request and one whose detokenizing fails give back their draft blocks at once; the
    request left running is unaffected."""
    from tritium.serve.engine import LLMEngine

    prompts = [_ids(tiny_tokenizer, p) for p in serve_prompts[:3]]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    spec = SpeculativeDecoder.draft(serve_model, 2)
    engine = LLMEngine(serve_model, tiny_tokenizer, block_size=4, num_blocks=64, max_num_seqs=4,
                       max_prefill_tokens=64, speculative=spec)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    paged = spec.proposer.paged
    for _ in range(3):
        engine.step()
    assert set(paged.held) == {"r0", "r1", "r2"} and all(paged.blocks.table(r) for r in paged.held)
    used = paged.blocks.num_used_blocks
    assert engine.abort_request("r0")
    assert "r0" not in paged.held and not paged.blocks.table("r0") and paged.blocks.num_used_blocks < used

    def broken(token_id):
        raise RuntimeError("detokenizer broke")

    engine._requests["r1"].state.tracker.add = broken
    final = engine.run_to_completion()
    assert final["r0"].finish_reason == "abort"
    assert final["r1"].finish_reason == "error" and "detokenizer broke" in final["r1"].error
    assert final["r2"].token_ids == greedy_reference(prompts[2], 20)
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["spec_draft_kv_blocks_used"] == 0 and not paged.held


def test_engine_draft_sampled_follows_target_distribution(serve_model, tiny_tokenizer, plain):
    """Sampled rows through the engine with a draft model (rejection sampling with the draft's processed
    q): the joint distribution of the first two tokens (the second one speculated) matches plain
    sampling (two-sample chi-square). The draft is the target with its final norm scaled by 0.3, so q is
    a flatter p: ~80% of proposals are accepted, and a verifier that accepted every proposal (emitting
    q) fails the test (p ~ 4e-5 with these seeds; the exact rule gives p ~ 0.17)."""
    from tritium.serve.engine import LLMEngine

    prompt = _ids(tiny_tokenizer, "import os")
    rows = 300
    params = [SamplingParams(max_tokens=4, temperature=1.0, top_k=5, seed=1000 + i, ignore_eos=True,
                             repetition_penalty=1.1) for i in range(rows)]
    a = [tuple(o.token_ids[:2]) for o in plain.generate([prompt] * rows, params)]
    draft = Transformer(serve_model.config, backend="torch").eval()
    draft.load_state_dict(serve_model.state_dict())
    with torch.no_grad():
        draft.norm.weight.mul_(0.3)
    spec = SpeculativeDecoder.draft(draft, 2)
    spec.backoff = False
    engine = LLMEngine(serve_model, tiny_tokenizer, block_size=4, num_blocks=4 * rows, max_num_seqs=rows,
                       max_prefill_tokens=4 * rows, speculative=spec)
    for i, p in enumerate(params):
        engine.add_request(f"r{i}", prompt, SamplingParams(**{**p.__dict__, "seed": 70_000 + i}))
    final = engine.run_to_completion()
    b = [tuple(final[f"r{i}"].token_ids[:2]) for i in range(rows)]
    stats = spec.stats
    assert 0.3 * stats.proposed < stats.accepted < 0.95 * stats.proposed
    assert _same_distribution_p(a, b) > 1e-3
    assert engine.stats()["spec_draft_kv_blocks_used"] == 0


def test_serve_speculative_draft_flag(serve_model, tiny_tokenizer, tmp_path):
    """`tritium serve --speculative draft --draft-checkpoint DIR` answers with the plain greedy text and
    exports the counters; a draft with another vocabulary is refused naming --draft-checkpoint."""
    import argparse

    from fastapi.testclient import TestClient
    from serve_harness import metric_value

    from tritium.serve import cli_serve

    target, draft_dir, wrong_dir = tmp_path / "target", tmp_path / "draft", tmp_path / "wrong"
    serve_model.save_pretrained(target)
    tiny_tokenizer.save(target)
    _random_draft(serve_model).save_pretrained(draft_dir)
    cfg = serve_model.config
    Transformer(cfg.replace(vocab_size=cfg.vocab_size + 64), backend="torch").save_pretrained(wrong_dir)
    parser = argparse.ArgumentParser()
    cli_serve.add_arguments(parser)
    base = ["--checkpoint", str(target), "--num-blocks", "32", "--block-size", "4"]
    args = parser.parse_args(base + ["--speculative", "draft", "--draft-checkpoint", str(target),
                                     "--num-speculative-tokens", "3"])
    app, _ = cli_serve.build_app(args)
    prompt = "def main():"
    want = Generator(serve_model, tiny_tokenizer).generate(
        [prompt], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0].text
    with TestClient(app) as client:
        body = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 10, "temperature": 0,
                                                    "ignore_eos": True}).json()
        metrics = client.get("/metrics").text
    assert body["choices"][0]["text"] == want and body["usage"]["completion_tokens"] == 10
    stats = app.state.server.llm.stats()
    assert stats["spec_proposed"] > 0 and stats["spec_acceptance_rate"] == 1.0  # the target as its own draft
    assert metric_value(metrics, "tritium_spec_proposed_tokens") == stats["spec_proposed"]
    assert metric_value(metrics, "tritium_spec_acceptance_rate") == 1.0
    assert stats["spec_draft_kv_blocks_used"] == 0 and "tritium_spec_draft_kv_blocks_used" in metrics
    app2, _ = cli_serve.build_app(parser.parse_args(base + ["--speculative", "draft", "--draft-checkpoint",
                                                            str(draft_dir)]))
    assert app2.state.server.llm.speculative.proposer.model.config.num_layers == 1
    with pytest.raises(ValueError, match="--draft-checkpoint"):
        cli_serve.build_app(parser.parse_args(base + ["--speculative", "draft", "--draft-checkpoint",
                                                      str(wrong_dir)]))


def test_draft_checkpoint_mistakes_are_one_line_errors_naming_the_flag(serve_model, tiny_tokenizer, tmp_path,
                                                                       capsys):
    """A missing folder, another vocab_size (smaller or larger) and another tokenizer of the same vocab_size are
    refused before any weights load, each in one line naming --draft-checkpoint."""
    import argparse

    from tritium.model.tokenizer import train_tokenizer
    from tritium.serve.cli_generate import speculative_from_args

    target = tmp_path / "target"
    serve_model.save_pretrained(target)
    tiny_tokenizer.save(target)
    cfg = serve_model.config
    cases = {"missing": (tmp_path / "missing", "folder not found")}
    for name, vocab in (("smaller", cfg.vocab_size // 2), ("larger", cfg.vocab_size + 64)):
        Transformer(cfg.replace(vocab_size=vocab), backend="torch").save_pretrained(tmp_path / name)
        cases[name] = (tmp_path / name, f"vocab_size {vocab} differs from --checkpoint's {cfg.vocab_size}")
    other = tmp_path / "other_tokenizer"
    serve_model.save_pretrained(other)  # same vocab_size, another tokenizer.model: proposals would be other tokens
    train_tokenizer(None, 400, other, max_bytes=20_000, num_threads=1)
    cases["other_tokenizer"] = (other, "tokenizer.model is not the target's")
    for name, (directory, message) in cases.items():
        args = argparse.Namespace(speculative="draft", draft_checkpoint=str(directory), checkpoint=str(target),
                                  num_speculative_tokens=2, device="cpu", dtype="float32", backend="torch")
        with pytest.raises(ValueError) as exc:
            speculative_from_args(args, serve_model)
        text = str(exc.value)
        assert text.startswith(f"--draft-checkpoint {directory}: ") and message in text and "\n" not in text, name
    args.draft_checkpoint = str(target)  # its own tokenizer.model: accepted
    assert speculative_from_args(args, serve_model).proposer.model.config.vocab_size == cfg.vocab_size
    short = tmp_path / "short"
    Transformer(cfg.replace(max_seq_len=16), backend="torch").save_pretrained(short)
    args.draft_checkpoint = str(short)  # usable, but not past 16 tokens: say so
    assert speculative_from_args(args, serve_model) is not None
    assert "max_seq_len 16 < the target's" in capsys.readouterr().err
