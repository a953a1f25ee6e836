"""From a ``TrainConfig`` to a running DeepSpeed engine.

Three pieces, each importable on its own:

* ``build_ds_config(cfg, world_size)`` — the DeepSpeed JSON generated from the
  typed config (batch layout, ZeRO stage and offload, precision with loss
  scaling, clipping), with the user's ``--ds-config`` merged on top, so an
  expert can set any DeepSpeed knob without us mirroring it.
* ``param_groups`` / ``lr_lambda`` — AdamW groups that decay matrices only
  (norm gains and biases are scale parameters; decaying them toward 0 only
  hurts), and warmup + cosine / WSD (warmup-stable-decay, MiniCPM 2024)
  schedules as a multiplier for ``LambdaLR``.
* ``build_engine`` — seeds, builds the model (under ``deepspeed.zero.Init`` for
  ZeRO-3 so a model bigger than one device is never materialised whole),
  registers the LM head as an external parameter of the model for ZeRO-3
  (the fused loss reads the head inside ``Transformer.forward``, outside the
  embedding's own forward, so ZeRO must keep it gathered for the whole
  forward), and calls ``deepspeed.initialize``.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tritium.net import free_port
from tritium.train.config import TrainConfig

# DeepSpeed prints a line every steps_per_print steps; the loop does its own logging.
_QUIET_STEPS = 10**9


# ---------------------------------------------------------------------------- distributed
SINGLE_PROCESS_MARKER = "TRITIUM_SINGLE_PROCESS_WORLD"
SINGLE_PROCESS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                       SINGLE_PROCESS_MARKER)


def prepare_environment() -> None:
    """Point DeepSpeed at its CPU accelerator when there is no CUDA (before deepspeed is imported)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_distributed(cfg: TrainConfig | None = None) -> tuple[int, int, int]:
    """Start torch.distributed (idempotent) and return ``(rank, world_size, local_rank)``.

    Works under the deepspeed launcher, torchrun (both export RANK/WORLD_SIZE/
    MASTER_*), and as a plain single process (we fill in a 1-rank world).
    """
    prepare_environment()
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        # DeepSpeed reads these from the environment; the marker says we made them up, so a
        # launcher started later from this process (a test, a notebook) does not think it is a rank.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                          **{SINGLE_PROCESS_MARKER: "1"})
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = (cfg.comm_backend if cfg is not None else None) or ("nccl" if torch.cuda.is_available() else "gloo")
        deepspeed.init_distributed(dist_backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        # ranks on one CPU share its cores; oversubscription makes everything slower
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    return dist.get_rank(), dist.get_world_size(), local_rank


def seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- DeepSpeed config
def resolve_precision(precision: str) -> str:
    """``auto`` -> bf16 on CUDA devices that support it, fp32 elsewhere (CPU fp32 is the reference)."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``; nested dicts merge key by key, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_user_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--ds-config not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--ds-config {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--ds-config {path} must hold a JSON object")
    return data


def build_ds_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for ``cfg`` on ``world_size`` ranks (user --ds-config merged last)."""
    micro_batch, grad_accum, global_batch = cfg.batch_layout(world_size)
    precision = resolve_precision(cfg.precision)
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=torch.cuda.is_available(),
                    reduce_bucket_size=int(5e7), allgather_bucket_size=int(5e7))
    if cfg.zero_stage == 3:
        # the HF export gathers full 16-bit weights on rank 0 (engine.save_16bit_model)
        zero.update(stage3_gather_16bit_weights_on_model_save=True,
                    stage3_param_persistence_threshold=int(1e5), stage3_prefetch_bucket_size=int(5e7))
    pin = torch.cuda.is_available()
    if cfg.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": cfg.offload_device, "pin_memory": pin}
        if cfg.offload_device == "nvme":
            zero["offload_optimizer"]["nvme_path"] = cfg.nvme_path
    if cfg.offload in ("params", "all"):
        zero["offload_param"] = {"device": cfg.offload_device, "pin_memory": pin}
        if cfg.offload_device == "nvme":
            zero["offload_param"]["nvme_path"] = cfg.nvme_path
    ds: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
        "zero_optimization": zero,
        # our AdamW (torch) is fine under ZeRO 1-3; DeepSpeed only vouches for its own by default
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }
    if precision == "fp16":
        # dynamic loss scaling: start at 2^16, halve on overflow (the step is skipped), grow after 1000 clean steps
        ds["fp16"].update(loss_scale=cfg.loss_scale, initial_scale_power=16, loss_scale_window=1000,
                          hysteresis=2, min_loss_scale=1)
    # always explicit: DeepSpeed clips at 1.0 when the key is absent, so grad_clip=0 must say 0.0 (off)
    ds["gradient_clipping"] = float(cfg.grad_clip) if cfg.grad_clip > 0 else 0.0
    if cfg.offload in ("optimizer", "all"):
        if torch.cuda.is_available():
            # ZeRO-Offload steps the optimizer on the CPU: DeepSpeed's CPU Adam (AVX, JIT-built once) is fast
            ds["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.lr, "betas": [cfg.beta1, cfg.beta2],
                                                            "eps": cfg.adam_eps, "weight_decay": cfg.weight_decay}}
        else:
            # everything is on the CPU already: torch's AdamW avoids compiling cpu_adam (minutes) for no gain
            ds["zero_force_ds_cpu_optimizer"] = False
    if cfg.ds_config:
        ds = deep_merge(ds, load_user_ds_config(cfg.ds_config))
        _check_user_batch(ds, world_size)
    return ds


