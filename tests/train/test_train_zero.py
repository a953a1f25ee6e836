"""ZeRO-1/2/3 on 2 CPU ranks (gloo) give the losses of a 1-rank run over the same global batch.

One spawn per world size keeps the cost down (importing deepspeed is slow):
the 2-rank group trains four engines in turn (stage 1, 2 with gradient
accumulation, 3 with the tied LM head gathered for the fused loss, 3 with
optimizer states and parameters offloaded to the CPU), the
1-rank group trains the ZeRO-0 reference with accumulation, and a plain
PyTorch AdamW loop (no DeepSpeed) checks that reference independently.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from tritium.net import free_port

GLOBAL_BATCH = 8
SEQ_LEN = 16
STEPS = 4
VOCAB = 256
# (name, zero stage, micro batch, grad accum, offload) per world size; each covers GLOBAL_BATCH sequences per step
LAYOUTS = {1: [("zero0", 0, 4, 2, "none")],
           2: [("zero1", 1, 4, 1, "none"), ("zero2", 2, 2, 2, "none"), ("zero3", 3, 4, 1, "none"),
               ("zero3-offload", 3, 4, 1, "all")]}
MODEL = dict(hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, ffn_hidden=80,
             vocab_size=VOCAB, max_seq_len=32, tie_embeddings=True)


def _tokens() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    # a 32-token subset of the vocabulary: learnable in a few steps, so the loss visibly falls
    return torch.randint(0, 32, (STEPS * GLOBAL_BATCH, SEQ_LEN + 1), generator=generator)


def _train_config(stage: int, micro: int, accum: int, out: str, offload: str = "none"):
    from tritium.train.config import TrainConfig

    return TrainConfig(preset="tiny", model=MODEL, backend="torch", seq_len=SEQ_LEN, micro_batch=micro,
                       grad_accum=accum, max_steps=STEPS, lr=3e-3, warmup_steps=1, schedule="cosine",
                       weight_decay=0.1, grad_clip=1.0, zero_stage=stage, offload=offload, precision="fp32",
                       out=out, seed=7, log_interval=1, eval_interval=0, save_interval=0, progress=False, export=False)


def _micro_batches(tokens: torch.Tensor, rank: int, world: int, micro: int, accum: int):
    """Rank ``rank``'s micro-batches: step s, accumulation slot a -> rows s*G + (rank*accum + a)*micro."""
    def source(start: int):
        index = start
        while True:
            step, slot = divmod(index, accum)
            first = step * GLOBAL_BATCH + (rank * accum + slot) * micro
            rows = tokens[first:first + micro]
            yield {"input_ids": rows[:, :-1].clone(), "labels": rows[:, 1:].clone()}
            index += 1
    return source


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu",
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from tritium.model.config import ModelConfig
    from tritium.train.engine import build_engine, init_distributed, resolve_model_config
    from tritium.train.loop import run
    from tritium.train.pretrain import next_token_objective

    tokens = _tokens()
    results = {}
    for name, stage, micro, accum, offload in LAYOUTS[world]:
        cfg = _train_config(stage, micro, accum, os.path.join(out_dir, f"w{world}_{name}"), offload)
        init_distributed(cfg)
        model_cfg = resolve_model_config(cfg)
        assert isinstance(model_cfg, ModelConfig)
        engine = build_engine(cfg, model_cfg, world_size=world)
        result = run(engine, _micro_batches(tokens, rank, world, micro, accum), next_token_objective, cfg=cfg)
        if rank == 0:
            results[name] = {"loss": [r["loss"] for r in result.history],
                                       "grad_norm": [r["grad_norm"] for r in result.history],
                                       "lr": [r["lr"] for r in result.history]}
        del engine
    if rank == 0:
        with open(os.path.join(out_dir, f"world{world}.json"), "w") as handle:
            json.dump(results, handle)
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def _torch_reference() -> list[float]:
    """The same 4 steps with plain PyTorch: AdamW (decay on matrices), LambdaLR, clipping, full batch."""
    from tritium.model.transformer import Transformer
    from tritium.train.engine import lr_lambda, param_groups, resolve_model_config, seed_everything

    cfg = _train_config(0, GLOBAL_BATCH, 1, "unused")
    seed_everything(cfg.seed)
    model = Transformer(resolve_model_config(cfg), backend="torch")
    seed_everything(cfg.seed)
    model.init_weights()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    tokens = _tokens()
    losses = []
    for step in range(STEPS):
        rows = tokens[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH]
        loss = model(rows[:, :-1], labels=rows[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_zero_stages_on_two_ranks_match_one_rank(tmp_path):
    for world in (1, 2):
        mp.start_processes(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True,
                           start_method="spawn")
    one = json.loads((tmp_path / "world1.json").read_text())["zero0"]
    two = json.loads((tmp_path / "world2.json").read_text())
    reference = _torch_reference()
    assert len(one["loss"]) == STEPS
    # the 1-rank DeepSpeed run (ZeRO-0, accumulation 2) equals plain PyTorch over the full batch
    torch.testing.assert_close(torch.tensor(one["loss"]), torch.tensor(reference), rtol=1e-4, atol=1e-5)
    assert one["loss"][-1] < one["loss"][0], "the tiny model should learn the repeated batches"
    for name in ("zero1", "zero2", "zero3", "zero3-offload"):
        run = two[name]
        torch.testing.assert_close(torch.tensor(run["loss"]), torch.tensor(one["loss"]), rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name} on 2 ranks vs 1 rank: {m}")
        torch.testing.assert_close(torch.tensor(run["grad_norm"]), torch.tensor(one["grad_norm"]), rtol=1e-3,
                                   atol=1e-5, msg=lambda m, name=name: f"{name} grad norms: {m}")
        assert run["lr"] == pytest.approx(one["lr"])
