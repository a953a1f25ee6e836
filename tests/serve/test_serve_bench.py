"""serve-bench and cost accounting: the load generator against a real server,
the cost arithmetic against hand formulas, and the CLI spawning `tritium serve` from a checkpoint."""
from __future__ import annotations

import json
import math
import random

import pytest
from serve_harness import running_server, tiny_model, tiny_tokenizer

from tritium.bench.serve_load import BenchConfig, make_workload, run_bench
from tritium.serve.cost import TrafficTarget, estimate_cost


def test_cost_arithmetic():
    rng = random.Random(9)
    for _ in range(20):
        measured = rng.uniform(50, 5000)
        target = TrafficTarget(requests_per_s=rng.uniform(0.5, 50), output_tokens_per_request=rng.randint(16, 512),
                               gpu_hour_usd=rng.uniform(1, 4), gpus_per_replica=rng.choice([1, 2, 8]),
                               itl_p99_s=0.05)
        est = estimate_cost(measured, target, measured_itl_p99_s=rng.choice([0.01, 0.2]))
        required = target.requests_per_s * target.output_tokens_per_request
        replicas = math.ceil(required / measured)
        assert est.replicas_needed == replicas and est.gpus_needed == replicas * target.gpus_per_replica
        assert math.isclose(est.usd_per_1m_output_tokens_at_target,
                            replicas * target.gpus_per_replica * target.gpu_hour_usd / (required * 3600) * 1e6)
        assert math.isclose(est.usd_per_1m_output_tokens_at_capacity,
                            target.gpus_per_replica * target.gpu_hour_usd / (measured * 3600) * 1e6)
        assert est.usd_per_1m_output_tokens_at_target >= est.usd_per_1m_output_tokens_at_capacity * (1 - 1e-12)
        assert est.meets_latency_target == (est.latency_notes[0].find("meets") >= 0)
    with pytest.raises(ValueError, match="positive"):
        estimate_cost(0.0, TrafficTarget())
    with pytest.raises(ValueError, match="requests_per_s"):
        TrafficTarget(requests_per_s=0)


def test_bench_against_real_server():
    cfg_kwargs = {"concurrency": 4, "requests": 10, "prompt_tokens": (3, 9), "max_tokens": (2, 6), "seed": 3}
    with running_server() as srv:
        cfg = BenchConfig(url=srv.url, **cfg_kwargs)
        result = run_bench(cfg)
    assert result.completed == 10 and result.failed == 0, result.errors
    work = make_workload(cfg)
    assert math.isclose(result.mean_output_tokens, sum(m for _, m in work) / len(work))  # ignore_eos: exact
    # prompt lengths are tokens, exactly as asked (token-id prompts), whatever the server's tokenizer
    assert all(isinstance(p, list) and len(p) in (3, 9) for p, _ in work)
    assert math.isclose(result.mean_prompt_tokens, sum(len(p) for p, _ in work) / len(work))
    assert math.isclose(result.output_tokens_per_s, result.mean_output_tokens * result.completed / result.wall_s)
    assert 0 < result.ttft_p50_s <= result.ttft_p99_s < result.wall_s
    assert 0 < result.itl_p50_s <= result.itl_p99_s
    assert result.latency_p99_s >= result.ttft_p99_s
    est = estimate_cost(result.output_tokens_per_s, TrafficTarget(requests_per_s=5, output_tokens_per_request=4),
                        model_config=tiny_model().config)
    assert est.replicas_needed == math.ceil(20 / result.output_tokens_per_s)
    assert est.model_estimate["decode_tokens_per_s_per_gpu"] == pytest.approx(result.output_tokens_per_s)


