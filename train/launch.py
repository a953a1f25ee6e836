"""Spawning ranks: ``tritium train --nproc N`` runs the deepspeed launcher (or torchrun) for you.

Every way of launching ends in the same rank entry point, ``python -m
tritium.train`` (``train/__main__.py``):

    tritium train --nproc 2 ...                          -> deepspeed --num_gpus 2 --module tritium.train ...
    deepspeed --num_gpus 2 --module tritium.train ...    (the launcher sets RANK/LOCAL_RANK/WORLD_SIZE)
    torchrun --nproc_per_node 2 -m tritium.train ...     (same variables)
    deepspeed --hostfile hosts --num_nodes 2 --num_gpus 8 --module tritium.train ...   (multi-node, via ssh/pdsh)

Without CUDA the children get ``DS_ACCELERATOR=cpu`` and talk over gloo, so a
2-rank ZeRO run is a real test on a laptop.  The deepspeed launcher sets
``CUDA_VISIBLE_DEVICES`` and counts GPUs it cannot see on a CPU machine; it
still starts ``--num_gpus`` processes there, which is what we rely on.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tritium.net import free_port
from tritium.train.config import TrainConfig

RANK_MODULE = "tritium.train"


def in_launcher() -> bool:
    """True inside a rank started by deepspeed/torchrun/mpirun (never spawn again from there)."""
    from tritium.train.engine import SINGLE_PROCESS_MARKER

    if os.environ.get(SINGLE_PROCESS_MARKER):  # a 1-rank world this process made for itself
        return False
    return "LOCAL_RANK" in os.environ or "OMPI_COMM_WORLD_LOCAL_RANK" in os.environ


def hostfile_slots(path: str | Path) -> dict[str, int]:
    """``host slots=N`` lines of a DeepSpeed hostfile (comments and blank lines skipped)."""
    slots: dict[str, int] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        try:
            count = int(parts[1].split("=", 1)[1]) if len(parts) > 1 and parts[1].startswith("slots=") else None
        except ValueError:
            count = None
        if count is None or count < 1:
            raise ValueError(f"hostfile {path}:{number}: expected 'hostname slots=N', got {line!r}")
        slots[parts[0]] = count
    if not slots:
        raise ValueError(f"hostfile {path} lists no hosts")
    return slots


def planned_world_size(cfg: TrainConfig) -> int:
    """Ranks the launch will start (for validating the batch layout before spawning anything)."""
    if cfg.hostfile and cfg.nnodes > 1:
        hosts = list(hostfile_slots(cfg.hostfile).values())[: cfg.nnodes]
        if len(hosts) < cfg.nnodes:
            raise ValueError(f"--nnodes {cfg.nnodes} but hostfile {cfg.hostfile} lists {len(hosts)} host(s)")
        return sum(min(slots, cfg.nproc) for slots in hosts)
    return cfg.nproc * cfg.nnodes


def _deepspeed_runner() -> list[str]:
    script = Path(sys.executable).with_name("deepspeed")
    if script.is_file():
        return [sys.executable, str(script)]
    found = shutil.which("deepspeed")
    if found:
        return [found]
    return [sys.executable, "-c", "from deepspeed.launcher.runner import main; main()"]


def launcher_command(cfg: TrainConfig, rank_args: list[str], module: str = RANK_MODULE) -> list[str]:
    """The command that starts cfg's ranks running ``python -m module rank_args``."""
    if cfg.launcher == "torchrun":
        if cfg.nnodes > 1:
            raise ValueError("--launcher torchrun with --nnodes > 1: run torchrun on every node yourself "
                             "(see the README's multi-node section) or use --launcher deepspeed with --hostfile")
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}",
                "-m", module, *rank_args]
    command = [*_deepspeed_runner(), f"--master_port={free_port()}"]
    if cfg.hostfile:
        command += [f"--hostfile={cfg.hostfile}", f"--num_nodes={cfg.nnodes}"]
    command += [f"--num_gpus={cfg.nproc}", "--module", module, *rank_args]
    return command


def child_environment() -> dict[str, str]:
    from tritium.train.engine import SINGLE_PROCESS_MARKER, SINGLE_PROCESS_VARS

    env = dict(os.environ)
    if env.get(SINGLE_PROCESS_MARKER):  # never hand our own 1-rank world to the ranks we launch
        for name in SINGLE_PROCESS_VARS:
            env.pop(name, None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:  # pragma: no cover
        pass
    return env


def die_with_parent() -> None:
    """In a rank: be SIGKILLed when the launcher that started us dies (Linux ``PR_SET_PDEATHSIG``).

    A rank whose launcher is gone has nobody to report to and would train on alone (writing
    metrics.jsonl, holding devices).  The launchers stay alive while their ranks stop cleanly after a
    SIGTERM (deepspeed's launch.py and torchrun wait up to 30 s), so this never cuts a checkpoint short.
    """
    from tritium.train.guard import set_parent_death_signal

    if set_parent_death_signal(signal.SIGKILL) and os.getppid() == 1:  # the launcher died before we asked
        os._exit(1)


def guarded(command: list[str], grace_s: float = 2.0) -> list[str]:
    """``command`` run under ``tritium.train.guard``, which stops its process group if this process dies."""
    return [sys.executable, "-m", "tritium.train.guard", "--parent", str(os.getpid()), "--grace", str(grace_s),
            "--", *command]


def spawn(command: list[str], env: dict[str, str] | None = None, grace_s: float = 300.0,
          orphan_grace_s: float = 2.0) -> int:
    """Run the launcher in its own process group; on SIGTERM/SIGINT signal the whole group and wait for it.

    The single-node deepspeed runner does not forward signals (it just dies,
    leaving the ranks running), so the signal goes to every process of the
    group -- runner, per-node launcher and ranks -- and we wait until the ranks
    have saved their checkpoint and exited (at most ``grace_s`` seconds).

    If this process dies without a chance to forward anything (``kill -9``, OOM killer), the guard
    that leads the group (``tritium.train.guard``) SIGTERMs it, and SIGKILLs it ``orphan_grace_s``
    seconds later; ranks die with their launcher (``die_with_parent``).  Nothing outlives us.
    """
    process = subprocess.Popen(guarded(command, orphan_grace_s), env=env or child_environment(),
                               start_new_session=True)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = process.wait()
        if received:
            _wait_for_group(process.pid, grace_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code < 0:  # killed by a signal: the shell convention
        code = 128 - code
    return code


def _group_alive(pgid: int) -> bool:
    import psutil

    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return False


def _wait_for_group(pgid: int, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.2)
