"""Generation workloads: the continuous-batching engine against Hugging Face ``generate``.

* ``synthetic_workload(...)``: seeded requests of mixed prompt/output lengths (token ids, exact lengths).
* ``engine_workload(engine, requests)``: continuous-batching throughput, time to first token and
  inter-token latency (p50/p99) through ``LLMEngine``.
* ``hf_model_from(model)`` + ``hf_generate_workload(hf_model, requests)``: the same requests through
  Hugging Face ``generate`` (one at a time, or in static padded batches), on the same weights.
* ``compare_engine_vs_hf(model, tokenizer, ...)``: both, and the output-token-rate ratios.

The ``engine_throughput`` bench case (``bench/cases_generation.py``) runs these; decode-step speed
against the bandwidth bound is the ``decode_step`` case.  Every function returns plain dicts (JSON-ready).
"""
from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tritium.bench.timing import percentile, synchronize
from tritium.serve.engine import LLMEngine
from tritium.serve.sampling import SamplingParams


@dataclass
class SyntheticRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int


def synthetic_workload(num_requests: int = 32, prompt_lens: tuple[int, int] = (16, 256),
                       output_lens: tuple[int, int] = (16, 128), vocab_size: int = 2048, seed: int = 0,
                       first_token: int = 4) -> list[SyntheticRequest]:
    """Random prompts with uniformly mixed prompt/output lengths (ids >= ``first_token`` skip control ids)."""
    rng = random.Random(seed)
    return [SyntheticRequest(f"req-{i}", [rng.randrange(first_token, vocab_size)
                                          for _ in range(rng.randint(*prompt_lens))], rng.randint(*output_lens))
            for i in range(num_requests)]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _summary(name: str, wall: float, output_tokens: int, prompt_tokens: int, ttfts: list[float],
             itls: list[float], extra: dict | None = None) -> dict:
    return dict(system=name, wall_s=wall, output_tokens=output_tokens, prompt_tokens=prompt_tokens,
                output_tokens_per_s=output_tokens / wall if wall > 0 else None,
                ttft_p50_ms=_ms(percentile(ttfts, 50)), ttft_p99_ms=_ms(percentile(ttfts, 99)),
                itl_p50_ms=_ms(percentile(itls, 50)), itl_p99_ms=_ms(percentile(itls, 99)),
                itl_mean_ms=None if not itls else statistics.fmean(itls) * 1e3, **(extra or {}))


def engine_workload(engine: LLMEngine, requests: Sequence[SyntheticRequest], concurrency: int | None = None,
                    temperature: float = 0.0) -> dict:
    """Run ``requests`` through ``engine``, at most ``concurrency`` in flight (all arrive at t=0, the next
    one enters as one finishes). Output lengths are exact (ignore_eos)."""
    concurrency = concurrency or len(requests)
    queue = list(requests)
    arrival, last_token_time = {}, {}
    ttfts, itls = [], []
    output_tokens = 0
    synchronize(engine.device)
    start = time.perf_counter()

    def admit():
        while queue and len(arrival) - len(done) < concurrency:
            request = queue.pop(0)
            engine.add_request(request.request_id, request.prompt_ids,
                               SamplingParams(max_tokens=request.max_tokens, temperature=temperature,
                                              ignore_eos=True, seed=0 if temperature else None))
            arrival[request.request_id] = time.perf_counter()

    done: set[str] = set()
    admit()
    while engine.has_unfinished() or queue:
        outputs = engine.step()
        now = time.perf_counter()  # outputs are host lists: the step has synchronised
        for out in outputs:
            n = len(out.new_token_ids)
            if n:
                previous = last_token_time.get(out.request_id)
                if previous is None:
                    ttfts.append(now - arrival[out.request_id])
                else:
                    itls.append(now - previous)
                last_token_time[out.request_id] = now
                output_tokens += n
            if out.finished:
                done.add(out.request_id)
        admit()
    wall = time.perf_counter() - start
    stats = engine.stats()
    return _summary("tritium-engine", wall, output_tokens, sum(len(r.prompt_ids) for r in requests), ttfts, itls,
                    {"concurrency": concurrency, "num_requests": len(requests), "num_preemptions": stats["num_preemptions"],
                         "max_num_seqs": engine.max_num_seqs, "kv_blocks_total": stats["kv_blocks_total"]})