def test_cli_spawns_server_from_checkpoint(tmp_path, capsys):
    from tritium.cli import main
    from tritium.model.checkpoint import save_pretrained

    ckpt = tmp_path / "final"
    save_pretrained(tiny_model(), ckpt)
    tiny_tokenizer().save(ckpt)
    out = tmp_path / "bench.json"
    code = main(["serve-bench", "--checkpoint", str(ckpt), "--requests", "4", "--concurrency", "2",
                 "--prompt-tokens", "4", "--max-tokens", "3", "--requests-per-s", "2", "--itl-target-ms", "5000",
                 "--json", str(out), "--server-arg=--device=cpu", "--server-arg=--max-num-seqs=4"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["bench"]["completed"] == 4 and report["bench"]["mean_output_tokens"] == 3
    cost = report["cost"]
    assert cost["gpus_needed"] == math.ceil(2 * 3 / report["bench"]["output_tokens_per_s"])
    assert cost["meets_latency_target"] is True and cost["model_estimate"]["gpus_needed"] >= 1
    printed = capsys.readouterr().out
    assert "output tokens/s" in printed and "$ per 1M output tokens" in printed
    assert "latency_feasible" not in printed  # one latency verdict, from the measurements
    with pytest.raises(ValueError, match="--concurrency"):
        BenchConfig(url="http://127.0.0.1:1", concurrency=0)


def test_cli_refuses_to_price_a_failing_run(tmp_path, capsys):
    """Prompts longer than the model's context fail; serve-bench then prints why, prices nothing, exits 1."""
    from serve_harness import MAX_SEQ_LEN

    from tritium.cli import main

    out = tmp_path / "bench.json"
    with running_server() as srv:
        code = main(["serve-bench", "--url", srv.url, "--requests", "4", "--concurrency", "2",
                     "--prompt-tokens", f"4,{MAX_SEQ_LEN + 8}", "--max-tokens", "2", "--seed", "1",
                     "--json", str(out)])
    assert code == 1
    report = json.loads(out.read_text())
    assert report["bench"]["completed"] >= 1  # a partly working run is refused too, not only a dead one
    assert report["cost"] is None and report["bench"]["failed"] >= 1 and "failed" in report["refused"]
    printed = capsys.readouterr().out
    assert "no cost estimate" in printed and "$ per 1M" not in printed and "context length" in printed


def test_bench_sends_the_api_key(monkeypatch):
    from tritium.serve.api import ServeConfig

    cfg_kwargs = {"concurrency": 2, "requests": 2, "prompt_tokens": (3,), "max_tokens": (2,)}
    with running_server(ServeConfig(api_key="s3cret")) as srv:
        keyed = run_bench(BenchConfig(url=srv.url, api_key="s3cret", model="tritium", **cfg_kwargs))
        unkeyed = run_bench(BenchConfig(url=srv.url, model="tritium", **cfg_kwargs))
    assert keyed.completed == 2 and keyed.failed == 0, keyed.errors
    assert unkeyed.completed == 0 and unkeyed.failure_rate == 1.0


def test_shared_prefix_workload_shares_exactly_n_tokens():
    cfg = BenchConfig(url="http://127.0.0.1:1", requests=12, prompt_tokens=(5, 9), max_tokens=(2,),
                      shared_prefix_tokens=37, seed=4)
    work = make_workload(cfg)
    prefix = work[0][0][:37]
    assert all(p[:37] == prefix and len(p) in (37 + 5, 37 + 9) for p, _ in work)
    suffixes = {tuple(p[37:]) for p, _ in work}
    assert len(suffixes) == len(work)  # each request's own tokens differ
    # the per-request part is the same draw as without a prefix, so the two workloads compare like for like
    plain = make_workload(BenchConfig(url=cfg.url, requests=12, prompt_tokens=(5, 9), max_tokens=(2,), seed=4))
    assert [p[37:] for p, _ in work] == [p for p, _ in plain]
    chat = make_workload(BenchConfig(url=cfg.url, requests=3, prompt_tokens=(4,), shared_prefix_tokens=6, chat=True))
    assert len({p.split()[:6].__repr__() for p, _ in chat}) == 1 and all(len(p.split()) == 10 for p, _ in chat)
    with pytest.raises(ValueError, match="--shared-prefix-tokens"):
        BenchConfig(url=cfg.url, shared_prefix_tokens=-1)


def test_prefix_cache_numbers_match_server_metrics():
    """A 48-token shared prefix (3 full blocks of 16): the report's cached/prefill tokens (from usage) equal the
    server's /metrics counters over the run, and later requests really hit the cache."""
    import httpx
    from serve_harness import metric_value

    cfg = BenchConfig(url="", concurrency=2, requests=6, prompt_tokens=(5,), max_tokens=(2,),
                      shared_prefix_tokens=48, seed=2)
    with running_server() as srv:
        cfg.url = srv.url
        warm = run_bench(BenchConfig(url=srv.url, requests=1, prompt_tokens=(3,), max_tokens=(2,)))
        result = run_bench(cfg)
        text = httpx.get(f"{srv.url}/metrics").text
    assert result.completed == 6 and result.failed == 0, result.errors
    assert result.prompt_tokens == 6 * 53
    assert result.cached_prompt_tokens >= 4 * 48  # at most the two first concurrent requests miss
    assert result.prefill_tokens == result.prompt_tokens - result.cached_prompt_tokens
    assert result.cache_hit_rate == pytest.approx(result.cached_prompt_tokens / result.prompt_tokens)
    pc = result.server_prefix_cache
    assert pc["hits"] == result.cached_prompt_tokens and pc["queries"] == result.prompt_tokens
    assert pc["hits"] + warm.cached_prompt_tokens == metric_value(text, "tritium_prefix_cache_hits")
    assert result.ttft_p50_s <= result.ttft_p90_s <= result.ttft_p99_s and result.ttft_mean_s > 0


def test_cli_compare_prefix_caching_runs_both(tmp_path, capsys):
    from tritium.cli import main
    from tritium.model.checkpoint import save_pretrained

    ckpt = tmp_path / "final"
    save_pretrained(tiny_model(), ckpt)
    tiny_tokenizer().save(ckpt)
    out = tmp_path / "compare.json"
    code = main(["serve-bench", "--checkpoint", str(ckpt), "--requests", "4", "--concurrency", "1",
                 "--shared-prefix-tokens", "32", "--prompt-tokens", "4", "--max-tokens", "2",
                 "--compare-prefix-caching", "--json", str(out), "--server-arg=--device=cpu",
                 "--server-arg=--block-size=16"])
    assert code == 0
    report = json.loads(out.read_text())["compare_prefix_caching"]
    on, off = report["on"][0]["bench"], report["off"][0]["bench"]
    assert on["completed"] == off["completed"] == 4 and on["prompt_tokens"] == off["prompt_tokens"] == 4 * 36
    assert on["cached_prompt_tokens"] == 3 * 32 and on["server_prefix_cache"]["hits"] == 3 * 32  # one at a time
    assert off["cached_prompt_tokens"] == 0 and off["prefill_tokens"] == 4 * 36
    assert report["on"][0]["cost"]["usd_per_1m_output_tokens_at_capacity"] > 0
    printed = capsys.readouterr().out
    assert "prefill tokens computed" in printed and "caching off" in printed
    ratio_line = next(line for line in printed.splitlines() if line.startswith("prefill tokens computed"))
    assert ratio_line.split()[-1] == f"{(4 * 36) / (4 * 36 - 96):.2f}x"
    assert main(["serve-bench", "--url", "http://127.0.0.1:1", "--compare-prefix-caching"]) != 0
    assert "--compare-prefix-caching needs --checkpoint" in capsys.readouterr().err
