"""``tritium serve-bench``: load-test a server and price the measured throughput.

The load generator and its timing live in ``tritium.bench.serve_load``; the
pricing in ``tritium.serve.cost``.  This command wires them together: it
drives ``--url`` (or a ``tritium serve`` it spawns on ``--checkpoint``),
prints requests/s, output tokens/s and TTFT / inter-token / end-to-end p50 and
p99, and prices ``--requests-per-s`` from the measured tokens/s -- unless more
than ``--max-failure-rate`` of the requests failed, in which case the numbers
describe a broken run and the command exits 1 without a price.

``--shared-prefix-tokens N`` gives every prompt the same first N tokens (a
system prompt); the report then shows prefill tokens computed vs. served from
the prefix cache (usage and the server's /metrics), and the price uses the
measured rates.  ``--compare-prefix-caching`` (with ``--checkpoint``) runs the
same workload against a server with prefix caching on and one with
``--no-prefix-caching``, ``--repeat`` times each, alternating, and prints the
medians and their off/on ratios.

``--tensor-parallel N`` prices a server that splits the model over N GPUs
(``tritium serve --tensor-parallel N``, passed on to a spawned server): the
measured rate is one N-GPU replica's, and each replica's GPU-hours count N.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from tritium.flags import deprecated_alias

HELP = "load-test an OpenAI-compatible server: requests/s, tokens/s, TTFT/ITL p50/p99 and cost per 1M tokens"


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--checkpoint", metavar="DIR", help="spawn `tritium serve` on this checkpoint for the run")
    parser.add_argument("--api-key", default=None,
                        help="bearer token for a server started with --api-key (default: $TRITIUM_API_KEY)")
    parser.add_argument("--model", default=None, help="model id (default: the first of /v1/models)")
    load = parser.add_argument_group("load")
    load.add_argument("--concurrency", type=int, default=4, help="concurrent clients (default 4)")
    load.add_argument("--requests", type=int, default=32, help="requests to complete (default 32)")
    load.add_argument("--duration", type=float, default=60.0, help="stop after this many seconds (default 60)")
    load.add_argument("--prompt-tokens", type=_int_list, default=(16, 64),
                      help="prompt lengths in tokens to mix, comma-separated (default 16,64)")
    load.add_argument("--max-tokens", type=_int_list, default=(16, 64),
                      help="output lengths in tokens to mix, comma-separated (default 16,64)")
    load.add_argument("--chat", action="store_true",
                      help="use /v1/chat/completions (prompts are then words, about a token each)")
    load.add_argument("--no-ignore-eos", action="store_true",
                      help="let requests stop at end-of-sequence (default: generate exactly max_tokens)")
    load.add_argument("--seed", type=int, default=0, help="workload mix seed")
    load.add_argument("--shared-prefix-tokens", type=int, default=0, metavar="N",
                      help="every prompt starts with the same N tokens (a system prompt), then its own "
                           "--prompt-tokens distinct tokens (default 0: nothing shared)")
    load.add_argument("--warmup-requests", type=int, default=1,
                      help="untimed requests before the run, sharing no prefix (default 1: a fresh server's "
                           "first request pays one-time costs)")
    load.add_argument("--compare-prefix-caching", action="store_true",
                      help="with --checkpoint: run the workload with prefix caching on and off "
                           "(--no-prefix-caching) and print both and their ratio")
    load.add_argument("--repeat", type=int, default=1,
                      help="with --compare-prefix-caching: runs per setting, alternating on/off; the table "
                           "shows medians and min-max (default 1)")
    cost = parser.add_argument_group("cost (fed the measured tokens/s)")
    cost.add_argument("--requests-per-s", type=float, default=10.0, help="target traffic to price (default 10)")
    deprecated_alias(cost, "--traffic-rps", "--requests-per-s", "requests_per_s", type=float)
    cost.add_argument("--max-failure-rate", type=float, default=0.05,
                      help="refuse to price a run where more than this share of requests failed (default 0.05)")
    cost.add_argument("--gpu-hour-price", type=float, default=2.5, help="dollars per GPU-hour (default 2.5)")
    cost.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                      help="GPUs the server splits the model over, as in tritium serve (passed on to a spawned "
                           "server); each replica's GPU-hours count N GPUs (default 1)")
    cost.add_argument("--gpus-per-replica", type=int, default=None,
                      help="GPUs one server uses, if more than --tensor-parallel (default: --tensor-parallel)")
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


def _check_degree(args: argparse.Namespace) -> None:
    from tritium.model.sizing import check_tensor_parallel

    try:
        cfg = _model_config(args)
    except OSError:  # no config to check against: the spawned server reports it
        return
    if cfg is not None:
        try:
            check_tensor_parallel(cfg, args.tensor_parallel)
        except ValueError as exc:
            raise ValueError(f"--tensor-parallel {args.tensor_parallel}: {exc}") from None


def _price(args: argparse.Namespace, result: Any) -> Any:
    from tritium.serve.cost import TrafficTarget, estimate_cost

    target = TrafficTarget(
        requests_per_s=args.requests_per_s, output_tokens_per_request=max(result.mean_output_tokens, 1.0),
        prompt_tokens_per_request=result.mean_prompt_tokens,
        cached_prompt_tokens_per_request=min(result.mean_prompt_tokens,
                                             result.cached_prompt_tokens / max(result.completed, 1)),
        latency_s=args.latency_s,
        ttft_p99_s=args.ttft_target_ms / 1e3 if args.ttft_target_ms else None,
        itl_p99_s=args.itl_target_ms / 1e3 if args.itl_target_ms else None,
        gpu_hour_usd=args.gpu_hour_price, gpus_per_replica=args.gpus_per_replica or args.tensor_parallel,
        tensor_parallel=args.tensor_parallel)
    return target, estimate_cost(result.output_tokens_per_s, target, result.ttft_p99_s, result.itl_p99_s,
                                 model_config=_model_config(args), measured_latency_p99_s=result.latency_p99_s)


def _bench_once(args: argparse.Namespace, cfg: Any, server_args: list[str], api_key: str | None) -> Any:
    from tritium.bench.serve_load import run_bench, spawn_server, stop_server

    proc = None
    if args.checkpoint:
        proc, cfg.url = spawn_server(args.checkpoint, server_args, api_key=api_key,
                                     tensor_parallel=args.tensor_parallel)
    try:
        return run_bench(cfg)
    finally:
        if proc is not None:
            stop_server(proc)


def _compare(args: argparse.Namespace, cfg: Any, api_key: str | None) -> int:
    """Prefix caching on vs. off on the same workload, each setting on a fresh server, alternating."""
    from tritium.bench.serve_load import format_comparison, format_result

    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    results: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    refused = []
    for i in range(args.repeat):
        # alternate which setting goes first, so a drift of the machine does not favour one
        for setting in (("on", "off") if i % 2 == 0 else ("off", "on")):
            extra = [*args.server_arg, *(["--no-prefix-caching"] if setting == "off" else [])]
            result = _bench_once(args, cfg, extra, api_key)
            print(f"--- prefix caching {setting}, run {i + 1}/{args.repeat}\n{format_result(result)}", flush=True)
            row = {key: getattr(result, key) for key in
                   ("prefill_tokens", "cached_prompt_tokens", "ttft_mean_s", "ttft_p90_s", "output_tokens_per_s")}
            estimate = None
            if result.completed > 0 and result.failure_rate <= args.max_failure_rate:
                estimate = _price(args, result)[1]
                row["usd_per_1m_output_tokens"] = estimate.usd_per_1m_output_tokens_at_capacity
            else:
                refused.append(f"caching {setting}, run {i + 1}: {result.failed} of "
                               f"{result.completed + result.failed} requests failed")
            runs[setting].append(row)
            results[setting].append({"bench": result.to_dict(),
                                     "cost": estimate.to_dict() if estimate is not None else None})
    print()
    print(format_comparison(runs))
    if refused:
        print("\nnot priced: " + "; ".join(refused))
    if args.json:
        Path(args.json).write_text(json.dumps({"compare_prefix_caching": results, "refused": refused or None},
                                              indent=2) + "\n")
    return 1 if refused else 0


def run(args: argparse.Namespace) -> int:
    from tritium.bench.serve_load import BenchConfig, format_result
    from tritium.serve.cost import format_estimate

    if not 0 <= args.max_failure_rate < 1:
        raise ValueError(f"--max-failure-rate must be in [0, 1), got {args.max_failure_rate}")
    if args.tensor_parallel < 1:
        raise ValueError(f"--tensor-parallel must be a positive integer, got {args.tensor_parallel}")
    if args.gpus_per_replica is not None and args.gpus_per_replica < args.tensor_parallel:
        raise ValueError(f"--gpus-per-replica {args.gpus_per_replica} is below --tensor-parallel "
                         f"{args.tensor_parallel}: a replica occupies at least the GPUs its model is split over")
    if args.checkpoint and any(a.split("=")[0] == "--tensor-parallel" for a in args.server_arg):
        raise ValueError("give the tensor-parallel degree as serve-bench's --tensor-parallel (it passes it on to "
                         "the server and prices N GPUs per replica), not through --server-arg")
    if args.tensor_parallel > 1:  # a degree the model cannot split into: say so now, not after the whole run
        _check_degree(args)
    if args.repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    if args.repeat > 1 and not args.compare_prefix_caching:
        raise ValueError("--repeat applies to --compare-prefix-caching; add it, or run serve-bench again")
    if args.compare_prefix_caching and not args.checkpoint:
        raise ValueError("--compare-prefix-caching needs --checkpoint (it starts a server with and without "
                         "prefix caching); against --url, run twice and restart the server with --no-prefix-caching")
    if args.compare_prefix_caching and "--no-prefix-caching" in args.server_arg:
        raise ValueError("--compare-prefix-caching sets --no-prefix-caching itself; drop it from --server-arg")
    api_key = args.api_key or os.environ.get("TRITIUM_API_KEY")
    cfg = BenchConfig(url=args.url or "http://127.0.0.1", concurrency=args.concurrency, requests=args.requests,
                      duration_s=args.duration, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                      model=args.model, api_key=api_key, ignore_eos=not args.no_ignore_eos, chat=args.chat,
                      seed=args.seed, shared_prefix_tokens=args.shared_prefix_tokens,
                      warmup_requests=args.warmup_requests)
    if args.compare_prefix_caching:
        return _compare(args, cfg, api_key)
    result = _bench_once(args, cfg, args.server_arg, api_key)
    print(format_result(result))
    report: dict[str, Any] = {"bench": result.to_dict(), "cost": None}
    priced = result.completed > 0 and result.failure_rate <= args.max_failure_rate
    if not priced:
        report["refused"] = (f"{result.failed} of {result.completed + result.failed} requests failed "
                             f"({result.failure_rate:.0%} > --max-failure-rate {args.max_failure_rate:g})")
        print(f"\nno cost estimate: {report['refused']}; the measured rate describes a broken run "
              "(see the errors above: prompts longer than the model's context? a wrong --api-key?)")
    else:
        target, estimate = _price(args, result)
        print(f"\ncost at {args.requests_per_s:g} requests/s x {target.output_tokens_per_request:.0f} output tokens"
              f" ({target.prompt_tokens_per_request:.0f} prompt tokens, "
              f"{target.cached_prompt_tokens_per_request:.0f} of them cached):")
        print(format_estimate(estimate))
        report["cost"] = estimate.to_dict()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if priced else 1
