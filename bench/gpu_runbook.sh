#!/usr/bin/env bash
# One call on a lent H100/H200 (see shared/GPU.md): < 8 minutes.
#   run: carry [".whl"], command: bash bench/gpu_runbook.sh
# 1. installs carried wheels (deepspeed, pydantic, liger-kernel ...) into /tmp/site,
# 2. prints device/driver/versions and the two ceilings,
# 3. runs the test suite on CUDA (bf16 included),
# 4. runs the benchmark report into $OUT/bench (JSON, CSV, Markdown, PNG),
# 5. prints a short headline table last (the reply keeps only the tail).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/runs/gpu}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# No install needed: from a source checkout tritium finds kernels/, model/, ... beside its own folder.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
QUICK="${QUICK:-}"   # QUICK=1 for a shorter benchmark pass

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/environment.txt"

echo "[runbook] tests on CUDA"
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/kernels tests/model \
  >"$OUT/pytest.log" 2>&1
echo "[runbook] pytest exit $? (tail below)"; tail -n 5 "$OUT/pytest.log"

echo "[runbook] benchmarks"
timeout 330 python3 -m tritium.cli bench --device cuda ${QUICK:+--quick} --out "$OUT/bench" >"$OUT/bench.log" 2>&1
echo "[runbook] bench exit $?"
python3 - "$OUT/bench/results.json" <<'PY'
import json, sys
try:
    data = json.load(open(sys.argv[1]))
except OSError:
    sys.exit("no results.json")
c = data["ceilings"]
print(f"ceilings: copy {c['copy_gbps']:.0f} GB/s, matmul {c['matmul_tflops']:.0f} TFLOP/s {c['matmul_dtype']}")
for r in data["rows"]:
    if r["provider"] == "tritium" and r["status"] == "ok":
        frac = f"{100 * r['fraction_of_ceiling']:.0f}%" if r["fraction_of_ceiling"] else "-"
        ratio = f"{r['speedup_vs_baseline']:.2f}x" if r["speedup_vs_baseline"] else "-"
        print(f"{r['case'][:18]:18s} {r['size'][:34]:34s} {r['mode']:8s} {r['throughput']:9.1f} {r['metric']:8s} {frac:>5s} {ratio:>7s}")
PY
