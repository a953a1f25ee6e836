"""The training step on the DeepSpeed engine: tokens/s and MFU per ZeRO stage,
with activation checkpointing off and on.

One process, one rank: the engine's forward, backward (with ZeRO's gradient
partitioning and, for stage 3, parameter gathering) and optimizer step, which
is what ``tritium train`` repeats.  Multi-rank scaling needs the launcher and
is measured by a run's own ``metrics.jsonl`` (tokens_per_s, mfu).
"""
from __future__ import annotations

import gc
import tempfile

import torch

from tritium.bench.registry import Case, register

_LIVE: list = []  # the previous provider's engine, released before the next is built


def _step_factory(zero_stage: int, checkpointing: bool):
    def factory(size, mode, device, dtype):
        from tritium.train.config import TrainConfig
        from tritium.train.engine import build_engine, init_distributed, resolve_model_config

        _LIVE.clear()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        init_distributed()
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
        cfg = TrainConfig(preset=size["preset"], zero_stage=zero_stage, gradient_checkpointing=checkpointing,
                          micro_batch=size["B"], grad_accum=1, seq_len=size["T"], precision=precision,
                          model={"max_seq_len": max(size["T"], 256), **({"num_layers": size["layers"]}
                                                                         if size.get("layers") else {})},
                          out=tempfile.mkdtemp(prefix="tritium-bench-train-"), max_steps=10**6,
                          progress=False, export=False)
        engine = build_engine(cfg, resolve_model_config(cfg), world_size=1)
        _LIVE.append(engine)
        vocab = engine.module.config.vocab_size
        ids = torch.randint(0, vocab, (size["B"], size["T"]), device=engine.device)
        labels = torch.randint(0, vocab, (size["B"], size["T"]), device=engine.device)

        def step():
            loss = engine(ids, labels=labels)
            engine.backward(loss)
            engine.step()
        return step
    return factory


def _tokens(size, mode):
    return size["B"] * size["T"]


def _flops(size, mode):
    from tritium.model.config import ModelConfig
    from tritium.model.sizing import flops_per_token

    overrides = {"max_seq_len": max(size["T"], 256)}
    if size.get("layers"):
        overrides["num_layers"] = size["layers"]
    cfg = ModelConfig.from_name(size["preset"], **overrides)
    return flops_per_token(cfg, size["T"], training=True) * size["B"] * size["T"]


register(Case(
    name="train_step", area="train",
    sizes=[{"preset": "1b", "B": 1, "T": 4096}, {"preset": "1b", "B": 2, "T": 4096}],
    quick_sizes=[{"preset": "1b", "B": 1, "T": 4096}],
    cpu_sizes=[{"preset": "tiny", "B": 4, "T": 128, "layers": 2}],
    providers={"zero1": _step_factory(1, False), "zero1+ckpt": _step_factory(1, True),
               "zero3": _step_factory(3, False), "zero3+ckpt": _step_factory(3, True)},
    metric="tokens/s", modes=("fwd+bwd",), work=_tokens, flops=_flops, baseline="zero1",
    note="one rank; MFU = model FLOPs/s over the measured matmul rate; target on one H100: >= 50% at 1B, 4k",
))
