"""One request's decoding state, shared by ``Generator`` and ``LLMEngine``.

A ``SequenceState`` owns everything about a completion except its KV cache:
the prompt and output ids, the request's random generator, the text tracker
(incremental detokenization + stop strings), the stop-token set and the finish
reason.  ``append`` applies the stop rules in one place, so the generator and
the engine cannot disagree about where a completion ends.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from tritium.serve.detokenizer import TextTracker
from tritium.serve.sampling import SamplingParams, sample_next


def stop_token_set(tokenizer, params: SamplingParams) -> frozenset[int]:
    """Token ids that end a completion: the request's own, plus eos and end-of-turn unless ignore_eos."""
    ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        for name in ("eos_id", "end_of_turn_id"):
            value = getattr(tokenizer, name, None)
            if isinstance(value, int) and value >= 0:
                ids.add(value)
    return frozenset(ids)


def encode_prompt(tokenizer, prompt: str | Sequence[int]) -> list[int]:
    """A text prompt gets the tokenizer's BOS (as in training); a list of ids is taken as is."""
    if isinstance(prompt, str):
        bos_id = getattr(tokenizer, "bos_id", None)
        return tokenizer.encode(prompt, bos=isinstance(bos_id, int) and bos_id >= 0)
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.tolist()
    return [int(t) for t in prompt]


def check_prompt(prompt_ids: Sequence[int], params: SamplingParams, max_model_len: int, vocab_size: int) -> None:
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty: a prompt needs at least one token (e.g. BOS)")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt_ids holds token id(s) outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    if len(prompt_ids) + params.max_tokens > max_model_len:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = "
                         f"{len(prompt_ids) + params.max_tokens} exceeds the model's context of {max_model_len} "
                         "tokens; shorten the prompt or lower max_tokens")


