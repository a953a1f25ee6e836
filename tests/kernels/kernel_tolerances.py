"""One tolerance table for the kernel tests (imported as a plain module: pytest puts this folder on
sys.path because tests/ has no __init__.py files).

The rule, from flash-attention's tests: a kernel's error against an fp32 reference must be at most
twice the error of the same computation done by PyTorch in the kernel's dtype, plus a small slack
(absolute + relative to the reference's magnitude) for reassociated fp32 sums.
"""
from __future__ import annotations

import torch

# dtype -> (atol, rtol) slack on top of 2x PyTorch's own same-dtype error
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (8e-3, 1e-2),
}


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def assert_close_rule(name: str, out: torch.Tensor, ref_fp32: torch.Tensor, ref_same_dtype: torch.Tensor,
                      dtype: torch.dtype) -> None:
    """err(out vs fp32 ref) <= 2 * err(PyTorch in `dtype` vs fp32 ref) + atol + rtol * max|ref|."""
    assert out.shape == ref_fp32.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_fp32.shape)}"
    atol, rtol = TOLERANCES[dtype]
    err = _max_err(out, ref_fp32)
    baseline = _max_err(ref_same_dtype, ref_fp32)
    scale = ref_fp32.float().abs().max().item() if ref_fp32.numel() else 0.0
    bound = 2 * baseline + atol + rtol * scale
    assert err <= bound, f"{name} ({dtype}): kernel err {err:.3g} > bound {bound:.3g} (torch err {baseline:.3g})"


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Plain comparison with the table's slack (for exact-math checks, e.g. against a same-dtype ref)."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    atol, rtol = TOLERANCES[dtype]
    err = _max_err(out, ref)
    scale = ref.float().abs().max().item() if ref.numel() else 0.0
    assert err <= atol + rtol * scale, f"{name} ({dtype}): err {err:.3g} > {atol + rtol * scale:.3g}"


def dtype_params(cpu_bf16: bool = False):
    """fp32 and fp16 everywhere; bf16 everywhere for kernels without ``tl.dot`` (``cpu_bf16=True``:
    RMSNorm, SwiGLU, RoPE, cross-entropy), else only on GPU (the interpreter's bf16 ``tl.dot`` gives
    garbage; its bf16 loads, stores and elementwise math are fine)."""
    import pytest
    if cpu_bf16:
        return [torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
