"""GRPO: reinforcement learning from verifiable rewards, with rollouts from tritium's own serving engine.

One optimizer step (``num_iterations`` steps share one rollout batch):

1. **Sync.** The policy's current weights are copied into a rank-local generation replica (a plain,
   unsharded ``Transformer`` in eval mode).  Under ZeRO-3 every rank enters
   ``deepspeed.zero.GatheredParameters(policy.parameters())`` -- a collective that all-gathers the
   partitioned parameters, read-only (``modifier_rank=None``) -- copies them, and leaves the context, which
   re-partitions them.  ZeRO-0/1/2 keep full parameters in the module, so the copy is direct.  The
   replica costs one unsharded copy of the weights per rank while it lives (for generation that is
   what a vLLM-style separate server holds too).
2. **Generate.** Each rank draws its own prompts and submits ``num_generations`` (G) requests per
   prompt to ``serve.engine.LLMEngine`` over the replica (paged KV cache, continuous batching, its
   ``SamplingParams``), then runs it to completion.  Generation needs no collective, so ranks never wait
   on each other inside it.  With ``oversample = N > 1`` each rank generates for N x its prompts and keeps
   the groups whose rewards differ first (``select_groups``; DAPO's dynamic sampling).
3. **Score.** Every reward function scores every completion; the total reward is their weighted sum.
   Advantages are group-relative: ``A_i = r_i - mean(r_group)``, divided by ``std(r_group) + 1e-4``
   unless ``scale_rewards=False`` (Dr. GRPO drops the division).  A group whose G rewards are all equal
   has zero advantage everywhere: it teaches nothing, and its share is logged (``zero_std_frac``).
4. **Learn.** ``loss_fn`` on the shared ``fit`` loop: per completion token ``t`` of completion ``i``,
   with ``ratio = exp(logp - logp_old)``,

   ``l_it = -min(ratio * A_i, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A_i) + beta * KL_it``,
   ``KL_it = exp(ref - logp) - (ref - logp) - 1`` (the k3 estimator, Schulman 2020; >= 0).

   ``logp_old`` is the policy at generation time (== ``logp.detach()`` when ``num_iterations == 1``, so
   the ratio is 1 and only its gradient matters; otherwise computed once on the replica right after the
   sync).  ``ref`` comes from the frozen starting checkpoint, computed once per rollout batch on a
   rank-local replica (only when ``beta > 0``).  Token losses are reduced as a **sum and a count**, so a
   step normalised globally (across micro-batches and ranks) needs no change here:

   * ``grpo``    (Shao et al. 2024): sum over completions of each completion's token mean / #completions;
   * ``dr_grpo`` (Liu et al. 2025):  sum over all tokens / (#completions x max_completion_tokens);
   * ``dapo``    (Yu et al. 2025):   sum over all tokens / #tokens (token-level mean).

Log-probs here are the model's temperature-1 distribution (the same forward for ``logp``, ``logp_old``
and ``ref``); a ``temperature`` other than 1 changes only how completions are sampled.

Rewards: ``correctness`` (1 if the reply -- the text before ``<|end|>`` -- equals the example's ``answer``
after trimming) and ``format`` (1 if the completion stopped with ``<|end|>`` within the budget) are built
in; any ``module:function`` with the signature ``(prompt, completion, **example_fields) -> float`` can be
added (``prompt`` is the last user message, ``example_fields`` are the prompt record's other JSONL fields;
a function that names a ``finish_reason`` parameter also gets "stop" / "length").
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tritium.align.data import read_jsonl
from tritium.align.sft import IGNORE_INDEX

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
BUILTIN_REWARDS = ("correctness", "format")


@dataclass
class GRPOConfig:
    num_generations: int = 8  # G: completions per prompt (one group)
    max_completion_tokens: int = 16  # generation budget per completion (embedded answers are <= 10 tokens)
    temperature: float = 1.0  # sampling temperature of the rollouts
    top_p: float = 1.0  # nucleus sampling of the rollouts
    epsilon: float = 0.2  # clip range of the policy ratio: [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # upper clip (DAPO's clip-higher); None = epsilon
    beta: float = 0.0  # KL penalty to the reference (0: no reference model is ever loaded)
    loss_type: str = "grpo"  # token normalisation: grpo | dr_grpo | dapo (see the module docstring)
    scale_rewards: bool = True  # divide advantages by the group's reward std (Dr. GRPO: False)
    num_iterations: int = 1  # optimizer steps per generated batch (mu in the paper)
    oversample: int = 1  # dynamic sampling (DAPO): draw this many x the prompts, train on groups with a spread first
    rewards: tuple[str, ...] = ("correctness", "format")  # built-in names or module:function specs
    reward_weights: tuple[float, ...] | None = None  # default: 1 for correctness/user rewards, 0.1 for format
    max_prompt_len: int = 128  # prompts longer than this (in tokens) are dropped
    seed: int = 0  # prompt order and sampling seeds
    per_task: int = 1200  # embedded tasks: distinct prompts per task (same splits as sft/dpo/align-eval)

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GRPOConfig.{name} must be a positive integer, got {value!r}")

        for name in ("num_generations", "max_completion_tokens", "num_iterations", "oversample", "max_prompt_len",
                     "per_task"):
            positive_int(name)
        if self.num_generations < 2:
            raise ValueError(f"GRPOConfig.num_generations must be >= 2 (a group needs a spread), "
                             f"got {self.num_generations}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"GRPOConfig.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if not 0 < self.epsilon < 1:
            raise ValueError(f"GRPOConfig.epsilon must be in (0, 1), got {self.epsilon!r}")
        if self.epsilon_high is not None and not self.epsilon_high > 0:
            raise ValueError(f"GRPOConfig.epsilon_high must be > 0, got {self.epsilon_high!r}")
        if not self.beta >= 0:
            raise ValueError(f"GRPOConfig.beta must be >= 0, got {self.beta!r}")
        if not self.temperature > 0:
            raise ValueError(f"GRPOConfig.temperature must be > 0 (rollouts must be sampled), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"GRPOConfig.top_p must be in (0, 1], got {self.top_p!r}")
        self.rewards = tuple(self.rewards)
        if not self.rewards:
            raise ValueError("GRPOConfig.rewards: give at least one reward function")
        if self.reward_weights is None:
            self.reward_weights = tuple(0.1 if r == "format" else 1.0 for r in self.rewards)
        self.reward_weights = tuple(float(w) for w in self.reward_weights)
        if len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"GRPOConfig.reward_weights has {len(self.reward_weights)} values for "
                             f"{len(self.rewards)} reward functions")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------- the loss
def per_token_grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        ref_logps: torch.Tensor | None = None, *, epsilon: float = 0.2,
                        epsilon_high: float | None = None, beta: float = 0.0
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-ratio policy-gradient loss per token (B, T), plus per-token ``kl`` and ``clipped`` (B, T).

    logps, old_logps, ref_logps: (B, T) float log-probs of the sampled tokens; advantages: (B,).
    """
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logps - old_logps)
    adv = advantages.to(logps.dtype).unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high) * adv
    loss = -torch.min(unclipped, clipped)
    kl = torch.zeros_like(logps)
    if beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs reference log-probs")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
    return loss, {"kl": kl.detach(), "clipped": (clipped < unclipped).detach()}


