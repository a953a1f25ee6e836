"""`tritium demo --quick`: the four stages end to end, as a newcomer's first command runs them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_quick_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    # As a user runs it: no interpreter override, kernels pick their CPU references.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tritium.cli", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    # Every stage ran as a printed, rerunnable command.
    for command in ("tritium describe --preset llama2-7b", "tritium tokenizer train", "tritium data prepare",
                    "tritium train --preset tiny --nproc 2", "tritium sft", "tritium dpo", "tritium grpo", "tritium align-eval",
                    "tritium generate", "tritium serve", "tritium serve-bench"):
        assert command in log, f"demo did not run `{command}`"
    assert "6,738,415,616" in log
    for stage in ("pretrain", "sft", "dpo", "grpo"):
        final = out / stage / "final"
        assert (final / "config.json").exists() and (final / "model.safetensors").exists()
        assert (final / "tokenizer.model").exists()
        losses = [json.loads(line)["loss"] for line in (out / stage / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)]
        assert losses, f"no losses logged for {stage}"
    records = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0], f"pretraining loss did not fall: {losses}"
    assert (out / "align-eval" / "table.md").exists()
    # the README's examples take `--checkpoint runs/demo/final`: the aligned model, under that name
    assert (out / "final").resolve() == (out / "dpo" / "final").resolve()
    assert (out / "final" / "model.safetensors").exists()
    exchanges = json.loads((out / "serve_exchanges.json").read_text())
    assert len(exchanges) == 3 and all(e["usage"]["completion_tokens"] > 0 for e in exchanges)
    assert json.loads((out / "serve_bench.json").read_text())
    report = (out / "report.md").read_text()
    assert "tritium train" in report and "Alignment before/after" in report
    # a second run into the same folder is refused, never mixed into the first
    again = subprocess.run([sys.executable, "-m", "tritium.cli", "demo", "--quick", "--out", str(out)],
                           capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 2 and "already holds a run" in again.stderr and "--overwrite" in again.stderr


def test_demo_writes_runs_demo_by_default():
    from tritium.cli import build_parser

    assert build_parser().parse_args(["demo"]).out == "runs/demo"
