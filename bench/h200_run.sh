#!/usr/bin/env bash
# Every GPU table of bench/RESULTS.md (bench/harness.py: the offload table and the side by side with llama.cpp) in two
# device calls fired back to back: the machine keeps /tmp (the llama.cpp build, the 16.2 GB model, its GGUF and the
# harness's report) only ~30 s after a call. Both calls carry [".llamacpp"] (bench/llamacpp/README.md), and may set
# MOE_BENCH_COMMIT / MOE_BENCH_DIRTY: the device's copy of the tree may have no .git (bench/provenance.py).
#
#   prepare  ~9.5 min (it stops by LIMIT=570 s): bench/llamacpp/build.sh in the background (5-6 min on the H200
#            machine); meanwhile the model (python -m bench.harness --phases gen, 30-45 s), its BF16 GGUF (~1 min)
#            and $CHECKS if set. Once the build is done, the time left measures the offload table's configurations
#            that llama.cpp does not pair with: ratio 100 (~45 s), the baselines (transformers ~60 s, accelerate
#            ~90 s), the disk tier at ratio 25 (~70 s with its disk reads); what does not fit is left to `measure`.
#   measure  ~8-13 min: llama.cpp's flag sweep (threads x -fa x -lm at -ncmoe 12, 2-4 min; skipped with
#            LLAMACPP_FLAGS), then the side by side at ratios 0/25/50/75 (per ratio ours ~45-55 s and llama-bench
#            ~10-25 s, back to back, alternating which goes first), then what `prepare` left; if it ends "incomplete", run `measure`
#            again (same command: it finishes what is missing and keeps the rest).
# Each call ends by copying the report to $OUT/harness.json. Then, on the machine that called:
#   cp <returned harness.json> bench/results/<date>-h200-harness.json
#   python -m bench.table bench/results/<date>-h200-harness.json --write bench/RESULTS.md
#
# Quantized experts (issue 17): WEIGHTS=bf16,int4,int8 on every call (the same value each time). prepare then also
#   quantizes the model with `moe-offload quantize` (rtn, group 128) into $MODEL-int4 and $MODEL-int8 (the harness's
#   quant phase, timed into the report; while the build runs, so an upper bound) and, once the build is done, makes
#   $MODEL-Q4_0.gguf and $MODEL-Q8_0.gguf from the BF16 GGUF with llama-quantize (experts only, see EXPERTS_ONLY);
#   measure pairs our int4 with Q4_0 and our int8 with Q8_0 (bf16 with BF16) at the same -ncmoe, at issue 17's
#   ratios (RATIOS 0,10,25,50 side by side, OFFLOAD_RATIOS 100,50,25,10,0, the disk tier at 25), and sweeps
#   llama.cpp's flags on the Q4_0 GGUF (where int4 is measured). Every configuration of ours runs once per weights
#   (~35-65 s each). Timed on the H200 (2026-12-06): RATIOS=0,25 OFFLOAD_RATIOS=100,25,0 with LLAMACPP_FLAGS="-t 16
#   -fa 1 -lm mmap" (the BF16 sweep's best; saves the sweep's 2-4 min) took prepare (556 s) and two measure calls
#   (560 s, 188 s): 22.5 minutes of a session's 30 with the machine's start. The whole set needs about two sessions.
#   Disk: ~62 GB in /tmp (safetensors 16.2 + 9.1 + 5.4 GB, GGUFs 16.2 + up to 8.6 + 4.6 GB).
#   WEIGHTS may name fp8 too: the model written as Qwen3-30B-A3B-FP8 is (bench/fp8_checkpoint.py, ~8.2 GB), paired
#   with the Q8_0 GGUF (llama.cpp has no FP8 type).
#
# cpu-share (one call, ~6 min, no llama.cpp): the model and its quantized WEIGHTS, bench.cpu_quant_experts on this
#   machine's cores less two (the engine's share), then our side by side at SHARE_RATIOS (0) with the variant
#   gpu_only (MOE_CPU_EXPERTS=off) beside the default: what the CPU share and its load-time kernel choice are worth.
#   It leaves the model and the report in place for prepare / measure, if fired within 30 s.
#
# Usage: OUT=... [CHECKS="python -m pytest -q tests/test_hybrid.py"] [WEIGHTS=bf16,int4,int8] bash bench/h200_run.sh prepare
#        OUT=... [WEIGHTS=...] [SHARE_RATIOS=0] bash bench/h200_run.sh cpu-share
#        OUT=... [VARIANTS='{"gpu_only": {"MOE_CPU_EXPERTS": "off"}}'] [LLAMACPP_FLAGS="-t 16"] [WEIGHTS=...] bash bench/h200_run.sh measure
# env: WORK (/tmp/llamacpp), MODEL (/tmp/moe-offload-bench/full), STATE (/tmp/moe-offload-bench/harness.json: the
#      report both calls build), LIMIT (570: the seconds a call may take, under the device's 600), WEIGHTS (bf16),
#      RATIOS / OFFLOAD_RATIOS (the harness's --ratios / --offload-ratios; issue 17's where WEIGHTS has int4/int8)
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/tmp/llamacpp}
MODEL=${MODEL:-/tmp/moe-offload-bench/full}
STATE=${STATE:-/tmp/moe-offload-bench/harness.json}
LIMIT=${LIMIT:-570}
OUT=${OUT:-$REPO/bench/results}
BENCH=$WORK/build-cuda/bin/llama-bench
QUANTIZE=$WORK/build-cuda/bin/llama-quantize
WEIGHTS=${WEIGHTS:-bf16}
PLAN=(--weights "$WEIGHTS")  # every harness call of a report names the same weights and ratios
if [ "$WEIGHTS" != bf16 ]; then RATIOS=${RATIOS:-0,10,25,50}; OFFLOAD_RATIOS=${OFFLOAD_RATIOS:-100,50,25,10,0}; fi
PLAN+=(${RATIOS:+--ratios "$RATIOS"} ${OFFLOAD_RATIOS:+--offload-ratios "$OFFLOAD_RATIOS"})
declare -A GGUF_TYPE=([int4]=Q4_0 [int8]=Q8_0 [fp8]=Q8_0)  # bench/harness.py gguf_for: MODEL.gguf -> MODEL-Q4_0.gguf
# Like our checkpoints, only the routed experts quantized: llama-quantize's plain Q4_0 would also take the attention
# and the embedding to Q4_0 and the head to Q6_K, shrinking what sits on the GPU beside the experts.
EXPERTS_ONLY=(--pure --output-tensor-type bf16 --token-embedding-type bf16 --tensor-type attn_=bf16)
QUANTIZED=(); for w in ${WEIGHTS//,/ }; do [ -n "${GGUF_TYPE[$w]:-}" ] && QUANTIZED+=("$w"); done
cd "$REPO"
T0=$(date +%s)
step() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
mkdir -p "$WORK" "$OUT" "$(dirname "$STATE")"

harness() {  # python -m bench.harness ARGS, within what is left of LIMIT, onto $STATE; then the report to $OUT
    local left=$(( LIMIT - ($(date +%s) - T0) ))
    if [ "$left" -lt 60 ]; then step "no time left for: bench.harness $*"; return 0; fi
    local merge=(); [ -f "$STATE" ] && merge=(--merge "$STATE")
    step "bench.harness $* (budget $(( left - 15 )) s)"
    PYTHONUNBUFFERED=1 timeout -k 10 "$left" python -m bench.harness "$@" "${merge[@]}" --model-dir "$MODEL" \
        --out "$STATE" --budget-s $(( left - 15 ))
    echo "harness rc $?"
    [ -f "$STATE" ] && cp "$STATE" "$OUT/harness.json"
}

case "${1:-}" in
prepare)
    ARCHIVE=$REPO/.llamacpp/llama.cpp-src.tar.xz
    [ -f "$WORK/llama.cpp/COMMIT" ] || [ -f "$ARCHIVE" ] || {
        echo "no $ARCHIVE: pass carry [\".llamacpp\"] to the device call (bench/llamacpp/make_archive.sh makes it)"; exit 1; }
    step "build (background): $OUT/llamacpp-build.log"
    bash bench/llamacpp/build.sh "$WORK" > "$OUT/llamacpp-build.log" 2>&1 &
    BUILD=$!
    step "gen $MODEL"
    python -m bench.harness --phases gen --model-dir "$MODEL" --out "$WORK/gen.json" | tail -2
    while [ ! -f "$WORK/llama.cpp/COMMIT" ]; do  # gguf-py comes with the extracted sources
        kill -0 $BUILD 2>/dev/null || { echo "build.sh stopped before extracting:"; tail -5 "$OUT/llamacpp-build.log"; exit 1; }
        sleep 1
    done
    step "convert"
    [ -f "$MODEL.gguf" ] || python -m bench.llamacpp.convert_qwen3moe_gguf "$MODEL" "$MODEL.gguf" --llama-cpp "$WORK/llama.cpp" | tail -1
    if [ ${#QUANTIZED[@]} -gt 0 ]; then harness "${PLAN[@]}" --phases quant; df -h "$(dirname "$MODEL")" | tail -1; fi
    if [ -n "${CHECKS:-}" ]; then step "checks: $CHECKS"; bash -c "$CHECKS" > "$OUT/checks.log" 2>&1; echo "checks rc $?"; tail -5 "$OUT/checks.log"; fi
    step "waiting for the build"
    wait $BUILD; echo "build rc $?"; tail -3 "$OUT/llamacpp-build.log"
    [ -x "$BENCH" ] || { echo "no $BENCH"; exit 1; }
    for w in "${QUANTIZED[@]}"; do  # llama.cpp's peer of our int4 / int8 / fp8, from the BF16 GGUF
        target=$MODEL-${GGUF_TYPE[$w]}.gguf
        [ -f "$target" ] && continue
        step "llama-quantize ${GGUF_TYPE[$w]}"
        "$QUANTIZE" "${EXPERTS_ONLY[@]}" "$MODEL.gguf" "$target.partial" "${GGUF_TYPE[$w]}" "$(nproc)" > "$OUT/llama-quantize-$w.log" 2>&1 \
            && mv "$target.partial" "$target" || { echo "llama-quantize failed:"; tail -5 "$OUT/llama-quantize-$w.log"; }
    done
    harness "${PLAN[@]}" --tables offload --offload-ratios 100
    ;;
measure)
    [ -x "$BENCH" ] && [ -f "$MODEL.gguf" ] || { echo "no $BENCH or $MODEL.gguf: run prepare first (within 30 s)"; exit 1; }
    SWEPT=$MODEL.gguf  # the sweep runs on the narrowest GGUF measured: Q4_0 where int4 is, the issue's headline
    for w in int8 int4; do [[ ",$WEIGHTS," == *",$w,"* ]] && SWEPT=$MODEL-${GGUF_TYPE[$w]}.gguf; done
    SWEEP=$(dirname "$STATE")/llamacpp-sweep-$(basename "$SWEPT" .gguf).json
    if [ -z "${LLAMACPP_FLAGS:-}" ] && [ ! -f "$SWEEP" ]; then  # llama.cpp at its best: threads x -fa x -lm at -ncmoe 12
        step "llama.cpp flag sweep on $(basename "$SWEPT") (~2-4 min)"
        timeout 300 python -m bench.llamacpp.run_llama_bench --llama-bench "$BENCH" -m "$SWEPT" --ncmoe 12 \
            --sweep-ncmoe 12 --log-dir "$OUT/llamacpp-logs" --out "$SWEEP" | tail -3
        cp "$SWEEP" "$OUT/" 2>/dev/null
    fi
    PEER=(); if [ -n "${LLAMACPP_FLAGS:-}" ]; then PEER=(--llamacpp-flags "$LLAMACPP_FLAGS")
    elif [ -f "$SWEEP" ]; then PEER=(--llamacpp-sweep "$SWEEP"); fi
    harness "${PLAN[@]}" --gguf "$MODEL.gguf" --llama-bench "$BENCH" ${VARIANTS:+--variants "$VARIANTS"} "${PEER[@]}"
    ;;
cpu-share)  # one call, no llama.cpp: the CPU share's kernels on this machine, then SHARE_RATIOS with and without it
    step "gen $MODEL"
    python -m bench.harness --phases gen --model-dir "$MODEL" --out "$WORK/gen.json" | tail -2
    [ ${#QUANTIZED[@]} -gt 0 ] && harness "${PLAN[@]}" --phases quant
    step "bench.cpu_quant_experts, $(( $(nproc) - 2 )) threads: $OUT/cpu-quant-experts.log"
    timeout 150 python -m bench.cpu_quant_experts --threads $(( $(nproc) - 2 )) --repeats 20 \
        --out "$OUT/cpu-quant-experts.json" > "$OUT/cpu-quant-experts.log" 2>&1; tail -12 "$OUT/cpu-quant-experts.log"
    harness "${PLAN[@]}" --tables side_by_side --ratios "${SHARE_RATIOS:-0}" --phases bw,runs \
        --variants '{"gpu_only": {"MOE_CPU_EXPERTS": "off"}}'
    ;;
*) echo "usage: $0 prepare|measure|cpu-share" >&2; exit 2 ;;
esac
step "done"