def _check_user_batch(ds: dict[str, Any], world_size: int) -> None:
    """A user ds_config may change the batch keys; they must still multiply out."""
    micro = ds.get("train_micro_batch_size_per_gpu")
    accum = ds.get("gradient_accumulation_steps")
    total = ds.get("train_batch_size")
    if None not in (micro, accum, total) and micro * accum * world_size != total:
        raise ValueError(f"--ds-config: train_batch_size={total} != train_micro_batch_size_per_gpu={micro} x "
                         f"gradient_accumulation_steps={accum} x ranks={world_size}")


# ---------------------------------------------------------------------------- optimizer and schedule
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: matrices (embeddings, projections) decay; vectors (norm gains, biases) do not."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for _, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:  # tied weights appear once
            continue
        seen.add(id(param))
        # under ZeRO-3 the local tensor is a flat shard; ds_shape keeps the logical shape
        shape = getattr(param, "ds_shape", param.shape)
        (decay if len(shape) >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based) for cfg.schedule."""
    warmup, total, floor = cfg.warmup, cfg.max_steps, cfg.min_lr_ratio
    decay_steps = max(1, round(cfg.decay_fraction * total))
    schedule = cfg.schedule

    def multiplier(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup  # never 0: a zero-lr first step wastes a batch
        if schedule == "constant":
            return 1.0
        if schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        # wsd: hold the peak, then decay linearly to the floor over the last decay_steps
        decay_start = total - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return 1.0 - (1.0 - floor) * progress

    return multiplier


def make_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    if torch.cuda.is_available():
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


# ---------------------------------------------------------------------------- model
def resolve_model_config(cfg: TrainConfig, vocab_size: int | None = None):
    """The ModelConfig for this run: init_from's config.json, else preset + overrides (+ tokenizer vocab)."""
    from tritium.model.config import ModelConfig

    if cfg.init_from:
        path = Path(cfg.init_from) / "config.json"
        model_cfg = ModelConfig.from_json(path)
        return model_cfg.replace(**cfg.model) if cfg.model else model_cfg
    overrides = {k: v for k, v in cfg.model.items() if k != "name"}
    if vocab_size is not None and "vocab_size" not in overrides:
        overrides["vocab_size"] = vocab_size
    overrides.setdefault("max_seq_len", max(cfg.seq_len, ModelConfig.from_name(cfg.preset).max_seq_len))
    model_cfg = ModelConfig.from_name(cfg.preset, **overrides)
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"TrainConfig.seq_len={cfg.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
    return model_cfg


def build_model(cfg: TrainConfig, model_config, ds_config: dict[str, Any], *, init_from: str | None = None):
    """The Transformer, seeded identically on every rank.

    ZeRO-3 fresh init runs under ``deepspeed.zero.Init``: each parameter is
    partitioned as soon as its module is built, so no rank ever holds the whole
    model; ``Transformer.init_weights`` gathers one module at a time (rank 0
    writes, ZeRO re-partitions). Loading ``init_from`` builds the model
    normally and lets ``deepspeed.initialize`` partition it.
    """
    import deepspeed

    from tritium.model.transformer import Transformer

    seed_everything(cfg.seed)
    backend = None if cfg.backend == "auto" else cfg.backend
    if init_from:
        model = Transformer.from_pretrained(init_from, backend=backend)
        if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing"):
            model.gradient_checkpointing = True
        return model
    stage3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    if stage3:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = Transformer(model_config, backend=backend, gradient_checkpointing=cfg.gradient_checkpointing)
    else:
        model = Transformer(model_config, backend=backend, gradient_checkpointing=cfg.gradient_checkpointing)
    # Re-initialise from the seed so every ZeRO stage (and device) starts from the same weights whatever
    # the constructor drew first; under zero.Init, init_weights gathers each module's shards itself.
    seed_everything(cfg.seed)
    model.init_weights()
    return model


def register_head_for_zero3(model: torch.nn.Module) -> None:
    """Keep the tied LM head gathered around the fused loss under ZeRO-3.

    ``LMHead.forward`` runs the loss with the embedding's weight, which it does
    not own, so ZeRO-3 would hand it an empty shard unless the weight is
    registered as an external parameter of the head (the model lists the pairs).
    """
    import deepspeed

    from tritium.model.transformer import zero3_external_params

    for module, param in zero3_external_params(model):
        deepspeed.zero.register_external_parameter(module, param)


def build_engine(cfg: TrainConfig, model_config=None, *, world_size: int | None = None, model=None,
                 init_from: str | None = None, ds_config: dict[str, Any] | None = None):
    """``deepspeed.initialize`` for cfg: returns the engine (``engine.module`` is the Transformer).

    Pass ``model`` to train a module you built yourself (e.g. align/ with a
    frozen reference model alongside), otherwise it is built from
    ``model_config`` (or ``init_from``).
    """
    import deepspeed
    import torch.distributed as dist

    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
    cfg.validate(world_size)
    ds_config = ds_config or build_ds_config(cfg, world_size)
    if model is None:
        model = build_model(cfg, model_config, ds_config, init_from=init_from or cfg.init_from)
    stage3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    groups = param_groups(model, cfg.weight_decay)
    schedule = lr_lambda(cfg)

    def scheduler_factory(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    optimizer = None if "optimizer" in ds_config else make_optimizer(groups, cfg)
    scheduler = None if "scheduler" in ds_config else scheduler_factory
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups if optimizer is None else None,
                                           optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    if stage3:
        register_head_for_zero3(engine.module)
    return engine
