"""Backends: spec parsing, the effective backend, and every backend gives the torch reference's
logits, loss and gradients -- with a launch count proving which Triton kernels really ran.

The triton backend runs here under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
without CUDA), so shapes stay small: 1 block of the tiny preset, 19-33 tokens, fp32.
"""
import collections
import os
import subprocess
import sys

import pytest
import torch
import triton.runtime.interpreter
import triton.runtime.jit

from tritium.kernels import triton_runs_on
from tritium.model.backends import COMPONENTS, parse_backend, resolve_backend
from tritium.model.config import ModelConfig
from tritium.model.transformer import Transformer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU runs the kernels in the interpreter

# Triton kernel name prefix -> the backend component that launches it.
FAMILIES = {"_attn_": "attention", "_rms_norm_": "norm", "_swiglu_": "mlp", "_rope_": "rope",
            "_cross_entropy_": "loss"}


@pytest.fixture
def launches(monkeypatch):
    """Counter of Triton launches per component while the test runs (interpreter and compiled)."""
    counts = collections.Counter()
    for cls in (triton.runtime.interpreter.InterpretedFunction, triton.runtime.jit.JITFunction):
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            name = self.fn.__name__
            counts[next((c for p, c in FAMILIES.items() if name.startswith(p)), name)] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", run)
    return counts


@pytest.mark.parametrize("spec, expected", [
    ("torch", dict.fromkeys(COMPONENTS, "torch")),
    ("triton", dict.fromkeys(COMPONENTS, "triton")),
    ("auto", dict.fromkeys(COMPONENTS, "auto")),
    ("sdpa", {**dict.fromkeys(COMPONENTS, "torch"), "attention": "sdpa"}),
    ("flash_attn", {**dict.fromkeys(COMPONENTS, "torch"), "attention": "flash_attn"}),
    ("torch, attention=sdpa", {**dict.fromkeys(COMPONENTS, "torch"), "attention": "sdpa"}),
    ("triton,loss=torch,norm=torch", {**dict.fromkeys(COMPONENTS, "triton"), "loss": "torch", "norm": "torch"}),
    ("attention=sdpa", {**dict.fromkeys(COMPONENTS, "auto"), "attention": "sdpa"}),
])
def test_parse_backend(spec, expected):
    assert parse_backend(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("cuda", "unknown base 'cuda'"),
    ("torch,attn=sdpa", "unknown component 'attn'"),
    ("torch,norm=sdpa", "norm cannot use 'sdpa'"),
    ("torch,sdpa", "component=implementation"),
    ("", "non-empty"),
])
def test_parse_backend_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_backend(spec)


def test_auto_is_triton_on_cuda_and_the_fast_torch_path_on_cpu():
    assert resolve_backend("auto", "cpu").effective == {**dict.fromkeys(COMPONENTS, "torch"), "attention": "sdpa",
                                                        "norm": "eager", "rope": "eager"}
    assert set(resolve_backend("auto", "cuda").effective.values()) == {"triton"}  # resolving needs no GPU
    assert resolve_backend("auto,attention=sdpa", "cuda").effective["attention"] == "sdpa"
    assert resolve_backend("auto,loss=triton", "cpu").effective["loss"] == ("triton" if triton_runs_on("cpu") else "torch")


def test_effective_backend_follows_the_device_and_set_backend():
    model = Transformer(ModelConfig.from_name("tiny", num_layers=1), backend="torch,attention=triton").to(DEVICE)
    assert model.effective_backend == {**dict.fromkeys(COMPONENTS, "torch"), "attention": "triton"}
    model.set_backend("sdpa")
    assert model.effective_backend["attention"] == "sdpa"
    assert model.layers[0].self_attn.kernels is model.kernels  # every layer rebound at once
    with pytest.raises(ValueError, match="unknown base"):
        model.set_backend("cuda")
    assert model.backend == "sdpa"


FALLBACK_SCRIPT = """
import torch
from tritium.model.config import ModelConfig
from tritium.model.transformer import Transformer
model = Transformer(ModelConfig.from_name("tiny", num_layers=1), backend="triton,attention=sdpa")
ids = torch.randint(0, 100, (1, 6))
model(ids, labels=ids).backward()
model.set_backend("triton,attention=sdpa")
model(ids)
print(sorted(model.effective_backend.items()))
"""


def test_triton_without_interpreter_on_cpu_reports_torch_and_warns_once():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = sorted({**dict.fromkeys(COMPONENTS, "torch"), "attention": "sdpa"}.items())  # "triton" -> "torch"
    assert proc.stdout.strip() == str(expected)
    warnings = [line for line in proc.stderr.splitlines() if "fall back" in line]
    assert len(warnings) == 1, proc.stderr
    assert "'triton,attention=sdpa'" in warnings[0] and "norm, mlp, rope, loss" in warnings[0]
    assert "TRITON_INTERPRET=1" in warnings[0]


def test_flash_attn_backend_fails_clearly():
    try:
        import flash_attn  # noqa: F401
        expected, message = ValueError, "CUDA only"  # installed: still refuses a CPU device
    except ImportError:
        expected, message = ImportError, "flash-attn package"
    with pytest.raises(expected, match=message):
        resolve_backend("flash_attn", "cpu")
    with torch.device("meta"):  # describing a model never needs the package: the check comes with the move
        model = Transformer(ModelConfig.from_name("tiny", num_layers=1), backend="flash_attn")
    with pytest.raises(expected, match=message):
        model.to_empty(device="cpu")


