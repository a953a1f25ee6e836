"""Pretraining: next-token loss over packed token shards, on ``fit``.

``prepare_inputs`` turns ``cfg.data`` into (tokenizer, prepared data dir):

* a folder with ``manifest.json`` -> used as is (tokenizer: ``cfg.tokenizer``,
  else ``tokenizer.model`` inside the folder);
* raw text files/folders -> tokenized into ``RUN/data`` (tokenizer: given, or
  trained on those files into ``RUN/tokenizer``);
* nothing -> the embedded corpus, the same way.

It runs once, before the ranks start (``tritium train`` calls it in the
parent) or on rank 0 with the others waiting (``deepspeed --module tritium.train``).
Prepared data and tokenizers are reused when already there (e.g. on resume).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tritium.train.config import TrainConfig
from tritium.train.loop import Objective, count_targets


def summed_next_token_nll(model, batch: Mapping[str, torch.Tensor]):
    """Summed NLL of the shifted labels (-100 = no loss) -- the fused loss: no (B, T, V) logits."""
    total = model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch.get("position_ids"),
                  cu_seqlens=batch.get("cu_seqlens"), loss_reduction="sum")
    return total, {"num_tokens": count_targets(batch)}


# The pretraining objective: a step's loss is its summed NLL / its counted targets over all micro-batches
# and ranks (``tritium.train.loop``), so packing with ignored positions never reweights tokens.
next_token_objective = Objective(loss=summed_next_token_nll, count=count_targets, name="next-token NLL")


def _is_prepared(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file()


def prepare_inputs(cfg: TrainConfig, vocab_size: int | None = None):
    """(tokenizer, data_dir) for cfg, preparing what is missing; returns a cfg-independent result."""
    from tritium.model.config import ModelConfig
    from tritium.model.tokenizer import Tokenizer, train_tokenizer
    from tritium.train.data import prepare_data, read_manifest

    run_dir = Path(cfg.out)
    inputs = [Path(p) for p in cfg.data]
    if len(inputs) == 1 and _is_prepared(inputs[0]):
        data_dir = inputs[0]
        if cfg.tokenizer:
            tokenizer = Tokenizer.load(cfg.tokenizer)
        elif (data_dir / "tokenizer.model").is_file():
            tokenizer = Tokenizer.load(data_dir)
        else:
            raise ValueError(f"--data {data_dir} is a prepared folder without tokenizer.model: pass --tokenizer "
                             "(the one it was prepared with)")
        read_manifest(data_dir)
        return tokenizer, data_dir
    if any(_is_prepared(p) for p in inputs):
        raise ValueError("--data: give one prepared folder, or raw text files/folders, not a mix")
    data_dir = run_dir / "data"
    tokenizer_dir = run_dir / "tokenizer"
    if cfg.tokenizer:
        tokenizer = Tokenizer.load(cfg.tokenizer)
    elif (tokenizer_dir / "tokenizer.model").is_file():
        tokenizer = Tokenizer.load(tokenizer_dir)
    else:
        if vocab_size is None:
            vocab_size = cfg.model.get("vocab_size") or ModelConfig.from_name(cfg.preset).vocab_size
        tokenizer = train_tokenizer(inputs or None, vocab_size, tokenizer_dir, **_corpus_kwargs(cfg, inputs),
                                    vocab_flag="--model-override vocab_size=N (or a ready --tokenizer)")
    if _is_prepared(data_dir):
        manifest = read_manifest(data_dir)
        if manifest["tokenizer"]["fingerprint"] == tokenizer.fingerprint:
            return tokenizer, data_dir
    prepare_data(inputs or None, tokenizer, data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed,
                 **_corpus_kwargs(cfg, inputs))
    return tokenizer, data_dir


def _corpus_kwargs(cfg: TrainConfig, inputs: list[Path]) -> dict[str, Any]:
    return {"max_bytes": cfg.corpus_bytes} if cfg.corpus_bytes and not inputs else {}


def pretrain(cfg: TrainConfig):
    """Pretrain per cfg on this rank (every rank calls it); returns ``fit``'s RunResult."""
    import torch.distributed as dist

    from tritium.train.data import PackedDataset
    from tritium.train.engine import init_distributed
    from tritium.train.trainer import fit

    rank, world, _ = init_distributed(cfg)
    cfg.validate(world)
    if rank == 0:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        prepared = prepare_inputs(cfg)
    dist.barrier()  # rank 0 prepared (or found) everything; the others now only read
    tokenizer, data_dir = prepared if rank == 0 else prepare_inputs(cfg)
    micro_batch, _, _ = cfg.batch_layout(world)

    def make_batches(start: int, rank: int, world: int):
        dataset = PackedDataset(data_dir, "train", cfg.seq_len, seed=cfg.seed, rank=rank, world_size=world,
                                tokenizer_fingerprint=tokenizer.fingerprint, doc_aware=cfg.doc_aware)
        return dataset.batches(micro_batch, start=start)

    def make_eval_batches(rank: int, world: int):
        dataset = PackedDataset(data_dir, "validation", cfg.seq_len, seed=cfg.seed, rank=rank, world_size=world,
                                tokenizer_fingerprint=tokenizer.fingerprint, doc_aware=cfg.doc_aware, shuffle=False)
        return dataset.batches(micro_batch, epochs=1) if len(dataset) >= micro_batch else iter(())

    has_validation = _has_split(data_dir, "validation", cfg.seq_len, world)
    return fit(cfg, make_batches=make_batches, loss_fn=next_token_objective,
               make_eval_batches=make_eval_batches if has_validation else None, tokenizer=tokenizer,
               extra_config={"data": {"dir": str(data_dir), "tokenizer": tokenizer.fingerprint}},
               client_state=lambda: {"tokenizer_fingerprint": tokenizer.fingerprint})


def _has_split(data_dir: Path, split: str, seq_len: int, world: int) -> bool:
    from tritium.train.data import read_manifest

    info = read_manifest(data_dir)["splits"].get(split, {})
    return (info.get("tokens", 0) - 1) // seq_len >= world
