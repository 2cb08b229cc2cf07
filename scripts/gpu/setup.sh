#!/usr/bin/env bash
# GPU validation kit, step 1 (the build step, on the GPU machine; well under a minute): checks the
# machine against the kit, makes the CPU-built binaries find their sources and Python, installs
# the carried wheels into gpu_kit/site and checks that every binary loads. See docs/gpu.md.
#   scripts/gpu/setup.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

log "kit: $(tr '\n' ';' < "$kit/MANIFEST")"
want=$(sed -n 's/^torch //p' "$kit/MANIFEST")
have=$("$python" -c 'import torch; print(torch.__version__)')
[[ "$have" == "$want" ]] || die "the binaries were built against torch $want but $python has torch $have"
"$python" -c 'import torch; assert torch.cuda.is_available(), "torch sees no GPU"' || die "no usable GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/[gpu] device: /' >&2

# The binaries have the source folder they were built in compiled in (configs, corpus, test data)
# and the project's .venv Python (test helpers): point both at this checkout.
source_dir=$(sed -n 's/^source_dir //p' "$kit/MANIFEST")
if [[ "$source_dir" != "$root" ]]; then
  if [[ -L "$source_dir" || ! -e "$source_dir" ]]; then
    mkdir -p "$(dirname "$source_dir")" && ln -sfn "$root" "$source_dir"
  else
    die "$source_dir exists and is not this checkout ($root): move it, or run the kit from there"
  fi
fi
# Wrappers, not links: a link to a virtual environment's interpreter would lose that environment
# (Python finds it next to the path it was started as) and with it torch.
if [[ ! -x "$root/.venv/bin/python" || -f "$root/.venv/kit_wrappers" ]]; then
  mkdir -p "$root/.venv/bin"
  interpreter=$(command -v "$python")
  printf '#!/bin/sh\nexec %q "$@"\n' "$interpreter" > "$root/.venv/bin/python"
  printf '#!/bin/sh\nexec %q -m torch.distributed.run "$@"\n' "$interpreter" > "$root/.venv/bin/torchrun"
  chmod +x "$root/.venv/bin/python" "$root/.venv/bin/torchrun"
  touch "$root/.venv/kit_wrappers"
fi
"$root/.venv/bin/python" -c 'import torch' || die "$root/.venv/bin/python cannot import torch"
# The corpus and tokenizers the trainers and tests read from data/cache.
if [[ ! -e "$root/data/cache" ]]; then
  mkdir -p "$root/data" && ln -sfn "$kit/data_cache" "$root/data/cache"
fi
[[ -f "$root/data/cache/tokenizers/tiktoken/llama3_bpe_4k.model" ]] ||
  die "$root/data/cache lacks the tokenizers: run scripts/gpu/pack.sh again (it packs data/cache)"

rm -rf "$kit_site"
"$python" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
  --target "$kit_site" "$kit"/wheels/*.whl
log "torchtitan: $(PYTHONPATH="$kit_site" "$python" -c 'import importlib.metadata as m; print(m.version("torchtitan"))')"

missing=0
while IFS= read -r binary; do
  if ldd "$binary" | grep -q 'not found'; then
    log "$binary: $(ldd "$binary" | grep 'not found' | tr -s ' \t' ' ' | tr '\n' ';')"
    missing=1
  fi
done < <(find "$kit_build" -type f -perm -u+x)
(( missing == 0 )) || die "some binaries miss libraries (above)"
"$kit_build/tests/test_titan" --list-test-cases > /dev/null || die "test_titan does not start"
log "setup done: binaries load, wheels installed"
