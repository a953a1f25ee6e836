"""flash_attn_func / flash_attn_varlen_func against fp32 references and PyTorch SDPA.

Tolerance rule (flash-attention's): the kernel's error against the fp32 reference must be at
most twice the error of the same computation done by PyTorch in the input dtype, plus a small
atol. Shapes are few and chosen so that together they cover every feature (the interpreter is slow).
"""
import pytest
import torch
import torch.nn.functional as F

import tritium.kernels.attention as attention_mod
from tritium.kernels.attention import (
    attention_mask,
    attention_ref,
    flash_attn_func,
    flash_attn_varlen_func,
    varlen_attention_ref,
)


@pytest.fixture(autouse=True)
def _fixed_kernel_configs(monkeypatch):
    # On a GPU, one fixed config per kernel: autotuning every small test shape only costs compile time.
    monkeypatch.setenv("TRITIUM_AUTOTUNE", "0")


ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def assert_within_rule(name, got, ref_fp32, ref_same_dtype, dtype):
    """|got - ref32| <= 2 |ref_same_dtype - ref32| + atol, elementwise max over the tensor."""
    finite = torch.isfinite(ref_fp32)
    err = (got.float() - ref_fp32.float())[finite].abs().max().item()
    baseline = (ref_same_dtype.float() - ref_fp32.float())[finite].abs().max().item()
    assert err <= 2 * baseline + ATOL[dtype], (
        f"{name}: kernel err {err:.3g} vs torch {dtype} err {baseline:.3g}")


def make_qkv(batch, seqlen_q, seqlen_k, num_heads, num_kv_heads, head_dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen_q, num_heads, head_dim, generator=gen)
    k = torch.randn(batch, seqlen_k, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(batch, seqlen_k, num_kv_heads, head_dim, generator=gen)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]


def run_with_grads(fn, q, k, v, dout, **kwargs):
    out, lse = fn(q, k, v, return_lse=True, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return out, lse, grads


# (B, T, S, Hq, Hkv, D, causal, window, softcap, dtype): sparse coverage of the feature grid.
CASES = [
    (2, 17, 17, 4, 4, 64, False, (-1, -1), 0.0, torch.float16),   # MHA, odd length
    (1, 129, 129, 8, 2, 32, True, (-1, -1), 0.0, torch.float32),  # GQA 4, causal, crosses tiles
    (2, 1, 1, 8, 1, 64, True, (-1, -1), 0.0, torch.float16),      # seq 1, MQA (GQA 8)
    (2, 17, 129, 4, 1, 80, True, (-1, -1), 0.0, torch.float32),   # T < S, bottom-right causal, D=80
    (1, 129, 17, 2, 1, 96, True, (-1, -1), 0.0, torch.float16),   # T > S: empty rows, D=96
    (1, 129, 129, 2, 2, 128, False, (32, 8), 0.0, torch.float16),  # two-sided sliding window
    (1, 65, 100, 8, 1, 32, True, (16, -1), 0.0, torch.float32),   # causal + left window, GQA 8
    (1, 40, 65, 2, 2, 64, False, (-1, -1), 5.0, torch.float16),   # softcap
    (1, 33, 33, 4, 2, 80, True, (-1, -1), 3.0, torch.float32),    # softcap + causal + GQA
    (1, 33, 33, 2, 1, 256, True, (-1, -1), 0.0, torch.float16),   # D=256
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}S{}H{}/{}D{}c{}w{}sc{}-{}".format(
    *c[:8], c[8], str(c[9]).replace("torch.", "")))
def test_matches_reference(case, device, launches):
    batch, seqlen_q, seqlen_k, num_heads, num_kv_heads, head_dim, causal, window, softcap, dtype = case
    q, k, v = make_qkv(batch, seqlen_q, seqlen_k, num_heads, num_kv_heads, head_dim, dtype, device)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    kwargs = {"causal": causal, "window_size": window, "softcap": softcap}
    out, lse, grads = run_with_grads(flash_attn_func, q, k, v, dout, **kwargs)
    ref, ref_lse, ref_grads = run_with_grads(attention_ref, q, k, v, dout, **kwargs)
    low, _, low_grads = run_with_grads(lambda *a, **kw: attention_ref(*a, upcast=False, **kw), q, k, v, dout,
                                       **kwargs)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (batch, num_heads, seqlen_q)
    assert torch.isfinite(out).all()
    assert_within_rule("out", out, ref, low, dtype)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert (lse[finite] - ref_lse[finite]).abs().max() <= 1e-4
    for name, got, want, same in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        assert got.shape == want.shape and got.dtype == dtype
        assert_within_rule(name, got, want, same, dtype)
    launches.require("_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")


