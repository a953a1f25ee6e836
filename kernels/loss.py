"""Cross-entropy in Triton, and fused linear cross-entropy (FLCE) that never builds full logits.

``cross_entropy(logits, targets, ...)`` is for callers that already hold logits.
``fused_linear_cross_entropy(hidden, weight, targets, ...)`` computes the loss of
``hidden @ weight.T`` chunk by chunk over tokens: each chunk's logits are computed by a
torch matmul, the Triton kernel turns them into per-token losses and, in the same buffer,
into d(loss)/d(logits); the chunk's hidden gradient and its share of the weight gradient
are taken right away and the chunk's logits are freed. Peak memory is one chunk of logits
plus the gradients, instead of (tokens x vocab) logits, their fp32 copy and their gradient.

Loss per non-ignored token with target y, logits x (V entries), lse = logsumexp(x),
smoothing eps and z-loss weight z (PaLM's auxiliary term):
    loss = (1 - eps) (lse - x_y) + eps (lse - mean_j x_j) + z lse^2
    dloss/dx_j = softmax(x)_j (1 + 2 z lse) - eps / V - (1 - eps) [j == y]
With z = 0 this is exactly ``F.cross_entropy(x.float(), y, label_smoothing=eps)``.
Ignored tokens (target == ignore_index) have loss 0 and zero gradient.

Reductions: "none" -> per-token losses (0 at ignored); "sum"; "mean" -> sum / number of
non-ignored tokens. When every token is ignored, "mean" returns 0 with zero gradients
(``F.cross_entropy`` returns nan there; a fully masked micro-batch should not poison training).
Losses are fp32 whatever the input dtype (logits are upcast as in HF's ``ForCausalLMLoss``).

Gradients are exact for every reduction. For "mean"/"sum" they are computed during the
forward (three matmuls in all, as unfused) and scaled by the incoming gradient in backward.
For "none" the incoming gradient differs per token and the weight gradient
``sum_i g_i dlogits_i^T h_i`` cannot be rescaled afterwards, so the forward computes only
losses (and saves the per-token lse) and the backward recomputes each chunk's logits.

DeepSpeed ZeRO-3: ``weight`` must be the full (V, H) matrix while the loss runs, forward and
backward. Call FLCE inside the ``forward`` of the module that owns the head weight (for
example ``tritium.model``'s ``LMHead``, or the ``lm_head`` patched by
``tritium.kernels.hf.patch``) so ZeRO's module hooks gather it; a partitioned parameter seen
outside (shape (0,)) raises a ValueError that says so. Tied embeddings additionally need
``deepspeed.zero.register_external_parameter`` on the module that uses the weight.
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

REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------------
# 1. Triton kernel
# --------------------------------------------------------------------------------------------------
@triton.jit
def _cross_entropy_kernel(LOGITS, GRAD, TARGETS, LOSS, LSE, SCALE,
                          stride_logits, stride_grad, stride_scale,
                          V, ignore_index, label_smoothing, z_loss,
                          BLOCK_V: tl.constexpr, HAS_LSE: tl.constexpr, COMPUTE_LOSS: tl.constexpr,
                          COMPUTE_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """One program per row (token).

    Pass 1 (unless HAS_LSE gives a saved lse): online max / sum-exp over vocab blocks ->
        lse = m + log(sum_j exp(x_j - m)); with HAS_SMOOTHING also sum_j x_j.
    COMPUTE_LOSS stores loss = lse - (1-eps) x_y - (eps/V) sum_j x_j + z lse^2 and lse.
    Pass 2 (COMPUTE_GRAD) writes, into GRAD (may alias LOGITS: each element is read before
    it is overwritten by the same program),
        scale * (exp(x_j - lse) (1 + 2 z lse) - eps/V - (1-eps) [j == y])
    with scale = SCALE[row * stride_scale] when HAS_SCALE (stride 0 for a scalar) else 1.
    Ignored rows store loss 0 and a zero gradient row.
    """
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGETS + row).to(tl.int64)
    logits_row = LOGITS + row * stride_logits
    grad_row = GRAD + row * stride_grad
    cols = tl.arange(0, BLOCK_V)
    if target == ignore_index:
        if COMPUTE_LOSS:
            tl.store(LOSS + row, 0.0)
            tl.store(LSE + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK_V):
                c = start + cols
                tl.store(grad_row + c, tl.zeros([BLOCK_V], dtype=tl.float32).to(GRAD.dtype.element_ty),
                         mask=c < V)
        return

    sum_x = 0.0
    if HAS_LSE:
        lse = tl.load(LSE + row)
        if HAS_SMOOTHING:
            for start in range(0, V, BLOCK_V):
                c = start + cols
                x = tl.load(logits_row + c, mask=c < V, other=0.0).to(tl.float32)
                sum_x += tl.sum(x, axis=0)
    else:
        m = -float("inf")
        s = 0.0
        for start in range(0, V, BLOCK_V):
            c = start + cols
            mask = c < V
            x = tl.load(logits_row + c, mask=mask, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
            if HAS_SMOOTHING:
                sum_x += tl.sum(tl.where(mask, x, 0.0), axis=0)
        lse = m + tl.log(s)

    if COMPUTE_LOSS:
        x_target = tl.load(logits_row + target).to(tl.float32)
        loss = lse - (1.0 - label_smoothing) * x_target + z_loss * lse * lse
        if HAS_SMOOTHING:
            loss -= label_smoothing * sum_x / V
        tl.store(LOSS + row, loss)
        tl.store(LSE + row, lse)

    if COMPUTE_GRAD:
        if HAS_SCALE:
            scale = tl.load(SCALE + row * stride_scale).to(tl.float32)
        else:
            scale = 1.0
        p_scale = 1.0 + 2.0 * z_loss * lse
        for start in range(0, V, BLOCK_V):
            c = start + cols
            mask = c < V
            x = tl.load(logits_row + c, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * p_scale - label_smoothing / V
            g = tl.where(c == target, g - (1.0 - label_smoothing), g)
            tl.store(grad_row + c, (g * scale).to(GRAD.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# 2. Launchers
# --------------------------------------------------------------------------------------------------
def _block_v(v: int) -> tuple[int, int]:
    max_block = 32768 if interpreter_enabled() else 4096
    block = min(triton.next_power_of_2(max(v, 1)), max_block)
    return block, (4 if block <= 1024 else 8 if block <= 2048 else 16)


def _validate_options(ignore_index: int, reduction: str, label_smoothing: float, z_loss: float) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if not z_loss >= 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss!r}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def _validate_targets(targets: torch.Tensor, v: int, ignore_index: int, device: torch.device,
                      expected_shape: tuple[int, ...]) -> None:
    check_tensor("targets", targets, dtypes=(torch.int64, torch.int32), device=device)
    if tuple(targets.shape) != tuple(expected_shape):
        raise ValueError(f"targets must have shape {tuple(expected_shape)}, got {tuple(targets.shape)}")
    # Out-of-range targets would read out of bounds in the kernel. Checking costs a host sync
    # on GPU, so it is done where it is free (CPU); on GPU the caller owns the range.
    if targets.device.type != "cuda" and targets.numel() and not torch.compiler.is_compiling():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= v))
        if bool(bad.any()):
            value = targets[bad][0].item()
            raise ValueError(f"targets must be in [0, {v}) or ignore_index={ignore_index}, found {value}")


def _launch(logits: torch.Tensor, grad: torch.Tensor | None, targets: torch.Tensor,
            loss: torch.Tensor | None, lse: torch.Tensor, scale: torch.Tensor | None,
            ignore_index: int, label_smoothing: float, z_loss: float, has_lse: bool) -> None:
    n, v = logits.shape
    if n == 0:
        return
    block, num_warps = _block_v(v)
    scale_stride = 0 if scale is None or scale.numel() == 1 else scale.stride(0)
    launch(_cross_entropy_kernel, (n,))(
        logits, grad if grad is not None else logits, targets, loss if loss is not None else lse, lse,
        scale if scale is not None else lse,
        logits.stride(0), grad.stride(0) if grad is not None else 0, scale_stride,
        v, ignore_index, float(label_smoothing), float(z_loss),
        BLOCK_V=block, HAS_LSE=has_lse, COMPUTE_LOSS=loss is not None, COMPUTE_GRAD=grad is not None,
        HAS_SCALE=scale is not None, HAS_SMOOTHING=label_smoothing > 0, num_warps=num_warps)


def cross_entropy_fwd(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                      label_smoothing: float = 0.0, z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses and logsumexp (both (N,) fp32) of logits (N, V)."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    n = logits.shape[0]
    loss = empty(n, dtype=torch.float32, device=logits.device)
    lse = empty(n, dtype=torch.float32, device=logits.device)
    _launch(logits, None, targets.contiguous(), loss, lse, None, ignore_index, label_smoothing, z_loss, False)
    return loss, lse


def cross_entropy_bwd(grad_rows: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                      ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0) -> torch.Tensor:
    """d(sum_i grad_rows_i * loss_i)/d logits; grad_rows is (N,) or a 1-element tensor (broadcast)."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    grad = empty_like(logits, memory_format=torch.contiguous_format)
    _launch(logits, grad, targets.contiguous(), None, lse, grad_rows.float(), ignore_index, label_smoothing,
            z_loss, True)
    return grad


