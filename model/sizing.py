"""Size a Llama-style model before spending a GPU hour: parameters, FLOPs, memory, KV cache, serving cost.

Everything here is arithmetic on a ``ModelConfig`` (nothing is allocated), except
``saved_tensor_bytes``, the measurement the tests hold the activation count to.
The formulas (each function's docstring states its own):

Parameters (no biases, RMSNorm weights only)::

    embeddings = V*h                       head = V*h (0 when tied)
    attention  = L * (h*q + 2*h*kv + q*h)  q = num_heads*head_dim, kv = num_kv_heads*head_dim
    ffn        = L * 3*h*f  (swiglu: gate, up, down)   or  L * 2*h*f  (gelu: up, down)
    norms      = (2*L + 1) * h             two per block + the final norm

FLOPs per token (a multiply-add = 2 FLOPs; PaLM appendix B / Chinchilla convention)::

    N_mm      = attention + ffn + V*h      weights used in matmuls (the head counts even when tied;
                                           the embedding lookup and norms do not)
    training  = 6*N_mm + 12*L*q*T          forward 2*N_mm + 4*L*q*T (QK^T and AV), backward twice that
    inference = 2*N_mm + 4*L*q*T           one new token attending to a context of T

The attention term counts the full T x T score matrix, as PaLM and nanoGPT do
for MFU; causal kernels skip about half of it.

Training memory per GPU, as the installed DeepSpeed holds it (``model_states``; psi = parameters,
N = data-parallel GPUs, 16-bit weights; the ZeRO paper's 2 + 2 + 12 plus the fp32 gradient copy
DeepSpeed makes for the step)::

    stage 0: 20*psi                        stage 2: 2*psi + 18*psi/N      (= DeepSpeed's estimator)
    stage 1: 4*psi + 16*psi/N              stage 3: 20*psi/N + 4*largest layer (+ small tensors whole)

plus the ds_config's reduce buckets / ZeRO-3 prefetch, the activations the fused kernels save
(``activation_breakdown``, equal to a saved-tensor measurement of the real model) and the step's
transients (``transient_bytes``).  ``TrainingMemory.peak`` combines them moment by moment; a
``SAFETY_FRACTION`` margin covers fragmentation and the CUDA context.

KV cache: ``2 (K and V) * L * num_kv_heads * head_dim * bytes`` per token.

Tensor-parallel inference over t GPUs (Megatron-LM, Shoeybi et al. 2019, section 3;
``tensor_parallel_sizing``): heads and FFN columns split, KV heads replicated when fewer than t,
two all-reduces of the hidden state per block, i.e. ``2*L*h*bytes`` per token, of which a ring
all-reduce sends ``2*(t-1)/t`` times that from every rank.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from tritium.model.config import ModelConfig
from tritium.train.config import OFFLOAD_DEVICES, OFFLOADS  # tritium train's offload vocabulary, not a copy

# element size of each precision, in bytes
PRECISION_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}
# (weights, gradients, optimizer states) bytes per parameter for Adam training in each precision
TRAINING_BYTES: dict[str, tuple[int, int, int]] = {"bf16": (2, 2, 12), "fp16": (2, 2, 12), "fp32": (4, 4, 8)}
ZERO_STAGES = (0, 1, 2, 3)
# Default serving GPU for the cost estimate: H100 SXM (dense bf16 peak, HBM bandwidth, memory).
DEFAULT_GPU = {"peak_tflops": 989.0, "bandwidth_gbs": 3350.0, "memory_gb": 80.0}
# Fraction of peak FLOP/s or bandwidth a good serving stack reaches; fraction of memory usable for weights + KV.
ATTAINABLE_FRACTION = 0.6
USABLE_MEMORY_FRACTION = 0.9


def _precision_bytes(precision: str) -> int:
    if precision not in PRECISION_BYTES:
        raise ValueError(f"precision must be one of {list(PRECISION_BYTES)}, got {precision!r}")
    return PRECISION_BYTES[precision]


def _bytes_text(n: float) -> str:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or (
            value < 0 if allow_zero else value <= 0):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, got {value!r}")


# ---------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ParameterBreakdown:
    embeddings: int  # token embedding table, V*h
    attention: int  # q, k, v, o projections over all layers
    ffn: int  # feed-forward matrices over all layers
    norms: int  # RMSNorm weights: two per layer + final
    head: int  # LM head, V*h; 0 when tied to the embeddings

    @property
    def total(self) -> int:
        return self.embeddings + self.attention + self.ffn + self.norms + self.head

    @property
    def non_embedding(self) -> int:
        return self.attention + self.ffn + self.norms

    def shares(self) -> dict[str, float]:
        """component -> fraction of the total."""
        return {name: value / self.total for name, value in self.components().items()}

    def components(self) -> dict[str, int]:
        return {"embeddings": self.embeddings, "attention": self.attention, "ffn": self.ffn,
                "norms": self.norms, "head": self.head}

    def to_dict(self) -> dict[str, Any]:
        return {**self.components(), "total": self.total, "non_embedding": self.non_embedding,
                "shares": self.shares()}


def parameter_breakdown(cfg: ModelConfig) -> ParameterBreakdown:
    """Parameters by component (formulas in the module docstring)."""
    h, q, kv, f, L, V = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.ffn_hidden, cfg.num_layers, cfg.vocab_size
    ffn_matrices = 3 if cfg.ffn_type == "swiglu" else 2
    return ParameterBreakdown(
        embeddings=V * h,
        attention=L * (h * q + 2 * h * kv + q * h),
        ffn=L * ffn_matrices * h * f,
        norms=(2 * L + 1) * h,
        head=0 if cfg.tie_embeddings else V * h,
    )


def count_parameters(cfg: ModelConfig) -> int:
    return parameter_breakdown(cfg).total


def matmul_parameters(cfg: ModelConfig) -> int:
    """N_mm: weights that take part in a matmul per token (attention + FFN + the LM head, tied or not)."""
    p = parameter_breakdown(cfg)
    return p.attention + p.ffn + cfg.vocab_size * cfg.hidden_size


# ---------------------------------------------------------------------------- FLOPs
def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, training: bool = True) -> int:
    """FLOPs per token: training ``6*N_mm + 12*L*q*T``, inference ``2*N_mm + 4*L*q*T``.

    ``T = seq_len`` (default ``cfg.max_seq_len``) is the context each token
    attends to; ``q = num_heads*head_dim``.  MFU = tokens/s * this / peak FLOP/s.
    """
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    _positive("seq_len", seq_len)
    n_mm = matmul_parameters(cfg)
    attention = 4 * cfg.num_layers * cfg.q_size * seq_len
    return (6 * n_mm + 3 * attention) if training else (2 * n_mm + attention)


# ---------------------------------------------------------------------------- training memory
GPUS_PER_NODE = 8  # ranks per node for the per-node CPU figure and DeepSpeed's num_gpus_per_node
# Allocator fragmentation, the CUDA context, NCCL and cuBLAS workspaces: not counted tensor by
# tensor, so the "fits" verdict keeps this fraction of the peak in reserve.
SAFETY_FRACTION = 0.10
# Kernel implementations whose saved activations are counted tensor by tensor (and tested to equal
# the measurement). "auto" is triton on CUDA, the device a training run is sized for.
ACTIVATION_COVERED = ("triton", "auto")


def largest_layer_parameters(cfg: ModelConfig) -> int:
    """Parameters of the largest single module (DeepSpeed's "largest layer": ZeRO-3 gathers one module's
    weights at a time).  Same definition as ``deepspeed...stage3.model_to_params``: the direct
    parameters of each module -- embedding ``V*h``, the untied head ``V*h``, one projection ``h*f``..."""
    h, q, kv, f, V = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.ffn_hidden, cfg.vocab_size
    return max(V * h, h * q, h * kv, h * f, h)


def persistent_parameters(cfg: ModelConfig, threshold: int) -> int:
    """Parameters ZeRO-3 keeps whole on every rank: tensors with fewer than ``threshold`` elements
    (``stage3_param_persistence_threshold``; partitioning them costs more in latency than it saves)."""
    h, q, kv, f, L, V = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.ffn_hidden, cfg.num_layers, cfg.vocab_size
    ffn = [h * f] * (3 if cfg.ffn_type == "swiglu" else 2)
    tensors = [V * h] + ([] if cfg.tie_embeddings else [V * h]) + [h]  # embedding, head, final norm
    tensors += L * ([h * q, h * kv, h * kv, q * h, h, h] + ffn)
    return sum(n for n in tensors if n < threshold)


def zero_config(zero_stage: int, precision: str = "bf16", offload: str = "none", offload_device: str = "cpu",
                num_gpus: int = 1, device: str = "cuda") -> dict[str, Any]:
    """The ``zero_optimization`` section ``tritium train`` generates (``train.engine.build_ds_config``)
    for these settings on ``device``: bucket sizes, prefetch, persistence threshold, offload.
    ``overlap_comm`` (two reduce buckets instead of one) follows ``device``, not this machine."""
    from tritium.train.config import TrainConfig
    from tritium.train.engine import build_ds_config

    train = TrainConfig(zero_stage=zero_stage, precision=precision, offload=offload, offload_device=offload_device,
                        nvme_path="/nvme" if offload_device == "nvme" else None)
    zero = dict(build_ds_config(train, num_gpus)["zero_optimization"])
    if zero_stage >= 1:
        zero["overlap_comm"] = device == "cuda"
    return zero


@dataclass(frozen=True)
class ModelStates:
    """Per-rank bytes of weights, gradients and optimizer states under DeepSpeed ZeRO, by where they live.

    ``components`` maps a name to ``(bytes per rank, "gpu" | "cpu" | "nvme")``.  ``gpu`` is what
    DeepSpeed's estimators call "per GPU"; ``buffers`` are the ds_config's bucket/prefetch buffers.
    """

    zero_stage: int
    num_gpus: int
    precision: str
    offload: str
    offload_device: str
    components: dict[str, tuple[int, str]]
    buffers: dict[str, int]  # GPU buffers sized by the ds_config, alive all step (ZeRO-3's reduce bucket)
    fwd_bwd_buffers: dict[str, int]  # ... alive during forward/backward only (ZeRO-1/2 reduce buckets, prefetch)
    cpu_load: int  # host bytes per rank while the model is built (before ZeRO partitions it)

    def on(self, where: str) -> int:
        return sum(n for n, w in self.components.values() if w == where)

    @property
    def gpu(self) -> int:
        return self.on("gpu")

    @property
    def cpu(self) -> int:
        return self.on("cpu")

    @property
    def nvme(self) -> int:
        return self.on("nvme")

    def to_dict(self) -> dict[str, Any]:
        return {"zero_stage": self.zero_stage, "num_gpus": self.num_gpus, "precision": self.precision,
                "offload": self.offload, "offload_device": self.offload_device,
                "components": {k: {"bytes": n, "where": w} for k, (n, w) in self.components.items()},
                "gpu": self.gpu, "cpu": self.cpu, "nvme": self.nvme,
                "cpu_per_node": self.cpu * min(self.num_gpus, GPUS_PER_NODE),
                "buffers": {**self.buffers, **self.fwd_bwd_buffers}, "cpu_load": self.cpu_load}


def _check_training_args(zero_stage: int, num_gpus: int, precision: str, offload: str, offload_device: str) -> None:
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage must be one of {ZERO_STAGES}, got {zero_stage!r}")
    if not isinstance(num_gpus, int) or isinstance(num_gpus, bool) or num_gpus < 1:
        raise ValueError(f"num_gpus must be a positive integer, got {num_gpus!r}")
    if precision not in TRAINING_BYTES:
        raise ValueError(f"precision must be one of {list(TRAINING_BYTES)}, got {precision!r}")
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be one of {OFFLOADS}, got {offload!r}")
    if offload_device not in OFFLOAD_DEVICES:
        raise ValueError(f"offload_device must be one of {OFFLOAD_DEVICES}, got {offload_device!r}")
    if offload in ("params", "all") and zero_stage != 3:
        raise ValueError(f"offload={offload!r} offloads parameters, which needs zero_stage=3 (as in tritium train)")
    if offload in ("optimizer", "all") and zero_stage == 0:
        raise ValueError("offload='optimizer' needs zero_stage >= 1 (as in tritium train)")


def model_states(cfg: ModelConfig, zero_stage: int, num_gpus: int, precision: str = "bf16", offload: str = "none",
                 offload_device: str = "cpu", device: str = "cuda") -> ModelStates:
    """Bytes per rank of what DeepSpeed ZeRO keeps for ``cfg`` (psi parameters, N = ``num_gpus``).

    With ``w`` = 2 (bf16/fp16) or 4 (fp32) bytes per weight, the DeepSpeed version tritium installs keeps::

        weights        w*psi          (stage 3: w*psi/N, plus w per persistent parameter, see below)
        grads          w*psi          stage 0-1: whole until the step; stage 2-3: w*psi/N (reduce-scattered;
                                      ZeRO-3's ``grad_partitions_flat_buffer``)
        fp32 grads     4*psi/N        the gradient partition cast to fp32 at the step, freed after it
                                      (stage 0: 4*psi); ``TrainingMemory.peak`` counts it at the step only
        master         4*psi/N        fp32 copy of the weight partition -- cloned even in fp32 runs
        adam           8*psi/N        momentum + variance
        gathered layer 2*w*L_max      stage 3: the largest module's full weights and gradient

    Stage 0 in fp32 is plain ``torch.optim.AdamW`` (no master copy, no fp32 gradient copy).
    Offload ``optimizer`` moves fp32 grads, master and Adam states to ``offload_device`` (stage 2
    reduces gradients straight into that fp32 partition and keeps a 16-bit staging copy of the
    updated weights there; stage 3 keeps its 16-bit gradient partition there too);
    ``params`` (stage 3) moves the weight partition.  ``buffers`` come from the ds_config tritium
    generates (``zero_config``): ``reduce_bucket_size`` elements of w bytes (two with overlap_comm,
    i.e. on CUDA) and, for stage 3, ``stage3_prefetch_bucket_size`` elements of prefetched weights.

    Against DeepSpeed's estimators (``estimate_zero2_model_states_mem_needs_all_cold``, used for
    stages 1 and 2, and ``estimate_zero3_model_states_mem_needs_all_cold``) the GPU figure is equal
    up to rounding, except where tritium differs on purpose:

    * stage 1: +``w*psi*(1 - 1/N)``.  DeepSpeed has no stage-1 estimator; the stage-2 one partitions
      the 16-bit gradients, which ZeRO-1 keeps whole until the optimizer step.
    * stage 3: +``2*psi/N``.  DeepSpeed's stage-3 estimator counts 18 bytes per parameter over N, two
      fewer than the same buffers in its stage-2 count (16-bit weight 2 + 16-bit grad 2 + fp32 grad 4 +
      master 4 + Adam 8 = 20): stage3.py's 16-bit gradient partition (``grad_partitions_flat_buffer``,
      allocated for the whole run) is missing from it.
    * stage 3: +``w*P*(1 - 1/N)`` for the P parameters in tensors smaller than
      ``stage3_param_persistence_threshold`` (1e5 in tritium's ds_config): DeepSpeed keeps them whole on
      every rank, its estimator partitions them.  With ``offload="all"`` they stay on the GPU.
    * fp32: the estimators assume 16-bit mixed precision; here w = 4.
    * ``offload="params"`` without the optimizer: no estimator covers it.
    * CPU: the estimators' CPU column multiplies by ``additional_buffer_factor`` (1.5) and, for
      ZeRO-2, by the total GPU count rather than the ranks of one node; ``cpu`` here is the offloaded
      steady state per rank, ``cpu_load`` the host bytes one rank holds while building the model
      (fp32 ``Transformer``: 4*psi, or 4*L_max under ZeRO-3's ``zero.Init``).
    """
    _check_training_args(zero_stage, num_gpus, precision, offload, offload_device)
    psi, n = count_parameters(cfg), num_gpus
    w = TRAINING_BYTES[precision][0]
    mixed = precision != "fp32"
    per = lambda nbytes: math.ceil(nbytes / n)  # noqa: E731 - a partition of nbytes over N ranks
    opt_where = offload_device if offload in ("optimizer", "all") else "gpu"
    param_where = offload_device if offload in ("params", "all") else "gpu"
    zero = zero_config(zero_stage, precision, offload, offload_device, n, device)
    largest = largest_layer_parameters(cfg)
    c: dict[str, tuple[int, str]] = {}
    if zero_stage == 0:
        c["weights"] = (w * psi, "gpu")
        c["grads"] = (w * psi, "gpu")
        if mixed:  # DeepSpeed's FP16_Optimizer (also for bf16): fp32 master weights, fp32 grads at the step
            c["fp32_grads"] = (4 * psi, "gpu")
            c["master_weights"] = (4 * psi, "gpu")
        c["optimizer_states"] = (8 * psi, "gpu")
    else:
        persistent = persistent_parameters(cfg, zero["stage3_param_persistence_threshold"]) if zero_stage == 3 else 0
        if zero_stage == 3:
            c["weights"] = (per(w * (psi - persistent)), param_where)
            c["persistent_weights"] = (w * persistent, "gpu")
        else:
            c["weights"] = (w * psi, "gpu")
        if zero_stage == 1:
            c["grads"] = (w * psi, "gpu")
        elif zero_stage == 3 or opt_where == "gpu":  # ZeRO-3 keeps its grad partition on the optimizer's device
            c["grads"] = (per(w * psi), opt_where)
        if opt_where != "gpu" and zero_stage < 3:  # 16-bit staging copy of the updated partition
            c["offload_staging"] = (per(w * psi), opt_where)
        c["fp32_grads"] = (per(4 * psi), opt_where)
        c["master_weights"] = (per(4 * psi), opt_where)
        c["optimizer_states"] = (per(8 * psi), opt_where)
        if zero_stage == 3:
            c["gathered_layer"] = (2 * w * largest, "gpu")
    buffers: dict[str, int] = {}
    fwd_bwd: dict[str, int] = {}
    if zero_stage in (1, 2):  # made at the first gradient hook of each backward, released before the step
        fwd_bwd["reduce_buckets"] = (2 if zero.get("overlap_comm") else 1) * w * int(zero["reduce_bucket_size"])
    if zero_stage == 3:  # stage3.py allocates its bucket once, at initialisation
        buffers["reduce_bucket"] = w * int(zero["reduce_bucket_size"])
        fwd_bwd["prefetch_bucket"] = w * min(int(zero["stage3_prefetch_bucket_size"]), psi)
    cpu_load = 4 * largest if zero_stage == 3 else 4 * psi
    return ModelStates(zero_stage, n, precision, offload, offload_device, c, buffers, fwd_bwd, cpu_load)


def activation_bytes_per_token_per_layer(cfg: ModelConfig, precision: str = "bf16") -> int:
    """Bytes one decoder block saves for backward, per token, on the fused (triton) path.

    Counted tensor by tensor from what the kernels' autograd functions save (the test measures
    the real model with ``saved_tensors_hooks`` and finds exactly this)::

        a * (h      block input (RMSNorm saves x)           + h   attention-norm output (q/k/v input)
           + q+2kv  q, k after RoPE, v (flash attention)    + q   attention output (o_proj input)
           + h      residual sum (fused add + RMSNorm)      + h   FFN-norm output (gate/up input)
           + 3f)    swiglu: gate, up, silu(gate)*up          (gelu: 2f, pre-activation and output)
        + 4 * num_heads   fp32 log-sum-exp of flash attention
        + 2 * 4           fp32 1/rms of the two norms

    (Korthikanti et al. 2022 count ``34*s*b*h + 5*a*s^2*b`` for GPT-3 with dropout and a materialised
    softmax; this architecture has neither.)
    """
    a = _precision_bytes(precision)
    h, q, kv, f = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.ffn_hidden
    ffn_tensors = 3 * f if cfg.ffn_type == "swiglu" else 2 * f
    return a * (4 * h + 2 * q + 2 * kv + ffn_tensors) + 4 * cfg.num_heads + 2 * 4


def activation_covered(backend: str) -> bool:
    """True when every component of ``backend`` runs tritium's kernels (activations counted exactly)."""
    from tritium.model.backends import parse_backend

    choices = parse_backend(backend)
    return all(impl in ACTIVATION_COVERED for impl in choices.values())


def activation_breakdown(cfg: ModelConfig, micro_batch: int, seq_len: int, precision: str = "bf16",
                         checkpointing: bool = False, packed_documents: int | None = None) -> dict[str, int]:
    """Bytes saved for backward by one forward + loss of ``micro_batch`` x ``seq_len`` tokens (N of them)
    on the fused (triton) path, by tensor group; ``sum(...)`` equals the sum of the unique storages
    autograd saves (parameters excluded) -- see ``saved_tensor_bytes``.

    * ``blocks``: ``N * L * per_layer`` (``activation_bytes_per_token_per_layer``); with per-block
      checkpointing only each block's input, ``N * L * a*h`` (backward recomputes one block at a time:
      that block is a transient, see ``transient_bytes``).
    * ``final_norm``: ``N * (a*h + 4)``, the last block's output and its fp32 1/rms.
    * ``loss_grads``: ``N*a*h + V*h*a``.  The fused linear cross-entropy computes d(hidden) and
      d(head weight) during the forward (chunk by chunk, Liger's trick) and saves them, instead of any
      (N, V) logits.
    * ``token_ids``: ``8*N`` (int64 ids, saved by the embedding).
    * ``rope_tables``: the fp32 cos/sin every block takes (and RoPE, or the checkpointed block, saves):
      ``2 * max_seq_len * head_dim * 4`` when positions are 0..T-1 (slices of the model's tables), or
      ``2 * N * head_dim * 4`` for packed documents, whose rows are gathered at each token's position.
    * packed documents (``cu_seqlens``): ``4*(docs + 1)`` of int32 cu_seqlens.
    """
    _positive("micro_batch", micro_batch)
    _positive("seq_len", seq_len)
    a = _precision_bytes(precision)
    n, h, L = micro_batch * seq_len, cfg.hidden_size, cfg.num_layers
    out = {"blocks": n * L * (a * h if checkpointing else activation_bytes_per_token_per_layer(cfg, precision)),
           "final_norm": n * (a * h + 4),
           "loss_grads": n * a * h + cfg.vocab_size * h * a,
           "token_ids": 8 * n}
    out["rope_tables"] = 2 * (cfg.max_seq_len if packed_documents is None else n) * cfg.head_dim * 4
    if packed_documents is not None:
        _positive("packed_documents", packed_documents)
        out["cu_seqlens"] = 4 * (packed_documents + 1)
    return out


def activation_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, precision: str = "bf16",
                     checkpointing: bool = False, packed_documents: int | None = None) -> int:
    """Activation bytes per GPU for one micro-batch: the sum of ``activation_breakdown``."""
    return sum(activation_breakdown(cfg, micro_batch, seq_len, precision, checkpointing, packed_documents).values())


