"""``tritium train``: pretrain a Llama-style model on DeepSpeed ZeRO, from 2 CPU ranks to many GPU nodes.

Examples::

    tritium train --preset tiny --max-steps 200 --out runs/pretrain                 # 1 process
    tritium train --preset tiny --nproc 2 --zero-stage 3 --max-steps 200 --out runs/pretrain
    tritium train --config run.yaml --resume                                        # continue from latest
    deepspeed --num_gpus 8 --module tritium.train --preset 1b --zero-stage 3 --out runs/1b
    torchrun --nproc_per_node 8 -m tritium.train --preset 1b --out runs/1b

The parent process validates the config and prepares the data (tokenizer
trained on the fly when none is given) before any rank starts, so a bad
batch layout or a missing checkpoint fails in a second, not after spawning.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from pathlib import Path

from tritium.runs import claim_run_folder
from tritium.train.config import TrainConfig, add_train_arguments

HELP = "pretrain on DeepSpeed ZeRO 0-3 (--nproc N spawns ranks; CPU ranks use gloo)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser)
    # the deepspeed launcher appends --local_rank=N to every rank's argv (LOCAL_RANK is in the env too)
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, help=argparse.SUPPRESS)


def _check_resume(cfg: TrainConfig) -> None:
    """A missing or damaged checkpoint is reported before spawning ranks."""
    from tritium.train.checkpoints import resolve_checkpoint, verify_checkpoint

    path = resolve_checkpoint(cfg.resume, Path(cfg.out) / "checkpoints")
    verify_checkpoint(path)


def run_rank(cfg: TrainConfig) -> int:
    """This process is one rank (or the only one): train, return an exit code."""
    from tritium.train.checkpoints import WriteError, report_write_error
    from tritium.train.pretrain import pretrain

    try:
        result = pretrain(cfg)
    except WriteError as exc:  # disk full, permissions: one line naming the path, on the rank it happened
        return report_write_error("tritium train", exc)
    if result.interrupted:
        return 128 + int(signal.SIGTERM)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        where = f"; model in {result.final_dir}" if result.final_dir else ""
        print(f"tritium train: {result.steps} steps on {result.world_size} rank(s), last loss "
              f"{result.last_loss if result.last_loss is None else round(result.last_loss, 4)}{where}", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    from tritium.train.checkpoints import WriteError, report_write_error, writing
    from tritium.train.launch import die_with_parent, in_launcher, launcher_command, planned_world_size, spawn

    cfg = TrainConfig.from_args(args)
    if in_launcher():
        die_with_parent()  # a rank whose launcher died (even kill -9) must not train on alone
        return run_rank(cfg)
    world = planned_world_size(cfg)
    cfg.validate(world)  # batch layout, stages, paths: before any work
    claim_run_folder(cfg.out, resume=bool(cfg.resume), overwrite=args.overwrite,
                     inputs=[*cfg.data, cfg.tokenizer, cfg.init_from])
    if cfg.resume:
        _check_resume(cfg)
    if world == 1:
        return run_rank(cfg)
    from tritium.train.pretrain import prepare_inputs

    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    tokenizer, data_dir = prepare_inputs(cfg)
    tokenizer_file = Path(cfg.out) / "tokenizer" / "tokenizer.model"
    if not tokenizer_file.is_file():
        tokenizer.save(tokenizer_file.parent)
    rank_cfg = dataclasses.replace(cfg, data=[str(data_dir)], tokenizer=str(tokenizer_file))
    launch_file = Path(cfg.out) / "launch_config.json"
    try:
        with writing(launch_file, "launch config"):
            launch_file.write_text(json.dumps(rank_cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    except WriteError as exc:
        return report_write_error("tritium train", exc)
    command = launcher_command(cfg, ["--config", str(launch_file)])
    print("tritium train: " + " ".join(command), file=sys.stderr, flush=True)
    return spawn(command)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m tritium.train`` (what launchers start on every rank)."""
    from tritium.cli import USER_ERRORS

    parser = argparse.ArgumentParser(prog="python -m tritium.train", description=HELP)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as exc:
        print(f"tritium train: error: {exc}", file=sys.stderr, flush=True)
        return 2
