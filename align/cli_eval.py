"""``tritium align-eval``: exact match, end-of-turn compliance and preference accuracy, per checkpoint.

Example::

    tritium align-eval --checkpoint runs/sft/final runs/dpo/final runs/grpo/final --out runs/align_eval

Scores every checkpoint on the embedded tasks' held-out test split (the same ``--data-seed`` and
``--per-task`` as sft/dpo, so no test prompt was trained on) or on ``--data`` (prompt/completion JSONL,
scored by exact match) and ``--pairs`` (preference JSONL).  Prints one table; writes
``OUT/align_eval.json`` and ``OUT/align_eval.png`` (one bar per checkpoint, and exact match per task).
"""
from __future__ import annotations

import argparse

from tritium.flags import deprecated_alias

HELP = "compare checkpoints: held-out exact match, stop-at-end-of-turn, preference accuracy/margin"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", nargs="+", required=True, help="one or more model dirs (HF layout + "
                                                                        "tokenizer.model)")
    parser.add_argument("--labels", nargs="+", help="names for the table, space- or comma-separated "
                                                     "(default: runs/NAME/final -> NAME)")
    parser.add_argument("--out", default="runs/align_eval", help="folder for align_eval.json and align_eval.png")
    parser.add_argument("--overwrite", action="store_true", help="replace the results in an existing --out folder")
    parser.add_argument("--data", help="prompt/completion JSONL to score by exact match (default: embedded tasks)")
    parser.add_argument("--pairs", help="preference JSONL for pref accuracy (default: embedded task pairs)")
    parser.add_argument("--per-task", type=int, default=1200, help="embedded tasks: prompts per task (as in sft)")
    parser.add_argument("--data-seed", type=int, default=0, help="embedded tasks: split seed (as in sft)")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="embedded split to score")
    parser.add_argument("--max-examples", type=int, default=400, help="prompts scored per checkpoint")
    parser.add_argument("--max-pairs", type=int, default=400, help="preference pairs scored per checkpoint")
    parser.add_argument("--max-tokens", type=int, default=24, help="reply tokens generated at most (default 24)")
    deprecated_alias(parser, "--max-new-tokens", "--max-tokens", "max_tokens", type=int)
    parser.add_argument("--reference-checkpoint", metavar="DIR",
                        help="reference model (the SFT model) for DPO's implicit-reward accuracy on the held-out pairs")
    deprecated_alias(parser, "--reference", "--reference-checkpoint", "reference_checkpoint")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def _split_labels(labels: list[str] | None) -> list[str] | None:
    if not labels:
        return None
    return [part.strip() for label in labels for part in label.split(",") if part.strip()]


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from tritium.align.data import load_preference_jsonl, load_sft_jsonl
    from tritium.align.evaluate import EvalConfig, evaluate_checkpoints, render_table, write_report
    from tritium.align.tasks import TaskExample, make_splits, preference_pairs
    from tritium.runs import claim_run_folder

    claim_run_folder(args.out, overwrite=args.overwrite, inputs=[*args.checkpoint, args.reference_checkpoint,
                                                                  args.data, args.pairs], resumable=False)
    cfg = EvalConfig(max_new_tokens=args.max_tokens, max_examples=args.max_examples, max_pairs=args.max_pairs)
    splits = None
    if args.data:
        conversations, _ = load_sft_jsonl(args.data)
        examples = [TaskExample("data", c[-2]["content"], c[-1]["content"]) for c in conversations
                    if len(c) >= 2 and c[-1]["role"] == "assistant" and c[-2]["role"] == "user"]
        if not examples:
            raise ValueError(f"--data {args.data}: no conversation ends with a user turn then an assistant turn")
    else:
        splits = make_splits(seed=args.data_seed, per_task=args.per_task)
        examples = splits[args.split]
    if args.pairs:
        pairs, _ = load_preference_jsonl(args.pairs)
    else:
        splits = splits or make_splits(seed=args.data_seed, per_task=args.per_task)
        pairs = preference_pairs(splits[args.split], seed=args.data_seed + 7)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = evaluate_checkpoints(args.checkpoint, examples, pairs, cfg, labels=_split_labels(args.labels), device=device,
                                reference=args.reference_checkpoint)
    console = Console(width=None if Console().is_terminal else 150)
    scored = (f"--data {args.data}" if args.data else f"embedded tasks, held-out {args.split} split")
    scored += f"; pairs from --pairs {args.pairs}" if args.pairs else ""
    console.print(render_table(rows, title=f"align-eval ({scored})"))
    for row in rows:
        for sample in row["samples"][:3]:
            console.print(f"[dim]{row['label']}: {sample['prompt']!r} -> {sample['reply']!r} "
                          f"(answer {sample['answer']!r}, stopped={sample['stopped']})[/dim]")
    paths = write_report(rows, args.out)
    console.print(f"wrote {paths['json']}, {paths['markdown']} and {paths['png']}")
    return 0
