"""Tensor-parallel inference sizing: per-GPU memory and all-reduce bytes per token against hand-computed
numbers (Megatron-LM's split, Shoeybi et al. 2019, section 3), its validation, and `describe --tensor-parallel`."""
import json

import pytest

from tritium.cli import main
from tritium.model.config import ModelConfig
from tritium.model.sizing import (
    count_parameters,
    describe,
    inference_cost,
    kv_cache_bytes_per_token,
    tensor_parallel_sizing,
)


def test_tiny_by_hand():
    tiny = ModelConfig.from_name("tiny")  # h=192, L=4, 6 heads (2 kv) x 32, swiglu 512, V=2048, tied
    tp = tensor_parallel_sizing(tiny, 2)
    assert tp.all_reduces_per_step == 8  # 2 per block
    assert tp.all_reduce_payload_bytes_per_token == 2 * 4 * 192 * 2 == 3072
    assert tp.all_reduce_bytes_sent_per_token_per_rank == 2 * (2 - 1) / 2 * 3072  # ring: 2(t-1)/t
    assert tp.kv_heads_per_rank == 1 and tp.kv_cache_bytes_per_token_per_rank == 2 * 4 * 1 * 32 * 2
    per_layer = 2 * 192 * 192 // 2 + 2 * 192 * 32 + 3 * 192 * 512 // 2  # q+o halves, one k and v head, FFN half
    assert tp.weight_bytes_per_rank == 2 * (4 * per_layer + 9 * 192 + 2048 * 192)  # tied: one embedding, whole


def test_t1_is_the_whole_model_without_traffic():
    for name in ("tiny", "llama3-8b"):
        cfg = ModelConfig.from_name(name)
        tp = tensor_parallel_sizing(cfg, 1, "fp32")
        assert tp.weight_bytes_per_rank == 4 * count_parameters(cfg)
        assert tp.kv_cache_bytes_per_token_per_rank == kv_cache_bytes_per_token(cfg, "fp32")
        assert tp.all_reduces_per_step == 0 and tp.bytes_sent_per_token_per_rank == 0


@pytest.mark.parametrize("t, sent, kv_heads, per_rank_params", [
    # per rank: 32 * (2*4096*4096/t + 2*4096*kv*128 + 3*4096*14336/t) + 65*4096 + 2*128256*4096 (replicated)
    (2, 524_288, 4, 32 * (16_777_216 + 4_194_304 + 88_080_384) + 266_240 + 1_050_673_152),
    (4, 786_432, 2, 32 * (8_388_608 + 2_097_152 + 44_040_192) + 266_240 + 1_050_673_152),
    (8, 917_504, 1, 32 * (4_194_304 + 1_048_576 + 22_020_096) + 266_240 + 1_050_673_152),
])
def test_llama3_8b_by_hand(t, sent, kv_heads, per_rank_params):
    tp = tensor_parallel_sizing(ModelConfig.from_name("llama3-8b"), t)
    # 2 all-reduces x 32 blocks x 4096 hidden x 2 bytes, whatever t; each rank sends 2(t-1)/t of it
    assert tp.all_reduce_payload_bytes_per_token == 524_288 and tp.all_reduces_per_step == 64
    assert tp.all_reduce_bytes_sent_per_token_per_rank == sent
    assert tp.kv_heads_per_rank == kv_heads and tp.kv_replication == 1
    assert tp.kv_cache_bytes_per_token_per_rank == 2 * 32 * kv_heads * 128 * 2
    assert tp.weight_bytes_per_rank == 2 * per_rank_params
    assert tp.vocab_bytes_sent_per_token_per_rank == 0


def test_kv_heads_replicate_and_vocab_splits():
    llama3 = ModelConfig.from_name("llama3-8b")
    tp = tensor_parallel_sizing(llama3, 16)  # 8 KV heads over 16 ranks: each head on 2 ranks
    assert tp.kv_heads_per_rank == 1 and tp.kv_replication == 2
    assert tp.kv_cache_bytes_per_token_per_replica == 2 * 131_072
    split = tensor_parallel_sizing(llama3, 2, vocab_parallel=True)
    whole = tensor_parallel_sizing(llama3, 2)
    assert whole.weight_bytes_per_rank - split.weight_bytes_per_rank == 2 * 2 * 64_128 * 4096
    # embedding all-reduce (ring, 2(t-1)/t * h * a) + logits all-gather ((t-1) * V/t * a)
    assert split.vocab_bytes_sent_per_token_per_rank == 4096 * 2 + 64_128 * 2


