"""``tritium sft``: supervised fine-tuning of a pretrained checkpoint on the shared DeepSpeed loop.

Examples::

    tritium sft --checkpoint runs/pretrain/final --out runs/sft                    # embedded tasks
    tritium sft --checkpoint runs/pretrain/final --out runs/sft --data chats.jsonl --skip-malformed
    tritium sft --checkpoint runs/pretrain/final --out runs/sft --nproc 2 --zero-stage 3

Data: JSONL of ``{"messages": [...]}`` or ``{"prompt", "completion"}`` (see ``tritium.align.data``);
without ``--data``, the embedded instruction tasks (``tritium.align.tasks``).  Loss on the assistant
tokens only; examples packed with ``cu_seqlens``.  Writes config.json, metrics.jsonl, checkpoints/,
final/ and loss.png to ``--out``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

HELP = "supervised fine-tuning (chat/completion JSONL or the embedded tasks) on the DeepSpeed loop"

# TrainConfig values for SFT when the flag is not given (pretraining's defaults suit pretraining)
SFT_DEFAULTS: dict[str, Any] = {"out": "runs/sft", "lr": 1e-3, "max_steps": 150, "micro_batch": 8,
                                "seq_len": 256, "eval_interval": 50, "eval_steps": 8,
                                "save_interval": 0, "log_interval": 10, "min_lr_ratio": 0.1,
                                "weight_decay": 0.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tritium.train.config import add_train_arguments

    group = parser.add_argument_group("sft")
    group.add_argument("--data", help="SFT JSONL ({'messages'} or {'prompt','completion'}); default: embedded tasks")
    group.add_argument("--val-data", help="validation JSONL (default: 5%% of --data, or the tasks' val split)")
    group.add_argument("--skip-malformed", action="store_true", help="skip and count bad JSONL lines")
    group.add_argument("--no-packing", action="store_true", help="one example per row (no cu_seqlens packing)")
    group.add_argument("--truncation", choices=("right", "drop"), default="right",
                       help="too-long examples: cut the end off (right) or skip them (drop)")
    group.add_argument("--per-task", type=int, default=1200, help="embedded tasks: distinct prompts per task")
    group.add_argument("--data-seed", type=int, default=0, help="embedded tasks: split seed (keep it for align-eval)")
    add_train_arguments(parser, data=False)
    parser.set_defaults(**{k: None for k in SFT_DEFAULTS})
    parser.epilog = "SFT defaults when a flag is not given: " + ", ".join(f"{k}={v}" for k, v in SFT_DEFAULTS.items())


def _run_rank(payload: dict[str, Any]) -> int:
    from tritium.align.launching import print_done
    from tritium.align.sft import SFTConfig, train_sft
    from tritium.train.config import TrainConfig

    train_cfg = TrainConfig.from_dict(payload["train"])
    result = train_sft(train_cfg, SFTConfig(**payload["sft"]), payload["checkpoint"], payload.get("data"),
                       payload.get("val_data"))
    print_done("sft", result)
    return 130 if result.interrupted else 0


def run(args: argparse.Namespace) -> int:

    from tritium.align.launching import launch_or_run, start_run
    from tritium.align.sft import SFTConfig

    checkpoint, train_cfg = start_run(args, SFT_DEFAULTS)
    sft_cfg = SFTConfig(seq_len=train_cfg.seq_len, packing=not args.no_packing, truncation=args.truncation,
                        seed=args.data_seed, per_task=args.per_task, skip_malformed=args.skip_malformed)
    payload = {"sft": sft_cfg.to_dict(), "checkpoint": str(checkpoint), "data": args.data, "val_data": args.val_data}
    return launch_or_run(train_cfg, payload, "tritium.align.cli_sft", _run_rank)


def main(argv: list[str] | None = None) -> int:
    from tritium.align.launching import rank_main

    return rank_main(argv, _run_rank, "python -m tritium.align.cli_sft")


if __name__ == "__main__":
    sys.exit(main())
