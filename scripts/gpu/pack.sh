#!/usr/bin/env bash
# GPU validation kit, step 0 (on the CPU machine): packs into gpu_kit/ (git-ignored, under 64 MiB)
# everything the GPU machine lacks, so that scripts/gpu/setup.sh and scripts/gpu/run.sh need no
# package registry there. See docs/gpu.md.
#
#   scripts/gpu/pack.sh            # builds what is missing in ./build, then packs
#
# gpu_kit/ holds:
#   build/     titan's test, trainer and benchmark executables, built here against the project's
#              torch 2.11.0+cu130 wheel (the GPU image's torch is the same build), debug info
#              stripped, in the same layout as ./build so every script takes it as BUILD_DIR;
#   lib/       the shared libraries they need beyond glibc, libstdc++ and torch (PCRE2,
#              SentencePiece);
#   models_reference/  the transformers reference checkpoints test_models compares against
#              (tests/models/make_reference.py)
#   moe_reference.safetensors  transformers' MoE blocks' results for test_titan's moe cases
#              (tests/moe/make_reference.py), so the GPU machine needs no transformers;
#   data_cache/  data/cache: the offline corpus and the tokenizers (scripts/make_corpus.sh);
#   wheels/    torchtitan 0.2.2 and the packages it imports that the GPU image lacks, as Python
#              3.12 wheels (bench/side_by_side/requirements.txt);
#   MANIFEST   the commit, the date, the source folder the binaries were built in, sizes.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build="${BUILD_DIR:-$root/build}"
kit="${KIT_DIR:-$root/gpu_kit}"
limit_mib=60  # the device tool carries at most 64 MiB with the working tree

binaries=(
  tests/titan_launch tests/test_titan tests/peer_failure
  tests/models/test_models tests/models/test_models_ranks tests/trainer/test_trainer
  examples/trainer/titan_train
  bench/fsdp/bench_fsdp bench/checkpoint/bench_checkpoint bench/ac/bench_ac bench/moe/bench_moe
)
targets=()
for b in "${binaries[@]}"; do targets+=("$(basename "$b")"); done

log() { printf '[pack] %s\n' "$*" >&2; }

log "building ${targets[*]}"
BUILD_DIR="$build" "$root/scripts/build.sh" --target "${targets[@]}"

rm -rf "$kit"
mkdir -p "$kit/build" "$kit/lib" "$kit/wheels"

for b in "${binaries[@]}"; do
  mkdir -p "$kit/build/$(dirname "$b")"
  strip --strip-unneeded -o "$kit/build/$b" "$build/$b"
done

# Shared libraries outside glibc, the C++ runtime and torch's own folders (the GPU image has those).
mapfile -t extra < <(for b in "${binaries[@]}"; do ldd "$build/$b"; done |
  awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u |
  grep -v -E '/(site-packages)/|/lib(c|m|dl|rt|pthread|util|stdc\+\+|gcc_s)\.so')
for lib in "${extra[@]}"; do cp -L "$lib" "$kit/lib/"; done
log "libraries: $(cd "$kit/lib" && ls | tr '\n' ' ')"

# The offline corpus and tokenizers (git-ignored, so they do not travel with the checkout).
data="$root/data/cache"
[[ -f "$data/tokenizers/tiktoken/llama3_bpe_4k.model" ]] || "$root/scripts/make_corpus.sh"
cp -r "$data" "$kit/data_cache"

reference="$build/tests/models/reference"
if [[ -z "$(ls -A "$reference" 2>/dev/null)" ]]; then
  log "writing the transformers reference checkpoints"
  OMP_NUM_THREADS=1 "$root/.venv/bin/python" "$root/tests/models/make_reference.py" --out "$reference"
fi
cp -r "$reference" "$kit/models_reference"

log "writing transformers' MoE block reference (tests/moe/make_reference.py)"
OMP_NUM_THREADS=1 "$root/.venv/bin/python" "$root/tests/moe/make_reference.py" --out "$kit/moe_reference.safetensors"

log "writing torchao's float8 reference (tests/float8/make_reference.py: the GPU machine has no torchao)"
OMP_NUM_THREADS=1 "$root/.venv/bin/python" "$root/tests/float8/make_reference.py" --out "$kit/float8_reference.safetensors"

log "downloading torchtitan and its imports as Python 3.12 wheels"
"$root/.venv/bin/python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$kit/wheels" \
  -r <(grep -v 'gpu-image' "$root/bench/side_by_side/requirements.txt" | sed 's/#.*//')

cmake_home=$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$build/CMakeCache.txt")
{
  echo "commit $(git -C "$root" rev-parse HEAD)$(git -C "$root" diff --quiet HEAD -- include examples tests || echo ' (with uncommitted changes)')"
  echo "packed $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "source_dir $cmake_home"
  echo "torch $("$root/.venv/bin/python" -c 'import torch; print(torch.__version__)')"
} > "$kit/MANIFEST"

size_mib=$(( $(du -sb "$kit" | cut -f1) / 1048576 ))
(( size_mib <= limit_mib )) || { log "gpu_kit/ is ${size_mib} MiB, over the ${limit_mib} MiB the device tool carries"; exit 1; }
log "gpu_kit/ ready: ${size_mib} MiB ($(cat "$kit/MANIFEST" | head -1))"
