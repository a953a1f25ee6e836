"""ZeRO-3 on 2 CPU ranks with the Triton kernels (fused linear cross-entropy, RMSNorm, ...).

The hazard (kernels/loss.py): under ZeRO-3 a parameter outside its module's forward is a 0-element
placeholder, so the fused loss must see the LM head gathered. Here each rank runs the model with
``backend="triton"`` under TRITON_INTERPRET=1, counts its Triton launches (the ledger of
kernels/_runtime.py) and writes them to a file; the losses must equal a plain single-process
PyTorch loop over the same global batches with the torch backend.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from tritium.net import free_port

GLOBAL_BATCH = 4
MICRO = 2  # per rank: 2 ranks x 2 = the global batch, no accumulation
SEQ_LEN = 8  # tiny: every Triton program is Python under the interpreter
STEPS = 2
MODEL = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, ffn_hidden=48,
             vocab_size=64, max_seq_len=SEQ_LEN, tie_embeddings=True)


def _tokens() -> torch.Tensor:
    return torch.randint(0, 32, (STEPS * GLOBAL_BATCH, SEQ_LEN + 1), generator=torch.Generator().manual_seed(5))


def _train_config(out: str, micro: int, backend: str):
    from tritium.train.config import TrainConfig

    return TrainConfig(preset="tiny", model=MODEL, backend=backend, seq_len=SEQ_LEN, micro_batch=micro,
                       grad_accum=1, max_steps=STEPS, lr=3e-3, warmup_steps=1, schedule="constant",
                       weight_decay=0.0, grad_clip=0.0, zero_stage=3, precision="fp32", out=out, seed=3,
                       log_interval=1, eval_interval=0, save_interval=0, progress=False, export=False)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu",
                      OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    torch.set_num_threads(1)
    from tritium.kernels._runtime import count_launches
    from tritium.train.engine import build_engine, init_distributed, resolve_model_config
    from tritium.train.loop import run
    from tritium.train.pretrain import next_token_objective

    tokens = _tokens()

    def batches(start: int):
        step = start
        while True:
            rows = tokens[step * GLOBAL_BATCH + rank * MICRO:step * GLOBAL_BATCH + (rank + 1) * MICRO]
            yield {"input_ids": rows[:, :-1].clone(), "labels": rows[:, 1:].clone()}
            step += 1

    cfg = _train_config(os.path.join(out_dir, "run"), MICRO, "triton")
    init_distributed(cfg)
    engine = build_engine(cfg, resolve_model_config(cfg), world_size=world)
    with count_launches() as ledger:
        result = run(engine, batches, next_token_objective, cfg=cfg)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump({"launches": dict(ledger), "loss": [r["loss"] for r in result.history],
                   "backend": engine.module.backend}, handle)
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()



def _torch_reference() -> list[float]:
    """The same steps in one process, torch backend, full global batch, plain AdamW."""
    from tritium.model.transformer import Transformer
    from tritium.train.engine import param_groups, resolve_model_config, seed_everything

    cfg = _train_config("unused", GLOBAL_BATCH, "torch")
    seed_everything(cfg.seed)
    model = Transformer(resolve_model_config(cfg), backend="torch")
    seed_everything(cfg.seed)
    model.init_weights()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.adam_eps)
    tokens = _tokens()
    losses = []
    for step in range(STEPS):
        rows = tokens[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH]
        loss = model(rows[:, :-1], labels=rows[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_zero3_two_ranks_run_the_triton_loss_and_norm(tmp_path):
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, got in enumerate(ranks):
        launches = got["launches"]
        for kernel in ("_cross_entropy_kernel", "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel"):
            assert launches.get(kernel, 0) > 0, f"rank {rank} never launched {kernel}: {launches}"
    reference = _torch_reference()
    torch.testing.assert_close(torch.tensor(ranks[0]["loss"]), torch.tensor(reference), rtol=1e-4, atol=1e-5)