@pytest.mark.parametrize("causal,seqlen_q,seqlen_k,num_kv_heads", [(False, 17, 40, 2), (True, 40, 40, 1)])
def test_matches_sdpa(causal, seqlen_q, seqlen_k, num_kv_heads, device, launches):
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 4, num_kv_heads, 64, torch.float32, device, seed=3)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(device)
    out, _, grads = run_with_grads(flash_attn_func, q, k, v, dout, causal=causal)
    # SDPA's is_causal is top-left aligned; pass flash-attn's bottom-right mask explicitly.
    mask = attention_mask(seqlen_q, seqlen_k, causal, (-1, -1), device=device)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, enable_gqa=True).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    launches.require("_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")


def test_random_masks_sweep(device, launches):
    # The kernels split key/query tiles into masked edges and an unmasked interior; random
    # (T, S, causal, window) draws check that split against the reference, forward and backward.
    gen = torch.Generator().manual_seed(21)
    for _ in range(6):
        seqlen_q, seqlen_k = (int(x) for x in torch.randint(1, 90, (2,), generator=gen))
        causal = bool(torch.randint(0, 2, (1,), generator=gen))
        window = tuple(int(x) for x in torch.randint(-1, 40, (2,), generator=gen))
        q, k, v = make_qkv(1, seqlen_q, seqlen_k, 2, 1, 16, torch.float32, device, seed=seqlen_q * seqlen_k)
        kwargs = {"causal": causal, "window_size": window}
        dout = torch.randn(q.shape, generator=gen).to(device)
        out, lse, grads = run_with_grads(flash_attn_func, q, k, v, dout, **kwargs)
        ref, ref_lse, ref_grads = run_with_grads(attention_ref, q, k, v, dout, **kwargs)
        msg = f"T={seqlen_q} S={seqlen_k} causal={causal} window={window}"
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=msg)
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5, msg=msg)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=msg)
    assert launches["_attn_fwd_kernel"] == 6 and launches["_attn_bwd_dq_kernel"] == 6, dict(launches)


def test_rows_without_keys_are_zero(device, launches):
    # Causal with T > S: the first T - S queries see no key. flash-attn gives 0 and lse = +inf.
    q, k, v = make_qkv(1, 20, 6, 2, 1, 32, torch.float32, device, seed=5)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.all(out[:, :14] == 0) and torch.all(torch.isinf(lse[:, :, :14]))
    assert torch.isfinite(lse[:, :, 14:]).all() and (out[:, 14:].abs().sum() > 0)
    assert torch.all(dq[:, :14] == 0)
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    # A left window can empty rows too when it points before the sequence: T > S, window (2, 0).
    out_w = flash_attn_func(q, k, v, window_size=(2, 0))
    torch.testing.assert_close(out_w, attention_ref(q, k, v, window_size=(2, 0)), atol=1e-5, rtol=1e-5)
    launches.require("_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")


def test_noncontiguous_inputs_and_scale(device, launches):
    # q, k, v as views of a fused projection (B, T, 3, H, D): strided along T, not contiguous.
    gen = torch.Generator().manual_seed(6)
    qkv = torch.randn(2, 23, 3, 4, 32, generator=gen).to(device).requires_grad_()
    q, k, v = qkv.unbind(2)
    out = flash_attn_func(q, k, v, causal=True, softmax_scale=0.3)
    ref = attention_ref(q, k, v, causal=True, softmax_scale=0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(out.square().sum(), qkv)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), qkv)
    torch.testing.assert_close(grad, ref_grad, atol=1e-4, rtol=1e-4)
    launches.require("_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")


def test_backward_kernels_use_no_atomics():
    """Determinism by construction (module docstring): no kernel accumulates with atomics, whose
    order varies between runs. Under the interpreter programs run one after another, so a run-twice
    comparison cannot fail on a CPU; this static check can (the GPU test below runs the real thing)."""
    import inspect

    source = inspect.getsource(attention_mod)
    assert "atomic" not in source.replace("no atomics", "").replace("atomics,", ""), (
        "attention.py uses atomics: the backward is no longer deterministic by construction")


@pytest.mark.gpu
def test_backward_is_deterministic(device, launches):
    # Many programs in flight at once (GQA 4, 4 sequences, 1000 keys): atomics would reorder sums here.
    q, k, v = make_qkv(4, 1000, 1000, 16, 4, 64, torch.float16, device, seed=7)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(8)).to(device=device, dtype=q.dtype)
    first = torch.autograd.grad(flash_attn_func(q, k, v, causal=True), (q, k, v), dout)
    for _ in range(3):
        again = torch.autograd.grad(flash_attn_func(q, k, v, causal=True, deterministic=True), (q, k, v), dout)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    launches.require("_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")


