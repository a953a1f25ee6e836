"""``tritium bench``: run the registry, print the table, write JSON/CSV/Markdown/PNG."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "benchmark tritium's kernels, model and generator against the alternatives on this device"

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a minute-long pass over fewer sizes")
    parser.add_argument("--filter", default=None, help="comma-separated case names or areas (e.g. rms_norm,attention)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = cuda when available")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="bench dtype (default bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--out", default="runs/bench", help="folder for results.json/csv, report.md and plots/")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")


def run(args: argparse.Namespace) -> int:
    import torch

    from tritium.bench.registry import select
    from tritium.bench.report import print_table, write_all
    from tritium.bench.runner import run_case
    from tritium.bench.timing import environment, measure_ceilings

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    dtype_name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    dtype = getattr(torch, DTYPES[dtype_name])
    cases = select(args.filter)
    if args.list:
        for case in cases:
            print(f"{case.name:24s} {case.area:11s} providers: {', '.join(case.providers)}  metric: {case.metric}")
        return 0
    env = environment(device)
    ceilings = measure_ceilings(device, quick=args.quick)
    print(f"[bench] {env['device']}: copy {ceilings.copy_gbps:.1f} GB/s, matmul {ceilings.matmul_tflops:.2f} "
          f"TFLOP/s ({ceilings.matmul_dtype}); torch {env['torch']}, triton {env['triton']}")
    rows = []
    for case in cases:
        print(f"[bench] {case.name} ...", flush=True)
        rows.extend(run_case(case, device, dtype, args.quick, ceilings))
    out = Path(args.out)
    paths = write_all(rows, env, ceilings, out, device)
    print_table(rows, env, ceilings, device)
    print(f"[bench] wrote {paths['json']}, {paths['csv']}, {paths['markdown']} and "
          f"{sum(1 for k in paths if k.startswith('plot:'))} plots under {out / 'plots'}")
    failed = [r for r in rows if r["status"] == "error"]
    if failed:
        print(f"[bench] {len(failed)} provider run(s) failed; see the note column")
        return 1
    return 0
