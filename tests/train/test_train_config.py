"""TrainConfig validation, files and flags; the generated DeepSpeed config; schedules; param groups;
checkpoint verification; the launcher command.  All in-process and fast (no ranks are spawned)."""
from __future__ import annotations

import argparse
import json
import math
import time
import zipfile

import pytest
import torch

from tritium.train.config import TrainConfig, add_train_arguments


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser.parse_args(list(argv))


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize("changes, field", [
    (dict(zero_stage=5), "zero_stage"),
    (dict(precision="fp8"), "precision"),
    (dict(schedule="linear"), "schedule"),
    (dict(micro_batch=0), "micro_batch"),
    (dict(grad_accum=-1), "grad_accum"),
    (dict(lr=0.0), "lr"),
    (dict(offload="params", zero_stage=2), "offload"),
    (dict(offload="optimizer", zero_stage=0), "offload"),
    (dict(offload="optimizer", zero_stage=2, offload_device="nvme"), "nvme_path"),
    (dict(warmup_steps=50, max_steps=10), "warmup_steps"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio"),
    (dict(launcher="mpirun"), "launcher"),
    (dict(nnodes=2), "hostfile"),
    (dict(seq_len=True), "seq_len"),
])
def test_bad_fields_are_rejected_with_the_field_named(changes, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**changes)


def test_missing_paths_are_file_not_found(tmp_path):
    for changes in (dict(ds_config=str(tmp_path / "ds.json")), dict(data=[str(tmp_path / "nope.txt")]),
                    dict(init_from=str(tmp_path / "ckpt")), dict(hostfile=str(tmp_path / "hosts"))):
        with pytest.raises(FileNotFoundError):
            TrainConfig(**changes)


def test_batch_layout_divisibility():
    cfg = TrainConfig(global_batch=24, grad_accum=3)
    assert cfg.batch_layout(2) == (4, 3, 24)
    assert cfg.batch_layout(1) == (8, 3, 24)
    with pytest.raises(ValueError, match=r"global_batch=24 is not divisible by ranks \(5\) x grad_accum \(3\) = 15"):
        cfg.batch_layout(5)
    # without global_batch the global batch follows the ranks
    assert TrainConfig(micro_batch=3, grad_accum=2).batch_layout(4) == (3, 2, 24)
    assert TrainConfig(max_steps=100).warmup == 5 and TrainConfig(warmup_steps=0).warmup == 0


def test_yaml_json_and_flag_overrides(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("lr: 0.0005\nzero_stage: 3\nmodel:\n  num_layers: 2\nmax-steps: 40\n")
    cfg = TrainConfig.from_args(_parse("--config", str(yaml_file), "--lr", "1e-4", "--micro-batch", "2"))
    assert (cfg.lr, cfg.zero_stage, cfg.max_steps, cfg.micro_batch, cfg.model) == (1e-4, 3, 40, 2, {"num_layers": 2})
    json_file = tmp_path / "run.json"
    cfg.to_json(json_file)
    assert TrainConfig.from_file(json_file) == cfg
    # a run folder's config.json nests the train config under "train"
    (tmp_path / "config.json").write_text(json.dumps({"train": cfg.to_dict(), "model": {}}))
    assert TrainConfig.from_file(tmp_path / "config.json") == cfg
    (tmp_path / "bad.yaml").write_text("lr: 1\nlearning_rate: 2\n")
    with pytest.raises(ValueError, match="unknown field.*learning_rate"):
        TrainConfig.from_file(tmp_path / "bad.yaml")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not be parsed"):
        TrainConfig.from_file(tmp_path / "broken.json")
    assert TrainConfig.from_args(_parse("--resume")).resume == "latest"
    assert TrainConfig.from_args(_parse()).resume is None


def test_bad_configs_fail_before_any_work(tmp_path, capsys):
    """The CLI rejects a bad layout in well under the time it takes to import deepspeed or spawn a rank."""
    from tritium.cli import main

    out = tmp_path / "run"
    start = time.monotonic()
    assert main(["train", "--nproc", "3", "--global-batch", "8", "--out", str(out)]) == 2
    assert "global_batch=8 is not divisible by ranks (3)" in capsys.readouterr().err
    assert main(["train", "--zero-stage", "4", "--out", str(out)]) == 2
    assert "zero_stage" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(out)]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert time.monotonic() - start < 10
    assert not out.exists(), "nothing may be written for a config that cannot run"


# ---------------------------------------------------------------------------- DeepSpeed config
def test_ds_config_per_stage_offload_and_precision(tmp_path):
    from tritium.train.engine import build_ds_config

    ds = build_ds_config(TrainConfig(micro_batch=4, grad_accum=2, zero_stage=1, grad_clip=0.5), 2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 4, 2)
    assert ds["zero_optimization"]["stage"] == 1 and ds["gradient_clipping"] == 0.5
    assert "optimizer" not in ds  # the client AdamW (param groups) is used
    ds3 = build_ds_config(TrainConfig(zero_stage=3, offload="all", precision="bf16"), 1)
    zero = ds3["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds3["bf16"]["enabled"] and not ds3["fp16"]["enabled"]
    if torch.cuda.is_available():
        assert ds3["optimizer"]["type"] == "AdamW"  # ZeRO-Offload steps on the CPU with DeepSpeed's CPU Adam
    else:
        assert "optimizer" not in ds3 and ds3["zero_force_ds_cpu_optimizer"] is False
    nvme = build_ds_config(TrainConfig(zero_stage=3, offload="params", offload_device="nvme",
                                       nvme_path=str(tmp_path)), 1)
    assert nvme["zero_optimization"]["offload_param"] == {"device": "nvme", "pin_memory": torch.cuda.is_available(),
                                                          "nvme_path": str(tmp_path)}
    fp16 = build_ds_config(TrainConfig(precision="fp16", grad_clip=0.0), 1)
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    # grad_clip=0 is explicit: DeepSpeed would otherwise clip at its default 1.0
    assert fp16["gradient_clipping"] == 0.0
    # the user's ds_config is merged on top, key by key
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123}, "steps_per_print": 7}))
    merged = build_ds_config(TrainConfig(zero_stage=2, ds_config=str(user)), 1)
    assert merged["zero_optimization"]["reduce_bucket_size"] == 123 and merged["zero_optimization"]["stage"] == 2
    assert merged["steps_per_print"] == 7
    user.write_text(json.dumps({"train_batch_size": 999}))
    with pytest.raises(ValueError, match="train_batch_size=999"):
        build_ds_config(TrainConfig(ds_config=str(user)), 1)