def _run(model, ids, labels, cu_seqlens=None):
    # One pass through the blocks (the interpreter is slow); the head then gives logits and both losses.
    model.zero_grad()
    hidden = model.forward_hidden(ids, cu_seqlens=cu_seqlens)
    logits = model.lm_head(hidden)
    loss = model.lm_head(hidden, labels, "mean")
    nll = model.lm_head(hidden, labels, "none")
    (loss + nll.sum() / 100 + 0.1 * logits.square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), nll.detach(), grads


def _assert_close_to_reference(got, ref):
    logits, loss, nll, grads = got
    torch.testing.assert_close(logits, ref[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, ref[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nll, ref[2], atol=1e-4, rtol=1e-4)
    for name, grad in ref[3].items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads[name], grad, atol=1e-4 * scale + 1e-7, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture(scope="module")
def setup():
    # One block: every component runs (the interpreter's cost grows with layers, not coverage).
    config = ModelConfig.from_name("tiny", num_layers=1, max_seq_len=64, tie_embeddings=False)
    torch.manual_seed(21)
    model = Transformer(config, backend="torch").to(DEVICE)
    ids = torch.randint(0, config.vocab_size, (2, 19), device=DEVICE)
    labels = torch.randint(0, config.vocab_size, (2, 19), device=DEVICE)
    labels[1, :5] = -100
    return model, ids, labels


# backend -> the components whose Triton kernels must launch (all others must not)
LAUNCHING = {"sdpa": set(), "auto": set(), "triton": set(COMPONENTS),
             "torch,attention=triton,loss=triton": {"attention", "loss"}}


@pytest.mark.parametrize("backend", ["sdpa", "auto", "triton", "torch,attention=triton,loss=triton"])
def test_dense_backend_matches_torch(setup, launches, backend):
    model, ids, labels = setup
    model.set_backend("torch")
    reference = _run(model, ids, labels)
    assert not launches
    model.set_backend(backend)
    _assert_close_to_reference(_run(model, ids, labels), reference)
    assert set(launches) == LAUNCHING[backend], launches
    assert {c for c, impl in model.effective_backend.items() if impl == "triton"} == LAUNCHING[backend]


@pytest.mark.parametrize("backend", ["sdpa", "auto", "triton"])
def test_varlen_backend_matches_torch(setup, launches, backend):
    model, ids, labels = setup
    packed, packed_labels = ids.reshape(1, 38)[:, :33], labels.reshape(1, 38)[:, :33]
    cu_seqlens = torch.tensor([0, 7, 8, 24, 33], dtype=torch.int32, device=DEVICE)  # documents of 7, 1, 16 and 9 tokens
    model.set_backend("torch")
    reference = _run(model, packed, packed_labels, cu_seqlens)
    model.set_backend(backend)
    _assert_close_to_reference(_run(model, packed, packed_labels, cu_seqlens), reference)
    assert set(launches) == LAUNCHING[backend], launches


def test_eager_rope_after_inference_mode_still_trains():
    # cos/sin prepared once per pass are cached by identity; prepared under inference_mode they cannot be
    # saved for backward, so the same tables used for training afterwards must be prepared again.
    from tritium.kernels import rope_cos_sin
    from tritium.model.backends import apply_rope_eager

    cos, sin = rope_cos_sin(8, 16, 10000.0)
    q, k = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 1, 16)
    with torch.inference_mode():
        apply_rope_eager(q, k, cos, sin)
    leaf = q.clone().requires_grad_()
    out_q, _ = apply_rope_eager(leaf, k, cos, sin)
    out_q.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_inference_path_equals_the_autograd_path(dtype):
    # Without gradients, eager rope skips its autograd.Function (and prepares cos/sin once per pass) and
    # fp32 eager norm is one fused op: rope must give training's values bit for bit; the fp32 norm is
    # HF's math (rms_norm_ref) bit for bit, and training's within rounding (it sums squares differently).
    from tritium.kernels import rms_norm_ref, rope_cos_sin
    from tritium.model.backends import apply_rope_eager, rms_norm_eager

    gen = torch.Generator().manual_seed(5)
    x, res = (torch.randn(3, 5, 24, generator=gen).to(dtype) for _ in range(2))
    weight = torch.randn(24, generator=gen).to(dtype)
    q, k = torch.randn(3, 5, 6, 16, generator=gen).to(dtype), torch.randn(3, 5, 2, 16, generator=gen).to(dtype)
    cos, sin = rope_cos_sin(40, 16, 10000.0)
    positions = torch.randint(0, 40, (3, 5), generator=gen)
    for cos_in, sin_in in ((cos, sin), (cos[positions], sin[positions])):  # (T, D) and per-row (B, T, D)
        with torch.no_grad():
            norms = [rms_norm_eager(x, weight), *rms_norm_eager(x, weight, residual=res)]
            ropes = [*apply_rope_eager(q, k, cos_in, sin_in), *apply_rope_eager(q, k, cos_in, sin_in)]  # 2nd: cached
        leaves = [t.clone().requires_grad_() for t in (x, weight, q, k)]
        train_norms = [rms_norm_eager(leaves[0], leaves[1]), *rms_norm_eager(leaves[0], leaves[1], residual=res)]
        train_ropes = apply_rope_eager(leaves[2], leaves[3], cos_in, sin_in)
        assert train_norms[0].grad_fn is not None and train_ropes[0].grad_fn is not None  # autograd path ran
        for got, want in zip(ropes, [*train_ropes, *train_ropes]):
            assert got.dtype == dtype and torch.equal(got, want.detach())
        for got, want in zip(norms, train_norms):
            assert got.dtype == dtype
            torch.testing.assert_close(got, want.detach(), atol=0 if dtype == torch.bfloat16 else 1e-6, rtol=1e-5)
        if dtype == torch.float32:
            assert torch.equal(norms[0], rms_norm_ref(x, weight)) and torch.equal(norms[1], rms_norm_ref(x + res, weight))
