"""``TrainConfig``: every dial of a training run, validated before any work.

One typed dataclass feeds everything downstream: the DeepSpeed config
(``train/engine.py``), the loop's intervals (``train/loop.py``), the
checkpoints (``train/checkpoints.py``) and the launcher (``train/launch.py``).
It loads from a YAML or JSON file and takes command-line overrides, so
``tritium train --config run.yaml --lr 3e-4`` means "the file, but lr=3e-4".

Batch arithmetic follows DeepSpeed: one optimizer step sees
``global_batch = micro_batch x grad_accum x ranks`` sequences of ``seq_len``
tokens.  Anything that cannot work (a global batch that ranks x accumulation
does not divide, ZeRO stage 5, parameter offload below stage 3, ...) is
rejected here with a message naming the field, before a process is spawned.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tritium.flags import deprecated_alias
from tritium.model.config import ConfigFile

ZERO_STAGES = (0, 1, 2, 3)
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SCHEDULES = ("cosine", "wsd", "constant")
OFFLOADS = ("none", "optimizer", "params", "all")
OFFLOAD_DEVICES = ("cpu", "nvme")


@dataclass
class TrainConfig(ConfigFile):
    # ---- model
    preset: str = "tiny"  # model preset for ModelConfig.from_name (ignored when init_from is set)
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides on top of the preset
    init_from: str | None = None  # HF-layout dir to start from (fine-tuning); None = fresh random init
    backend: str = "auto"  # kernel backend for the model (auto|triton|torch|sdpa|...)
    gradient_checkpointing: bool = False  # recompute block activations in backward to save memory
    # ---- data
    data: list[str] = field(default_factory=list)  # prepared data dir, or raw text files/dirs; [] = embedded corpus
    tokenizer: str | None = None  # tokenizer.model file or dir; None = the data dir's, else trained on the fly
    doc_aware: bool = False  # pack with cu_seqlens so attention never crosses document boundaries
    val_fraction: float = 0.05  # share of documents held out for validation when preparing raw text
    corpus_bytes: int | None = None  # cap on the embedded corpus (no --data); None = tritium.model.corpus default
    # ---- batch and schedule
    seq_len: int = 256  # tokens per sequence
    micro_batch: int = 8  # sequences per rank per forward/backward
    grad_accum: int = 1  # micro-batches accumulated per optimizer step
    global_batch: int | None = None  # sequences per optimizer step over all ranks; set -> micro_batch derived
    max_steps: int = 200  # optimizer steps to run
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr = lr x min_lr_ratio (cosine floor / WSD end)
    warmup_steps: int | None = None  # linear warmup to lr over this many steps; None = 5% of max_steps
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant (after warmup)
    decay_fraction: float = 0.2  # WSD: share of max_steps spent in the final linear decay
    # ---- optimizer
    weight_decay: float = 0.1  # AdamW decay, applied to matrices only (not norms or biases)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    adam_eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables
    # ---- DeepSpeed
    zero_stage: int = 1  # ZeRO stage: 0 none, 1 optimizer states, 2 +gradients, 3 +parameters
    offload: str = "none"  # none | optimizer | params (stage 3) | all (both, stage 3)
    offload_device: str = "cpu"  # where offloaded tensors live: cpu | nvme
    nvme_path: str | None = None  # directory for NVMe offload (required when offload_device="nvme")
    precision: str = "auto"  # auto (bf16 on capable CUDA, else fp32) | bf16 | fp16 (loss scaling) | fp32
    loss_scale: float = 0.0  # fp16 only: 0 = dynamic loss scaling, >0 = static scale
    ds_config: str | None = None  # user DeepSpeed JSON merged on top of the generated config
    comm_backend: str | None = None  # torch.distributed backend; None = nccl on CUDA, gloo on CPU
    # ---- run folder, logging, checkpoints
    out: str = "runs/train"  # run folder: config.json, metrics.jsonl, checkpoints/, final/, *.png
    seed: int = 1234  # seeds model init, data order and every RNG
    log_interval: int = 10  # optimizer steps between metrics.jsonl lines (and progress-bar updates)
    eval_interval: int = 100  # steps between validation passes; 0 disables
    eval_steps: int = 8  # micro-batches per validation pass (per rank)
    save_interval: int = 100  # steps between checkpoints; 0 = only at the end and on SIGTERM/SIGINT
    keep_last: int = 3  # checkpoints kept on disk (oldest deleted first)
    resume: str | None = None  # "latest" or a checkpoint path (a tag dir or a checkpoints/ dir)
    progress: bool = True  # progress bar with ETA on rank 0
    tensorboard: bool = False  # also write TensorBoard events to out/tensorboard (if installed)
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU; None = table (GPU) or measured (CPU)
    export: bool = True  # write out/final/ (HF layout + tokenizer.model) at the end
    # ---- launching (read by `tritium train`, not by the ranks)
    nproc: int = 1  # processes (GPUs, or CPU ranks) per node
    nnodes: int = 1  # nodes (multi-node needs hostfile)
    hostfile: str | None = None  # DeepSpeed hostfile ("host slots=N" lines) for multi-node runs
    launcher: str = "deepspeed"  # how --nproc > 1 spawns ranks: deepspeed | torchrun

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, Path)):
            self.data = [str(self.data)]
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self, world_size: int | None = None) -> TrainConfig:
        """Raise ValueError naming the field for anything that cannot run; ``world_size`` adds batch checks."""
        def positive_int(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
            if not ok:
                bound = ">= 0" if allow_zero else "> 0"
                raise ValueError(f"TrainConfig.{name} must be an integer {bound}, got {value!r}")

        for name in ("seq_len", "micro_batch", "grad_accum", "max_steps", "keep_last", "eval_steps", "nproc",
                     "nnodes", "log_interval"):
            positive_int(name)
        for name in ("eval_interval", "save_interval"):
            positive_int(name, allow_zero=True)
        if self.global_batch is not None:
            positive_int("global_batch")
        if self.corpus_bytes is not None:
            positive_int("corpus_bytes")
        if self.zero_stage not in ZERO_STAGES:
            raise ValueError(f"TrainConfig.zero_stage must be one of {ZERO_STAGES}, got {self.zero_stage!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.offload not in OFFLOADS:
            raise ValueError(f"TrainConfig.offload must be one of {OFFLOADS}, got {self.offload!r}")
        if self.offload_device not in OFFLOAD_DEVICES:
            raise ValueError(f"TrainConfig.offload_device must be one of {OFFLOAD_DEVICES}, "
                             f"got {self.offload_device!r}")
        if self.offload in ("params", "all") and self.zero_stage != 3:
            raise ValueError(f"TrainConfig.offload={self.offload!r} offloads parameters, which needs zero_stage=3 "
                             f"(got zero_stage={self.zero_stage})")
        if self.offload in ("optimizer", "all") and self.zero_stage == 0:
            raise ValueError("TrainConfig.offload='optimizer' needs zero_stage >= 1 (ZeRO-Offload partitions "
                             "the optimizer states it moves)")
        if self.offload != "none" and self.offload_device == "nvme" and not self.nvme_path:
            raise ValueError("TrainConfig.nvme_path is required when offload_device='nvme'")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"TrainConfig.decay_fraction must be in (0, 1], got {self.decay_fraction!r}")
        if self.warmup_steps is not None:
            positive_int("warmup_steps", allow_zero=True)
        if self.warmup > self.max_steps:
            raise ValueError(f"TrainConfig.warmup_steps={self.warmup_steps} exceeds max_steps={self.max_steps}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.loss_scale < 0:
            raise ValueError("TrainConfig.weight_decay, grad_clip and loss_scale must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"TrainConfig.beta1/beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"TrainConfig.val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.launcher not in ("deepspeed", "torchrun"):
            raise ValueError(f"TrainConfig.launcher must be 'deepspeed' or 'torchrun', got {self.launcher!r}")
        if self.nnodes > 1 and not self.hostfile and self.launcher == "deepspeed":
            raise ValueError("TrainConfig.nnodes > 1 needs hostfile (lines like 'worker-1 slots=8')")
        if self.hostfile and not Path(self.hostfile).is_file():
            raise FileNotFoundError(f"TrainConfig.hostfile not found: {self.hostfile}")
        if self.ds_config and not Path(self.ds_config).is_file():
            raise FileNotFoundError(f"TrainConfig.ds_config not found: {self.ds_config}")
        if self.init_from and not Path(self.init_from).is_dir():
            raise FileNotFoundError(f"TrainConfig.init_from: no checkpoint directory at {self.init_from}")
        if self.model and not isinstance(self.model, dict):
            raise ValueError(f"TrainConfig.model must be a mapping of ModelConfig overrides, got {self.model!r}")
        if not self.init_from:  # unknown preset / bad model dials: fail here, not inside every rank
            from tritium.model.config import ModelConfig

            try:
                ModelConfig.from_name(self.preset, **{k: v for k, v in self.model.items() if k != "name"})
            except TypeError as exc:
                raise ValueError(f"TrainConfig.model: {exc}") from None
        for path in self.data:
            if not Path(path).exists():
                raise FileNotFoundError(f"TrainConfig.data: no such file or directory: {path}")
        if world_size is not None:
            self.batch_layout(world_size)
        return self

    @property
    def warmup(self) -> int:
        """Warmup steps in effect (warmup_steps, or 5% of max_steps when unset)."""
        return self.warmup_steps if self.warmup_steps is not None else self.max_steps // 20

    def batch_layout(self, world_size: int) -> tuple[int, int, int]:
        """(micro_batch, grad_accum, global_batch) for ``world_size`` ranks, or a ValueError saying why not."""
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world size must be a positive integer, got {world_size!r}")
        if self.global_batch is None:
            return self.micro_batch, self.grad_accum, self.micro_batch * self.grad_accum * world_size
        per_step = world_size * self.grad_accum
        if self.global_batch % per_step:
            raise ValueError(
                f"TrainConfig.global_batch={self.global_batch} is not divisible by ranks ({world_size}) x "
                f"grad_accum ({self.grad_accum}) = {per_step}; pick a global batch that is a multiple of "
                f"{per_step} or change --grad-accum/--nproc")
        return self.global_batch // per_step, self.grad_accum, self.global_batch

    def tokens_per_step(self, world_size: int) -> int:
        return self.batch_layout(world_size)[2] * self.seq_len

    # ------------------------------------------------------------------ files
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        if isinstance(data, dict):
            data = data.get("train", data)  # accept {"train": {...}} as written into a run's config.json
        return cls(**cls.checked_fields(data))

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Load a YAML (.yaml/.yml) or JSON file of TrainConfig fields, then apply ``overrides``."""
        data = dict(cls.read_file(path, "training config"))
        data = dict(data.get("train", data))
        data.update(overrides)
        return cls.from_dict(data)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        """The --config file (or defaults) with every command-line flag the user actually gave on top."""
        overrides = {}
        for name in _FLAG_FIELDS:
            value = getattr(args, name, None)
            if value is not None:
                overrides[name] = value
        if getattr(args, "model_override", None):
            overrides["model"] = _parse_model_overrides(args.model_override)
        if getattr(args, "no_export", False):
            overrides["export"] = False
        if getattr(args, "no_progress", False):
            overrides["progress"] = False
        if getattr(args, "tensorboard", False):
            overrides["tensorboard"] = True
        if getattr(args, "gradient_checkpointing", False):
            overrides["gradient_checkpointing"] = True
        if getattr(args, "doc_aware", False):
            overrides["doc_aware"] = True
        if getattr(args, "config", None):
            if "model" in overrides:  # flags add to the file's model overrides rather than replace them
                base = TrainConfig.from_file(args.config)
                overrides["model"] = {**base.model, **overrides["model"]}
            return cls.from_file(args.config, **overrides)
        return cls.from_dict(overrides)