def test_lr_schedules():
    from tritium.train.engine import lr_lambda

    cfg = TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:])), "cosine decays monotonically"
    wsd = lr_lambda(TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2))
    assert wsd(50) == 1.0 and wsd(79) == 1.0 and wsd(89) == pytest.approx(0.5) and wsd(99) == pytest.approx(0.0)
    const = lr_lambda(TrainConfig(max_steps=10, warmup_steps=0, schedule="constant"))
    assert [const(s) for s in range(10)] == [1.0] * 10


def test_weight_decay_only_on_matrices():
    from tritium.model.config import ModelConfig
    from tritium.model.transformer import Transformer
    from tritium.train.engine import param_groups

    model = Transformer(ModelConfig.from_name("tiny", num_layers=1, vocab_size=300))
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in groups["decay"]["params"])
    assert all(p.dim() == 1 for p in groups["no_decay"]["params"])
    total = sum(p.numel() for g in groups.values() for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())  # tied head counted once


# ---------------------------------------------------------------------------- checkpoints
def _fake_checkpoint(directory, step, payload=b"x" * 100):
    from tritium.train.checkpoints import MANIFEST, tag_for_step

    tag = directory / tag_for_step(step)
    tag.mkdir(parents=True)
    with zipfile.ZipFile(tag / "model_states.pt", "w") as archive:
        archive.writestr("data.pkl", payload)
    files = {"model_states.pt": (tag / "model_states.pt").stat().st_size}
    (tag / MANIFEST).write_text(json.dumps({"step": step, "world_size": 1, "files": files}))
    (directory / "latest").write_text(tag.name)
    return tag


