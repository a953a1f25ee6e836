"""`tritium train` end to end on 2 CPU ranks: loss falls, SIGTERM + resume == uninterrupted, damaged checkpoints.

One uninterrupted baseline run (deepspeed launcher, ZeRO-2, embedded corpus
with a tokenizer trained on the fly) is shared by the module; the other runs
reuse its prepared data so they differ from it only in how they were stopped
and restarted.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

STEPS = 12
COMMON = ["--preset", "tiny", "--seq-len", "64", "--micro-batch", "4", "--lr", "3e-3", "--warmup-steps", "2",
          "--max-steps", str(STEPS), "--log-interval", "1", "--no-progress", "--zero-stage", "2", "--seed", "5"]


def _env() -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env.pop("LOCAL_RANK", None)
    return env


def _tritium(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tritium.cli", "train", *args], env=_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if r.get("loss") is not None}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "base"
    proc = _tritium(*COMMON, "--nproc", "2", "--corpus-bytes", "200000", "--save-interval", "4", "--keep-last", "2",
                    "--eval-interval", "6", "--eval-steps", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_rank_pretraining_loss_falls_and_exports(baseline):
    from tritium.model.tokenizer import Tokenizer
    from tritium.model.transformer import Transformer

    config = json.loads((baseline / "config.json").read_text())
    assert config["world_size"] == 2, "the deepspeed launcher must start 2 ranks on CPU"
    assert config["deepspeed"]["zero_optimization"]["stage"] == 2
    records = [json.loads(line) for line in (baseline / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("loss") is not None]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for key in ("step", "loss", "lr", "tokens_per_s", "mfu", "grad_norm", "mem_gib"):
        assert all(r.get(key) is not None for r in train), key
    assert train[0]["peak_flops_source"].startswith(("cpu-isa-bound", "measured-cpu-matmul"))
    assert all(0 < r["mfu"] <= 1 for r in train)
    first, last = train[0]["loss"], sum(r["loss"] for r in train[-3:]) / 3
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert any("val_loss" in r and "val_ppl" in r for r in records)
    # keep-last-2 of the checkpoints at steps 4, 8, 12; latest points at 12
    tags = sorted(p.name for p in (baseline / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert tags == ["step_00000008", "step_00000012"]
    assert (baseline / "checkpoints" / "latest").read_text().strip() == "step_00000012"
    assert (baseline / "loss.png").stat().st_size > 0
    # final/ is a Hugging Face layout checkpoint the rest of tritium loads
    model = Transformer.from_pretrained(baseline / "final")
    tokenizer = Tokenizer.load(baseline / "final")
    assert tokenizer.fingerprint == Tokenizer.load(baseline / "tokenizer").fingerprint
    ids = torch.tensor([tokenizer.encode("def main():\n    return 0\n", bos=True)])
    loss = model(ids[:, :-1], labels=ids[:, 1:])
    assert torch.isfinite(loss) and loss.item() < first


@pytest.mark.slow
def test_sigterm_then_resume_equals_uninterrupted(baseline, tmp_path):
    out = tmp_path / "killed"
    data = ["--data", str(baseline / "data"), "--tokenizer", str(baseline / "tokenizer"), "--out", str(out),
            "--eval-interval", "0", "--save-interval", "100"]
    proc = subprocess.Popen([sys.executable, "-m", "tritium.cli", "train", *COMMON, "--nproc", "2", *data],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted:\n" + proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, output[-2000:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest.split("_")[1])
    assert 3 <= stopped_at < STEPS, output[-2000:]
    assert "stopped by SIGTERM" in output
    # resume through torchrun this time: every launcher ends in the same rank entry point
    resumed = _tritium(*COMMON, "--nproc", "2", *data, "--launcher", "torchrun", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    losses, expected = _losses(out), _losses(baseline)
    assert sorted(losses) == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor([losses[s] for s in range(1, STEPS + 1)]),
                               torch.tensor([expected[s] for s in range(1, STEPS + 1)]), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_damaged_checkpoint_is_a_clear_error_and_the_previous_one_loads(baseline, tmp_path):
    out = tmp_path / "damaged"
    shutil.copytree(baseline / "checkpoints", out / "checkpoints")
    args = [*COMMON, "--nproc", "2", "--data", str(baseline / "data"), "--tokenizer", str(baseline / "tokenizer"),
            "--out", str(out), "--eval-interval", "0", "--save-interval", "100"]
    # truncate one optimizer shard of the latest checkpoint
    shard = next((out / "checkpoints" / "step_00000012").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    start = time.monotonic()
    proc = _tritium(*args, "--resume")
    assert proc.returncode == 2
    assert "corrupt" in proc.stderr and "step_00000008" in proc.stderr, proc.stderr
    assert time.monotonic() - start < 60, "a damaged checkpoint must be reported before ranks are spawned"
    # an incomplete save (no manifest) and a missing checkpoint say so too
    (out / "checkpoints" / "step_00000012" / "manifest.json").unlink()
    proc = _tritium(*args, "--resume")
    assert proc.returncode == 2 and "incomplete" in proc.stderr, proc.stderr
    proc = _tritium(*args, "--resume", str(out / "checkpoints" / "step_00000099"))
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr, proc.stderr
    # the previous checkpoint still loads and continues exactly like the uninterrupted run
    proc = _tritium(*args, "--resume", str(out / "checkpoints" / "step_00000008"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses, expected = _losses(out), _losses(baseline)
    assert sorted(losses) == [9, 10, 11, 12]
    torch.testing.assert_close(torch.tensor([losses[s] for s in (9, 10, 11, 12)]),
                               torch.tensor([expected[s] for s in (9, 10, 11, 12)]), rtol=1e-4, atol=1e-4)
