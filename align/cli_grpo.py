"""``tritium grpo``: reinforcement learning from verifiable rewards (GRPO) on the shared DeepSpeed loop.

Examples::

    tritium grpo --checkpoint runs/sft/final --out runs/grpo                       # embedded tasks + verifiers
    tritium grpo --checkpoint runs/sft/final --loss-type dr_grpo --no-scale-rewards --beta 0.04
    tritium grpo --checkpoint runs/sft/final --data prompts.jsonl --reward my_rewards:score --reward format
    tritium grpo --checkpoint runs/sft/final --nproc 2 --zero-stage 3

Each step generates ``--num-generations`` completions per prompt with tritium's own engine
(``serve.engine.LLMEngine``) from the policy's current weights, scores them with the reward functions,
and takes a clipped policy-gradient step on group-relative advantages (``tritium.align.grpo``).

Data: without ``--data``, the embedded tasks' train split (rewards: ``correctness`` + 0.1 x ``format``).
``--data`` is JSONL of ``{"prompt": str, ...}`` or ``{"messages": [...], ...}``; every other field of a
record is passed to the reward functions as a keyword (``correctness`` reads ``answer``).
Writes config.json, metrics.jsonl (one record per logged step), rollouts.jsonl (one per generated
batch, with a sample), grpo.png and loss.png, and final/ to ``--out``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

HELP = "RL from verifiable rewards (GRPO) with rollouts from tritium's engine, on the DeepSpeed loop"

# micro_batch counts completions: 8 = one group of 8 per micro-batch, 2 micro-batches = 2 prompts per rank
GRPO_DEFAULTS: dict[str, Any] = {"out": "runs/grpo", "lr": 2e-5, "max_steps": 60, "micro_batch": 16,
                                 "grad_accum": 2, "seq_len": 256, "eval_interval": 0, "save_interval": 0,
                                 "log_interval": 1, "min_lr_ratio": 1.0, "warmup_steps": 0, "weight_decay": 0.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tritium.align.grpo import BUILTIN_REWARDS, LOSS_TYPES
    from tritium.train.config import add_train_arguments

    group = parser.add_argument_group("grpo")
    group.add_argument("--data", help="prompt JSONL ({'prompt'} or {'messages'} + fields for the rewards); "
                                      "default: the embedded tasks' train split")
    group.add_argument("--reward", action="append", metavar="SPEC",
                       help=f"reward function, repeatable: one of {list(BUILTIN_REWARDS)} or module:function "
                            "(prompt, completion, **fields) -> float (default: correctness and format)")
    group.add_argument("--reward-weights", type=float, nargs="+",
                       help="one weight per --reward (default: 1, and 0.1 for format)")
    group.add_argument("--num-generations", type=int, default=8, help="completions per prompt (G)")
    group.add_argument("--max-tokens", dest="max_completion_tokens", type=int, default=16,
                       help="generation budget per completion (tokens; OpenAI's max_tokens)")
    group.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    group.add_argument("--top-p", type=float, default=1.0, help="rollout nucleus sampling")
    group.add_argument("--epsilon", type=float, default=0.2, help="ratio clip: [1 - eps, 1 + eps-high]")
    group.add_argument("--epsilon-high", type=float, help="upper clip (DAPO clip-higher; default --epsilon)")
    group.add_argument("--beta", type=float, default=0.0, help="KL penalty to the reference (0: no reference)")
    group.add_argument("--loss-type", choices=LOSS_TYPES, default="grpo",
                       help="token normalisation: grpo (per-completion mean), dr_grpo (/ G x max tokens), "
                            "dapo (token-level mean)")
    group.add_argument("--no-scale-rewards", action="store_true", help="advantages not divided by the group std "
                                                                      "(Dr. GRPO)")
    group.add_argument("--num-iterations", type=int, default=1, help="optimizer steps per generated batch")
    group.add_argument("--oversample", type=int, default=1,
                       help="dynamic sampling: generate for this many x the prompts and train on the groups whose "
                            "rewards differ first (DAPO; default 1 = off)")
    group.add_argument("--max-prompt-len", type=int, default=128, help="drop prompts longer than this (tokens)")
    group.add_argument("--per-task", type=int, default=1200, help="embedded tasks: distinct prompts per task")
    group.add_argument("--data-seed", type=int, default=0, help="embedded tasks: split seed (same as sft's)")
    add_train_arguments(parser, data=False)
    parser.set_defaults(**{k: None for k in GRPO_DEFAULTS})
    parser.epilog = ("--checkpoint (required) is the SFT model dir, and the reference for --beta. --micro-batch counts completions (a multiple of --num-generations per rank and step). "
                     "GRPO defaults when a flag is not given: " + ", ".join(f"{k}={v}" for k, v in GRPO_DEFAULTS.items()))


def _run_rank(payload: dict[str, Any]) -> int:
    from tritium.align.grpo import GRPOConfig, train_grpo
    from tritium.align.launching import print_done
    from tritium.train.config import TrainConfig

    cfg = payload["grpo"]
    cfg["rewards"] = tuple(cfg["rewards"])
    cfg["reward_weights"] = tuple(cfg["reward_weights"])
    result = train_grpo(TrainConfig.from_dict(payload["train"]), GRPOConfig(**cfg), payload["checkpoint"],
                        payload.get("data"))
    print_done("grpo", result)
    return 130 if result.interrupted else 0


def run(args: argparse.Namespace) -> int:
    from tritium.align.grpo import GRPOConfig, grpo_prompts, load_reward
    from tritium.align.launching import launch_or_run, start_run

    rewards = tuple(args.reward) if args.reward else ("correctness", "format")
    cfg = GRPOConfig(num_generations=args.num_generations, max_completion_tokens=args.max_completion_tokens,
                     temperature=args.temperature, top_p=args.top_p, epsilon=args.epsilon,
                     epsilon_high=args.epsilon_high, beta=args.beta, loss_type=args.loss_type,
                     scale_rewards=not args.no_scale_rewards, num_iterations=args.num_iterations,
                     oversample=args.oversample, rewards=rewards,
                     reward_weights=tuple(args.reward_weights) if args.reward_weights else None,
                     max_prompt_len=args.max_prompt_len, seed=args.data_seed, per_task=args.per_task)
    for spec in cfg.rewards:  # fail here, in one process, before any rank starts
        load_reward(spec)
    if args.data:
        grpo_prompts(cfg, args.data)

    def whole_groups(train_cfg) -> None:
        if (train_cfg.micro_batch * train_cfg.grad_accum) % cfg.num_generations:
            raise ValueError(f"--micro-batch ({train_cfg.micro_batch}) x --grad-accum ({train_cfg.grad_accum}) "
                             f"completions per rank and step must be a multiple of --num-generations "
                             f"({cfg.num_generations})")

    checkpoint, train_cfg = start_run(args, GRPO_DEFAULTS, validate=whole_groups)
    payload = {"grpo": cfg.to_dict(), "checkpoint": str(checkpoint), "data": args.data}
    return launch_or_run(train_cfg, payload, "tritium.align.cli_grpo", _run_rank)


def main(argv: list[str] | None = None) -> int:
    from tritium.align.launching import rank_main

    return rank_main(argv, _run_rank, "python -m tritium.align.cli_grpo")


if __name__ == "__main__":
    sys.exit(main())
