"""Checkpoints in the Hugging Face Llama layout: config.json + model.safetensors (+ shards and index).

``transformers.LlamaForCausalLM.from_pretrained(dir)`` opens what ``save_pretrained`` writes and
``load_pretrained`` opens what Hugging Face writes, with the same logits: parameter names are HF's
(our module tree is HF's minus the ``model.`` prefix) and our RoPE uses HF's rotate_half layout, so
q_proj/k_proj need no permutation.  Meta's original ``consolidated.*.pth`` checkpoints rotate
interleaved pairs instead; convert their wq/wk with ``permute_qk_for_hf`` (HF's conversion script
does the same).  Models with ffn_type="gelu" have no HF class: their config.json holds tritium's own
``ModelConfig`` fields (loadable here only).

Safety: weights are read with safetensors (no code runs on load); a legacy ``pytorch_model.bin`` is
read with ``torch.load(weights_only=True)``.  Integrity: ``save_pretrained`` writes ``checksums.sha256``
(``sha256sum`` format, so ``sha256sum -c checksums.sha256`` checks it too) over the weight files, in the
same atomic move as the weights; loading verifies every listed file first and refuses a mismatch with a
one-line ``CheckpointError``.  A folder without that file (Hugging Face downloads, other tools) loads
as before; ``verify=False`` or ``TRITIUM_VERIFY_CHECKSUMS=0`` skips the check for files changed on purpose.  Every problem -- a missing, unexpected or mis-shaped
tensor, a config that does not match, a truncated or corrupt file -- raises ``CheckpointError``
naming the tensor or file.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tritium.model.config import ModelConfig
from tritium.model.transformer import Transformer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
LEGACY_NAME = "pytorch_model.bin"
LEGACY_INDEX_NAME = "pytorch_model.bin.index.json"
CHECKSUMS_NAME = "checksums.sha256"  # "<sha256 hex>  <file name>" per weight file, as sha256sum writes it
VERIFY_ENV = "TRITIUM_VERIFY_CHECKSUMS"  # "0" skips verification (files edited on purpose)
# Buffers old HF checkpoints carried; we recompute them, so they are skipped, not "unexpected".
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_OURS = re.compile(r"^(model\.safetensors|model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json"
                   r"|checksums\.sha256)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file or tensor."""


def to_hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def from_hf_name(name: str) -> str:
    return name.removeprefix("model.")


def permute_qk_for_hf(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Meta-layout wq/wk (RoPE on interleaved pairs) -> HF layout (rotate_half), per head.

    ``num_heads`` is the head count of this projection (num_kv_heads for wk).  Same as
    transformers' convert_llama_weights_to_hf.py ``permute``."""
    out_features, in_features = weight.shape
    return (weight.view(num_heads, out_features // num_heads // 2, 2, in_features)
            .transpose(1, 2).reshape(out_features, in_features))


def unpermute_qk_from_hf(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of ``permute_qk_for_hf`` (HF layout -> Meta layout)."""
    out_features, in_features = weight.shape
    return (weight.view(num_heads, 2, out_features // num_heads // 2, in_features)
            .transpose(1, 2).reshape(out_features, in_features))


# --------------------------------------------------------------------------- save
def parse_size(size: int | str) -> int:
    """``5GB``/``500MB``/``1024`` -> bytes (decimal units, like Hugging Face)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size must be bytes or like '5GB'/'500MB', got {size!r}")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(match.group(1)) * scale)


def save_pretrained(model, directory: str | Path, *, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | str | None = None) -> Path:
    """Write ``model`` to ``directory`` in the HF layout; returns the directory.

    Files are first written to a temporary sibling folder, then moved in with ``os.replace``
    (atomic per file; the config last).  A new directory appears whole; in an existing one other
    files (tokenizer.model, ...) are kept and stale weight shards from an earlier save removed."""
    directory = Path(directory)
    limit = parse_size(max_shard_size)
    dtype = _as_dtype(dtype)
    config: ModelConfig = model.config
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("lm_head.") and config.tie_embeddings:
            continue
        if tensor.is_meta:
            raise CheckpointError(f"cannot save {name}: it is on the meta device (materialise the model first)")
        tensor = tensor.detach().to(dtype) if dtype is not None else tensor.detach()
        tensors[to_hf_name(name)] = tensor.contiguous().cpu()
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + nbytes > limit:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += nbytes

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        if len(shards) == 1:
            save_file(shards[0], tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / file, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, file))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                                      "weight_map": weight_map}, indent=2) + "\n")
        weight_files = sorted(p.name for p in tmp.iterdir())
        (tmp / CHECKSUMS_NAME).write_text("".join(f"{file_sha256(tmp / name)}  {name}\n" for name in weight_files))
        saved_dtype = str(next(iter(tensors.values())).dtype).replace("torch.", "")
        if config.ffn_type == "swiglu":
            config_dict = config.to_hf_dict(torch_dtype=saved_dtype)
        else:  # no HF class has a two-matrix GELU Llama: keep tritium's own fields
            config_dict = config.to_dict()
        (tmp / CONFIG_NAME).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        if not directory.exists():
            os.replace(tmp, directory)
            return directory
        for stale in directory.iterdir():
            if _OURS.match(stale.name) and not (tmp / stale.name).exists():
                stale.unlink()
        # checksums and config last: a crash in between leaves a mismatch that loading reports, never a
        # silently mixed folder
        for file in sorted(tmp.iterdir(), key=lambda p: (p.name == CHECKSUMS_NAME, p.name == CONFIG_NAME)):
            os.replace(file, directory / file.name)
        return directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- checksums
