"""Compile every Triton kernel ahead of time for an H100/H200 (sm_90a) on the CPU.

The interpreter used by the CPU tests is more permissive than the Triton compiler (types of
loop-carried values, early returns, int64 loop bounds, ...). Triton's wheel ships ptxas, so the
full Python -> TTIR -> TTGIR -> PTX -> cubin pipeline runs without a GPU: a kernel that would not
compile on the device fails here. ``tritium.bench.compile_report`` holds the cases (every kernel, every
flag combination and fixed config the launchers use) and reads registers and spills from ``ptxas -v``.
Runs in a subprocess because TRITON_INTERPRET=1 (set for this process by tests/conftest.py) turns
@triton.jit into interpreted functions at import time.
"""
import json
import os
import subprocess
import sys

import pytest

# Spill-store budget in bytes per (kernel, config) with no budget = 0. Measured with triton 3.9 / ptxas 13.x
# (bench/NOTES.md) plus 25%: the attention and decode kernels sit at the 255-register cap at the
# launchers' fixed configs and spill today; this test stops it getting worse (and any new spill) until
# the tiles are retuned on a GPU.
SPILL_BUDGET: dict[tuple[str, str], int] = {
    ("_rms_norm_fwd_kernel", "residual streamed"): 21,
    ("_rms_norm_bwd_kernel", "plain streamed"): 26,
    ("_rms_norm_bwd_kernel", "d_residual streamed"): 36,
    ("_attn_fwd_kernel", "causal D=128"): 491,
    ("_attn_fwd_kernel", "varlen window+softcap D=80"): 611,
    ("_attn_fwd_kernel", "causal D=256"): 1401,
    ("_attn_bwd_dkdv_kernel", "causal D=128"): 2171,
    ("_attn_bwd_dkdv_kernel", "varlen window+softcap D=80"): 2046,
    ("_attn_bwd_dkdv_kernel", "causal D=256"): 7473,
    ("_attn_bwd_dq_kernel", "causal D=128"): 661,
    ("_attn_bwd_dq_kernel", "varlen window+softcap D=80"): 646,
    ("_attn_bwd_dq_kernel", "causal D=256"): 1671,
    ("_decode_split_kernel", "split D=128"): 66,
    ("_decode_split_kernel", "paged no-split window+softcap D=80"): 1056,
    ("_decode_split_kernel", "paged split chunked prefill"): 1451,
    ("_decode_split_kernel", "split D=256"): 101,
}


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_within_its_spill_budget():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tritium.bench.compile_report", "--json"], capture_output=True,
                          text=True, env=env, timeout=1200, check=False)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert results, f"compile report failed:\n{proc.stderr[-3000:]}"
    failures = [f"{r['kernel']} [{r['config']}]: {r['error']}" for r in results if not r["ok"]]
    assert not failures, "\n".join(failures)
    kernels = {r["kernel"] for r in results}
    for expected in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_decode_split_kernel",
                     "_decode_combine_kernel"):
        assert expected in kernels
    for r in results:
        assert r["registers"], f"no register count parsed from ptxas -v: {r}"
    spills = [f"{r['kernel']} [{r['config']}]: {r['spill_stores']} B stored, {r['spill_loads']} B loaded "
              f"(budget {SPILL_BUDGET.get((r['kernel'], r['config']), 0)})"
              for r in results if r["spill_stores"] > SPILL_BUDGET.get((r["kernel"], r["config"]), 0)]
    assert not spills, "register spills on sm_90a:\n" + "\n".join(spills)


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
