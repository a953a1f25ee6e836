"""The sizing calculator against hand-computed numbers (and Hugging Face's own parameter count)."""
import json

import pytest

from tritium.model.config import ModelConfig
from tritium.model.sizing import (
    activation_bytes,
    activation_bytes_per_token_per_layer,
    count_parameters,
    describe,
    flops_per_token,
    inference_cost,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    matmul_parameters,
    parameter_breakdown,
    training_memory,
)


def test_llama2_7b_counts_exactly():
    p = parameter_breakdown(ModelConfig.from_name("llama2-7b"))
    # V*h = 32000*4096; L*(4*h*h) = 32*4*4096^2; L*3*h*f = 32*3*4096*11008; (2L+1)*h = 65*4096
    assert p.embeddings == 131_072_000
    assert p.attention == 2_147_483_648
    assert p.ffn == 4_328_521_728
    assert p.norms == 266_240
    assert p.head == 131_072_000
    assert p.total == 6_738_415_616
    assert abs(sum(p.shares().values()) - 1.0) < 1e-12


def test_seed_7b_lives_in_the_ffn():
    p = parameter_breakdown(ModelConfig.from_name("seed-7b"))
    # two-matrix FFN: 32 layers * 2 * 4096 * 16384
    assert p.ffn == 4_294_967_296
    assert p.total == 6_704_861_184
    assert p.shares()["ffn"] == pytest.approx(4_294_967_296 / 6_704_861_184, rel=1e-12)
    assert p.shares()["ffn"] > 0.64 and p.shares()["attention"] < 0.33  # "most parameters live in the FFN"


def test_tiny_gqa_tied_counts():
    p = parameter_breakdown(ModelConfig.from_name("tiny"))
    # attention per layer: q 192*192 + k,v 2*192*(2*32) + o 192*192 = 98,304
    assert p.attention == 4 * 98_304
    assert p.ffn == 4 * 3 * 192 * 512
    assert p.head == 0  # tied
    assert p.total == 2048 * 192 + 4 * 98_304 + 4 * 3 * 192 * 512 + 9 * 192 == 1_967_808


@pytest.mark.parametrize("overrides", [
    {},  # tiny, tied
    {"tie_embeddings": False, "num_kv_heads": 3, "num_layers": 3, "ffn_hidden": 333, "vocab_size": 1001},
])
def test_matches_hugging_face_llama(overrides):
    transformers = pytest.importorskip("transformers")
    import torch

    cfg = ModelConfig.from_name("tiny", **overrides)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf_dict()))
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())


def test_flops_per_token_by_hand():
    cfg = ModelConfig.from_name("llama2-7b")
    n_mm = 2_147_483_648 + 4_328_521_728 + 131_072_000  # attention + ffn + head matmul
    assert matmul_parameters(cfg) == n_mm
    assert flops_per_token(cfg, 4096) == 6 * n_mm + 12 * 32 * 4096 * 4096 == 46_084_915_200
    assert flops_per_token(cfg, 4096, training=False) == 2 * n_mm + 4 * 32 * 4096 * 4096
    # a tied head still costs its matmul
    tiny = ModelConfig.from_name("tiny")
    assert matmul_parameters(tiny) == 4 * 98_304 + 4 * 3 * 192 * 512 + 2048 * 192
    assert flops_per_token(tiny, 100) - flops_per_token(tiny, 50) == 12 * 4 * 192 * 50


def test_kv_cache_gqa():
    llama2, llama3 = ModelConfig.from_name("llama2-7b"), ModelConfig.from_name("llama3-8b")
    assert kv_cache_bytes_per_token(llama2) == 2 * 32 * 32 * 128 * 2 == 524_288
    assert kv_cache_bytes_per_token(llama3) == 2 * 32 * 8 * 128 * 2 == 131_072  # 8 kv heads: 4x smaller
    assert kv_cache_bytes(llama3) == 131_072 * 8192 == 2**30
    assert kv_cache_bytes(llama2, seq_len=1000, batch_size=3, precision="fp32") == 2 * 524_288 * 3000


def test_zero_stage_memory_ratios():
    cfg = ModelConfig.from_name("llama2-7b")
    psi, n = 6_738_415_616, 8
    stages = [training_memory(cfg, s, n, micro_batch=2, seq_len=1024) for s in range(4)]
    # ZeRO paper: 16 psi, 4 psi + 12 psi/N, 2 psi + 14 psi/N, 16 psi/N
    assert stages[0].model_states == 16 * psi
    assert stages[1].model_states == 4 * psi + 12 * psi // n
    assert stages[2].model_states == 2 * psi + 14 * psi // n
    assert stages[3].model_states == 16 * psi // n
    assert stages[0].model_states / stages[3].model_states == n
    # ZeRO does not partition activations; checkpointing shrinks them
    assert len({s.activations for s in stages}) == 1
    assert stages[0].activations_checkpointed < stages[0].activations / 5
    # fp32 Adam: 4 + 4 + 8 bytes per parameter
    assert training_memory(cfg, 0, 1, precision="fp32", seq_len=8).model_states == 16 * psi
    assert training_memory(cfg, 3, 4, seq_len=8).optimizer == 12 * psi // 4


