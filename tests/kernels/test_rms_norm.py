"""RMSNorm kernel vs the PyTorch reference: forward and every gradient, odd sizes, every flag."""
import pytest
import torch
from kernel_tolerances import assert_close_rule, dtype_params

import tritium.kernels.norm as rms_mod
from tritium.kernels.norm import rms_norm, rms_norm_ref

SHAPES = [(1, 1), (7, 123), (2, 3, 3000), (1, 5000)]


def _inputs(shape, dtype, device, seed, residual, weight_dtype=None):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = torch.randn(shape, generator=g).to(device, dtype)
    w = (1 + 0.3 * torch.randn(n, generator=g)).to(device, weight_dtype or dtype)
    r = torch.randn(shape, generator=g).to(device, dtype) if residual else None
    return x, w, r


def _run(fn, x, w, r, grads):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    r = r.detach().requires_grad_() if r is not None else None
    out = fn(x, w, 1e-6, r)
    outs = out if isinstance(out, tuple) else (out,)
    inputs = [x, w] + ([r] if r is not None else [])
    d = torch.autograd.grad(outs, inputs, [g.to(o.dtype) for g, o in zip(grads, outs)])
    return outs, d


def _check(x, w, r, dtype, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    n_out = 2 if r is not None else 1
    grads = [torch.randn(x.shape, generator=gen).to(x.device) for _ in range(n_out)]
    outs, d = _run(rms_norm, x, w, r, grads)
    refs, d_ref = _run(rms_norm_ref, x, w, r, grads)
    up = lambda t: t.float() if t is not None else None
    refs32, d_ref32 = _run(rms_norm_ref, up(x), up(w), up(r), grads)
    names = ["y", "new_residual"][:n_out]
    for name, o, ref, ref32 in zip(names, outs, refs, refs32):
        assert o.dtype == ref.dtype
        assert_close_rule(name, o, ref32, ref, dtype)
    for name, a, b, b32 in zip(["dx", "dweight", "dresidual"], d, d_ref, d_ref32):
        assert a.dtype == b.dtype
        assert_close_rule(name, a, b32, b, dtype)


@pytest.mark.parametrize("dtype", dtype_params(cpu_bf16=True))
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(shape, residual, dtype, device, launches):
    x, w, r = _inputs(shape, dtype, device, seed=sum(shape) + residual, residual=residual)
    _check(x, w, r, dtype, seed=3)
    launches.require("_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel")


@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_streams_rows_longer_than_a_block(monkeypatch, residual, device, launches):
    # Force 128-wide blocks so the multi-block (hidden up to 65536) path runs on a small row.
    monkeypatch.setattr(rms_mod, "_block_config", lambda n: (128, 4))
    x, w, r = _inputs((5, 300), torch.float32, device, seed=11, residual=residual)
    _check(x, w, r, torch.float32, seed=5)
    x, w, r = _inputs((3, 257), torch.float16, device, seed=12, residual=residual)
    _check(x, w, r, torch.float16, seed=6)
    launches.require("_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel")


def test_rms_norm_largest_hidden(device, launches):
    x, w, r = _inputs((2, 65536), torch.float32, device, seed=13, residual=True)
    _check(x, w, r, torch.float32, seed=7)
    launches.require("_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel")


def test_rms_norm_weight_dtype_promotes_like_hf(device, launches):
    # fp16 activations with an fp32 weight: HF returns fp32 (weight * normed.to(fp16)).
    x, w, _ = _inputs((4, 96), torch.float16, device, seed=14, residual=False, weight_dtype=torch.float32)
    y = rms_norm(x, w)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, rms_norm_ref(x, w), atol=1e-6, rtol=1e-6)
    launches.require("_rms_norm_fwd_kernel")


def test_rms_norm_non_contiguous_and_empty(device, launches):
    x = torch.randn(6, 4, 40, device=device).transpose(0, 1)  # non-contiguous leading dims
    w = torch.randn(40, device=device)
    torch.testing.assert_close(rms_norm(x, w), rms_norm_ref(x, w))
    x_strided = torch.randn(8, 80, device=device)[:, ::2]  # last dim stride 2 -> copied
    w2 = torch.randn(40, device=device)
    torch.testing.assert_close(rms_norm(x_strided, w2), rms_norm_ref(x_strided, w2))
    empty = torch.randn(0, 16, device=device)
    assert rms_norm(empty, torch.ones(16, device=device)).shape == (0, 16)
    assert launches["_rms_norm_fwd_kernel"] == 2  # the empty input launches nothing


def test_rms_norm_errors_name_the_argument(device):
    x = torch.randn(3, 8, device=device)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(9, device=device))
    with pytest.raises(TypeError, match="x must have dtype"):
        rms_norm(x.long(), torch.ones(8, device=device))
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(8, device=device), residual=torch.randn(3, 7, device=device))
    with pytest.raises(TypeError, match="residual"):
        rms_norm(x, torch.ones(8, device=device), residual=torch.randn(3, 8, device=device).half())


def test_rms_norm_custom_ops_pass_opcheck(device):
    x, w, r = _inputs((3, 40), torch.float32, device, seed=15, residual=True)
    torch.library.opcheck(rms_mod._rms_norm_fwd_op, (x, w, r, 1e-6))
    torch.library.opcheck(rms_mod._rms_norm_fwd_op, (x, w, None, 1e-6))
    _, _, rstd = rms_mod.rms_norm_fwd(x, w, 1e-6, None)
    torch.library.opcheck(rms_mod._rms_norm_bwd_op, (torch.randn_like(x), x, w, rstd, torch.randn_like(x)))


@pytest.mark.gpu
def test_rms_norm_under_torch_compile(device):
    x, w, r = _inputs((4, 7, 1000), torch.bfloat16, device, seed=16, residual=True)
    x.requires_grad_()
    compiled = torch.compile(lambda a, b, c: rms_norm(a, b, 1e-6, c), fullgraph=True)
    y, new_r = compiled(x, w, r)
    y_ref, r_ref = rms_norm_ref(x, w, 1e-6, r)
    torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(new_r, r_ref)
    (y.float().sum() + new_r.float().sum()).backward()
    assert x.grad is not None


def test_rms_norm_falls_back_to_reference_without_triton(monkeypatch, device, launches):
    monkeypatch.setattr(rms_mod, "can_use_triton", lambda *tensors: False)
    monkeypatch.setattr(rms_mod, "RMSNormFunction", None)  # any kernel use would fail loudly
    x, w, r = _inputs((3, 40), torch.float32, device, seed=17, residual=True)
    y, new_r = rms_norm(x, w, 1e-6, r)
    y_ref, r_ref = rms_norm_ref(x, w, 1e-6, r)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(new_r, r_ref)
    assert not launches, dict(launches)