@pytest.mark.parametrize("cfg, t, match", [
    (ModelConfig.from_name("tiny"), 0, "tensor_parallel must be a positive integer"),
    (ModelConfig.from_name("tiny"), 1.0, "tensor_parallel must be a positive integer"),
    (ModelConfig.from_name("tiny"), True, "tensor_parallel must be a positive integer"),
    (ModelConfig.from_name("tiny"), 4, r"tensor_parallel=4 does not divide num_attention_heads=6"),
    (ModelConfig.from_name("tiny"), 3, r"tensor_parallel=3 and num_key_value_heads=2"),
    (ModelConfig(hidden_size=64, num_layers=1, num_heads=4, ffn_hidden=90), 4, r"intermediate_size \(ffn_hidden\)=90"),
])
def test_bad_degree_names_tensor_parallel(cfg, t, match):
    with pytest.raises(ValueError, match=match):
        tensor_parallel_sizing(cfg, t)
    with pytest.raises(ValueError, match="tensor_parallel"):
        inference_cost(cfg, 1, 16, 16, 10, tensor_parallel=t)
    with pytest.raises(ValueError, match="tensor_parallel"):
        describe(cfg, tensor_parallel=t)


def test_cost_counts_a_replica_as_t_gpus():
    cfg = ModelConfig.from_name("llama3-8b")  # fits one 80 GB GPU
    kwargs = dict(requests_per_s=1, prompt_tokens=512, output_tokens=256, latency_s=30,
                  tokens_per_s_per_gpu=2500, prefill_tokens_per_s_per_gpu=30_000, gpu_hour_price=2.5)
    one, two = inference_cost(cfg, **kwargs), inference_cost(cfg, **kwargs, tensor_parallel=2)
    assert one == inference_cost(cfg, **kwargs, tensor_parallel=1) and one.gpus_per_replica == 1
    assert two.gpus_per_replica == 2 and two.gpus_needed == 2 * one.gpus_needed == 2
    assert two.cost_per_hour == pytest.approx(2 * one.cost_per_hour)
    assert two.cost_per_million_tokens == pytest.approx(2 * one.cost_per_million_tokens)
    # the replica's memory is 2 GPUs minus 2 shards (embedding and head replicated): more sequences fit
    tp = tensor_parallel_sizing(cfg, 2)
    assert two.max_concurrent_per_replica == int((2 * 72e9 - 2 * tp.weight_bytes_per_rank) // (131_072 * 768))
    assert two.all_reduce_bytes_per_token_per_gpu == 524_288 and one.all_reduce_bytes_per_token_per_gpu == 0
    # interconnect each GPU needs at the replica's decode rate (2 GPUs x 2500 tokens/s)
    assert two.interconnect_gbs_per_gpu_decode == pytest.approx(524_288 * 5000 / 1e9)
    assert any("all-reduces per step" in note for note in two.notes)


def test_cost_when_the_shard_does_not_fit():
    cfg = ModelConfig.from_name("llama3-8b")
    # 8 GB GPUs: a 9.08 GB shard does not fit at t=2; the weights (16.06 GB) need 3 GPUs' usable 7.2 GB
    cost = inference_cost(cfg, 1, 64, 64, 30, gpu_memory_gb=8, tensor_parallel=2)
    assert cost.gpus_per_replica >= 3 and any("does not fit at tensor_parallel=2" in n for n in cost.notes)
    # a 70B-class model: one replica is 4 GPUs at t=4 (its weights alone need 2)
    big = ModelConfig(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8, ffn_hidden=28672)
    assert inference_cost(big, 1, 100, 100, 10, tensor_parallel=4).gpus_per_replica == 4


def test_describe_cli_tensor_parallel(capsys):
    assert main(["describe", "--preset", "llama3-8b", "--tensor-parallel", "2", "--cost", "--requests-per-s", "1",
                 "--tokens-per-s-per-gpu", "2500", "--latency-s", "30"]) == 0
    out = capsys.readouterr().out
    assert "Tensor parallel over 2 GPUs" in out and "8.46 GiB of weights" in out
    assert "= 524,288 bytes" in out and "64 all-reduces per forward step" in out
    assert "all-reduce bytes/token per GPU" in out and "interconnect GB/s per GPU, decode" in out
    assert main(["describe", "--preset", "llama3-8b", "--cost", "--requests-per-s", "1",
                 "--tokens-per-s-per-gpu", "2500", "--latency-s", "30"]) == 0
    plain = capsys.readouterr().out
    assert "Tensor parallel" not in plain and "all-reduce" not in plain  # the default output is unchanged
    assert main(["describe", "--preset", "llama3-8b", "--tensor-parallel", "4", "--cost", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tensor_parallel"]["all_reduce_bytes_sent_per_token_per_rank"] == 786_432
    assert report["inference_cost"]["gpus_per_replica"] == 4 and report["inference_cost"]["gpus_needed"] % 4 == 0


@pytest.mark.parametrize("argv, message", [
    (["--preset", "tiny", "--tensor-parallel", "4"], "tensor_parallel=4 does not divide num_attention_heads=6"),
    (["--preset", "tiny", "--tensor-parallel", "0"], "--tensor-parallel must be a positive integer"),
])
def test_describe_cli_bad_degree_is_one_line(capsys, argv, message):
    assert main(["describe", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
