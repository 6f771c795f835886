#!/usr/bin/env bash
# Issue 6, llama.cpp side, in one device call: build llama-bench (CUDA, sm_90) from the carried archive, write the
# random Qwen3-30B-A3B-shaped checkpoint (bench/common.py, by h200_offload_bench's gen phase; skipped when already
# there), convert it to a BF16 GGUF, check on a tiny model that llama.cpp's CUDA backend computes what transformers
# does, then sweep llama-bench over -ncmoe with peak GPU memory. Each step prints its seconds; results go to $OUT (or
# bench/results).
#
# Usage: bash bench/llamacpp/h200_llamacpp.sh      env: WORK (/tmp/llamacpp), MODEL (/tmp/moe-offload-bench/full),
#        NCMOE (0,3,6,9,12), REPEATS (3), LAYERS (12: the gen phase's default), SKIP_CHECK / SKIP_GEN (unset),
#        SKIP_SWEEP (unset: set it to stop after the conversion, e.g. to sweep in a second call with
#        bench/vs_llamacpp.py; a rerun skips the finished build)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${WORK:-/tmp/llamacpp}
MODEL=${MODEL:-/tmp/moe-offload-bench/full}
NCMOE=${NCMOE:-0,3,6,9,12}
REPEATS=${REPEATS:-3}
RESULTS=${OUT:-$REPO/bench/results}
mkdir -p "$WORK" "$RESULTS"
cd "$REPO"
T0=$(date +%s)
step() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

step "build"
bash "$REPO/bench/llamacpp/build.sh" "$WORK" 2>&1 | tee "$RESULTS/llamacpp-build.log" | grep -E "^build.sh|error|FAILED" || true
BENCH=$WORK/build-cuda/bin/llama-bench
[ -x "$BENCH" ] || { echo "no llama-bench; see $RESULTS/llamacpp-build.log"; tail -30 "$RESULTS/llamacpp-build.log"; exit 1; }

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

if [ -z "${SKIP_GEN:-}" ]; then
    step "gen $MODEL"
    python3 -m bench.h200_offload_bench --phases gen --model-dir "$MODEL" --out "$WORK/gen.json" \
        ${LAYERS:+--layers $LAYERS} | tail -3
fi

step "convert"
python3 -m bench.llamacpp.convert_qwen3moe_gguf "$MODEL" "$MODEL.gguf" --llama-cpp "$WORK/llama.cpp" | tail -1

[ -z "${SKIP_SWEEP:-}" ] || { step "done (no sweep): $MODEL.gguf, $BENCH"; exit 0; }
step "llama-bench over -ncmoe $NCMOE"
python3 -m bench.llamacpp.run_llama_bench --llama-bench "$BENCH" -m "$MODEL.gguf" --ncmoe "$NCMOE" \
    -p 128 -n 32 -r "$REPEATS" --out "$RESULTS/llamacpp-ncmoe.json"
step "done: $RESULTS/llamacpp-ncmoe.json"
