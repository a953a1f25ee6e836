"""SwiGLU: ``silu(gate) * up`` in Triton, and a SwiGLU feed-forward block that recomputes.

``swiglu(gate, up)`` is the elementwise activation of Llama's MLP. ``swiglu_mlp`` is the whole
block ``down(silu(x @ W_gate^T) * (x @ W_up^T))``; with ``recompute=True`` (the default) its
autograd saves only ``x`` and the weights and recomputes the gate/up projections and the
activation in backward. Eager PyTorch keeps ``gate``, ``up`` and the activation alive between
forward and backward (3 * ffn_hidden values per token); the recomputing block keeps
``hidden`` values per token, for two extra matmuls in backward.

Casting matches eager PyTorch / HF ``LlamaMLP``: ``silu(gate)`` is rounded to the input dtype
before the product with ``up``, exactly as ``act_fn(gate_proj(x)) * up_proj(x)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tritium.kernels._runtime import (
    FLOAT_DTYPES,
    can_use_triton,
    check_tensor,
    empty,
    empty_like,
    interpreter_enabled,
    launch,
)


# --------------------------------------------------------------------------------------------------
# 1. Triton kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _swiglu_fwd_kernel(G, U, Y, stride_g, stride_u, stride_y, N, BLOCK_N: tl.constexpr):
    """Grid (rows, column blocks); rows may be strided (e.g. the halves of a fused gate_up output).

    Forward math: y = cast(silu(g)) * u, silu(g) = g * sigmoid(g), computed in fp32.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g * tl.sigmoid(g)).to(G.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (act * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, stride_dy, stride_g, stride_u, stride_dg, stride_du, N,
                       BLOCK_N: tl.constexpr):
    """Backward math, recomputing sigmoid from g (nothing but g and u is saved):
        du = dy * silu(g)
        dg = dy * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    act = (g * sig).to(G.dtype.element_ty).to(tl.float32)
    du = dy * act
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + row * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + cols, du.to(DU.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# 2. Launchers
# --------------------------------------------------------------------------------------------------
def _block_config(n: int) -> tuple[int, int]:
    max_block = 16384 if interpreter_enabled() else 1024
    block = min(triton.next_power_of_2(max(n, 1)), max_block)
    return block, (4 if block <= 1024 else 8)


def _as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(M, n) view with unit last-dim stride (no copy for slices of a fused gate_up output)."""
    if t.stride(-1) == 1:
        try:
            return t.view(-1, n)
        except RuntimeError:
            pass
    return t.reshape(-1, n).contiguous()


def _validate(gate: torch.Tensor, up: torch.Tensor) -> None:
    check_tensor("gate", gate, dtypes=FLOAT_DTYPES)
    check_tensor("up", up, dtypes=(gate.dtype,), device=gate.device)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dim() == 0:
        raise ValueError("gate must have at least 1 dimension")


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel: silu(gate) * up, in gate's dtype and shape."""
    _validate(gate, up)
    n = gate.shape[-1]
    g2, u2 = _as_rows(gate, n), _as_rows(up, n)
    y = empty(g2.shape, dtype=gate.dtype, device=gate.device)
    if y.numel() > 0:
        block, num_warps = _block_config(n)
        launch(_swiglu_fwd_kernel, (g2.shape[0], triton.cdiv(n, block)))(
            g2, u2, y, g2.stride(0), u2.stride(0), y.stride(0), n, BLOCK_N=block, num_warps=num_warps)
    return y.view(gate.shape)


def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel. Returns (dgate, dup)."""
    _validate(gate, up)
    if dy.shape != gate.shape:
        raise ValueError(f"dy must have gate's shape {tuple(gate.shape)}, got {tuple(dy.shape)}")
    n = gate.shape[-1]
    g2, u2, dy2 = _as_rows(gate, n), _as_rows(up, n), _as_rows(dy, n)
    dg = empty(g2.shape, dtype=gate.dtype, device=gate.device)
    du = empty_like(dg)
    if dg.numel() > 0:
        block, num_warps = _block_config(n)
        launch(_swiglu_bwd_kernel, (g2.shape[0], triton.cdiv(n, block)))(
            dy2, g2, u2, dg, du, dy2.stride(0), g2.stride(0), u2.stride(0), dg.stride(0), du.stride(0), n,
            BLOCK_N=block, num_warps=num_warps)
    return dg.view(gate.shape), du.view(gate.shape)


@torch.library.custom_op("tritium::swiglu_fwd", mutates_args=())
def _swiglu_fwd_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return swiglu_fwd(gate, up)


@_swiglu_fwd_op.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("tritium::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return swiglu_bwd(dy, gate, up)


@_swiglu_bwd_op.register_fake
def _(dy, gate, up):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(gate, memory_format=torch.contiguous_format))


# --------------------------------------------------------------------------------------------------
# 3. Autograd
# --------------------------------------------------------------------------------------------------
class SwiGLUFunction(torch.autograd.Function):
    """Saves gate and up only; the activation is recomputed in the backward kernel."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _swiglu_fwd_op(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return _swiglu_bwd_op(dy, gate, up)


def _act_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if can_use_triton(gate, up):
        return _swiglu_fwd_op(gate, up)
    return F.silu(gate) * up


def _act_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if can_use_triton(dy, gate, up):
        return _swiglu_bwd_op(dy, gate, up)
    g = gate.float()
    sig = torch.sigmoid(g)
    du = dy * F.silu(gate)
    dg = (dy.float() * up.float() * sig * (1 + g * (1 - sig))).to(gate.dtype)
    return dg, du


class SwiGLUMLPFunction(torch.autograd.Function):
    """down(silu(x W_g^T) * (x W_u^T)) saving only x and the weights (activation recomputation).

    ``w_up is None`` means ``w_gate`` is a fused (2 * ffn, hidden) [gate; up] weight.
    Backward: recompute g, u, a = swiglu(g, u); then
        dW_down = dout^T a,  da = dout W_down,  (dg, du) = swiglu_bwd(da, g, u),
        dx = dg W_g + du W_u,  dW_g = dg^T x,  dW_u = du^T x.
    """

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down):
        x2 = x.reshape(-1, x.shape[-1])
        gate, up = _project(x2, w_gate, w_up)
        out = _act_fwd(gate, up) @ w_down.t()
        ctx.save_for_backward(x, w_gate, w_up, w_down)
        return out.view(*x.shape[:-1], w_down.shape[0])

    @staticmethod
    def backward(ctx, dout):
        x, w_gate, w_up, w_down = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dout2 = dout.reshape(-1, dout.shape[-1])
        gate, up = _project(x2, w_gate, w_up)
        act = _act_fwd(gate, up)
        d_w_down = dout2.t() @ act if ctx.needs_input_grad[3] else None
        del act
        d_act = dout2 @ w_down
        d_gate, d_up = _act_bwd(d_act, gate, up)
        del gate, up, d_act
        ffn = d_gate.shape[-1]
        if w_up is None:
            dx = d_gate @ w_gate[:ffn] + d_up @ w_gate[ffn:] if ctx.needs_input_grad[0] else None
            d_w_gate = (torch.cat([d_gate.t() @ x2, d_up.t() @ x2], dim=0)
                        if ctx.needs_input_grad[1] else None)
            d_w_up = None
        else:
            dx = d_gate @ w_gate + d_up @ w_up if ctx.needs_input_grad[0] else None
            d_w_gate = d_gate.t() @ x2 if ctx.needs_input_grad[1] else None
            d_w_up = d_up.t() @ x2 if ctx.needs_input_grad[2] else None
        if dx is not None:
            dx = dx.view(x.shape)
        return dx, d_w_gate, d_w_up, d_w_down


