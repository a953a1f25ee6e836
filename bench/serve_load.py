"""The serving load test behind ``tritium serve-bench``: concurrent streamed requests, timed.

N concurrent clients (asyncio + httpx over loopback) send streamed
``/v1/completions`` requests, a seeded mix of prompt and output lengths, until
``cfg.requests`` are done or ``cfg.duration_s`` seconds pass.  Measured per
request: time to first token (first non-empty chunk), inter-token latency
(gaps between content chunks), output and prompt tokens (the ``usage`` the
server reports, including OpenAI's ``prompt_tokens_details.cached_tokens``).
``run_bench`` returns requests/s, output tokens/s, TTFT mean / p50 / p90 / p99,
ITL / end-to-end p50 and p99 (``bench.timing.percentile``), prefill tokens
computed (prompt tokens minus cached tokens), and the server's own prefix-cache
counters from ``/metrics`` (scraped before and after the run; the difference).

A shared prefix (``shared_prefix_tokens``, the field's "system prompt"
workload): every request's prompt starts with the same N tokens, followed by
its own distinct tokens of the mixed ``prompt_tokens`` lengths -- what
automatic prefix caching is meant to save.

Prompt lengths are **tokens**: completions send token-id prompts of exactly
the configured length (ids 16-255, byte-fallback pieces any vocabulary of 256+
tokens has), so the length does not depend on the server's tokenizer.  Chat
requests must send text; there each word of common English is about one
token, and the reported ``mean_prompt_tokens`` (from ``usage``) is exact.

``spawn_server`` / ``stop_server`` run ``tritium serve`` on a free loopback port.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from tritium.bench.timing import percentile
from tritium.net import free_port

MAX_REQUESTS = 100_000  # hard bounds, so a typo cannot run forever
MAX_DURATION_S = 3600.0
MAX_CONCURRENCY = 1024

# Completion prompts: token ids in this range (byte-fallback pieces; below 16 sit control and chat-marker ids).
PROMPT_ID_RANGE = (16, 256)
# Chat prompts must be text: common words, about one token each on any tokenizer.
_WORDS = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was", "on", "be", "by", "at", "this", "from", "or", "are", "an", "but", "not", "have", "which", "one", "all", "were", "when", "we", "there", "can", "more", "if", "out", "so", "what", "time", "up", "about", "into", "than", "them", "only", "other", "new", "some", "could", "these", "two", "may", "first", "then", "do", "any", "like", "my", "now", "over", "such", "our", "man", "me", "even", "most", "made", "after", "also", "did", "many", "before", "must", "through", "back", "years", "where", "much", "your", "way", "well", "down", "should", "because", "each", "just", "those"]


@dataclass
class BenchConfig:
    url: str  # server base URL (without /v1)
    concurrency: int = 4  # clients sending at once
    requests: int = 32  # requests to complete (the run also stops at duration_s)
    duration_s: float = 60.0  # wall-clock bound
    prompt_tokens: tuple[int, ...] = (16, 64)  # prompt lengths in tokens to mix (chat: words, about a token each)
    max_tokens: tuple[int, ...] = (16, 64)  # output lengths to mix
    model: str | None = None  # model id to send (None = the first in /v1/models)
    api_key: str | None = None  # bearer token
    ignore_eos: bool = True  # ask for exactly max_tokens (server extension), so lengths are as mixed
    chat: bool = False  # use /v1/chat/completions instead of /v1/completions
    seed: int = 0  # workload mix seed
    timeout_s: float = 120.0  # per-request timeout
    shared_prefix_tokens: int = 0  # tokens every prompt starts with (a system prompt), before its own prompt_tokens
    warmup_requests: int = 0  # untimed requests first (one-time costs of a fresh server); they share no prefix

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"--concurrency must be in 1..{MAX_CONCURRENCY}, got {self.concurrency}")
        if not 1 <= self.requests <= MAX_REQUESTS:
            raise ValueError(f"--requests must be in 1..{MAX_REQUESTS}, got {self.requests}")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise ValueError(f"--duration must be in (0, {MAX_DURATION_S:g}] seconds, got {self.duration_s}")
        for name in ("prompt_tokens", "max_tokens"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"--{name.replace('_', '-')} must be a comma-separated list of positive integers")
        if not isinstance(self.warmup_requests, int) or self.warmup_requests < 0:
            raise ValueError(f"--warmup-requests must be a non-negative integer, got {self.warmup_requests!r}")
        if not isinstance(self.shared_prefix_tokens, int) or self.shared_prefix_tokens < 0:
            raise ValueError(f"--shared-prefix-tokens must be a non-negative integer, got {self.shared_prefix_tokens!r}")


@dataclass
class RequestRecord:
    ok: bool
    status: int
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    latency_s: float = 0.0
    error: str | None = None


@dataclass
class BenchResult:
    completed: int  # successful requests
    failed: int  # requests with an error (status or in-stream)
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    prompt_tokens_per_s: float
    mean_output_tokens: float
    mean_prompt_tokens: float
    prompt_tokens: int  # total over completed requests (usage)
    cached_prompt_tokens: int  # of those, served from the prefix cache (usage cached_tokens)
    prefill_tokens: int  # prompt tokens the server computed: prompt_tokens - cached_prompt_tokens
    cache_hit_rate: float  # cached_prompt_tokens / prompt_tokens
    ttft_mean_s: float | None
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    ttft_p99_s: float | None
    itl_p50_s: float | None
    itl_p99_s: float | None
    latency_p50_s: float | None
    latency_p99_s: float | None
    errors: dict[str, int]  # error message (first 80 chars) -> count
    config: dict[str, Any]
    # the server's /metrics prefix-cache counters over the run (after - before), in tokens; None if not exported
    server_prefix_cache: dict[str, float] | None = None

    @property
    def failure_rate(self) -> float:
        """Failed / attempted requests (1.0 when none was attempted)."""
        attempted = self.completed + self.failed
        return self.failed / attempted if attempted else 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_workload(cfg: BenchConfig) -> list[tuple[str | list[int], int]]:
    """(prompt, max_tokens) per request: a seeded mix of the configured lengths.  Completion prompts are
    token-id lists of exactly ``shared_prefix_tokens`` + the drawn length, the first
    ``shared_prefix_tokens`` ids the same in every request; chat prompts are that many words."""
    rng = random.Random(cfg.seed)
    # The prefix has its own generator, so the per-request mix is the same with and without one.
    prefix_rng = random.Random(f"shared-prefix-{cfg.seed}")
    if cfg.chat:
        prefix: str | list[int] = " ".join(prefix_rng.choice(_WORDS) for _ in range(cfg.shared_prefix_tokens))
    else:
        prefix = [prefix_rng.randrange(*PROMPT_ID_RANGE) for _ in range(cfg.shared_prefix_tokens)]
    work: list[tuple[str | list[int], int]] = []
    for _ in range(cfg.requests):
        length = rng.choice(cfg.prompt_tokens)
        if cfg.chat:
            own = " ".join(rng.choice(_WORDS) for _ in range(length))
            prompt: str | list[int] = f"{prefix} {own}" if prefix else own
        else:
            prompt = [*prefix, *(rng.randrange(*PROMPT_ID_RANGE) for _ in range(length))]
        work.append((prompt, rng.choice(cfg.max_tokens)))
    return work


PREFIX_CACHE_METRICS = {"queries": "tritium_prefix_cache_queries", "hits": "tritium_prefix_cache_hits"}


async def scrape_prefix_cache(client: Any) -> dict[str, float] | None:
    """The server's cumulative prefix-cache counters (tokens) from ``GET /metrics``; None when the server
    does not export them (another server, or metrics off)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        response = await client.get("/metrics")
    except Exception:  # noqa: BLE001 - the counters are optional; the load test does not depend on them
        return None
    if response.status_code != 200:
        return None
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            for key, metric in PREFIX_CACHE_METRICS.items():
                if sample.name == metric:
                    found[key] = sample.value
    return found if len(found) == len(PREFIX_CACHE_METRICS) else None