def reduce_grpo_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str,
                     max_completion_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) whose ratio is the step loss; sums and counts add across micro-batches and ranks.

    per_token, mask: (B, T); mask is 1 on completion tokens.  See the module docstring for the variants.
    """
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    if loss_type == "grpo":
        lengths = mask.sum(-1).clamp(min=1)
        return (masked.sum(-1) / lengths).sum(), torch.tensor(float(per_token.shape[0]))
    if loss_type == "dr_grpo":
        return masked.sum(), torch.tensor(float(per_token.shape[0] * max_completion_tokens))
    if loss_type == "dapo":
        return masked.sum(), mask.sum().detach()
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def group_advantages(rewards: torch.Tensor, num_generations: int, scale: bool = True) -> tuple[torch.Tensor, float]:
    """Group-relative advantages (N,) for rewards (N,) laid out group by group; and the zero-std fraction."""
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    grouped = rewards.view(-1, num_generations).float()
    mean = grouped.mean(-1, keepdim=True)
    std = grouped.std(-1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean)
    advantages = grouped - mean
    if scale:
        advantages = advantages / (std + 1e-4)
    zero_std = float((std.squeeze(-1) < 1e-6).float().mean())
    return advantages.reshape(-1), zero_std


def token_logps(model: Any, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-prob (B, T) of each label token (0 where labels == IGNORE_INDEX), one forward."""
    nll = model(input_ids=input_ids, labels=labels, loss_reduction="none")
    return -nll.float() * (labels != IGNORE_INDEX)


