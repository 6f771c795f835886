#!/usr/bin/env bash
# Rebuilds .llamacpp/llama.cpp-src.tar.xz: the llama.cpp vendored in the xllamacpp sdist, trimmed to what building
# `llama-bench`, `llama-batched-bench` and `llama-quantize` (CPU + CUDA backends) needs, plus gguf-py/ and
# models/ggml-vocab-qwen2.gguf.
# Why: the GPU machine has no network and the repo that travels there has a 64 MB ceiling, so the sources travel
# as one small archive (see README.md here for what is kept and what is replaced). xllamacpp because its tree is new
# enough to have the MoE expert cache (--moe-cache-mib), which the llama-cpp-python 0.3.36 tree lacked.
# Usage: bench/llamacpp/make_archive.sh [SDIST.tar.gz]   (default: pip download xllamacpp==$XLLAMACPP_VERSION)
set -euo pipefail
XLLAMACPP_VERSION=${XLLAMACPP_VERSION:-2026.10.11549}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=$REPO/.llamacpp/llama.cpp-src.tar.xz
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

SDIST=${1:-}
if [ -z "$SDIST" ]; then
    pip download "xllamacpp==$XLLAMACPP_VERSION" --no-binary :all: --no-deps -d "$WORK/dl"
    SDIST=$(ls "$WORK"/dl/xllamacpp-*.tar.gz)
fi
tar -xzf "$SDIST" -C "$WORK"
SRC=$(ls -d "$WORK"/xllamacpp-*/thirdparty/llama.cpp 2>/dev/null) \
    || { echo "make_archive.sh: $SDIST is not an xllamacpp sdist (no thirdparty/llama.cpp)" >&2; exit 1; }
VERSION=$(basename "$(dirname "$(dirname "$SRC")")" | sed 's/^xllamacpp-//')
# The sdist ships no git metadata; xllamacpp versions are YEAR.MONTH.N with N the build number of the llama.cpp tag
# its submodule sits on (its scripts/generate-release-version.sh: `git describe --tags --abbrev=0`, "b" stripped).
TAG=b${VERSION##*.}

DST=$WORK/stage/llama.cpp
keep() { for p in "$@"; do mkdir -p "$DST/$(dirname "$p")"; cp -a "$SRC/$p" "$DST/$p"; done; }
keep CMakeLists.txt LICENSE licenses cmake include src common \
     ggml/CMakeLists.txt ggml/cmake ggml/include \
     ggml/src/CMakeLists.txt ggml/src/ggml-version.h.in ggml/src/ggml-cpu ggml/src/ggml-cuda \
     tools/llama-bench tools/batched-bench tools/quantize vendor/nlohmann vendor/sheredom vendor/cpp-httplib \
     gguf-py/gguf gguf-py/LICENSE gguf-py/README.md gguf-py/pyproject.toml \
     models/ggml-vocab-qwen2.gguf
cp -a "$SRC"/ggml/src/*.c "$SRC"/ggml/src/*.cpp "$SRC"/ggml/src/*.h "$DST/ggml/src/"
# the CPU backend's code for other CPU families, and its optional SpacemiT / KleidiAI (ARM) kernels
rm -rf "$DST"/ggml/src/ggml-cpu/spacemit "$DST"/ggml/src/ggml-cpu/kleidiai
find "$DST/ggml/src/ggml-cpu/arch" -mindepth 1 -maxdepth 1 ! -name x86 -exec rm -rf {} +
rm -rf "$DST"/cmake/*-apple-* "$DST"/cmake/*-windows-* "$DST"/cmake/*-linux-* "$DST"/cmake/download-models.cmake
rm -f "$DST"/tools/*/README.md
find "$DST/gguf-py" -name __pycache__ -prune -exec rm -rf {} +

# Replaced: these two CMakeLists.txt add every tool / vendored library; only what the two benches link is left.
cat > "$DST/tools/CMakeLists.txt" <<'CMAKE'
# trimmed for moe-offload (bench/llamacpp/make_archive.sh): only llama-bench, llama-batched-bench, llama-quantize
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(llama-bench)
add_subdirectory(batched-bench)
add_subdirectory(quantize)
CMAKE
cat > "$DST/vendor/CMakeLists.txt" <<'CMAKE'
# trimmed for moe-offload (bench/llamacpp/make_archive.sh): what llama-common links
add_subdirectory(nlohmann)
add_subdirectory(sheredom)
if (LLAMA_BUILD_COMMON)
    add_subdirectory(cpp-httplib)
endif()
CMAKE
cat > "$DST/TRIMMED.txt" <<TXT
llama.cpp $TAG, as vendored in xllamacpp $VERSION (PyPI sdist; the exact commit is not shipped, the tag is read
from xllamacpp's version), trimmed by moe-offload's bench/llamacpp/make_archive.sh to build llama-bench,
llama-batched-bench and llama-quantize (CPU + CUDA). Configure with
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
(bench/llamacpp/build.sh does). tools/CMakeLists.txt and vendor/CMakeLists.txt are replaced.
TXT
echo "$TAG" > "$DST/COMMIT"

mkdir -p "$(dirname "$OUT")"
tar -C "$WORK/stage" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - llama.cpp \
    | xz -9e -T1 > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "xllamacpp $VERSION, llama.cpp $TAG -> $OUT ($(stat -c %s "$OUT") bytes)"