async def _one_request(client: Any, cfg: BenchConfig, model: str, prompt: str | list[int], max_tokens: int) -> RequestRecord:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "stream": True,
                            "stream_options": {"include_usage": True}, "temperature": 1.0}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    t0 = time.perf_counter()
    record = RequestRecord(ok=False, status=0)
    last = None
    try:
        async with client.stream("POST", path, json=body) as response:
            record.status = response.status_code
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                try:
                    record.error = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    record.error = text[:200]
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    record.ok = record.error is None
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    record.error = chunk["error"].get("message", "error")
                    continue
                if chunk.get("usage"):
                    record.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    record.output_tokens = chunk["usage"]["completion_tokens"]
                    details = chunk["usage"].get("prompt_tokens_details") or {}
                    record.cached_tokens = int(details.get("cached_tokens") or 0)
                for choice in chunk.get("choices", []):
                    text = choice.get("text") if not cfg.chat else (choice.get("delta") or {}).get("content")
                    if text:
                        now = time.perf_counter()
                        if last is None:
                            record.ttft_s = now - t0
                        else:
                            record.itl_s.append(now - last)
                        last = now
    except Exception as exc:  # noqa: BLE001 - counted, the bench goes on
        record.error = f"{type(exc).__name__}: {exc}"
    record.latency_s = time.perf_counter() - t0
    return record


