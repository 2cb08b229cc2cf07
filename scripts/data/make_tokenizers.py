#!/usr/bin/env python3
"""Trains titan's two small test tokenizers on the offline corpus (deterministic, no network).

  sentencepiece/spm_bpe_3k.model   SentencePiece BPE, 3000 pieces, trained like Llama 2's
                                   (byte_fallback, split_digits, identity normalization,
                                   unk=0 bos=1 eos=2, no pad).
  tiktoken/llama3_bpe_4k.model     Llama 3 tokenizer.model format: one "<base64 bytes> <rank>" line
                                   per token, ranks 0..255 the single bytes, then the merges of a
                                   byte-level BPE (HF `tokenizers`, 4000 tokens) trained after Llama
                                   3's pre-tokenization regex. The special tokens are not in the
                                   file: like Meta's code, readers append them after the last rank.
  huggingface/qwen_bpe_4k/         tokenizer.json + tokenizer_config.json laid out as Qwen2 / Qwen3's:
                                   NFC, Qwen's Split pattern then ByteLevel, special tokens
                                   <|endoftext|> <|im_start|> <|im_end|>, the non-special added tokens
                                   <think> </think>, no BOS, EOS and padding <|endoftext|>.
  huggingface/gpt2_bpe_4k/         GPT-2's layout: ByteLevel with its own regex and a prefix space,
                                   ignore_merges (as Llama 3's tokenizer.json), BOS = EOS =
                                   <|endoftext|>.

Run with the project's .venv python: python make_tokenizers.py --corpus data/cache/pretrain/python_docs.txt --out data/cache/tokenizers
"""

import argparse
import base64
import json
import os
import sys

# Llama 3's pre-tokenization pattern (meta-llama/llama3 tokenizer.py, pat_str).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2 / Qwen3's pre-tokenization pattern (the Split regex of their tokenizer.json): Llama 3's
# with single digits.
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
DOC_SEPARATOR = "\f"


def read_documents(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [d.strip("\n") for d in text.split("\n" + DOC_SEPARATOR + "\n") if d.strip()]


def train_sentencepiece(documents, out_dir, vocab_size):
    import io
    import sentencepiece as spm
    # Lines come from an iterator and the model goes to memory so that no path of this machine is
    # recorded in the model's trainer_spec: the file is the same wherever it is built.
    lines = [line for doc in documents for line in doc.split("\n") if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        character_coverage=0.9999, max_sentencepiece_length=16, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, num_threads=1, minloglevel=2)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"spm_bpe_{vocab_size // 1000}k.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def _byte_decoder():
    """Inverse of GPT-2's bytes_to_unicode (the alphabet of HF byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def train_tiktoken(documents, out_dir, vocab_size):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(documents, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    decode = _byte_decoder()
    ranks = {bytes([b]): b for b in range(256)}
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = bytes(decode[c] for c in left + right)
        ranks.setdefault(token, len(ranks))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"llama3_bpe_{vocab_size // 1000}k.model")
    with open(path, "w", encoding="ascii", newline="\n") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")
    check_ranks(path, tok, documents[:20], decode)
    return path


def train_huggingface(documents, out_dir, vocab_size):
    """Byte-level BPE tokenizer.json files in two layouts (module docstring), with the
    tokenizer_config.json that names their BOS / EOS / padding tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    layouts = {
        "qwen": dict(normalizer=normalizers.NFC(), ignore_merges=False,
                     pre=pre_tokenizers.Sequence([
                         pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
                         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
                     special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], added=["<think>", "</think>"],
                     config={"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}),
        "gpt2": dict(normalizer=None, ignore_merges=True,
                     pre=pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True),
                     special=["<|endoftext|>"], added=[],
                     config={"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": None}),
    }
    folders = []
    for name, layout in layouts.items():
        tok = Tokenizer(models.BPE(ignore_merges=layout["ignore_merges"]))
        if layout["normalizer"] is not None:
            tok.normalizer = layout["normalizer"]
        tok.pre_tokenizer = layout["pre"]
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=layout["special"])
        tok.train_from_iterator(documents, trainer)
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in layout["added"]])
        folder = os.path.join(out_dir, f"{name}_bpe_{vocab_size // 1000}k")
        os.makedirs(folder, exist_ok=True)
        tok.save(os.path.join(folder, "tokenizer.json"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(layout["config"], f, indent=1)
        folders.append(folder)
    return folders


def check_ranks(path, hf_tokenizer, documents, byte_decoder):
    """Fails unless tiktoken with the written ranks splits `documents` into the same token bytes as
    the trained Hugging Face BPE (merge order = rank order)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    enc = tiktoken.Encoding("check", pat_str=LLAMA3_PATTERN, mergeable_ranks=load_tiktoken_bpe(path),
                            special_tokens={})
    for i, text in enumerate(documents):
        expected = [bytes(byte_decoder[c] for c in t) for t in hf_tokenizer.encode(text).tokens]
        actual = [enc.decode_single_token_bytes(t) for t in enc.encode_ordinary(text)]
        if actual != expected:
            sys.exit(f"make_tokenizers.py: {path} does not reproduce the trained BPE on document {i}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="python_docs.txt from make_corpus.py")
    ap.add_argument("--out", required=True, help="output folder (data/cache/tokenizers)")
    ap.add_argument("--spm-vocab", type=int, default=3000)
    ap.add_argument("--bpe-vocab", type=int, default=4000)
    args = ap.parse_args()
    documents = read_documents(args.corpus)
    spm_path = train_sentencepiece(documents, os.path.join(args.out, "sentencepiece"), args.spm_vocab)
    bpe_path = train_tiktoken(documents, os.path.join(args.out, "tiktoken"), args.bpe_vocab)
    hf_folders = train_huggingface(documents, os.path.join(args.out, "huggingface"), args.bpe_vocab)
    print(f"make_tokenizers.py: wrote {os.path.basename(spm_path)}, {os.path.basename(bpe_path)} and "
          f"{', '.join(os.path.basename(f) for f in hf_folders)}", file=sys.stderr)


if __name__ == "__main__":
    main()