def _chunk_rows(n: int, v: int, h: int) -> int:
    """Tokens per chunk: chunk logits about as big as the hidden states (Liger's rule), at least
    32 rows so the matmuls stay reasonable when the hidden size is tiny next to the vocab."""
    rows = triton.next_power_of_2(triton.cdiv(n, triton.cdiv(v, max(h, 1))))
    return max(1, min(n, max(rows, 32)))


def _validate_flce(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("weight", weight, dtypes=(hidden.dtype,), device=hidden.device)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1] or weight.shape[0] == 0:
        raise ValueError(
            f"weight must be (vocab, hidden={hidden.shape[1]}), got {tuple(weight.shape)}"
            + (" -- a ZeRO-3 partitioned parameter looks like this: run the loss inside the forward of the "
               "module that owns the weight so DeepSpeed gathers it" if weight.numel() == 0 else ""))


def flce_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
             reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
             grad_hidden: bool = False, grad_weight: bool = False, chunk_size: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunked forward over tokens. hidden (N, H), weight (V, H), targets (N,).

    Returns (loss_rows (N,) fp32, lse (N,) fp32, d hidden, d weight). The gradients (empty tensors
    unless requested) are those of the reduced loss ("mean" already divides by the number of
    non-ignored tokens; "none" is treated as "sum", callers rescale).
    """
    _validate_flce(hidden, weight)
    n, h = hidden.shape
    v = weight.shape[0]
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight.contiguous()
    targets = targets.contiguous()
    device = hidden.device
    loss = empty(n, dtype=torch.float32, device=device)
    lse = empty(n, dtype=torch.float32, device=device)
    d_hidden = empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if grad_hidden else hidden.new_empty(0)
    # The weight gradient accumulates in place across chunks (addmm, no V x H temporaries), in the
    # weight's dtype: an fp32 accumulator would cost 2x the weight again at large vocab.
    d_weight = weight.new_zeros(weight.shape) if grad_weight else weight.new_empty(0)
    scale = None
    if reduction == "mean" and (grad_hidden or grad_weight):
        # 1 / max(#valid, 1) as a device tensor: no host sync; all-ignored -> zero grads.
        scale = (targets != ignore_index).sum().clamp(min=1).reciprocal().float().reshape(1)
    chunk = chunk_size or _chunk_rows(n, v, h)
    compute_grad = grad_hidden or grad_weight
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h_chunk = hidden[start:end]
        logits = h_chunk @ weight.t()  # (chunk, V) in the input dtype, like the unfused head
        _launch(logits, logits if compute_grad else None, targets[start:end], loss[start:end], lse[start:end],
                scale, ignore_index, label_smoothing, z_loss, False)
        if grad_hidden:
            torch.mm(logits, weight, out=d_hidden[start:end])
        if grad_weight:
            d_weight.addmm_(logits.t(), h_chunk)
        del logits
    return loss, lse, d_hidden, d_weight


def flce_bwd(grad_rows: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
             lse: torch.Tensor, ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
             grad_hidden: bool = True, grad_weight: bool = True, chunk_size: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Recomputing backward for per-token incoming gradients (reduction "none").

    For each chunk: logits again, d logits = grad_rows_i * dloss_i/dlogits from the saved lse
    (one pass over the vocab), d hidden = dlogits @ W, d W += dlogits^T h.
    """
    n, h = hidden.shape
    v = weight.shape[0]
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight.contiguous()
    targets = targets.contiguous()
    grad_rows = grad_rows.float().contiguous()
    d_hidden = empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if grad_hidden else hidden.new_empty(0)
    d_weight = weight.new_zeros(weight.shape) if grad_weight else weight.new_empty(0)
    chunk = chunk_size or _chunk_rows(n, v, h)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h_chunk = hidden[start:end]
        logits = h_chunk @ weight.t()
        _launch(logits, logits, targets[start:end], None, lse[start:end], grad_rows[start:end],
                ignore_index, label_smoothing, z_loss, True)
        if grad_hidden:
            torch.mm(logits, weight, out=d_hidden[start:end])
        if grad_weight:
            d_weight.addmm_(logits.t(), h_chunk)
        del logits
    return d_hidden, d_weight


