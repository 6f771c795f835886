#!/usr/bin/env bash
# Builds llama.cpp's `llama-bench`, `llama-batched-bench` and `llama-quantize` (the Q4_0/Q8_0 GGUFs of the quantized
# comparison) from the trimmed archive (.llamacpp/llama.cpp-src.tar.xz,
# see README.md here), offline, for the issue-6 baseline: llama.cpp with its MoE experts kept on the CPU (-ncmoe, and
# -ncmoe with its GPU expert cache --moe-cache-mib, which only common_params tools such as llama-batched-bench parse)
# vs moe-offload. Only those targets (and what they link) are built; CUDA for one arch (sm_90, the H200), no FA
# all-quants, so that building fits in one short device call. `--cpu` builds without CUDA (a machine with no nvcc/GPU).
#
# Usage: bench/llamacpp/build.sh [--cpu] [--archive A.tar.xz] [--targets "llama-bench ..."] DIR
#   -> DIR/llama.cpp (sources), DIR/build-cuda or DIR/build-cpu (binaries in bin/); prints the binaries' paths last.
# Where the CUDA toolkit lacks cuBLAS (an image whose toolkit came as pip wheels), cuBLAS is taken from the Python
# packages (nvidia/cu13 or nvidia/cublas); where no libcuda.so link is found, libcuda.so.1 is named directly.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ARCHIVE=$HERE/../../.llamacpp/llama.cpp-src.tar.xz
CUDA=ON
TARGETS="llama-bench llama-batched-bench llama-quantize"
DIR=
while [ $# -gt 0 ]; do
    case $1 in
        --cpu) CUDA=OFF ;;
        --archive) ARCHIVE=$2; shift ;;
        --targets) TARGETS=$2; shift ;;
        -h|--help) sed -n 2,11p "$0"; exit 0 ;;
        *) DIR=$1 ;;
    esac
    shift
done
[ -n "$DIR" ] || { echo "usage: $0 [--cpu] [--archive A] [--targets T] DIR" >&2; exit 2; }
START=$(date +%s.%N)
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
SRC=$DIR/llama.cpp
if [ ! -f "$SRC/COMMIT" ]; then
    tar -xJf "$ARCHIVE" -C "$DIR"
fi
COMMIT=$(cat "$SRC/COMMIT")  # the llama.cpp tag, e.g. b11549 (the sdist has no git metadata)
NUMBER=${COMMIT#b}
[[ "$NUMBER" =~ ^[0-9]+$ ]] || NUMBER=0

ARGS=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
      -DLLAMA_BUILD_COMMIT="$COMMIT" -DLLAMA_BUILD_NUMBER="$NUMBER")
if command -v ninja >/dev/null; then ARGS+=(-G Ninja); fi
if [ "$CUDA" = ON ]; then
    BUILD=$DIR/build-cuda
    ARGS+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA_ALL_QUANTS=OFF)
    NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
    # the toolkit's root as nvcc itself reports it (nvcc on PATH may be a wrapper script elsewhere)
    CUDA_ROOT=$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1 || true)
    CUDA_ROOT=$(readlink -f "${CUDA_ROOT:-$(dirname "$(readlink -f "$NVCC")")/..}")
    [ -x "$CUDA_ROOT/bin/nvcc" ] && NVCC=$CUDA_ROOT/bin/nvcc
    echo "build.sh: CUDA toolkit $CUDA_ROOT ($("$NVCC" --version | tail -2 | head -1))"
    ARGS+=(-DCMAKE_CUDA_COMPILER="$NVCC" -DGGML_CUDA_NCCL=OFF)
    if [ ! -f "$CUDA_ROOT/include/cublas_v2.h" ]; then
        # cuBLAS from the Python wheels (nvidia-cublas); their libs have only versioned names, so name them.
        PYNV=$(python3 -c 'import nvidia, os; print(" ".join(nvidia.__path__))' 2>/dev/null || true)
        INC=$(find $PYNV -name cublas_v2.h 2>/dev/null | head -1 || true)
        LIB=$(find $PYNV -name 'libcublas.so*' 2>/dev/null | sort | head -1 || true)
        LT=$(find $PYNV -name 'libcublasLt.so*' 2>/dev/null | sort | head -1 || true)
        [ -n "$INC" ] && [ -n "$LIB" ] || { echo "build.sh: no cuBLAS in $CUDA_ROOT nor in Python's nvidia packages" >&2; exit 1; }
        # only the cuBLAS headers (not the wheel's other CUDA headers, which could shadow nvcc's own version)
        CUBLAS_INC=$DIR/cublas-include
        mkdir -p "$CUBLAS_INC"
        ln -sf "$(dirname "$INC")"/cublas*.h "$CUBLAS_INC"/
        echo "build.sh: cuBLAS from $(dirname "$INC") and $LIB"
        ARGS+=(-DCUDA_cublas_LIBRARY="$LIB" -DCUDA_cublasLt_LIBRARY="$LT" -DCMAKE_CUDA_FLAGS="-I$CUBLAS_INC")
    fi
    if ! find "$CUDA_ROOT"/lib* "$CUDA_ROOT"/targets/*/lib* -name 'libcuda.so' 2>/dev/null | grep -q . \
       && ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so '; then
        DRV=$( (ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF}'; ls /usr/lib/x86_64-linux-gnu/libcuda.so.1 \
               /usr/lib64/libcuda.so.1 /usr/local/nvidia/lib64/libcuda.so.1 2>/dev/null) | head -1 || true)
        if [ -n "$DRV" ]; then
            ARGS+=(-DCUDA_cuda_driver_LIBRARY="$DRV")
        else
            echo "build.sh: no libcuda found; building with GGML_CUDA_NO_VMM=ON" >&2
            ARGS+=(-DGGML_CUDA_NO_VMM=ON)
        fi
    fi
else
    BUILD=$DIR/build-cpu
    ARGS+=(-DGGML_CUDA=OFF)
fi
cmake -S "$SRC" -B "$BUILD" "${ARGS[@]}" > "$BUILD.configure.log" 2>&1 \
    || { tail -40 "$BUILD.configure.log"; exit 1; }
grep -E "CUDA Toolkit found|CUDA_ARCHITECTURES|Including .* backend|x86 detected" "$BUILD.configure.log" || true
CONFIGURED=$(date +%s.%N)
cmake --build "$BUILD" --config Release -j "$(nproc)" --target $TARGETS
END=$(date +%s.%N)
awk -v s="$START" -v c="$CONFIGURED" -v e="$END" 'BEGIN { printf "build.sh: extract+configure %.1f s, build %.1f s, total %.1f s\n", c - s, e - c, e - s }'
for target in $TARGETS; do echo "$BUILD/bin/$target"; done
