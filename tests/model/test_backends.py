"""Backends: spec parsing, and every backend gives the torch reference's logits, loss and gradients.

The triton backend runs here under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
without CUDA), so shapes stay small: 1 block of the tiny preset, 19-33 tokens, fp32.
"""
import pytest
import torch

from tritium.model.backends import COMPONENTS, parse_backend, resolve_backend
from tritium.model.config import ModelConfig
from tritium.model.transformer import Transformer


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


def test_auto_is_triton_on_cuda_and_torch_elsewhere():
    assert set(dict(resolve_backend("auto", "cpu").choices).values()) == {"torch"}
    assert set(dict(resolve_backend("auto", "cuda").choices).values()) == {"triton"}  # resolving needs no GPU
    assert dict(resolve_backend("auto,attention=sdpa", "cuda").choices)["attention"] == "sdpa"


def test_flash_attn_backend_fails_clearly():
    try:
        import flash_attn  # noqa: F401
        expected, message = ValueError, "CUDA only"  # installed: still refuses a CPU device
    except ImportError:
        expected, message = ImportError, "flash-attn package"
    with pytest.raises(expected, match=message):
        resolve_backend("flash_attn", "cpu")


def _run(model, ids, labels, cu_seqlens=None):
    # One pass through the blocks (the interpreter is slow); the head then gives logits and both losses.
    model.zero_grad()
    hidden = model.forward_hidden(ids, cu_seqlens=cu_seqlens)
    ops = resolve_backend(model.backend, ids.device)
    logits = model.lm_head(hidden, ops)
    loss = model.lm_head(hidden, ops, labels, "mean")
    nll = model.lm_head(hidden, ops, labels, "none")
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
    model = Transformer(config, backend="torch")
    ids = torch.randint(0, config.vocab_size, (2, 19))
    labels = torch.randint(0, config.vocab_size, (2, 19))
    labels[1, :5] = -100
    return model, ids, labels


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_dense_backend_matches_torch(setup, backend):
    model, ids, labels = setup
    model.set_backend("torch")
    reference = _run(model, ids, labels)
    model.set_backend(backend)
    _assert_close_to_reference(_run(model, ids, labels), reference)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_varlen_backend_matches_torch(setup, backend):
    model, ids, labels = setup
    packed, packed_labels = ids.reshape(1, 38)[:, :33], labels.reshape(1, 38)[:, :33]
    cu_seqlens = torch.tensor([0, 7, 8, 24, 33], dtype=torch.int32)  # documents of 7, 1, 16 and 9 tokens
    model.set_backend("torch")
    reference = _run(model, packed, packed_labels, cu_seqlens)
    model.set_backend(backend)
    _assert_close_to_reference(_run(model, packed, packed_labels, cu_seqlens), reference)
