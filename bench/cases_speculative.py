"""Speculative decoding: batch-1 greedy tokens/s with and without n-gram prompt lookup.

Two workloads (issue 21): ``copy`` -- a "repeat: TEXT" prompt that holds the text the model is to
reproduce, so prompt lookup proposes the right tokens -- and ``free`` -- a prompt whose continuation
is not in it, where proposals mostly miss and the back-off must keep the cost near zero.

Whether the copy workload is copied depends on the model: random weights do not copy, so set
``TRITIUM_BENCH_SPEC_CHECKPOINT`` to a trained checkpoint folder (one that continues "repeat: TEXT
<newline> TEXT" with TEXT) for a meaningful copy row; without it the case uses a random tiny model
(a floor: acceptance near zero on both rows). The acceptance rate of the last run is in the note.
"""
from __future__ import annotations

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