# Custom ops: opaque to torch.compile, with fake implementations for shapes.
@torch.library.custom_op("tritium::cross_entropy_fwd", mutates_args=())
def _ce_fwd_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, label_smoothing: float,
               z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    return cross_entropy_fwd(logits, targets, ignore_index, label_smoothing, z_loss)


@_ce_fwd_op.register_fake
def _(logits, targets, ignore_index, label_smoothing, z_loss):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("tritium::cross_entropy_bwd", mutates_args=())
def _ce_bwd_op(grad_rows: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
               ignore_index: int, label_smoothing: float, z_loss: float) -> torch.Tensor:
    return cross_entropy_bwd(grad_rows, logits, targets, lse, ignore_index, label_smoothing, z_loss)


@_ce_bwd_op.register_fake
def _(grad_rows, logits, targets, lse, ignore_index, label_smoothing, z_loss):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("tritium::flce_fwd", mutates_args=())
def _flce_fwd_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                 reduction: str, label_smoothing: float, z_loss: float, grad_hidden: bool, grad_weight: bool,
                 chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return flce_fwd(hidden, weight, targets, ignore_index, reduction, label_smoothing, z_loss,
                    grad_hidden, grad_weight, chunk_size or None)


@_flce_fwd_op.register_fake
def _(hidden, weight, targets, ignore_index, reduction, label_smoothing, z_loss, grad_hidden, grad_weight,
      chunk_size):
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32),
            hidden.new_empty(hidden.shape) if grad_hidden else hidden.new_empty(0),
            weight.new_empty(weight.shape) if grad_weight else weight.new_empty(0))


