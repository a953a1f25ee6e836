"""How the next token is chosen: ``SamplingParams`` and the logits processors.

A row of logits goes through, in order (the order Hugging Face's warpers and
vLLM's sampler use): penalties -> temperature -> top-k -> top-p -> min-p ->
draw.  Every processor works on a whole batch at once with per-row settings,
so one sampler call serves a continuous batch of requests that each asked for
something different.

Reproducibility: a request with a ``seed`` owns a ``torch.Generator``; its
random draw uses only that generator, so the same seed gives the same tokens
whether the request runs alone or inside a batch of strangers.  Draws use the
exponential-race trick (argmax of p / E with E ~ Exp(1)), which samples from p
exactly and needs one noise vector per row.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16  # new tokens to generate at most (>= 1)
    temperature: float = 1.0  # softmax temperature; 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = off
    top_p: float = 1.0  # nucleus: keep the smallest set whose probability mass reaches top_p
    min_p: float = 0.0  # drop tokens whose probability is below min_p * (top probability)
    repetition_penalty: float = 1.0  # CTRL/HF: over prompt+output tokens, logit>0 divided by it, else multiplied
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence of the token in the output
    seed: int | None = None  # per-request generator seed: same seed, same tokens, whatever the batch
    stop: tuple[str, ...] = ()  # stop strings; the text is cut right before the first one
    stop_token_ids: tuple[int, ...] = ()  # extra stop ids (eos and end-of-turn always stop unless ignore_eos)
    logprobs: bool = False  # report the log-probability (raw model distribution) of each chosen token
    ignore_eos: bool = False  # keep generating through eos / end-of-turn

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if self.stop is None:
            self.stop = ()
        if self.stop_token_ids is None:
            self.stop_token_ids = ()
        if isinstance(self.stop_token_ids, int):
            self.stop_token_ids = (self.stop_token_ids,)
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0

        def fail(name: str, rule: str) -> None:
            raise ValueError(f"SamplingParams.{name} must be {rule}, got {getattr(self, name)!r}")

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_num(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            fail("max_tokens", "an integer >= 1")
        if not is_num(self.temperature) or self.temperature < 0:
            fail("temperature", "a finite number >= 0 (0 = greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            fail("top_k", "an integer >= 0 (0 or -1 = off)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            fail("top_p", "in (0, 1]")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            fail("min_p", "in [0, 1]")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            fail("repetition_penalty", "> 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_num(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                fail(name, "in [-2, 2]")
        if self.seed is not None and not is_int(self.seed):
            fail("seed", "an integer or None")
        if not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", "a string or a sequence of non-empty strings")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "a sequence of non-negative integers")
        if not isinstance(self.logprobs, bool):
            fail("logprobs", "a bool")
        if not isinstance(self.ignore_eos, bool):
            fail("ignore_eos", "a bool")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"SamplingParams: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def make_generator(self, device: torch.device | str) -> torch.Generator | None:
        """The request's own random stream (None = use the global one)."""
        if self.seed is None or self.greedy:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed)
        return generator


# --------------------------------------------------------------------------- processors
# Each takes logits (B, V) in fp32 and per-row settings, returns new logits with
# filtered-out entries at -inf.  A setting that means "off" leaves its row untouched.

