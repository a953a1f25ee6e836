"""A step's gradient never depends on how its examples are split into micro-batches and ranks (issue 15.1).

The issue's case: a 1-layer model (hidden 64, 4 heads / 2 kv heads, head_dim 16, FFN 96, vocab 128), fp32,
ZeRO-0, two examples with 3 and 24 target tokens.  The gradient DeepSpeed hands the optimizer at the
accumulation boundary must equal the gradient of the mean NLL over all 27 targets (the full-batch fp32
reference) for ``(micro 2, accum 1)``, ``(micro 1, accum 2)`` and ``(2 ranks x micro 1)``, for pretraining
(``next_token_objective``) and SFT (``sft_objective``); the logged loss must equal the full-batch loss.
Before the fix ``(micro 1, accum 2)`` was off by 1.18 in relative L2 norm (the average of two means).

Two spawns keep the cost down (importing deepspeed is slow): one 1-rank process runs every single-rank
layout (plus the SFT case on the Triton backend, as the issue ran it), one 2-rank group runs both
objectives; the reference runs here, without DeepSpeed.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from tritium.net import free_port

MODEL = dict(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, ffn_hidden=96,
             vocab_size=128, max_seq_len=64, tie_embeddings=False)
SEQ_LEN = 32
TARGETS = (3, 24)  # loss-carrying tokens of the two examples
# (name, objective, micro batch, grad accum, backend) per world size
CASES = {1: [("pretrain-m2a1", "pretrain", 2, 1, "torch"), ("pretrain-m1a2", "pretrain", 1, 2, "torch"),
             ("sft-m2a1", "sft", 2, 1, "torch"), ("sft-m1a2", "sft", 1, 2, "torch"),
             ("sft-m1a2-triton", "sft", 1, 2, "triton")],
         2: [("pretrain-r2", "pretrain", 1, 1, "torch"), ("sft-r2", "sft", 1, 1, "torch")]}


def _examples() -> list[tuple[list[int], list[int]]]:
    """Two SFT examples (ids, loss mask): 3 and 24 completion tokens after prompts of 7 and 6 tokens."""
    generator = torch.Generator().manual_seed(3)
    out = []
    for prompt, completion in ((7, TARGETS[0]), (6, TARGETS[1])):
        ids = torch.randint(3, MODEL["vocab_size"], (prompt + completion,), generator=generator).tolist()
        out.append((ids, [0] * prompt + [1] * completion))
    return out


def _batches(kind: str) -> list[dict[str, torch.Tensor]]:
    """One micro-batch per example; SFT rows are packed with cu_seqlens, pretraining rows padded with -100."""
    from tritium.align.sft import collate_rows, pack_rows, shifted_labels

    examples = _examples()
    if kind == "sft":
        rows = pack_rows(examples, SEQ_LEN, pad_id=0, packing=False)
        return [collate_rows([row]) for row in rows]
    batches = []
    for ids, mask in examples:
        # document-aware pretraining: only the last len(target) positions of the row count
        labels = shifted_labels(ids, mask) + [-100] * (SEQ_LEN - len(ids))
        batches.append({"input_ids": torch.tensor([ids + [0] * (SEQ_LEN - len(ids))]),
                        "labels": torch.tensor([labels])})
    return batches


def _merge(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Both examples in one micro-batch (cu_seqlens offset by the rows before)."""
    merged = {key: torch.cat([b[key] for b in batches]) for key in batches[0] if key != "cu_seqlens"}
    if "cu_seqlens" in batches[0]:
        first, second = batches[0]["cu_seqlens"], batches[1]["cu_seqlens"]
        merged["cu_seqlens"] = torch.cat([first, second[1:] + first[-1]])
    return merged


def _objective(kind: str):
    from tritium.align.sft import sft_objective
    from tritium.train.pretrain import next_token_objective

    return sft_objective if kind == "sft" else next_token_objective