def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksums(directory: str | Path, verify: bool | None = None) -> bool:
    """Check every file listed in ``directory/checksums.sha256``; CheckpointError (one line) on a mismatch.

    Returns False when nothing was checked: no checksum file (a folder made elsewhere), or verification
    turned off (``verify=False``, or ``verify=None`` with ``TRITIUM_VERIFY_CHECKSUMS=0``).
    """
    directory = Path(directory)
    if verify is None:
        verify = os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
    manifest = directory / CHECKSUMS_NAME
    if not verify or not manifest.is_file():
        return False
    hint = (f"re-export or re-download it, or set {VERIFY_ENV}=0 (tritium generate/serve: --no-verify-checksums) "
            "to load it anyway")
    for number, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"[0-9a-fA-F]{64}", parts[0]):
            raise CheckpointError(f"{manifest}:{number}: expected '<sha256>  <file>', got {line[:80]!r}")
        expected, name = parts[0].lower(), parts[1].lstrip("*")
        path = directory / name
        if Path(name).name != name:
            raise CheckpointError(f"{manifest}:{number}: {name!r} is not a file name in {directory}")
        if not path.is_file():
            continue  # the loader names missing weight files itself
        if file_sha256(path) != expected:
            raise CheckpointError(f"{path} does not match its SHA-256 in {CHECKSUMS_NAME} (corrupt, or changed "
                                  f"after export); {hint}")
    return True


