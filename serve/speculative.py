"""Speculative decoding: propose K tokens cheaply, verify them in one forward pass of the target.

Batch-1 decode reads every weight once per token; verifying K proposed tokens reads them once for
up to K + 1 tokens (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023).  Two proposers:

* ``NgramProposer`` -- prompt lookup (Saxena 2023, vLLM's ``ngram``): the continuation of the
  latest earlier occurrence of the sequence's last n tokens in prompt + output.  No extra model;
  strong where output copies input (RAG, code edits, "repeat: ...").
* ``DraftModelProposer`` -- a smaller checkpoint sharing the tokenizer, with its own KV cache that
  is rolled back to the accepted prefix after each verification: a contiguous one in ``Generator``,
  a paged one with its own block pool inside ``LLMEngine`` (``PagedDraft``).

Acceptance (``verify_row``): greedy rows accept the longest prefix of the proposal that matches
the target's argmax and then take the target's own token (so the output is token for token the
non-speculative greedy output); sampled rows accept a proposed token x with probability
min(1, p(x) / q(x)) and on rejection draw from the normalised residual max(0, p - q), which makes
every emitted token an exact draw from p.  For the n-gram proposer q is a point mass, so the rule
reduces to "accept with probability p(x)" and the residual is p with x removed.  p is the target's
*processed* distribution (penalties -> temperature -> top-k -> top-p -> min-p, ``serve/sampling``),
computed at each proposed position with the penalty counts that position would see; the draft
model's q is processed with the same settings.

Inside ``LLMEngine`` (``SpeculativeDecoder.engine_split``/``engine_step``) each decode with a proposal
reserves target blocks for it, is verified in one pass over the paged cache, and gives the blocks of
rejected tokens back (``BlockManager.shrink``); a draft model keeps its own paged cache and block pool
(``PagedDraft``), released together with the target's blocks.

The contiguous cache takes the verified tokens like a chunked prefill (``attend`` writes T new
keys at each row's length); rolling back rejected tokens is advancing the length by the accepted
count only.  Entries past a row's length are never read: attention reads keys below
``seqlens + T`` causally, and the next forward overwrites from ``seqlens`` on before reading.

``Backoff`` keeps a proposer that keeps missing from slowing decoding down: after a step where
nothing was accepted the row's budget halves, and at zero the row decodes plainly for a growing
number of steps before trying one token again.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from tritium.serve.sampling import SamplingParams, process_logits
from tritium.serve.sequence import SequenceState, sample_for

# --------------------------------------------------------------------------- metrics


@dataclass
class SpeculativeStats:
    """Counters over a generator's lifetime: ``proposed`` and ``accepted`` proposal tokens, ``steps``
    verification passes (each emits accepted + 1 tokens)."""

    proposed: int = 0
    accepted: int = 0
    steps: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification pass (accepted proposals + the target's own token)."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"proposed": self.proposed, "accepted": self.accepted, "acceptance_rate": self.acceptance_rate,
                "mean_accepted_length": self.mean_accepted_length, "verify_steps": self.steps}

    def summary(self) -> str:
        return (f"speculative: proposed {self.proposed}, accepted {self.accepted} "
                f"(acceptance rate {self.acceptance_rate:.1%}), mean accepted length "
                f"{self.mean_accepted_length:.2f} tokens/verify over {self.steps} verify steps")


# --------------------------------------------------------------------------- back-off


@dataclass
class Backoff:
    """Per-row speculation budget: halves after a step with nothing accepted; at zero the row skips
    speculation for 1, 2, 4, ... (at most ``max_skip``) steps, then tries one token again."""

    max_k: int
    max_skip: int = 32
    k: int = 0
    _skip: int = 0
    _wait: int = 0

    def __post_init__(self) -> None:
        self.k = self.max_k

    def budget(self) -> int:
        if self._wait > 0:
            self._wait -= 1
            return 0
        return self.k

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        if accepted == 0:
            self.k //= 2
            if self.k == 0:
                self._skip = min(2 * self._skip or 1, self.max_skip)
                self._wait, self.k = self._skip, 1
        else:
            self._skip = 0
            self.k = min(self.max_k, 2 * self.k if accepted == proposed else max(self.k, accepted + 1))


# --------------------------------------------------------------------------- proposers


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the last n tokens (n from ``max_ngram``
    down to ``min_ngram``) in prompt + output and propose the up-to-k tokens that followed it."""

    def __init__(self, min_ngram: int = 1, max_ngram: int = 3) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"NgramProposer: need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.min_ngram, self.max_ngram = min_ngram, max_ngram

    def propose_ids(self, ids: Sequence[int], k: int) -> list[int]:
        n_ids = len(ids)
        if k <= 0:
            return []
        for n in range(min(self.max_ngram, n_ids - 1), self.min_ngram - 1, -1):
            tail = list(ids[n_ids - n:])
            # Latest match first: recent text is the likeliest to be copied next.
            for start in range(n_ids - n - 1, -1, -1):
                if ids[start] == tail[0] and list(ids[start:start + n]) == tail:
                    # Copy forward LZ77-style: a match close to the end continues into the proposal
                    # itself, so a repeating pattern gets k tokens, not just its period.
                    source = list(ids[start + n:])
                    gap = len(source)
                    for i in range(gap, k):
                        source.append(source[i - gap])
                    return source[:k]
        return []

    def propose(self, states: Sequence[SequenceState], budgets: Sequence[int]
                ) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """Per row: proposed ids (at most its budget) and q (None: a point mass on each proposal)."""
        return [self.propose_ids(s.all_ids, k) for s, k in zip(states, budgets)], [None] * len(states)