def make_grpo_loss(cfg: GRPOConfig):
    """``loss_fn(model, batch) -> (loss, metrics)`` for ``tritium.train.trainer.fit``.

    The micro-batch's loss is ``sum / count`` from ``reduce_grpo_loss`` (the loop's current contract: a
    micro-batch mean); a loop that normalises by the step's global count takes the same pair unchanged.
    """
    def loss_fn(model: Any, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        labels = batch["labels"]
        mask = (labels != IGNORE_INDEX)
        logps = token_logps(model, batch["input_ids"], labels)
        old = batch.get("old_logps")
        old = logps.detach() if old is None else old.to(logps)
        ref = batch.get("ref_logps")
        per_token, parts = per_token_grpo_loss(logps, old, batch["advantages"], None if ref is None else ref.to(logps),
                                               epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, beta=cfg.beta)
        total, count = reduce_grpo_loss(per_token, mask, cfg.loss_type, cfg.max_completion_tokens)
        loss = total / count.clamp(min=1e-9)
        tokens = mask.sum().clamp(min=1)
        metrics: dict[str, Any] = {
            "kl": (parts["kl"] * mask).sum() / tokens,
            "clip_ratio": (parts["clipped"] & mask).sum() / tokens,
            "num_tokens": float(mask.sum()),
        }
        metrics.update(batch.get("rollout_stats", {}))
        return loss, metrics

    return loss_fn


def select_groups(rewards: torch.Tensor, num_generations: int, keep: int) -> list[int]:
    """Indices of ``keep`` groups to train on: groups whose rewards differ first, in draw order, then the rest.

    DAPO's dynamic sampling (Yu et al. 2025) keeps only groups with a reward spread, since an all-equal group
    has zero advantage and no gradient; here the batch is drawn ``oversample`` times too large once and filled
    with informative groups first (so the step size in prompts never changes and no rank waits on another).
    """
    std = rewards.view(-1, num_generations).float().std(-1)
    order = sorted(range(std.numel()), key=lambda g: (bool(std[g] < 1e-6), g))
    return sorted(order[:keep])


# ---------------------------------------------------------------------------------- the rewards
RewardFn = Callable[..., float]


def correctness_reward(prompt: str, completion: str, answer: str | None = None, **_: Any) -> float:
    """1.0 if the reply (trimmed) equals the example's ``answer`` field, else 0.0."""
    if answer is None:
        raise ValueError("the correctness reward needs an 'answer' field in each prompt record")
    return 1.0 if completion.strip() == str(answer).strip() else 0.0


def format_reward(prompt: str, completion: str, finish_reason: str | None = None, **_: Any) -> float:
    """1.0 if the completion ended with <|end|> (finish_reason "stop") within the token budget."""
    return 1.0 if finish_reason == "stop" else 0.0


def load_reward(spec: str) -> RewardFn:
    """A reward function from a built-in name (``correctness``, ``format``) or ``module:function``.

    The module is imported normally (the working directory is on the path, so ``my_rewards:score`` finds
    ``./my_rewards.py``).  Raises ValueError naming ``--reward`` on any bad spec.
    """
    if spec == "correctness":
        return correctness_reward
    if spec == "format":
        return format_reward
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--reward {spec!r}: expected module:function (e.g. my_rewards:score) or one of "
                         f"{list(BUILTIN_REWARDS)}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--reward {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"--reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"--reward {spec!r}: {attr!r} is not callable")
    try:
        inspect.signature(fn).bind("prompt", "completion")
    except TypeError as exc:
        raise ValueError(f"--reward {spec!r}: must accept (prompt, completion, **example_fields) ({exc})") from exc
    except ValueError:  # builtins without a signature: trust them
        pass
    return fn


