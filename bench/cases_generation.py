"""Generation: one decode step (the batch-1 bandwidth target) and engine
throughput under a mixed workload against Hugging Face ``generate``.

The decode step moves every weight once plus the KV cache it reads, so its
GB/s over the measured copy bandwidth is the fraction of the memory-bandwidth
bound (gpt-fast reports ~82% of an A100's at batch 1).
"""
from __future__ import annotations

import importlib.util
import tempfile

import torch

from tritium.bench.registry import Case, Skip, register

_MODELS: dict[tuple, torch.nn.Module] = {}


def _model(preset: str, backend: str, device: str, dtype: torch.dtype, max_seq_len: int):
    """Random weights are fine for speed; built once per run and reused across sizes."""
    from tritium.model.config import ModelConfig
    from tritium.model.transformer import Transformer

    key = (preset, backend, device, dtype, max_seq_len)
    if key not in _MODELS:
        _MODELS.clear()  # one 7B model at a time
        if device == "cuda":
            torch.cuda.empty_cache()
        cfg = ModelConfig.from_name(preset, max_seq_len=max_seq_len)
        with torch.device(device):
            model = Transformer(cfg, backend=backend)
        model.init_weights()
        _MODELS[key] = model.to(dtype=dtype).eval()
    return _MODELS[key]


def _decode_factory(kind: str):
    def factory(size, mode, device, dtype):
        from tritium.serve.generator import DecodeGraph
        from tritium.serve.kv_cache import ContiguousKVCache
        from tritium.serve.sequence import last_token_logits

        if kind == "tritium" and device != "cuda":
            raise Skip("the triton decode path with a CUDA graph is timed on CUDA only")
        B, L = size["B"], size["L"]
        model = _model(size["preset"], "triton" if kind == "tritium" else "torch", device, dtype, L + 1)
        cache = ContiguousKVCache.for_model(model, B, L + 1)
        cache.seqlens.fill_(L)
        cfg = model.config
        ids = torch.randint(0, cfg.vocab_size, (B, 1), device=device)
        positions = torch.full((B, 1), L, dtype=torch.long, device=device)
        if kind == "tritium":
            with torch.inference_mode():
                graph = DecodeGraph(model, cache)
            return lambda: graph(ids, positions)

        def eager():
            with torch.inference_mode():
                return last_token_logits(model, ids, positions, cache)
        return eager
    return factory


def _decode_bytes(size, mode, dtype):
    from tritium.model.config import ModelConfig
    from tritium.model.sizing import parameter_breakdown

    cfg = ModelConfig.from_name(size["preset"])
    esize = torch.tensor([], dtype=dtype).element_size()
    # Every layer weight and the head matrix are read once per step (tied or not); the embedding
    # lookup reads only B rows, so the table itself is not counted.
    params = parameter_breakdown(cfg).non_embedding + cfg.vocab_size * cfg.hidden_size
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * size["B"] * size["L"]
    return (params + kv) * esize


register(Case(
    name="decode_step", area="generation",
    sizes=[{"preset": "llama2-7b", "B": b, "L": length} for b in (1, 8) for length in (512, 4096)]
    + [{"preset": "llama2-7b", "B": 64, "L": 512}],
    quick_sizes=[{"preset": "llama2-7b", "B": 1, "L": 512}],
    cpu_sizes=[{"preset": "tiny", "B": 1, "L": 128}],
    providers={"tritium": _decode_factory("tritium"), "torch": _decode_factory("torch")},
    metric="GB/s", modes=("fwd",), bytes=_decode_bytes, baseline="torch",
    note="bytes = weights + KV read per step; GB/s over copy bandwidth = fraction of the bandwidth bound",
))


# ----------------------------------------------------------------------------- engine vs HF generate
def _workload(size, vocab):
    from tritium.bench.generation import synthetic_workload

    return synthetic_workload(size["requests"], (size["prompt_min"], size["prompt_max"]),
                              (size["out_min"], size["out_max"]), vocab, 0)


def _engine_factory(kind: str):
    def factory(size, mode, device, dtype):
        from tritium.bench.generation import engine_workload, hf_generate_workload, hf_model_from
        from tritium.serve.engine import LLMEngine

        # CPU: "auto", what a user's engine runs there (eager norm/rope, the cache's torch attention).
        backend = "triton" if device == "cuda" else "auto"
        model = _model(size["preset"], backend, device, dtype, 2048 if device == "cuda" else 512)
        tokenizer = _tokenizer()
        requests = _workload(size, min(model.config.vocab_size, tokenizer.vocab_size))
        if kind == "tritium_engine":
            def run():
                engine = LLMEngine(model, tokenizer, max_num_seqs=size["requests"], max_prefill_tokens=2048)
                return engine_workload(engine, requests, size["requests"])
            return run
        if importlib.util.find_spec("transformers") is None:
            raise Skip("transformers not installed (pip install tritium[hf])")
        hf = hf_model_from(model)
        batch = 1 if kind == "hf_generate" else size["requests"]
        return lambda: hf_generate_workload(hf, requests, batch_size=batch)
    return factory


_TOKENIZER = []


def _tokenizer():
    if not _TOKENIZER:
        from tritium.model.tokenizer import train_tokenizer

        with tempfile.TemporaryDirectory() as directory:
            _TOKENIZER.append(train_tokenizer(None, 2048, directory, max_bytes=300_000))
    return _TOKENIZER[0]


def _engine_work(size, mode):
    # synthetic requests have exact output lengths (ignore_eos); the tokenizer's 2048 ids bound the prompts
    return sum(r.max_tokens for r in _workload(size, 2048))


register(Case(
    name="engine_throughput", area="generation",
    sizes=[{"preset": "1b", "requests": 32, "prompt_min": 16, "prompt_max": 512, "out_min": 32, "out_max": 256}],
    quick_sizes=[{"preset": "1b", "requests": 32, "prompt_min": 16, "prompt_max": 256, "out_min": 16, "out_max": 128}],
    # Issue 18's CPU workload: 32 requests, mixed lengths, greedy, ignore_eos (minutes with HF one at a time).
    cpu_sizes=[{"preset": "tiny", "requests": 32, "prompt_min": 16, "prompt_max": 128, "out_min": 32, "out_max": 128}],
    providers={"tritium_engine": _engine_factory("tritium_engine"), "hf_generate": _engine_factory("hf_generate"),
               "hf_generate_batched": _engine_factory("hf_generate_batched")},
    metric="tokens/s", modes=("fwd",), work=_engine_work, baseline="hf_generate_batched",
    note="output tokens/s for the whole workload; x base = over HF generate with all requests in one padded "
         "static batch (target >= 1.2x; and >= 8x HF generate one request at a time)",
))
