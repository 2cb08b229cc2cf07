#!/usr/bin/env bash
# Builds the offline corpus and the test tokenizers into data/cache/ (git-ignored) from Debian
# packages python3.11-doc and dict-gcide; no network. Idempotent: does nothing when the outputs
# exist and were made by the current scripts (stamp: hash of scripts/data/*.py).
#   data/cache/pretrain/python_docs{,_valid}.{txt,jsonl}   Python 3.11 documentation as plain text
#   data/cache/alpaca/gcide_instruct{,_valid}.jsonl        "Define the word" instructions (GCIDE)
#   data/cache/chat/gcide_chat{,_valid}.jsonl              the same as conversations (messages)
#   data/cache/tokenizers/sentencepiece/spm_bpe_3k.model   SentencePiece BPE (Llama 2 style)
#   data/cache/tokenizers/tiktoken/llama3_bpe_4k.model     tiktoken ranks file (Llama 3 format)
# See docs/tokenizers.md. TITAN_DATA_DIR overrides the output folder.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out="${TITAN_DATA_DIR:-$root/data/cache}"
python="$root/.venv/bin/python"
stamp="$out/.corpus-stamp"

want=$(cat "$root/scripts/data/make_corpus.py" "$root/scripts/data/make_tokenizers.py" | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then exit 0; fi

if [[ ! -x "$python" ]]; then
  echo "make_corpus.sh: $python is missing: run scripts/bootstrap.sh first" >&2
  exit 1
fi
echo "[make_corpus] building the offline corpus and test tokenizers in $out" >&2
# Built in a private folder, then each file is renamed into place (atomic): readers running at the
# same time (tests, a second bootstrap) never see a partly written file.
mkdir -p "$out"
tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
"$python" "$root/scripts/data/make_corpus.py" --out "$tmp"
"$python" "$root/scripts/data/make_tokenizers.py" --corpus "$tmp/pretrain/python_docs.txt" --out "$tmp/tokenizers"
(cd "$tmp" && find . -type f) | while read -r f; do
  mkdir -p "$out/$(dirname "$f")"
  mv -f "$tmp/$f" "$out/$f"
done
echo "$want" > "$tmp/stamp"
mv -f "$tmp/stamp" "$stamp"
echo "[make_corpus] done: $out" >&2