class DraftModelProposer:
    """A smaller model sharing the tokenizer proposes k tokens autoregressively from its own cache.

    Per row the proposer remembers which tokens its cache holds; before proposing it keeps the
    longest prefix still in the sequence (rolling back what the target rejected) and feeds the rest.
    Greedy rows get the draft's argmax; sampled rows a draw from the draft's processed distribution
    q, returned so the verifier can apply min(1, p/q).
    """

    def __init__(self, model: torch.nn.Module, num_speculative_tokens: int) -> None:
        from tritium.serve.kv_cache import ContiguousKVCache

        self.model = model.eval()
        self.k = num_speculative_tokens
        self.vocab_size = model.config.vocab_size
        self._cache_cls = ContiguousKVCache
        self._cache = None
        self._held: list[list[int]] = []

    def attach_engine(self, engine) -> PagedDraft:
        """Give ``engine`` (an ``LLMEngine``) a paged draft cache shaped like its own; released with its blocks."""
        paged = PagedDraft(self.model, engine.blocks.num_blocks, engine.blocks.block_size, engine.max_prefill_tokens)
        engine.blocks.free_listeners.append(paged.release)
        self.paged = paged
        return paged

    def reset(self, batch_size: int, max_len: int) -> None:
        cfg = self.model.config
        # A row that skipped proposing (back-off) catches up in one pass of up to max_len tokens while
        # the batch's other rows write as many (pad) positions past their own lengths.
        length = 2 * min(cfg.max_seq_len, max_len) + self.k + 1
        cache = self._cache
        if cache is None or cache.batch_size != batch_size or cache.max_seq_len < length:
            self._cache = self._cache_cls.for_model(self.model, batch_size, length)
        self._cache.reset()
        self._held = [[] for _ in range(batch_size)]

    def _forward(self, feeds: list[list[int]]) -> torch.Tensor:
        """Feed each row's tokens at its cache length; logits (B, V) at each row's last fed token."""
        cache, device = self._cache, self._cache.device
        B, T = len(feeds), max(1, max(len(f) for f in feeds))
        ids = torch.zeros(B, T, dtype=torch.long)
        for row, feed in enumerate(feeds):
            ids[row, :len(feed)] = torch.tensor(feed, dtype=torch.long) if feed else 0
        positions = (cache.seqlens.long().view(B, 1) + torch.arange(T, device=device)).clamp(
            max=self.model.config.max_seq_len - 1)
        hidden = self.model.forward_hidden(ids.to(device), position_ids=positions, kv_cache=cache)
        last = torch.tensor([max(len(f), 1) - 1 for f in feeds], device=device)
        logits = (hidden[torch.arange(B, device=device), last] @ self.model.lm_head_weight.t()).float()
        cache.advance(torch.tensor([len(f) for f in feeds], dtype=torch.int32))
        return logits

    @torch.inference_mode()
    def propose(self, states: Sequence[SequenceState], budgets: Sequence[int]
                ) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        cache = self._cache
        B = len(states)
        feeds = []
        for row, state in enumerate(states):
            ids, held = state.all_ids, self._held[row]
            keep = 0
            limit = min(len(held), len(ids) - 1)  # always feed at least the last token
            while keep < limit and held[keep] == ids[keep]:
                keep += 1
            cache.seqlens[row] = keep  # roll back to the prefix the sequence still shares
            feeds.append(ids[keep:] if budgets[row] > 0 else [])
            self._held[row] = list(ids[:keep]) + feeds[-1]
        k = max(budgets)
        proposals: list[list[int]] = [[] for _ in range(B)]
        qs: list[list[torch.Tensor]] = [[] for _ in range(B)]
        if k <= 0:
            return proposals, [None] * B
        logits = self._forward(feeds)
        for step in range(k):
            active = [budgets[row] > step for row in range(B)]
            for row in range(B):
                if not active[row]:
                    continue
                state = states[row]
                context = state.output_ids + proposals[row]
                probs = _processed_probs(logits[row:row + 1], state.params, [context], state.all_ids,
                                         state.vocab_size)[0]
                if state.params.greedy:
                    token = int(probs.argmax())
                else:
                    token = int(_draw(probs, state.generator))
                proposals[row].append(token)
                qs[row].append(probs)
            if step == k - 1:
                break
            feeds = [[proposals[row][-1]] if active[row] and budgets[row] > step + 1 else [] for row in range(B)]
            if not any(feeds):
                break
            for row, feed in enumerate(feeds):
                self._held[row] += feed
            logits = self._forward(feeds)
        return proposals, [torch.stack(q) if q else None for q in qs]


