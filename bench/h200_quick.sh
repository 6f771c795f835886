#!/usr/bin/env bash
# One device call that checks new GPU work before the long benchmarks: the GPU tests of the hybrid CPU/GPU decode,
# the fused dense ops and the Triton grid, then our side of the issue-6 comparison (bench/vs_llamacpp.py, each
# configuration its own process) on the random Qwen3-30B-A3B-shaped model: ratio 100 with and without fused dense
# ops, and RATIOS with misses on the GPU only / split by the measured cost model / all on the CPU.
#
# Usage: OUT=/some/dir bash bench/h200_quick.sh     env: MODEL (/tmp/moe-offload-bench/full), RATIOS (25,0),
#        TESTS (the pytest files; "" skips them)
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/bench/results}
MODEL=${MODEL:-/tmp/moe-offload-bench/full}
RATIOS=${RATIOS:-25,0}
TESTS=${TESTS-tests/test_hybrid.py tests/test_dense_fusion.py tests/test_triton_moe.py}
cd "$REPO"
T0=$(date +%s)
step() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

if [ -n "$TESTS" ]; then
    step "pytest $TESTS"
    timeout 300 python -m pytest -x -q $TESTS 2>&1 | tail -15 | tee "$OUT/quick-tests.log"
fi
step "gen $MODEL"
[ -f "$MODEL/config.json" ] || python bench/h200_offload_bench.py --phases gen --model-dir "$MODEL" \
    --out /tmp/gen.json | tail -2
step "ratio 100: fused dense ops or not"
python bench/vs_llamacpp.py --model-dir "$MODEL" --ratios 100 --repeats 3 --timeout 120 \
    --variants '{"fused": {"MOE_FUSE_DENSE": "auto"}, "unfused": {"MOE_FUSE_DENSE": "off"}}' \
    --out "$OUT/quick-ratio100.json" | grep -v '^{'
step "ratios $RATIOS: misses split by the cost model / GPU only / all on the CPU"
python bench/vs_llamacpp.py --model-dir "$MODEL" --ratios "$RATIOS" --repeats 3 --timeout 120 \
    --variants '{"hybrid": {"MOE_CPU_EXPERTS": "auto"}, "gpu_only": {"MOE_CPU_EXPERTS": "off"}, "all_cpu": {"MOE_CPU_EXPERTS": "all"}}' \
    --out "$OUT/quick-hybrid.json" | grep -v '^{'
step "done"
