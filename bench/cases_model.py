"""One decoder block and the whole model: a training step (forward, loss,
backward) per backend, reported as tokens/s and MFU against the measured
matmul ceiling; and a full optimizer step (forward, backward, AdamW) of the
default backend against Hugging Face ``LlamaForCausalLM`` on the same dials.

Training FLOPs per token come from ``tritium.model.sizing.flops_per_token``
(6N plus the attention term), the same count the trainer's MFU uses.
"""
from __future__ import annotations

import torch

from tritium.bench.registry import Case, Skip, register
from tritium.model.config import ModelConfig
from tritium.model.sizing import flops_per_token
from tritium.model.transformer import Transformer

BACKENDS = ("triton", "torch", "torch.compile", "sdpa")


def _config(size):
    overrides = {"max_seq_len": max(size["T"], 256)}
    if size.get("layers"):
        overrides["num_layers"] = size["layers"]
    return ModelConfig.from_name(size["preset"], **overrides)


def _step_factory(backend: str):
    def factory(size, mode, device, dtype):
        if backend == "triton" and device != "cuda":
            raise Skip("the triton backend is timed on CUDA only")
        if backend == "torch.compile" and device != "cuda":
            raise Skip("torch.compile baseline runs on CUDA only")
        cfg = _config(size)
        model = Transformer(cfg, backend="torch" if backend == "torch.compile" else backend)
        model = model.to(device=device, dtype=dtype)
        B, T = size["B"], size["T"]
        ids = torch.randint(0, cfg.vocab_size, (B, T), device=device)
        labels = torch.randint(0, cfg.vocab_size, (B, T), device=device)
        if size["scope"] == "block":
            block = model.layers[0]  # bound to the model's backend like every layer
            x = torch.randn(B, T, cfg.hidden_size, device=device, dtype=dtype, requires_grad=True)
            cos, sin = model.rotary(T, device=device)

            def step():
                block(x, cos, sin).float().square().mean().backward()
        else:
            def step():
                model(ids, labels=labels).backward()
        if backend == "torch.compile":
            step = torch.compile(step)
        return step
    return factory


def _tokens(size, mode):
    return size["B"] * size["T"]


def _flops(size, mode):
    cfg = _config(size)
    T = size["T"]
    if size["scope"] == "block":
        # 6 FLOPs per parameter per token (fwd + bwd) plus causal attention: QK^T and PV are
        # 4·T·q_size per token forward without a mask, halved by causality, tripled for training.
        h, q, kv, f = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.ffn_hidden
        matrices = 2 * h * q + 2 * h * kv + (3 if cfg.ffn_type == "swiglu" else 2) * h * f
        per_token = 6 * matrices + 6 * T * q
    else:
        per_token = flops_per_token(cfg, T, training=True)
    return per_token * size["B"] * T


register(Case(
    name="model_block", area="model",
    sizes=[{"preset": "1b", "scope": "block", "B": 1, "T": t} for t in (2048, 4096, 8192)],
    quick_sizes=[{"preset": "1b", "scope": "block", "B": 1, "T": 4096}],
    cpu_sizes=[{"preset": "tiny", "scope": "block", "B": 2, "T": 64}],
    providers={b: _step_factory(b) for b in BACKENDS},
    metric="tokens/s", modes=("fwd+bwd",), work=_tokens, flops=_flops, baseline="torch",
))

register(Case(
    name="model_step", area="model",
    sizes=[{"preset": "1b", "scope": "model", "B": 1, "T": 4096}, {"preset": "1b", "scope": "model", "B": 2, "T": 4096}],
    quick_sizes=[{"preset": "1b", "scope": "model", "B": 1, "T": 4096}],
    cpu_sizes=[{"preset": "tiny", "scope": "model", "B": 2, "T": 64, "layers": 2}],
    providers={b: _step_factory(b) for b in BACKENDS},
    metric="tokens/s", modes=("fwd+bwd",), work=_tokens, flops=_flops, baseline="torch",
    note="MFU = model FLOPs/s over the measured bf16 matmul rate (not the datasheet peak)",
))


def _hf_model(cfg: ModelConfig):
    # transformers is a heavy optional import: only this provider needs it.
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.ffn_type != "swiglu":
        raise Skip("Hugging Face Llama has no GELU feed-forward")
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa"))


def _optimizer_step_factory(provider: str):
    """forward + loss + backward + AdamW on one (B, T) batch: what a training step costs a user."""
    def factory(size, mode, device, dtype):
        cfg = _config(size)
        if provider == "hf":
            model = _hf_model(cfg).to(device=device, dtype=dtype)
            loss_fn = lambda ids, labels: model(input_ids=ids, labels=labels).loss  # noqa: E731 - shifts inside
        else:
            model = Transformer(cfg, backend=provider).to(device=device, dtype=dtype)
            loss_fn = lambda ids, labels: model(ids, labels=labels)  # noqa: E731
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, cfg.vocab_size, (size["B"], size["T"]), device=device)

        def step():
            loss_fn(ids, ids).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step
    return factory


register(Case(
    name="model_optimizer_step", area="model",
    sizes=[{"preset": "1b", "scope": "model", "B": 1, "T": 4096}],
    quick_sizes=[{"preset": "1b", "scope": "model", "B": 1, "T": 4096}],
    cpu_sizes=[{"preset": "tiny", "scope": "model", "B": 8, "T": 256}],
    providers={p: _optimizer_step_factory(p) for p in ("auto", "sdpa", "torch", "hf")},
    metric="tokens/s", modes=("fwd+bwd",), work=_tokens, flops=_flops, baseline="hf",
    note="the default backend ('auto') against Hugging Face LlamaForCausalLM (sdpa) on the same dials, "
         "forward + backward + AdamW; on a shared CPU compare interleaved medians (README, Backends)",
))