def test_activation_formula_by_hand():
    cfg = ModelConfig.from_name("tiny")
    # 2 bytes * (4h + 2q + 2kv + 3f) + 4 * heads + 8 = 2 * (768 + 384 + 128 + 1536) + 24 + 8
    assert activation_bytes_per_token_per_layer(cfg) == 5664
    final = 2 * 2 * 192 + 4
    assert activation_bytes(cfg, 3, 50) == 150 * (4 * 5664 + final)
    assert activation_bytes(cfg, 3, 50, checkpointing=True) == 150 * (4 * 2 * 192 + 5664 + final)
    gelu = cfg.replace(ffn_type="gelu")
    assert activation_bytes_per_token_per_layer(gelu) == 5664 - 2 * 512


def test_inference_cost_arithmetic():
    cfg = ModelConfig.from_name("llama2-7b")
    cost = inference_cost(cfg, requests_per_s=20, prompt_tokens=300, output_tokens=100, latency_s=5,
                          tokens_per_s_per_gpu=1000, gpu_hour_price=3.0, prefill_tokens_per_s_per_gpu=12_000)
    # decode 20*100/1000 = 2 GPUs, prefill 20*300/12000 = 0.5 GPU -> 3 GPUs
    assert cost.gpus_for_compute == pytest.approx(2.5)
    assert cost.gpus_needed == 3 and cost.gpus_per_replica == 1
    assert cost.concurrent_requests == 100
    assert cost.cost_per_hour == pytest.approx(9.0)
    assert cost.cost_per_million_tokens == pytest.approx(9.0 / (20 * 400 * 3600) * 1e6)
    assert cost.cost_per_million_output_tokens == pytest.approx(9.0 / (20 * 100 * 3600) * 1e6)
    assert cost.latency_feasible and not cost.decode_estimated and not cost.prefill_estimated


def test_inference_cost_memory_and_latency_bounds():
    cfg = ModelConfig.from_name("llama2-7b")
    # long contexts and a long latency: the KV caches in flight, not compute, set the GPU count
    cost = inference_cost(cfg, 5, 3000, 1000, 600, tokens_per_s_per_gpu=10_000, prefill_tokens_per_s_per_gpu=1e6)
    kv_per_request = 524_288 * 4000
    per_gpu = int((80e9 * 0.9 - 2 * 6_738_415_616) // kv_per_request)
    assert cost.max_concurrent_per_replica == per_gpu
    assert cost.gpus_for_memory == -(-3000 // per_gpu) == cost.gpus_needed
    # 2000 tokens/s for one stream is beyond reading 13.5 GB of weights per token
    fast = inference_cost(cfg, 1, 10, 2000, 1.0)
    assert not fast.latency_feasible and any("latency" in note for note in fast.notes)
    # a 70B-class model does not fit one GPU: replicas span several
    big = ModelConfig(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8, ffn_hidden=28672)
    assert inference_cost(big, 1, 100, 100, 10).gpus_per_replica == 2


@pytest.mark.parametrize("call, match", [
    (lambda c: training_memory(c, 4, 8), "zero_stage"),
    (lambda c: training_memory(c, 1, 0), "num_gpus"),
    (lambda c: training_memory(c, 1, 8, precision="int4"), "precision"),
    (lambda c: kv_cache_bytes(c, seq_len=0), "seq_len"),
    (lambda c: inference_cost(c, 0, 1, 1, 1), "requests_per_s"),
    (lambda c: inference_cost(c, 1, 1, 1, 1, tokens_per_s_per_gpu=-5), "tokens_per_s_per_gpu"),
])
def test_bad_arguments_name_themselves(call, match):
    with pytest.raises(ValueError, match=match):
        call(ModelConfig.from_name("tiny"))


def test_describe_is_json_ready():
    report = describe(ModelConfig.from_name("1b"), num_gpus=4, micro_batch=2, seq_len=2048)
    again = json.loads(json.dumps(report))
    assert again["parameters"]["total"] == count_parameters(ModelConfig.from_name("1b"))
    assert set(again["training_memory"]["stages"]) == {"0", "1", "2", "3"}