def _wants_finish_reason(fn: RewardFn) -> bool:
    try:
        return "finish_reason" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def score_completions(reward_fns: Sequence[RewardFn], prompts: Sequence[str], completions: Sequence[str],
                      finish_reasons: Sequence[str], fields: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """(N, num_fns) float rewards; a function returning a non-number or NaN raises ValueError."""
    out = torch.zeros(len(completions), len(reward_fns), dtype=torch.float64)
    for j, fn in enumerate(reward_fns):
        extra = _wants_finish_reason(fn)
        for i, (prompt, completion, reason, kw) in enumerate(zip(prompts, completions, finish_reasons, fields)):
            kwargs = {**kw, "finish_reason": reason} if extra else dict(kw)
            value = fn(prompt, completion, **kwargs)
            if isinstance(value, bool):
                value = float(value)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                name = getattr(fn, "__name__", repr(fn))
                raise ValueError(f"reward function {name} returned {value!r} (expected a finite float)")
            out[i, j] = float(value)
    return out


# ------------------------------------------------------------------------------------ the prompts
@dataclass
class PromptRecord:
    messages: list[dict[str, str]]  # the conversation up to the user turn the model answers
    fields: dict[str, Any] = field(default_factory=dict)  # handed to the reward functions as keywords

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]


def embedded_prompts(seed: int = 0, per_task: int = 1200, split: str = "train") -> list[PromptRecord]:
    """The embedded tasks' prompts (same splits as sft/dpo/align-eval), with ``task`` and ``answer`` fields."""
    from tritium.align.tasks import make_splits

    return [PromptRecord(ex.messages(with_answer=False), {"task": ex.task, "answer": ex.answer})
            for ex in make_splits(seed=seed, per_task=per_task)[split]]


def parse_prompt_record(obj: Any) -> PromptRecord:
    """One prompt line: ``{"prompt": str, ...fields}`` or ``{"messages": [...], ...fields}``."""
    from tritium.model.chat import validate_messages

    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    row = dict(obj)
    if "messages" in row:
        messages = validate_messages(row.pop("messages"))
        if messages[-1]["role"] != "user":
            raise ValueError("'messages' must end with a user turn")
    elif isinstance(row.get("prompt"), str):
        messages = [{"role": "user", "content": row.pop("prompt")}]
    else:
        raise ValueError("needs a 'prompt' string or a 'messages' list")
    return PromptRecord(messages, row)


def load_prompt_jsonl(path: str | Path) -> list[PromptRecord]:
    """JSONL of ``{"prompt": str, ...fields}`` or ``{"messages": [...], ...fields}``; fields go to the rewards.
    Read by ``align.data.read_jsonl`` (errors name the file and line)."""
    records, _ = read_jsonl(path, parse_prompt_record)
    if not records:
        raise ValueError(f"--data {path}: no prompts")
    return records