async def _run(cfg: BenchConfig) -> BenchResult:
    import httpx

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    async with httpx.AsyncClient(base_url=cfg.url.rstrip("/"), headers=headers, timeout=cfg.timeout_s,
                                 limits=limits) as client:
        model = cfg.model
        if model is None:
            response = await client.get("/v1/models")
            if response.status_code != 200:
                raise ValueError(f"GET {cfg.url}/v1/models answered {response.status_code}: {response.text[:200]}")
            model = response.json()["data"][0]["id"]
        work = make_workload(cfg)
        # Warm-up prompts are drawn from another seed, so they put nothing of the shared prefix in the cache.
        warm_rng = random.Random(f"warmup-{cfg.seed}")
        for _ in range(cfg.warmup_requests):
            length = cfg.shared_prefix_tokens + max(cfg.prompt_tokens)
            prompt: str | list[int] = (" ".join(warm_rng.choice(_WORDS) for _ in range(length)) if cfg.chat else
                                       [warm_rng.randrange(*PROMPT_ID_RANGE) for _ in range(length)])
            await _one_request(client, cfg, model, prompt, min(cfg.max_tokens))
        before = await scrape_prefix_cache(client)
        records: list[RequestRecord] = []
        next_index = 0
        t0 = time.perf_counter()
        deadline = t0 + cfg.duration_s

        async def client_loop() -> None:
            nonlocal next_index
            while next_index < len(work) and time.perf_counter() < deadline:
                prompt, max_tokens = work[next_index]
                next_index += 1
                remaining = max(0.1, deadline - time.perf_counter())
                try:
                    record = await asyncio.wait_for(_one_request(client, cfg, model, prompt, max_tokens), remaining)
                except asyncio.TimeoutError:
                    record = RequestRecord(ok=False, status=0, error="cut off by --duration")
                records.append(record)

        await asyncio.gather(*(client_loop() for _ in range(cfg.concurrency)))
        wall = time.perf_counter() - t0
        after = await scrape_prefix_cache(client) if before is not None else None
    result = summarize(records, wall, cfg)
    if before is not None and after is not None:
        queries, hits = after["queries"] - before["queries"], after["hits"] - before["hits"]
        result.server_prefix_cache = {"queries": queries, "hits": hits,
                                      "hit_rate": hits / queries if queries > 0 else 0.0}
    return result


