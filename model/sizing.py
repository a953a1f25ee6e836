"""Size a Llama-style model before spending a GPU hour: parameters, FLOPs, memory, KV cache, serving cost.

Everything here is arithmetic on a ``ModelConfig``; nothing is allocated.
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

Training memory per GPU (mixed-precision Adam, ZeRO paper sec. 3: 2 bytes of
16-bit weights + 2 of 16-bit gradients + K=12 of fp32 optimizer state -- master
weights, momentum, variance -- per parameter, psi = parameter count,
N = data-parallel GPUs)::

    stage 0: (2 + 2 + 12) * psi          stage 2: 2*psi + (2 + 12)*psi/N
    stage 1: (2 + 2) * psi + 12*psi/N    stage 3: (2 + 2 + 12) * psi/N

(fp32 training: 4 + 4 + 8.)  Activations are not partitioned by ZeRO; see
``activation_bytes_per_token_per_layer`` for the tensor-by-tensor count.
Temporary buffers, the CUDA context and fragmentation are not included.

KV cache: ``2 (K and V) * L * num_kv_heads * head_dim * bytes`` per token.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from tritium.model.config import ModelConfig

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
def activation_bytes_per_token_per_layer(cfg: ModelConfig, precision: str = "bf16") -> int:
    """Bytes one decoder block keeps for backward, per token (no checkpointing).

    Counted tensor by tensor, in the spirit of Korthikanti et al. 2022
    ("Reducing Activation Recomputation", ``34*s*b*h + 5*a*s^2*b`` for GPT-3
    with dropout and a materialised softmax), for this architecture: no
    dropout, no biases, flash attention (no s^2 term; it keeps q, k, v, the
    output and an fp32 log-sum-exp per head)::

        16-bit: 4h      attention-norm input and output, FFN-norm input and output
              + q+2kv   q, k (after RoPE), v
              + q       attention output (input of the o projection)
              + 3f      swiglu: gate, up, silu(gate)*up     (gelu: 2f, pre-activation and output)
        fp32:   4*num_heads (log-sum-exp) + 2*4 (the two norms' 1/rms)
    """
    a = _precision_bytes(precision)
    h, q, kv, f = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.ffn_hidden
    ffn_tensors = 3 * f if cfg.ffn_type == "swiglu" else 2 * f
    return a * (4 * h + 2 * q + 2 * kv + ffn_tensors) + 4 * cfg.num_heads + 2 * 4


def activation_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, precision: str = "bf16",
                     checkpointing: bool = False) -> int:
    """Activation bytes per GPU for one micro-batch.

    Without checkpointing: ``tokens * (L * per_layer + final)``; with full
    per-block checkpointing: ``tokens * (L * a*h + per_layer + final)`` --
    each block keeps only its input, and backward recomputes one block at a
    time.  ``final = a*2h + 4`` (final norm input/output and 1/rms); the loss
    is a fused linear cross-entropy, so no (tokens, V) logits are kept.
    """
    _positive("micro_batch", micro_batch)
    _positive("seq_len", seq_len)
    a = _precision_bytes(precision)
    tokens = micro_batch * seq_len
    per_layer = activation_bytes_per_token_per_layer(cfg, precision)
    final = a * 2 * cfg.hidden_size + 4
    if checkpointing:
        return tokens * (cfg.num_layers * a * cfg.hidden_size + per_layer + final)
    return tokens * (cfg.num_layers * per_layer + final)


@dataclass(frozen=True)
class TrainingMemory:
    zero_stage: int  # 0..3
    num_gpus: int  # data-parallel world size
    weights: int  # bytes per GPU of (16-bit) weights
    grads: int  # bytes per GPU of gradients
    optimizer: int  # bytes per GPU of optimizer states (fp32 master, momentum, variance)
    activations: int  # bytes per GPU of activations, no checkpointing
    activations_checkpointed: int  # bytes per GPU of activations with per-block checkpointing

    @property
    def model_states(self) -> int:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.model_states + self.activations

    @property
    def total_checkpointed(self) -> int:
        return self.model_states + self.activations_checkpointed

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "model_states": self.model_states, "total": self.total,
                "total_checkpointed": self.total_checkpointed}


def training_memory(cfg: ModelConfig, zero_stage: int, num_gpus: int, precision: str = "bf16",
                    micro_batch: int = 1, seq_len: int | None = None) -> TrainingMemory:
    """Training memory per GPU under ZeRO ``zero_stage`` on ``num_gpus`` data-parallel GPUs.

    Model states follow the ZeRO paper's mixed-precision Adam accounting (module
    docstring); activations follow ``activation_bytes``.
    """
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage must be one of {ZERO_STAGES}, got {zero_stage!r}")
    if not isinstance(num_gpus, int) or num_gpus < 1:
        raise ValueError(f"num_gpus must be a positive integer, got {num_gpus!r}")
    if precision not in TRAINING_BYTES:
        raise ValueError(f"precision must be one of {list(TRAINING_BYTES)}, got {precision!r}")
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    psi = count_parameters(cfg)
    w, g, k = TRAINING_BYTES[precision]
    n = num_gpus
    # partitioned state costs 1/N of its full size on each GPU
    weights = psi * w / n if zero_stage >= 3 else psi * w
    grads = psi * g / n if zero_stage >= 2 else psi * g
    optimizer = psi * k / n if zero_stage >= 1 else psi * k
    return TrainingMemory(
        zero_stage=zero_stage, num_gpus=n,
        weights=math.ceil(weights), grads=math.ceil(grads), optimizer=math.ceil(optimizer),
        activations=activation_bytes(cfg, micro_batch, seq_len, precision, checkpointing=False),
        activations_checkpointed=activation_bytes(cfg, micro_batch, seq_len, precision, checkpointing=True),
    )


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inference_cost(cfg: ModelConfig, requests_per_s: float, prompt_tokens: int, output_tokens: int,
                   latency_s: float, tokens_per_s_per_gpu: float | None = None, gpu_hour_price: float = 2.5,
                   *, prefill_tokens_per_s_per_gpu: float | None = None, precision: str = "bf16",
                   gpu_memory_gb: float = DEFAULT_GPU["memory_gb"], gpu_peak_tflops: float = DEFAULT_GPU[
                       "peak_tflops"], gpu_bandwidth_gbs: float = DEFAULT_GPU["bandwidth_gbs"]) -> InferenceCost:
    """GPUs needed and cost per 1M tokens to serve ``requests_per_s`` within ``latency_s``.

    * Replica: the weights (``params * bytes``) must fit in ``USABLE_MEMORY_FRACTION``
      of GPU memory; otherwise they are split over ``gpus_per_replica`` GPUs.
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
    notes: list[str] = []
    weight_bytes = count_parameters(cfg) * a
    usable = gpu_memory_gb * 1e9 * USABLE_MEMORY_FRACTION
    gpus_per_replica = max(1, math.ceil(weight_bytes / usable))
    free_per_replica = gpus_per_replica * usable - weight_bytes
    context = prompt_tokens + output_tokens
    if context > cfg.max_seq_len:
        notes.append(f"prompt + output = {context} tokens exceeds max_seq_len={cfg.max_seq_len}")
    kv_per_request = kv_cache_bytes_per_token(cfg, precision) * context
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
        kv_read = kv_cache_bytes_per_token(cfg, precision) * (prompt_tokens + output_tokens / 2)
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
        cost_per_million_output_tokens=cost_per_hour / output_per_hour * 1e6, notes=notes)


# ---------------------------------------------------------------------------- everything at once
def describe(cfg: ModelConfig, *, num_gpus: int = 8, precision: str = "bf16", micro_batch: int = 1,
             seq_len: int | None = None) -> dict[str, Any]:
    """All of the above as one JSON-ready dict (what ``tritium describe --json`` prints, minus cost)."""
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    params = parameter_breakdown(cfg)
    return {
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
            "num_gpus": num_gpus, "precision": precision, "micro_batch": micro_batch, "seq_len": seq_len,
            "activation_bytes_per_token_per_layer": activation_bytes_per_token_per_layer(cfg, precision),
            "stages": {str(stage): training_memory(cfg, stage, num_gpus, precision, micro_batch, seq_len).to_dict()
                       for stage in ZERO_STAGES},
        },
        "kv_cache": {
            "precision": precision,
            "bytes_per_token": kv_cache_bytes_per_token(cfg, precision),
            "bytes_full_context": kv_cache_bytes(cfg, cfg.max_seq_len, 1, precision),
            "max_seq_len": cfg.max_seq_len,
        },
    }
