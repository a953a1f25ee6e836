"""Compile every Triton kernel for an H100/H200 (sm_90a) on a CPU and report registers and spills.

The interpreter used by the CPU tests is more permissive than the Triton compiler (types of
loop-carried values, early returns, int64 loop bounds, ...). Triton's wheel ships ptxas, so the full
Python -> TTIR -> TTGIR -> PTX -> cubin pipeline runs without a GPU: a kernel that would not compile
on the device fails here, and ``ptxas -v`` says how many registers each kernel/config uses and how
many bytes it spills to local memory, before any GPU time is spent.

    python -m tritium.bench.compile_report              # markdown table on stdout
    python -m tritium.bench.compile_report --json       # one JSON object per line
    python -m tritium.bench.compile_report --notes bench/NOTES.md   # rewrite the table there
    PYTHONPATH=/tmp/triton36:. python -m tritium.bench.compile_report --json > t36.jsonl  # another triton
    python -m tritium.bench.compile_report --compare t36.jsonl --notes bench/NOTES.md

Must run without ``TRITON_INTERPRET=1`` (it turns ``@triton.jit`` into interpreted functions at
import time); tests/kernels/test_kernels_compile_for_gpu.py runs it in a subprocess for that reason.
Every config below is one the launchers really launch (fixed configs for attention/decode, the
flag combinations each launcher can set); activations are bf16 (the GPU training dtype).
"""
from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Attention/decode shapes: head_dim 128 bf16 (Llama), 80 (EVEN_D False, Phi-style) and 256 (the
# wide config: fixed_config's smaller tiles). Block sizes are fixed_config's (TRITIUM_AUTOTUNE=0).
_ATT_BASE = {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_D": 128, "EVEN_D": True, "IS_VARLEN": False,
             "HAS_LEFT": False, "HAS_RIGHT": True, "HAS_SOFTCAP": False, "DOT_PRECISION": "tf32"}
# Three variants per attention kernel cover every flag the launchers set: plain causal at the
# Llama shape; varlen + sliding window + softcap + no right limit at D=80 (EVEN_D False); and the
# D=256 tiles (fixed_config's smaller "wide" config).
_ATT_VARIANTS = [
    ("causal D=128", {}),
    ("varlen window+softcap D=80", {"IS_VARLEN": True, "HAS_LEFT": True, "HAS_RIGHT": False, "HAS_SOFTCAP": True,
                                    "HEAD_DIM": 80}),
    ("causal D=256", {"HEAD_DIM": 256, "BLOCK_D": 256}),
]


def _attention_cases(kernel: str, backward: bool) -> list[tuple[str, dict, dict]]:
    from tritium.kernels.attention import fixed_config

    cases = []
    for label, change in _ATT_VARIANTS:
        meta = {**_ATT_BASE, **change}
        config = fixed_config(meta["BLOCK_D"], 2, backward=backward)
        blocks = {"BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"]}
        cases.append((label, {**meta, **blocks},
                      {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}))
    return cases


def _decode_cases() -> list[tuple[str, dict, dict]]:
    base = {"NUM_KV_HEADS": 8, "GROUP": 4, "HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_M": 16, "BLOCK_N": 64,
            "PAGED": False, "HAS_SEQLENS": True, "HAS_LEFT": False, "HAS_RIGHT": True, "HAS_SOFTCAP": False,
            "SPLIT": True, "DOT_PRECISION": "tf32"}
    variants = [("split D=128", {}),
                ("paged no-split window+softcap D=80", {"PAGED": True, "SPLIT": False, "HAS_LEFT": True,
                                                        "HAS_SOFTCAP": True, "HEAD_DIM": 80}),
                ("paged split chunked prefill", {"PAGED": True, "BLOCK_M": 64, "HAS_SEQLENS": False}),
                ("split D=256", {"HEAD_DIM": 256, "BLOCK_D": 256, "BLOCK_N": 32})]
    launch = {"num_warps": 4, "num_stages": 2}  # decode_fwd's fixed config
    return [(label, {**base, **change}, launch) for label, change in variants]