def test_checkpoint_verification_names_the_problem_and_the_fallback(tmp_path):
    from tritium.train.checkpoints import (
        CheckpointError,
        list_checkpoints,
        resolve_checkpoint,
        verify_checkpoint,
    )

    ckpts = tmp_path / "checkpoints"
    first = _fake_checkpoint(ckpts, 4)
    second = _fake_checkpoint(ckpts, 8, payload=bytes(range(256)) * 4)
    assert resolve_checkpoint("latest", ckpts) == second
    assert resolve_checkpoint(tmp_path) == second  # a run folder
    assert resolve_checkpoint(first) == first
    assert verify_checkpoint(second)["step"] == 8
    # flip bytes inside the stored member: same size, so only the CRC check sees it
    data = bytearray((second / "model_states.pt").read_bytes())
    data[60] ^= 0xFF
    (second / "model_states.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt.*step_00000004"):
        verify_checkpoint(second)
    (second / "model_states.pt").write_bytes(bytes(data[:50]))
    with pytest.raises(CheckpointError, match="has 50 bytes"):
        verify_checkpoint(second)
    (second / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        verify_checkpoint(second)
    assert list_checkpoints(ckpts) == [first]
    # debris of a save that crashed before its rename is never taken for a checkpoint
    (ckpts / "tmp-step_00000012").mkdir()
    (ckpts / "latest").write_text(first.name)
    assert list_checkpoints(ckpts) == [first] and resolve_checkpoint("latest", ckpts) == first
    assert verify_checkpoint(first)["step"] == 4
    with pytest.raises(CheckpointError, match="nothing to resume"):
        resolve_checkpoint("latest", tmp_path / "elsewhere")


# ---------------------------------------------------------------------------- launching
def test_launcher_commands_and_hostfile(tmp_path):
    from tritium.train.launch import hostfile_slots, launcher_command, planned_world_size

    cfg = TrainConfig(nproc=2)
    command = launcher_command(cfg, ["--config", "x.json"])
    assert "--num_gpus=2" in command and command[-4:] == ["--module", "tritium.train", "--config", "x.json"]
    torchrun = launcher_command(TrainConfig(nproc=4, launcher="torchrun"), ["--lr", "1"])
    assert "--nproc_per_node=4" in torchrun and torchrun[-4:] == ["-m", "tritium.train", "--lr", "1"]
    hosts = tmp_path / "hostfile"
    hosts.write_text("# two nodes\nworker-1 slots=8\nworker-2 slots=8\n")
    assert hostfile_slots(hosts) == {"worker-1": 8, "worker-2": 8}
    multi = TrainConfig(nproc=8, nnodes=2, hostfile=str(hosts))
    assert planned_world_size(multi) == 16
    command = launcher_command(multi, [])
    assert f"--hostfile={hosts}" in command and "--num_nodes=2" in command
    hosts.write_text("worker-1 gpus=8\n")
    with pytest.raises(ValueError, match="slots=N"):
        hostfile_slots(hosts)


def test_peak_flops_and_plot(tmp_path):
    from tritium.train.metrics import device_peak_flops, plot_loss

    peak, source = device_peak_flops("fp32")
    assert math.isfinite(peak) and peak > 1e8
    assert source in ("measured-cpu-matmul",) or source.startswith(("cpu-isa-bound", "datasheet", "unknown"))
    assert device_peak_flops("bf16", override=1e15) == (1e15, "user")
    if source.startswith("cpu-isa-bound"):  # the bound is never below what the cores measurably do
        from tritium.train.metrics import measure_cpu_matmul_flops

        assert peak >= measure_cpu_matmul_flops()

    records = [{"step": s, "loss": 5.0 / s} for s in range(1, 6)] + [{"step": 5, "val_loss": 1.5}]
    assert plot_loss(records, tmp_path / "loss.png").stat().st_size > 1000


def test_mfu_above_100_percent_is_never_reported():
    from tritium.train.metrics import model_flops_utilization

    assert model_flops_utilization(5e10, 1e11) == (0.5, None)
    mfu, why = model_flops_utilization(1.57e11, 1e11)
    assert mfu is None and "above 100%" in why and "--peak-flops" in why
    assert model_flops_utilization(5e10, float("nan"))[0] is None
