"""DeepSpeed checkpoints that survive crashes, and the final Hugging Face export.

Layout under ``RUN/checkpoints/``::

    step_00000100/          one DeepSpeed tag: model, optimizer, scheduler states (per rank)
        rank_00000_state.pt    data position + RNG states of rank 0 (one per rank)
        manifest.json          written last: step, world size, every file with its size
    step_00000200/
    latest                  text file naming the newest complete tag

A save goes into ``tmp-step_...`` first; only after every rank has written
its files does rank 0 write the manifest, rename the directory into place and
replace ``latest`` (``os.replace`` is atomic), so a crash at any moment
leaves the previous ``latest`` whole.  Loading checks the manifest (present,
sizes, zip directories intact) on every rank and agrees across ranks before
DeepSpeed touches the files, so a damaged checkpoint is a clear error naming
the earlier ones that still load -- never a hang or a half-restored model.
Assumes the checkpoint directory is on a filesystem every node sees (as
DeepSpeed's own ``latest`` does).

Nothing is unpickled with code: DeepSpeed's own loader calls ``torch.load(weights_only=False)``, so
every load here runs under ``weights_only_loads()`` -- PyTorch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``
switch plus an allow-list of exactly the non-tensor types DeepSpeed's checkpoints hold
(``DEEPSPEED_SAFE_GLOBALS``); a file holding anything else (a replaced ``*_model_states.pt`` whose
``__reduce__`` runs code) is refused with a ``CheckpointError`` before any of it runs.

Write failures (disk full, permissions, quota) become ``WriteError``: one line naming the file and the OS
reason.  The ranks agree on it before raising, so exactly one rank (the lowest that failed) reports it,
every rank exits non-zero, and ``latest`` still names the last complete checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
LATEST = "latest"
TAG_PREFIX = "step_"
TMP_PREFIX = "tmp-"
# CRC-check every byte of checkpoints up to this size at load; bigger ones get the cheap checks only.
FULL_VERIFY_BYTES = 1 << 30


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupt (a user-facing error: one line, exit 2)."""


class WriteError(OSError):
    """Writing a checkpoint, an export or a log failed; ``str()`` is one line naming the path and the OS reason.

    ``primary`` is False on ranks that stop only because another rank failed: they exit non-zero silently,
    so a run reports the failure once.
    """

    def __init__(self, message: str, *, primary: bool = True, errno_: int | None = None):
        super().__init__(errno_, message)
        self.message, self.primary = message, primary

    def __str__(self) -> str:
        return self.message


def write_error(exc: BaseException, path: str | Path, what: str = "") -> WriteError:
    """``exc`` (an OSError, or torch's zip-writer RuntimeError) as a one-line WriteError naming ``path``."""
    if isinstance(exc, WriteError):
        return exc
    exc = os_error_in(exc) or exc
    code = getattr(exc, "errno", None) or _os_error_code(exc)
    reason = os.strerror(code) if isinstance(code, int) and code else getattr(exc, "strerror", None) or str(exc)
    label = f"{what} " if what else ""
    return WriteError(f"cannot write {label}{getattr(exc, 'filename', None) or path}: {reason}", errno_=code)


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, or one in its ``__cause__``/``__context__`` chain.

    torch.save hits the full disk inside its zip writer, then fails again while closing the archive
    (``RuntimeError: ... unexpected pos``), which hides the OSError as the context of the second error.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _os_error_code(exc: BaseException) -> int | None:
    """The errno inside a non-OSError that wraps one (safetensors: ``I/O error: ... (os error 28)``)."""
    found = re.search(r"os error (\d+)|Os \{ code: (\d+)", str(exc))
    return int(found.group(1) or found.group(2)) if found else None


@contextlib.contextmanager
def writing(path: str | Path, what: str = "") -> Iterator[None]:
    """Turn an OSError raised while writing ``path`` into a one-line ``WriteError``."""
    try:
        yield
    except Exception as exc:
        cause = os_error_in(exc)
        if cause is None:
            raise
        raise write_error(cause, path, what) from exc


def agree_on_writes(error: WriteError | None, what: str) -> None:
    """Collective: raise on every rank if any rank failed to write (the lowest failing rank is primary)."""
    dist = _dist()
    if dist is None:
        if error is not None:
            raise error
        return
    world = dist.get_world_size()
    failed = torch.tensor([dist.get_rank() if error is not None else world], dtype=torch.int64)
    dist.all_reduce(failed, op=dist.ReduceOp.MIN)
    first = int(failed.item())
    if first == world:
        return
    if error is not None and first == dist.get_rank():
        raise error
    raise WriteError(f"{what}: rank {first} could not write (see its error)", primary=False)


