"""Prometheus metrics of the server (``GET /metrics``).

Each app gets its own ``CollectorRegistry`` so several servers (tests, a
bench that spawns one) can live in one process.  Engine gauges (queue depth,
KV blocks) are read from ``engine.stats()`` at scrape time rather than pushed,
so they are never stale.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

PREFIX = "tritium"

# Latency buckets in seconds: TTFT spans a CPU-sized tiny model to a long prefill on a GPU;
# inter-token latency is a few ms on a GPU, tens on a CPU.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

METRIC_NAMES = {  # name -> help; the README lists these
    "requests_total": "HTTP requests to /v1 routes by endpoint and status code",
    "prompt_tokens_total": "prompt tokens prefilled",
    "completion_tokens_total": "tokens generated (retries included)",
    "time_to_first_token_seconds": "time from request arrival to the first generated token",
    "inter_token_latency_seconds": "time between consecutive generated tokens of one request",
    "request_duration_seconds": "time from request arrival to the last token",
    "errors_total": "errors by kind (invalid_request, auth, model_not_found, body_too_large, queue_full, "
                    "context_length, policy, client_disconnected, shutting_down, internal)",
    "policy_violations_total": "guardrail violations by check",
    "finish_reasons_total": "finished choices by finish_reason",
    "requests_in_flight": "generation requests admitted and not finished",
    "queue_depth": "requests waiting in the engine for a batch slot",
    "running_requests": "requests in the engine's running batch",
    "kv_blocks_used": "KV-cache blocks in use",
    "kv_blocks_total": "KV-cache blocks available in all",
    "prefix_cache_queries": "prompt tokens looked up in the prefix cache (cumulative)",
    "prefix_cache_hits": "prompt tokens found in the prefix cache, not recomputed (cumulative)",
    "prefix_cache_hit_rate": "prefix_cache_hits / prefix_cache_queries",
    "spec_proposed_tokens": "speculative decoding: tokens proposed (0 without --speculative)",
    "spec_accepted_tokens": "speculative decoding: proposed tokens the model accepted",
    "spec_acceptance_rate": "speculative decoding: accepted / proposed",
    "spec_mean_accepted_length": "speculative decoding: tokens emitted per verification pass",
    "spec_draft_kv_blocks_used": "speculative decoding: the draft model's own KV-cache blocks in use",
}


class ServeMetrics:
    def __init__(self, stats: Callable[[], dict[str, Any]]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        reg = self.registry

        def name(key: str) -> str:
            return f"{PREFIX}_{key}"

        # Counter names drop the _total suffix; prometheus_client adds it back.
        self.requests = Counter(name("requests"), METRIC_NAMES["requests_total"], ["endpoint", "status"],
                                registry=reg)
        self.prompt_tokens = Counter(name("prompt_tokens"), METRIC_NAMES["prompt_tokens_total"], registry=reg)
        self.completion_tokens = Counter(name("completion_tokens"), METRIC_NAMES["completion_tokens_total"],
                                         registry=reg)
        self.ttft = Histogram(name("time_to_first_token_seconds"), METRIC_NAMES["time_to_first_token_seconds"],
                              buckets=TTFT_BUCKETS, registry=reg)
        self.itl = Histogram(name("inter_token_latency_seconds"), METRIC_NAMES["inter_token_latency_seconds"],
                             buckets=ITL_BUCKETS, registry=reg)
        self.duration = Histogram(name("request_duration_seconds"), METRIC_NAMES["request_duration_seconds"],
                                  buckets=E2E_BUCKETS, registry=reg)
        self.errors = Counter(name("errors"), METRIC_NAMES["errors_total"], ["kind"], registry=reg)
        self.policy_violations = Counter(name("policy_violations"), METRIC_NAMES["policy_violations_total"],
                                         ["check"], registry=reg)
        self.finish_reasons = Counter(name("finish_reasons"), METRIC_NAMES["finish_reasons_total"], ["reason"],
                                      registry=reg)
        self.in_flight = Gauge(name("requests_in_flight"), METRIC_NAMES["requests_in_flight"], registry=reg)
        for key, stat in (("queue_depth", "num_waiting"), ("running_requests", "num_running"),
                          ("kv_blocks_used", "kv_blocks_used"), ("kv_blocks_total", "kv_blocks_total"),
                          ("prefix_cache_queries", "prefix_cache_queries"),
                          ("prefix_cache_hits", "prefix_cache_hits"),
                          ("spec_proposed_tokens", "spec_proposed"), ("spec_accepted_tokens", "spec_accepted"),
                          ("spec_acceptance_rate", "spec_acceptance_rate"),
                          ("spec_mean_accepted_length", "spec_mean_accepted_length"),
                          ("spec_draft_kv_blocks_used", "spec_draft_kv_blocks_used")):
            gauge = Gauge(name(key), METRIC_NAMES[key], registry=reg)
            gauge.set_function(_stat_reader(stats, stat))
        queries, hits = _stat_reader(stats, "prefix_cache_queries"), _stat_reader(stats, "prefix_cache_hits")
        Gauge(name("prefix_cache_hit_rate"), METRIC_NAMES["prefix_cache_hit_rate"], registry=reg).set_function(
            lambda: hits() / queries() if queries() > 0 else 0.0)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _stat_reader(stats: Callable[[], dict[str, Any]], key: str) -> Callable[[], float]:
    def read() -> float:
        try:
            return float(stats().get(key, 0) or 0)
        except Exception:  # noqa: BLE001 - a scrape must not fail because the engine is shutting down
            return float("nan")
    return read
