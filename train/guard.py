"""``python -m tritium.train.guard --parent PID [--grace S] -- COMMAND...``: run COMMAND, and take its whole
process group down if the launching ``tritium`` process dies -- even by ``kill -9``, which no handler sees.

``tritium.train.launch.spawn`` starts this guard as the leader of a new session; the launcher it runs
(the deepspeed runner -> per-node launcher -> ranks, or torchrun's agent) stays in that session's
process group.  The guard watches its parent (Linux: ``PR_SET_PDEATHSIG`` wakes it at once; everywhere:
``getppid()`` polled every 0.2 s).  When the parent is gone it sends SIGTERM to the group (launchers
clean up; a small model's ranks may even save a checkpoint) and SIGKILL after ``--grace`` seconds
(default 2): a parent killed with ``kill -9`` meant "stop now", and an interrupted save never damages
``latest``.
Ranks started in a session of their own (torchrun's workers) die with their launcher instead
(``tritium.train.launch.die_with_parent``, called at rank start).

Only the standard library is imported, so the guard costs no startup time.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

POLL_S = 0.2


def set_parent_death_signal(signum: int) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``).

    Returns False where that is unavailable (not Linux); callers then rely on polling ``getppid()``.
    The setting is per process and not inherited over fork, and it fires when the parent *thread*
    that forked us exits -- launchers start their children from the main thread.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        return libc.prctl(pr_set_pdeathsig, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _members(pgid: int) -> list[int] | None:
    """Live pids in process group ``pgid`` (from /proc; None where there is no /proc)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    pids = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
            if fields[0] != b"Z" and int(fields[2]) == pgid:  # state, ppid, pgrp
                pids.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return pids


def stop_group(pgid: int, grace_s: float) -> None:
    """SIGTERM process group ``pgid``, SIGKILL it if anything but the caller is left after ``grace_s`` s.

    The caller may be in the group: it ignores the SIGTERM, and the SIGKILL ends it too (it is exiting).
    """
    me = os.getpid()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        members = _members(pgid)
        if members is not None and not set(members) - {me}:
            return
        time.sleep(POLL_S)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tritium.train.guard")
    parser.add_argument("--parent", type=int, required=True, help="pid of the launching process to watch")
    parser.add_argument("--grace", type=float, default=2.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the launcher command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    parent_died = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: parent_died.append(signum))
    set_parent_death_signal(signal.SIGUSR1)
    if os.getppid() != args.parent:  # the parent died before we could watch it
        return 1
    child = subprocess.Popen(command)
    # SIGTERM/SIGINT reach the whole group from the parent (spawn forwards them): the launcher and the
    # ranks handle them; the guard keeps waiting for the launcher's exit code.  (Set after Popen: an
    # ignored disposition would be inherited through exec.)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    pgid = os.getpgid(0)
    while True:
        try:
            code = child.wait(timeout=POLL_S)
            return 128 - code if code < 0 else code
        except subprocess.TimeoutExpired:
            pass
        if parent_died or os.getppid() != args.parent:
            print(f"tritium: the launching process {args.parent} died; stopping its ranks", file=sys.stderr,
                  flush=True)
            stop_group(pgid, args.grace)
            return 1


if __name__ == "__main__":
    sys.exit(main())