@torch.library.custom_op("tritium::flce_bwd", mutates_args=())
def _flce_bwd_op(grad_rows: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 lse: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float, grad_hidden: bool,
                 grad_weight: bool, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return flce_bwd(grad_rows, hidden, weight, targets, lse, ignore_index, label_smoothing, z_loss,
                    grad_hidden, grad_weight, chunk_size or None)


@_flce_bwd_op.register_fake
def _(grad_rows, hidden, weight, targets, lse, ignore_index, label_smoothing, z_loss, grad_hidden, grad_weight,
      chunk_size):
    return (hidden.new_empty(hidden.shape) if grad_hidden else hidden.new_empty(0),
            weight.new_empty(weight.shape) if grad_weight else weight.new_empty(0))


# --------------------------------------------------------------------------------------------------
# 3. Autograd
# --------------------------------------------------------------------------------------------------
def _reduce(loss_rows: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp(min=1)


class CrossEntropyFunction(torch.autograd.Function):
    """Saves logits and the per-row lse; backward is one pass over the vocab per row."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction, label_smoothing, z_loss):
        loss_rows, lse = _ce_fwd_op(logits, targets, ignore_index, float(label_smoothing), float(z_loss))
        ctx.save_for_backward(logits, targets, lse)
        ctx.options = (ignore_index, reduction, float(label_smoothing), float(z_loss))
        return _reduce(loss_rows, targets, ignore_index, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, lse = ctx.saved_tensors
        ignore_index, reduction, label_smoothing, z_loss = ctx.options
        if reduction == "mean":
            grad_rows = (grad_out / (targets != ignore_index).sum().clamp(min=1)).reshape(1)
        elif reduction == "sum":
            grad_rows = grad_out.reshape(1)
        else:
            grad_rows = grad_out
        d_logits = _ce_bwd_op(grad_rows, logits, targets, lse, ignore_index, label_smoothing, z_loss)
        return d_logits, None, None, None, None, None


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """mean/sum: gradients computed chunk by chunk in forward, scaled by grad_out in backward.
    none: forward computes losses only; backward recomputes chunk logits (exact per-token grads)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, label_smoothing, z_loss, chunk_size):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        eager = reduction != "none"
        loss_rows, lse, d_hidden, d_weight = _flce_fwd_op(
            hidden, weight, targets, ignore_index, reduction, float(label_smoothing), float(z_loss),
            eager and need_dh, eager and need_dw, int(chunk_size or 0))
        ctx.options = (ignore_index, reduction, float(label_smoothing), float(z_loss), int(chunk_size or 0))
        ctx.grads_consumed = False
        if eager:
            ctx.save_for_backward(d_hidden, d_weight)
        else:
            ctx.save_for_backward(hidden, weight, targets, lse)
        return _reduce(loss_rows, targets, ignore_index, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        ignore_index, reduction, label_smoothing, z_loss, chunk_size = ctx.options
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if reduction == "none":
            hidden, weight, targets, lse = ctx.saved_tensors
            d_hidden, d_weight = _flce_bwd_op(grad_out, hidden, weight, targets, lse, ignore_index,
                                              label_smoothing, z_loss, need_dh, need_dw, chunk_size)
        else:
            if torch.compiler.is_compiling():
                d_hidden, d_weight = ctx.saved_tensors
                # Traced graphs are functional; the compiler plans the buffers itself.
                d_hidden = d_hidden * grad_out.to(d_hidden.dtype) if need_dh else None
                d_weight = d_weight * grad_out.to(d_weight.dtype) if need_dw else None
            else:
                if ctx.grads_consumed:
                    raise RuntimeError("fused_linear_cross_entropy(reduction='mean'/'sum') scales its stored "
                                       "gradients in place and supports one backward pass; use reduction='none' "
                                       "and reduce yourself to backpropagate through the same loss twice")
                ctx.grads_consumed = True
                d_hidden, d_weight = ctx.saved_tensors
                # In place: an out-of-place product would hold a second (V, H) weight gradient at the peak.
                d_hidden = d_hidden.mul_(grad_out.to(d_hidden.dtype)) if need_dh else None
                d_weight = d_weight.mul_(grad_out.to(d_weight.dtype)) if need_dw else None
        return (d_hidden if need_dh else None, d_weight if need_dw else None,
                None, None, None, None, None, None)


# --------------------------------------------------------------------------------------------------
# 4. Public functions
# --------------------------------------------------------------------------------------------------
def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, z_loss: float = 0.0) -> torch.Tensor:
    """Cross-entropy of logits (..., V) against targets (...) (see the module docstring for the math,
    ignored tokens, the all-ignored "mean" convention and fp32 losses). "none" returns targets' shape."""
    _validate_options(ignore_index, reduction, label_smoothing, z_loss)
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be (..., vocab) with vocab > 0, got {tuple(logits.shape)}")
    _validate_targets(targets, logits.shape[-1], ignore_index, logits.device, tuple(logits.shape[:-1]))
    if not can_use_triton(logits, targets):
        return cross_entropy_ref(logits, targets, ignore_index, reduction, label_smoothing, z_loss)
    v = logits.shape[-1]
    out = CrossEntropyFunction.apply(logits.reshape(-1, v), targets.reshape(-1), ignore_index, reduction,
                                     label_smoothing, z_loss)
    return out.view(targets.shape) if reduction == "none" else out


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                               z_loss: float = 0.0, chunk_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` without materializing the (tokens x vocab) logits.

    Args:
        hidden: (N, H) (or (..., H) with targets (...)), fp32/fp16/bf16.
        weight: (V, H), hidden's dtype and device. Under ZeRO-3 it must be gathered: call this
            inside the forward of the module that owns it (module docstring).
        targets: (N,) int64/int32 in [0, V) or ``ignore_index``.
        reduction: "mean" | "sum" | "none" ("none": fp32 per-token losses, 0 at ignored).
        label_smoothing, z_loss: as in the module docstring (z_loss adds z * lse^2 per token).
        chunk_size: tokens per chunk (default: chunk logits about the size of ``hidden``).
    Returns the fp32 loss; gradients flow to ``hidden`` and ``weight`` exactly.
    """
    _validate_options(ignore_index, reduction, label_smoothing, z_loss)
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    if hidden.dim() < 1:
        raise ValueError("hidden must be (N, H)")
    h2 = hidden.reshape(-1, hidden.shape[-1])
    _validate_flce(h2, weight)
    _validate_targets(targets, weight.shape[0], ignore_index, hidden.device, tuple(hidden.shape[:-1]))
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not can_use_triton(hidden, weight, targets):
        return fused_linear_cross_entropy_ref(hidden, weight, targets, ignore_index, reduction, label_smoothing,
                                              z_loss)
    flat_targets = targets.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        out = FusedLinearCrossEntropyFunction.apply(h2, weight, flat_targets, ignore_index, reduction,
                                                    label_smoothing, z_loss, chunk_size)
    else:
        # No autograd (eval, no_grad): losses only. needs_input_grad inside Function.apply would
        # still say True under no_grad and the gradients would be computed for nothing.
        loss_rows = _flce_fwd_op(h2, weight, flat_targets, ignore_index, reduction, float(label_smoothing),
                                 float(z_loss), False, False, int(chunk_size or 0))[0]
        out = _reduce(loss_rows, flat_targets, ignore_index, reduction)
    return out.view(targets.shape) if reduction == "none" else out


# --------------------------------------------------------------------------------------------------
# 5. References
# --------------------------------------------------------------------------------------------------
def cross_entropy_ref(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                      reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0) -> torch.Tensor:
    """``F.cross_entropy`` on fp32 logits, plus z * lse^2, with "mean" over non-ignored tokens
    (0 when all are ignored)."""
    _validate_options(ignore_index, reduction, label_smoothing, z_loss)
    v = logits.shape[-1]
    logits32 = logits.float().reshape(-1, v)
    flat = targets.reshape(-1).long()
    rows = F.cross_entropy(logits32, flat, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    valid = flat != ignore_index
    if z_loss:
        rows = rows + z_loss * torch.logsumexp(logits32, dim=-1).pow(2) * valid
    if reduction == "none":
        return rows.view(targets.shape)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().clamp(min=1)


def fused_linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                                   z_loss: float = 0.0, chunk_size: int | None = None) -> torch.Tensor:
    """Unfused: full logits ``hidden @ weight.T`` (input dtype) then ``cross_entropy_ref``."""
    return cross_entropy_ref(hidden @ weight.t(), targets, ignore_index, reduction, label_smoothing, z_loss)
