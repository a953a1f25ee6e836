"""Prefill, then decode one token at a time through a preallocated KV cache.

``Generator`` is the simple path (no scheduler): a fixed batch of prompts of
different lengths, right-padded into one prefill, then one decode step per
token for the whole batch until every row has finished.  Rows that finish
early stop advancing their cache length and are fed a dummy token (their
output is no longer read), which keeps the batch shape -- and so a captured
CUDA graph -- fixed.

On CUDA the decode step (model forward at T=1 + head) is captured once per
(batch, cache length) as a CUDA graph and replayed, so batch-1 decode is bound
by memory bandwidth instead of kernel-launch overhead (gpt-fast's recipe, with
graphs instead of torch.compile so the Triton decode kernel is replayed as is).
Capture is best effort: any failure falls back to eager decoding.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from tritium.serve.kv_cache import ContiguousKVCache
from tritium.serve.sampling import SamplingParams
from tritium.serve.sequence import SequenceState, check_prompt, encode_prompt, last_token_logits, sample_for
from tritium.serve.speculative import SpeculativeDecoder


@dataclass
class Completion:
    prompt_ids: list[int]  # the prompt as fed to the model
    token_ids: list[int]  # generated ids (a final stop token included)
    text: str  # generated text, cut before any stop string, without the stop token's text
    finish_reason: str  # "stop" | "length"
    logprobs: list[float] | None  # log-prob of each token_ids entry when params.logprobs
    prompt_tokens: int
    completion_tokens: int


def _completion(state: SequenceState) -> Completion:
    return Completion(prompt_ids=state.prompt_ids, token_ids=list(state.output_ids), text=state.text,
                      finish_reason=state.finish_reason, logprobs=state.logprobs,
                      prompt_tokens=len(state.prompt_ids), completion_tokens=len(state.output_ids))


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


class DecodeGraph:
    """A CUDA graph of one decode step for a fixed batch and cache: static ids/positions in, logits out."""

    def __init__(self, model: torch.nn.Module, cache: ContiguousKVCache) -> None:
        B = cache.batch_size
        device = cache.device
        self.cache = cache
        self.input_ids = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(B, 1, dtype=torch.long, device=device)
        saved = cache.seqlens.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up runs (autotuning, lazy init) outside the capture
            for _ in range(2):
                last_token_logits(model, self.input_ids, self.position_ids, cache)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = last_token_logits(model, self.input_ids, self.position_ids, cache)
        cache.seqlens.copy_(saved)  # warm-up and capture wrote into the cache at the current lengths only

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        self.input_ids.copy_(input_ids)
        self.position_ids.copy_(position_ids)
        self.graph.replay()
        return self.logits


class Generator:
    """Batched prefill + decode with a contiguous KV cache."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, compile: bool | None = None,
                 speculative: SpeculativeDecoder | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.device, self.dtype = _model_device_dtype(model)
        if compile is None:
            compile = self.device.type == "cuda" and os.environ.get("TRITIUM_NO_CUDA_GRAPH", "0") != "1"
        # CUDA graphs only exist on CUDA: the fast path is guarded to it whatever was asked.
        self.use_cuda_graph = bool(compile) and self.device.type == "cuda"
        self._cache: ContiguousKVCache | None = None
        self._graphs: dict[tuple[int, int], DecodeGraph] = {}
        self.graph_failures = 0
        self.last_completion: Completion | None = None  # set when a stream() finishes
        # Speculative decoding (serve/speculative.py): proposals verified K at a time; None = one token a step.
        self.speculative = speculative
        if speculative is not None:
            speculative.check_target(model)

    # ------------------------------------------------------------------ cache reuse
    def _cache_for(self, batch_size: int, needed_len: int) -> ContiguousKVCache:
        if self.speculative is not None:  # a verify pass writes K positions past a finished row's length
            needed_len += self.speculative.num_speculative_tokens
        cache = self._cache
        if cache is None or cache.batch_size != batch_size or cache.max_seq_len < needed_len:
            # Round up so nearby lengths reuse the same buffers (and the same captured graph).
            length = max(needed_len, min(self.config.max_seq_len, -(-needed_len // 256) * 256))
            self._cache = cache = ContiguousKVCache.for_model(self.model, batch_size, length)
            self._graphs.clear()
        cache.reset()
        return cache

    def _decode_logits(self, cache: ContiguousKVCache, input_ids: torch.Tensor,
                       position_ids: torch.Tensor) -> torch.Tensor:
        if self.use_cuda_graph:
            key = (cache.batch_size, cache.max_seq_len)
            graph = self._graphs.get(key)
            if graph is None:
                try:
                    graph = self._graphs[key] = DecodeGraph(self.model, cache)
                except Exception:  # noqa: BLE001 - capture is an optimisation; eager is always correct
                    self.graph_failures += 1
                    self.use_cuda_graph = False
            if graph is not None:
                return graph(input_ids, position_ids)
        return last_token_logits(self.model, input_ids, position_ids, cache)

    # ------------------------------------------------------------------ generation
    def _states(self, prompts, params) -> list[SequenceState]:
        if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], int)):
            raise TypeError("prompts must be a list of prompts (str or list of ids); wrap a single prompt in a list")
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        states = []
        for prompt, p in zip(prompts, params):
            ids = encode_prompt(self.tokenizer, prompt)
            check_prompt(ids, p, self.config.max_seq_len, self.config.vocab_size)
            states.append(SequenceState(ids, p, self.tokenizer, self.device))
        return states

    @torch.inference_mode()
    def _run(self, states: list[SequenceState]) -> Iterator[list[str]]:
        """Yields, after prefill and after each decode step, the text delta of every row."""
        B = len(states)
        lengths = [len(s.prompt_ids) for s in states]
        T = max(lengths)
        cache = self._cache_for(B, max(n + s.params.max_tokens for n, s in zip(lengths, states)))
        pad_id = 0
        input_ids = torch.full((B, T), pad_id, dtype=torch.long)
        for row, state in enumerate(states):
            input_ids[row, :lengths[row]] = torch.tensor(state.prompt_ids)
        input_ids = input_ids.to(self.device)
        position_ids = torch.arange(T, device=self.device).expand(B, T)
        last = torch.tensor(lengths, device=self.device) - 1
        logits = last_token_logits(self.model, input_ids, position_ids, cache, last_index=last)
        cache.seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        if self.speculative is not None:
            yield from self.speculative.decode(self.model, cache, states, logits,
                                               lambda feed, positions: self._decode_logits(cache, feed, positions))
            return
        while True:
            active = [not s.finished for s in states]
            tokens, logprobs = sample_for(states, logits)
            deltas = []
            for state, token, logprob, was_active in zip(states, tokens, logprobs, active):
                deltas.append(state.append(token, logprob) if was_active else "")
            yield deltas
            still = [not s.finished for s in states]
            if not any(still):
                return
            # Finished rows re-feed a token at their current length and do not advance.
            feed = torch.tensor([s.output_ids[-1] for s in states], device=self.device).view(B, 1)
            positions = cache.seqlens.long().view(B, 1)
            logits = self._decode_logits(cache, feed, positions)
            cache.advance(torch.tensor(still, dtype=torch.int32))

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Complete every prompt (a batch of different lengths); one ``Completion`` per prompt."""
        states = self._states(list(prompts), params)
        if not states:
            return []
        for _ in self._run(states):
            pass
        return [_completion(s) for s in states]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one completion as they are generated; their concatenation is the final text."""
        states = self._states([prompt], params)
        self.last_completion = None
        for deltas in self._run(states):
            if deltas[0]:
                yield deltas[0]
        self.last_completion = _completion(states[0])  # token ids, finish reason, logprobs of that stream
