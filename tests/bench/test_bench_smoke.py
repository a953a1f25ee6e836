"""A tiny pass of ``tritium bench`` on CPU: every file the report promises is
written, rows carry the environment, and CPU runs are labelled as such."""
import csv
import json
import subprocess
import sys


def test_bench_quick_cpu_writes_every_output(tmp_path):
    out = tmp_path / "bench"
    env_cmd = [sys.executable, "-m", "tritium.cli", "bench", "--quick", "--device", "cpu",
               "--filter", "rms_norm,swiglu,decode_attention", "--out", str(out)]
    # The bench runs the references on CPU; the interpreter would only slow it down.
    import os
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(env_cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((out / "results.json").read_text())
    assert data["device_kind"] == "cpu"
    assert data["ceilings"]["copy_gbps"] > 0 and data["ceilings"]["matmul_tflops"] > 0
    rows = data["rows"]
    cases = {r["case"] for r in rows}
    assert cases == {"rms_norm", "swiglu", "decode_attention"}
    timed = [r for r in rows if r["status"] == "ok"]
    assert timed, "no provider was timed"
    for r in timed:
        assert r["ms"] > 0 and r["throughput"] > 0
    # Triton providers are skipped on CPU with a reason, never presented as kernel speed.
    tritium_rows = [r for r in rows if r["provider"] == "tritium"]
    assert tritium_rows and all(r["status"] == "skipped" and "CUDA" in r["note"] for r in tritium_rows)
    with (out / "results.csv").open() as handle:
        csv_rows = list(csv.DictReader(handle))
    assert len(csv_rows) == len(rows) and {"device", "torch", "triton", "git_commit"} <= set(csv_rows[0])
    report = (out / "report.md").read_text()
    assert "CPU run" in report and "not kernel speed" in report
    assert list((out / "plots").glob("*.png")), "no plots written"