def summarize(records: list[RequestRecord], wall_s: float, cfg: BenchConfig) -> BenchResult:
    good = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = (r.error or f"HTTP {r.status}")[:80]
            errors[key] = errors.get(key, 0) + 1
    out_tokens = sum(r.output_tokens for r in good)
    prompt_tokens = sum(r.prompt_tokens for r in good)
    cached = sum(r.cached_tokens for r in good)
    ttfts = [r.ttft_s for r in good if r.ttft_s is not None]
    itls = [gap for r in good for gap in r.itl_s]
    latencies = [r.latency_s for r in good]
    return BenchResult(
        completed=len(good), failed=len(records) - len(good), wall_s=wall_s,
        requests_per_s=len(good) / wall_s, output_tokens_per_s=out_tokens / wall_s,
        prompt_tokens_per_s=prompt_tokens / wall_s,
        mean_output_tokens=out_tokens / len(good) if good else 0.0,
        mean_prompt_tokens=prompt_tokens / len(good) if good else 0.0,
        prompt_tokens=prompt_tokens, cached_prompt_tokens=cached, prefill_tokens=prompt_tokens - cached,
        cache_hit_rate=cached / prompt_tokens if prompt_tokens else 0.0,
        ttft_mean_s=sum(ttfts) / len(ttfts) if ttfts else None,
        ttft_p50_s=percentile(ttfts, 50), ttft_p90_s=percentile(ttfts, 90), ttft_p99_s=percentile(ttfts, 99),
        itl_p50_s=percentile(itls, 50), itl_p99_s=percentile(itls, 99),
        latency_p50_s=percentile(latencies, 50), latency_p99_s=percentile(latencies, 99),
        errors=errors, config={k: v for k, v in asdict(cfg).items() if k != "api_key"})


def run_bench(cfg: BenchConfig) -> BenchResult:
    """Drive the server at ``cfg.url``; blocking."""
    return asyncio.run(_run(cfg))


# ---------------------------------------------------------------------- spawning a server
def serve_command(checkpoint: str, port: int, extra_args: list[str] | None = None,
                  tensor_parallel: int = 1) -> list[str]:
    """The ``tritium serve`` command line ``spawn_server`` runs (``--tensor-parallel N`` only when N > 1,
    so a plain server's command stays the one-device one)."""
    if not isinstance(tensor_parallel, int) or tensor_parallel < 1:
        raise ValueError(f"tensor_parallel must be a positive integer, got {tensor_parallel!r}")
    return [sys.executable, "-m", "tritium", "serve", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning",
            *(["--tensor-parallel", str(tensor_parallel)] if tensor_parallel > 1 else []), *(extra_args or [])]