def hf_model_from(model: torch.nn.Module):
    """A ``transformers.LlamaForCausalLM`` with ``model``'s weights (through our HF-layout checkpoint)."""
    from transformers import LlamaForCausalLM

    param = next(model.parameters())
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        hf = LlamaForCausalLM.from_pretrained(directory, dtype=param.dtype)
    return hf.to(param.device).eval()


@torch.inference_mode()
def hf_generate_workload(hf_model, requests: Sequence[SyntheticRequest], batch_size: int = 1,
                         pad_token_id: int = 0) -> dict:
    """The requests through HF ``generate`` (greedy), ``batch_size`` at a time with left padding.

    A static batch runs until its longest request is done; only each request's own ``max_tokens`` count as
    output (the rest is the waste continuous batching removes).  TTFT is the batch's prefill + first step.
    """
    device = next(hf_model.parameters()).device
    ttfts, itls = [], []
    output_tokens = 0
    synchronize(device)
    start = time.perf_counter()
    for first in range(0, len(requests), batch_size):
        batch = requests[first:first + batch_size]
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, request in enumerate(batch):
            ids[row, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
            mask[row, width - len(request.prompt_ids):] = 1
        new_tokens = max(r.max_tokens for r in batch)
        batch_start = time.perf_counter()
        hf_model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id)
        synchronize(device)
        batch_time = time.perf_counter() - batch_start
        per_step = batch_time / new_tokens
        for request in batch:
            ttfts.append(batch_start - start + per_step)  # everyone arrived at t=0
            itls.extend([per_step] * (request.max_tokens - 1))
            output_tokens += request.max_tokens
    wall = time.perf_counter() - start
    return _summary(f"hf-generate(batch={batch_size})", wall, output_tokens,
                    sum(len(r.prompt_ids) for r in requests), ttfts, itls,
                    {"num_requests": len(requests), "batch_size": batch_size})


def compare_engine_vs_hf(model: torch.nn.Module, tokenizer, num_requests: int = 32, concurrency: int = 32,
                         prompt_lens: tuple[int, int] = (16, 256), output_lens: tuple[int, int] = (16, 128),
                         hf_batch_sizes: Sequence[int] = (1, 32), seed: int = 0, block_size: int = 16,
                         max_prefill_tokens: int = 2048, num_blocks: int | None = None) -> dict:
    """Engine vs HF generate on the same weights, device and requests; speedups are output-token ratios."""
    cfg = model.config
    requests = synthetic_workload(num_requests, prompt_lens, output_lens, min(cfg.vocab_size, tokenizer.vocab_size),
                                  seed)
    warm = LLMEngine(model, tokenizer, block_size=block_size, num_blocks=num_blocks, max_num_seqs=concurrency,
                     max_prefill_tokens=max_prefill_tokens)
    engine_workload(warm, requests[:2])  # first-call costs (allocator, autotuning) stay out of the numbers
    del warm
    engine = LLMEngine(model, tokenizer, block_size=block_size, num_blocks=num_blocks, max_num_seqs=concurrency,
                       max_prefill_tokens=max_prefill_tokens)
    result = {"engine": engine_workload(engine, requests, concurrency), "hf": []}
    hf = hf_model_from(model)
    for batch_size in hf_batch_sizes:
        hf_generate_workload(hf, requests[:1], batch_size=1)  # warm-up
        result["hf"].append(hf_generate_workload(hf, requests, batch_size=batch_size))
    engine_rate = result["engine"]["output_tokens_per_s"]
    result["speedup_vs_hf"] = {h["system"]: engine_rate / h["output_tokens_per_s"] for h in result["hf"]}
    result["workload"] = {"num_requests": num_requests, "concurrency": concurrency, "prompt_lens": prompt_lens,
                              "output_lens": output_lens, "seed": seed, "device": str(next(model.parameters()).device)}
    return result