def report_write_error(prog: str, exc: WriteError) -> int:
    """Print ``exc`` as the one line of a failed run (only where it happened) and return exit code 1."""
    import sys

    if exc.primary:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
    return 1


# ---------------------------------------------------------------------------- safe DeepSpeed I/O
def deepspeed_safe_globals() -> list[Any]:
    """The non-tensor types DeepSpeed checkpoints hold, and nothing else.

    Found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` over ZeRO 0-3 checkpoints
    (fp32, bf16, offload) of this DeepSpeed: the loss scalers, the ZeRO stage enum and the
    fragment addresses of flat optimizer partitions.  Plain containers, dtypes and tensors are
    allowed by ``weights_only`` already.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside runs with ``weights_only=True`` (whatever the caller passes) and may only
    rebuild tensors, plain containers and ``deepspeed_safe_globals()``."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"  # PyTorch's own switch: overrides weights_only=False
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def _refused(path: str | Path, exc: Exception) -> CheckpointError:
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    what = f"the global {found.group(1)}" if found else "an object"
    return CheckpointError(f"refused to load {path}: it holds {what}, which is neither a tensor nor a type "
                           "DeepSpeed checkpoints hold (loaded with weights_only=True; nothing in it ran). "
                           "The file was replaced or is not a tritium/DeepSpeed checkpoint")


def _install_safe_checkpoint_engine(engine) -> None:
    """Give ``engine`` a checkpoint engine that loads weights-only and writes through Python files.

    Writing through a Python file object (not a path) keeps the OS error number: torch's own writer
    reports a full disk as an opaque ``PytorchStreamWriter failed writing file``.  A failed write is
    remembered instead of raised, so DeepSpeed's save finishes its collectives on every rank and the
    ranks can agree on the failure afterwards (``agree_on_writes``) instead of one of them hanging.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = getattr(engine, "checkpoint_engine", None)
    if isinstance(current, _SafeCheckpointEngine) or type(current) is not TorchCheckpointEngine:
        return  # already ours, or an engine the user configured (its loads still run under weights_only_loads)

    safe = _SafeCheckpointEngine(current)
    engine.checkpoint_engine = safe
    copy_script = getattr(engine, "_copy_recovery_script", None)
    if copy_script is not None:  # rank 0 copies zero_to_fp32.py with shutil: a full disk must not raise mid-save
        def copy_recovery_script(save_path, copy_script=copy_script):
            try:
                copy_script(save_path)
            except OSError as exc:
                safe.failure = safe.failure or write_error(exc, save_path, "checkpoint")

        engine._copy_recovery_script = copy_recovery_script