def _packed(lengths, num_heads, head_dim, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(lengths), num_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return x.requires_grad_(), cu


@pytest.mark.parametrize("lens_q,lens_k,causal,window,dtype", [
    ([5, 17, 1, 40], [5, 17, 1, 40], True, (-1, -1), torch.float16),  # packed training docs
    ([3, 30, 9], [12, 30, 33], True, (8, -1), torch.float32),         # T != S per doc + window
    ([7, 20], [20, 7], False, (-1, -1), torch.float32),               # non-causal, uneven both ways
])
def test_varlen_equals_per_document(lens_q, lens_k, causal, window, dtype, device, launches):
    num_heads, num_kv_heads, head_dim = 4, 2, 32
    q, cu_q = _packed(lens_q, num_heads, head_dim, dtype, device, seed=9)
    k, cu_k = _packed(lens_k, num_kv_heads, head_dim, dtype, device, seed=10)
    v, _ = _packed(lens_k, num_kv_heads, head_dim, dtype, device, seed=11)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(12)).to(device=device, dtype=dtype)
    kwargs = {"causal": causal, "window_size": window}
    max_q, max_k = max(lens_q), max(lens_k)
    out, lse = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert lse.shape == (num_heads, sum(lens_q))
    ref, ref_lse = varlen_attention_ref(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True, **kwargs)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    low = varlen_attention_ref(q, k, v, cu_q, cu_k, max_q, max_k, upcast=False, **kwargs)
    assert_within_rule("out", out, ref, low, dtype)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
    # Each document alone through the dense kernel gives the same rows (no cross-document leakage).
    for b in range(len(lens_q)):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        alone = flash_attn_func(q[None, qs], k[None, ks], v[None, ks], **kwargs)[0]
        torch.testing.assert_close(out[qs], alone, atol=1e-6, rtol=0)
    atol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=1e-2)
    launches.require("_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")