def _parse_model_overrides(items: list[str]) -> dict[str, Any]:
    """["num_layers=2", "rope_theta=5e5"] -> {"num_layers": 2, "rope_theta": 500000.0} (JSON values, else str)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-override expects KEY=VALUE (a ModelConfig field), got {item!r}")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


# Flags that map 1:1 onto TrainConfig fields (default None = "not given, keep the file's/default value").
_FLAG_FIELDS = ("preset", "init_from", "backend", "data", "tokenizer", "seq_len", "micro_batch", "grad_accum",
                "global_batch", "max_steps", "lr", "min_lr_ratio", "warmup_steps", "schedule", "weight_decay",
                "grad_clip", "zero_stage", "offload", "offload_device", "nvme_path", "precision", "ds_config",
                "comm_backend", "out", "seed", "log_interval", "eval_interval", "eval_steps", "save_interval",
                "keep_last", "resume", "peak_flops", "corpus_bytes", "val_fraction", "decay_fraction", "beta1",
                "beta2", "adam_eps", "loss_scale", "nproc", "nnodes", "hostfile", "launcher")


def add_train_arguments(parser: argparse.ArgumentParser, *, data: bool = True) -> None:
    """The shared training flags (tritium train, and reused by tritium sft / dpo).

    Every default is None so ``TrainConfig.from_args`` can tell "given" from "not given".
    """
    group = parser.add_argument_group("training")
    group.add_argument("--config", help="YAML or JSON file of TrainConfig fields (flags override it)")
    group.add_argument("--preset", help="model preset (tiny, small, 1b, llama2-7b, llama3-8b, seed-7b)")
    group.add_argument("--model-override", action="append", metavar="KEY=VALUE",
                       help="ModelConfig field on top of the preset, e.g. num_layers=2 (repeatable)")
    group.add_argument("--checkpoint", dest="init_from", metavar="DIR",
                       help="model to start from: an HF-layout dir with tokenizer.model (a run's final/)")
    deprecated_alias(group, "--init-from", "--checkpoint", "init_from")
    group.add_argument("--backend", help="kernel backend: auto, triton, torch, sdpa, ...")
    if data:
        group.add_argument("--data", nargs="+", help="prepared data dir, or raw text files/dirs (prepared on the "
                                                      "fly); default: the embedded corpus")
        group.add_argument("--tokenizer", help="tokenizer.model (or its dir); default: data dir's or trained")
        group.add_argument("--corpus-bytes", type=int, help="size cap of the embedded corpus (no --data)")
        group.add_argument("--val-fraction", type=float, help="documents held out for validation (raw text)")
        group.add_argument("--doc-aware", action="store_true", help="document-boundary-aware packing (cu_seqlens)")
    group.add_argument("--seq-len", type=int)
    group.add_argument("--micro-batch", type=int, help="sequences per rank per forward/backward")
    group.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    group.add_argument("--global-batch", type=int, help="sequences per optimizer step over all ranks")
    group.add_argument("--max-steps", type=int)
    group.add_argument("--lr", type=float, help="peak learning rate")
    group.add_argument("--min-lr-ratio", type=float)
    group.add_argument("--warmup-steps", type=int)
    group.add_argument("--schedule", choices=SCHEDULES)
    group.add_argument("--decay-fraction", type=float, help="WSD: share of max_steps in the final decay")
    group.add_argument("--beta1", type=float)
    group.add_argument("--beta2", type=float)
    group.add_argument("--adam-eps", type=float)
    group.add_argument("--loss-scale", type=float, help="fp16: 0 = dynamic, >0 = static")
    group.add_argument("--weight-decay", type=float)
    group.add_argument("--grad-clip", type=float)
    group.add_argument("--zero-stage", type=int, help="ZeRO stage 0-3")
    group.add_argument("--offload", choices=OFFLOADS, help="offload optimizer states and/or params")
    group.add_argument("--offload-device", choices=OFFLOAD_DEVICES)
    group.add_argument("--nvme-path")
    group.add_argument("--precision", choices=PRECISIONS)
    group.add_argument("--ds-config", help="DeepSpeed JSON merged on top of the generated config")
    group.add_argument("--comm-backend", help="torch.distributed backend (gloo, nccl, ccl)")
    group.add_argument("--out", help="run folder")
    group.add_argument("--seed", type=int)
    group.add_argument("--log-interval", type=int)
    group.add_argument("--eval-interval", type=int)
    group.add_argument("--eval-steps", type=int)
    group.add_argument("--save-interval", type=int)
    group.add_argument("--keep-last", type=int)
    group.add_argument("--resume", nargs="?", const="latest", help="resume: 'latest' (default) or a checkpoint path")
    group.add_argument("--overwrite", action="store_true", help="replace an existing --out run folder")
    group.add_argument("--peak-flops", type=float, help="per-device peak FLOP/s for MFU")
    group.add_argument("--gradient-checkpointing", action="store_true")
    group.add_argument("--tensorboard", action="store_true")
    group.add_argument("--no-progress", action="store_true")
    group.add_argument("--no-export", action="store_true", help="skip writing out/final/")
    launch = parser.add_argument_group("launching")
    launch.add_argument("--nproc", type=int, help="ranks per node (spawns the deepspeed launcher when > 1)")
    launch.add_argument("--nnodes", type=int)
    launch.add_argument("--hostfile", help="DeepSpeed hostfile for multi-node runs")
    launch.add_argument("--launcher", choices=("deepspeed", "torchrun"))