def _project(x2: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor | None):
    if w_up is None:
        gate_up = x2 @ w_gate.t()  # (M, 2 * ffn); the halves are strided views, no copy
        ffn = w_gate.shape[0] // 2
        return gate_up[:, :ffn], gate_up[:, ffn:]
    return x2 @ w_gate.t(), x2 @ w_up.t()


# --------------------------------------------------------------------------------------------------
# 4. Public functions
# --------------------------------------------------------------------------------------------------
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (elementwise; any shape, rows may be strided). Triton where possible."""
    if not can_use_triton(gate, up):
        return swiglu_ref(gate, up)
    return SwiGLUFunction.apply(gate, up)


def _validate_mlp(x, w_gate, w_up, w_down) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("w_gate_up_or_gate", w_gate, dtypes=(x.dtype,), ndim=2, device=x.device)
    check_tensor("w_down", w_down, dtypes=(x.dtype,), ndim=2, device=x.device)
    hidden = x.shape[-1]
    if w_gate.shape[1] != hidden:
        raise ValueError(f"w_gate_up_or_gate is {tuple(w_gate.shape)} but x's hidden size is {hidden}")
    if w_up is None:
        if w_gate.shape[0] % 2:
            raise ValueError(f"a fused w_gate_up_or_gate (w_up=None) needs an even first dim, got {w_gate.shape[0]}")
        ffn = w_gate.shape[0] // 2
    else:
        check_tensor("w_up", w_up, dtypes=(x.dtype,), ndim=2, device=x.device)
        if w_up.shape != w_gate.shape:
            raise ValueError(f"w_up must have w_gate's shape {tuple(w_gate.shape)}, got {tuple(w_up.shape)}")
        ffn = w_gate.shape[0]
    if w_down.shape != (hidden, ffn):
        raise ValueError(f"w_down must be (hidden={hidden}, ffn={ffn}), got {tuple(w_down.shape)}")


def swiglu_mlp(x: torch.Tensor, w_gate_up_or_gate: torch.Tensor, w_up: torch.Tensor | None,
               w_down: torch.Tensor, recompute: bool = True) -> torch.Tensor:
    """The SwiGLU feed-forward block ``down(silu(x W_gate^T) * (x W_up^T))``.

    Args:
        x: (..., hidden).
        w_gate_up_or_gate: (ffn, hidden) gate weight, or with ``w_up=None`` a fused (2*ffn, hidden)
            weight whose first half is the gate and second half the up projection.
        w_up: (ffn, hidden) or None (fused).
        w_down: (hidden, ffn).
        recompute: save only x for backward and recompute the projections and activation
            (activation memory ``hidden`` instead of ``3*ffn`` values per token, two more matmuls).
    Weights follow ``nn.Linear`` (out_features, in_features); no biases.
    """
    _validate_mlp(x, w_gate_up_or_gate, w_up, w_down)
    if recompute:
        return SwiGLUMLPFunction.apply(x, w_gate_up_or_gate, w_up, w_down)
    gate, up = _project(x.reshape(-1, x.shape[-1]), w_gate_up_or_gate, w_up)
    return (swiglu(gate, up) @ w_down.t()).view(*x.shape[:-1], w_down.shape[0])


# --------------------------------------------------------------------------------------------------
# 5. References
# --------------------------------------------------------------------------------------------------
def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Eager PyTorch ``F.silu(gate) * up`` (HF ``LlamaMLP``'s activation)."""
    _validate(gate, up)
    return F.silu(gate) * up


def swiglu_mlp_ref(x: torch.Tensor, w_gate_up_or_gate: torch.Tensor, w_up: torch.Tensor | None,
                   w_down: torch.Tensor, recompute: bool = True) -> torch.Tensor:
    """Eager ``down_proj(silu(gate_proj(x)) * up_proj(x))``; ``recompute`` is accepted and ignored."""
    _validate_mlp(x, w_gate_up_or_gate, w_up, w_down)
    if w_up is None:
        gate, up = F.linear(x, w_gate_up_or_gate).chunk(2, dim=-1)
    else:
        gate, up = F.linear(x, w_gate_up_or_gate), F.linear(x, w_up)
    return F.linear(F.silu(gate) * up, w_down)
