"""Cost accounting: from measured tokens/s to GPUs needed and dollars per million tokens.

Cost is designed up front: traffic x tokens per request x latency target fixes
how many model replicas must run, and so what a token costs.  The measured
side comes from ``tritium serve-bench`` (output tokens/s of one replica at a
given concurrency, with its TTFT and inter-token latency); the model side, when
a model config is known, from ``tritium.model.sizing.inference_cost`` (the
roofline estimate the ``describe --cost`` command prints), so the report can
show how far the measured server is from the hardware's ceiling.

Throughput rises with concurrency while latency worsens, so a throughput is
only usable if the latency measured at that concurrency meets the target; the
estimate says so instead of silently pricing an unusable operating point.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class TrafficTarget:
    requests_per_s: float = 10.0  # sustained request rate to serve
    output_tokens_per_request: float = 256.0  # mean generated tokens per request
    prompt_tokens_per_request: float = 512.0  # mean prompt tokens per request (reported, and for the model side)
    # of those, served from the prefix cache (measured by serve-bench): the model side prefills only the rest
    cached_prompt_tokens_per_request: float = 0.0
    latency_s: float = 10.0  # end-to-end latency target per request (sizing's Little's-law input)
    ttft_p99_s: float | None = None  # latency target: 99th percentile time to first token, seconds
    itl_p99_s: float | None = None  # latency target: 99th percentile inter-token latency, seconds
    gpu_hour_usd: float = 2.0  # price of one GPU-hour
    gpus_per_replica: int = 1  # GPUs one server replica occupies (at least its tensor-parallel degree)
    tensor_parallel: int = 1  # GPUs the measured server splits the model over (tritium serve --tensor-parallel)

    def __post_init__(self) -> None:
        for name in ("requests_per_s", "output_tokens_per_request", "gpu_hour_usd", "latency_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
                raise ValueError(f"TrafficTarget.{name} must be a positive number, got {value!r}")
        if self.prompt_tokens_per_request < 0:
            raise ValueError(f"TrafficTarget.prompt_tokens_per_request must be >= 0, "
                             f"got {self.prompt_tokens_per_request!r}")
        if not 0 <= self.cached_prompt_tokens_per_request <= self.prompt_tokens_per_request:
            raise ValueError(f"TrafficTarget.cached_prompt_tokens_per_request must be in [0, prompt_tokens_per_request"
                             f"={self.prompt_tokens_per_request!r}], got {self.cached_prompt_tokens_per_request!r}")
        for name in ("ttft_p99_s", "itl_p99_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"TrafficTarget.{name} must be positive or None, got {value!r}")
        if not isinstance(self.gpus_per_replica, int) or self.gpus_per_replica < 1:
            raise ValueError(f"TrafficTarget.gpus_per_replica must be an integer >= 1, got {self.gpus_per_replica!r}")
        if not isinstance(self.tensor_parallel, int) or self.tensor_parallel < 1:
            raise ValueError(f"TrafficTarget.tensor_parallel must be an integer >= 1, got {self.tensor_parallel!r}")
        if self.gpus_per_replica < self.tensor_parallel:
            raise ValueError(f"TrafficTarget.gpus_per_replica={self.gpus_per_replica} is below tensor_parallel="
                             f"{self.tensor_parallel}: a replica occupies at least the GPUs its model is split over")


@dataclass
class CostEstimate:
    required_output_tokens_per_s: float  # traffic x output tokens per request
    measured_output_tokens_per_s: float  # one replica, at the measured concurrency
    replicas_needed: int  # ceil(required / measured)
    gpus_needed: int  # replicas x GPUs per replica
    usd_per_hour: float  # the fleet's hourly price
    usd_per_1m_output_tokens_at_capacity: float  # one replica fully busy
    usd_per_1m_output_tokens_at_target: float  # the fleet at the target traffic (includes headroom)
    meets_latency_target: bool | None  # None when no latency target was given
    latency_notes: list[str]  # why the target is (not) met
    model_estimate: dict[str, Any] | None = None  # tritium.model.sizing.inference_cost output, when available
    gpus_per_replica: int = 1  # the target's, so the estimate reads on its own

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate_cost(measured_output_tokens_per_s: float, target: TrafficTarget,
                  measured_ttft_p99_s: float | None = None, measured_itl_p99_s: float | None = None,
                  model_config: Any = None, measured_latency_p99_s: float | None = None) -> CostEstimate:
    """Price the target traffic from one replica's measured throughput (and latency).

    ``meets_latency_target`` is the one latency verdict: every measured p99 given (TTFT, inter-token,
    end-to-end against ``target.latency_s``) against its target; the sizing model's roofline
    ``latency_feasible`` (an H100-class estimate) is not a measurement and does not enter it.
    """
    if not measured_output_tokens_per_s > 0:
        raise ValueError(f"measured output tokens/s must be positive, got {measured_output_tokens_per_s!r} "
                         "(did any request succeed?)")
    required = target.requests_per_s * target.output_tokens_per_request
    replicas = max(1, math.ceil(required / measured_output_tokens_per_s))
    gpus = replicas * target.gpus_per_replica
    usd_per_hour = gpus * target.gpu_hour_usd
    per_replica_hour = target.gpus_per_replica * target.gpu_hour_usd
    at_capacity = per_replica_hour / (measured_output_tokens_per_s * 3600.0) * 1e6
    at_target = usd_per_hour / (required * 3600.0) * 1e6

    notes: list[str] = []
    meets: bool | None = None
    checks = [("TTFT p99", target.ttft_p99_s, measured_ttft_p99_s),
              ("inter-token latency p99", target.itl_p99_s, measured_itl_p99_s)]
    if measured_latency_p99_s is not None:
        checks.append(("end-to-end latency p99", target.latency_s, measured_latency_p99_s))
    for label, wanted, measured in checks:
        if wanted is None:
            continue
        meets = True if meets is None else meets
        if measured is None:
            notes.append(f"{label}: no measurement")
            meets = False
        elif measured > wanted:
            notes.append(f"{label} {measured * 1e3:.1f} ms exceeds the {wanted * 1e3:.1f} ms target: measure at "
                         "lower concurrency (less throughput per replica, more replicas)")
            meets = False
        else:
            notes.append(f"{label} {measured * 1e3:.1f} ms meets the {wanted * 1e3:.1f} ms target")
    return CostEstimate(
        required_output_tokens_per_s=required,
        measured_output_tokens_per_s=measured_output_tokens_per_s,
        replicas_needed=replicas,
        gpus_needed=gpus,
        usd_per_hour=usd_per_hour,
        usd_per_1m_output_tokens_at_capacity=at_capacity,
        usd_per_1m_output_tokens_at_target=at_target,
        meets_latency_target=meets,
        latency_notes=notes,
        gpus_per_replica=target.gpus_per_replica,
        model_estimate=(model_side_estimate(model_config, target, measured_output_tokens_per_s)
                        if model_config is not None else None),
    )


def model_side_estimate(model_config: Any, target: TrafficTarget,
                        measured_output_tokens_per_s: float | None = None) -> dict[str, Any] | None:
    """``tritium.model.sizing.inference_cost`` for the same traffic, fed the measured tokens/s.

    None when the sizing module is unavailable.  The measured rate is per
    replica; sizing wants it per GPU (of a replica of ``target.tensor_parallel`` GPUs, which sizing
    also uses for the per-GPU memory and the all-reduce traffic).  Prefill is left to sizing's roofline
    (the measured decode rate already paid for the prefills it ran alongside), and it prefills only the
    prompt tokens the prefix cache did not serve (``cached_prompt_tokens_per_request``, measured).
    """
    try:
        from tritium.model.sizing import inference_cost
    except ImportError:
        return None
    per_gpu = (measured_output_tokens_per_s / target.gpus_per_replica
               if measured_output_tokens_per_s else None)
    try:
        result = inference_cost(model_config, requests_per_s=target.requests_per_s,
                                prompt_tokens=int(round(target.prompt_tokens_per_request
                                                        - target.cached_prompt_tokens_per_request)),
                                output_tokens=max(1, int(target.output_tokens_per_request)),
                                latency_s=target.latency_s, tokens_per_s_per_gpu=per_gpu,
                                gpu_hour_price=target.gpu_hour_usd, tensor_parallel=target.tensor_parallel)
    except (TypeError, ValueError, KeyError) as exc:
        return {"error": f"inference_cost could not price this config: {exc}"}
    result = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    if per_gpu is not None:
        result["notes"] = [n for n in result.get("notes", []) if "roofline estimate" not in n] + [
            ("decode tokens/s is the measured rate; the prefill rate is sizing's roofline estimate (the measured "
             "rate already paid for the prefills that ran alongside decoding)")]
    return result


def format_estimate(est: CostEstimate) -> str:
    lines = [
        f"required output tokens/s : {est.required_output_tokens_per_s:,.1f}",
        f"measured tokens/s/replica: {est.measured_output_tokens_per_s:,.1f}",
        (f"replicas needed          : {est.replicas_needed} ({est.gpus_needed} GPU(s)"
         + (f", {est.gpus_per_replica} per replica" if est.gpus_per_replica > 1 else "")
         + f", ${est.usd_per_hour:,.2f}/h)"),
        (f"$ per 1M output tokens   : {est.usd_per_1m_output_tokens_at_capacity:,.4f} at capacity, "
         f"{est.usd_per_1m_output_tokens_at_target:,.4f} at the target traffic"),
    ]
    if est.meets_latency_target is not None:
        lines.append(f"latency target met       : {'yes' if est.meets_latency_target else 'NO'}")
    lines += [f"  - {note}" for note in est.latency_notes]
    model = est.model_estimate
    if model and "error" in model:
        lines.append(f"sizing model: {model['error']}")
    elif model:
        lines.append("sizing model (tritium.model.sizing.inference_cost, with the measured tokens/s):")
        # latency_feasible is left out: a roofline guess beside the measured verdict above would contradict it
        keys = ("tensor_parallel", "all_reduce_bytes_per_token_per_gpu")  # the GB/s needed is in its note
        for key in (*(keys if model.get("tensor_parallel", 1) > 1 else ()), "gpus_per_replica", "gpus_for_compute", "gpus_for_memory", "gpus_needed", "utilization",
                    "cost_per_million_output_tokens", "cost_per_million_tokens"):
            if key in model:
                value = model[key]
                lines.append(f"  {key}: {value:,.4g}" if isinstance(value, float) else f"  {key}: {value}")
        lines += [f"  note: {note}" for note in model.get("notes", []) if "latency target" not in note]
    return "\n".join(lines)
