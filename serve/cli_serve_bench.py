"""``tritium serve-bench``: load-test a running server and price the measured throughput.

N concurrent clients (asyncio + httpx over loopback) send streamed
``/v1/completions`` requests, a seeded mix of prompt and output lengths, until
``--requests`` are done or ``--duration`` seconds pass.  Measured per request:
time to first token (first non-empty chunk), inter-token latency (gaps between
content chunks), output tokens (the ``usage`` the server reports).  The report
gives requests/s, output tokens/s, TTFT and ITL p50/p99, then feeds the
measured tokens/s into ``tritium.serve.cost`` (and, with a model config,
``tritium.model.sizing.inference_cost``): GPUs needed and $ per 1M tokens for
the ``--traffic-rps`` target.

``--checkpoint DIR`` spawns ``tritium serve`` on a free loopback port for the
run (and stops it afterwards) instead of using ``--url``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HELP = "load-test an OpenAI-compatible server: requests/s, tokens/s, TTFT/ITL p50/p99 and cost per 1M tokens"

MAX_REQUESTS = 100_000  # hard bounds, so a typo cannot run forever
MAX_DURATION_S = 3600.0
MAX_CONCURRENCY = 1024

# Prompt material: common words, so prompts tokenize to roughly one token per word on any tokenizer.
_WORDS = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was", "on", "be", "by", "at", "this", "from", "or", "are", "an", "but", "not", "have", "which", "one", "all", "were", "when", "we", "there", "can", "more", "if", "out", "so", "what", "time", "up", "about", "into", "than", "them", "only", "other", "new", "some", "could", "these", "two", "may", "first", "then", "do", "any", "like", "my", "now", "over", "such", "our", "man", "me", "even", "most", "made", "after", "also", "did", "many", "before", "must", "through", "back", "years", "where", "much", "your", "way", "well", "down", "should", "because", "each", "just", "those"]


@dataclass
class BenchConfig:
    url: str  # server base URL (without /v1)
    concurrency: int = 4  # clients sending at once
    requests: int = 32  # requests to complete (the run also stops at duration_s)
    duration_s: float = 60.0  # wall-clock bound
    prompt_tokens: tuple[int, ...] = (16, 64)  # prompt lengths (words) to mix
    max_tokens: tuple[int, ...] = (16, 64)  # output lengths to mix
    model: str | None = None  # model id to send (None = the first in /v1/models)
    api_key: str | None = None  # bearer token
    ignore_eos: bool = True  # ask for exactly max_tokens (server extension), so lengths are as mixed
    chat: bool = False  # use /v1/chat/completions instead of /v1/completions
    seed: int = 0  # workload mix seed
    timeout_s: float = 120.0  # per-request timeout

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


@dataclass
class RequestRecord:
    ok: bool
    status: int
    prompt_tokens: int = 0
    output_tokens: int = 0
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
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    itl_p50_s: float | None
    itl_p99_s: float | None
    latency_p50_s: float | None
    latency_p99_s: float | None
    errors: dict[str, int]  # error message (first 80 chars) -> count
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def make_workload(cfg: BenchConfig) -> list[tuple[str, int]]:
    """(prompt, max_tokens) per request: a seeded mix of the configured lengths."""
    rng = random.Random(cfg.seed)
    work = []
    for _ in range(cfg.requests):
        n_words = rng.choice(cfg.prompt_tokens)
        prompt = " ".join(rng.choice(_WORDS) for _ in range(n_words))
        work.append((prompt, rng.choice(cfg.max_tokens)))
    return work


async def _one_request(client: Any, cfg: BenchConfig, model: str, prompt: str, max_tokens: int) -> RequestRecord:
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
    return summarize(records, wall, cfg)


def summarize(records: list[RequestRecord], wall_s: float, cfg: BenchConfig) -> BenchResult:
    good = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = (r.error or f"HTTP {r.status}")[:80]
            errors[key] = errors.get(key, 0) + 1
    out_tokens = sum(r.output_tokens for r in good)
    prompt_tokens = sum(r.prompt_tokens for r in good)
    ttfts = [r.ttft_s for r in good if r.ttft_s is not None]
    itls = [gap for r in good for gap in r.itl_s]
    latencies = [r.latency_s for r in good]
    return BenchResult(
        completed=len(good), failed=len(records) - len(good), wall_s=wall_s,
        requests_per_s=len(good) / wall_s, output_tokens_per_s=out_tokens / wall_s,
        prompt_tokens_per_s=prompt_tokens / wall_s,
        mean_output_tokens=out_tokens / len(good) if good else 0.0,
        mean_prompt_tokens=prompt_tokens / len(good) if good else 0.0,
        ttft_p50_s=percentile(ttfts, 50), ttft_p99_s=percentile(ttfts, 99),
        itl_p50_s=percentile(itls, 50), itl_p99_s=percentile(itls, 99),
        latency_p50_s=percentile(latencies, 50), latency_p99_s=percentile(latencies, 99),
        errors=errors, config={k: v for k, v in asdict(cfg).items() if k != "api_key"})


def run_bench(cfg: BenchConfig) -> BenchResult:
    """Drive the server at ``cfg.url``; blocking."""
    return asyncio.run(_run(cfg))


# ---------------------------------------------------------------------- spawning a server
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_server(checkpoint: str, extra_args: list[str] | None = None, api_key: str | None = None,
                 startup_timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start ``tritium serve`` on a free loopback port; returns (process, base URL) once /ready answers."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "tritium", "serve", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", *(extra_args or [])]
    env = dict(os.environ)
    if api_key:
        env["TRITIUM_API_KEY"] = api_key
    # stderr to a file, not a pipe: a chatty server must never block on a full pipe buffer.
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the server; closed in stop_server
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log = log  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"tritium serve exited with {proc.returncode}: {log.read()[-800:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=1.0).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"tritium serve did not become ready within {startup_timeout_s:g} s")


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


# ---------------------------------------------------------------------- command line
def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--checkpoint", metavar="DIR", help="spawn `tritium serve` on this checkpoint for the run")
    parser.add_argument("--api-key", default=None, help="bearer token (default: $TRITIUM_API_KEY)")
    parser.add_argument("--model", default=None, help="model id (default: the first of /v1/models)")
    load = parser.add_argument_group("load")
    load.add_argument("--concurrency", type=int, default=4, help="concurrent clients (default 4)")
    load.add_argument("--requests", type=int, default=32, help="requests to complete (default 32)")
    load.add_argument("--duration", type=float, default=60.0, help="stop after this many seconds (default 60)")
    load.add_argument("--prompt-tokens", type=_int_list, default=(16, 64),
                      help="prompt lengths in words to mix, comma-separated (default 16,64)")
    load.add_argument("--max-tokens", type=_int_list, default=(16, 64),
                      help="output lengths to mix, comma-separated (default 16,64)")
    load.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    load.add_argument("--no-ignore-eos", action="store_true",
                      help="let requests stop at end-of-sequence (default: generate exactly max_tokens)")
    load.add_argument("--seed", type=int, default=0, help="workload mix seed")
    cost = parser.add_argument_group("cost (fed the measured tokens/s)")
    cost.add_argument("--traffic-rps", type=float, default=10.0, help="target requests/s to price (default 10)")
    cost.add_argument("--gpu-hour-price", type=float, default=2.5, help="dollars per GPU-hour (default 2.5)")
    cost.add_argument("--gpus-per-replica", type=int, default=1, help="GPUs one server uses (default 1)")
    cost.add_argument("--latency-s", type=float, default=10.0, help="end-to-end latency target (default 10)")
    cost.add_argument("--ttft-target-ms", type=float, default=None, help="TTFT p99 target")
    cost.add_argument("--itl-target-ms", type=float, default=None, help="inter-token latency p99 target")
    cost.add_argument("--model-config", default=None,
                      help="preset name or config.json for the sizing model (default: the checkpoint's)")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for the spawned server (repeatable), e.g. --server-arg=--device=cpu")


def _model_config(args: argparse.Namespace) -> Any:
    from tritium.model.config import ModelConfig

    source = args.model_config or (str(Path(args.checkpoint) / "config.json") if args.checkpoint else None)
    if source is None:
        return None
    if source.endswith(".json") or os.path.exists(source):
        return ModelConfig.from_json(source)
    return ModelConfig.from_name(source)


def run(args: argparse.Namespace) -> int:
    from tritium.serve.cost import TrafficTarget, estimate_cost, format_estimate

    api_key = args.api_key or os.environ.get("TRITIUM_API_KEY")
    proc = None
    url = args.url
    if args.checkpoint:
        proc, url = spawn_server(args.checkpoint, args.server_arg, api_key=api_key)
    try:
        cfg = BenchConfig(url=url, concurrency=args.concurrency, requests=args.requests, duration_s=args.duration,
                          prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, model=args.model,
                          api_key=api_key, ignore_eos=not args.no_ignore_eos, chat=args.chat, seed=args.seed)
        result = run_bench(cfg)
    finally:
        if proc is not None:
            stop_server(proc)
    print(format_result(result))
    report: dict[str, Any] = {"bench": result.to_dict(), "cost": None}
    if result.output_tokens_per_s > 0:
        target = TrafficTarget(
            requests_per_s=args.traffic_rps, output_tokens_per_request=max(result.mean_output_tokens, 1.0),
            prompt_tokens_per_request=result.mean_prompt_tokens, latency_s=args.latency_s,
            ttft_p99_s=args.ttft_target_ms / 1e3 if args.ttft_target_ms else None,
            itl_p99_s=args.itl_target_ms / 1e3 if args.itl_target_ms else None,
            gpu_hour_usd=args.gpu_hour_price, gpus_per_replica=args.gpus_per_replica)
        estimate = estimate_cost(result.output_tokens_per_s, target, result.ttft_p99_s, result.itl_p99_s,
                                 model_config=_model_config(args))
        print(f"\ncost at {args.traffic_rps:g} requests/s x {target.output_tokens_per_request:.0f} output tokens:")
        print(format_estimate(estimate))
        report["cost"] = estimate.to_dict()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if result.completed else 1


def format_result(r: BenchResult) -> str:
    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value * 1e3:.1f} ms"

    lines = [
        (f"requests        : {r.completed} ok, {r.failed} failed in {r.wall_s:.2f} s "
         f"(concurrency {r.config['concurrency']})"),
        f"requests/s      : {r.requests_per_s:.2f}",
        f"output tokens/s : {r.output_tokens_per_s:.1f} (mean {r.mean_output_tokens:.1f} per request)",
        f"TTFT            : p50 {ms(r.ttft_p50_s)}, p99 {ms(r.ttft_p99_s)}",
        f"inter-token     : p50 {ms(r.itl_p50_s)}, p99 {ms(r.itl_p99_s)}",
        f"latency         : p50 {ms(r.latency_p50_s)}, p99 {ms(r.latency_p99_s)}",
    ]
    lines += [f"error x{count}: {message}" for message, count in r.errors.items()]
    return "\n".join(lines)
