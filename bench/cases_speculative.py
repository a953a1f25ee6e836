"""Speculative decoding: batch-1 greedy tokens/s with and without n-gram prompt lookup (``Generator``)
and with and without a draft model inside the continuous-batching engine (``LLMEngine``).

Two workloads (issue 21): ``copy`` -- a "repeat: TEXT" prompt that holds the text the model is to
reproduce, so prompt lookup proposes the right tokens -- and ``free`` -- a prompt whose continuation
is not in it, where proposals mostly miss and the back-off must keep the cost near zero.

Whether the copy workload is copied depends on the model: random weights do not copy, so set
``TRITIUM_BENCH_SPEC_CHECKPOINT`` to a trained checkpoint folder (one that continues "repeat: TEXT
<newline> TEXT" with TEXT) for a meaningful copy row; without it the case uses a random tiny model
(a floor: acceptance near zero on both rows). The acceptance rate of the last run is in the note.

``speculative_draft_engine`` serves one request at a time through ``LLMEngine`` (prefix caching off,
so every run prefills target and draft): plain, with the draft checkpoint
``TRITIUM_BENCH_SPEC_DRAFT`` (a smaller model sharing the target's tokenizer; without it a random
1-layer copy of the target's shape: a floor, nothing accepted) and with n-gram lookup for comparison.
"""
from __future__ import annotations

import itertools
import os

import torch

from tritium.bench.registry import Case, register

_TEXT = ("The quick brown fox jumps over the lazy dog while the five boxing wizards jump quickly; "
         "pack my box with five dozen liquor jugs, and sphinx of black quartz, judge my vow.")
_LOADED: dict[tuple, tuple] = {}


def _model_and_tokenizer(device: str, dtype: torch.dtype):
    key = (device, dtype)
    if key not in _LOADED:
        _LOADED.clear()
        checkpoint = os.environ.get("TRITIUM_BENCH_SPEC_CHECKPOINT")
        if checkpoint:
            from tritium.serve.cli_generate import load_for_inference

            model, tokenizer = load_for_inference(checkpoint, device=device, dtype=str(dtype).split(".")[-1])
        else:
            from tritium.model.config import ModelConfig
            from tritium.model.transformer import Transformer

            torch.manual_seed(0)
            cfg = ModelConfig.from_name("tiny", max_seq_len=512).replace(initializer_range=0.2)
            with torch.device(device):
                model = Transformer(cfg, backend="torch")
            model = model.to(dtype=dtype).eval()
            tokenizer = None
        _LOADED[key] = (model, tokenizer)
    return _LOADED[key]


def _prompt(workload: str, tokenizer, vocab_size: int) -> list[int]:
    if tokenizer is not None:
        text = f"repeat: {_TEXT}\n{_TEXT[:24]}" if workload == "copy" else "Once upon a time, in a small town,"
        return tokenizer.encode(text, bos=True)
    gen = torch.Generator().manual_seed(1)
    body = torch.randint(3, vocab_size, (48,), generator=gen).tolist()
    return [1] + body + body[:8] if workload == "copy" else [1] + body


class _IdsTokenizer:
    eos_id = -1

    def decode(self, ids):
        return " ".join(map(str, ids))


def _factory(speculative: bool):
    def factory(size, mode, device, dtype):
        from tritium.serve.generator import Generator
        from tritium.serve.sampling import SamplingParams
        from tritium.serve.speculative import SpeculativeDecoder

        model, tokenizer = _model_and_tokenizer(device, dtype)
        spec = SpeculativeDecoder.ngram(size["K"]) if speculative else None
        generator = Generator(model, tokenizer or _IdsTokenizer(), speculative=spec)
        prompt = _prompt(size["workload"], tokenizer, model.config.vocab_size)
        params = SamplingParams(max_tokens=size["tokens"], temperature=0.0, ignore_eos=True)

        def run():
            out = generator.generate([prompt], params)[0]
            if spec is not None:
                CASE.note = f"{NOTE} Last run ({size['workload']}): {spec.stats.summary()}."
            return out
        return run
    return factory


def _work(size, mode):
    return size["tokens"]


NOTE = ("batch-1 greedy output tokens/s; x base = n-gram prompt lookup over plain decoding (target >= 1.8x "
        "on copy with a model that copies; free must stay >= 0.95x).")
_SIZES = [{"workload": w, "tokens": 128, "K": 4} for w in ("copy", "free")]
CASE = register(Case(
    name="speculative_ngram", area="generation",
    sizes=_SIZES, quick_sizes=_SIZES,
    cpu_sizes=[{"workload": w, "tokens": 64, "K": 4} for w in ("copy", "free")],
    providers={"ngram": _factory(True), "plain": _factory(False)},
    metric="tokens/s", modes=("fwd",), work=_work, baseline="plain", note=NOTE,
))


# --------------------------------------------------------------------------- the engine with a draft model

def _draft_model(device: str, dtype: torch.dtype, target: torch.nn.Module) -> torch.nn.Module:
    path = os.environ.get("TRITIUM_BENCH_SPEC_DRAFT")
    if path:
        from tritium.serve.cli_generate import load_for_inference

        return load_for_inference(path, device=device, dtype=str(dtype).split(".")[-1])[0]
    from tritium.model.transformer import Transformer

    torch.manual_seed(1)
    with torch.device(device):
        draft = Transformer(target.config.replace(num_layers=1), backend="torch")
    return draft.to(dtype=dtype).eval()


def _engine_factory(proposer: str | None):
    def factory(size, mode, device, dtype):
        from tritium.serve.engine import LLMEngine
        from tritium.serve.sampling import SamplingParams
        from tritium.serve.speculative import SpeculativeDecoder

        model, tokenizer = _model_and_tokenizer(device, dtype)
        spec = None
        if proposer == "draft":
            spec = SpeculativeDecoder.draft(_draft_model(device, dtype, model), size["K"])
        elif proposer == "ngram":
            spec = SpeculativeDecoder.ngram(size["K"])
        engine = LLMEngine(model, tokenizer or _IdsTokenizer(), block_size=16, num_blocks=64, max_num_seqs=4,
                           enable_prefix_caching=False, speculative=spec)
        prompt = _prompt(size["workload"], tokenizer, model.config.vocab_size)
        params = SamplingParams(max_tokens=size["tokens"], temperature=0.0, ignore_eos=True)
        ids = itertools.count()

        def run():
            request_id = f"bench-{next(ids)}"
            engine.add_request(request_id, prompt, params)
            out = engine.run_to_completion()[request_id]
            if spec is not None:
                ENGINE_CASE.note = f"{ENGINE_NOTE} Last run ({size['workload']}, {proposer}): {spec.stats.summary()}."
            return out
        run.engine = engine  # for scripts that read the counters
        return run
    return factory


ENGINE_NOTE = ("batch-1 greedy output tokens/s through LLMEngine (paged cache, prefix caching off); x base = "
               "a draft model (TRITIUM_BENCH_SPEC_DRAFT) or n-gram lookup over plain engine decoding.")
_ENGINE_SIZES = [{"workload": w, "tokens": 64, "K": 4} for w in ("copy", "free")]
ENGINE_CASE = register(Case(
    name="speculative_draft_engine", area="generation",
    sizes=_ENGINE_SIZES, quick_sizes=_ENGINE_SIZES, cpu_sizes=_ENGINE_SIZES,
    providers={"draft": _engine_factory("draft"), "ngram": _engine_factory("ngram"), "plain": _engine_factory(None)},
    metric="tokens/s", modes=("fwd",), work=_work, baseline="plain", note=ENGINE_NOTE,
))