class _SafeCheckpointEngine:
    """Wraps DeepSpeed's TorchCheckpointEngine: weights-only loads, errno-preserving saves."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.failure: WriteError | None = None

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def save(self, state_dict, path: str) -> None:
        if self.failure is not None:
            return
        try:
            with open(path, "wb") as handle:
                torch.save(state_dict, handle)
        except Exception as exc:  # noqa: BLE001 - the disk-full OSError may hide behind torch's RuntimeError
            cause = os_error_in(exc)
            if cause is None:
                raise
            self.failure = write_error(cause, path, "checkpoint")

    def makedirs(self, path, exist_ok: bool = False) -> None:
        try:
            os.makedirs(path, exist_ok=exist_ok)
        except OSError as exc:
            if self.failure is None:
                self.failure = write_error(exc, path, "checkpoint")

    def load(self, path: str, map_location=None):
        try:
            with weights_only_loads():
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise _refused(path, exc) from None

    def take_failure(self) -> WriteError | None:
        failure, self.failure = self.failure, None
        return failure


def tag_for_step(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


# ---------------------------------------------------------------------------- RNG and data position
def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        # Plain ints, floats and tensors only, so the file loads with torch.load(weights_only=True).
        state["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        saved = state["numpy"]
        np.random.set_state((saved["name"], saved["keys"].numpy().astype(np.uint32), saved["pos"],
                             saved["has_gauss"], saved["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


def _rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


def _all_ok(ok: bool) -> bool:
    """True only if ``ok`` on every rank (so all ranks raise together instead of one hanging)."""
    dist = _dist()
    if dist is None:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


# ---------------------------------------------------------------------------- finding checkpoints
def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints (with a manifest) in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    tags = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX) and (p / MANIFEST).is_file()]
    return sorted(tags, key=lambda p: p.name)


def resolve_checkpoint(spec: str | Path, default_dir: str | Path | None = None) -> Path:
    """The checkpoint tag directory meant by ``spec``.

    ``spec``: "latest" (in ``default_dir``), a tag directory, a checkpoints/
    directory (its ``latest``), or a run folder (its checkpoints/latest).
    """
    if str(spec) == "latest":
        if default_dir is None:
            raise CheckpointError("--resume latest needs a run folder (--out)")
        return _follow_latest(Path(default_dir))
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"--resume: no checkpoint at {path}")
    if (path / MANIFEST).is_file() or path.name.startswith((TAG_PREFIX, TMP_PREFIX)):
        return path
    if (path / LATEST).is_file():
        return _follow_latest(path)
    if (path / "checkpoints").is_dir():
        return _follow_latest(path / "checkpoints")
    raise CheckpointError(f"--resume: {path} is neither a checkpoint (no {MANIFEST}) nor a folder with a "
                          f"'{LATEST}' pointer")


def _follow_latest(directory: Path) -> Path:
    pointer = directory / LATEST
    if not pointer.is_file():
        found = list_checkpoints(directory)
        hint = f"; complete checkpoints there: {[p.name for p in found]}" if found else ""
        raise CheckpointError(f"nothing to resume: {directory} has no '{LATEST}' pointer (no checkpoint was "
                              f"completed in this run folder){hint}")
    tag = pointer.read_text().strip()
    return directory / tag


def verify_checkpoint(path: str | Path, *, full: bool | None = None) -> dict[str, Any]:
    """The manifest of checkpoint ``path`` after checking its files; CheckpointError says what is wrong.

    Checks: manifest present (absent = the save never finished), every listed
    file present with its recorded size, torch zip archives readable; with
    ``full`` (default: checkpoints under 1 GiB) also every member's CRC.
    """
    path = Path(path)
    earlier = [p.name for p in list_checkpoints(path.parent) if p.name < path.name]
    hint = (f"; earlier complete checkpoints: {', '.join(earlier)} (resume one with --resume {path.parent}/"
            f"{earlier[-1]})" if earlier else "")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist{hint}")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {MANIFEST}: the save never finished){hint}")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: unreadable {MANIFEST} ({exc}){hint}") from None
    total = sum(files.values())
    full = total <= FULL_VERIFY_BYTES if full is None else full
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} is missing{hint}")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} has {actual} bytes, the manifest "
                                  f"recorded {size}{hint}")
        if name.endswith(".pt"):
            try:
                with zipfile.ZipFile(file) as archive:
                    bad = archive.testzip() if full else None
            except (zipfile.BadZipFile, OSError) as exc:
                raise CheckpointError(f"checkpoint {path} is corrupt: {name} is not a readable archive ({exc})"
                                      f"{hint}") from None
            if bad is not None:
                raise CheckpointError(f"checkpoint {path} is corrupt: {name} fails its CRC check at {bad}{hint}")
    return manifest


# ---------------------------------------------------------------------------- save / load
class Checkpointer:
    """Atomic DeepSpeed save/load with keep-last-K, for one run's checkpoints/ folder."""

    def __init__(self, directory: str | Path, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def save(self, engine, step: int, client_state: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Save at ``step`` on every rank (a collective call); returns the final tag directory.

        A failed write raises ``WriteError`` on every rank (see ``agree_on_writes``); the partial
        ``tmp-`` folder is removed and ``latest`` keeps naming the previous complete checkpoint.
        """
        rank = _rank()
        tag = tag_for_step(step)
        tmp_tag = TMP_PREFIX + tag
        tmp_dir = self.directory / tmp_tag
        final_dir = self.directory / tag
        what = f"checkpoint {tag}"
        _install_safe_checkpoint_engine(engine)
        error: WriteError | None = None
        try:
            if rank == 0:
                with writing(self.directory, "checkpoint"):
                    self.directory.mkdir(parents=True, exist_ok=True)
                    if tmp_dir.exists():  # debris of a save that crashed
                        shutil.rmtree(tmp_dir)
            agree_on_writes(error, what)
            engine.save_checkpoint(str(self.directory), tag=tmp_tag, client_state=client_state, save_latest=False)
            take = getattr(engine.checkpoint_engine, "take_failure", None)
            error = take() if take is not None else None
            if error is None:
                rank_file = tmp_dir / f"rank_{rank:05d}_state.pt"
                try:
                    with open(rank_file, "wb") as handle:
                        torch.save(rank_state, handle)
                except Exception as exc:  # noqa: BLE001 - see _SafeCheckpointEngine.save
                    cause = os_error_in(exc)
                    if cause is None:
                        raise
                    error = write_error(cause, rank_file, "checkpoint")
            agree_on_writes(error, what)  # every rank's files are on disk
            if rank == 0:
                files = {str(p.relative_to(tmp_dir)): p.stat().st_size for p in sorted(tmp_dir.rglob("*"))
                         if p.is_file()}
                manifest = {"step": step, "tag": tag, "world_size": _world(), "files": files,
                            "client_state_keys": sorted(client_state)}
                try:
                    _write_atomic(tmp_dir / MANIFEST, json.dumps(manifest, indent=1))
                    if final_dir.exists():  # re-saving the same step (e.g. SIGTERM right after a periodic save)
                        shutil.rmtree(final_dir)
                    os.replace(tmp_dir, final_dir)
                    _write_atomic(self.directory / LATEST, tag + "\n")
                except OSError as exc:
                    error = write_error(exc, getattr(exc, "filename", None) or tmp_dir, "checkpoint")
                else:
                    self._prune()
            agree_on_writes(error, what)
        except WriteError:
            if rank == 0:
                shutil.rmtree(tmp_dir, ignore_errors=True)  # frees the space the partial save took
            raise
        return final_dir

    def _prune(self) -> None:
        for old in list_checkpoints(self.directory)[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, engine, spec: str | Path) -> dict[str, Any]:
        """Restore engine (model, optimizer, scheduler) + RNG from ``spec``; returns the client state.

        Every rank verifies the files first and the ranks agree, so a damaged
        checkpoint raises CheckpointError everywhere instead of deadlocking.
        """
        error: CheckpointError | None = None
        manifest: dict[str, Any] = {}
        try:
            path = resolve_checkpoint(spec, self.directory)
            manifest = verify_checkpoint(path)
            world = _world()
            if manifest.get("world_size", world) != world:
                raise CheckpointError(f"checkpoint {path} was written by {manifest['world_size']} ranks; this run "
                                      f"has {world} (DeepSpeed ZeRO states are per rank: resume with the same "
                                      f"number of ranks, or convert with zero_to_fp32.py)")
        except CheckpointError as exc:
            error = exc
        if not _all_ok(error is None):
            raise error or CheckpointError(f"checkpoint {spec}: another rank found it damaged (see its log)")
        _install_safe_checkpoint_engine(engine)
        try:
            with weights_only_loads():  # DeepSpeed asks for weights_only=False; it gets True
                loaded, client_state = engine.load_checkpoint(str(path.parent), tag=path.name,
                                                              load_optimizer_states=True,
                                                              load_lr_scheduler_states=True)
        except CheckpointError:
            raise
        except pickle.UnpicklingError as exc:
            raise _refused(path, exc) from None
        except Exception as exc:  # noqa: BLE001 - DeepSpeed raises anything from pickle to RuntimeError
            raise CheckpointError(f"checkpoint {path} could not be loaded: {type(exc).__name__}: {exc}") from None
        if loaded is None:
            raise CheckpointError(f"checkpoint {path} could not be loaded (DeepSpeed found no model states)")
        rank_file = path / f"rank_{_rank():05d}_state.pt"
        rank_state = torch.load(rank_file, weights_only=True)  # never unpickle: ints, tuples and tensors only
        if "rng" in rank_state:
            set_rng_state(rank_state["rng"])
        state = dict(client_state or {})
        state.update(rank_state)
        state["checkpoint"] = str(path)
        return state


def _world() -> int:
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


# ---------------------------------------------------------------------------- final export
def export_final(engine, out_dir: str | Path, tokenizer=None, extra_files: dict[str, str] | None = None) -> Path | None:
    """Write the trained model to ``out_dir`` in Hugging Face layout (+ tokenizer.model); collective.

    ZeRO-3 shards parameters across ranks, so the full 16-bit (or fp32, when
    training in fp32) weights are gathered layer by layer onto rank 0 with
    DeepSpeed's consolidated state dict, loaded into a meta-built copy of the
    model with ``assign=True`` (no second allocation), and saved there.
    Returns the directory on rank 0, None elsewhere.
    """
    out_dir = Path(out_dir)
    module = engine.module
    rank = _rank()
    if engine.zero_optimization_partition_weights():
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # all ranks take part; rank 0 gets it
        if rank == 0:
            from tritium.model.transformer import Transformer

            with torch.device("meta"):
                module = Transformer(module.config, backend=module.backend)
            module.load_state_dict(state_dict, assign=True, strict=True)
    error: WriteError | None = None
    if rank == 0:
        try:
            module.save_pretrained(out_dir)
            if tokenizer is not None:
                tokenizer.save(out_dir)
            for name, text in (extra_files or {}).items():
                (out_dir / name).write_text(text)
        except Exception as exc:  # noqa: BLE001 - safetensors reports a full disk as its own error type
            cause = os_error_in(exc)
            if cause is None and _os_error_code(exc) is None:
                raise
            error = write_error(cause or exc, out_dir, "export")
    agree_on_writes(error, f"export {out_dir}")
    return out_dir if rank == 0 else None
