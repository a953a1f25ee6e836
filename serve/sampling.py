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

from tritium.serve.grammar import StructuredOutput

INT64_MAX = 2**63 - 1
# torch.Generator.manual_seed accepts [-2**63, 2**64 - 1]; derived seeds (n > 1, JSON retries) wrap into it.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def offset_seed(seed: int, offset: int) -> int:
    """``seed + offset`` kept inside torch's seed range (wraps past 2**64 - 1), for per-choice seeds."""
    return (seed + offset) % 2**64 if seed >= 0 else (seed + offset)


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
    # Structured output (serve/grammar.py): a grammar masks each step's logits so only tokens that keep the
    # answer valid can be drawn; None = unconstrained (no per-step cost).
    structured: StructuredOutput | None = None

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
        if not is_int(self.top_k) or not 0 <= self.top_k <= INT64_MAX:
            fail("top_k", f"an integer from 0 to {INT64_MAX} (0 or -1 = off)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            fail("top_p", "in (0, 1]")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            fail("min_p", "in [0, 1]")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            fail("repetition_penalty", "> 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_num(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                fail(name, "in [-2, 2]")
        if self.seed is not None and (not is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX):
            fail("seed", f"an integer from {SEED_MIN} to {SEED_MAX} (torch.Generator's range) or None")
        if not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", "a string or a sequence of non-empty strings")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "a sequence of non-negative integers")
        if not isinstance(self.logprobs, bool):
            fail("logprobs", "a bool")
        if not isinstance(self.ignore_eos, bool):
            fail("ignore_eos", "a bool")
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            fail("structured", "a StructuredOutput or None")

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
# Each takes logits (B, V) and per-row settings, returns new logits with filtered-out entries at -inf.
# A setting that means "off" leaves its row untouched.  ``process_logits`` runs them in float64 on rows
# shifted so their maximum is 0: then a temperature as small as 1e-45 (or 5e-324) divides 0 by t for the
# best token and sends the others to -inf, instead of overflowing to inf/inf = NaN, and every row keeps at
# least one finite entry, so its softmax is a finite, normalised distribution.

def _as_column(values: Sequence[float] | torch.Tensor | float, logits: torch.Tensor,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    dtype = dtype or logits.dtype
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
    # logit * rep only where logit < 0: a -inf or 0 logit times a huge penalty must not become NaN.
    penalised = torch.where(logits > 0, logits / rep, torch.where(logits < 0, logits * rep, logits))
    logits = torch.where(context_mask, penalised, logits)
    counts = output_counts.to(logits.dtype)
    logits = logits - _as_column(frequency_penalty, logits) * counts
    return logits - _as_column(presence_penalty, logits) * (counts > 0).to(logits.dtype)


def shift_to_max(logits: torch.Tensor) -> torch.Tensor:
    """Rows shifted so their maximum is exactly 0 (softmax-invariant). NaN counts as -inf; a row holding
    +inf keeps only its +inf entries (they outweigh everything); a row of only -inf becomes uniform."""
    logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    top = logits.max(dim=-1, keepdim=True).values
    pos_inf = torch.isposinf(logits)
    shifted = torch.where(torch.isfinite(top), logits - torch.where(torch.isfinite(top), top, 0.0), logits)
    shifted = torch.where(torch.isposinf(top), torch.where(pos_inf, 0.0, float("-inf")), shifted)
    return torch.where(torch.isneginf(top), torch.zeros_like(shifted), shifted)


def top_k_filter(logits: torch.Tensor, top_k) -> torch.Tensor:
    """Keep the ``top_k`` largest logits of each row (0 = keep all); ties at the k-th value are kept."""
    vocab = logits.shape[-1]
    if not isinstance(top_k, torch.Tensor):  # clamp in Python: a top_k up to 2**63 - 1 must not overflow
        top_k = [min(int(k), vocab) for k in ([top_k] * logits.shape[0] if isinstance(top_k, int) else top_k)]
    k = _as_column(top_k, logits, torch.long).clamp(min=0)
    k = torch.where(k == 0, torch.full_like(k, vocab), k).clamp(max=vocab)
    sorted_logits = logits.sort(dim=-1, descending=True).values
    kth = sorted_logits.gather(-1, k - 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p`` (1 = keep all).

    A token is kept when the mass strictly before it (in descending order) is below top_p, so the most
    likely token always survives; the stable sort puts the lowest id first among ties, as argmax does,
    so top_p -> 0+ keeps exactly the greedy token.
    """
    p = _as_column(top_p, logits)
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    remove_sorted = (mass_before >= p) & (p < 1.0)
    remove_sorted[:, 0] = False  # rounding in the cumsum must never drop the top token
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
    """All processors for a batch of rows with per-row params: (B, V) in, (B, V) fp32 out, each row
    shifted so its maximum is 0 (the same distribution as the unshifted logits)."""
    logits = logits.double()
    if output_counts is not None and any(p.needs_penalties for p in params):
        logits = apply_penalties(logits, output_counts, context_mask,
                                 [p.repetition_penalty for p in params],
                                 [p.presence_penalty for p in params],
                                 [p.frequency_penalty for p in params])
    logits = shift_to_max(logits)
    temperature = [p.temperature if p.temperature > 0 else 1.0 for p in params]
    if any(t != 1.0 for t in temperature):
        logits = logits / _as_column(temperature, logits)  # max stays 0: (0 / t) = 0 for every t > 0
    if any(p.top_k > 0 for p in params):
        logits = top_k_filter(logits, [p.top_k for p in params])
    if any(p.top_p < 1.0 for p in params):
        logits = top_p_filter(logits, [p.top_p for p in params])
    if any(p.min_p > 0 for p in params):
        logits = min_p_filter(logits, [p.min_p for p in params])
    return logits.float()


def sampling_probs(logits: torch.Tensor, params: Sequence[SamplingParams],
                   output_counts: torch.Tensor | None = None,
                   context_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution each row is drawn from, (B, V) fp32: one-hot at the argmax for greedy rows."""
    processed = process_logits(logits, params, output_counts, context_mask)
    probs = processed.softmax(dim=-1)
    greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    one_hot = torch.zeros_like(probs).scatter(-1, processed.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None], one_hot, probs)


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
    raw = torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
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
        logprobs = shift_to_max(raw).log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs
