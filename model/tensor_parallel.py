"""Tensor parallelism for inference (Megatron-LM's layout): one rank's slice of a ``Transformer``.

Each block is split so that it needs exactly one all-reduce per half (Shoeybi et al. 2019, sec. 3):

* attention: q/k/v column-wise (rank r owns query heads ``r*Hq/tp ..`` and the kv heads they read), o
  row-wise (its input columns are those heads) -- the partial o outputs are summed by one all-reduce;
* FFN: gate/up column-wise, down row-wise -- one all-reduce;
* embedding, norms and LM head replicated (every rank holds them; only rank 0 computes the head).

A rank's model is an ordinary ``Transformer`` built from a *local* ``ModelConfig`` (``num_heads/tp``,
``num_kv_heads/tp``, ``ffn_hidden/tp``, ``head_dim`` unchanged), whose ``o_proj`` and ``down_proj`` are
``RowParallelLinear``.  So parameter names are the single-device ones, every layer calls the same kernel
table, a KV cache sized from ``model.config`` holds this rank's kv heads only, and the Triton decode
kernel runs unchanged on the local heads.  When ``num_kv_heads < tp`` each kv head is replicated on the
``tp / num_kv_heads`` ranks whose query heads read it (vLLM does the same).

Why plain sharded ``nn.Linear`` + ``torch.distributed.all_reduce`` rather than DTensor's
``parallelize_module(ColwiseParallel/RowwiseParallel)``: the layout and the collectives are identical
(Megatron's), but (1) a column-parallel linear on a replicated input needs no communication at all, so
``ColwiseParallel`` would only wrap a local matmul; (2) a kv head replicated across a group of ranks is not
a DTensor placement on a 1-D mesh (it is neither ``Shard(0)`` nor ``Replicate()``); (3) the layers keep
taking plain tensors, so the kernels (RMSNorm with fused residual, RoPE, flash-decoding) see exactly what
they see on one device, with no DTensor dispatch on every small decode matmul.

Loading (``load_tensor_parallel``): every rank opens the Hugging Face-layout safetensors and reads only its
slices with ``safe_open(...).get_slice`` -- no rank ever materialises another rank's weights.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from tritium.model.checkpoint import (
    INDEX_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    _as_dtype,
    from_hf_name,
    read_config,
    safetensors_files,
    to_hf_name,
    verify_checksums,
)
from tritium.model.config import ModelConfig
from tritium.model.sizing import check_tensor_parallel
from tritium.model.transformer import Transformer

_IGNORED_SUFFIX = "rotary_emb.inv_freq"  # buffers old HF checkpoints carry; recomputed, so skipped


class RowParallelLinear(nn.Linear):
    """A row-parallel linear: this rank's input columns ``W[:, cols_r]``; the outputs of all ranks are summed
    by one all-reduce over ``group``.  x (..., in_features/tp) -> (..., out_features), replicated."""

    def __init__(self, in_features: int, out_features: int, group=None, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out


def local_config(config: ModelConfig, tensor_parallel: int) -> ModelConfig:
    """The per-rank geometry: heads, kv heads (at least 1: replicated) and FFN width divided by the degree."""
    check_tensor_parallel(config, tensor_parallel)
    tp = tensor_parallel
    return dataclasses.replace(config, num_heads=config.num_heads // tp, num_kv_heads=max(1, config.num_kv_heads // tp),
                               ffn_hidden=config.ffn_hidden // tp, head_dim=config.head_dim)


def shard_spec(name: str, config: ModelConfig, rank: int, tensor_parallel: int) -> tuple[int, int, int] | None:
    """(dim, start, stop) of parameter ``name`` (our names) that rank ``rank`` holds, or None if replicated."""
    tp, D = tensor_parallel, config.head_dim
    leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
    if leaf == "q_proj":
        per = config.num_heads // tp * D
        return 0, rank * per, (rank + 1) * per
    if leaf in ("k_proj", "v_proj"):
        kv = config.num_kv_heads
        if kv >= tp:
            per = kv // tp * D
            return 0, rank * per, (rank + 1) * per
        head = rank // (tp // kv)  # kv head h serves the query heads of ranks h*tp/kv .. (h+1)*tp/kv - 1
        return 0, head * D, (head + 1) * D
    if leaf == "o_proj":
        per = config.num_heads // tp * D
        return 1, rank * per, (rank + 1) * per
    if leaf in ("gate_proj", "up_proj"):
        per = config.ffn_hidden // tp
        return 0, rank * per, (rank + 1) * per
    if leaf == "down_proj":
        per = config.ffn_hidden // tp
        return 1, rank * per, (rank + 1) * per
    return None


def build_local_model(config: ModelConfig, tensor_parallel: int, group=None, backend: str | None = None,
                      device="meta") -> Transformer:
    """This rank's ``Transformer`` (on ``device``; meta by default, for ``load_state_dict(assign=True)``):
    the local geometry, with o_proj/down_proj all-reducing over ``group``.  ``model.full_config`` keeps the
    whole model's config; ``model.tensor_parallel`` the degree."""
    cfg = local_config(config, tensor_parallel)
    with torch.device(device):
        model = Transformer(cfg, backend=backend)
        if tensor_parallel > 1:
            for block in model.layers:
                attn, mlp = block.self_attn, block.mlp
                attn.o_proj = RowParallelLinear(cfg.q_size, cfg.hidden_size, group)
                mlp.down_proj = RowParallelLinear(cfg.ffn_hidden, cfg.hidden_size, group)
    model.full_config = config
    model.tensor_parallel = tensor_parallel
    return model


