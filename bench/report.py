"""Write what a run measured: terminal table, JSON, CSV, Markdown and PNG plots."""
from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tritium.bench.timing import Ceilings

COLUMNS = ["case", "size", "mode", "provider", "dtype", "ms", "metric", "throughput", "fraction_of_ceiling",
           "speedup_vs_baseline", "peak_mem_mb", "status", "note"]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def write_all(rows: list[dict[str, Any]], env: dict[str, str], ceilings: Ceilings, out: Path,
              device: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "markdown": out / "report.md"}
    payload = {"environment": env, "ceilings": asdict(ceilings), "device_kind": device, "rows": rows}
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
    with paths["csv"].open("w", newline="") as handle:
        env_cols = sorted(env)
        writer = csv.DictWriter(handle, fieldnames=COLUMNS + env_cols, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **env})
    paths["markdown"].write_text(markdown(rows, env, ceilings, device))
    paths.update(plots(rows, out / "plots", env))
    return paths


def markdown(rows, env, ceilings: Ceilings, device: str) -> str:
    lines = ["# tritium benchmark report", ""]
    if device != "cuda":
        lines += [("> **CPU run.** These numbers check that every benchmark code path works; they are not kernel "
                   "speed. Triton providers are skipped on CPU (they would run in the interpreter)."), ""]
    lines += ["| environment | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    lines += [f"| copy bandwidth (measured) | {ceilings.copy_gbps:.1f} GB/s |",
              f"| matmul {ceilings.matmul_dtype} {ceilings.matmul_size}^3 (measured) | {ceilings.matmul_tflops:.2f} TFLOP/s |",
              "", ("Throughput is GB/s (bytes each input read once and each output written once), TFLOP/s, or "
                   "tokens/s; `% ceiling` divides by the measured copy bandwidth or matmul rate above (for tokens/s "
                   "cases it is MFU); `x base` is the baseline's time over this provider's time, both from this run."),
              ""]
    lines += ["| case | size | mode | provider | ms | throughput | % ceiling | x base | peak MiB | note |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        frac = f"{100 * r['fraction_of_ceiling']:.1f}%" if r["fraction_of_ceiling"] is not None else "-"
        thr = f"{_fmt(r['throughput'])} {r['metric']}" if r["throughput"] is not None else "-"
        lines.append(f"| {r['case']} | {r['size']} | {r['mode']} | {r['provider']} | {_fmt(r['ms'])} | {thr} | "
                     f"{frac} | {_fmt(r['speedup_vs_baseline'])} | {_fmt(r['peak_mem_mb'])} | "
                     f"{r['note'] if r['status'] != 'ok' else ''} |")
    return "\n".join(lines) + "\n"


def print_table(rows, env, ceilings: Ceilings, device: str) -> None:
    from rich.console import Console
    from rich.table import Table

    title = f"tritium bench on {env['device']}  (copy {ceilings.copy_gbps:.0f} GB/s, " \
            f"matmul {ceilings.matmul_tflops:.1f} TFLOP/s {ceilings.matmul_dtype})"
    if device != "cuda":
        title += "  [CPU: code-path check, not kernel speed]"
    table = Table(title=title)
    for col in ("case", "size", "mode", "provider", "ms", "throughput", "% ceil", "x base", "note"):
        table.add_column(col, overflow="fold")
    for r in rows:
        frac = f"{100 * r['fraction_of_ceiling']:.1f}" if r["fraction_of_ceiling"] is not None else "-"
        thr = f"{_fmt(r['throughput'])} {r['metric']}" if r["throughput"] is not None else "-"
        note = r["note"][:60] if r["status"] != "ok" else ""
        table.add_row(r["case"], r["size"], r["mode"], r["provider"], _fmt(r["ms"]), thr, frac,
                      _fmt(r["speedup_vs_baseline"]), note)
    Console(width=200).print(table)


def plots(rows, folder: Path, env) -> dict[str, Path]:
    """One PNG per (case, mode): throughput against size, a line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    keys = sorted({(r["case"], r["mode"]) for r in rows})
    for case, mode in keys:
        group = [r for r in rows if r["case"] == case and r["mode"] == mode and r["throughput"] is not None]
        if not group:
            continue
        sizes = list(dict.fromkeys(r["size"] for r in rows if r["case"] == case and r["mode"] == mode))
        fig, ax = plt.subplots(figsize=(7, 4))
        for provider in dict.fromkeys(r["provider"] for r in group):
            pts = [(sizes.index(r["size"]), r["throughput"]) for r in group if r["provider"] == provider]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels(sizes, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(group[0]["metric"])
        ax.set_title(f"{case} {mode} on {env['device']}", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = folder / f"{case}_{mode.replace('+', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made[f"plot:{case}:{mode}"] = path
    return made
