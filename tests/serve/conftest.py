"""Fixtures for the generator/engine tests: a tiny random Transformer over the session tokenizer.

initializer_range=0.2 (10x the training init) makes the random model's next token depend on its
context; at 0.02 it repeats one token forever, which would let a broken cache pass greedy checks.
"""
from __future__ import annotations

import pytest
import torch

from tritium.model.config import ModelConfig
from tritium.model.transformer import Transformer


@pytest.fixture(scope="session")
def serve_model(tiny_tokenizer):
    torch.manual_seed(1234)
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, ffn_hidden=128,
                      vocab_size=tiny_tokenizer.vocab_size, max_seq_len=96, initializer_range=0.2,
                      tie_embeddings=True, backend="torch", name="serve-test")
    return Transformer(cfg, backend="torch").eval()


@pytest.fixture(scope="session")
def greedy_reference(serve_model):
    """Greedy continuation recomputing the full sequence every step (no KV cache): the ground truth."""

    @torch.no_grad()
    def run(prompt_ids, max_tokens, stop_ids=()):
        ids, out = list(prompt_ids), []
        for _ in range(max_tokens):
            token = int(serve_model(torch.tensor([ids]))[0, -1].float().argmax())
            out.append(token)
            ids.append(token)
            if token in stop_ids:
                break
        return out

    return run


@pytest.fixture(scope="session")
def serve_prompts():
    """Prompts of different lengths, one with multi-byte UTF-8."""
    return list(PROMPTS)


PROMPTS = ["def main():\n    return 0", "import os", "x", "class Foo(Bar):\n    '''Docs: \u00e9t\u00e9 \u4e16\u754c'''\n"]


class _LaunchCounter:
    """Stands in for a ``@triton.jit`` kernel: counts ``kernel[grid](...)`` launches, then launches."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def decode_launches(monkeypatch):
    """Counts launches of the split-K decode kernel (the one every KV-cache attention call runs), so a
    test proves the Triton path ran instead of a silent fallback to the PyTorch reference."""
    from tritium.kernels import decode

    counter = _LaunchCounter(decode._decode_split_kernel)
    monkeypatch.setattr(decode, "_decode_split_kernel", counter)
    return counter


@pytest.fixture(scope="session")
def triton_serve_model(serve_model):
    """``serve_model``'s weights on the Triton backend (kernels run in the interpreter on CPU)."""
    model = Transformer(serve_model.config, backend="triton")
    model.load_state_dict(serve_model.state_dict())
    return model.eval()