def shard_state_dict(state: dict[str, torch.Tensor], config: ModelConfig, rank: int, tensor_parallel: int
                     ) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s slices of a full state dict (tests, and models already in memory)."""
    out = {}
    for name, tensor in state.items():
        spec = shard_spec(name, config, rank, tensor_parallel)
        out[name] = tensor if spec is None else tensor.narrow(spec[0], spec[1], spec[2] - spec[1]).contiguous()
    return out


def load_tensor_parallel(directory: str | Path, rank: int, tensor_parallel: int, *, group=None,
                         control_group=None, dtype: torch.dtype | str | None = None, device=None, backend: str | None = None,
                         verify: bool | None = None) -> Transformer:
    """Rank ``rank``'s model from an HF-layout safetensors checkpoint, reading only its own slices.

    Call on every rank of ``group`` (an initialised process group of ``tensor_parallel`` ranks; the
    all-reduces run on it) at once: rank 0 checks ``checksums.sha256`` (as ``load_pretrained`` does; ``verify`` likewise) and tells the
    others over ``control_group`` (a CPU/gloo group; default ``group``), so the files are hashed once, not once per rank.  Raises ``CheckpointError`` naming the tensor
    or file (a legacy ``pytorch_model.bin`` cannot be sliced: convert it with ``save_pretrained`` first),
    ``ValueError`` when the head counts do not divide ``tensor_parallel``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    config = read_config(directory)
    check_tensor_parallel(config, tensor_parallel)
    _verify_on_rank0(directory, verify, rank, tensor_parallel,
                     control_group if control_group is not None else group)
    dtype = _as_dtype(dtype)
    device = torch.device(device or "cpu")
    model = build_local_model(config, tensor_parallel, group, backend)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    files = safetensors_files(directory)
    if not files:
        raise CheckpointError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory}: tensor-parallel loading reads "
                              f"safetensors slices (convert a pytorch_model.bin with Transformer.save_pretrained)")
    state = {}
    for file in files:
        try:
            with safe_open(directory / file, framework="pt", device="cpu") as handle:
                for hf_name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    name = from_hf_name(hf_name)
                    if hf_name.endswith(_IGNORED_SUFFIX) or (name == "lm_head.weight" and config.tie_embeddings):
                        continue
                    if name not in expected:
                        raise CheckpointError(f"{directory}: unexpected tensor {hf_name!r} (does config.json match "
                                              f"these weights? e.g. num_layers, tie_word_embeddings)")
                    part = handle.get_slice(hf_name)
                    full = tuple(part.get_shape())
                    spec = shard_spec(name, config, rank, tensor_parallel)
                    want = _full_shape(name, expected[name], config, tensor_parallel)
                    if full != want:
                        raise CheckpointError(f"{directory}: tensor {hf_name!r} has shape {full}, the config "
                                              f"expects {want}")
                    if spec is None:
                        tensor = part[:]
                    elif spec[0] == 0:
                        tensor = part[spec[1]:spec[2]]
                    else:
                        tensor = part[:, spec[1]:spec[2]]
                    tensor = tensor.to(device=device, dtype=dtype) if dtype is not None else tensor.to(device)
                    state[name] = tensor.contiguous()
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 (safetensors raises its own types for bad headers/lengths)
            raise CheckpointError(f"{directory / file} is truncated or not a valid safetensors file: {exc}") from None
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(to_hf_name(m) for m in missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise CheckpointError(f"{directory}: missing tensor(s) {shown}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _split(name: str, config: ModelConfig, tp: int) -> int:
    """How many times this rank's slice fits in the full tensor along its split dim (kv replication: kv)."""
    leaf = name.rsplit(".", 2)[-2]
    if leaf in ("k_proj", "v_proj") and config.num_kv_heads < tp:
        return config.num_kv_heads
    return tp


def _full_shape(name: str, local: tuple[int, ...], config: ModelConfig, tp: int) -> tuple[int, ...]:
    spec = shard_spec(name, config, 0, tp)
    if spec is None:
        return local
    shape = list(local)
    shape[spec[0]] *= _split(name, config, tp)
    return tuple(shape)


def _verify_on_rank0(directory: Path, verify: bool | None, rank: int, tensor_parallel: int, group) -> None:
    # Coordinate only inside a world of the tensor-parallel ranks: a process group left by something else
    # (an in-process training run, a 1-rank world) must not turn rank r > 0 into "rank 0 checked it".
    if tensor_parallel == 1 or not dist.is_initialized() or dist.get_world_size(group) != tensor_parallel:
        verify_checksums(directory, verify)
        return
    failure: CheckpointError | None = None
    if rank == 0:
        try:
            verify_checksums(directory, verify)
        except CheckpointError as exc:
            failure = exc
    flag = torch.tensor([int(failure is not None)])
    dist.broadcast(flag, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if failure is not None:
        raise failure
    if flag.item():
        raise CheckpointError(f"{directory}: checksum verification failed on rank 0 (its error names the file)")
