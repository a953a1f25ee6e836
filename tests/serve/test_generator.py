"""Generator: KV-cached greedy == full recomputation, batching, seeds, stops, streaming, UTF-8, caches."""
from __future__ import annotations

import pytest
import torch

from tritium.kernels import flash_attn_with_kvcache, kvcache_attention_ref
from tritium.serve.block_pool import BlockManager
from tritium.serve.detokenizer import IncrementalDetokenizer, TextTracker
from tritium.serve.generator import Generator
from tritium.serve.kv_cache import PagedKVCache
from tritium.serve.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def generator(serve_model, tiny_tokenizer):
    return Generator(serve_model, tiny_tokenizer)


def _ids(tok, text):
    return tok.encode(text, bos=True)


def test_greedy_with_cache_equals_recompute_single(generator, tiny_tokenizer, greedy_reference):
    prompt = _ids(tiny_tokenizer, "def main():\n    return 0")
    out = generator.generate([prompt], GREEDY)[0]
    assert out.token_ids == greedy_reference(prompt, 12)
    assert out.finish_reason == "length" and out.completion_tokens == 12
    assert out.text == tiny_tokenizer.decode(out.token_ids)


def test_greedy_batched_different_lengths(generator, tiny_tokenizer, greedy_reference, serve_prompts):
    prompts = [_ids(tiny_tokenizer, p) for p in serve_prompts]
    assert len({len(p) for p in prompts}) == len(prompts)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (12, 5, 9, 1)]
    outs = generator.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, outs):
        assert out.token_ids == greedy_reference(prompt, p.max_tokens)
    # A text prompt gets BOS, exactly like the ids above.
    assert generator.generate([serve_prompts[1]], GREEDY)[0].token_ids == greedy_reference(prompts[1], 12)


def test_seeded_sampling_reproducible_in_any_batch(generator, tiny_tokenizer):
    prompt = _ids(tiny_tokenizer, "import os")
    seeded = SamplingParams(max_tokens=10, temperature=1.0, top_k=50, seed=3, ignore_eos=True, logprobs=True)
    alone = generator.generate([prompt], seeded)[0]
    again = generator.generate([prompt], seeded)[0]
    other = SamplingParams(max_tokens=7, temperature=0.9, seed=99, ignore_eos=True)
    batched = generator.generate([_ids(tiny_tokenizer, "x = [1, 2]"), prompt], [other, seeded])[1]
    assert alone.token_ids == again.token_ids == batched.token_ids
    assert alone.token_ids != generator.generate([prompt], GREEDY)[0].token_ids[:10]
    assert len(alone.logprobs) == 10 and all(lp <= 0 for lp in alone.logprobs)
    torch.testing.assert_close(torch.tensor(alone.logprobs), torch.tensor(batched.logprobs), rtol=1e-4, atol=1e-4)


def test_stop_string_cut_exactly(generator, tiny_tokenizer):
    prompt = _ids(tiny_tokenizer, "class Foo(Bar):")
    full = generator.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0].text
    clean = full.replace("\ufffd", "")
    stop = clean[len(clean) // 2:len(clean) // 2 + 3]
    cut = full[:full.index(stop)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=("never-appears", stop))
    out = generator.generate([prompt], params)[0]
    assert out.text == cut and out.finish_reason == "stop"
    assert "".join(generator.stream(prompt, params)) == cut


def test_stop_token_ids_and_eos(generator, tiny_tokenizer, greedy_reference):
    prompt = _ids(tiny_tokenizer, "import os")
    ref = greedy_reference(prompt, 12)
    stop_id = ref[4]
    out = generator.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(stop_id,)))[0]
    first = ref.index(stop_id)
    assert out.token_ids == ref[:first + 1] and out.finish_reason == "stop"
    assert out.text == tiny_tokenizer.decode(ref[:first])  # the stop token's text is not shown


def test_stream_concat_equals_generate(generator, tiny_tokenizer):
    # Temperature 1 on a random model emits byte-fallback pieces, so partial UTF-8 sequences occur.
    for seed in range(3):
        params = SamplingParams(max_tokens=40, temperature=1.0, seed=seed, ignore_eos=True)
        prompt = _ids(tiny_tokenizer, "print('h\u00e9llo')")
        pieces = list(generator.stream(prompt, params))
        done = generator.generate([prompt], params)[0]
        assert "".join(pieces) == done.text == tiny_tokenizer.decode(done.token_ids)
        assert generator.last_completion is not None


