#!/usr/bin/env bash
# Issue 6's side-by-side run in two back-to-back device calls (the machine keeps /tmp only while it stays warm):
#   prepare: build llama-bench in the background while the random model is written and converted to a BF16 GGUF
#            and the commands in $CHECKS (GPU tests, say) run; then wait for the build.
#   measure: bench/vs_llamacpp.py: llama-bench -ncmoe 12/9/6/3 (and 0) against our variants at ratios 0/25/50/75.
# Both calls need carry [".llamacpp"] (the git-ignored source archive; see README.md here).
# Usage: OUT=... CHECKS="python -m pytest -q tests/test_hybrid.py" bash bench/llamacpp/h200_side_by_side.sh prepare
#        OUT=... bash bench/llamacpp/h200_side_by_side.sh measure
# env: WORK (/tmp/llamacpp), MODEL, RATIOS, REPEATS, VARIANTS, MAIN, DECODE_TOKENS (vs_llamacpp.py's --variants,
#      --main, --decode-tokens)
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${WORK:-/tmp/llamacpp}
MODEL=${MODEL:-/tmp/moe-offload-bench/full}
OUT=${OUT:-$REPO/bench/results}
cd "$REPO"
T0=$(date +%s)
step() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
mkdir -p "$WORK" "$OUT"
case "${1:-}" in
prepare)
    ARCHIVE=$REPO/.llamacpp/llama.cpp-src.tar.xz
    [ -f "$WORK/llama.cpp/COMMIT" ] || [ -f "$ARCHIVE" ] || {
        echo "no $ARCHIVE: pass carry [\".llamacpp\"] to the device call (make it with make_archive.sh)"; exit 1; }
    step "build (background)"
    bash bench/llamacpp/build.sh "$WORK" > "$OUT/llamacpp-build.log" 2>&1 &
    BUILD=$!
    step "gen $MODEL"
    [ -f "$MODEL/config.json" ] || python -m bench.h200_offload_bench --phases gen --model-dir "$MODEL" \
        --out /tmp/gen.json | tail -1
    while [ ! -f "$WORK/llama.cpp/COMMIT" ]; do  # gguf-py comes with the extracted sources
        kill -0 $BUILD 2>/dev/null || { echo "build.sh stopped before extracting:"; tail -5 "$OUT/llamacpp-build.log"; exit 1; }
        sleep 1
    done
    step "convert"
    python -m bench.llamacpp.convert_qwen3moe_gguf "$MODEL" "$MODEL.gguf" --llama-cpp "$WORK/llama.cpp" | tail -1
    if [ -n "${CHECKS:-}" ]; then step "checks: $CHECKS"; bash -c "$CHECKS"; echo "checks rc $?"; fi
    step "waiting for the build"
    wait $BUILD; echo "build rc $?"; tail -3 "$OUT/llamacpp-build.log"
    ls -la "$WORK/build-cuda/bin/llama-bench"
    ;;
measure)
    step "side by side"
    python -m bench.vs_llamacpp --model-dir "$MODEL" --gguf "$MODEL.gguf" --ratios "${RATIOS:-0,25,50,75}" \
        --llama-bench "$WORK/build-cuda/bin/llama-bench" --repeats "${REPEATS:-3}" --timeout 100 \
        ${VARIANTS:+--variants "$VARIANTS"} ${MAIN:+--main "$MAIN"} ${DECODE_TOKENS:+--decode-tokens "$DECODE_TOKENS"} \
        --out "$OUT/vs-llamacpp.json" | grep -v '^{"ratio'
    ;;
*) echo "usage: $0 prepare|measure" >&2; exit 2 ;;
esac
step "done"
