"""RoPE kernel vs the PyTorch reference (HF rotate_half layout), plus the cos/sin builder vs HF."""
import pytest
import torch
from kernel_tolerances import assert_close_rule, dtype_params

import tritium.kernels.rope as rope_mod
from tritium.kernels.rope import apply_rope, apply_rope_ref, rope_cos_sin

# (B, T, Hq, Hkv, D): single token, GQA, non-power-of-two half dim (D/2 = 3), MQA
SHAPES = [(1, 1, 1, 1, 2), (2, 7, 6, 2, 16), (1, 5, 4, 4, 6), (2, 3, 8, 1, 32)]
COS_LAYOUTS = ["shared", "batched", "batch1"]


def _cos_sin(layout, B, P, D, device, dtype=torch.float32):
    # Table row 0 is position 3, not 0: position 0 is the identity rotation (cos 1, sin 0), which a
    # kernel that ignores cos/sin would pass (single-token shapes see only row 0).
    cos, sin = rope_cos_sin(P + 3, D, theta=100.0, device=device, dtype=dtype)
    cos, sin = cos[3:], sin[3:]
    if layout == "batched":  # (B, P, D), different rows per sequence (as HF's rotary returns them)
        shift = torch.arange(B, device=device)[:, None]
        idx = (torch.arange(P, device=device)[None] + shift) % P
        return cos[idx], sin[idx]
    if layout == "batch1":
        return cos[None], sin[None]
    return cos, sin


