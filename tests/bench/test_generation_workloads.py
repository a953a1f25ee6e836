"""bench/generation.py: the engine-vs-HF workloads count exactly the tokens they asked for, and their
percentiles come from the one ``bench.timing.percentile``."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from tritium.bench.generation import engine_workload, hf_generate_workload, hf_model_from, synthetic_workload
from tritium.bench.timing import percentile


def test_percentile_matches_numpy():
    rng = random.Random(5)
    for n in (1, 2, 7, 123):
        values = [rng.expovariate(3.0) for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert math.isclose(percentile(values, q), float(np.percentile(values, q)), rel_tol=1e-12)
    assert percentile([], 50) is None


@pytest.fixture(scope="module")
def tiny():
    from tritium.model.config import ModelConfig
    from tritium.model.tokenizer import train_tokenizer
    from tritium.model.transformer import Transformer

    tokenizer = train_tokenizer(None, 400, max_bytes=150_000, num_threads=1)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", num_layers=1, vocab_size=400, max_seq_len=64,
                                              backend="torch")).eval()
    return model, tokenizer


def test_engine_and_hf_workloads_generate_exactly_the_requested_tokens(tiny):
    from tritium.serve.engine import LLMEngine

    model, tokenizer = tiny
    requests = synthetic_workload(5, (3, 9), (2, 6), vocab_size=400, seed=1)
    assert requests == synthetic_workload(5, (3, 9), (2, 6), vocab_size=400, seed=1)  # seeded
    wanted = sum(r.max_tokens for r in requests)
    engine = engine_workload(LLMEngine(model, tokenizer, max_num_seqs=3, max_prefill_tokens=64), requests, 3)
    assert engine["output_tokens"] == wanted and engine["prompt_tokens"] == sum(len(r.prompt_ids) for r in requests)
    assert 0 < engine["ttft_p50_ms"] <= engine["ttft_p99_ms"] and engine["concurrency"] == 3
    pytest.importorskip("transformers")
    hf = hf_generate_workload(hf_model_from(model), requests, batch_size=5)
    assert hf["output_tokens"] == wanted and hf["batch_size"] == 5 and hf["output_tokens_per_s"] > 0
