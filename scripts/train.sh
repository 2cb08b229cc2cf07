#!/usr/bin/env bash
# The main job: installs and builds what is missing (scripts/build.sh), then trains the debug
# Llama 3 model with FSDP on NPROC (default 2) CPU ranks on the offline Python-documentation corpus,
# printing progress and metrics and writing metrics.jsonl, TensorBoard events and checkpoints under
# the config's job.dump_folder.
#
#   ./scripts/train.sh                                   # examples/configs/llama3_debug.toml
#   CONFIG_FILE=examples/configs/mistral_debug.toml ./scripts/train.sh
#   NPROC=4 ./scripts/train.sh --training.steps 50       # extra arguments override config keys
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build="${BUILD_DIR:-$root/build}"
config="${CONFIG_FILE:-examples/configs/llama3_debug.toml}"
nproc="${NPROC:-2}"

"$root/scripts/build.sh" --target titan_launch titan_train

cd "$root"
exec "$build/tests/titan_launch" --nproc "$nproc" --timeout 86400 -- "$build/examples/trainer/titan_train" --config "$config" "$@"