def test_incremental_detokenizer_multibyte(tiny_tokenizer):
    text = "caf\u00e9 \u4e16\u754c \U0001f389 na\u00efve \u20ac5 \u0416\u0443\u043a def f(x):\n\treturn x"
    ids = tiny_tokenizer.encode(text)
    assert any(tiny_tokenizer.id_to_piece(i).startswith("<0x") for i in ids)  # byte fallback exercised
    detok = IncrementalDetokenizer(tiny_tokenizer)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    tracker = TextTracker(tiny_tokenizer, stop=("\u4e16\u754c",))
    emitted = ""
    for i in ids:
        delta, stopped = tracker.add(i)
        emitted += delta
        if stopped:
            break
    assert stopped and emitted == tracker.text == "caf\u00e9 "


def test_prompt_too_long_is_a_clear_error(generator, tiny_tokenizer):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generator.generate([[1] * 90], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        generator.generate([[]], SamplingParams())


def _random_cache_inputs(seed, B=3, T=4, Hq=4, Hkv=2, D=8, S=20):
    g = torch.Generator().manual_seed(seed)
    seqlens = torch.tensor([0, 5, 11][:B], dtype=torch.int32)
    k_cache = torch.randn(B, S, Hkv, D, generator=g)
    v_cache = torch.randn(B, S, Hkv, D, generator=g)
    q = torch.randn(B, T, Hq, D, generator=g)
    k = torch.randn(B, T, Hkv, D, generator=g)
    v = torch.randn(B, T, Hkv, D, generator=g)
    return q, k_cache, v_cache, k, v, seqlens


def test_paged_attention_matches_contiguous():
    q, k_cache, v_cache, k, v, seqlens = _random_cache_inputs(0)
    B, S, Hkv, D = k_cache.shape
    block_size = 3
    blocks_per_seq = -(-S // block_size)
    # Scatter each row's cache into shuffled blocks of a pool.
    perm = torch.randperm(B * blocks_per_seq, generator=torch.Generator().manual_seed(1))
    table = perm.view(B, blocks_per_seq).to(torch.int32)
    pool_k = torch.zeros(B * blocks_per_seq, block_size, Hkv, D)
    pool_v = torch.zeros_like(pool_k)
    padded_k = torch.zeros(B, blocks_per_seq * block_size, Hkv, D)
    padded_v = torch.zeros_like(padded_k)
    padded_k[:, :S], padded_v[:, :S] = k_cache, v_cache
    pool_k[table.long()] = padded_k.view(B, blocks_per_seq, block_size, Hkv, D)
    pool_v[table.long()] = padded_v.view(B, blocks_per_seq, block_size, Hkv, D)
    expected = kvcache_attention_ref(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=seqlens)
    got = kvcache_attention_ref(q, pool_k, pool_v, k, v, cache_seqlens=seqlens, block_table=table)
    torch.testing.assert_close(got, expected)
    # Against a dense causal attention written out by hand for each row (GQA by repeating kv heads).
    for b in range(B):
        n = int(seqlens[b])
        keys = torch.cat([k_cache[b, :n], k[b]]).repeat_interleave(2, dim=1)
        values = torch.cat([v_cache[b, :n], v[b]]).repeat_interleave(2, dim=1)
        scores = torch.einsum("thd,shd->hts", q[b], keys) / D ** 0.5
        mask = torch.arange(n + q.shape[1])[None, :] <= (n + torch.arange(q.shape[1]))[:, None]
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        torch.testing.assert_close(expected[b], torch.einsum("hts,shd->thd", probs, values), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", [flash_attn_with_kvcache, kvcache_attention_ref],
                         ids=["kernel", "reference"])
def test_paged_write_lands_where_a_hand_built_cache_has_it(attention):
    """Feed three sequences through PagedKVCache.attend in chunks (a prefill, then decodes), and compare
    the block pool with one written token by token with plain indexing: block = table[p // block_size],
    slot = p % block_size. Nothing outside the sequences' own slots may change."""
    g = torch.Generator().manual_seed(7)
    Hq, Hkv, D, block_size = 4, 2, 16, 4
    blocks = BlockManager(num_blocks=12, block_size=block_size)
    cache = PagedKVCache(1, 12, block_size, Hkv, D, attention=attention)
    cache.k[0].normal_(generator=g)
    cache.v[0].normal_(generator=g)
    expected_k, expected_v = cache.k[0].clone(), cache.v[0].clone()
    blocks.allocate("spacer", 5)  # the sequences do not start at block 0
    lengths = {"a": 0, "b": 0, "c": 0}
    for chunk_sizes in ({"a": 6, "b": 1, "c": 9}, {"a": 1, "b": 1, "c": 1}, {"a": 1, "b": 3, "c": 1}):
        seq_ids = list(chunk_sizes)
        T = max(chunk_sizes.values())
        for seq_id in seq_ids:
            assert blocks.allocate(seq_id, lengths[seq_id] + chunk_sizes[seq_id])
        q = torch.randn(len(seq_ids), T, Hq, D, generator=g)
        k = torch.randn(len(seq_ids), T, Hkv, D, generator=g)
        v = torch.randn(len(seq_ids), T, Hkv, D, generator=g)
        # The engine right-pads short rows; their pad slots may be written, so only T == chunk rows count.
        cache.prepare([blocks.table(s) for s in seq_ids], [lengths[s] for s in seq_ids], T)
        cache.attend(0, q, k, v)
        for row, seq_id in enumerate(seq_ids):
            table = blocks.table(seq_id)
            for t in range(chunk_sizes[seq_id]):
                position = lengths[seq_id] + t
                expected_k[table[position // block_size], position % block_size] = k[row, t]
                expected_v[table[position // block_size], position % block_size] = v[row, t]
            lengths[seq_id] += chunk_sizes[seq_id]
        # Pad slots (rows shorter than T) hold garbage by design: copy them over before comparing.
        written = torch.zeros(expected_k.shape[:2], dtype=torch.bool)
        for row, seq_id in enumerate(seq_ids):
            table = blocks.table(seq_id) + [cache.scratch_block] * 8
            for t in range(chunk_sizes[seq_id], T):
                position = lengths[seq_id] - chunk_sizes[seq_id] + t
                written[table[position // block_size], position % block_size] = True
        expected_k[written], expected_v[written] = cache.k[0][written], cache.v[0][written]
        assert torch.equal(cache.k[0], expected_k) and torch.equal(cache.v[0], expected_v)


def test_cli_generate_streams_greedy(serve_model, tiny_tokenizer, tmp_path, capsys):
    from tritium.cli import main
    from tritium.model.chat import encode_prompt

    serve_model.save_pretrained(tmp_path)
    tiny_tokenizer.save(tmp_path)
    prompt = "def main():"
    expected = Generator(serve_model, tiny_tokenizer).generate([prompt], GREEDY)[0].text
    assert main(["generate", "--checkpoint", str(tmp_path), prompt, "--greedy", "--max-tokens", "12",
                 "--ignore-eos", "--stats"]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected + "\n"
    assert "12 completion tokens" in captured.err
    chat_ids = encode_prompt(tiny_tokenizer, [{"role": "user", "content": prompt}])
    chat_expected = Generator(serve_model, tiny_tokenizer).generate([chat_ids], GREEDY)[0].text
    assert main(["generate", "--checkpoint", str(tmp_path), prompt, "--chat", "--greedy", "--max-tokens", "12",
                 "--ignore-eos", "--no-stream"]) == 0
    assert capsys.readouterr().out == chat_expected + "\n"
    assert main(["generate", "--checkpoint", str(tmp_path / "missing"), "x"]) == 2


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager(tiny_tokenizer, serve_prompts):
    from tritium.model.config import ModelConfig
    from tritium.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, ffn_hidden=256,
                      vocab_size=tiny_tokenizer.vocab_size, max_seq_len=256, initializer_range=0.2)
    model = Transformer(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    prompts = [_ids(tiny_tokenizer, p) for p in serve_prompts]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    graphed = Generator(model, tiny_tokenizer, compile=True)
    eager = Generator(model, tiny_tokenizer, compile=False)
    for batch in ([prompts[0]], prompts):
        got = graphed.generate(batch, params)
        assert graphed.use_cuda_graph and graphed.graph_failures == 0
        assert [o.token_ids for o in got] == [o.token_ids for o in eager.generate(batch, params)]


def test_generator_runs_the_triton_decode_kernel(triton_serve_model, tiny_tokenizer, serve_prompts,
                                                 greedy_reference, decode_launches):
    """backend="triton" on CPU: the contiguous cache attends through the Triton decode kernel."""
    prompts = [_ids(tiny_tokenizer, p) for p in serve_prompts[:2]]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    outs = Generator(triton_serve_model, tiny_tokenizer).generate(prompts, params)
    assert [o.token_ids for o in outs] == [greedy_reference(p, 4) for p in prompts]
    # one prefill and three decode forwards, one launch per layer each
    assert decode_launches.launches == 4 * triton_serve_model.config.num_layers


def test_a_tokenizer_larger_than_the_model_is_refused_before_any_weight_is_read(tmp_path, tiny_tokenizer_dir):
    # The check reads config.json only: with the weights gone, the vocabulary error still comes first.
    import shutil

    from tritium.model.config import ModelConfig
    from tritium.model.transformer import Transformer
    from tritium.serve.cli_generate import load_for_inference

    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, ffn_hidden=64,
                      vocab_size=512, max_seq_len=32)
    Transformer(cfg).save_pretrained(tmp_path)
    shutil.copy(tiny_tokenizer_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"tokenizer vocab \(2048\) is larger than the model's \(512\)"):
        load_for_inference(tmp_path, device="cpu")