def test_varlen_rows_past_cu_seqlens_are_zero_with_zero_grads(device, launches):
    """Issue 15 case 2: 48 packed rows, cu_seqlens [0, 15, 40]; rows 40-47 belong to no sequence.
    Kernel and reference both return (48, 4, 32) with those rows zero, lse +inf, and zero gradient;
    projection-weight gradients are finite and equal to the reference's."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 64, generator=gen).to(device)
    weights = [(torch.randn(128, 64, generator=gen) / 8).to(device) for _ in range(3)]
    g = torch.randn(40, 4, 32, generator=gen).to(device)
    cu = torch.tensor([0, 15, 40], dtype=torch.int32, device=device)

    def run(fn):
        ws = [w.clone().requires_grad_() for w in weights]
        q, k, v = ((x @ w.t()).view(48, 4, 32) for w in ws)
        for t in (q, k, v):
            t.retain_grad()
        out, lse = fn(q, k, v, cu, cu, 25, 25, causal=True, return_lse=True)
        (out[:40] * g).sum().backward()
        return out, lse, [w.grad for w in ws], [t.grad for t in (q, k, v)]

    out, lse, dw, dqkv = run(flash_attn_varlen_func)
    launches.require("_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
    ref, ref_lse, ref_dw, ref_dqkv = run(varlen_attention_ref)
    assert out.shape == ref.shape == (48, 4, 32)
    assert torch.equal(out[40:], torch.zeros_like(out[40:])) and torch.equal(ref[40:], torch.zeros_like(ref[40:]))
    assert torch.isinf(lse[:, 40:]).all() and torch.isinf(ref_lse[:, 40:]).all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name, got, want in zip(("dq", "dk", "dv"), dqkv, ref_dqkv):
        assert torch.count_nonzero(got[40:]) == 0, name
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=name)
    for name, got, want in zip(("dW_q", "dW_k", "dW_v"), dw, ref_dw):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=name)


def test_varlen_rows_before_the_first_sequence_are_zero(device, launches):
    q, _ = _packed([20], 2, 16, torch.float32, device, seed=30)
    cu = torch.tensor([5, 12, 16], dtype=torch.int32, device=device)  # rows 0-4 and 16-19: no sequence
    out, lse = flash_attn_varlen_func(q, q, q, cu, cu, 7, 7, return_lse=True)
    ref, ref_lse = varlen_attention_ref(q, q, q, cu, cu, 7, 7, return_lse=True)
    assert out.shape == ref.shape == q.shape
    assert torch.count_nonzero(out[:5]) == 0 and torch.count_nonzero(out[16:]) == 0
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    launches.require("_attn_fwd_kernel")


@pytest.mark.parametrize("cu,max_len,message", [
    ([0, 15, 50], 35, "cu_seqlens_q ends at 50 but the packed tensor has only 48 rows"),
    ([0, 30, 20], 30, "cu_seqlens_q must start at >= 0 and never decrease"),
    ([-1, 20], 30, "cu_seqlens_q must start at >= 0"),
    ([0, 15, 40], 20, "cu_seqlens_q holds a sequence of 25 rows, longer than its max_seqlen 20"),
])
def test_varlen_rejects_cu_seqlens_that_leave_rows_unwritten_or_read_out_of_bounds(cu, max_len, message,
                                                                                   device):
    q = torch.randn(48, 2, 16, device=device)
    cu = torch.tensor(cu, dtype=torch.int32, device=device)
    for fn in (flash_attn_varlen_func, varlen_attention_ref):
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            fn(q, q, q, cu, cu, max_len, max_len)


def test_reference_fallback_when_triton_unavailable(device, monkeypatch, launches):
    q, k, v = make_qkv(1, 9, 9, 2, 1, 32, torch.float32, device, seed=13)
    monkeypatch.setattr(attention_mod, "can_use_triton", lambda *tensors: False)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
    ref, ref_lse = attention_ref(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    out.sum().backward()  # the reference path is differentiable too
    assert q.grad is not None
    assert not launches, dict(launches)


def test_bad_inputs(device):
    q, k, v = make_qkv(1, 8, 8, 6, 4, 32, torch.float32, device)
    with pytest.raises(ValueError, match="multiple of the number of kv heads"):
        flash_attn_func(q, k, v)
    q, k, v = make_qkv(1, 8, 8, 2, 1, 20, torch.float32, device)
    with pytest.raises(ValueError, match="head_dim"):
        flash_attn_func(q, k, v)
    q, k, v = make_qkv(1, 8, 8, 2, 1, 32, torch.float32, device)
    with pytest.raises(TypeError, match="share a dtype"):
        flash_attn_func(q, k.half(), v)
    with pytest.raises(ValueError, match="one device"):
        flash_attn_func(q, k.to("meta"), v.to("meta"))
    with pytest.raises(NotImplementedError, match="dropout"):
        flash_attn_func(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="window_size"):
        flash_attn_func(q, k, v, window_size=(-2, 0))
    with pytest.raises(ValueError, match=r"\(B, T, H, D\)"):
        flash_attn_func(q[0], k[0], v[0])
    cu = torch.tensor([0, 8], dtype=torch.int64, device=device)
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        flash_attn_varlen_func(q[0], k[0], v[0], cu, cu.int(), 8, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_bfloat16_on_gpu(causal, device):
    q, k, v = make_qkv(2, 257, 300, 8, 2, 128, torch.bfloat16, device, seed=14)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(15)).to(device=device, dtype=q.dtype)
    out, _, grads = run_with_grads(flash_attn_func, q, k, v, dout, causal=causal)
    ref, _, ref_grads = run_with_grads(attention_ref, q, k, v, dout, causal=causal)
    low, _, low_grads = run_with_grads(lambda *a, **kw: attention_ref(*a, upcast=False, **kw), q, k, v, dout,
                                       causal=causal)
    assert_within_rule("out", out, ref, low, torch.bfloat16)
    for name, got, want, same in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        assert_within_rule(name, got, want, same, torch.bfloat16)


def test_custom_op_registration(device):
    # torch.library checks: schema, fake (meta) kernel shapes, and that autograd goes through the op.
    q, k, v = make_qkv(1, 9, 9, 2, 1, 32, torch.float32, device, seed=16)
    args = (q.detach().reshape(9, 2, 32), k.detach().reshape(9, 1, 32), v.detach().reshape(9, 1, 32),
            None, None, 1, 9, 9, None, True, -1, 0, 0.0)
    torch.library.opcheck(torch.ops.tritium.flash_attn_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_traces_under_torch_compile(device):
    # aot_eager: dynamo + AOTAutograd trace the custom ops (no C++/GPU codegen needed on CPU).
    q, k, v = make_qkv(1, 20, 20, 4, 2, 32, torch.float32, device, seed=18)
    compiled = torch.compile(lambda q, k, v: flash_attn_func(q, k, v, causal=True).square().sum(),
                             backend="aot_eager", fullgraph=True)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_loss = flash_attn_func(q, k, v, causal=True).square().sum()
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    torch.testing.assert_close(loss, ref_loss)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu
def test_torch_compile_on_gpu(device):
    q, k, v = make_qkv(2, 128, 128, 8, 2, 64, torch.float16, device, seed=17)
    compiled = torch.compile(lambda q, k, v: flash_attn_func(q, k, v, causal=True).float().square().sum(),
                             fullgraph=True)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_loss = flash_attn_func(q, k, v, causal=True).float().square().sum()
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    torch.testing.assert_close(loss, ref_loss)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
