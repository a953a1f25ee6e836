"""``tritium describe``: size a model from a preset, a config file or dials, before training it."""
from __future__ import annotations

import argparse
import json
from typing import Any

from tritium.model import sizing
from tritium.model.config import PRESETS, ModelConfig
from tritium.model.sizing import PRECISION_BYTES

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
    source.add_argument("--config", metavar="FILE", help="a ModelConfig JSON or Hugging Face config.json")
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

    cost = parser.add_argument_group("serving cost (with --cost)")
    cost.add_argument("--cost", action="store_true", help="add the inference cost estimate")
    cost.add_argument("--requests-per-s", type=float, default=10.0, help="traffic (default 10)")
    cost.add_argument("--prompt-tokens", type=int, default=512, help="tokens per prompt (default 512)")
    cost.add_argument("--output-tokens", type=int, default=256, help="generated tokens per request (default 256)")
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
        base = ModelConfig.from_json(args.config)
        return base.replace(**overrides) if overrides else base
    if args.preset:
        return ModelConfig.from_name(args.preset, **overrides)
    if overrides:
        return ModelConfig(**overrides)
    return ModelConfig.from_name("llama2-7b")


def _validate(args: argparse.Namespace) -> None:
    for flag, value in (("--gpus", args.gpus), ("--micro-batch", args.micro_batch), ("--seq-len", args.seq_len)):
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be a positive integer, got {value}")


def run(args: argparse.Namespace) -> int:
    _validate(args)
    cfg = resolve_config(args)
    report = sizing.describe(cfg, num_gpus=args.gpus, precision=args.precision, micro_batch=args.micro_batch,
                             seq_len=args.seq_len)
    cost = None
    if args.cost:
        cost = sizing.inference_cost(
            cfg, args.requests_per_s, args.prompt_tokens, args.output_tokens, args.latency_s,
            args.tokens_per_s_per_gpu, args.gpu_hour_price, precision=args.precision,
            gpu_memory_gb=args.gpu_memory_gb)
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
    table = Table(title=f"Training memory per GPU: {memory['num_gpus']} GPU{'s' if memory['num_gpus'] != 1 else ''}, {memory['precision']} mixed-precision "
                        f"Adam, micro-batch {memory['micro_batch']} x {memory['seq_len']} tokens")
    for column in ("ZeRO", "weights", "grads", "optimizer", "activ.", "activ. ckpt", "total", "total ckpt"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column(f"fits {gpu_memory_bytes / 1e9:g} GB", no_wrap=True)
    for stage, row in memory["stages"].items():
        table.add_row(stage, _gib(row["weights"]), _gib(row["grads"]), _gib(row["optimizer"]),
                      _gib(row["activations"]), _gib(row["activations_checkpointed"]), _gib(row["total"]),
                      _gib(row["total_checkpointed"]),
                      "yes" if row["total"] <= gpu_memory_bytes else
                      "with ckpt" if row["total_checkpointed"] <= gpu_memory_bytes else "no")
    console.print(table)

    kv = report["kv_cache"]
    console.print(f"KV cache ({kv['precision']}): {kv['bytes_per_token']:,} bytes/token "
                  f"({_gib(kv['bytes_per_token'])}); full context of {kv['max_seq_len']} tokens: "
                  f"{_gib(kv['bytes_full_context'])} per sequence")

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