class PagedDraft:
    """The draft model's side of speculative decoding inside ``LLMEngine``: its own ``PagedKVCache`` and
    ``BlockManager`` (as many blocks of the same size as the target's, no prefix caching) and, per
    request, the tokens whose draft keys/values are cached (``held``).

    Kept in sync lazily, at proposal time: the draft keeps the longest prefix of ``held`` that the
    sequence still has (what the target rejected is rolled back, its blocks shrunk) and feeds the
    rest -- the prompt on a request's first proposal, in chunks that share ``max_prefill_tokens`` per
    step like the target's chunked prefill (a row still catching up decodes plainly), then one or two
    tokens per step. A request's draft blocks go whenever the target's do (finish, abort, failure,
    preemption: ``BlockManager.free_listeners``), so a preempted request re-feeds its draft when it
    is recomputed. A row whose draft blocks do not fit simply decodes plainly.
    """

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, max_prefill_tokens: int) -> None:
        from tritium.serve.block_pool import BlockManager
        from tritium.serve.kv_cache import PagedKVCache

        self.model = model
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.cache = PagedKVCache.for_model(model, num_blocks, block_size)
        self.device = self.cache.device
        self.max_prefill_tokens = max_prefill_tokens
        self.max_len = model.config.max_seq_len
        self.held: dict[object, list[int]] = {}

    def release(self, seq_id) -> None:
        """Forget ``seq_id``'s draft cache (listener of the target's ``BlockManager.free``)."""
        self.held.pop(seq_id, None)
        self.blocks.free(seq_id)

    def _forward(self, rows: list[tuple[object, list[int], int]]) -> torch.Tensor:
        """Feed each (seq_id, tokens, start) row at its start position; fp32 logits (B, V) at its last token."""
        from tritium.serve.sequence import paged_forward

        return paged_forward(self.model, self.cache, [self.blocks.table(seq_id) for seq_id, _, _ in rows],
                             [feed for _, feed, _ in rows], [start for _, _, start in rows], self.max_len, self.device)

    @torch.inference_mode()
    def propose(self, requests: Sequence, budgets: Sequence[int]
                ) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """Per engine request (``request_id``, ``state``): up to its budget of draft tokens (none while
        its draft is still catching up or out of blocks) and q (k, V) for sampled rows (None: greedy)."""
        B = len(requests)
        proposals: list[list[int]] = [[] for _ in range(B)]
        qs: list[list[torch.Tensor]] = [[] for _ in range(B)]
        catch_up = self.max_prefill_tokens
        feeds: list[tuple[int, list[int], int]] = []  # (row, tokens, start)
        full: list[int] = []  # rows that propose this step
        for row, (request, k) in enumerate(zip(requests, budgets)):
            ids = request.state.all_ids
            if k <= 0 or len(ids) + k > self.max_len:
                continue
            seq_id = request.request_id
            held = self.held.setdefault(seq_id, [])
            keep = min(len(held), len(ids) - 1)  # at least the last token is fed: its logits are needed
            if held[:keep] != ids[:keep]:
                keep = next(i for i, (a, b) in enumerate(zip(held, ids)) if a != b)
            feed = ids[keep:]
            if len(feed) > k + 1:  # catching up (first proposal, after back-off): a prefill chunk
                if catch_up <= 0:
                    continue
                feed = feed[:catch_up]
                catch_up -= len(feed)
            proposing = keep + len(feed) == len(ids)
            needed = keep + len(feed) + (k - 1 if proposing else 0)
            self.blocks.shrink(seq_id, needed)
            del held[keep:]  # rolled back: entries past it are stale and overwritten before being read
            if not self.blocks.allocate(seq_id, needed):
                self.blocks.shrink(seq_id, keep)
                continue
            feeds.append((row, feed, keep))
            if proposing:
                full.append(row)
        if not feeds:
            return proposals, [None] * B
        logits = self._forward([(requests[row].request_id, feed, start) for row, feed, start in feeds])
        for (row, feed, _), row_logits in zip(feeds, logits):
            self.held[requests[row].request_id] += feed
        step_rows = {row: row_logits for (row, _, _), row_logits in zip(feeds, logits) if row in full}
        for step in range(max((budgets[row] for row in full), default=0)):
            for row, row_logits in step_rows.items():
                state = requests[row].state
                if state.params.greedy and not state.params.needs_penalties:
                    # Temperature, top-k/p and min-p never move the argmax: skip the processing.
                    proposals[row].append(int(row_logits[:state.vocab_size or None].argmax()))
                    continue
                context = state.output_ids + proposals[row]
                probs = _processed_probs(row_logits[None], state.params, [context], state.all_ids,
                                         state.vocab_size)[0]
                proposals[row].append(int(probs.argmax()) if state.params.greedy
                                      else int(_draw(probs, state.generator)))
                if not state.params.greedy:
                    qs[row].append(probs)
            rows = [row for row in step_rows if budgets[row] > step + 1]
            if not rows:
                break
            batch = []
            for row in rows:
                seq_id = requests[row].request_id
                batch.append((seq_id, [proposals[row][-1]], len(self.held[seq_id])))
                self.held[seq_id].append(proposals[row][-1])
            step_rows = dict(zip(rows, self._forward(batch)))
        return proposals, [torch.stack(q) if q else None for q in qs]