class SequenceState:
    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, tokenizer,
                 device: torch.device | str = "cpu") -> None:
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.output_ids: list[int] = []
        self.logprobs: list[float] | None = [] if params.logprobs else None
        self.generator = params.make_generator(device)
        self.tracker = TextTracker(tokenizer, params.stop)
        self.stop_ids = stop_token_set(tokenizer, params)
        # ids at or past the tokenizer's size (a padded embedding/head) are never sampled
        self.vocab_size: int | None = getattr(tokenizer, "vocab_size", None)
        self.finish_reason: str | None = None
        self.error: str | None = None  # why the request failed (finish_reason "error")
        self.grammar = None  # GrammarState when the request asked for structured output
        if params.structured is not None:
            from tritium.serve.grammar import backend_for

            self.grammar = backend_for(tokenizer).matcher(params.structured, sorted(self.stop_ids))

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.tracker.text

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def append(self, token_id: int, logprob: float | None = None) -> str:
        """Record a sampled token; returns the text delta and sets ``finish_reason`` when done."""
        if self.finished:
            raise RuntimeError("append() on a finished sequence")
        if self.grammar is not None:  # first: a token the grammar refuses fails the request, unrecorded
            self.grammar.accept(token_id)
        self.output_ids.append(token_id)
        if self.logprobs is not None:
            self.logprobs.append(float(logprob) if logprob is not None else float("nan"))
        if token_id in self.stop_ids or (self.grammar is not None and self.grammar.terminated):
            self.finish_reason = "stop"
            return self.tracker.finish()  # the stop token's own text is never shown
        delta, stopped = self.tracker.add(token_id)
        if stopped or (self.grammar is not None and self.grammar.complete):
            self.finish_reason = "stop"
            if not stopped:
                delta += self.tracker.finish()
        elif len(self.output_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
            delta += self.tracker.finish()
        return delta

    def abort(self) -> str:
        self.finish_reason = "abort"
        return self.tracker.finish()

    def fail(self, error: BaseException | str) -> None:
        """End this request alone after a fault in its own handling (sampling, detokenizing, stop checks):
        ``finish_reason`` "error", no more text (the tracker may be what failed)."""
        self.finish_reason = "error"
        self.error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"


def penalty_tensors(states: Sequence[SequenceState], vocab_size: int, device: torch.device
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(output_counts (B, V), context_mask (B, V)) for the rows' penalties, or (None, None) if unused."""
    if not any(s.params.needs_penalties for s in states):
        return None, None
    counts = torch.zeros(len(states), vocab_size, device=device)
    context = torch.zeros(len(states), vocab_size, dtype=torch.bool, device=device)
    for row, state in enumerate(states):
        if state.output_ids:
            out = torch.tensor(state.output_ids, device=device)
            counts[row].index_add_(0, out, torch.ones(len(out), device=device))
        context[row, torch.tensor(state.all_ids, device=device)] = True
    return counts, context


def sample_for(states: Sequence[SequenceState], logits: torch.Tensor) -> tuple[list[int], list[float | None]]:
    """Sample one token for each state from its row of ``logits`` (B, V).

    Columns at or past the tokenizer's size (a model whose embedding/head is padded beyond the
    tokenizer, e.g. 2112 rows for 2048 pieces) are masked to -inf: they have no text.  Rows whose request
    carries a grammar (structured output) get one batched grammar mask first; without any, nothing runs.
    """
    if any(s.grammar is not None for s in states):
        from tritium.serve.grammar import mask_logits

        logits = mask_logits([s.grammar for s in states], logits)
    limit = min((s.vocab_size for s in states if s.vocab_size), default=None)
    if limit is not None and logits.shape[-1] > limit:
        logits = logits.clone()
        logits[:, limit:] = float("-inf")
    counts, context = penalty_tensors(states, logits.shape[-1], logits.device)
    tokens, logprobs = sample_next(logits, [s.params for s in states], [s.generator for s in states],
                                   counts, context)
    token_list = tokens.tolist()
    logprob_list = logprobs.tolist() if logprobs is not None else [None] * len(token_list)
    return token_list, logprob_list


def paged_forward(model: torch.nn.Module, cache, tables: Sequence[Sequence[int]], feeds: Sequence[Sequence[int]],
                  starts: Sequence[int], max_len: int, device: torch.device) -> torch.Tensor:
    """Feed ``feeds[i]`` (token ids) of each row at position ``starts[i]`` over the paged ``cache`` whose
    block tables are ``tables``; fp32 logits (B, V) at each row's last fed token.

    Rows are right-padded to the longest feed; pad positions continue the row's own (clamped below
    ``max_len``: any valid position works, their outputs are unused). Shared by the engine's model
    runner and the speculative draft's paged cache."""
    T = max(len(feed) for feed in feeds)
    limit = max_len - 1
    ids = [list(feed) + [0] * (T - len(feed)) for feed in feeds]
    positions = [[min(p, limit) for p in range(start, start + T)] for start in starts]
    cache.prepare(tables, list(starts), T)
    last_index = None if T == 1 else torch.tensor([len(feed) - 1 for feed in feeds], dtype=torch.long).to(device)
    return last_token_logits(model, torch.tensor(ids, dtype=torch.long).to(device),
                             torch.tensor(positions, dtype=torch.long).to(device), cache, last_index=last_index)


def last_token_logits(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, kv_cache,
                      last_index: torch.Tensor | None = None) -> torch.Tensor:
    """Forward through ``kv_cache`` and return fp32 logits (B, V) at ``last_index`` (B,) (default: the last
    position), computing the head only there (a long prefill never builds (B, T, V) logits)."""
    B, T = input_ids.shape

    def pick(t: torch.Tensor) -> torch.Tensor:  # (B, T, ...) -> (B, ...) at last_index
        if last_index is None:  # a decode step (T == 1) takes the view: no index tensors, no gather
            return t[:, -1]
        return t[torch.arange(B, device=t.device), last_index]

    if hasattr(model, "forward_hidden") and hasattr(model, "lm_head_weight"):
        hidden = model.forward_hidden(input_ids, position_ids=position_ids, kv_cache=kv_cache)  # (B, T, H)
        return (pick(hidden) @ model.lm_head_weight.t()).float()
    return pick(model(input_ids, position_ids=position_ids, kv_cache=kv_cache)).float()
