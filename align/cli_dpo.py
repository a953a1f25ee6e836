"""``tritium dpo``: preference tuning (DPO, cDPO, IPO, SimPO) of an SFT checkpoint on the shared loop.

Examples::

    tritium dpo --checkpoint runs/sft/final --out runs/dpo                        # embedded task pairs
    tritium dpo --checkpoint runs/sft/final --out runs/dpo --loss ipo --beta 0.5
    tritium dpo --checkpoint runs/sft/final --out runs/simpo --loss simpo --beta 2 --gamma 0.5
    tritium dpo --checkpoint runs/sft/final --data prefs.jsonl --nproc 2 --zero-stage 3

Data: JSONL ``{"prompt", "chosen", "rejected"}`` or chat forms (``tritium.align.data``).  The reference
is the starting checkpoint: its log-probs are computed once, before training, and cached in
``OUT/reference_logps.pt`` (``--reference model`` keeps a frozen copy in memory instead).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

HELP = "preference tuning (DPO / cDPO / IPO / SimPO) on the DeepSpeed loop"

DPO_DEFAULTS: dict[str, Any] = {"out": "runs/dpo", "lr": 5e-5, "max_steps": 50, "micro_batch": 16,
                                "seq_len": 256, "eval_interval": 50, "eval_steps": 8,
                                "save_interval": 0, "log_interval": 10, "min_lr_ratio": 0.1,
                                "weight_decay": 0.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tritium.align.preference import LOSS_TYPES
    from tritium.train.config import add_train_arguments

    group = parser.add_argument_group("preference")
    group.add_argument("--data", help="preference JSONL ({'prompt','chosen','rejected'}); default: embedded tasks")
    group.add_argument("--val-data", help="validation JSONL (default: 5%% of --data, or the tasks' val split)")
    group.add_argument("--skip-malformed", action="store_true", help="skip and count bad JSONL lines")
    group.add_argument("--loss", choices=LOSS_TYPES, default="dpo", help="dpo (cDPO with --label-smoothing), ipo, "
                                                                         "simpo (reference-free)")
    group.add_argument("--beta", type=float, help="dpo/ipo: KL strength (default 0.1); simpo: reward scale (2.0)")
    group.add_argument("--label-smoothing", type=float, default=0.0, help="cDPO/SimPO flipped-label rate")
    group.add_argument("--gamma", type=float, default=0.5, help="simpo: target reward margin")
    group.add_argument("--length-normalize", action="store_true", help="dpo/ipo: mean instead of summed log-probs")
    group.add_argument("--sft-weight", type=float, default=2.0,
                       help="RPO: add this x the chosen reply's mean NLL, which anchors its likelihood (default 2: "
                            "plain DPO lost 29 points of exact match on the embedded tasks; 0 = the published loss)")
    group.add_argument("--reference", choices=("cached", "model"), default="cached",
                       help="reference log-probs precomputed and cached (default; ZeRO-3 safe) or a frozen copy")
    group.add_argument("--max-len", type=int, help="drop pairs longer than this (default: --seq-len)")
    group.add_argument("--per-task", type=int, default=1200, help="embedded tasks: distinct prompts per task")
    group.add_argument("--data-seed", type=int, default=0, help="embedded tasks: split seed (same as sft's)")
    add_train_arguments(parser, data=False)
    parser.set_defaults(**{k: None for k in DPO_DEFAULTS})
    parser.epilog = "DPO defaults when a flag is not given: " + ", ".join(f"{k}={v}" for k, v in DPO_DEFAULTS.items())


def _config(payload: dict[str, Any]):
    from tritium.align.preference import PreferenceConfig

    return PreferenceConfig(**payload["preference"])


def _run_rank(payload: dict[str, Any]) -> int:
    from tritium.align.launching import print_done
    from tritium.align.preference import train_preference
    from tritium.train.config import TrainConfig

    result = train_preference(TrainConfig.from_dict(payload["train"]), _config(payload), payload["checkpoint"],
                              payload.get("data"), payload.get("val_data"), payload["per_task"],
                              payload["skip_malformed"])
    print_done("dpo", result)
    return 130 if result.interrupted else 0


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tritium.align.launching import launch_or_run, start_run
    from tritium.align.preference import PreferenceConfig, cached_reference_logps, preference_datasets
    from tritium.model.tokenizer import Tokenizer

    checkpoint, train_cfg = start_run(args, DPO_DEFAULTS)
    beta = args.beta if args.beta is not None else (2.0 if args.loss == "simpo" else 0.1)
    pref = PreferenceConfig(loss=args.loss, beta=beta, label_smoothing=args.label_smoothing, gamma=args.gamma,
                            length_normalize=args.length_normalize, sft_weight=args.sft_weight,
                            reference=args.reference,
                            max_len=args.max_len or train_cfg.seq_len, seed=args.data_seed)
    if pref.reference == "cached" and not train_cfg.resume:
        # once, in this process, before any rank starts: ranks then only read the cache
        tokenizer = Tokenizer.load(checkpoint)
        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id >= 0 else 0
        train, val, _ = preference_datasets(tokenizer, pref, args.data, args.val_data, args.per_task,
                                            args.skip_malformed)
        out = Path(train_cfg.out)
        cached_reference_logps(checkpoint, train, pad_id, out / "reference_logps.pt")
        if val:
            cached_reference_logps(checkpoint, val, pad_id, out / "reference_logps_val.pt")
    payload = {"preference": pref.to_dict(), "checkpoint": str(checkpoint), "data": args.data,
               "val_data": args.val_data, "per_task": args.per_task, "skip_malformed": args.skip_malformed}
    return launch_or_run(train_cfg, payload, "tritium.align.cli_dpo", _run_rank)


def main(argv: list[str] | None = None) -> int:
    from tritium.align.launching import rank_main

    return rank_main(argv, _run_rank, "python -m tritium.align.cli_dpo")


if __name__ == "__main__":
    sys.exit(main())