def loss_chunk_rows(tokens: int, vocab_size: int, hidden_size: int) -> int:
    """Rows of logits the fused loss materialises at once (``kernels/loss.py``'s rule: chunk logits
    about the size of the hidden states, at least 32 rows)."""
    ratio = -(-vocab_size // max(hidden_size, 1))
    rows = 1 << max(0, (-(-tokens // ratio) - 1).bit_length())  # next power of two
    return max(1, min(tokens, max(rows, 32)))


def transient_bytes(cfg: ModelConfig, states: ModelStates, micro_batch: int, seq_len: int,
                    checkpointing: bool = False, device: str = "cuda") -> dict[str, int]:
    """Short-lived peaks on top of the steady state, per GPU:

    * ``loss_chunk``: one chunk of (rows, V) logits in the activation dtype plus the fp32 loss and
      log-sum-exp rows (``8*N``) during the fused loss's forward.
    * ``recompute_block``: with checkpointing, one block's saved tensors during its recompute.
    * ``optimizer_step``: the 16-bit gradient partition flattened before its fp32 cast (stage 1-3,
      ``w*psi/N``; stage 0 casts first, ``4*psi``; 16-bit runs only).  On ``device="cpu"`` torch's single-tensor AdamW also computes
      ``exp_avg_sq.sqrt() / bias_correction`` out of place: two fp32 temporaries of the partition
      (tritium uses the fused AdamW on CUDA, which allocates none).
    ZeRO's bucket and prefetch buffers are in ``states.buffers`` / ``states.fwd_bwd_buffers``.
    """
    a = TRAINING_BYTES[states.precision][0]
    n = micro_batch * seq_len
    out = {"loss_chunk": loss_chunk_rows(n, cfg.vocab_size, cfg.hidden_size) * cfg.vocab_size * a + 8 * n}
    out["recompute_block"] = (n * activation_bytes_per_token_per_layer(cfg, states.precision)
                              + 2 * cfg.max_seq_len * cfg.head_dim * 4) if checkpointing else 0
    psi = count_parameters(cfg)
    step = 0
    optimizer_on_gpu = states.components["optimizer_states"][1] == "gpu"
    partition = psi if states.zero_stage == 0 else math.ceil(psi / states.num_gpus)
    if optimizer_on_gpu and states.precision != "fp32":  # in fp32 the flattened partition IS the fp32 grad
        # ZeRO flattens the 16-bit partition, then casts; stage 0's FP16/BF16 optimizer casts each
        # gradient to fp32, then flattens
        step += (4 if states.zero_stage == 0 else a) * partition
    if device == "cpu" and optimizer_on_gpu:
        step += 8 * partition
    out["optimizer_step"] = step
    return out


@dataclass(frozen=True)
class TrainingMemory:
    """Per-GPU memory of one training step: steady states, transients, and the peak that decides "fits"."""

    states: ModelStates
    activations: int  # bytes saved for backward by the fused path (a lower bound when not covered)
    activations_covered: bool  # False: backend's activations not counted tensor by tensor
    transients: dict[str, int]
    checkpointing: bool

    @property
    def model_states(self) -> int:
        return self.states.gpu

    @property
    def buffers(self) -> int:
        return sum(self.states.buffers.values()) + sum(self.states.fwd_bwd_buffers.values())

    @property
    def steady(self) -> int:
        return self.states.gpu + self.buffers + self.activations

    @property
    def peak(self) -> int:
        """The larger of the two moments of a step, on top of what lives through both::

            forward/backward: activations + max(loss chunk, recompute block) + reduce buckets / prefetch
            optimizer step:   fp32 gradient partition (ZeRO 1-3 make it at the step) + step temporaries
        """
        t, states = self.transients, self.states
        fp32_grads, where = states.components.get("fp32_grads", (0, "cpu"))
        at_step = fp32_grads if where == "gpu" else 0  # made from the 16-bit grads at the step, freed after
        forward_backward = (self.activations + max(t["loss_chunk"], t["recompute_block"])
                            + sum(states.fwd_bwd_buffers.values()))
        return (states.gpu - at_step + sum(states.buffers.values())
                + max(forward_backward, at_step + t["optimizer_step"]))

    @property
    def margin(self) -> int:
        return math.ceil(SAFETY_FRACTION * self.peak)

    @property
    def peak_with_margin(self) -> int:
        return self.peak + self.margin

    def to_dict(self) -> dict[str, Any]:
        return {**self.states.to_dict(), "checkpointing": self.checkpointing, "model_states": self.model_states,
                "activations": self.activations, "activations_covered": self.activations_covered,
                "buffers_total": self.buffers,
                "transients": dict(self.transients), "steady": self.steady, "peak": self.peak,
                "margin": self.margin, "peak_with_margin": self.peak_with_margin}


def training_memory(cfg: ModelConfig, zero_stage: int, num_gpus: int, precision: str = "bf16",
                    micro_batch: int = 1, seq_len: int | None = None, *, offload: str = "none",
                    offload_device: str = "cpu", checkpointing: bool = False, backend: str = "triton",
                    packed_documents: int | None = None, device: str = "cuda") -> TrainingMemory:
    """Training memory per GPU under ZeRO ``zero_stage`` on ``num_gpus`` data-parallel GPUs:
    ``model_states`` + ``activation_breakdown`` + ``transient_bytes``; ``peak`` decides whether it fits.
    Activations are exact for the fused (triton) path; for other backends (torch references, sdpa)
    ``activations_covered`` is False and the fused count is only a lower bound."""
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    states = model_states(cfg, zero_stage, num_gpus, precision, offload, offload_device, device)
    acts = activation_bytes(cfg, micro_batch, seq_len, precision, checkpointing, packed_documents)
    return TrainingMemory(states, acts, activation_covered(backend),
                          transient_bytes(cfg, states, micro_batch, seq_len, checkpointing, device), checkpointing)


def saved_tensor_bytes(model: Any, input_ids: Any, labels: Any, cu_seqlens: Any = None) -> tuple[int, Any]:
    """Measure: bytes of the unique storages autograd saves for backward during one forward + loss
    of ``model`` (a ``Transformer``), parameters excluded -- the quantity ``activation_bytes`` predicts.
    Uses ``torch.autograd.graph.saved_tensors_hooks``; storages are keyed by data pointer so views
    and tensors saved by several ops count once.  Returns ``(bytes, loss)``: the scalar loss keeps
    the graph for a caller that wants to inspect it or run backward."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids, labels=labels, cu_seqlens=cu_seqlens)
    return sum(seen.values()), loss


# ---------------------------------------------------------------------------- KV cache
def kv_cache_bytes_per_token(cfg: ModelConfig, precision: str = "bf16") -> int:
    """``2 * L * num_kv_heads * head_dim * bytes``: K and V for every layer (GQA shrinks it by the group)."""
    return 2 * cfg.num_layers * cfg.kv_size * _precision_bytes(precision)


def kv_cache_bytes(cfg: ModelConfig, seq_len: int | None = None, batch_size: int = 1,
                   precision: str = "bf16") -> int:
    """KV-cache bytes for ``batch_size`` sequences of ``seq_len`` tokens (default: the full context)."""
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    _positive("seq_len", seq_len)
    _positive("batch_size", batch_size)
    return kv_cache_bytes_per_token(cfg, precision) * seq_len * batch_size


# ---------------------------------------------------------------------------- tensor-parallel inference
# Megatron-LM (Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter Language Models Using
# Model Parallelism", section 3): q/k/v and gate/up column-parallel, o and down row-parallel, so each
# block needs exactly one all-reduce of the hidden state after attention and one after the FFN.
ALL_REDUCES_PER_BLOCK = 2


def check_tensor_parallel(cfg: ModelConfig, tensor_parallel: int) -> None:
    """Raise a one-line ``ValueError`` (naming ``tensor_parallel`` and the field) unless ``cfg`` splits over
    ``tensor_parallel`` ranks.

    Each rank must hold whole attention heads (``num_heads % t == 0``), whole KV heads or a replica of
    one (``num_kv_heads % t == 0``, or ``t % num_kv_heads == 0`` when there are fewer KV heads than
    ranks), and an equal share of the FFN columns (``ffn_hidden % t == 0``). The one check for both the
    sizing here and the tensor-parallel model (``tritium.model.tensor_parallel``)."""
    t = tensor_parallel
    if not isinstance(t, int) or isinstance(t, bool) or t < 1:
        raise ValueError(f"tensor_parallel must be a positive integer, got {t!r}")
    if cfg.num_heads % t:
        raise ValueError(f"tensor_parallel={t} does not divide num_attention_heads={cfg.num_heads}: "
                         "choose a tensor_parallel that divides it (each rank holds whole attention heads)")
    kv = cfg.num_kv_heads
    if kv % t and t % kv:
        raise ValueError(f"tensor_parallel={t} and num_key_value_heads={kv}: one must divide the other "
                         "(kv heads are split across ranks, or replicated when there are fewer than ranks)")
    if cfg.ffn_hidden % t:
        raise ValueError(f"tensor_parallel={t} does not divide intermediate_size (ffn_hidden)={cfg.ffn_hidden} "
                         "(the FFN is split by columns)")


@dataclass(frozen=True)
class TensorParallelSizing:
    """One replica split over ``tensor_parallel`` GPUs for inference: memory per rank, traffic per token.

    Bytes are per rank (GPU) unless the name says replica; traffic is per token through the forward
    (a decode step of B sequences moves B times it, a prefill chunk of T tokens T times it)."""

    tensor_parallel: int  # t: GPUs one replica's weights are split over
    precision: str  # weights, KV cache and activations (the all-reduced hidden state)
    vocab_parallel: bool  # embedding and LM head split by vocabulary rows; False: replicated on every rank
    kv_heads_per_rank: int  # num_kv_heads / t, or 1 when num_kv_heads < t
    kv_replication: int  # ranks holding a copy of each KV head: t / num_kv_heads when num_kv_heads < t, else 1
    weight_bytes_per_rank: int  # attention/FFN shards + replicated norms (+ embedding/head, whole or a shard)
    kv_cache_bytes_per_token_per_rank: int  # 2 * L * kv_heads_per_rank * head_dim * bytes
    all_reduces_per_step: int  # 2*L per forward step, whatever its token count (latency: 2*L round trips)
    all_reduce_payload_bytes_per_token: int  # 2*L*h*bytes: the hidden state summed twice per block
    all_reduce_bytes_sent_per_token_per_rank: float  # ring all-reduce: 2*(t-1)/t * payload
    vocab_bytes_sent_per_token_per_rank: float  # vocab_parallel only: embedding all-reduce + logits all-gather

    @property
    def weight_bytes_per_replica(self) -> int:
        return self.tensor_parallel * self.weight_bytes_per_rank

    @property
    def kv_cache_bytes_per_token_per_replica(self) -> int:
        return self.tensor_parallel * self.kv_cache_bytes_per_token_per_rank

    @property
    def bytes_sent_per_token_per_rank(self) -> float:
        return self.all_reduce_bytes_sent_per_token_per_rank + self.vocab_bytes_sent_per_token_per_rank

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "weight_bytes_per_replica": self.weight_bytes_per_replica,
                "kv_cache_bytes_per_token_per_replica": self.kv_cache_bytes_per_token_per_replica,
                "bytes_sent_per_token_per_rank": self.bytes_sent_per_token_per_rank}


def tensor_parallel_sizing(cfg: ModelConfig, tensor_parallel: int, precision: str = "bf16",
                           vocab_parallel: bool = False) -> TensorParallelSizing:
    """Per-rank memory and all-reduce traffic of ``cfg`` served with tensor parallelism of degree t.

    Megatron-LM's split (Shoeybi et al. 2019, section 3; ``a`` = bytes of ``precision``)::

        weights/rank  = a * (L*(2*h*q/t + 2*h*kv_r*d + m*h*f/t) + (2L+1)*h + E)
                        kv_r = KV heads per rank = num_kv_heads/t, or 1 (replicated) when num_kv_heads < t;
                        m = 3 (swiglu) or 2; norms replicated; E = V*h (+ V*h untied head), or
                        ceil(V/t)*h each when vocab_parallel
        KV cache/rank = 2 * L * kv_r * d * a  per token
        all-reduce    = 2 per block (after o_proj, after down_proj), each of h*a bytes per token:
                        payload 2*L*h*a per token; a ring all-reduce (reduce-scatter + all-gather) sends
                        2*(t-1)/t * payload from every rank (Patarasuk & Yuan 2009, bandwidth-optimal)

    ``vocab_parallel`` adds, per token, the embedding's all-reduce (ring: ``2*(t-1)/t*h*a``) and the
    logits' all-gather (``(t-1)/t*ceil(V/t)*t*a``; decode computes logits for every token, prefill for
    the last one only).  t = 1 gives the unsplit model and no traffic.  Raises ``ValueError`` (naming
    ``tensor_parallel``) when the heads or FFN do not split (``check_tensor_parallel``)."""
    check_tensor_parallel(cfg, tensor_parallel)
    a = _precision_bytes(precision)
    t, h, d, f, L, V = (tensor_parallel, cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden, cfg.num_layers,
                        cfg.vocab_size)
    kv_r = max(cfg.num_kv_heads // t, 1)
    ffn_matrices = 3 if cfg.ffn_type == "swiglu" else 2
    vocab_rows = math.ceil(V / t) if vocab_parallel else V
    embedding = vocab_rows * h * (1 if cfg.tie_embeddings else 2)
    per_rank = L * (2 * h * cfg.q_size // t + 2 * h * kv_r * d + ffn_matrices * h * f // t) + (2 * L + 1) * h
    ring = 2 * (t - 1) / t
    payload = ALL_REDUCES_PER_BLOCK * L * h * a if t > 1 else 0
    vocab = (ring * h * a + (t - 1) * vocab_rows * a) if vocab_parallel and t > 1 else 0.0
    return TensorParallelSizing(
        tensor_parallel=t, precision=precision, vocab_parallel=vocab_parallel, kv_heads_per_rank=kv_r,
        kv_replication=max(t // cfg.num_kv_heads, 1), weight_bytes_per_rank=(per_rank + embedding) * a,
        kv_cache_bytes_per_token_per_rank=2 * L * kv_r * d * a,
        all_reduces_per_step=ALL_REDUCES_PER_BLOCK * L if t > 1 else 0,
        all_reduce_payload_bytes_per_token=payload, all_reduce_bytes_sent_per_token_per_rank=ring * payload,
        vocab_bytes_sent_per_token_per_rank=vocab)


# ---------------------------------------------------------------------------- serving cost
@dataclass(frozen=True)
class InferenceCost:
    requests_per_s: float  # traffic
    prompt_tokens: int  # tokens per prompt
    output_tokens: int  # generated tokens per request
    latency_s: float  # end-to-end target per request
    decode_tokens_per_s_per_gpu: float  # aggregate generated tokens/s one GPU sustains
    prefill_tokens_per_s_per_gpu: float  # prompt tokens/s one GPU processes
    decode_estimated: bool  # True when decode tokens/s is a roofline estimate, not given
    prefill_estimated: bool  # True when prefill tokens/s is a roofline estimate, not given
    gpu_hour_price: float  # dollars per GPU-hour
    gpus_per_replica: int  # GPUs one copy of the weights needs (tensor parallel)
    concurrent_requests: float  # Little's law: requests_per_s * latency_s
    max_concurrent_per_replica: int  # sequences whose KV cache fits next to the weights
    max_stream_tokens_per_s: float  # batch-1 decode speed limit (weights read once per token)
    latency_feasible: bool  # output_tokens / latency_s <= max_stream_tokens_per_s
    gpus_for_compute: float  # GPU-seconds of prefill + decode per second of traffic
    gpus_for_memory: int  # GPUs whose memory holds the concurrent KV caches
    gpus_needed: int  # max of the above, rounded up to whole replicas
    utilization: float  # gpus_for_compute / gpus_needed
    cost_per_hour: float  # gpus_needed * gpu_hour_price
    cost_per_million_tokens: float  # per 1M prompt + output tokens
    cost_per_million_output_tokens: float  # per 1M generated tokens
    notes: list[str] = field(default_factory=list)  # warnings for the reader
    tensor_parallel: int = 1  # GPUs the weights are split over (Megatron-style); gpus_per_replica >= it
    # tensor-parallel traffic each GPU sends per token (ring all-reduces; tensor_parallel_sizing), bytes
    all_reduce_bytes_per_token_per_gpu: float = 0.0
    # ... times the tokens/s one replica pushes through its forward: interconnect bandwidth each GPU needs
    interconnect_gbs_per_gpu_decode: float = 0.0  # at the decode rate, GB/s
    interconnect_gbs_per_gpu_prefill: float = 0.0  # at the prefill rate, GB/s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inference_cost(cfg: ModelConfig, requests_per_s: float, prompt_tokens: int, output_tokens: int,
                   latency_s: float, tokens_per_s_per_gpu: float | None = None, gpu_hour_price: float = 2.5,
                   *, prefill_tokens_per_s_per_gpu: float | None = None, precision: str = "bf16",
                   gpu_memory_gb: float = DEFAULT_GPU["memory_gb"], gpu_peak_tflops: float = DEFAULT_GPU[
                       "peak_tflops"], gpu_bandwidth_gbs: float = DEFAULT_GPU["bandwidth_gbs"],
                   tensor_parallel: int = 1) -> InferenceCost:
    """GPUs needed and cost per 1M tokens to serve ``requests_per_s`` within ``latency_s``.

    * Replica: the weights (``params * bytes``) must fit in ``USABLE_MEMORY_FRACTION``
      of GPU memory; otherwise they are split over ``gpus_per_replica`` GPUs.  With
      ``tensor_parallel = t`` a replica is t GPUs (``max(t, what memory needs)``), sized per rank by
      ``tensor_parallel_sizing`` (replicated norms, KV heads replicated when fewer than t); every
      per-GPU rate below is per GPU of such a replica, so a replica does ``t`` times it.
    * Compute: ``R*O / decode_tps + R*P / prefill_tps`` GPUs are busy.
      ``tokens_per_s_per_gpu`` is the measured (or assumed) aggregate decode
      rate; when omitted it is a roofline estimate: a batch of ``b`` sequences
      (as many as fit, at most 256) reads the weights plus their KV caches once
      per step at ``ATTAINABLE_FRACTION`` of the bandwidth, or is compute bound.
      Prefill defaults to ``ATTAINABLE_FRACTION`` of peak FLOP/s over the
      inference FLOPs per token.
    * Memory: Little's law puts ``R * latency`` requests in flight; each holds
      ``(P + O)`` tokens of KV cache next to the weights.
    * Latency: one stream cannot decode faster than the weights can be read
      (batch 1); a target needing more is flagged infeasible.
    * Cost: ``gpus_needed * price`` per hour over ``R * (P + O) * 3600`` tokens.
    * Interconnect (t > 1): the all-reduce bytes each GPU sends per token times the tokens/s a replica
      decodes (or prefills); the roofline itself does not charge time for them.
    """
    _positive("requests_per_s", requests_per_s)
    _positive("prompt_tokens", prompt_tokens, allow_zero=True)
    _positive("output_tokens", output_tokens)
    _positive("latency_s", latency_s)
    _positive("gpu_hour_price", gpu_hour_price, allow_zero=True)
    _positive("gpu_memory_gb", gpu_memory_gb)
    _positive("gpu_peak_tflops", gpu_peak_tflops)
    _positive("gpu_bandwidth_gbs", gpu_bandwidth_gbs)
    for name, value in (("tokens_per_s_per_gpu", tokens_per_s_per_gpu),
                        ("prefill_tokens_per_s_per_gpu", prefill_tokens_per_s_per_gpu)):
        if value is not None:
            _positive(name, value)
    a = _precision_bytes(precision)
    tp = tensor_parallel_sizing(cfg, tensor_parallel, precision)
    notes: list[str] = []
    weight_bytes = count_parameters(cfg) * a
    kv_per_token = kv_cache_bytes_per_token(cfg, precision)
    usable = gpu_memory_gb * 1e9 * USABLE_MEMORY_FRACTION
    gpus_per_replica = max(1, math.ceil(weight_bytes / usable))
    if tp.weight_bytes_per_rank <= usable:
        # t ranks, each holding its shard plus what tensor parallelism replicates (t = 1: the whole model)
        gpus_per_replica = tensor_parallel
        weight_bytes, kv_per_token = tp.weight_bytes_per_replica, tp.kv_cache_bytes_per_token_per_replica
    elif tensor_parallel > 1:
        gpus_per_replica = max(gpus_per_replica, tensor_parallel)
        notes.append(f"a {_bytes_text(tp.weight_bytes_per_rank)} shard per GPU does not fit at tensor_parallel="
                     f"{tensor_parallel}; a replica is counted as {gpus_per_replica} GPUs with the weights spread "
                     "evenly")
    free_per_replica = gpus_per_replica * usable - weight_bytes
    context = prompt_tokens + output_tokens
    if context > cfg.max_seq_len:
        notes.append(f"prompt + output = {context} tokens exceeds max_seq_len={cfg.max_seq_len}")
    kv_per_request = kv_per_token * context
    max_concurrent = int(free_per_replica // kv_per_request)
    if max_concurrent < 1:
        max_concurrent = 1
        gpus_per_replica += 1
        notes.append("one request's KV cache does not fit beside the weights; added a GPU per replica")
    bandwidth = gpu_bandwidth_gbs * 1e9 * ATTAINABLE_FRACTION * gpus_per_replica
    flops = gpu_peak_tflops * 1e12 * ATTAINABLE_FRACTION * gpus_per_replica

    decode_estimated, prefill_estimated = tokens_per_s_per_gpu is None, prefill_tokens_per_s_per_gpu is None
    if decode_estimated:
        batch = min(256, max_concurrent)
        # average sequence is half-way through its output while decoding
        kv_read = kv_per_token * (prompt_tokens + output_tokens / 2)
        step_s = max((weight_bytes + batch * kv_read) / bandwidth,
                     batch * flops_per_token(cfg, context, training=False) / flops)
        tokens_per_s_per_gpu = batch / step_s / gpus_per_replica
    if prefill_estimated:
        prefill_tokens_per_s_per_gpu = flops / flops_per_token(cfg, max(prompt_tokens, 1),
                                                               training=False) / gpus_per_replica
    estimated = [name for name, flag in (("decode", decode_estimated), ("prefill", prefill_estimated)) if flag]
    if estimated:
        notes.append(f"{' and '.join(estimated)} tokens/s per GPU: roofline estimate for an H100-class GPU; "
                     "pass a measured value (tritium serve-bench) for a real plan")

    max_stream = bandwidth / weight_bytes
    latency_feasible = output_tokens / latency_s <= max_stream
    if not latency_feasible:
        notes.append(f"the latency target needs {output_tokens / latency_s:,.0f} tokens/s per stream, above the "
                     f"~{max_stream:,.0f} a replica can decode one stream at")
    gpus_compute = (requests_per_s * output_tokens / tokens_per_s_per_gpu
                    + requests_per_s * prompt_tokens / prefill_tokens_per_s_per_gpu)
    concurrent = requests_per_s * latency_s
    gpus_memory = math.ceil(concurrent / max_concurrent) * gpus_per_replica
    replicas = max(math.ceil(gpus_compute / gpus_per_replica), math.ceil(gpus_memory / gpus_per_replica), 1)
    gpus_needed = replicas * gpus_per_replica
    cost_per_hour = gpus_needed * gpu_hour_price
    tokens_per_hour = requests_per_s * context * 3600
    output_per_hour = requests_per_s * output_tokens * 3600
    sent = tp.bytes_sent_per_token_per_rank
    interconnect_decode = sent * tokens_per_s_per_gpu * gpus_per_replica / 1e9
    interconnect_prefill = sent * prefill_tokens_per_s_per_gpu * gpus_per_replica / 1e9
    if tensor_parallel > 1:
        notes.append(f"tensor parallel over {tensor_parallel} GPUs: each GPU sends {_bytes_text(sent)} per token "
                     f"in {tp.all_reduces_per_step} all-reduces per step, {interconnect_decode:,.1f} GB/s at the "
                     f"decode rate and {interconnect_prefill:,.1f} GB/s at the prefill rate (not in the roofline)")
    return InferenceCost(
        requests_per_s=requests_per_s, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
        latency_s=latency_s, decode_tokens_per_s_per_gpu=tokens_per_s_per_gpu,
        prefill_tokens_per_s_per_gpu=prefill_tokens_per_s_per_gpu, decode_estimated=decode_estimated,
        prefill_estimated=prefill_estimated,
        gpu_hour_price=gpu_hour_price, gpus_per_replica=gpus_per_replica, concurrent_requests=concurrent,
        max_concurrent_per_replica=max_concurrent, max_stream_tokens_per_s=max_stream,
        latency_feasible=latency_feasible, gpus_for_compute=gpus_compute, gpus_for_memory=gpus_memory,
        gpus_needed=gpus_needed, utilization=gpus_compute / gpus_needed, cost_per_hour=cost_per_hour,
        cost_per_million_tokens=cost_per_hour / tokens_per_hour * 1e6,
        cost_per_million_output_tokens=cost_per_hour / output_per_hour * 1e6, notes=notes,
        tensor_parallel=tensor_parallel, all_reduce_bytes_per_token_per_gpu=sent,
        interconnect_gbs_per_gpu_decode=interconnect_decode, interconnect_gbs_per_gpu_prefill=interconnect_prefill)


# ---------------------------------------------------------------------------- everything at once
def describe(cfg: ModelConfig, *, num_gpus: int = 8, precision: str = "bf16", micro_batch: int = 1,
             seq_len: int | None = None, offload: str = "none", offload_device: str = "cpu",
             checkpointing: bool = False, backend: str = "triton", packed_documents: int | None = None,
             gpu_memory_gb: float = DEFAULT_GPU["memory_gb"], tensor_parallel: int | None = None) -> dict[str, Any]:
    """All of the above as one JSON-ready dict (what ``tritium describe --json`` prints, minus cost).

    With ``tensor_parallel`` (``describe --tensor-parallel N``) it adds ``tensor_parallel``:
    ``tensor_parallel_sizing(...).to_dict()`` -- inference memory per GPU and all-reduce bytes per token.

    ``training_memory.stages`` holds every ZeRO stage the offload setting allows (parameter offload
    needs stage 3, optimizer offload stage >= 1) as ``TrainingMemory.to_dict()``, plus the same run
    with activation checkpointing under ``ckpt``; ``fits`` compares ``peak_with_margin`` with
    ``gpu_memory_gb``."""
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    tp = None if tensor_parallel is None else tensor_parallel_sizing(cfg, tensor_parallel, precision)
    params = parameter_breakdown(cfg)
    stages: dict[str, Any] = {}
    for stage in ZERO_STAGES:
        if (offload in ("params", "all") and stage != 3) or (offload in ("optimizer", "all") and stage == 0):
            continue
        entries = []
        for ckpt in dict.fromkeys((checkpointing, True)):
            memory = training_memory(cfg, stage, num_gpus, precision, micro_batch, seq_len, offload=offload,
                                     offload_device=offload_device, checkpointing=ckpt, backend=backend,
                                     packed_documents=packed_documents)
            entries.append({**memory.to_dict(), "fits": memory.peak_with_margin <= gpu_memory_gb * 1e9})
        # the row is the run as asked; "ckpt" the same run with per-block activation checkpointing
        stages[str(stage)] = {**entries[0], "ckpt": entries[-1]}
    report = {
        "config": cfg.to_dict(),
        "parameters": params.to_dict(),
        "flops_per_token": {
            "seq_len": seq_len,
            "matmul_parameters": matmul_parameters(cfg),
            "training": flops_per_token(cfg, seq_len, training=True),
            "inference": flops_per_token(cfg, seq_len, training=False),
            "training_6n": 6 * matmul_parameters(cfg),
        },
        "training_memory": {
            "num_gpus": num_gpus, "gpus_per_node": GPUS_PER_NODE, "precision": precision,
            "micro_batch": micro_batch, "seq_len": seq_len, "offload": offload, "offload_device": offload_device,
            "backend": backend, "activations_covered": activation_covered(backend),
            "gpu_memory_gb": gpu_memory_gb, "safety_fraction": SAFETY_FRACTION,
            "largest_layer_parameters": largest_layer_parameters(cfg),
            "activation_bytes_per_token_per_layer": activation_bytes_per_token_per_layer(cfg, precision),
            "stages": stages,
        },
        "kv_cache": {
            "precision": precision,
            "bytes_per_token": kv_cache_bytes_per_token(cfg, precision),
            "bytes_full_context": kv_cache_bytes(cfg, cfg.max_seq_len, 1, precision),
            "max_seq_len": cfg.max_seq_len,
        },
    }
    if tp is not None:
        report["tensor_parallel"] = tp.to_dict()
    return report