def spawn_server(checkpoint: str, extra_args: list[str] | None = None, api_key: str | None = None,
                 startup_timeout_s: float = 120.0, tensor_parallel: int = 1) -> tuple[subprocess.Popen, str]:
    """Start ``tritium serve`` (over ``tensor_parallel`` ranks) on a free loopback port; returns
    (process, base URL) once /ready answers."""
    import httpx

    port = free_port()
    cmd = serve_command(checkpoint, port, extra_args, tensor_parallel)
    env = dict(os.environ)
    if api_key:
        env["TRITIUM_API_KEY"] = api_key
    # stderr to a file, not a pipe: a chatty server must never block on a full pipe buffer.
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the server; closed in stop_server
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log = log  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_timeout_s
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"tritium serve exited with {proc.returncode}: {log.read()[-800:].strip()}")
            try:
                if httpx.get(f"{url}/ready", timeout=1.0).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"tritium serve did not become ready within {startup_timeout_s:g} s")
    except BaseException:  # a timeout, or Ctrl-C while it loads: never leave the server (and its ranks) behind
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """SIGTERM (graceful shutdown), then SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log = getattr(proc, "log", None)
    if log is not None:
        log.close()
    return proc.returncode


def format_result(r: BenchResult) -> str:
    """The human-readable summary ``tritium serve-bench`` prints."""
    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value * 1e3:.1f} ms"

    lines = [
        (f"requests        : {r.completed} ok, {r.failed} failed in {r.wall_s:.2f} s "
         f"(concurrency {r.config['concurrency']})"),
        f"requests/s      : {r.requests_per_s:.2f}",
        f"output tokens/s : {r.output_tokens_per_s:.1f} (mean {r.mean_output_tokens:.1f} per request)",
        f"prompt tokens   : mean {r.mean_prompt_tokens:.1f} per request",
        (f"prefill tokens  : {r.prefill_tokens} computed, {r.cached_prompt_tokens} of {r.prompt_tokens} "
         f"from the prefix cache (hit rate {r.cache_hit_rate:.1%})"),
        f"TTFT            : mean {ms(r.ttft_mean_s)}, p50 {ms(r.ttft_p50_s)}, p90 {ms(r.ttft_p90_s)}, "
        f"p99 {ms(r.ttft_p99_s)}",
        f"inter-token     : p50 {ms(r.itl_p50_s)}, p99 {ms(r.itl_p99_s)}",
        f"latency         : p50 {ms(r.latency_p50_s)}, p99 {ms(r.latency_p99_s)}",
    ]
    if r.server_prefix_cache is not None:
        pc = r.server_prefix_cache
        lines.append(f"server /metrics : prefix cache {pc['hits']:.0f} of {pc['queries']:.0f} tokens hit "
                     f"(hit rate {pc['hit_rate']:.1%}) during the run")
    lines += [f"error x{count}: {message}" for message, count in r.errors.items()]
    return "\n".join(lines)


# What the prefix-caching comparison reports, and which direction is better.
COMPARE_ROWS = (("prefill tokens computed", "prefill_tokens", "count"),
                ("cached prompt tokens", "cached_prompt_tokens", "count"),
                ("TTFT mean", "ttft_mean_s", "ms"), ("TTFT p90", "ttft_p90_s", "ms"),
                ("output tokens/s", "output_tokens_per_s", "rate"),
                ("$ per 1M output tokens", "usd_per_1m_output_tokens", "usd"))


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def format_comparison(runs: dict[str, list[dict[str, float | None]]]) -> str:
    """The ``--compare-prefix-caching`` table: per metric, the median over repeats with caching on and off
    (the min-max spread in brackets when repeated) and the off/on ratio.  ``runs`` maps "on"/"off" to one
    dict per repeat keyed by the ``COMPARE_ROWS`` fields (a missing or None value prints n/a)."""
    def show(values: list[float], unit: str) -> str:
        if not values:
            return "n/a"
        scale, fmt = {"ms": (1e3, "{:.1f} ms"), "count": (1, "{:.0f}"), "rate": (1, "{:.1f}"),
                      "usd": (1, "{:.4g}")}[unit]
        text = fmt.format(_median(values) * scale)
        if len(values) > 1:
            text += f" [{fmt.format(min(values) * scale).split()[0]}-{fmt.format(max(values) * scale).split()[0]}]"
        return text

    repeats = max(len(runs.get("on", [])), len(runs.get("off", [])))
    head = f"{'':24} {'caching on':>24} {'caching off':>24} {'off / on':>9}"
    lines = [f"prefix caching, median of {repeats} run(s) each [min-max]:" if repeats > 1 else
             "prefix caching:", head]
    for label, key, unit in COMPARE_ROWS:
        on = [v[key] for v in runs.get("on", []) if v.get(key) is not None]
        off = [v[key] for v in runs.get("off", []) if v.get(key) is not None]
        ratio = (f"{_median(off) / _median(on):.2f}x" if on and off and _median(on) > 0 else "n/a")
        lines.append(f"{label:24} {show(on, unit):>24} {show(off, unit):>24} {ratio:>9}")
    return "\n".join(lines)
