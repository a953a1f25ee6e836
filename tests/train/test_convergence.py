"""Liger-style convergence test: training on the Triton kernels follows the PyTorch-reference run.

Same seed, same initial weights, same batches, 50 AdamW steps of a tiny model, once with
``backend="triton"`` (every component: attention, RMSNorm, RoPE, SwiGLU, fused linear cross-entropy;
on a CPU under TRITON_INTERPRET=1) and once with ``backend="torch"``. In fp32 the kernels differ
from the references only by summation order (~1e-7 relative per op); over 50 steps of Adam that
drift stays far below the tolerance below, while a real kernel bug (a wrong gradient, a missed row)
moves the curve by orders of magnitude more (Liger's convergence tests use the same kind of bound).
"""
from __future__ import annotations

import torch

STEPS = 50
# Kept tiny because every Triton program is Python under the interpreter (~0.7 CPU-s per triton step
# here, RoPE and RMSNorm dominate: one program per token). One layer still runs the fused-residual
# RMSNorm (the second and final norms); GQA 2:1; head_dim 16.
BATCH, SEQ_LEN = 1, 8
MODEL = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, ffn_hidden=48,
             vocab_size=64, max_seq_len=SEQ_LEN, tie_embeddings=False)
# |loss_triton - loss_torch| per step, and the final logits (the model's output after 50 updates)
LOSS_ATOL = 1e-4
LOGITS_ATOL = 1e-3


def _train(backend: str):
    from tritium.model.config import ModelConfig
    from tritium.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**MODEL), backend=backend)
    torch.manual_seed(0)
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    # a 16-token sub-vocabulary with a repeating structure: learnable, so the loss falls visibly
    data = torch.randint(0, 16, (STEPS, BATCH, SEQ_LEN + 1), generator=gen)
    losses = []
    for step in range(STEPS):
        loss = model(data[step, :, :-1], labels=data[step, :, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    probe = torch.randint(0, 16, (BATCH, SEQ_LEN), generator=gen)
    with torch.no_grad():
        logits = model(probe)
    return torch.tensor(losses), logits


def test_triton_backend_converges_like_torch_backend(launches):
    triton_losses, triton_logits = _train("triton")
    launches.require("_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel", "_rms_norm_fwd_kernel",
                     "_rms_norm_bwd_kernel", "_rope_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel",
                     "_cross_entropy_kernel")
    counted = dict(launches)
    torch_losses, torch_logits = _train("torch")
    assert dict(launches) == counted, "the torch backend launched Triton kernels"
    assert torch_losses[-5:].mean() < torch_losses[:5].mean() - 0.3, f"the model did not learn: {torch_losses}"
    torch.testing.assert_close(triton_losses, torch_losses, atol=LOSS_ATOL, rtol=0)
    torch.testing.assert_close(triton_logits, torch_logits, atol=LOGITS_ATOL, rtol=0)