# --------------------------------------------------------------------------- load
def read_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in checkpoint directory {directory}")
    try:
        return ModelConfig.from_json(path)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def load_pretrained(directory: str | Path, *, dtype: torch.dtype | str | None = None, device=None,
                    backend: str | None = None, config: ModelConfig | None = None, verify: bool | None = None):
    """Build a ``Transformer`` from ``directory`` without allocating twice (meta, then assign).

    ``config``, when given, must match the saved config (else CheckpointError listing the fields).
    ``dtype`` None keeps the stored dtype; ``device`` None loads to CPU.  ``verify``: check
    ``checksums.sha256`` first (default: yes, unless ``TRITIUM_VERIFY_CHECKSUMS=0``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    saved = read_config(directory)
    verify_checksums(directory, verify)
    if config is not None:
        _check_same_config(config, saved, directory / CONFIG_NAME)
    dtype = _as_dtype(dtype)
    device = torch.device(device or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():  # else safetensors fails with a pin_memory error
        raise ValueError(f"device={str(device)!r}: CUDA is not available here (torch {torch.__version__}, "
                         "torch.cuda.is_available() is False); load with device='cpu' (--device cpu)")
    with torch.device("meta"):
        model = Transformer(saved, backend=backend)
    state = load_state_dict(directory, model, device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def load_state_dict(directory: str | Path, model, device=None, dtype: torch.dtype | None = None
                    ) -> dict[str, torch.Tensor]:
    """Tensors of ``directory`` under our names, checked against ``model``'s (meta is fine) shapes."""
    directory = Path(directory)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    state = {}
    for hf_name, tensor in _read_tensors(directory, device or "cpu"):
        if _IGNORED.match(hf_name):
            continue
        name = from_hf_name(hf_name)
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue  # some exporters store the tied head too; the embedding is the one we keep
        if name not in expected:
            raise CheckpointError(f"{directory}: unexpected tensor {hf_name!r} "
                                  f"(does {CONFIG_NAME} match these weights? e.g. num_layers, tie_word_embeddings)")
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(f"{directory}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, the config "
                                  f"expects {expected[name]} (does {CONFIG_NAME} match these weights?)")
        state[name] = tensor.to(dtype) if dtype is not None else tensor  # one tensor at a time: no 2x peak
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(to_hf_name(m) for m in missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise CheckpointError(f"{directory}: missing tensor(s) {shown}")
    return state


def _read_tensors(directory: Path, device):
    """Yield (hf_name, tensor) from safetensors (single or sharded), else a legacy pytorch_model.bin."""
    files = safetensors_files(directory)
    if not files:
        if (directory / LEGACY_INDEX_NAME).is_file() or (directory / LEGACY_NAME).is_file():
            yield from _read_legacy(directory)
            return
        raise FileNotFoundError(f"no {WEIGHTS_NAME}, {INDEX_NAME} or {LEGACY_NAME} in {directory}")
    for file in files:
        path = directory / file
        try:
            with safe_open(path, framework="pt", device=str(device)) as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, handle.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 (safetensors raises its own types for bad headers/lengths)
            raise CheckpointError(f"{path} is truncated or not a valid safetensors file: {exc}") from None


def safetensors_files(directory: Path) -> list[str]:
    """A checkpoint's safetensors files: the shards its index lists (each must exist), or the single
    ``model.safetensors``; [] when it has neither. ``CheckpointError`` for a bad index or a missing shard."""
    if (directory / INDEX_NAME).is_file():
        files = _index_files(directory / INDEX_NAME)
    elif (directory / WEIGHTS_NAME).is_file():
        return [WEIGHTS_NAME]
    else:
        return []
    for file in files:
        if not (directory / file).is_file():
            raise CheckpointError(f"shard {directory / file} listed in {INDEX_NAME} does not exist")
    return files


def _index_files(index_path: Path) -> list[str]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index_path} is not a valid index (need a 'weight_map' object): {exc}") from None


def _read_legacy(directory: Path):
    files = (_index_files(directory / LEGACY_INDEX_NAME) if (directory / LEGACY_INDEX_NAME).is_file()
             else [LEGACY_NAME])
    for file in files:
        path = directory / file
        try:
            # weights_only: the unpickler only rebuilds tensors and plain containers, never runs code.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"legacy weights file {path} does not exist") from None
        except Exception as exc:  # noqa: BLE001 (the unpickler's refusals have many types)
            raise CheckpointError(f"{path} could not be read safely (weights_only=True): {exc}") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
        yield from state.items()


def _check_same_config(given: ModelConfig, saved: ModelConfig, path: Path) -> None:
    skip = {"name", "backend", "initializer_range"}  # labels and runtime choices, not geometry
    a, b = given.to_dict(), saved.to_dict()
    diffs = [f"{k}: given {a[k]!r}, saved {b[k]!r}" for k in a if k not in skip and a[k] != b[k]]
    if diffs:
        raise CheckpointError(f"config does not match {path}: " + "; ".join(diffs))


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or a name like 'bfloat16', got {dtype!r}")
    return value
