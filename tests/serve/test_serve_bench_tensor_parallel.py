"""serve-bench's cost with a tensor-parallel server: each replica's GPU-hours count its N GPUs, the sizing model
sees the same degree, and a spawned server is started with --tensor-parallel N."""
from __future__ import annotations

import math

import pytest

from tritium.bench.serve_load import serve_command
from tritium.cli import main
from tritium.model.config import ModelConfig
from tritium.serve.cost import TrafficTarget, estimate_cost, format_estimate


def test_tensor_parallel_doubles_gpu_hours_at_the_same_measured_rate():
    kwargs = dict(requests_per_s=3, output_tokens_per_request=100, prompt_tokens_per_request=50, gpu_hour_usd=2.0)
    one = estimate_cost(120.0, TrafficTarget(**kwargs))
    two = estimate_cost(120.0, TrafficTarget(**kwargs, gpus_per_replica=2, tensor_parallel=2))
    assert one.replicas_needed == two.replicas_needed == math.ceil(300 / 120)
    assert two.gpus_needed == 2 * one.gpus_needed == 6
    assert two.usd_per_hour == pytest.approx(2 * one.usd_per_hour)
    assert two.usd_per_1m_output_tokens_at_capacity == pytest.approx(2 * one.usd_per_1m_output_tokens_at_capacity)
    assert "6 GPU(s), 2 per replica" in format_estimate(two) and "per replica" not in format_estimate(one)


def test_sizing_model_sees_the_degree():
    tiny = ModelConfig.from_name("tiny")
    target = TrafficTarget(requests_per_s=2, output_tokens_per_request=16, prompt_tokens_per_request=32,
                           gpus_per_replica=2, tensor_parallel=2)
    est = estimate_cost(80.0, target, model_config=tiny)
    model = est.model_estimate
    assert model["tensor_parallel"] == 2 and model["gpus_per_replica"] == 2
    assert model["decode_tokens_per_s_per_gpu"] == pytest.approx(40.0)  # the replica's rate over its 2 GPUs
    assert model["all_reduce_bytes_per_token_per_gpu"] == 2 * 4 * 192 * 2  # bf16: 2 per block x L x h x 2 B
    text = format_estimate(est)
    assert "tensor_parallel: 2" in text and "all_reduce_bytes_per_token_per_gpu: 3,072" in text
    # the interconnect the measured rate needs: 3072 B x 80 tokens/s per replica
    assert f"{3072 * 80 / 1e9:,.1f} GB/s at the decode rate" in text
    assert not any("H100-class" in note for note in model["notes"])  # the measured rate replaced the estimate


def test_target_and_flags_are_checked():
    with pytest.raises(ValueError, match="tensor_parallel"):
        TrafficTarget(tensor_parallel=0)
    with pytest.raises(ValueError, match="gpus_per_replica=1 is below tensor_parallel=2"):
        TrafficTarget(gpus_per_replica=1, tensor_parallel=2)
    with pytest.raises(ValueError, match="tensor_parallel"):
        serve_command("ckpt", 8000, tensor_parallel=0)


@pytest.mark.parametrize("argv, message", [
    (["--url", "http://127.0.0.1:9", "--tensor-parallel", "0"], "--tensor-parallel must be a positive integer"),
    (["--url", "http://127.0.0.1:9", "--tensor-parallel", "4", "--gpus-per-replica", "2"], "below --tensor-parallel"),
    (["--checkpoint", "ckpt", "--server-arg=--tensor-parallel=2"], "serve-bench's --tensor-parallel"),
    # the tiny preset's 2 kv heads do not split 3 ways: refused before the run, not when pricing after it
    (["--url", "http://127.0.0.1:9", "--tensor-parallel", "3", "--model-config", "tiny"],
     "--tensor-parallel 3: tensor_parallel=3 and num_key_value_heads=2"),
])
def test_cli_rejects_bad_degrees_before_any_request(capsys, argv, message):
    assert main(["serve-bench", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_spawned_server_gets_the_degree():
    plain = serve_command("runs/x/final", 8123, ["--device=cpu"])
    assert "--tensor-parallel" not in plain and plain[-1] == "--device=cpu"
    split = serve_command("runs/x/final", 8123, ["--device=cpu"], tensor_parallel=2)
    assert split[split.index("--tensor-parallel") + 1] == "2" and split[-1] == "--device=cpu"
    assert split[split.index("--port") + 1] == "8123" and split[split.index("--host") + 1] == "127.0.0.1"


def test_ctrl_c_while_the_spawned_server_loads_stops_it(monkeypatch):
    """Ctrl-C during `serve-bench --checkpoint` startup left `tritium serve` (and its ranks) running, orphaned."""
    import subprocess
    import sys

    from tritium.bench import serve_load

    started, real_popen = [], subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs))
        return started[-1]

    real_sleep, calls = serve_load.time.sleep, []

    def interrupt(seconds):  # the first wait for /ready is "interrupted"; later sleeps (Popen.wait) are real
        calls.append(seconds)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real_sleep(seconds)

    monkeypatch.setattr(serve_load.subprocess, "Popen", popen)
    monkeypatch.setattr(serve_load.time, "sleep", interrupt)
    with pytest.raises(KeyboardInterrupt):
        serve_load.spawn_server("ckpt", tensor_parallel=2)
    assert started and started[0].poll() is not None  # terminated, not left behind