# ----------------------------------------------------------------------------------- the rollouts
def sync_weights(policy: torch.nn.Module, replica: torch.nn.Module) -> None:
    """Copy ``policy``'s current parameters into ``replica`` (a collective under ZeRO-3: all ranks call it)."""
    params = list(policy.parameters())
    zero3 = any(hasattr(p, "ds_id") for p in params)
    if zero3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    else:
        gather = contextlib.nullcontext()
    targets = dict(replica.named_parameters())
    with torch.no_grad(), gather:
        for name, param in policy.named_parameters():
            if name not in targets:
                raise ValueError(f"weight sync: the replica has no parameter {name!r}")
            targets[name].copy_(param.data.to(targets[name].dtype))


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


class RolloutSource:
    """``fit``'s ``make_batches``: generates, scores and collates a rollout batch from the current policy.

    ``policy`` is the module handed to ``fit`` (DeepSpeed wraps it in place, so it always holds the
    current weights).  Per rollout, each rank takes ``prompts_per_rank`` prompts, G completions each, and
    yields ``grad_accum`` micro-batches of ``micro_batch`` completions, ``num_iterations`` times over.
    """

    def __init__(self, policy: torch.nn.Module, tokenizer: Any, prompts: Sequence[PromptRecord], cfg: GRPOConfig,
                 micro_batch: int, grad_accum: int, reference_checkpoint: str | None = None,
                 log_path: str | Path | None = None) -> None:
        from tritium.model.chat import encode_prompt

        rows = micro_batch * grad_accum
        if rows % cfg.num_generations:
            raise ValueError(f"micro_batch x grad_accum = {rows} completions per rank per step must be a multiple "
                             f"of --num-generations ({cfg.num_generations})")
        self.policy, self.tokenizer, self.cfg = policy, tokenizer, cfg
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.prompts_per_rank = rows // cfg.num_generations
        self.reward_fns = [load_reward(spec) for spec in cfg.rewards]
        self.reward_names = [spec.split(":")[-1] for spec in cfg.rewards]
        encoded = [(record, encode_prompt(tokenizer, record.messages)) for record in prompts]
        self.prompts = [(r, ids) for r, ids in encoded if len(ids) <= cfg.max_prompt_len]
        if not self.prompts:
            raise ValueError(f"no prompt fits max_prompt_len={cfg.max_prompt_len} tokens")
        self.dropped = len(encoded) - len(self.prompts)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id >= 0 else 0
        self.reference_checkpoint = reference_checkpoint
        self.log_path = Path(log_path) if log_path else None
        self._replica = self._reference = self._engine = None
        self._last_end: float | None = None
        self.totals = {"gen_s": 0.0, "train_s": 0.0}

    # -- lazily built: the policy's device is known only once DeepSpeed has placed it
    def _build(self) -> None:
        from tritium.model.transformer import Transformer
        from tritium.serve.engine import LLMEngine

        device = next(self.policy.parameters()).device
        self._replica = Transformer(self.policy.config).to(device=device, dtype=torch.float32).eval()
        self._replica.requires_grad_(False)
        num_seqs = self.prompts_per_rank * self.cfg.oversample * self.cfg.num_generations
        longest = max(len(ids) for _, ids in self.prompts) + self.cfg.max_completion_tokens
        block_size = 16
        self._engine = LLMEngine(self._replica, self.tokenizer, block_size=block_size,
                                 num_blocks=num_seqs * -(-longest // block_size) + 1, max_num_seqs=num_seqs,
                                 max_prefill_tokens=max(512, num_seqs * 8))
        if self.cfg.beta and self.reference_checkpoint:
            self._reference = Transformer.from_pretrained(self.reference_checkpoint, device=device,
                                                          dtype=torch.float32).eval()
            self._reference.requires_grad_(False)

    def __call__(self, start: int = 0, rank: int = 0, world: int = 1) -> Iterator[dict[str, Any]]:
        per_rollout = self.grad_accum * self.cfg.num_iterations
        rollout, offset = divmod(start, per_rollout)
        while True:
            batches = self.rollout(rollout, rank, world)
            for i in range(offset, per_rollout):
                yield batches[i % self.grad_accum]
            offset = 0
            rollout += 1

    def _prompts_for(self, rollout: int, rank: int, world: int) -> list[tuple[PromptRecord, list[int]]]:
        drawn = self.prompts_per_rank * self.cfg.oversample
        first = rollout * drawn * world + rank * drawn
        out = []
        for position in range(first, first + drawn):
            epoch, index = divmod(position, len(self.prompts))
            order = list(range(len(self.prompts)))
            random.Random(f"grpo:{self.cfg.seed}:{epoch}").shuffle(order)
            out.append(self.prompts[order[index]])
        return out

    def generate(self, prompt_ids: Sequence[Sequence[int]], rollout: int, rank: int) -> list[Any]:
        """G completions per prompt from the replica: RequestOutputs laid out group by group."""
        from tritium.serve.sampling import SamplingParams

        G = self.cfg.num_generations
        for p, ids in enumerate(prompt_ids):
            for g in range(G):
                # per-request seeds: the same run draws the same completions, whatever the batching
                seed = hash((self.cfg.seed, rollout, rank, p, g)) & 0x7FFFFFFF
                params = SamplingParams(max_tokens=self.cfg.max_completion_tokens, temperature=self.cfg.temperature,
                                        top_p=self.cfg.top_p, seed=seed)
                self._engine.add_request(f"r{rollout}-p{p}-g{g}", ids, params)
        finished = self._engine.run_to_completion()
        return [finished[f"r{rollout}-p{p}-g{g}"] for p in range(len(prompt_ids)) for g in range(G)]

    def rollout(self, rollout: int, rank: int = 0, world: int = 1) -> list[dict[str, Any]]:
        """Sync, generate, score, and collate one rollout batch into ``grad_accum`` micro-batches."""
        from tritium.model.chat import stop_token_ids

        cfg, G = self.cfg, self.cfg.num_generations
        now = time.perf_counter()
        if self._last_end is not None:
            self.totals["train_s"] += now - self._last_end  # the time since the last rollout was training
        if self._engine is None:
            self._build()
        sync_weights(self.policy, self._replica)
        drawn = self._prompts_for(rollout, rank, world)
        gen_start = time.perf_counter()
        outputs = self.generate([ids for _, ids in drawn], rollout, rank)
        gen_s = time.perf_counter() - gen_start
        stops = set(stop_token_ids(self.tokenizer))
        texts, reasons, completions = [], [], []
        for out in outputs:
            ids = list(out.token_ids)
            completions.append(ids)
            reply = ids[:-1] if ids and ids[-1] in stops else ids
            texts.append(self.tokenizer.decode(reply))
            reasons.append(out.finish_reason)
        records = [record for record, _ in drawn for _ in range(G)]
        per_fn = score_completions(self.reward_fns, [r.prompt for r in records], texts, reasons,
                                   [r.fields for r in records])
        weights = torch.tensor(cfg.reward_weights, dtype=torch.float64)
        rewards = (per_fn * weights).sum(-1)
        advantages, zero_std = group_advantages(rewards, G, cfg.scale_rewards)
        # statistics describe everything sampled (the policy's behaviour); training uses the kept groups
        gen_tokens = sum(len(c) for c in completions)
        stats = self._global_stats(per_fn, rewards, zero_std, completions, gen_tokens, gen_s,
                                   [r.fields.get("task") for r in records])
        keep = select_groups(rewards, G, self.prompts_per_rank)
        rows_kept = [g * G + i for g in keep for i in range(G)]
        kept_zero = sum(float(rewards[g * G:(g + 1) * G].std() < 1e-6) for g in keep) / len(keep)
        rows = self._collate([drawn[g][1] for g in keep for _ in range(G)], [completions[i] for i in rows_kept],
                             advantages[rows_kept])
        stats["trained_zero_std_frac"] = self._mean_over_ranks(kept_zero)
        records = [records[i] for i in rows_kept]
        texts = [texts[i] for i in rows_kept]
        rewards = rewards[rows_kept]
        self.totals["gen_s"] += gen_s
        stats["gen_time_share"] = self.totals["gen_s"] / max(self.totals["gen_s"] + self.totals["train_s"], 1e-9)
        if rank == 0 and self.log_path is not None:
            sample = {"prompt": records[0].prompt, "completion": texts[0], "reward": float(rewards[0])}
            with self.log_path.open("a") as handle:
                handle.write(json.dumps({"rollout": rollout, **stats, "sample": sample}) + "\n")
        chunks = []
        for i in range(self.grad_accum):
            part = {k: v[i * self.micro_batch:(i + 1) * self.micro_batch] for k, v in rows.items()}
            width = int((part["labels"] != IGNORE_INDEX).nonzero()[:, 1].max()) + 1 if (
                part["labels"] != IGNORE_INDEX).any() else 1
            part = {k: (v[:, :width] if v.dim() == 2 else v) for k, v in part.items()}
            part["rollout_stats"] = {k: v for k, v in stats.items() if isinstance(v, float)}
            chunks.append(part)
        self._last_end = time.perf_counter()
        return chunks

    def _collate(self, prompts: Sequence[list[int]], completions: Sequence[list[int]],
                 advantages: torch.Tensor) -> dict[str, torch.Tensor]:
        width = max(len(p) + len(c) for p, c in zip(prompts, completions))
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
        for row, (p, c) in enumerate(zip(prompts, completions)):
            ids = list(p) + list(c)
            input_ids[row, :len(ids)] = torch.tensor(ids)
            if c:  # labels are shifted: position t predicts token t + 1
                labels[row, len(p) - 1:len(ids) - 1] = torch.tensor(c)
        rows = {"input_ids": input_ids, "labels": labels, "advantages": advantages.float()}
        if self.cfg.num_iterations > 1 or self.cfg.beta:
            with torch.no_grad():
                device = next(self._replica.parameters()).device
                ids, lab = input_ids.to(device), labels.to(device)
                if self.cfg.num_iterations > 1:  # the policy at generation time == the freshly synced replica
                    rows["old_logps"] = token_logps(self._replica, ids, lab).cpu()
                if self.cfg.beta:
                    reference = self._reference if self._reference is not None else self._replica
                    rows["ref_logps"] = token_logps(reference, ids, lab).cpu()
        return rows

    @staticmethod
    def _mean_over_ranks(value: float) -> float:
        dist = _dist()
        if dist is None or dist.get_world_size() == 1:
            return value
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, value)
        return sum(gathered) / len(gathered)

    def _global_stats(self, per_fn: torch.Tensor, rewards: torch.Tensor, zero_std: float,
                      completions: Sequence[list[int]], gen_tokens: int, gen_s: float,
                      tasks: Sequence[str | None]) -> dict[str, Any]:
        """Rollout statistics over all ranks (one small all-gather; every rank calls it at the same step)."""
        local = {"per_fn": per_fn.tolist(), "rewards": rewards.tolist(), "zero_std": zero_std,
                 "lengths": [len(c) for c in completions], "gen_tokens": gen_tokens, "gen_s": gen_s,
                 "tasks": list(tasks)}
        dist = _dist()
        gathered = [local]
        if dist is not None and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
        per_fn_all = torch.tensor([row for g in gathered for row in g["per_fn"]], dtype=torch.float64)
        rewards_all = torch.tensor([r for g in gathered for r in g["rewards"]], dtype=torch.float64)
        lengths = [n for g in gathered for n in g["lengths"]]
        stats: dict[str, Any] = {"reward": float(rewards_all.mean()), "reward_std": float(rewards_all.std())}
        for j, name in enumerate(self.reward_names):
            stats[f"reward_{name}"] = float(per_fn_all[:, j].mean())
            stats[f"reward_{name}_std"] = float(per_fn_all[:, j].std())
        tasks_all = [t for g in gathered for t in g["tasks"]]
        for task in sorted({t for t in tasks_all if t}):
            picked = [i for i, t in enumerate(tasks_all) if t == task]
            stats[f"reward_task_{task}"] = float(rewards_all[picked].mean())
        stats["zero_std_frac"] = sum(g["zero_std"] for g in gathered) / len(gathered)
        stats["completion_len"] = sum(lengths) / max(len(lengths), 1)
        stats["gen_tokens_per_s"] = sum(g["gen_tokens"] for g in gathered) / max(max(g["gen_s"] for g in gathered),
                                                                                 1e-9)
        stats["gen_s"] = max(g["gen_s"] for g in gathered)
        return stats


