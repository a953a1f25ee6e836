"""flash_attn_with_kvcache (split-K decode, contiguous and paged caches) against references.

The reference appends to its own copy of the cache and runs plain fp32 attention per sequence;
the kernel must match it (flash-attention's tolerance rule), write the same cache, and agree
with the prefill kernel over the same keys.
"""
import pytest
import torch

from tritium.kernels.attention import flash_attn_func
from tritium.kernels.decode import flash_attn_with_kvcache, kvcache_attention_ref, num_splits_heuristic


@pytest.fixture(autouse=True)
def _fixed_kernel_configs(monkeypatch):
    # On a GPU, one fixed config per kernel: autotuning every small test shape only costs compile time.
    monkeypatch.setenv("TRITIUM_AUTOTUNE", "0")


ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def assert_within_rule(name, got, ref_fp32, ref_same_dtype, dtype):
    err = (got.float() - ref_fp32.float()).abs().max().item()
    baseline = (ref_same_dtype.float() - ref_fp32.float()).abs().max().item()
    assert err <= 2 * baseline + ATOL[dtype], (
        f"{name}: kernel err {err:.3g} vs torch {dtype} err {baseline:.3g}")


def make_cache(batch, capacity, num_kv_heads, head_dim, dtype, device, page_size, gen):
    """Random cache (never zeros). Paged: a shuffled block table plus spare blocks nobody owns."""
    if page_size is None:
        k_cache = torch.randn(batch, capacity, num_kv_heads, head_dim, generator=gen)
        block_table = None
    else:
        blocks_per_seq = -(-capacity // page_size)
        num_blocks = batch * blocks_per_seq + 3
        k_cache = torch.randn(num_blocks, page_size, num_kv_heads, head_dim, generator=gen)
        block_table = torch.randperm(num_blocks, generator=gen)[:batch * blocks_per_seq]
        block_table = block_table.view(batch, blocks_per_seq).to(device=device, dtype=torch.int32)
    v_cache = torch.randn(k_cache.shape, generator=gen)
    return k_cache.to(device=device, dtype=dtype), v_cache.to(device=device, dtype=dtype), block_table


# (B, Tq, Hq, Hkv, D, capacity, page_size, cache_lens, num_splits, window, softcap, dtype)
CASES = [
    (2, 1, 8, 2, 64, 300, None, [0, 257], 0, (-1, -1), 0.0, torch.float16),    # heuristic splits, empty cache
    (1, 1, 4, 4, 128, 200, None, [199], 1, (-1, -1), 0.0, torch.float32),      # no split, full cache
    (3, 1, 8, 1, 96, 260, 16, [5, 130, 259], 4, (-1, -1), 0.0, torch.float16),  # paged, MQA, D=96
    (2, 4, 4, 2, 80, 150, 32, [33, 100], 3, (-1, -1), 0.0, torch.float32),     # paged, Tq=4 causal, D=80
    (2, 2, 8, 1, 32, 300, 8, [77, 290], 5, (40, -1), 20.0, torch.float32),     # page 8, window, softcap
    (1, 20, 8, 2, 32, 100, None, [30], 2, (-1, -1), 0.0, torch.float16),       # chunked prefill: 2 row tiles
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}Tq{}H{}/{}D{}cap{}pg{}-{}-s{}".format(*c[:9]))
def test_matches_reference(case, device, launches):
    (batch, seqlen_q, num_heads, num_kv_heads, head_dim, capacity, page_size, cache_lens, num_splits,
     window, softcap, dtype) = case
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache, block_table = make_cache(batch, capacity, num_kv_heads, head_dim, dtype, device,
                                               page_size, gen)
    q = torch.randn(batch, seqlen_q, num_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    k_new = torch.randn(batch, seqlen_q, num_kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    v_new = torch.randn(batch, seqlen_q, num_kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    cache_seqlens = torch.tensor(cache_lens, dtype=torch.int32, device=device)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    low_k, low_v = k_cache.clone(), v_cache.clone()
    kwargs = {"cache_seqlens": cache_seqlens, "block_table": block_table, "window_size": window,
              "softcap": softcap, "return_lse": True}

    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, num_splits=num_splits, **kwargs)
    ref, ref_lse = kvcache_attention_ref(q, ref_k, ref_v, k_new, v_new, **kwargs)
    low, _ = kvcache_attention_ref(q, low_k, low_v, k_new, v_new, upcast=False, **kwargs)

    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (batch, num_heads, seqlen_q)
    assert_within_rule("out", out, ref, low, dtype)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
    # The new tokens landed where the reference put them, and nothing else changed.
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    launches.require("_decode_split_kernel")
    if num_splits > 1 and capacity > 128:  # splits are multiples of 128 keys: shorter caches never split
        launches.require("_decode_combine_kernel")


def test_agrees_with_prefill_kernel(device, launches):
    # Decoding the last Tq tokens over the cache == causal flash_attn_func over the whole sequence.
    gen = torch.Generator().manual_seed(1)
    length, seqlen_q = 70, 3
    q_all = torch.randn(1, length, 4, 32, generator=gen).to(device)
    k_all = torch.randn(1, length, 2, 32, generator=gen).to(device)
    v_all = torch.randn(1, length, 2, 32, generator=gen).to(device)
    k_cache = torch.randn(1, 96, 2, 32, generator=gen).to(device)
    v_cache = torch.randn(1, 96, 2, 32, generator=gen).to(device)
    k_cache[:, :length - seqlen_q] = k_all[:, :length - seqlen_q]
    v_cache[:, :length - seqlen_q] = v_all[:, :length - seqlen_q]
    seqlens = torch.tensor([length - seqlen_q], dtype=torch.int32, device=device)
    out = flash_attn_with_kvcache(q_all[:, -seqlen_q:], k_cache, v_cache, k_all[:, -seqlen_q:],
                                  v_all[:, -seqlen_q:], cache_seqlens=seqlens, num_splits=2)
    full = flash_attn_func(q_all, k_all, v_all, causal=True)
    torch.testing.assert_close(out, full[:, -seqlen_q:], atol=1e-5, rtol=1e-5)
    launches.require("_decode_split_kernel", "_attn_fwd_kernel")


def test_split_counts_agree_and_no_append(device, launches):
    # Without k/v the cache is read as is; without cache_seqlens the whole capacity is attended.
    gen = torch.Generator().manual_seed(2)
    k_cache, v_cache, block_table = make_cache(2, 200, 2, 64, torch.float32, device, 16, gen)
    q = torch.randn(2, 1, 8, 64, generator=gen).to(device)
    seqlens = torch.tensor([150, 9], dtype=torch.int32, device=device)
    before = k_cache.clone()
    outs = [flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=block_table,
                                    num_splits=n) for n in (1, 2, 7)]
    ref = kvcache_attention_ref(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=block_table)
    for out in outs:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(k_cache, before)
    whole = flash_attn_with_kvcache(q, k_cache, v_cache, block_table=block_table, num_splits=3)
    torch.testing.assert_close(whole, kvcache_attention_ref(q, k_cache, v_cache, block_table=block_table),
                               atol=1e-5, rtol=1e-5)
    assert launches["_decode_split_kernel"] == 4 and launches["_decode_combine_kernel"] == 3, dict(launches)


def test_num_splits_heuristic():
    assert num_splits_heuristic(num_programs=200, max_seqlen_k=100_000, num_sms=132) == 1  # grid already full
    assert num_splits_heuristic(num_programs=8, max_seqlen_k=100_000, num_sms=132) == 33  # batch 1, long
    assert num_splits_heuristic(num_programs=8, max_seqlen_k=300, num_sms=132) == 3        # short cache: few
    assert num_splits_heuristic(num_programs=1, max_seqlen_k=10**7, num_sms=132) == 128    # capped


def test_bad_inputs(device):
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache, block_table = make_cache(1, 64, 2, 32, torch.float32, device, 16, gen)
    q = torch.randn(1, 1, 4, 32, generator=gen).to(device)
    new = torch.randn(1, 1, 2, 32, generator=gen).to(device)
    seqlens = torch.tensor([3], dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="cache_seqlens"):
        flash_attn_with_kvcache(q, k_cache, v_cache, new, new, seqlens.long(), block_table)
    with pytest.raises(ValueError, match="cache_seqlens is required"):
        flash_attn_with_kvcache(q, k_cache, v_cache, new, new, None, block_table)
    with pytest.raises(TypeError, match="block_table"):
        flash_attn_with_kvcache(q, k_cache, v_cache, new, new, seqlens, block_table.long())
    with pytest.raises(ValueError, match="multiple of the number of kv heads"):
        flash_attn_with_kvcache(q[:, :, :3], k_cache, v_cache, cache_seqlens=seqlens, block_table=block_table)
    with pytest.raises(TypeError, match="share a dtype"):
        flash_attn_with_kvcache(q.half(), k_cache, v_cache, cache_seqlens=seqlens, block_table=block_table)
    with pytest.raises(ValueError, match="head_dim"):
        flash_attn_with_kvcache(q[..., :12], k_cache[..., :12], v_cache[..., :12], cache_seqlens=seqlens,
                                block_table=block_table)
    with pytest.raises(ValueError, match="batch"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens)  # paged cache without block_table


@pytest.mark.gpu
def test_bfloat16_long_cache_on_gpu(device):
    gen = torch.Generator().manual_seed(4)
    k_cache, v_cache, block_table = make_cache(2, 8192, 8, 128, torch.bfloat16, device, 256, gen)
    q = torch.randn(2, 1, 32, 128, generator=gen).to(device=device, dtype=torch.bfloat16)
    seqlens = torch.tensor([8000, 1234], dtype=torch.int32, device=device)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=block_table)
    ref = kvcache_attention_ref(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=block_table)
    low = kvcache_attention_ref(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=block_table,
                                upcast=False)
    assert_within_rule("out", out, ref, low, torch.bfloat16)


def test_custom_op_declares_cache_mutation(device):
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache, _ = make_cache(1, 40, 1, 32, torch.float32, device, None, gen)
    q = torch.randn(1, 1, 2, 32, generator=gen).to(device)
    new = torch.randn(1, 1, 1, 32, generator=gen).to(device)
    seqlens = torch.tensor([7], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.tritium.flash_attn_with_kvcache.default,
                          (q, k_cache, v_cache, new, new.clone(), seqlens, None, None, True, -1, -1, 0.0, 1),
                          test_utils=("test_schema", "test_faketensor"))


def test_traces_under_torch_compile(device):
    # The in-place cache append must survive functionalization: the compiled call updates the cache.
    gen = torch.Generator().manual_seed(6)
    k_cache, v_cache, _ = make_cache(1, 64, 2, 32, torch.float32, device, None, gen)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    q = torch.randn(1, 1, 4, 32, generator=gen).to(device)
    k_new = torch.randn(1, 1, 2, 32, generator=gen).to(device)
    v_new = torch.randn(1, 1, 2, 32, generator=gen).to(device)
    seqlens = torch.tensor([10], dtype=torch.int32, device=device)
    step = torch.compile(lambda *args: flash_attn_with_kvcache(*args, cache_seqlens=seqlens),
                         backend="aot_eager", fullgraph=True)
    out = step(q, k_cache, v_cache, k_new, v_new)
    ref = flash_attn_with_kvcache(q, ref_k, ref_v, k_new, v_new, cache_seqlens=seqlens)
    torch.testing.assert_close(out, ref)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def test_reference_paged_path_works_outside_inference_mode_after_inside():
    # The one-token path caches gather buffers and its index per thread; made under inference_mode (an
    # engine step) they cannot be written outside it (a test, a user's own loop): each mode gets its own.
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache, block_table = make_cache(3, 64, 2, 32, torch.float32, "cpu", 16, gen)
    q = torch.randn(3, 1, 4, 32, generator=gen)
    k_new, v_new = (torch.randn(3, 1, 2, 32, generator=gen) for _ in range(2))
    seqlens = torch.tensor([5, 20, 33], dtype=torch.int32)
    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
    with torch.inference_mode():
        inside = kvcache_attention_ref(q, *caches[0], k_new, v_new, cache_seqlens=seqlens, block_table=block_table)
    outside = kvcache_attention_ref(q, *caches[1], k_new, v_new, cache_seqlens=seqlens, block_table=block_table)
    torch.testing.assert_close(outside, inside.clone())
    assert torch.equal(caches[0][0], caches[1][0])


@pytest.mark.parametrize("cache_lens", [[0, 15, 32, 37], [37, 32, 15, 0]])  # the second: longest first
@pytest.mark.parametrize("num_heads, num_kv_heads, page_size, dtype", [
    (6, 2, 16, torch.float32), (4, 1, 8, torch.float32), (6, 2, 16, torch.bfloat16)])
def test_reference_one_token_paged_path_equals_the_general_path(num_heads, num_kv_heads, page_size, dtype,
                                                                cache_lens, monkeypatch):
    # The reference's one-new-token paged path (block gather, block-diagonal query, row buckets) must give
    # what its general path gives (return_lse=True takes that one): outputs and cache writes, rows of 0
    # keys, keys ending on a block boundary and rows shorter than their table included.
    from tritium.kernels import decode

    monkeypatch.setattr(decode, "DECODE_BUCKET_KEYS", 0)  # any saving splits: rows longest first get 2 buckets
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache, block_table = make_cache(len(cache_lens), 64, num_kv_heads, 32, dtype, "cpu", page_size, gen)
    original_k = k_cache.clone()
    q = torch.randn(len(cache_lens), 1, num_heads, 32, generator=gen).to(dtype)
    k_new, v_new = (torch.randn(len(cache_lens), 1, num_kv_heads, 32, generator=gen).to(dtype) for _ in range(2))
    seqlens = torch.tensor(cache_lens, dtype=torch.int32)
    general_k, general_v = k_cache.clone(), v_cache.clone()
    fast = kvcache_attention_ref(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, block_table=block_table)
    buckets = decode._REF_INDEX[0][-1].buckets
    assert len(buckets) == (2 if cache_lens[0] > cache_lens[-1] else 1)
    general, _ = kvcache_attention_ref(q, general_k, general_v, k_new, v_new, cache_seqlens=seqlens,
                                       block_table=block_table, return_lse=True)
    assert fast.shape == q.shape and fast.dtype == dtype
    torch.testing.assert_close(fast, general, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-5)
    assert torch.equal(k_cache, general_k) and torch.equal(v_cache, general_v)
    assert not torch.equal(k_cache, original_k)  # the new keys were written
