"""nn.Module wrappers over the kernel functions: they hold parameters, call the function, nothing else.

ZeRO-3 note: DeepSpeed gathers a partitioned parameter only while the forward of the module that
*directly* owns it runs. So the modules whose kernels read weights themselves (``SwiGLUMLP`` with
recomputation, ``LinearCrossEntropyHead``) register those weights as their own parameters rather
than on ``nn.Linear`` children.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tritium.kernels.loss import fused_linear_cross_entropy
from tritium.kernels.norm import rms_norm
from tritium.kernels.rope import apply_rope, rope_cos_sin
from tritium.kernels.mlp import swiglu_mlp


class RMSNorm(nn.Module):
    """``rms_norm`` with a learned (hidden,) weight (HF ``LlamaRMSNorm`` numerics);
    ``forward(x, residual)`` returns ``(y, x + residual)`` (the fused pre-norm residual add)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class SwiGLUMLP(nn.Module):
    """Llama feed-forward ``down(silu(gate(x)) * up(x))`` on ``swiglu_mlp``.

    Weights are (out, in) like ``nn.Linear``: ``gate_weight``/``up_weight`` (ffn, hidden), or one
    ``gate_up_weight`` (2*ffn, hidden) with ``fused_gate_up=True`` (one matmul instead of two);
    ``down_weight`` (hidden, ffn). ``recompute=True`` keeps only the input for backward.
    """

    def __init__(self, hidden_size: int, ffn_hidden: int, fused_gate_up: bool = False, recompute: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if hidden_size < 1 or ffn_hidden < 1:
            raise ValueError(f"hidden_size and ffn_hidden must be >= 1, got {hidden_size}, {ffn_hidden}")
        self.hidden_size, self.ffn_hidden = hidden_size, ffn_hidden
        self.fused_gate_up, self.recompute = fused_gate_up, recompute
        factory = {"device": device, "dtype": dtype}
        if fused_gate_up:
            self.gate_up_weight = nn.Parameter(torch.empty(2 * ffn_hidden, hidden_size, **factory))
            self.gate_weight = self.up_weight = None
        else:
            self.gate_weight = nn.Parameter(torch.empty(ffn_hidden, hidden_size, **factory))
            self.up_weight = nn.Parameter(torch.empty(ffn_hidden, hidden_size, **factory))
            self.gate_up_weight = None
        self.down_weight = nn.Parameter(torch.empty(hidden_size, ffn_hidden, **factory))
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        """Normal init (default std 1/sqrt(fan_in)); skipped on the meta device."""
        for name, p in self.named_parameters(recurse=False):
            if p.is_meta:
                continue
            fan_in = p.shape[1]
            nn.init.normal_(p, std=std if std is not None else 1.0 / math.sqrt(fan_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gate_up:
            return swiglu_mlp(x, self.gate_up_weight, None, self.down_weight, recompute=self.recompute)
        return swiglu_mlp(x, self.gate_weight, self.up_weight, self.down_weight, recompute=self.recompute)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, ffn={self.ffn_hidden}, fused_gate_up={self.fused_gate_up}, "
                f"recompute={self.recompute}")


class RotaryEmbedding(nn.Module):
    """Caches fp32 cos/sin tables for ``max_seq_len`` positions and applies RoPE to (B, T, H, D) q, k.

    Tables are non-persistent buffers (rebuilt, not loaded). Built on the meta device they are
    placeholders: call ``reset_cache(device)`` after materializing the model.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0,
                 scaling: dict[str, Any] | None = None, device=None):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta, self.scaling = head_dim, max_seq_len, theta, scaling
        cos, sin = rope_cos_sin(max_seq_len, head_dim, theta, scaling, device=device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def reset_cache(self, device=None) -> None:
        device = device if device is not None else self.cos.device
        self.cos, self.sin = rope_cos_sin(self.max_seq_len, self.head_dim, self.theta, self.scaling, device=device)

    def forward(self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor | None = None,
                inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids is None and q.shape[1] > self.cos.shape[0]:
            raise ValueError(f"sequence length {q.shape[1]} exceeds RotaryEmbedding.max_seq_len={self.max_seq_len}")
        return apply_rope(q, k, self.cos, self.sin, position_ids, inplace=inplace)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_seq_len={self.max_seq_len}, theta={self.theta}, scaling={self.scaling}"


class FusedLinearCrossEntropyLoss(nn.Module):
    """Stateless loss module: ``forward(hidden, weight, targets)`` -> ``fused_linear_cross_entropy``.

    Under ZeRO-3 the caller must run it inside the forward of the module owning ``weight``
    (or use ``LinearCrossEntropyHead``)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, chunk_size: int | None = None):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.z_loss, self.chunk_size = label_smoothing, z_loss, chunk_size

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return fused_linear_cross_entropy(hidden, weight, targets, self.ignore_index, self.reduction,
                                          self.label_smoothing, self.z_loss, self.chunk_size)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}")


class LinearCrossEntropyHead(nn.Linear):
    """An LM head (``nn.Linear`` without bias) whose forward gives logits, or with ``targets`` the
    fused linear cross-entropy loss -- computed inside this module's forward, so ZeRO-3 gathers the
    weight for it (forward and backward)."""

    def __init__(self, hidden_size: int, vocab_size: int, device=None, dtype=None):
        super().__init__(hidden_size, vocab_size, bias=False, device=device, dtype=dtype)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None, ignore_index: int = -100,
                reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0) -> torch.Tensor:
        if targets is None:
            return F.linear(hidden, self.weight)
        return fused_linear_cross_entropy(hidden, self.weight, targets, ignore_index, reduction,
                                          label_smoothing, z_loss)
