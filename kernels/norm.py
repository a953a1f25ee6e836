"""RMSNorm with an optional fused residual add, forward and backward in Triton.

The pre-norm pattern of every decoder layer is ``residual = x + residual;
y = RMSNorm(residual) * weight``: fused, it is one read of ``x`` and
``residual`` and one write of ``y`` and the new residual, instead of three
passes over memory.

Casting matches Hugging Face ``LlamaRMSNorm``: statistics in fp32, the
normalized row cast back to the input dtype, and only then multiplied by the
weight (so the output dtype is ``torch.promote_types(x.dtype, weight.dtype)``).
The fused residual sum is rounded to the input dtype before it is normalized,
exactly as ``residual + hidden_states`` in the HF decoder layer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritium.kernels._runtime import (
    FLOAT_DTYPES,
    can_use_triton,
    check_tensor,
    empty,
    interpreter_enabled,
    launch,
)


# --------------------------------------------------------------------------------------------------
# 1. Triton kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _load_sum(x_ptrs, r_ptrs, new_r_ptrs, mask, HAS_RESIDUAL: tl.constexpr):
    """Load x in fp32; with HAS_RESIDUAL, x + r rounded to the residual's dtype and stored as the new residual.

    The rounding before normalizing is what HF's ``residual + hidden_states`` does in the input dtype.
    """
    s = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
        s_rounded = (s + r).to(new_r_ptrs.dtype.element_ty)
        tl.store(new_r_ptrs, s_rounded, mask=mask)
        s = s_rounded.to(tl.float32)
    return s


@triton.jit
def _rms_norm_fwd_kernel(X, R, W, Y, NEW_R, RSTD,
                         stride_x, stride_r, stride_y, stride_nr,
                         N, eps,
                         BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SINGLE_BLOCK: tl.constexpr):
    """One program per row.

    Forward math (s = x + r when HAS_RESIDUAL, rounded to x's dtype, else s = x):
        rstd = 1 / sqrt(mean(s^2) + eps)            (fp32)
        y    = w * cast_to_x_dtype(s * rstd)         (HF Llama casting)
    Stores y, rstd (fp32, per row) and, with HAS_RESIDUAL, s (the new residual).
    SINGLE_BLOCK: the row fits one block, so it stays in registers; otherwise the
    row is streamed twice (sum of squares, then normalize), any hidden size works.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    x_row = X + row * stride_x
    r_row = R + row * stride_r
    y_row = Y + row * stride_y
    nr_row = NEW_R + row * stride_nr
    if SINGLE_BLOCK:
        mask = cols < N
        s = _load_sum(x_row + cols, r_row + cols, nr_row + cols, mask, HAS_RESIDUAL)
        rstd = tl.rsqrt(tl.sum(s * s, axis=0) / N + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        x_hat = (s * rstd).to(X.dtype.element_ty).to(tl.float32)
        tl.store(y_row + cols, (w * x_hat).to(Y.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = c < N
            s = _load_sum(x_row + c, r_row + c, nr_row + c, mask, HAS_RESIDUAL)
            sum_sq += s * s
        rstd = tl.rsqrt(tl.sum(sum_sq, axis=0) / N + eps)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = c < N
            # Re-read what was normalized: the rounded residual sum when fused.
            if HAS_RESIDUAL:
                s = tl.load(nr_row + c, mask=mask, other=0.0).to(tl.float32)
            else:
                s = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
            x_hat = (s * rstd).to(X.dtype.element_ty).to(tl.float32)
            tl.store(y_row + c, (w * x_hat).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DNEW_R, DX, DW_PARTIAL,
                         stride_dy, stride_x, stride_dnr, stride_dx,
                         M, N, rows_per_program,
                         BLOCK_N: tl.constexpr, HAS_DRESIDUAL: tl.constexpr, SINGLE_BLOCK: tl.constexpr):
    """Each program owns a contiguous range of rows and one row of DW_PARTIAL.

    Backward math (x is the normalized input s, x_hat = x * rstd, g = dy * w):
        dx = rstd * (g - x_hat * mean(g * x_hat))  [+ d_new_residual when HAS_DRESIDUAL]
        dw = sum over rows of dy * cast_to_x_dtype(x_hat)
    The weight gradient is reduced in two stages: fp32 partial sums per program
    here (no atomics, deterministic), then a sum over programs by the launcher.
    With a fused residual, x and residual receive the same dx.
    """
    pid = tl.program_id(0)
    # int64 row indices: row * stride overflows int32 on large activations.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    dw_row = DW_PARTIAL + pid.to(tl.int64) * N
    if SINGLE_BLOCK:
        mask = cols < N
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(row_start, row_end):
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            x_hat = x * rstd
            g = dy * w
            c = tl.sum(g * x_hat, axis=0) / N
            dx = rstd * (g - x_hat * c)
            if HAS_DRESIDUAL:
                dx += tl.load(DNEW_R + row * stride_dnr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += dy * x_hat.to(X.dtype.element_ty).to(tl.float32)
        tl.store(dw_row + cols, dw_acc, mask=mask)
    else:
        for row in range(row_start, row_end):
            rstd = tl.load(RSTD + row)
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c_idx = start + cols
                mask = c_idx < N
                x = tl.load(X + row * stride_x + c_idx, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * stride_dy + c_idx, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + c_idx, mask=mask, other=0.0).to(tl.float32)
                acc += dy * w * x * rstd
            c = tl.sum(acc, axis=0) / N
            for start in range(0, N, BLOCK_N):
                c_idx = start + cols
                mask = c_idx < N
                x = tl.load(X + row * stride_x + c_idx, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * stride_dy + c_idx, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + c_idx, mask=mask, other=0.0).to(tl.float32)
                x_hat = x * rstd
                dx = rstd * (dy * w - x_hat * c)
                if HAS_DRESIDUAL:
                    dx += tl.load(DNEW_R + row * stride_dnr + c_idx, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row * stride_dx + c_idx, dx.to(DX.dtype.element_ty), mask=mask)
                # This program is the only writer of its DW_PARTIAL row: read-modify-write is race-free.
                dw_old = tl.load(dw_row + c_idx, mask=mask, other=0.0)
                tl.store(dw_row + c_idx, dw_old + dy * x_hat.to(X.dtype.element_ty).to(tl.float32), mask=mask)


# --------------------------------------------------------------------------------------------------
# 2. Launchers
# --------------------------------------------------------------------------------------------------
def _block_config(n: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps): the whole row in one block up to 8192 (16384 in the interpreter,
    where bigger blocks mean fewer Python-level steps), streamed in blocks beyond."""
    max_block = 16384 if interpreter_enabled() else 8192
    block = min(triton.next_power_of_2(max(n, 1)), max_block)
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    return block, num_warps


def _as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(M, n) view with unit stride in the last dimension; copies only when no such view exists."""
    if t.dim() >= 1 and t.stride(-1) == 1:
        try:
            return t.view(-1, n)
        except RuntimeError:
            pass
    return t.reshape(-1, n).contiguous()


def _num_bwd_programs(m: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(m, 4 * sms))
    return max(1, min(m, 4))


def _validate(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=1, device=x.device)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension (..., hidden), got a scalar")
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight has {weight.shape[0]} elements but x's hidden size (last dim) is {x.shape[-1]}"
                         " (a ZeRO-3 partitioned weight shows up as size 0: call inside the owning module)")
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,), device=x.device)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns (y, new_residual or empty, rstd (M,) fp32)."""
    _validate(x, weight, eps, residual)
    n = x.shape[-1]
    x2 = _as_rows(x, n)
    m = x2.shape[0]
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = empty((m, n), dtype=out_dtype, device=x.device)
    rstd = empty((m,), dtype=torch.float32, device=x.device)
    if residual is not None:
        r2 = _as_rows(residual, n)
        new_r = empty((m, n), dtype=x.dtype, device=x.device)
    else:
        r2 = x2  # never read: HAS_RESIDUAL=False compiles the branch away
        new_r = empty((0,), dtype=x.dtype, device=x.device)
    if m > 0 and n > 0:
        block, num_warps = _block_config(n)
        launch(_rms_norm_fwd_kernel, (m,))(
            x2, r2, weight.contiguous(), y, new_r if residual is not None else y, rstd,
            x2.stride(0), r2.stride(0), y.stride(0), new_r.stride(0) if residual is not None else 0,
            n, float(eps),
            BLOCK_N=block, HAS_RESIDUAL=residual is not None, SINGLE_BLOCK=block >= n, num_warps=num_warps)
    y = y.view(x.shape)
    if residual is not None:
        new_r = new_r.view(x.shape)
    return y, new_r, rstd


def rms_norm_bwd(dy: torch.Tensor, x_normed: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                 d_new_residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel. ``x_normed`` is what was normalized (x, or x + residual).
    Returns (dx in x_normed's dtype, dweight in weight's dtype)."""
    n = x_normed.shape[-1]
    if dy.shape != x_normed.shape:
        raise ValueError(f"dy must have shape {tuple(x_normed.shape)}, got {tuple(dy.shape)}")
    x2 = _as_rows(x_normed, n)
    dy2 = _as_rows(dy, n)
    m = x2.shape[0]
    dx = empty((m, n), dtype=x_normed.dtype, device=x_normed.device)
    if d_new_residual is not None:
        dnr2 = _as_rows(d_new_residual, n)
    else:
        dnr2 = dy2
    programs = _num_bwd_programs(m, x_normed.device)
    dw_partial = torch.zeros((programs, n), dtype=torch.float32, device=x_normed.device)
    if m > 0 and n > 0:
        block, num_warps = _block_config(n)
        rows_per_program = triton.cdiv(m, programs)
        launch(_rms_norm_bwd_kernel, (programs,))(
            dy2, x2, weight.contiguous(), rstd, dnr2, dx, dw_partial,
            dy2.stride(0), x2.stride(0), dnr2.stride(0), dx.stride(0),
            m, n, rows_per_program,
            BLOCK_N=block, HAS_DRESIDUAL=d_new_residual is not None, SINGLE_BLOCK=block >= n,
            num_warps=num_warps)
    dw = dw_partial.sum(0).to(weight.dtype)
    return dx.view(x_normed.shape), dw


# torch.library custom ops keep the launchers opaque to torch.compile (which cannot trace into
# the launcher's Python) while the fake implementations give it shapes and dtypes.
@torch.library.custom_op("tritium::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rms_norm_fwd(x, weight, eps, residual)


@_rms_norm_fwd_op.register_fake
def _(x, weight, residual, eps):
    m = x.numel() // max(x.shape[-1], 1) if x.shape[-1] else 0
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    new_r = x.new_empty(x.shape) if residual is not None else x.new_empty((0,))
    return y, new_r, x.new_empty((m,), dtype=torch.float32)


@torch.library.custom_op("tritium::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(dy: torch.Tensor, x_normed: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                     d_new_residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_bwd(dy, x_normed, weight, rstd, d_new_residual)


@_rms_norm_bwd_op.register_fake
def _(dy, x_normed, weight, rstd, d_new_residual):
    return x_normed.new_empty(x_normed.shape), weight.new_empty(weight.shape)


# --------------------------------------------------------------------------------------------------
# 3. Autograd
# --------------------------------------------------------------------------------------------------
class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        y, new_r, rstd = _rms_norm_fwd_op(x, weight, residual, float(eps))
        has_residual = residual is not None
        ctx.has_residual = has_residual
        ctx.save_for_backward(new_r if has_residual else x, weight, rstd)
        if has_residual:
            return y, new_r
        return y

    @staticmethod
    def backward(ctx, dy, d_new_r=None):
        x_normed, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_bwd_op(dy.contiguous() if dy.stride(-1) != 1 else dy, x_normed, weight, rstd,
                                  d_new_r if ctx.has_residual else None)
        d_res = dx if ctx.has_residual else None
        return dx, (dw if ctx.needs_input_grad[1] else None), d_res, None


# --------------------------------------------------------------------------------------------------
# 4. Public function
# --------------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             residual: torch.Tensor | None = None):
    """RMSNorm over the last dimension, with an optional fused residual add.

    Args:
        x: (..., hidden) in fp32/fp16/bf16, any leading shape.
        weight: (hidden,).
        eps: added to the mean square before the reciprocal square root.
        residual: optional, x's shape and dtype.
    Returns:
        ``y`` without ``residual``; ``(y, new_residual)`` with it, where ``new_residual = x + residual``
        (rounded to x's dtype) and ``y = RMSNorm(new_residual) * weight``.
    Casting matches HF ``LlamaRMSNorm``: fp32 statistics, normalized row cast back to x's dtype, then
    multiplied by ``weight``; output dtype = ``promote_types(x.dtype, weight.dtype)``.
    Runs the Triton kernel where ``can_use_triton`` allows, else ``rms_norm_ref``.
    """
    if not can_use_triton(x, weight, residual):
        return rms_norm_ref(x, weight, eps, residual)
    return RMSNormFunction.apply(x, weight, residual, eps)


# --------------------------------------------------------------------------------------------------
# 5. Reference
# --------------------------------------------------------------------------------------------------
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                 residual: torch.Tensor | None = None):
    """Pure PyTorch RMSNorm, the HF ``LlamaRMSNorm`` computation (plus the decoder layer's residual add)."""
    _validate(x, weight, eps, residual)
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * h.to(x.dtype)
    return (y, x) if residual is not None else y
