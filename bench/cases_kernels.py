"""RMSNorm, SwiGLU, RoPE and (fused linear) cross-entropy against eager,
``torch.compile`` of the same reference, and Liger-Kernel when installed.

Bytes are what the operation must move at least: every input read once and
every output written once (weights included), so GB/s over the measured copy
bandwidth is an honest fraction of the roofline.
"""
from __future__ import annotations

import importlib.util

import torch

from tritium.bench.registry import Case, Skip, compiled, fwd_bwd, need_cuda, register


def _esize(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def _liger(device: str, module: str):
    if device != "cuda":
        raise Skip("Liger-Kernel runs on CUDA only")
    if importlib.util.find_spec("liger_kernel") is None:
        raise Skip("liger-kernel not installed (pip install liger-kernel)")
    return importlib.import_module(f"liger_kernel.ops.{module}")


# ----------------------------------------------------------------------------- RMSNorm
def _rms_inputs(size, device, dtype, requires_grad):
    x = torch.randn(size["M"], size["N"], device=device, dtype=dtype, requires_grad=requires_grad)
    w = (1 + 0.1 * torch.randn(size["N"], device=device, dtype=dtype)).requires_grad_(requires_grad)
    return x, w


def _rms_factory(kind: str):
    def factory(size, mode, device, dtype):
        from tritium.kernels.norm import rms_norm, rms_norm_ref

        grad = mode != "fwd"
        x, w = _rms_inputs(size, device, dtype, grad)
        if kind == "tritium":
            need_cuda(device)
            fn = rms_norm
        elif kind == "torch":
            fn = rms_norm_ref
        elif kind == "torch.compile":
            fn = compiled(rms_norm_ref, device)
        else:
            ops = _liger(device, "rms_norm")
            fn = lambda x, w, eps: ops.LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama")
        return fwd_bwd(lambda: fn(x, w, 1e-6), mode, [x, w])
    return factory


def _rms_bytes(size, mode, dtype):
    e, M, N = _esize(dtype), size["M"], size["N"]
    fwd = 2 * M * N * e + N * e  # read x, write y, read w
    bwd = 3 * M * N * e + 2 * N * e  # read x and dy, write dx; read w, write dw
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


register(Case(
    name="rms_norm", area="kernels",
    sizes=[{"M": 4096, "N": n} for n in (1024, 2048, 4096, 8192, 16384, 32768, 65536)],
    quick_sizes=[{"M": 4096, "N": 4096}, {"M": 4096, "N": 8192}],
    cpu_sizes=[{"M": 256, "N": 1024}],
    providers={"tritium": _rms_factory("tritium"), "torch": _rms_factory("torch"),
               "torch.compile": _rms_factory("torch.compile"), "liger": _rms_factory("liger")},
    metric="GB/s", modes=("fwd", "bwd", "fwd+bwd"), bytes=_rms_bytes, baseline="torch.compile",
))


# ----------------------------------------------------------------------------- SwiGLU
def _swiglu_factory(kind: str):
    def factory(size, mode, device, dtype):
        from tritium.kernels.mlp import swiglu, swiglu_ref

        grad = mode != "fwd"
        gate = torch.randn(size["M"], size["N"], device=device, dtype=dtype, requires_grad=grad)
        up = torch.randn(size["M"], size["N"], device=device, dtype=dtype, requires_grad=grad)
        if kind == "tritium":
            need_cuda(device)
            fn = swiglu
        elif kind == "torch":
            fn = swiglu_ref
        elif kind == "torch.compile":
            fn = compiled(swiglu_ref, device)
        else:
            ops = _liger(device, "swiglu")
            fn = ops.LigerSiLUMulFunction.apply
        return fwd_bwd(lambda: fn(gate, up), mode, [gate, up])
    return factory


def _swiglu_bytes(size, mode, dtype):
    elems = size["M"] * size["N"] * _esize(dtype)
    return {"fwd": 3 * elems, "bwd": 5 * elems, "fwd+bwd": 8 * elems}[mode]


register(Case(
    name="swiglu", area="kernels",
    sizes=[{"M": 4096, "N": n} for n in (2048, 4096, 8192, 11008, 14336, 28672)],
    quick_sizes=[{"M": 4096, "N": 11008}],
    cpu_sizes=[{"M": 256, "N": 1024}],
    providers={"tritium": _swiglu_factory("tritium"), "torch": _swiglu_factory("torch"),
               "torch.compile": _swiglu_factory("torch.compile"), "liger": _swiglu_factory("liger")},
    metric="GB/s", modes=("fwd", "bwd", "fwd+bwd"), bytes=_swiglu_bytes, baseline="torch.compile",
))


# ----------------------------------------------------------------------------- RoPE
def _rope_factory(kind: str):
    def factory(size, mode, device, dtype):
        from tritium.kernels.rope import apply_rope, apply_rope_ref, rope_cos_sin

        grad = mode != "fwd"
        B, T, Hq, Hkv, D = size["B"], size["T"], size["Hq"], size["Hkv"], size["D"]
        q = torch.randn(B, T, Hq, D, device=device, dtype=dtype, requires_grad=grad)
        k = torch.randn(B, T, Hkv, D, device=device, dtype=dtype, requires_grad=grad)
        cos, sin = rope_cos_sin(T, D, device=device, dtype=dtype)
        if kind == "tritium":
            need_cuda(device)
            fn = apply_rope
        elif kind == "torch":
            fn = apply_rope_ref
        else:  # no Liger provider: its rope takes (B, H, T, D) heads-first tensors, a different layout
            fn = compiled(apply_rope_ref, device)

        def forward():
            qo, ko = fn(q, k, cos, sin)
            return torch.cat([qo.reshape(-1), ko.reshape(-1)]) if mode != "fwd" else qo
        return fwd_bwd(forward, mode, [q, k])
    return factory


def _rope_bytes(size, mode, dtype):
    e = _esize(dtype)
    qk = size["B"] * size["T"] * (size["Hq"] + size["Hkv"]) * size["D"] * e
    tables = 2 * size["T"] * size["D"] * e
    one = 2 * qk + tables  # read q,k (or their grads), write them, read cos/sin
    return {"fwd": one, "bwd": one, "fwd+bwd": 2 * one}[mode]


register(Case(
    name="rope", area="kernels",
    sizes=[{"B": 1, "T": t, "Hq": 32, "Hkv": 8, "D": 128} for t in (1024, 2048, 4096, 8192, 16384)],
    quick_sizes=[{"B": 1, "T": 4096, "Hq": 32, "Hkv": 8, "D": 128}],
    cpu_sizes=[{"B": 1, "T": 128, "Hq": 8, "Hkv": 2, "D": 64}],
    providers={"tritium": _rope_factory("tritium"), "torch": _rope_factory("torch"),
               "torch.compile": _rope_factory("torch.compile")},
    metric="GB/s", modes=("fwd", "fwd+bwd"), bytes=_rope_bytes, baseline="torch.compile",
))


# ----------------------------------------------------------------------------- fused linear cross-entropy
def _flce_factory(kind: str):
    def factory(size, mode, device, dtype):
        import torch.nn.functional as F

        from tritium.kernels.loss import fused_linear_cross_entropy

        grad = mode != "fwd"
        N, H, V = size["N"], size["H"], size["V"]
        hidden = (torch.randn(N, H, device=device, dtype=dtype) / H**0.25).requires_grad_(grad)
        weight = (torch.randn(V, H, device=device, dtype=dtype) / H**0.25).requires_grad_(grad)
        targets = torch.randint(0, V, (N,), device=device)
        if kind == "tritium":
            need_cuda(device)
            forward = lambda: fused_linear_cross_entropy(hidden, weight, targets)
        elif kind in ("torch", "torch.compile"):
            def unfused(h, w, t):
                return F.cross_entropy((h @ w.T).float(), t)
            fn = unfused if kind == "torch" else compiled(unfused, device)
            forward = lambda: fn(hidden, weight, targets)
        else:
            ops = _liger(device, "fused_linear_cross_entropy")
            forward = lambda: ops.LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, targets)[0]
        return fwd_bwd(forward, mode, [hidden, weight])
    return factory


def _flce_flops(size, mode):
    fwd = 2 * size["N"] * size["H"] * size["V"]
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[mode]


register(Case(
    name="fused_linear_cross_entropy", area="kernels",
    sizes=[{"N": 8192, "H": 4096, "V": v} for v in (32000, 128256)],
    quick_sizes=[{"N": 4096, "H": 4096, "V": 128256}],
    cpu_sizes=[{"N": 128, "H": 64, "V": 2048}],
    providers={"tritium": _flce_factory("tritium"), "torch": _flce_factory("torch"),
               "torch.compile": _flce_factory("torch.compile"), "liger": _flce_factory("liger")},
    metric="TFLOP/s", modes=("fwd+bwd",), flops=_flce_flops, baseline="torch",
    note="peak_mem_mb is the point: FLCE never holds the (N, V) logits",
))