def _config(micro: int, accum: int, backend: str, out: str):
    from tritium.train.config import TrainConfig

    return TrainConfig(preset="tiny", model=MODEL, backend=backend, seq_len=SEQ_LEN, micro_batch=micro,
                       grad_accum=accum, max_steps=1, lr=1e-3, warmup_steps=0, schedule="constant", grad_clip=0.0,
                       zero_stage=0, precision="fp32", out=out, seed=11, log_interval=1, eval_interval=0,
                       save_interval=0, progress=False, export=False)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                      TRITON_INTERPRET="1")
    torch.set_num_threads(1)
    from tritium.train.engine import build_engine, init_distributed, resolve_model_config
    from tritium.train.loop import run

    results = {}
    for name, kind, micro, accum, backend in CASES[world]:
        cfg = _config(micro, accum, backend, os.path.join(out_dir, name))
        init_distributed(cfg)
        engine = build_engine(cfg, resolve_model_config(cfg), world_size=world)
        grads: dict[str, torch.Tensor] = {}

        def capture(optimizer, args, kwargs, engine=engine, grads=grads):
            # the gradient at the accumulation boundary, after DeepSpeed's all-reduce, before the update
            for param_name, param in engine.module.named_parameters():
                grads[param_name] = param.grad.detach().clone()

        engine.optimizer.register_step_pre_hook(capture)
        examples = _batches(kind)
        if world == 2:
            batches = [examples[rank]]
        else:
            batches = [_merge(examples)] if micro == 2 else examples
        result = run(engine, batches, _objective(kind), cfg=cfg)
        if rank == 0:
            results[name] = {"loss": result.history[-1]["loss"],
                             "grads": {k: v.tolist() for k, v in grads.items()}}
        del engine
    if rank == 0:
        with open(os.path.join(out_dir, f"world{world}.json"), "w") as handle:
            json.dump(results, handle)
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()



def _reference(kind: str) -> tuple[float, dict[str, torch.Tensor]]:
    """Full-batch fp32 reference with plain PyTorch: mean NLL over all 27 targets and its gradient."""
    from tritium.model.transformer import Transformer
    from tritium.train.engine import resolve_model_config, seed_everything

    cfg = _config(2, 1, "torch", "unused")
    seed_everything(cfg.seed)
    model = Transformer(resolve_model_config(cfg), backend="torch")
    seed_everything(cfg.seed)
    model.init_weights()
    batch = _merge(_batches(kind))
    token_nll = model(batch["input_ids"], position_ids=batch.get("position_ids"), cu_seqlens=batch.get("cu_seqlens"),
                      labels=batch["labels"], loss_reduction="none")
    loss = token_nll.sum() / (batch["labels"] != -100).sum()
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _relative_error(got: dict[str, list], want: dict[str, torch.Tensor]) -> float:
    diff = torch.cat([(torch.tensor(got[k]) - v).flatten() for k, v in want.items()])
    return float(diff.norm() / torch.cat([v.flatten() for v in want.values()]).norm())


def test_objectives_sum_and_count_the_targets():
    """The pieces the loop relies on: count() = loss-carrying tokens, loss() = their summed NLL."""
    from tritium.model.config import ModelConfig
    from tritium.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**MODEL), backend="torch")
    for kind in ("pretrain", "sft"):
        objective = _objective(kind)
        batches = _batches(kind)
        assert [objective.count(b) for b in batches] == list(TARGETS)
        total, _ = objective.loss(model, batches[0])
        mean, _ = objective.mean(model, batches[0])
        assert mean.item() == pytest.approx(total.item() / TARGETS[0], rel=1e-6)


@pytest.mark.slow
def test_gradient_is_independent_of_micro_batch_and_rank_split(tmp_path):
    for world in (1, 2):
        mp.start_processes(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True,
                           start_method="spawn")
    results = {**json.loads((tmp_path / "world1.json").read_text()),
               **json.loads((tmp_path / "world2.json").read_text())}
    references = {kind: _reference(kind) for kind in ("pretrain", "sft")}
    for world in (1, 2):
        for name, kind, *_ in CASES[world]:
            ref_loss, ref_grads = references[kind]
            got = results[name]
            error = _relative_error(got["grads"], ref_grads)
            assert error < 1e-5, f"{name}: gradient off by {error:.3g} (relative L2) from the full-batch reference"
            assert got["loss"] == pytest.approx(ref_loss, rel=1e-5), f"{name}: logged loss {got['loss']} != {ref_loss}"
