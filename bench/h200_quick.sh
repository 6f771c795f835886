#!/usr/bin/env bash
# One device call that checks new GPU work before the long benchmarks: the GPU tests of the hybrid CPU/GPU decode,
# piecewise graphs and the Triton grid; the CPU share's latency (bench/hybrid_latency.py); then our side of the
# issue-6 comparison (bench/vs_llamacpp.py, each configuration its own process) on the random
# Qwen3-30B-A3B-shaped model at RATIOS, misses on the GPU only / split as MOE_CPU_EXPERTS=auto decides / all on
# the CPU.
#
# Usage: OUT=/some/dir bash bench/h200_quick.sh     env: MODEL (/tmp/moe-offload-bench/full), RATIOS (50,0),
#        TESTS (the pytest files; "" skips them)
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/bench/results}
MODEL=${MODEL:-/tmp/moe-offload-bench/full}
RATIOS=${RATIOS:-50,0}
TESTS=${TESTS-tests/test_hybrid.py tests/test_piecewise.py tests/test_triton_moe.py}
cd "$REPO"
T0=$(date +%s)
step() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

if [ -n "$TESTS" ]; then
    step "pytest $TESTS"
    timeout 300 python -m pytest -q $TESTS > "$OUT/quick-tests.log" 2>&1
    tail -15 "$OUT/quick-tests.log"
fi
step "CPU share latency"
timeout 120 python -m bench.hybrid_latency --threads $(( $(nproc) - 2 )) --out "$OUT/quick-hybrid-latency.json" \
    | grep -v '^{'
step "gen $MODEL"
[ -f "$MODEL/config.json" ] || python -m bench.h200_offload_bench --phases gen --model-dir "$MODEL" \
    --out /tmp/gen.json | tail -2
step "ratios $RATIOS: misses split as auto decides / GPU only / all on the CPU"
python -m bench.vs_llamacpp --model-dir "$MODEL" --ratios "$RATIOS" --repeats 3 --timeout 100 \
    --variants '{"hybrid": {"MOE_CPU_EXPERTS": "auto"}, "gpu_only": {"MOE_CPU_EXPERTS": "off"}, "all_cpu": {"MOE_CPU_EXPERTS": "all"}}' \
    --out "$OUT/quick-hybrid.json" | grep -v '^{'
step "done"