# --------------------------------------------------------------------------- acceptance


def _processed_probs(logits: torch.Tensor, params: SamplingParams, outputs: Sequence[Sequence[int]],
                     base_context: Sequence[int], vocab_limit: int | None = None) -> torch.Tensor:
    """Rows of ``logits`` (N, V) -> the processed distribution (N, V) fp32; row i's penalties count the
    output ``outputs[i]`` and the context ``base_context`` + ``outputs[i]``. Columns at or past
    ``vocab_limit`` (a head padded beyond the tokenizer) get no mass, as in ``sample_for``."""
    N, V = logits.shape
    if vocab_limit and V > vocab_limit:
        logits = logits.clone()
        logits[:, vocab_limit:] = float("-inf")
    counts = context = None
    if params.needs_penalties:
        counts = torch.zeros(N, V, device=logits.device)
        context = torch.zeros(N, V, dtype=torch.bool, device=logits.device)
        base = torch.tensor(list(base_context), dtype=torch.long, device=logits.device)
        for i, out in enumerate(outputs):
            if out:
                idx = torch.tensor(list(out), dtype=torch.long, device=logits.device)
                counts[i].index_add_(0, idx, torch.ones(len(idx), device=logits.device))
                context[i, idx] = True
            context[i, base] = True
    processed = process_logits(logits, [params] * N, counts, context)
    if params.greedy:
        return processed  # only argmax is used
    return processed.softmax(dim=-1)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw from ``probs`` (V,) (unnormalised is fine) by the exponential race sample_next uses."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise.clamp_min(1e-20)).argmax()


