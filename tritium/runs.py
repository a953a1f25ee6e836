"""Run folders: one run per ``--out`` folder, never two silently mixed.

A second run into the same folder would append to its ``metrics.jsonl``,
draw one loss curve over both runs and overwrite its checkpoints.  So every
command that writes a run folder (train, sft, dpo, align-eval, demo) calls
``claim_run_folder`` first: an existing, non-empty folder is refused unless
the user continues it (``--resume``) or replaces it (``--overwrite``).
"""
from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

# What tritium writes into a run folder; --overwrite deletes only a folder holding at least one of these.
RUN_MARKERS = ("config.json", "metrics.jsonl", "launch_config.json", "checkpoints", "final", "report.md",
               "align_eval.json", "reference_logps.pt", "pretrain", "tokenizer", "data")


def claim_run_folder(out: str | Path, *, resume: bool = False, overwrite: bool = False,
                     inputs: Iterable[str | Path | None] = (), resumable: bool = True) -> Path:
    """Check (and with ``overwrite``, empty) the run folder ``out`` before a command writes into it.

    Raises FileExistsError when ``out`` already holds files and neither ``resume`` nor ``overwrite`` is
    set; ValueError when ``overwrite`` would delete something that does not look like a run folder or
    that holds one of the command's own ``inputs``.  Returns ``out`` as a Path (not created here).
    """
    out = Path(out)
    if resume or not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return out
    if not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a run folder")
    if not overwrite:
        choices = "--resume to continue it, --overwrite to replace it," if resumable else "--overwrite to replace it"
        raise FileExistsError(f"--out {out} already holds a run; pass {choices} or choose another --out "
                              "(runs are never mixed in one folder)")
    if not any((out / marker).exists() for marker in RUN_MARKERS):
        raise ValueError(f"--overwrite: {out} does not look like a tritium run folder (none of "
                         f"{', '.join(RUN_MARKERS)}); delete it yourself or choose another --out")
    resolved = out.resolve()
    for item in inputs:
        if item and (resolved == Path(item).resolve() or resolved in Path(item).resolve().parents):
            raise ValueError(f"--overwrite would delete {item}, an input of this run inside --out {out}; "
                             "choose another --out")
    shutil.rmtree(out)
    return out
