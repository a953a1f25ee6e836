#!/usr/bin/env bash
# One call on a lent H100/H200 (see shared/GPU.md): under 8 minutes in all.
#   run: carry [".whl"], command: bash bench/gpu_runbook.sh, timeout_s 540
# 1. installs carried wheels (deepspeed, hjson, pydantic, fastapi, uvicorn, liger-kernel ...) from
#    .whl/ into /tmp/site when present; tests needing a missing package skip or fail to collect
#    without stopping the run (--continue-on-collection-errors),
# 2. prints device/driver/versions and which optional packages import,
# 3. runs EVERY `gpu`-marked test in tests/ (kernels, model, serve, train; bf16 included),
# 4. runs the kernel and model suites on CUDA (launch ledger + NaN sentinels on the real kernels),
# 5. runs the benchmark report into $OUT/bench (JSON, CSV, Markdown, PNG; it measures the ceilings),
# 6. prints a short summary last (the reply keeps only the tail).
# Budget (seconds): gpu tests 150 + CUDA suites 90 + bench 210 + setup ~20 = 470 < 480.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$PWD/runs/gpu}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || echo "[runbook] WARNING: some carried wheels failed to install"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "[runbook] no .whl/ carried: deepspeed/fastapi tests will skip or fail to collect"
fi
# No install needed: from a source checkout tritium finds kernels/, model/, ... beside its own folder.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITIUM_AUTOTUNE=0   # tests: one fixed config per kernel (the bench autotunes on its own)
QUICK="${QUICK:-}"          # QUICK=1 for a shorter benchmark pass
PYTEST=(python3 -m pytest -q -p no:cacheprovider -o addopts="" --continue-on-collection-errors -rfEs)

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  for mod in deepspeed fastapi uvicorn httpx transformers liger_kernel; do
    if python3 -c "import $mod" >/dev/null 2>&1; then echo "optional $mod: yes"; else echo "optional $mod: MISSING"; fi
  done
} 2>&1 | tee "$OUT/environment.txt"

echo "[runbook] every gpu-marked test in tests/"
timeout 150 "${PYTEST[@]}" -m gpu tests >"$OUT/pytest_gpu.log" 2>&1
gpu_rc=$?
echo "[runbook] gpu tests exit $gpu_rc"; tail -n 4 "$OUT/pytest_gpu.log"

echo "[runbook] kernel + model suites on CUDA"
timeout 90 "${PYTEST[@]}" -m "not gpu and not slow" tests/kernels tests/model >"$OUT/pytest_cuda.log" 2>&1
cuda_rc=$?
echo "[runbook] CUDA suites exit $cuda_rc"; tail -n 4 "$OUT/pytest_cuda.log"

echo "[runbook] benchmarks"
timeout 210 python3 -m tritium.cli bench --device cuda ${QUICK:+--quick} --out "$OUT/bench" >"$OUT/bench.log" 2>&1
bench_rc=$?
echo "[runbook] bench exit $bench_rc"
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
echo "[runbook] summary: gpu-tests=$gpu_rc cuda-suites=$cuda_rc bench=$bench_rc"
grep -h -E "^(FAILED|ERROR)" "$OUT/pytest_gpu.log" "$OUT/pytest_cuda.log" | head -n 15