def _as_column(values: Sequence[float] | torch.Tensor | float, logits: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.to(device=logits.device, dtype=dtype).reshape(-1, 1)
    if isinstance(values, (int, float)):
        values = [values] * logits.shape[0]
    return torch.tensor(list(values), device=logits.device, dtype=dtype).reshape(-1, 1)


def apply_penalties(logits: torch.Tensor, output_counts: torch.Tensor, context_mask: torch.Tensor,
                    repetition_penalty, presence_penalty, frequency_penalty) -> torch.Tensor:
    """Repetition (over prompt+output, ``context_mask`` (B, V) bool) and presence/frequency (over the
    output, ``output_counts`` (B, V) counts) penalties."""
    rep = _as_column(repetition_penalty, logits)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(context_mask, penalised, logits)
    counts = output_counts.to(logits.dtype)
    logits = logits - _as_column(frequency_penalty, logits) * counts
    return logits - _as_column(presence_penalty, logits) * (counts > 0).to(logits.dtype)


def top_k_filter(logits: torch.Tensor, top_k) -> torch.Tensor:
    """Keep the ``top_k`` largest logits of each row (0 = keep all); ties at the k-th value are kept."""
    vocab = logits.shape[-1]
    k = _as_column(top_k, logits, torch.long).clamp(min=0)
    k = torch.where(k == 0, torch.full_like(k, vocab), k).clamp(max=vocab)
    sorted_logits = logits.sort(dim=-1, descending=True).values
    kth = sorted_logits.gather(-1, k - 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p`` (1 = keep all).

    A token is kept when the mass strictly before it (in descending order) is below top_p, so the most
    likely token always survives.
    """
    p = _as_column(top_p, logits)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    remove_sorted = (mass_before >= p) & (p < 1.0)
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the row's top probability (0 = keep all)."""
    m = _as_column(min_p, logits)
    probs = logits.softmax(dim=-1)
    threshold = m * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, params: Sequence[SamplingParams],
                   output_counts: torch.Tensor | None = None,
                   context_mask: torch.Tensor | None = None) -> torch.Tensor:
    """All processors for a batch of rows with per-row params (fp32 in, fp32 out)."""
    logits = logits.float()
    if output_counts is not None and any(p.needs_penalties for p in params):
        logits = apply_penalties(logits, output_counts, context_mask,
                                 [p.repetition_penalty for p in params],
                                 [p.presence_penalty for p in params],
                                 [p.frequency_penalty for p in params])
    temperature = [p.temperature if p.temperature > 0 else 1.0 for p in params]
    if any(t != 1.0 for t in temperature):
        logits = logits / _as_column(temperature, logits)
    if any(p.top_k > 0 for p in params):
        logits = top_k_filter(logits, [p.top_k for p in params])
    if any(p.top_p < 1.0 for p in params):
        logits = top_p_filter(logits, [p.top_p for p in params])
    if any(p.min_p > 0 for p in params):
        logits = min_p_filter(logits, [p.min_p for p in params])
    return logits


def sample_next(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None] | None = None,
                output_counts: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Choose one token per row. Returns (token_ids (B,) long, logprobs (B,) fp32 or None).

    ``logits`` (B, V) are the raw model logits; logprobs are of the chosen token under the raw
    distribution (what a client scoring text expects), computed only when a row asked for them.
    """
    if logits.dim() != 2 or logits.shape[0] != len(params):
        raise ValueError(f"logits must be (B, V) with B = len(params) = {len(params)}, got {tuple(logits.shape)}")
    raw = logits.float()
    greedy_rows = [p.greedy for p in params]
    if all(greedy_rows) and (output_counts is None or not any(p.needs_penalties for p in params)):
        tokens = raw.argmax(dim=-1)
    else:
        processed = process_logits(raw, params, output_counts, context_mask)
        tokens = processed.argmax(dim=-1)
        if not all(greedy_rows):
            probs = processed.softmax(dim=-1)
            generators = list(generators) if generators is not None else [None] * len(params)
            noise = torch.empty_like(probs)
            for row, (p, generator) in enumerate(zip(params, generators)):
                if not p.greedy:
                    noise[row].exponential_(generator=generator)
            # Exponential race: argmax p_i / E_i is an exact draw from p (zero-probability tokens never win).
            drawn = (probs / noise.clamp_min(1e-20)).argmax(dim=-1)
            sampled_mask = torch.tensor([not g for g in greedy_rows], device=raw.device)
            tokens = torch.where(sampled_mask, drawn, tokens)
    logprobs = None
    if any(p.logprobs for p in params):
        logprobs = raw.log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs
