"""``fit``: one call from a TrainConfig to a trained, exported run folder.

Pretraining (``train/pretrain.py``), SFT and DPO (``align/``) all come through
here, each with its own ``make_batches`` and ``loss_fn``; the order of
operations -- distributed init, seeding, model under ZeRO-3 ``zero.Init``,
DeepSpeed engine, resume, the loop, HF export, the plot -- is written once.

Run folder (``cfg.out``)::

    config.json       resolved configs: train, model, deepspeed, world size (+ extra_config)
    metrics.jsonl     one JSON object per logged step (step, loss, lr, grad_norm, tokens_per_s, mfu, ...)
    checkpoints/      DeepSpeed checkpoints, keep-last-K, 'latest' pointer (train/checkpoints.py)
    final/            Hugging Face layout (config.json, model.safetensors) + tokenizer.model
    loss.png          the loss curve
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tritium.train.config import TrainConfig

MakeBatches = Callable[[int, int, int], Iterable[Mapping[str, Any]]]  # (start, rank, world) -> micro-batches
MakeEvalBatches = Callable[[int, int], Iterable[Mapping[str, Any]]]  # (rank, world) -> finite micro-batches


@dataclass
class RunResult:
    run_dir: Path  # the run folder
    final_dir: Path | None  # the HF export (None when interrupted or export disabled)
    steps: int  # optimizer steps completed (including those before a resume)
    last_loss: float | None  # the last logged training loss
    interrupted: bool = False  # stopped by SIGTERM/SIGINT after saving a checkpoint
    history: list[dict[str, Any]] = field(default_factory=list)  # records logged by this process (rank 0)
    metrics_path: Path | None = None  # run_dir/metrics.jsonl
    world_size: int = 1  # ranks that trained
    resumed_from: str | None = None  # checkpoint this run continued from


def fit(cfg: TrainConfig, *, make_batches: MakeBatches, loss_fn, model_config=None,
        make_eval_batches: MakeEvalBatches | None = None, eval_loss_fn=None, tokenizer=None,
        init_from: str | None = None, model=None, extra_config: dict[str, Any] | None = None,
        flops_per_token: float | None = None, client_state: Callable[[], dict[str, Any]] | None = None,
        on_log: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """Train per ``cfg`` on this process's rank (a collective: every rank calls it).

    make_batches(start, rank, world): this rank's micro-batches from micro-batch ``start`` on
        (deterministic, rank-disjoint; called again at the current position if it runs out).
    loss_fn: the ``tritium.train.loop.Objective`` (``count(batch)``, ``loss(model, batch) -> (sum_loss,
        metrics)``); a step's loss is the summed loss over all its micro-batches and ranks / their count.
    eval_loss_fn: the validation objective (default: loss_fn).
    model_config: the ModelConfig (default: from cfg -- init_from's config.json, or preset + overrides).
    init_from: HF-layout dir to load weights from (default cfg.init_from); model: a ready nn.Module instead.
    tokenizer: saved into final/ next to the weights.
    """
    from tritium.model.sizing import flops_per_token as model_flops_per_token
    from tritium.train.checkpoints import Checkpointer, WriteError, agree_on_writes, export_final, writing
    from tritium.train.engine import build_ds_config, build_engine, init_distributed, resolve_model_config
    from tritium.train.loop import LoopState, run
    from tritium.train.metrics import plot_loss, read_metrics

    rank, world, _ = init_distributed(cfg)
    cfg.validate(world)
    run_dir = Path(cfg.out)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    init_from = init_from or cfg.init_from
    if model_config is None:
        if model is not None and hasattr(model, "config"):
            model_config = model.config
        else:
            model_config = resolve_model_config(cfg, getattr(tokenizer, "vocab_size", None))
    if tokenizer is not None and tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model_config.vocab_size} "
                         "embedding rows")
    ds_config = build_ds_config(cfg, world)
    error = None
    if rank == 0:
        resolved = {"train": cfg.to_dict(), "model": model_config.to_dict(), "deepspeed": ds_config,
                    "world_size": world, **(extra_config or {})}
        try:
            with writing(run_dir / "config.json", "run config"):
                (run_dir / "config.json").write_text(json.dumps(resolved, indent=2, sort_keys=True, default=str)
                                                     + "\n")
        except WriteError as exc:
            error = exc
    agree_on_writes(error, "run config")
    engine = build_engine(cfg, model_config, world_size=world, model=model, init_from=init_from, ds_config=ds_config)

    checkpointer = Checkpointer(run_dir / "checkpoints", keep_last=cfg.keep_last)
    state = LoopState()
    resumed_from = None
    if cfg.resume:
        restored = checkpointer.load(engine, cfg.resume)
        state = LoopState.from_dict(restored.get("loop", {}))
        state.micro_step = int(restored.get("micro_step", state.micro_step))
        resumed_from = restored.get("checkpoint")
        error = None
        if rank == 0:
            try:
                with writing(run_dir / "metrics.jsonl", "log"):
                    _truncate_metrics(run_dir / "metrics.jsonl", state.step)
            except WriteError as exc:
                error = exc
        agree_on_writes(error, "metrics log")
        if rank == 0:
            print(f"tritium: resumed from {resumed_from} at step {state.step}", flush=True)
    fpt = flops_per_token or model_flops_per_token(model_config, cfg.seq_len, training=True)
    eval_source = (lambda: make_eval_batches(rank, world)) if make_eval_batches is not None else None
    result = run(engine, lambda start: make_batches(start, rank, world), loss_fn, cfg=cfg, run_dir=run_dir,
                 state=state, checkpointer=checkpointer, make_eval_batches=eval_source, eval_loss_fn=eval_loss_fn,
                 flops_per_token=fpt, client_state=client_state, on_log=on_log)
    exported = cfg.export and not result.interrupted
    if exported:
        export_final(engine, run_dir / "final", tokenizer)
    metrics_path = run_dir / "metrics.jsonl"
    error = None
    if rank == 0 and metrics_path.is_file():
        try:
            with writing(run_dir / "loss.png", "plot"):
                plot_loss(read_metrics(metrics_path), run_dir / "loss.png", title=f"{model_config.name}: loss")
        except WriteError as exc:
            error = exc
    agree_on_writes(error, "loss plot")
    return RunResult(run_dir=run_dir, final_dir=run_dir / "final" if exported else None,
                     steps=result.state.step, last_loss=result.last_loss, interrupted=result.interrupted,
                     history=result.history, metrics_path=metrics_path, world_size=world, resumed_from=resumed_from)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after the resumed checkpoint, so metrics.jsonl reads as one continuous run."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))