def _check(q, k, cos, sin, pos, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    dq = torch.randn(q.shape, generator=gen).to(q.device, dtype)
    dk = torch.randn(k.shape, generator=gen).to(q.device, dtype)

    def run(fn, cast):
        qq, kk = cast(q).detach().requires_grad_(), cast(k).detach().requires_grad_()
        outs = fn(qq, kk, cos, sin, pos)
        grads = torch.autograd.grad(outs, [qq, kk], [dq.to(qq.dtype), dk.to(qq.dtype)])
        return outs, grads

    outs, grads = run(apply_rope, lambda t: t)
    assert not torch.allclose(outs[0].float(), q.float()), "rotation is the identity: the check is blind"
    refs, ref_grads = run(apply_rope_ref, lambda t: t)
    refs32, ref32_grads = run(apply_rope_ref, lambda t: t.float())
    for name, a, b, b32 in zip(["q", "k", "dq", "dk"], outs + grads, refs + ref_grads, refs32 + ref32_grads):
        assert a.dtype == b.dtype
        assert_close_rule(name, a, b32, b, dtype)


@pytest.mark.parametrize("dtype", dtype_params(cpu_bf16=True))
@pytest.mark.parametrize("layout", COS_LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_rope_matches_reference(shape, layout, dtype, device, launches):
    B, T, Hq, Hkv, D = shape
    gen = torch.Generator().manual_seed(B * 100 + T)
    q = torch.randn(B, T, Hq, D, generator=gen).to(device, dtype)
    k = torch.randn(B, T, Hkv, D, generator=gen).to(device, dtype)
    cos, sin = _cos_sin(layout, B, T + 3, D, device)
    _check(q, k, cos, sin, None, dtype, seed=1)
    launches.require("_rope_kernel")
    assert launches["_rope_kernel"] == 2  # forward and backward


@pytest.mark.parametrize("layout", COS_LAYOUTS)
def test_rope_with_position_ids(layout, device, launches):
    B, T, Hq, Hkv, D, P = 2, 5, 4, 2, 16, 40
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(B, T, Hq, D, generator=gen).to(device)
    k = torch.randn(B, T, Hkv, D, generator=gen).to(device)
    cos, sin = _cos_sin(layout, B, P, D, device)
    pos = torch.randint(0, P, (B, T), generator=gen).to(device)  # decode offsets / packed documents
    _check(q, k, cos, sin, pos, torch.float32, seed=2)
    # A decode step at offset 17 equals rows 17.. of a full-sequence rotation.
    offset = torch.full((B, 1), 17, device=device)
    q1, k1 = apply_rope(q[:, :1], k[:, :1], cos, sin, offset)
    full_q, full_k = apply_rope_ref(q[:, :1].expand(B, 18, Hq, D).contiguous(),
                                    k[:, :1].expand(B, 18, Hkv, D).contiguous(), cos, sin)
    torch.testing.assert_close(q1, full_q[:, 17:18])
    torch.testing.assert_close(k1, full_k[:, 17:18])
    launches.require("_rope_kernel")


def test_rope_on_hf_transposed_views(device, launches):
    # HF keeps q as (B, H, T, D); the kernel takes the (B, T, H, D) transpose without copying.
    B, Hq, Hkv, T, D = 2, 4, 2, 6, 8
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(B, Hq, T, D, generator=gen).to(device).transpose(1, 2)
    k = torch.randn(B, Hkv, T, D, generator=gen).to(device).transpose(1, 2)
    cos, sin = _cos_sin("batched", B, T, D, device)
    _check(q, k, cos, sin, None, torch.float32, seed=3)
    launches.require("_rope_kernel")


def test_rope_inplace(device, launches):
    B, T, Hq, Hkv, D = 2, 4, 3, 1, 8
    q = torch.randn(B, T, Hq, D, device=device)
    k = torch.randn(B, T, Hkv, D, device=device)
    cos, sin = rope_cos_sin(T, D, device=device)
    q_ref, k_ref = apply_rope_ref(q, k, cos, sin)
    q2, k2 = q.clone(), k.clone()
    out_q, out_k = apply_rope(q2, k2, cos, sin, inplace=True)
    assert out_q.data_ptr() == q2.data_ptr() and out_k.data_ptr() == k2.data_ptr()
    torch.testing.assert_close(q2, q_ref)
    torch.testing.assert_close(k2, k_ref)
    launches.require("_rope_kernel")
    with pytest.raises(ValueError, match="inplace"):
        apply_rope(q.clone().requires_grad_(), k, cos, sin, inplace=True)


def _hf_inv_freq(kind, scaling, head_dim, theta, max_pos, seq_len):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                                   max_position_embeddings=max_pos, rope_theta=theta,
                                   rope_scaling=dict(scaling, rope_type=kind) if kind != "default" else None)
    if kind == "default":
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv
    inv, _ = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu", seq_len)
    return inv


@pytest.mark.parametrize("kind,scaling,seq_len", [
    ("default", {}, 64),
    ("linear", {"factor": 4.0}, 64),
    ("dynamic", {"factor": 2.0, "original_max_position_embeddings": 32}, 64),
    ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}, 64),
])
def test_rope_cos_sin_matches_hf_scaling(kind, scaling, seq_len):
    head_dim, theta = 32, 5000.0
    max_pos = scaling.get("original_max_position_embeddings", 64)
    inv = _hf_inv_freq(kind, scaling, head_dim, theta, max_pos, seq_len).float()
    freqs = torch.outer(torch.arange(seq_len).float(), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = rope_cos_sin(seq_len, head_dim, theta, dict(scaling, rope_type=kind))
    torch.testing.assert_close(cos, emb.cos(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sin, emb.sin(), atol=1e-5, rtol=1e-5)


def test_rope_errors_name_the_argument(device):
    q, k = torch.randn(1, 4, 2, 8, device=device), torch.randn(1, 4, 1, 8, device=device)
    cos, sin = rope_cos_sin(4, 8, device=device)
    with pytest.raises(ValueError, match="k must be"):
        apply_rope(q, torch.randn(1, 4, 1, 6, device=device), cos, sin)
    with pytest.raises(ValueError, match="even"):
        apply_rope(q[..., :7], k[..., :7], cos[:, :7], sin[:, :7])
    with pytest.raises(ValueError, match="cover"):
        apply_rope(q, k, cos[:2], sin[:2])
    with pytest.raises(ValueError, match="position_ids"):
        apply_rope(q, k, cos, sin, torch.zeros(1, 3, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="scaling"):
        rope_cos_sin(4, 8, scaling={"rope_type": "yarn", "factor": 2.0})


def test_rope_custom_op_passes_opcheck(device):
    q, k = torch.randn(2, 3, 2, 8, device=device), torch.randn(2, 3, 1, 8, device=device)
    cos, sin = rope_cos_sin(6, 8, device=device)
    torch.library.opcheck(rope_mod._rope_op, (q, k, cos, sin, None, False))
    torch.library.opcheck(rope_mod._rope_op, (q, k, cos, sin, torch.randint(0, 6, (2, 3), device=device), True))


@pytest.mark.gpu
def test_rope_under_torch_compile(device):
    q = torch.randn(2, 64, 8, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 64, 2, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_cos_sin(64, 128, device=device)
    out_q, out_k = torch.compile(apply_rope, fullgraph=True)(q, k, cos, sin)
    ref_q, ref_k = apply_rope_ref(q, k, cos, sin)
    torch.testing.assert_close(out_q, ref_q)
    torch.testing.assert_close(out_k, ref_k)
    (out_q.float().sum() + out_k.float().sum()).backward()
    assert q.grad is not None and k.grad is not None


def test_rope_falls_back_to_reference_without_triton(monkeypatch, device, launches):
    monkeypatch.setattr(rope_mod, "can_use_triton", lambda *tensors: False)
    monkeypatch.setattr(rope_mod, "RoPEFunction", None)  # any kernel use would fail loudly
    q, k = torch.randn(2, 3, 2, 8, device=device), torch.randn(2, 3, 1, 8, device=device)
    cos, sin = rope_cos_sin(6, 8, device=device)
    for got, want in zip(apply_rope(q, k, cos, sin), apply_rope_ref(q, k, cos, sin)):
        torch.testing.assert_close(got, want)
    assert not launches, dict(launches)