def _uniform(generator: torch.Generator | None, device: torch.device) -> float:
    return float(torch.rand((), generator=generator, device=generator.device if generator is not None else device))


def verify_row(logits: torch.Tensor, proposal: Sequence[int], state: SequenceState,
               draft_probs: torch.Tensor | None = None) -> tuple[list[int], int]:
    """Accept a prefix of ``proposal`` against the target's ``logits`` (k + 1, V) raw fp32 (row j is the
    prediction after the sequence + proposal[:j]). Returns (emitted tokens: accepted + one from the
    target, number accepted). ``draft_probs`` (k, V): the proposer's processed q, None for a point mass.
    """
    params = state.params
    k = len(proposal)
    outputs = [state.output_ids + list(proposal[:j]) for j in range(k + 1)]
    dist = _processed_probs(logits[:k + 1], params, outputs, state.prompt_ids, state.vocab_size)
    emitted: list[int] = []
    for j, token in enumerate(proposal):
        if params.greedy:
            target = int(dist[j].argmax())
            if target != token:
                return emitted + [target], j
        else:
            p = dist[j]
            q = draft_probs[j] if draft_probs is not None else None
            ratio = float(p[token]) / float(q[token]) if q is not None else float(p[token])
            if _uniform(state.generator, logits.device) >= ratio:
                if q is None:
                    residual = p.clone()
                    residual[token] = 0.0
                else:
                    residual = (p - q).clamp_min(0.0)
                if float(residual.sum()) <= 0.0:  # p == q up to rounding: any draw from p is exact
                    residual = p
                return emitted + [int(_draw(residual, state.generator))], j
        emitted.append(int(token))
    last = dist[k]
    bonus = int(last.argmax()) if params.greedy else int(_draw(last, state.generator))
    return emitted + [bonus], k


# --------------------------------------------------------------------------- the decode loop


