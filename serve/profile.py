"""Measurements of the generator and the engine, for the bench worker to wrap (bench/ owns the reports).

* ``copy_bandwidth(device)``: measured device-memory copy bandwidth (the practical ceiling of decode).
* ``decode_throughput(model, batch_sizes, cache_lens)``: tokens/s of the decode step at fixed cache
  lengths, with the memory-bandwidth bound (weights + KV bytes read per step / copy bandwidth) and the
  fraction of it achieved -- the issue's batch-1 target is >= 80% on an H100.
* ``synthetic_workload(...)`` + ``engine_workload(engine, requests)``: continuous-batching throughput,
  time to first token and inter-token latency (p50/p99) for requests of mixed prompt/output lengths.
* ``hf_model_from(model)`` + ``hf_generate_workload(hf_model, requests)``: the same requests through
  Hugging Face ``generate`` (one at a time, or in static padded batches), on the same weights.
* ``compare_engine_vs_hf(model, tokenizer, ...)``: both, and the speedup (target >= 5x at 32 concurrent).

Every function returns plain dicts/lists (JSON-ready).  ``python -m tritium.serve.profile --quick`` runs a
CPU-sized version of everything and prints JSON.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tritium.serve.engine import LLMEngine
from tritium.serve.generator import Generator, _DecodeGraph
from tritium.serve.kv_cache import ContiguousKVCache
from tritium.serve.sampling import SamplingParams
from tritium.serve.sequence import last_token_logits


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def copy_bandwidth(device: torch.device | str = "cuda", nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s, counting read + write (2 x nbytes per copy)."""
    device = torch.device(device)
    if device.type == "cpu":
        nbytes = min(nbytes, 256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    elapsed = time.perf_counter() - start
    return 2 * src.numel() * 4 * repeats / elapsed / 1e9


def _param_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


@torch.inference_mode()
def _time_decode_steps(model, cache, graph, ids, positions, warmup: int, steps: int) -> float:
    def step():
        if graph is not None:
            return graph(ids, positions)
        return last_token_logits(model, ids, positions, cache)

    for _ in range(warmup):
        step()
    _sync(cache.device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(cache.device)
    return time.perf_counter() - start


def decode_throughput(model: torch.nn.Module, batch_sizes: Sequence[int] = (1, 8, 64),
                      cache_lens: Sequence[int] = (512, 2048, 8192, 32768), steps: int = 32, warmup: int = 3,
                      use_cuda_graph: bool = True, bandwidth_gbs: float | None = None,
                      memory_fraction: float = 0.85) -> list[dict]:
    """Decode-step speed at each (batch, cache length): one token per row per step, attending over
    ``cache_len`` cached keys.  Combinations that exceed ``max_seq_len`` or memory are reported skipped."""
    param = next(model.parameters())
    device, cfg = param.device, model.config
    if bandwidth_gbs is None:
        bandwidth_gbs = copy_bandwidth(device)
    weight_bytes = _param_bytes(model)
    kv_bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * param.element_size()
    results = []
    for batch in batch_sizes:
        for cache_len in cache_lens:
            row = {"batch": batch, "cache_len": cache_len, "device": str(device), "dtype": str(param.dtype).split(".")[-1]}
            cache_bytes = batch * (cache_len + 1) * kv_bytes_per_token
            if cache_len + 1 > cfg.max_seq_len:
                results.append({**row, "skipped": f"cache_len > max_seq_len={cfg.max_seq_len}"})
                continue
            if device.type == "cuda" and cache_bytes > memory_fraction * torch.cuda.mem_get_info(device)[0]:
                results.append({**row, "skipped": f"KV cache of {cache_bytes / 2**30:.1f} GiB does not fit"})
                continue
            cache = ContiguousKVCache.for_model(model, batch, cache_len + 1)
            cache.seqlens.fill_(cache_len)
            ids = torch.randint(0, cfg.vocab_size, (batch, 1), device=device)
            positions = torch.full((batch, 1), cache_len, dtype=torch.long, device=device)
            graph = None
            if use_cuda_graph and device.type == "cuda":
                try:
                    with torch.inference_mode():
                        graph = _DecodeGraph(model, cache)
                except Exception as exc:  # noqa: BLE001 - report and measure eager instead
                    row["cuda_graph_error"] = repr(exc)[:200]
            elapsed = _time_decode_steps(model, cache, graph, ids, positions, warmup, steps)
            seconds_per_step = elapsed / steps
            bytes_per_step = weight_bytes + cache_bytes
            bound_s = bytes_per_step / (bandwidth_gbs * 1e9)
            results.append({**row, "cuda_graph": graph is not None, "ms_per_step": seconds_per_step * 1e3,
                            "tokens_per_s": batch / seconds_per_step,
                            "achieved_gbs": bytes_per_step / seconds_per_step / 1e9,
                            "bandwidth_gbs": bandwidth_gbs, "bound_ms_per_step": bound_s * 1e3,
                            "fraction_of_bound": bound_s / seconds_per_step})
            del cache, graph
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


# ------------------------------------------------------------------------------------------ workloads
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


def _summary(name: str, wall: float, output_tokens: int, prompt_tokens: int, ttfts: list[float],
             itls: list[float], extra: dict | None = None) -> dict:
    return dict(system=name, wall_s=wall, output_tokens=output_tokens, prompt_tokens=prompt_tokens,
                output_tokens_per_s=output_tokens / wall if wall > 0 else None,
                ttft_p50_ms=None if not ttfts else _percentile(ttfts, 50) * 1e3,
                ttft_p99_ms=None if not ttfts else _percentile(ttfts, 99) * 1e3,
                itl_p50_ms=None if not itls else _percentile(itls, 50) * 1e3,
                itl_p99_ms=None if not itls else _percentile(itls, 99) * 1e3,
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
    _sync(engine.device)
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
    _sync(device)
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
        _sync(device)
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


def generator_decode_rate(model: torch.nn.Module, tokenizer, batch_size: int = 1, prompt_len: int = 32,
                          max_tokens: int = 64) -> dict:
    """End-to-end ``Generator`` tokens/s (prefill + decode + sampling + detokenization), greedy."""
    generator = Generator(model, tokenizer)
    requests = synthetic_workload(batch_size, (prompt_len, prompt_len), (max_tokens, max_tokens),
                                  min(model.config.vocab_size, tokenizer.vocab_size))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    generator.generate([r.prompt_ids for r in requests[:1]], params)  # warm-up / graph capture
    _sync(generator.device)
    start = time.perf_counter()
    outs = generator.generate([r.prompt_ids for r in requests], params)
    _sync(generator.device)
    wall = time.perf_counter() - start
    tokens = sum(o.completion_tokens for o in outs)
    return {"batch": batch_size, "prompt_len": prompt_len, "max_tokens": max_tokens, "wall_s": wall,
                "tokens_per_s": tokens / wall, "cuda_graph": generator.use_cuda_graph,
                "graph_failures": generator.graph_failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few requests (CPU-sized)")
    parser.add_argument("--preset", default="tiny", help="ModelConfig preset for the random model")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", default=None, help="write the JSON here too")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is fastest for small models on a shared CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from tritium.model.config import ModelConfig
    from tritium.model.tokenizer import train_tokenizer
    from tritium.model.transformer import Transformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32}.get(args.dtype) or getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as directory:
        tokenizer = train_tokenizer(None, 2048, directory, max_bytes=300_000)
    cfg = ModelConfig.from_name(args.preset, vocab_size=max(2048, ModelConfig.from_name(args.preset).vocab_size))
    torch.manual_seed(0)
    model = Transformer(cfg).to(device=device, dtype=dtype).eval()
    quick = args.quick
    report = {
        "decode": decode_throughput(model, batch_sizes=(1, 8) if quick else (1, 8, 64),
                                    cache_lens=(64, 192) if quick else (512, 2048, 8192, 32768),
                                    steps=4 if quick else 32),
        "engine_vs_hf": compare_engine_vs_hf(model, tokenizer, num_requests=8 if quick else 32,
                                             concurrency=8 if quick else 32,
                                             prompt_lens=(8, 48) if quick else (16, 256),
                                             output_lens=(8, 32) if quick else (16, 128),
                                             hf_batch_sizes=(1,) if quick else (1, 32),
                                             max_prefill_tokens=256 if quick else 2048),
    }
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
