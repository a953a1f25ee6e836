"""SwiGLU activation and the recomputing SwiGLU MLP vs PyTorch references."""
import pytest
import torch
from kernel_tolerances import assert_close_rule, dtype_params

import tritium.kernels.mlp as swiglu_mod
from tritium.kernels.mlp import swiglu, swiglu_mlp, swiglu_mlp_ref, swiglu_ref


def _grad_check(fn, ref_fn, inputs, dtype, names, seed):
    gen = torch.Generator().manual_seed(seed)
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    present = [t for t in leaves if t is not None]
    out = fn(*leaves)
    dy = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, present, dy)

    def run_ref(cast):
        ref_leaves = [cast(t).detach().requires_grad_() if t is not None else None for t in inputs]
        ref_present = [t for t in ref_leaves if t is not None]
        ref_out = ref_fn(*ref_leaves)
        return ref_out, torch.autograd.grad(ref_out, ref_present, dy.to(ref_out.dtype))

    ref, ref_grads = run_ref(lambda t: t)
    ref32, ref32_grads = run_ref(lambda t: t.float())
    assert out.dtype == ref.dtype
    assert_close_rule("out", out, ref32, ref, dtype)
    for name, a, b, b32 in zip(names, grads, ref_grads, ref32_grads):
        assert_close_rule(name, a, b32, b, dtype)


@pytest.mark.parametrize("dtype", dtype_params(cpu_bf16=True))
@pytest.mark.parametrize("shape", [(1,), (7, 123), (2, 3, 300)])
def test_swiglu_matches_reference(shape, dtype, device, launches):
    gen = torch.Generator().manual_seed(len(shape))
    gate = (3 * torch.randn(shape, generator=gen)).to(device, dtype)
    up = torch.randn(shape, generator=gen).to(device, dtype)
    _grad_check(swiglu, swiglu_ref, [gate, up], dtype, ["dgate", "dup"], seed=1)
    launches.require("_swiglu_fwd_kernel", "_swiglu_bwd_kernel")


def test_swiglu_on_strided_halves_of_a_fused_projection(device, launches):
    gen = torch.Generator().manual_seed(2)
    gate_up = torch.randn(3, 5, 2 * 77, generator=gen).to(device)
    gate, up = gate_up[..., :77], gate_up[..., 77:]  # row-strided views, used without copies
    assert not gate.is_contiguous()
    _grad_check(swiglu, swiglu_ref, [gate, up], torch.float32, ["dgate", "dup"], seed=3)
    launches.require("_swiglu_fwd_kernel", "_swiglu_bwd_kernel")


@pytest.mark.parametrize("dtype", dtype_params(cpu_bf16=True))
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("recompute", [True, False])
def test_swiglu_mlp_matches_reference(fused, recompute, dtype, device, launches):
    gen = torch.Generator().manual_seed(4)
    hidden, ffn = 24, 40
    x = torch.randn(2, 7, hidden, generator=gen).to(device, dtype)
    w_gate = (torch.randn((2 if fused else 1) * ffn, hidden, generator=gen) / hidden ** 0.5).to(device, dtype)
    w_up = None if fused else (torch.randn(ffn, hidden, generator=gen) / hidden ** 0.5).to(device, dtype)
    w_down = (torch.randn(hidden, ffn, generator=gen) / ffn ** 0.5).to(device, dtype)
    names = ["dx", "dw_gate"] + ([] if fused else ["dw_up"]) + ["dw_down"]
    _grad_check(lambda *a: swiglu_mlp(*a, recompute=recompute), swiglu_mlp_ref, [x, w_gate, w_up, w_down],
                dtype, names, seed=5)
    launches.require("_swiglu_fwd_kernel", "_swiglu_bwd_kernel")


def test_swiglu_mlp_recompute_saves_only_the_input(device):
    """Activation memory: with recompute, autograd keeps x and the weights, nothing ffn-sized."""
    hidden, ffn, tokens = 16, 64, 10
    weights = [torch.randn(*shape, device=device, requires_grad=True)
               for shape in ((ffn, hidden), (ffn, hidden), (hidden, ffn))]  # gate, up, down
    x = torch.randn(tokens, hidden, device=device, requires_grad=True)
    params = {p.data_ptr() for p in weights}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        swiglu_mlp(x, *weights, recompute=True).sum().backward()
    activations = [t for t in saved if t.data_ptr() not in params]
    assert sum(t.numel() for t in activations) == tokens * hidden
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        swiglu_mlp(x, *weights, recompute=False).sum()
    assert sum(t.numel() for t in saved if t.data_ptr() not in params) >= 3 * tokens * ffn


def test_swiglu_errors_name_the_argument(device):
    g = torch.randn(3, 8, device=device)
    with pytest.raises(ValueError, match="gate and up"):
        swiglu(g, torch.randn(3, 9, device=device))
    with pytest.raises(TypeError, match="up must have dtype"):
        swiglu(g, g.half())
    with pytest.raises(ValueError, match="w_down"):
        swiglu_mlp(torch.randn(2, 8, device=device), torch.randn(6, 8, device=device),
                   torch.randn(6, 8, device=device), torch.randn(8, 5, device=device))


def test_swiglu_custom_ops_pass_opcheck(device):
    g, u = torch.randn(4, 33, device=device), torch.randn(4, 33, device=device)
    torch.library.opcheck(swiglu_mod._swiglu_fwd_op, (g, u))
    torch.library.opcheck(swiglu_mod._swiglu_bwd_op, (torch.randn_like(g), g, u))


@pytest.mark.gpu
def test_swiglu_mlp_under_torch_compile(device):
    gate_up = torch.randn(1024, 256, device=device, dtype=torch.bfloat16) / 16  # fused (2 * ffn, hidden)
    down = torch.randn(256, 512, device=device, dtype=torch.bfloat16) / 23
    x = torch.randn(4, 32, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
    out = torch.compile(lambda x: swiglu_mlp(x, gate_up, None, down), fullgraph=True)(x)
    ref = swiglu_mlp_ref(x, gate_up, None, down)
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    assert x.grad is not None


def test_swiglu_falls_back_to_reference_without_triton(monkeypatch, device, launches):
    monkeypatch.setattr(swiglu_mod, "can_use_triton", lambda *tensors: False)
    monkeypatch.setattr(swiglu_mod, "_swiglu_fwd_op", None)  # any kernel use would fail loudly
    monkeypatch.setattr(swiglu_mod, "_swiglu_bwd_op", None)
    gen = torch.Generator().manual_seed(9)
    g, u = torch.randn(4, 33, generator=gen).to(device), torch.randn(4, 33, generator=gen).to(device)
    torch.testing.assert_close(swiglu(g, u), swiglu_ref(g, u))
    x = torch.randn(3, 8, generator=gen).to(device)
    w_gu, w_d = torch.randn(12, 8, generator=gen).to(device), torch.randn(8, 6, generator=gen).to(device)
    # The recomputing autograd path still works on the PyTorch activation.
    _grad_check(swiglu_mlp, swiglu_mlp_ref, [x, w_gu, None, w_d], torch.float32, ["dx", "dw_gate_up", "dw_down"],
                seed=10)
    assert not launches, dict(launches)