@dataclass
class SpeculativeDecoder:
    """What ``Generator(speculative=...)`` and ``LLMEngine(speculative=...)`` take: a proposer
    (``NgramProposer`` or ``DraftModelProposer``) and the most tokens proposed per step
    ``num_speculative_tokens``. One decoder per generator or engine (it holds the counters and, in an
    engine, the draft's paged cache)."""

    proposer: object
    num_speculative_tokens: int = 4
    backoff: bool = True
    stats: SpeculativeStats = field(default_factory=SpeculativeStats)

    def __post_init__(self) -> None:
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"num_speculative_tokens must be an integer >= 1, got {k!r}")

    @classmethod
    def ngram(cls, num_speculative_tokens: int = 4, **kwargs) -> SpeculativeDecoder:
        return cls(NgramProposer(**kwargs), num_speculative_tokens)

    @classmethod
    def draft(cls, draft_model: torch.nn.Module, num_speculative_tokens: int = 4) -> SpeculativeDecoder:
        return cls(DraftModelProposer(draft_model, num_speculative_tokens), num_speculative_tokens)

    def check_target(self, model: torch.nn.Module) -> None:
        if isinstance(self.proposer, DraftModelProposer):
            mine, theirs = model.config.vocab_size, self.proposer.vocab_size
            if mine != theirs:
                raise ValueError(f"draft model vocab_size ({theirs}) differs from the target's ({mine}): "
                                 "the draft must share the target's tokenizer and vocabulary")

    def decode(self, model: torch.nn.Module, cache, states: list[SequenceState], logits: torch.Tensor,
               plain_step) -> Iterator[list[str]]:
        """The generator's decode loop after prefill (``logits`` (B, V) at each prompt's last token).

        ``cache`` is a ``ContiguousKVCache`` holding each row's prompt, with room for
        ``num_speculative_tokens`` extra positions; ``plain_step(feed, positions)`` is the generator's
        one-token decode (CUDA graph when captured), used when no row has a proposal.
        """
        B, device = len(states), cache.device
        backoffs = [Backoff(self.num_speculative_tokens) if self.backoff else None for _ in states]
        if isinstance(self.proposer, DraftModelProposer):
            self.proposer.reset(B, max(len(s.prompt_ids) + s.params.max_tokens for s in states))
        tokens, logprobs = sample_for(states, logits)
        yield [s.append(t, lp) for s, t, lp in zip(states, tokens, logprobs)]
        max_pos = model.config.max_seq_len - 1
        while True:
            active = [not s.finished for s in states]
            if not any(active):
                return
            budgets = []
            for state, backoff, on in zip(states, backoffs, active):
                # Room: every emitted token must fit max_tokens, and one is always the target's own.
                room = state.params.max_tokens - len(state.output_ids) - 1
                k = backoff.budget() if backoff is not None else self.num_speculative_tokens
                # A structured-output row samples under its grammar's mask, which verification does not apply.
                budgets.append(max(0, min(k, room)) if on and state.grammar is None else 0)
            proposals, qs = self.proposer.propose(states, budgets) if any(budgets) else ([[]] * B, [None] * B)
            proposals = [p[:b] for p, b in zip(proposals, budgets)]
            L = max(len(p) for p in proposals)
            feed = torch.zeros(B, 1 + L, dtype=torch.long)
            for row, (state, proposal) in enumerate(zip(states, proposals)):
                feed[row, 0] = state.output_ids[-1]
                feed[row, 1:1 + len(proposal)] = torch.tensor(proposal, dtype=torch.long)
            feed = feed.to(device)
            # Pad and finished rows' positions are clamped to the RoPE table; their outputs are never read.
            positions = (cache.seqlens.long().view(B, 1) + torch.arange(1 + L, device=device)).clamp(max=max_pos)
            if L == 0:
                step_logits = plain_step(feed, positions)
                cache.advance(torch.tensor(active, dtype=torch.int32))
                tokens, logprobs = sample_for(states, step_logits)
                yield [s.append(t, lp) if on else "" for s, t, lp, on in zip(states, tokens, logprobs, active)]
                continue
            hidden = model.forward_hidden(feed, position_ids=positions, kv_cache=cache)  # (B, 1+L, H)
            all_logits = (hidden @ model.lm_head_weight.t()).float()  # (B, 1+L, V)
            deltas, advance = [], []
            for row, (state, proposal, q) in enumerate(zip(states, proposals, qs)):
                if not active[row]:
                    deltas.append("")
                    advance.append(0)
                    continue
                emitted, accepted = verify_row(all_logits[row], proposal, state, q)
                if proposal:
                    self.stats.proposed += len(proposal)
                    self.stats.accepted += accepted
                    self.stats.steps += 1
                    if backoffs[row] is not None:
                        backoffs[row].update(len(proposal), accepted)
                raw = all_logits[row].log_softmax(dim=-1) if state.params.logprobs else None
                delta = ""
                for j, token in enumerate(emitted):
                    delta += state.append(token, float(raw[j, token]) if raw is not None else None)
                    if state.finished:
                        break
                deltas.append(delta)
                # The fed token and the accepted proposals are now cached; the target's own token is fed next.
                advance.append(1 + accepted)
            cache.advance(torch.tensor(advance, dtype=torch.int32))
            yield deltas

    # ------------------------------------------------------------------ inside LLMEngine (paged cache)
    def attach_engine(self, engine) -> None:
        """Check the proposer fits ``engine`` (an ``LLMEngine``) and give a draft model its paged cache."""
        self.check_target(engine.model)
        if isinstance(self.proposer, DraftModelProposer):
            self.proposer.attach_engine(engine)
        elif not isinstance(self.proposer, NgramProposer):
            raise ValueError("LLMEngine takes the n-gram or the draft-model proposer, got "
                             f"{type(self.proposer).__name__}")

    def engine_stats(self) -> dict[str, float]:
        """The counters plus, with a draft model, its block pool's use (0 when idle)."""
        stats = self.stats.as_dict()
        paged = getattr(self.proposer, "paged", None)
        if paged is not None:
            stats.update(draft_kv_blocks_used=paged.blocks.num_used_blocks,
                         draft_kv_blocks_total=paged.blocks.num_blocks)
        return stats

    def engine_split(self, engine, decodes: list) -> tuple[list, list[tuple[object, list[int], object]]]:
        """Split the scheduler's decodes into plain ones and (request, proposal, q) rows whose extra
        blocks could be reserved (no request is preempted to make room for a guess)."""
        limit = engine.max_model_len
        candidates = []
        for request in decodes:
            state = request.state
            backoff = getattr(request, "spec_backoff", None)
            if backoff is None and self.backoff:
                backoff = request.spec_backoff = Backoff(self.num_speculative_tokens)
            k = backoff.budget() if backoff is not None else self.num_speculative_tokens
            k = min(k, state.params.max_tokens - len(state.output_ids) - 1, limit - request.num_tokens)
            # A structured-output row samples under its grammar's mask, which verification does not apply.
            if k > 0 and state.grammar is None:
                candidates.append((request, k))
        spec = []
        if isinstance(self.proposer, DraftModelProposer):
            # Target blocks first, so the draft only works for rows that can be verified.
            rows = [(r, k) for r, k in candidates
                    if engine.blocks.allocate(r.request_id, r.num_computed + 1 + k)]
            if rows:
                proposals, qs = self.proposer.paged.propose([r for r, _ in rows], [k for _, k in rows])
                for (request, _), proposal, q in zip(rows, proposals, qs):
                    if proposal:
                        spec.append((request, proposal, q))
                    else:  # catching up or out of draft blocks: give back the reserved target blocks
                        engine.blocks.shrink(request.request_id, request.num_computed + 1)
        else:
            for request, k in candidates:
                proposal = self.proposer.propose_ids(request.state.all_ids, k)
                if proposal and engine.blocks.allocate(request.request_id, request.num_computed + 1 + len(proposal)):
                    spec.append((request, proposal, None))
        verified = {id(r) for r, _, _ in spec}
        return [r for r in decodes if id(r) not in verified], spec

    def engine_step(self, engine, rows: list[tuple[object, list[int], object]]) -> list:
        """One verify pass over the paged cache for ``rows``; emits tokens, rolls back rejected ones
        (their blocks go back to the pool) and returns the requests' outputs."""
        model, cache, device = engine.model, engine.cache, engine.device
        T = 1 + max(len(p) for _, p, _ in rows)
        limit = engine.max_model_len - 1
        ids, positions, seqlens = [], [], []
        for request, proposal, _ in rows:
            start = request.num_computed
            ids.append([request.state.output_ids[-1]] + proposal + [0] * (T - 1 - len(proposal)))
            positions.append([min(p, limit) for p in range(start, start + T)])
            seqlens.append(start)
        cache.prepare([engine.blocks.table(r.request_id) for r, _, _ in rows], seqlens, T)
        hidden = model.forward_hidden(torch.tensor(ids, dtype=torch.long).to(device),
                                      position_ids=torch.tensor(positions, dtype=torch.long).to(device),
                                      kv_cache=cache)
        all_logits = (hidden @ model.lm_head_weight.t()).float()  # (B, T, V)
        outputs = []
        for (request, proposal, q), logits in zip(rows, all_logits):
            state = request.state
            emitted, accepted = verify_row(logits, proposal, state, q)
            self.stats.proposed += len(proposal)
            self.stats.accepted += accepted
            self.stats.steps += 1
            backoff = getattr(request, "spec_backoff", None)
            if backoff is not None:
                backoff.update(len(proposal), accepted)
            raw = logits.log_softmax(dim=-1) if state.params.logprobs else None
            request.num_computed += 1 + accepted  # the fed token and the accepted proposals
            try:  # detokenizing and stop checks of this request alone, as in the plain path
                for j, token in enumerate(emitted):
                    engine._emit(request, token, float(raw[j, token]) if raw is not None else None)
                    if state.finished:  # _emit released all its blocks
                        break
            except Exception as exc:  # noqa: BLE001 - this request alone fails
                outputs.append(engine._fail(request, exc))
                continue
            if not state.finished:
                engine.blocks.shrink(request.request_id, request.num_computed)
            outputs.append(request.output())
        return outputs
