"""Compile the Triton kernels ahead of time for an H100 (sm_90) on the CPU.

The interpreter used by the CPU tests is more permissive than the Triton compiler (types of
loop-carried values, early returns, int64 loop bounds, ...). Triton's wheel ships ptxas, so the
full Python -> TTIR -> TTGIR -> PTX -> cubin pipeline runs without a GPU: a kernel that would not
compile on the device fails here. Runs in a subprocess because TRITON_INTERPRET=1 (set for this
process by tests/conftest.py) turns @triton.jit into interpreted functions at import time.
"""
import json
import os
import subprocess
import sys

import pytest

# (module, kernel, constexpr variants): every flag combination that the launchers use.
CASES = [
    ("norm", "_rms_norm_fwd_kernel", [{"BLOCK_N": 1024, "HAS_RESIDUAL": r, "SINGLE_BLOCK": s}
                                          for r in (False, True) for s in (False, True)]),
    ("norm", "_rms_norm_bwd_kernel", [{"BLOCK_N": 1024, "HAS_DRESIDUAL": r, "SINGLE_BLOCK": s}
                                          for r in (False, True) for s in (False, True)]),
    ("mlp", "_swiglu_fwd_kernel", [{"BLOCK_N": 1024}]),
    ("mlp", "_swiglu_bwd_kernel", [{"BLOCK_N": 1024}]),
    ("rope", "_rope_kernel", [{"HALF": 64, "BLOCK_HALF": 64, "BLOCK_HQ": 32, "BLOCK_HKV": 8,
                               "HAS_POSITION_IDS": p, "BACKWARD": b} for p in (False, True) for b in (False, True)]),
    ("loss", "_cross_entropy_kernel", [
        {"BLOCK_V": 4096, "HAS_LSE": False, "COMPUTE_LOSS": True, "COMPUTE_GRAD": g, "HAS_SCALE": g,
         "HAS_SMOOTHING": s} for g in (False, True) for s in (False, True)] + [
        {"BLOCK_V": 4096, "HAS_LSE": True, "COMPUTE_LOSS": False, "COMPUTE_GRAD": True, "HAS_SCALE": True,
         "HAS_SMOOTHING": s} for s in (False, True)]),
]

SCRIPT = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

FP32_POINTERS = {"RSTD", "LSE", "LOSS", "SCALE", "DW_PARTIAL", "COS", "SIN"}
INT_POINTERS = {"TARGETS", "POS"}
FLOATS = {"eps", "label_smoothing", "z_loss"}
SIZES = {"M", "N", "T", "V"}  # upper-case by the shape-letter convention, but integers
results = []
for module, kernel, variants in json.loads(sys.argv[1]):
    fn = getattr(importlib.import_module(f"tritium.kernels.{module}"), kernel)
    for constexprs in variants:
        signature = {}
        for param in fn.params:
            name = param.name
            if param.is_constexpr:
                signature[name] = "constexpr"
            elif name in FP32_POINTERS:
                signature[name] = "*fp32"
            elif name in INT_POINTERS:
                signature[name] = "*i64"
            elif name.isupper() and name not in SIZES:  # activations / weights: the bf16 path (the interpreter cannot test it)
                signature[name] = "*bf16"
            elif name in FLOATS:
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
            ok, error = "cubin" in compiled.asm, ""
        except Exception as exc:  # report every failure, not just the first
            ok, error = False, f"{type(exc).__name__}: {exc}"[:2000]
        results.append({"kernel": kernel, "constexprs": constexprs, "ok": ok, "error": error})
print("RESULTS" + json.dumps(results))
"""


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES)], capture_output=True, text=True,
                          env=env, timeout=600, check=False)
    marker = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS")]
    assert marker, f"compile script failed:\n{proc.stderr[-3000:]}"
    results = json.loads(marker[0][len("RESULTS"):])
    failures = [f"{r['kernel']} {r['constexprs']}: {r['error']}" for r in results if not r["ok"]]
    assert not failures, "\n".join(failures)
    assert len(results) == sum(len(variants) for _, _, variants in CASES)


def test_public_functions_trace_in_one_graph(device):
    """torch.compile readiness without a GPU: dynamo must capture each public function (custom ops +
    autograd.Function) as one graph, forward and backward. backend="aot_eager" runs the captured
    graphs eagerly, so no CPU code generation for Triton ops is involved."""
    import torch

    from tritium.kernels.loss import cross_entropy, fused_linear_cross_entropy
    from tritium.kernels.mlp import swiglu, swiglu_mlp
    from tritium.kernels.norm import rms_norm
    from tritium.kernels.rope import apply_rope, rope_cos_sin

    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_()

    cos, sin = rope_cos_sin(6, 8, device=device)
    targets = torch.randint(0, 11, (5,), generator=gen).to(device)
    cases = {
        "rms_norm": (lambda x, w, r: rms_norm(x, w, 1e-6, r), rand(3, 40), rand(40), rand(3, 40)),
        "swiglu": (swiglu, rand(3, 40), rand(3, 40)),
        "swiglu_mlp": (lambda x, a, b: swiglu_mlp(x, a, None, b), rand(3, 8), rand(12, 8), rand(8, 6)),
        "apply_rope": (lambda q, k: apply_rope(q, k, cos, sin), rand(2, 3, 2, 8), rand(2, 3, 1, 8)),
        "flce_mean": (lambda h, w: fused_linear_cross_entropy(h, w, targets), rand(5, 8), rand(11, 8)),
        "flce_none": (lambda h, w: fused_linear_cross_entropy(h, w, targets, reduction="none"), rand(5, 8),
                      rand(11, 8)),
        "cross_entropy": (lambda logits: cross_entropy(logits, targets, label_smoothing=0.1), rand(5, 11)),
    }
    for name, (fn, *args) in cases.items():
        torch._dynamo.reset()
        out = torch.compile(fn, backend="aot_eager", fullgraph=True)(*args)
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.float().sum() for o in outs).backward()
        assert all(a.grad is not None for a in args), name
