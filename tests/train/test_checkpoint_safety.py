"""Training checkpoints never run code, and a failed write ends cleanly (issue 16, items 8 and 10).

* Item 8: a ``mp_rank_00_model_states.pt`` replaced by a pickle whose ``__reduce__`` writes a file (its
  manifest size updated, so only the content gives it away) is refused on resume with a clear
  ``CheckpointError`` -- DeepSpeed's own loader asks for ``weights_only=False`` -- and the payload
  never runs; real ZeRO checkpoints still load (the allow-list holds what they need).
* Item 10: ``OSError(ENOSPC)`` injected into the checkpoint writer gives one ``WriteError`` line
  naming the file and "No space left on device"; ``latest`` and the last complete checkpoint stay
  intact and loadable.  The command-line run (``tritium train``) prints exactly one error line, no
  traceback, and exits 1.

The DeepSpeed work runs in one spawned process (importing deepspeed costs seconds).
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tritium.net import free_port

MODEL = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, ffn_hidden=48, vocab_size=64,
             max_seq_len=16)


class _Payload:
    """Unpickling this runs ``exec``: it writes ``marker`` (what a malicious checkpoint would do)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class _FullFile:
    """A file on a disk that fills up: after ``room`` bytes one write raises ENOSPC, as the kernel would.

    Later writes succeed again (a few bytes freed elsewhere), which is what makes torch's zip writer
    fail a second time while closing (``unexpected pos``) and hide the OSError behind a RuntimeError.
    """

    def __init__(self, path, room: int = 4096) -> None:
        self.name, self.room, self.failed = str(path), room, False

    def write(self, data) -> int:
        if not self.failed and len(data) > self.room:
            self.failed = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room = max(self.room - len(data), 0)
        return len(data)

    def flush(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def full_disk_open(real_open, fail_when: str):
    """``open`` that hands out a full-disk file for writes to paths containing ``fail_when``."""
    def fake_open(path, mode="r", *args, **kwargs):
        if fail_when in str(path) and any(flag in mode for flag in "wa"):
            return _FullFile(path)
        return real_open(path, mode, *args, **kwargs)
    return fake_open


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import builtins

    from tritium.train import checkpoints
    from tritium.train.checkpoints import Checkpointer, CheckpointError, WriteError, verify_checkpoint
    from tritium.train.config import TrainConfig
    from tritium.train.engine import build_engine, init_distributed, resolve_model_config

    cfg = TrainConfig(preset="tiny", model=MODEL, backend="torch", seq_len=8, micro_batch=1, grad_accum=1,
                      max_steps=3, zero_stage=1, precision="fp32", out=out_dir, progress=False, export=False)
    init_distributed(cfg)
    engine = build_engine(cfg, resolve_model_config(cfg), world_size=1)
    ids = torch.randint(0, MODEL["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(0))

    def train_step():
        engine.backward(engine(ids[:, :-1], labels=ids[:, 1:]))
        engine.step()

    ckpt = Checkpointer(Path(out_dir) / "checkpoints")
    train_step()
    good = ckpt.save(engine, 1, {"loop": {"step": 1}}, {"micro_step": 1})
    weights = {k: v.clone() for k, v in engine.module.state_dict().items()}

    # ---- item 10: the disk fills up during the next save
    train_step()
    checkpoints.open = full_disk_open(builtins.open, "step_00000002")
    try:
        ckpt.save(engine, 2, {"loop": {"step": 2}}, {"micro_step": 2})
        raise AssertionError("a save onto a full disk must raise")
    except WriteError as exc:
        message = str(exc)
        assert "\n" not in message and "No space left on device" in message, message
        assert "tmp-step_00000002" in message and "model_states.pt" in message, message
        assert exc.primary
    finally:
        del checkpoints.open
    assert (ckpt.directory / "latest").read_text().strip() == "step_00000001"
    assert not (ckpt.directory / "tmp-step_00000002").exists()  # the partial save is cleaned up
    verify_checkpoint(good)
    restored = ckpt.load(engine, "latest")  # weights-only load of a real ZeRO-1 checkpoint works
    assert restored["loop"]["step"] == 1 and restored["micro_step"] == 1
    for key, value in engine.module.state_dict().items():
        assert torch.equal(value, weights[key]), key

    # ---- item 8: the model states replaced by a payload, the manifest's size updated to match
    target = good / "mp_rank_00_model_states.pt"
    marker = Path(out_dir) / "pwned.txt"
    torch.save({"module": _Payload(str(marker))}, target)
    manifest = json.loads((good / "manifest.json").read_text())
    manifest["files"]["mp_rank_00_model_states.pt"] = target.stat().st_size
    (good / "manifest.json").write_text(json.dumps(manifest))
    try:
        ckpt.load(engine, good)
        raise AssertionError("a checkpoint holding code must be refused")
    except CheckpointError as exc:
        message = str(exc)
        assert "refused" in message and "exec" in message and target.name in message, message
        assert "\n" not in message
    assert not marker.exists(), "the payload ran"
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # the switch is scoped to the load

    import torch.distributed as dist

    dist.destroy_process_group()



@pytest.mark.slow
def test_malicious_checkpoint_refused_and_full_disk_keeps_last_checkpoint(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=1, join=True, start_method="spawn")


def test_write_error_names_path_and_reason():
    from tritium.train.checkpoints import WriteError, write_error, writing

    error = write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/run/x.pt"), "/run", "checkpoint")
    assert str(error) == "cannot write checkpoint /run/x.pt: No space left on device"
    # safetensors wraps the OS error in its own type (its message on a full tmpfs, safetensors 0.8)
    wrapped = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert str(write_error(wrapped, "/run/final", "export")) == "cannot write export /run/final: No space left on device"
    with pytest.raises(WriteError, match=r"^cannot write log /run/metrics.jsonl: No space left on device$"):
        with writing("/run/metrics.jsonl", "log"), _FullFile("/run/metrics.jsonl", room=0) as handle:
            handle.write("x")
    # torch.save on a filling disk: the OSError is the context of the RuntimeError that escapes
    with pytest.raises(RuntimeError) as info:
        torch.save({"w": torch.zeros(10_000)}, _FullFile("/run/x.pt"))
    assert str(write_error(info.value, "/run/x.pt", "checkpoint")) == ("cannot write checkpoint /run/x.pt: "
                                                                        "No space left on device")


def test_export_onto_a_full_disk_is_a_write_error(tmp_path, monkeypatch):
    """export_final (one process): safetensors' own error type still ends as one WriteError line."""
    from types import SimpleNamespace

    import tritium.model.checkpoint as model_checkpoint
    from tritium.model.config import ModelConfig
    from tritium.model.transformer import Transformer
    from tritium.train.checkpoints import WriteError, export_final

    def full(*args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(model_checkpoint, "save_file", full)  # safetensors' writer, as the exporter calls it
    model = Transformer(ModelConfig(**MODEL), backend="torch")
    engine = SimpleNamespace(module=model, zero_optimization_partition_weights=lambda: False)
    with pytest.raises(WriteError, match=r"^cannot write export .*final: No space left on device$"):
        export_final(engine, tmp_path / "final")
    assert not (tmp_path / "final").exists()  # the temporary folder is gone, nothing half-written


@pytest.mark.slow
def test_cli_full_disk_is_one_line_and_exit_1(tmp_path, tiny_data_dir, tiny_tokenizer_dir):
    """``tritium train`` with the disk filling up at the second checkpoint (one process)."""
    out = tmp_path / "run"
    script = (
        "import builtins, sys\n"
        "from tritium.train import checkpoints\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_checkpoint_safety import full_disk_open\n"
        "checkpoints.open = full_disk_open(builtins.open, 'step_00000004')\n"
        "from tritium.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    args = ["train", "--data", str(tiny_data_dir), "--tokenizer", str(tiny_tokenizer_dir), "--preset", "tiny",
            "--model-override", "num_layers=1", "--seq-len", "32", "--micro-batch", "2", "--max-steps", "6", "--save-interval", "2", "--log-interval", "2",
            "--eval-interval", "0", "--no-progress", "--backend", "torch", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1, errors
    assert "No space left on device" in errors[0] and "tmp-step_00000004" in errors[0], errors[0]
    from tritium.train.checkpoints import verify_checkpoint

    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000002"
    verify_checkpoint(checkpoints / "step_00000002")
    assert not (checkpoints / "tmp-step_00000004").exists()
