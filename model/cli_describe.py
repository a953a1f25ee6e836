"""``tritium describe``: size a model from a preset, a config file or dials, before training it."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tritium.flags import deprecated_alias
from tritium.model import sizing
from tritium.model.config import PRESETS, ModelConfig
from tritium.model.sizing import OFFLOAD_DEVICES, OFFLOADS, PRECISION_BYTES

HELP = "parameters, FLOPs, training memory per ZeRO stage, KV cache and serving cost of a model"

# dial flag -> ModelConfig field (flags override the preset or config file)
DIALS: dict[str, tuple[str, type]] = {
    "--hidden-size": ("hidden_size", int),
    "--num-layers": ("num_layers", int),
    "--num-heads": ("num_heads", int),
    "--num-kv-heads": ("num_kv_heads", int),
    "--head-dim": ("head_dim", int),
    "--ffn-hidden": ("ffn_hidden", int),
    "--ffn-type": ("ffn_type", str),
    "--vocab-size": ("vocab_size", int),
    "--max-seq-len": ("max_seq_len", int),
    "--rope-theta": ("rope_theta", float),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=list(PRESETS), help="a named preset (default: llama2-7b dials)")
    source.add_argument("--config", metavar="FILE",
                        help="a ModelConfig JSON, a Hugging Face config.json, or describe --json output")
    dials = parser.add_argument_group("dials (override the preset or config)")
    for flag, (name, kind) in DIALS.items():
        dials.add_argument(flag, dest=name, type=kind, default=None, metavar=kind.__name__.upper())
    tie = dials.add_mutually_exclusive_group()
    tie.add_argument("--tie-embeddings", dest="tie_embeddings", action="store_true", default=None,
                     help="the LM head shares the embedding matrix")
    tie.add_argument("--no-tie-embeddings", dest="tie_embeddings", action="store_false")

    train = parser.add_argument_group("training memory")
    train.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs for the ZeRO split (default 8)")
    train.add_argument("--precision", choices=list(PRECISION_BYTES), default="bf16",
                       help="training/serving precision (default bf16)")
    train.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per step (default 1)")
    train.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default max_seq_len)")
    train.add_argument("--offload", choices=OFFLOADS, default="none",
                       help="as in tritium train: offload optimizer states and/or params (params: ZeRO-3)")
    train.add_argument("--offload-device", choices=OFFLOAD_DEVICES, default="cpu",
                       help="where offloaded states live, as in tritium train (default cpu)")
    train.add_argument("--gradient-checkpointing", action="store_true",
                       help="size the run with per-block activation checkpointing")
    train.add_argument("--backend", default="triton",
                       help="kernel backend the run uses; activations are counted exactly for triton "
                            "(default), other backends are marked not covered")

    serving = parser.add_argument_group("tensor-parallel inference")
    serving.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                         help="GPUs one replica is split over, as in tritium generate/serve: adds memory per GPU "
                              "and all-reduce bytes per token; --cost counts a replica as N GPUs (default: "
                              "not shown, a replica is the GPUs its weights need)")

    cost = parser.add_argument_group("serving cost (with --cost)")
    cost.add_argument("--cost", action="store_true", help="add the inference cost estimate")
    cost.add_argument("--requests-per-s", type=float, default=10.0, help="traffic (default 10)")
    cost.add_argument("--prompt-tokens", type=int, default=512, help="tokens per prompt (default 512)")
    cost.add_argument("--max-tokens", type=int, default=256,
                      help="generated tokens per request, as serve-bench's --max-tokens (default 256)")
    deprecated_alias(cost, "--output-tokens", "--max-tokens", "max_tokens", type=int)
    cost.add_argument("--latency-s", type=float, default=10.0, help="end-to-end target per request (default 10)")
    cost.add_argument("--tokens-per-s-per-gpu", type=float, default=None,
                      help="measured aggregate decode tokens/s per GPU (default: roofline estimate)")
    cost.add_argument("--gpu-hour-price", type=float, default=2.5, help="dollars per GPU-hour (default 2.5)")
    cost.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU (default 80)")

    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def resolve_config(args: argparse.Namespace) -> Any:
    """The ModelConfig described by --preset / --config and the dial flags."""
    overrides = {name: getattr(args, name) for name, _ in DIALS.values() if getattr(args, name) is not None}
    if args.tie_embeddings is not None:
        overrides["tie_embeddings"] = args.tie_embeddings
    if args.config:
        base = _config_from_file(args.config)
        return base.replace(**overrides) if overrides else base
    if args.preset:
        return ModelConfig.from_name(args.preset, **overrides)
    if overrides:
        return ModelConfig(**overrides)
    return ModelConfig.from_name("llama2-7b")


def _config_from_file(path: str) -> Any:
    """A ModelConfig JSON or HF config.json; a ``describe --json`` report is read through its "config"."""
    from tritium.model.config import ModelConfig

    try:
        data = json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return ModelConfig.from_json(path)  # its own, clearer error
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and "parameters" in data:
        return ModelConfig.from_dict(data["config"])
    return ModelConfig.from_json(path)


def _validate(args: argparse.Namespace) -> None:
    for flag, value in (("--gpus", args.gpus), ("--micro-batch", args.micro_batch), ("--seq-len", args.seq_len)):
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    if args.tensor_parallel is not None and args.tensor_parallel <= 0:
        raise ValueError(f"--tensor-parallel must be a positive integer, got {args.tensor_parallel}")
    from tritium.model.backends import parse_backend

    try:
        parse_backend(args.backend)
    except ValueError as exc:
        raise ValueError(f"--backend: {exc}") from None


def run(args: argparse.Namespace) -> int:
    _validate(args)
    cfg = resolve_config(args)
    report = sizing.describe(cfg, num_gpus=args.gpus, precision=args.precision, micro_batch=args.micro_batch,
                             seq_len=args.seq_len, offload=args.offload, offload_device=args.offload_device,
                             checkpointing=args.gradient_checkpointing, backend=args.backend,
                             gpu_memory_gb=args.gpu_memory_gb, tensor_parallel=args.tensor_parallel)
    cost = None
    if args.cost:
        cost = sizing.inference_cost(
            cfg, args.requests_per_s, args.prompt_tokens, args.max_tokens, args.latency_s,
            args.tokens_per_s_per_gpu, args.gpu_hour_price, precision=args.precision,
            gpu_memory_gb=args.gpu_memory_gb, tensor_parallel=args.tensor_parallel or 1)
        report["inference_cost"] = cost.to_dict()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(cfg, report, cost, gpu_memory_bytes=args.gpu_memory_gb * 1e9)
    return 0


# ---------------------------------------------------------------------------- human output
def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".strip()


def _gib(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:,.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:,.2f} MiB"
    return f"{n / 2**10:,.2f} KiB"


def print_report(cfg: Any, report: dict[str, Any], cost: Any = None, gpu_memory_bytes: float = 80e9) -> None:
    # rich loads here, not at import: `tritium --help` imports this module and rich costs ~0.1-0.5 s.
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120) if not Console().is_terminal else Console()
    params = report["parameters"]
    console.print(f"[bold]{cfg.name}[/bold]: {params['total']:,} parameters ({_human(params['total'])}); "
                  f"hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads "
                  f"({cfg.num_kv_heads} kv, head_dim {cfg.head_dim}), {cfg.ffn_type} FFN {cfg.ffn_hidden}, "
                  f"vocab {cfg.vocab_size}, context {cfg.max_seq_len}"
                  + (", tied embeddings" if cfg.tie_embeddings else ""))

    table = Table(title="Parameters by component")
    table.add_column("component")
    table.add_column("parameters", justify="right")
    table.add_column("share", justify="right")
    for name, share in params["shares"].items():
        table.add_row(name, f"{params[name]:,}", f"{share:6.1%}")
    table.add_row("[bold]total[/bold]", f"[bold]{params['total']:,}[/bold]", "100.0%")
    console.print(table)

    flops = report["flops_per_token"]
    table = Table(title=f"FLOPs per token (context T = {flops['seq_len']})")
    table.add_column("")
    table.add_column("FLOPs/token", justify="right")
    table.add_column("formula")
    table.add_row("training", _human(flops["training"], "FLOP"), "6*N_mm + 12*L*q*T")
    table.add_row("  of which 6N", _human(flops["training_6n"], "FLOP"),
                  f"N_mm = {flops['matmul_parameters']:,} matmul weights")
    table.add_row("inference", _human(flops["inference"], "FLOP"), "2*N_mm + 4*L*q*T")
    console.print(table)

    memory = report["training_memory"]
    gpus = memory["num_gpus"]
    table = Table(title=f"Training memory per GPU: {gpus} GPU{'s' if gpus != 1 else ''}, {memory['precision']} "
                        f"{'mixed-precision ' if memory['precision'] != 'fp32' else ''}Adam, micro-batch "
                        f"{memory['micro_batch']} x {memory['seq_len']} tokens, offload {memory['offload']}"
                        + (f" ({memory['offload_device']})" if memory["offload"] != "none" else ""))
    nvme = memory["offload_device"] == "nvme" and memory["offload"] != "none"
    for column in ("ZeRO", "model states", "buffers", "activ.", "peak", f"+{memory['safety_fraction']:.0%} margin",
                   "NVMe/node" if nvme else "CPU/node"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column(f"fits {gpu_memory_bytes / 1e9:g} GB", no_wrap=True)
    covered = memory["activations_covered"]
    for stage, row in memory["stages"].items():
        for label, entry in ((stage, row), (f"{stage} ckpt", row["ckpt"])):
            if label != stage and entry is row["ckpt"] and row["checkpointing"]:
                continue  # the asked run already checkpoints
            name = f"{stage} ckpt" if entry["checkpointing"] else stage
            table.add_row(name, _gib(entry["model_states"]), _gib(entry["buffers_total"]) if entry["buffers_total"] else "-",
                          _gib(entry["activations"]) if covered else f">={_gib(entry['activations'])}",
                          _gib(entry["peak"]), _gib(entry["peak_with_margin"]),
                          _gib(host) if (host := entry["nvme" if nvme else "cpu"] * min(gpus, memory["gpus_per_node"]))
                          else "-",
                          ("yes" if entry["fits"] else "no") if covered else "unknown")
    console.print(table)
    console.print("model states: what DeepSpeed keeps per GPU (its estimators' figure; differences explained in "
                  "model/sizing.py); buffers: reduce buckets and ZeRO-3 prefetch from the generated ds_config; "
                  "peak: + activations and the largest transient (loss chunk, checkpoint recompute, optimizer "
                  "step); fits: peak + margin (fragmentation, CUDA context, NCCL)")
    if not covered:
        console.print(f"[yellow]note:[/yellow] activations of backend {memory['backend']!r} are not covered: "
                      "counted exactly for the triton kernels only, a lower bound here")

    kv = report["kv_cache"]
    console.print(f"KV cache ({kv['precision']}): {kv['bytes_per_token']:,} bytes/token "
                  f"({_gib(kv['bytes_per_token'])}); full context of {kv['max_seq_len']} tokens: "
                  f"{_gib(kv['bytes_full_context'])} per sequence")

    tp = report.get("tensor_parallel")
    if tp is not None:
        t = tp["tensor_parallel"]
        replicated = (f", each replicated on {tp['kv_replication']} GPUs" if tp["kv_replication"] > 1 else "")
        console.print(f"Tensor parallel over {t} GPU{'s' if t != 1 else ''} ({tp['precision']}, embedding and LM "
                      f"head {'split by vocabulary' if tp['vocab_parallel'] else 'replicated'}): per GPU "
                      f"{_gib(tp['weight_bytes_per_rank'])} of weights, KV cache "
                      f"{tp['kv_cache_bytes_per_token_per_rank']:,} bytes/token ({tp['kv_heads_per_rank']} of "
                      f"{cfg.num_kv_heads} KV heads{replicated})")
        if t > 1:
            console.print(f"all-reduce per token: 2 x {cfg.num_layers} layers x {cfg.hidden_size} hidden x "
                          f"{PRECISION_BYTES[tp['precision']]} bytes = {tp['all_reduce_payload_bytes_per_token']:,} "
                          f"bytes ({_gib(tp['all_reduce_payload_bytes_per_token'])}) summed; each GPU sends "
                          f"2*(t-1)/t of it = {tp['all_reduce_bytes_sent_per_token_per_rank']:,.0f} bytes (ring); "
                          f"{tp['all_reduces_per_step']} all-reduces per forward step; a decode step of B "
                          "sequences moves B times this")

    if cost is not None:
        table = Table(title=f"Serving {cost.requests_per_s:g} req/s x ({cost.prompt_tokens} prompt + "
                            f"{cost.output_tokens} output tokens) within {cost.latency_s:g} s")
        table.add_column("")
        table.add_column("value", justify="right")
        rows = [
            ("decode tokens/s per GPU" + " (estimated)" * cost.decode_estimated,
             f"{cost.decode_tokens_per_s_per_gpu:,.0f}"),
            ("prefill tokens/s per GPU" + " (estimated)" * cost.prefill_estimated,
             f"{cost.prefill_tokens_per_s_per_gpu:,.0f}"),
            ("GPUs per replica", f"{cost.gpus_per_replica}"),
            *([("all-reduce bytes/token per GPU", f"{cost.all_reduce_bytes_per_token_per_gpu:,.0f}"),
               ("interconnect GB/s per GPU, decode", f"{cost.interconnect_gbs_per_gpu_decode:,.1f}"),
               ("interconnect GB/s per GPU, prefill", f"{cost.interconnect_gbs_per_gpu_prefill:,.1f}")]
              if cost.tensor_parallel > 1 else []),
            ("requests in flight", f"{cost.concurrent_requests:,.1f}"),
            ("GPUs for compute", f"{cost.gpus_for_compute:,.2f}"),
            ("GPUs for KV memory", f"{cost.gpus_for_memory}"),
            ("[bold]GPUs needed[/bold]", f"[bold]{cost.gpus_needed}[/bold]"),
            ("utilization", f"{cost.utilization:.0%}"),
            ("latency target feasible", "yes" if cost.latency_feasible else "NO"),
            ("cost per hour", f"${cost.cost_per_hour:,.2f}"),
            ("[bold]cost per 1M tokens[/bold]", f"[bold]${cost.cost_per_million_tokens:,.4f}[/bold]"),
            ("cost per 1M output tokens", f"${cost.cost_per_million_output_tokens:,.4f}"),
        ]
        for name, value in rows:
            table.add_row(name, value)
        console.print(table)
        for note in cost.notes:
            console.print(f"[yellow]note:[/yellow] {note}")