def cases() -> list[tuple[str, str, list[tuple[str, dict, dict]]]]:
    """(module, kernel, [(label, constexprs, launch options)]) for every kernel the launchers use."""
    rows_4 = {"num_warps": 4}
    norm = [(f"{'residual' if r else 'plain'} {'1 block' if s else 'streamed'}",
             {"BLOCK_N": 4096 if s else 8192, "HAS_RESIDUAL": r, "SINGLE_BLOCK": s},
             {"num_warps": 8 if s else 16}) for r in (False, True) for s in (True, False)]
    norm_bwd = [(label.replace("residual", "d_residual"),
                 {"BLOCK_N": c["BLOCK_N"], "HAS_DRESIDUAL": c["HAS_RESIDUAL"], "SINGLE_BLOCK": c["SINGLE_BLOCK"]},
                 o) for label, c, o in norm]
    ce = [(f"{'fwd' if not g else 'fwd+grad'}{' smoothing' if s else ''}",
           {"BLOCK_V": 4096, "HAS_LSE": False, "COMPUTE_LOSS": True, "COMPUTE_GRAD": g, "HAS_SCALE": g,
            "HAS_SMOOTHING": s}, {"num_warps": 8}) for g in (False, True) for s in (False, True)]
    ce += [(f"bwd{' smoothing' if s else ''}",
            {"BLOCK_V": 4096, "HAS_LSE": True, "COMPUTE_LOSS": False, "COMPUTE_GRAD": True, "HAS_SCALE": True,
             "HAS_SMOOTHING": s}, {"num_warps": 8}) for s in (False, True)]
    rope = [(f"{'bwd' if b else 'fwd'}{' position_ids' if p else ''}",
             {"HALF": 64, "BLOCK_HALF": 64, "BLOCK_HQ": 32, "BLOCK_HKV": 8, "HAS_POSITION_IDS": p, "BACKWARD": b},
             rows_4) for p in (False, True) for b in (False, True)]
    return [
        ("norm", "_rms_norm_fwd_kernel", norm),
        ("norm", "_rms_norm_bwd_kernel", norm_bwd),
        ("mlp", "_swiglu_fwd_kernel", [("", {"BLOCK_N": 1024}, rows_4)]),
        ("mlp", "_swiglu_bwd_kernel", [("", {"BLOCK_N": 1024}, rows_4)]),
        ("rope", "_rope_kernel", rope),
        ("loss", "_cross_entropy_kernel", ce),
        ("attention", "_attn_fwd_kernel", _attention_cases("fwd", backward=False)),
        ("attention", "_attn_bwd_preprocess_kernel",
         [("", {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_M": 64}, rows_4)]),
        ("attention", "_attn_bwd_dkdv_kernel", _attention_cases("dkdv", backward=True)),
        ("attention", "_attn_bwd_dq_kernel", _attention_cases("dq", backward=True)),
        ("decode", "_decode_split_kernel", _decode_cases()),
        ("decode", "_decode_combine_kernel", [("", {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_S": 16}, rows_4)]),
    ]


# Pointer and scalar types by parameter name (everything else is an i32 scalar).
_FP32_POINTERS = {"RSTD", "LSE", "LOSS", "SCALE", "DW_PARTIAL", "COS", "SIN", "DELTA", "O_part", "LSE_part"}
_INT32_POINTERS = {"cu_seqlens_q", "cu_seqlens_k", "cache_seqlens", "block_table"}
_INT64_POINTERS = {"TARGETS", "POS"}
_BF16_POINTERS = {"X", "R", "W", "Y", "NEW_R", "DY", "DNEW_R", "DX", "G", "U", "DG", "DU", "Q", "K", "QO", "KO",
                  "LOGITS", "GRAD", "V", "O", "DO", "DQ", "DK", "DV", "K_cache", "V_cache"}
_FLOATS = {"eps", "label_smoothing", "z_loss", "score_scale", "softcap_log2", "sm_scale"}


# Names that are sizes in one kernel and tensors in another (V: vocabulary size vs values).
_INT_IN = {"_cross_entropy_kernel": {"V"}}


def _signature(fn, kernel: str) -> dict[str, str]:
    signature = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name in _INT_IN.get(kernel, ()):
            signature[name] = "i32"
        elif name in _FP32_POINTERS:
            signature[name] = "*fp32"
        elif name in _INT32_POINTERS:
            signature[name] = "*i32"
        elif name in _INT64_POINTERS:
            signature[name] = "*i64"
        elif name in _BF16_POINTERS:
            signature[name] = "*bf16"
        elif name in _FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _ptxas() -> str:
    from triton.backends.nvidia import compiler

    try:
        tool = compiler.get_ptxas(90)  # triton >= 3.5: picks ptxas-blackwell (the newer one) for sm_90+
    except TypeError:
        tool = compiler.get_ptxas()
    return tool.path if hasattr(tool, "path") else tool[0]


def _ptxas_stats(ptx: str, ptxas: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True, check=False)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas -v failed: {log[-1000:]}")
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"arch": arch, "registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)) if spill else 0, "spill_loads": int(spill.group(2)) if spill else 0}


KERNEL_MODULES = ("norm", "mlp", "rope", "loss", "attention", "decode")


def uncovered_kernels() -> list[str]:
    """``@triton.jit`` functions named ``*_kernel`` in the kernel modules that ``cases()`` misses."""
    from triton.runtime.jit import JITFunction

    covered = {kernel for _, kernel, _ in cases()}
    found = set()
    for module in KERNEL_MODULES:
        mod = importlib.import_module(f"tritium.kernels.{module}")
        found |= {name for name, value in vars(mod).items()
                  if isinstance(value, JITFunction) and name.endswith("_kernel")}
    return sorted(found - covered)


def compile_all(selected: set[str] | None = None) -> list[dict]:
    """Compile every case; one dict per (kernel, config) with ok/error and the ptxas -v numbers."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces @triton.jit at import time")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GPU default; silences triton 3.9's warning
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas = _ptxas()
    results = []
    for module, kernel, variants in cases():
        if selected and kernel not in selected:
            continue
        fn = getattr(importlib.import_module(f"tritium.kernels.{module}"), kernel)
        fn = getattr(fn, "fn", fn) if not hasattr(fn, "params") else fn
        for label, constexprs, options in variants:
            row = {"kernel": kernel, "config": label, "constexprs": constexprs, "options": options,
                   "triton": triton.__version__, "ok": False, "error": ""}
            start = time.perf_counter()
            try:
                compiled = triton.compile(ASTSource(fn=fn, signature=_signature(fn, kernel), constexprs=constexprs),
                                          target=GPUTarget("cuda", 90, 32), options=options)
                row["ok"] = "cubin" in compiled.asm
                row.update(_ptxas_stats(compiled.asm["ptx"], ptxas))
                row["smem_bytes"] = int(compiled.metadata.shared)  # dynamic: ptxas sees none of it
                row["ptxas"] = Path(ptxas).name
            except Exception as exc:  # report every failure, not just the first
                row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            row["seconds"] = round(time.perf_counter() - start, 1)
            results.append(row)
    if not selected:
        for name in uncovered_kernels():
            results.append({"kernel": name, "config": "missing from compile_report.cases()", "options": {},
                            "triton": triton.__version__, "ok": False,
                            "error": "add this kernel and its launch configs to bench/compile_report.py"})
    return results


TABLE_START = "<!-- compile_report:start -->"
TABLE_END = "<!-- compile_report:end -->"


def markdown(results: list[dict], compare: list[dict] | None = None) -> str:
    """The table; ``compare`` (rows from another triton, e.g. the GPU machine's) adds a column."""
    version = results[0]["triton"] if results else "?"
    tool = next((r.get("ptxas") for r in results if r.get("ptxas")), "ptxas")
    other = {(r["kernel"], r["config"]): r for r in compare or []}
    other_version = compare[0]["triton"] if compare else ""
    extra_head = f" triton {other_version}: registers, spill stores |" if compare else ""
    lines = [f"sm_90a, bf16 activations, triton {version} (`{tool} -v`)"
             + (f", compared with triton {other_version}" if compare else "")
             + "; regenerate with `python -m tritium.bench.compile_report --notes bench/NOTES.md` "
               "(`--json` rows of another triton via `--compare FILE`).", "",
             f"| kernel | config | warps/stages | registers | spill stores / loads (B) | shared memory (B) |{extra_head}",
             "|---|---|---|---:|---:|---:|" + ("---:|" if compare else "")]
    for r in results:
        opts = f"{r['options'].get('num_warps', 4)}/{r['options'].get('num_stages', 3)}"
        if not r["ok"]:
            lines.append(f"| `{r['kernel']}` | {r['config']} | {opts} | FAILED | {r['error'][:80]} | |")
            continue
        line = (f"| `{r['kernel']}` | {r['config'] or '-'} | {opts} | {r['registers']} | "
                f"{r['spill_stores']} / {r['spill_loads']} | {r['smem_bytes']} |")
        if compare:
            o = other.get((r["kernel"], r["config"]))
            line += (f" {o['registers']}, {o['spill_stores']} |" if o and o["ok"] else
                     " FAILED |" if o else " - |")
        lines.append(line)
    return "\n".join(lines)


def write_notes(path: Path, table: str) -> None:
    text = path.read_text() if path.exists() else ""
    block = f"{TABLE_START}\n{table}\n{TABLE_END}"
    if TABLE_START in text and TABLE_END in text:
        head, rest = text.split(TABLE_START, 1)
        text = head + block + rest.split(TABLE_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Registers and spills per kernel (sm_90a, static)\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per (kernel, config)")
    parser.add_argument("--notes", type=Path, help="rewrite the table between the markers in this file")
    parser.add_argument("--kernel", action="append", help="only these kernels (repeatable)")
    parser.add_argument("--compare", type=Path, help="--json output of another triton version, as a column")
    parser.add_argument("--from-json", type=Path, help="render these --json rows instead of compiling")
    args = parser.parse_args(argv)
    if args.from_json:
        results = [json.loads(line) for line in args.from_json.read_text().splitlines() if line.strip()]
    else:
        results = compile_all(set(args.kernel) if args.kernel else None)
    compare = ([json.loads(line) for line in args.compare.read_text().splitlines() if line.strip()]
               if args.compare else None)
    if args.json:
        for row in results:
            print(json.dumps(row))
    else:
        print(markdown(results, compare))
    if args.notes:
        write_notes(args.notes, markdown(results, compare))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
