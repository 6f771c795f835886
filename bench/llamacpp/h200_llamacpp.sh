#!/usr/bin/env bash
# Issue 6, llama.cpp side, in one device call: build llama-bench and llama-batched-bench (CUDA, sm_90) from the carried
# archive in the background while the random Qwen3-30B-A3B-shaped checkpoint is written (bench/common.py, by
# bench/harness.py's gen phase; skipped when already there) and converted to a BF16 GGUF; then check on a tiny model
# that llama.cpp's CUDA backend computes what transformers does, sweep llama-bench's flags (-t x -fa x -lm) at one
# -ncmoe value and run the best flags at every -ncmoe value, with the expert cache (--moe-cache-mib, through
# llama-batched-bench) where CACHE_MIB is set. Each step prints its seconds; results go to $OUT (or bench/results).
#
# Usage: bash bench/llamacpp/h200_llamacpp.sh      env: WORK (/tmp/llamacpp), MODEL (/tmp/moe-offload-bench/full),
#        NCMOE (0,3,6,9,12), SWEEP_NCMOE (6), THREADS (4,8,12,16), CACHE_MIB (unset: no cache runs; e.g. 0,4096),
#        REPEATS (3), LAYERS (12: the gen phase's default), SKIP_CHECK / SKIP_GEN (unset),
#        SKIP_SWEEP (unset: set it to stop after the build and conversion; a rerun skips the finished build)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${WORK:-/tmp/llamacpp}
MODEL=${MODEL:-/tmp/moe-offload-bench/full}
NCMOE=${NCMOE:-0,3,6,9,12}
SWEEP_NCMOE=${SWEEP_NCMOE:-6}
THREADS=${THREADS:-4,8,12,16}
REPEATS=${REPEATS:-3}
RESULTS=${OUT:-$REPO/bench/results}
mkdir -p "$WORK" "$RESULTS"
cd "$REPO"
T0=$(date +%s)
step() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

BUILD_LOG=$RESULTS/llamacpp-build.log
step "build (background): $BUILD_LOG"
bash "$REPO/bench/llamacpp/build.sh" "$WORK" > "$BUILD_LOG" 2>&1 &
BUILD=$!

if [ -z "${SKIP_GEN:-}" ]; then
    step "gen $MODEL"
    python3 -m bench.harness --phases gen --model-dir "$MODEL" --out "$WORK/gen.json" ${LAYERS:+--layers $LAYERS} \
        | tail -3
fi
while [ ! -f "$WORK/llama.cpp/COMMIT" ]; do  # gguf-py comes with the extracted sources
    kill -0 $BUILD 2>/dev/null || { echo "build.sh stopped before extracting:"; tail -5 "$BUILD_LOG"; exit 1; }
    sleep 1
done
step "convert"
python3 -m bench.llamacpp.convert_qwen3moe_gguf "$MODEL" "$MODEL.gguf" --llama-cpp "$WORK/llama.cpp" | tail -1

step "waiting for the build"
wait $BUILD || { echo "build failed:"; grep -E "error|FAILED" "$BUILD_LOG" | head; tail -5 "$BUILD_LOG"; exit 1; }
grep "^build.sh" "$BUILD_LOG"
BIN=$WORK/build-cuda/bin

if [ -z "${SKIP_CHECK:-}" ]; then
    step "check: tiny Qwen3-MoE (vocab 151936), F32 and BF16 GGUF, llama.cpp -ngl 99 vs transformers float32"
    python3 - "$WORK/tiny" <<'PY'
import sys, torch
from bench.common import SPECS, generate_model
spec = dict(SPECS["tiny"], vocab_size=151936, bos_token_id=151643, eos_token_id=151645)
generate_model(sys.argv[1], spec, torch.device("cpu"))
PY
    for t in f32 bf16; do
        python3 -m bench.llamacpp.convert_qwen3moe_gguf "$WORK/tiny" "$WORK/tiny-$t.gguf" \
            --llama-cpp "$WORK/llama.cpp" --outtype $t | tail -1
        python3 -m bench.llamacpp.check_gguf "$WORK/tiny" "$WORK/tiny-$t.gguf" --llama-cpp "$WORK/llama.cpp" \
            --build "$WORK/build-cuda" --ngl 99 2>/dev/null | tail -1 | tee "$RESULTS/llamacpp-check-$t.json" || true
    done
fi

[ -z "${SKIP_SWEEP:-}" ] || { step "done (no sweep): $MODEL.gguf, $BIN"; exit 0; }
step "llama-bench sweep at -ncmoe $SWEEP_NCMOE (-t $THREADS x -fa 0,1 x -lm mmap,none), then -ncmoe $NCMOE"
python3 -m bench.llamacpp.run_llama_bench --llama-bench "$BIN/llama-bench" -m "$MODEL.gguf" --ncmoe "$NCMOE" \
    --sweep-ncmoe "$SWEEP_NCMOE" --threads "$THREADS" -p 128 -n 32 -r "$REPEATS" \
    ${CACHE_MIB:+--batched-bench "$BIN/llama-batched-bench" --moe-cache-mib "$CACHE_MIB"} \
    --out "$RESULTS/llamacpp-ncmoe.json"
step "done: $RESULTS/llamacpp-ncmoe.json, logs in $RESULTS/llamacpp-logs"