# ------------------------------------------------------------------------------------- the run
def grpo_prompts(cfg: GRPOConfig, data: str | None = None) -> list[PromptRecord]:
    return embedded_prompts(cfg.seed, cfg.per_task) if data is None else load_prompt_jsonl(data)


def train_grpo(train_cfg: Any, cfg: GRPOConfig, checkpoint: str, data: str | None = None):
    """GRPO from ``checkpoint`` with ``tritium.train.trainer.fit``; writes ``OUT/rollouts.jsonl`` and plots."""
    from tritium.model.tokenizer import Tokenizer
    from tritium.model.transformer import Transformer
    from tritium.train.engine import init_distributed
    from tritium.train.trainer import fit

    rank, world, _ = init_distributed(train_cfg)
    micro_batch, grad_accum, _ = train_cfg.batch_layout(world)
    tokenizer = Tokenizer.load(checkpoint)
    out = Path(train_cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not train_cfg.resume and (out / "rollouts.jsonl").exists():
            (out / "rollouts.jsonl").unlink()
    policy = Transformer.from_pretrained(checkpoint, dtype=torch.float32)
    source = RolloutSource(policy, tokenizer, grpo_prompts(cfg, data), cfg, micro_batch, grad_accum,
                           reference_checkpoint=checkpoint, log_path=out / "rollouts.jsonl")
    result = fit(train_cfg, make_batches=source, loss_fn=make_grpo_loss(cfg), tokenizer=tokenizer, model=policy,
                 init_from=checkpoint,
                 extra_config={"grpo": cfg.to_dict(), "checkpoint": str(checkpoint),
                               "grpo_data": data or "embedded tasks (train split)",
                               "prompts": len(source.prompts), "dropped_too_long": source.dropped})
    if rank == 0 and result.metrics_path is not None and result.metrics_path.is_file():
        plot_grpo(result.metrics_path, out / "grpo.png")
    return result


def plot_grpo(metrics_path: str | Path, path: str | Path) -> None:
    """Reward per function, zero-variance groups, completion length, KL and the generation time share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    records = [r for r in records if "reward" in r]
    if not records:
        return
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6))
    ax = axes[0][0]
    for key in sorted(k for k in records[-1] if k.startswith("reward") and not k.endswith("_std")):
        ax.plot(steps, [r.get(key) for r in records], label=key.removeprefix("reward_") if key != "reward" else
                "total")
    ax.set_title("mean reward")
    ax.legend(fontsize=7)
    axes[0][1].plot(steps, [r.get("zero_std_frac") for r in records])
    axes[0][1].set_title("groups with zero reward variance")
    axes[1][0].plot(steps, [r.get("completion_len") for r in records], label="completion tokens")
    axes[1][0].plot(steps, [r.get("kl") for r in records], label="KL to reference")
    axes[1][0].legend(fontsize=7)
    axes[1][0].set_title("completion length / KL")
    axes[1][1].plot(steps, [r.get("gen_time_share") for r in records])
    axes[1][1].set_ylim(0, 1)
    axes[1][1].set_title("share of wall time in generation")
    for ax in axes.flat:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
