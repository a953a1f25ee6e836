"""No process outlives the ``tritium`` that launched it, even after ``kill -9`` (issue 16, item 11).

``spawn`` runs the launcher under ``tritium.train.guard``, which watches its parent and takes the whole
process group down (SIGTERM, then SIGKILL after a grace period); ranks also ask Linux to kill them when
their launcher dies.  The fast tests use a stand-in launcher (one that obeys SIGTERM, one that ignores
it); the slow one kills the parent of a real 2-rank ``tritium train --nproc 2`` run.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            continue
    return alive


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _kill_parent_and_time_orphans(parent: subprocess.Popen, descendants: list[int], timeout: float) -> float:
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    start = time.monotonic()
    deadline = start + timeout
    while _alive(descendants) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _alive(descendants)
    for pid in left:  # never leave them behind, even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running {timeout} s after the parent died: {[psutil.Process(p).cmdline() for p in left]}"
    return time.monotonic() - start


@pytest.mark.parametrize("ignores_sigterm", [False, True])
def test_launcher_group_dies_with_its_parent(ignores_sigterm):
    child = ("import signal, time; "
             + ("signal.signal(signal.SIGTERM, signal.SIG_IGN); " if ignores_sigterm else "")
             + "time.sleep(600)")
    parent_code = ("import sys; from tritium.train.launch import spawn; "
                   f"sys.exit(spawn([sys.executable, '-c', {child!r}], orphan_grace_s=1.0))")
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    # guard + the stand-in launcher
    descendants = _wait_for(lambda: [p.pid for p in psutil.Process(parent.pid).children(recursive=True)]
                            if len(psutil.Process(parent.pid).children(recursive=True)) >= 2 else None,
                            60, "the guard and its launcher to start")
    time.sleep(0.5)  # let the stand-in install its SIGTERM handler
    elapsed = _kill_parent_and_time_orphans(parent, descendants, timeout=10)
    assert elapsed < (1.0 + 3.0 if ignores_sigterm else 3.0)


@pytest.mark.slow
def test_kill_9_of_tritium_train_leaves_no_rank(tmp_path, tiny_data_dir, tiny_tokenizer_dir):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    parent = subprocess.Popen(
        [sys.executable, "-m", "tritium.cli", "train", "--nproc", "2", "--data", str(tiny_data_dir), "--tokenizer",
         str(tiny_tokenizer_dir), "--preset", "tiny", "--model-override", "num_layers=1", "--seq-len", "32",
         "--micro-batch", "1", "--max-steps", "100000", "--log-interval", "1", "--eval-interval", "0",
         "--save-interval", "0", "--no-progress", "--backend", "torch", "--zero-stage", "0", "--out", str(out)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = Path(out) / "metrics.jsonl"
    try:
        _wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, 240, "the ranks to train")
        descendants = [p.pid for p in psutil.Process(parent.pid).children(recursive=True)]
        ranks = [p for p in descendants if "tritium.train" in " ".join(psutil.Process(p).cmdline())
                 and "guard" not in " ".join(psutil.Process(p).cmdline())]
        assert len(ranks) >= 2, [psutil.Process(p).cmdline() for p in descendants]
    except BaseException:
        for proc in psutil.Process(parent.pid).children(recursive=True):
            proc.kill()
        parent.kill()
        raise
    elapsed = _kill_parent_and_time_orphans(parent, descendants, timeout=15)  # 2 s grace + a loaded machine
    size = metrics.stat().st_size
    time.sleep(1.0)
    assert metrics.stat().st_size == size, "metrics.jsonl still growing: something is still training"
    print(f"all {len(descendants)} launched processes gone {elapsed:.1f} s after kill -9")
