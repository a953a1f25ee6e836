"""Shared plumbing of ``tritium sft`` and ``tritium dpo``: defaults, and spawning ranks with T's launcher.

A command resolves everything in the parent process (configs, data checks, cached reference log-probs),
writes it to ``OUT/launch_config.json`` and, for ``--nproc > 1``, starts the ranks with
``tritium.train.launch`` running ``python -m <module> --launch-file OUT/launch_config.json``.  Each rank
reads the file and calls the same function the single-process path calls.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def train_config_from_args(args: argparse.Namespace, defaults: dict[str, Any]):
    """``TrainConfig.from_args`` with command-specific defaults for the flags the user did not give."""
    from tritium.train.config import TrainConfig

    for name, value in defaults.items():
        if getattr(args, name, None) is None and not getattr(args, "config", None):  # a --config file wins
            setattr(args, name, value)
    return TrainConfig.from_args(args)


def _guarded(run_rank: Callable[[dict[str, Any]], int], payload: dict[str, Any], prog: str) -> int:
    """``run_rank(payload)``; a failed checkpoint/export/log write ends in one line and exit code 1."""
    from tritium.train.checkpoints import WriteError, report_write_error

    try:
        return run_rank(payload)
    except WriteError as exc:
        return report_write_error(prog, exc)


def launch_or_run(train_cfg: Any, payload: dict[str, Any], module: str,
                  run_rank: Callable[[dict[str, Any]], int]) -> int:
    """Run ``run_rank(payload)`` here (one process), or spawn ``train_cfg.nproc`` ranks that do."""
    from tritium.train.checkpoints import WriteError, report_write_error, writing
    from tritium.train.launch import launcher_command, planned_world_size, spawn

    world = planned_world_size(train_cfg)
    train_cfg.validate(world)
    payload = {**payload, "train": train_cfg.to_dict()}
    prog = f"tritium {module.rsplit('_', 1)[-1]}"  # tritium.align.cli_sft -> tritium sft
    if world == 1:
        return _guarded(run_rank, payload, prog)
    out = Path(train_cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    launch_file = out / "launch_config.json"
    try:
        with writing(launch_file, "launch config"):
            launch_file.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    except WriteError as exc:
        return report_write_error(prog, exc)
    command = launcher_command(train_cfg, ["--launch-file", str(launch_file)], module=module)
    print(f"tritium: {' '.join(command)}", file=sys.stderr, flush=True)
    return spawn(command)


def rank_main(argv: list[str] | None, run_rank: Callable[[dict[str, Any]], int], prog: str) -> int:
    """Entry point of ``python -m tritium.align.cli_sft|cli_dpo --launch-file FILE`` on every rank."""
    from tritium.train.launch import die_with_parent

    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--launch-file", required=True)
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    payload = json.loads(Path(args.launch_file).read_text())
    die_with_parent()  # a rank whose launcher died (even kill -9) must not train on alone
    return _guarded(run_rank, payload, prog.removeprefix("python -m ").replace("tritium.align.cli_", "tritium "))


def print_done(name: str, result: Any) -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    where = f"; model in {result.final_dir}" if result.final_dir else ""
    loss = None if result.last_loss is None else round(result.last_loss, 4)
    print(f"tritium {name}: {result.steps} steps on {result.world_size} rank(s), last loss {loss}{where}",
          flush=True)


def checked_inputs(args) -> Path:
    """The ``--checkpoint`` folder of ``tritium sft``/``dpo``, after checking it and any data files exist."""
    if not args.init_from:
        raise ValueError("--checkpoint DIR is required: the model to start from (a run's final/ folder)")
    checkpoint = Path(args.init_from)
    if not (checkpoint / "config.json").is_file() or not (checkpoint / "tokenizer.model").is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint} must hold config.json, *.safetensors and tokenizer.model "
                                "(a run's final/ folder)")
    for name in ("data", "val_data"):
        value = getattr(args, name, None)
        if value is not None and not Path(value).is_file():
            raise FileNotFoundError(f"--{name.replace('_', '-')} file not found: {value}")
    return checkpoint


def start_run(args, defaults: dict[str, Any], validate=None):
    """(checkpoint, TrainConfig) of ``tritium sft``/``dpo``/``grpo``: inputs checked, command defaults
    applied, ``validate(train_cfg)`` (the command's own checks) run, then the run folder claimed (an
    existing one needs --resume or --overwrite) -- all before any work, so a refused run leaves nothing."""
    from tritium.runs import claim_run_folder

    checkpoint = checked_inputs(args)
    train_cfg = train_config_from_args(args, defaults)
    train_cfg.init_from = str(checkpoint)
    if validate is not None:
        validate(train_cfg)
    claim_run_folder(train_cfg.out, resume=bool(train_cfg.resume), overwrite=args.overwrite,
                     inputs=[checkpoint, args.data, getattr(args, "val_data", None)])
    return checkpoint, train_cfg
