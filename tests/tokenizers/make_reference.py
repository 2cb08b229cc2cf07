#!/usr/bin/env python3
"""Reference token ids for test_tokenizers' parity cases, from the Python `tiktoken`,
`tokenizers` (Hugging Face) and `sentencepiece` packages run on the same tokenizer files the C++
code loads.

Builds the corpus and the test tokenizers first (scripts/make_corpus.sh, a no-op when done), then
writes a JSON file:
  {"tiktoken": {"model": path, "num_special_tokens": n, "cases": [case...]},
   "huggingface": [{"name", "model" (a tokenizer.json), "bos_id", "eos_id", "pad_id", "vocab_size",
                    "cases": [case...]}, ...],
   "sentencepiece": {"model": path, "cases": [case...]}}
  case = {"name", "text_hex" (UTF-8 or deliberately invalid bytes), "special" ("text" | "allow"),
          "bos", "eos", "ids", "decoded_hex" (bytes of decoding "ids")}
"""

import argparse
import json
import os
import subprocess
import sys

import sentencepiece
import tiktoken
from tiktoken.load import load_tiktoken_bpe

# Llama 3's pre-tokenization pattern, as in meta-llama/llama3's tokenizer.py.
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_SPECIAL_TOKENS = 256


def llama3_special_tokens(n):
    """Special tokens after the ranks, as in Hugging Face's convert_llama_weights_to_hf.py (3.1)."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    return named + [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + n - len(named))]


def corpus_documents(path, count):
    with open(path, encoding="utf-8") as f:
        docs = [d.strip("\n") for d in f.read().split("\n\f\n") if d.strip()]
    return docs[:count]


def cases(root, corpus_docs):
    """(name, raw bytes, special mode, bos, eos) of every parity case."""
    with open(os.path.join(root, "tests/tokenizers/multilingual_sample.txt"), "rb") as f:
        sample = f.read()
    out = [("sample", sample, "text", True, True)]
    out += [(f"sample line {i + 1}", line, "text", False, False) for i, line in enumerate(sample.split(b"\n"))]
    out += [(f"corpus document {i}", d.encode("utf-8"), "text", True, True) for i, d in enumerate(corpus_docs)]
    edge = {
        "empty": b"",
        "one space": b" ",
        "space runs": b"a" + b" " * 1000 + b"b  c   d\t\t \t  e" + b" " * 5000,
        "only spaces": b" " * 4097,
        "newline runs": b"\n\n\n  \n\t\n" * 50 + b"end\n\n",
        "crlf runs": b"line one\r\n\r\n\r\nline two\r\n  \r\n\r\r\n\nx\r\n" * 20,
        "unicode spaces": "a\u00a0b\u3000c\u2028d\u0085e\u2003 f\u200bg".encode(),
        "contractions": "It's THEY'RE we'll I'D you've 'M 'ſ don't".encode(),
        "digits": "1234567890 12 3.14159 ١٢٣٤٥ ½ 𝟙𝟚𝟛 9999999".encode(),
        "punctuation": b"!!??... ---===>>> ((( ))) {}[]<> ''\"\" ``` ;;; ::: @#$%^&*",
        "special tokens as text": b"<|begin_of_text|>Hello<|eot_id|> <|end_of_text|>",
        "invalid continuation": b"abc\xff\xfedef",
        "truncated sequence": "日本".encode() + b"\xe8\xaa",
        "truncated then ascii": b"\xe2\x82 euro \xf0\x9f\x99 smile",
        "overlong and surrogate": b"x\xc0\xafy\xed\xa0\x80z\xf4\x90\x80\x80w\xe0\x80\x80",
        "lone continuation bytes": b"\x80\x81\xbf tail",
    }
    out += [(name, text, "text", False, False) for name, text in edge.items()]
    chat = (b"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nDefine the word.\n\nabacus"
            b"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA calculating frame.<|eot_id|>")
    out += [("chat allowed", chat, "allow", False, False),
            ("chat as text", chat, "text", False, False),
            ("specials mixed allowed", b"<|eot_id|><|eot_id|> x<|reserved_special_token_200|>y <|not_special|>",
             "allow", False, False),
            ("specials with invalid utf-8", b"\xff<|eot_id|>\xfe", "allow", False, False)]
    return out


def tiktoken_reference(model, all_cases):
    ranks = load_tiktoken_bpe(model)
    specials = {t: len(ranks) + i for i, t in enumerate(llama3_special_tokens(NUM_SPECIAL_TOKENS))}
    enc = tiktoken.Encoding("titan-test", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    out = []
    for name, raw, special, bos, eos in all_cases:
        # Invalid UTF-8 is repaired like Python's bytes.decode("utf-8", "replace") (each maximal
        # invalid subpart becomes U+FFFD): the behaviour the C++ tokenizer defines.
        text = raw.decode("utf-8", "replace")
        if special == "allow":
            ids = enc.encode(text, allowed_special="all")
        else:
            ids = enc.encode(text, allowed_special=set(), disallowed_special=())
        ids = ([specials["<|begin_of_text|>"]] if bos else []) + ids + ([specials["<|end_of_text|>"]] if eos else [])
        out.append({"name": name, "text_hex": raw.hex(), "special": special, "bos": bos, "eos": eos, "ids": ids,
                    "decoded_hex": enc.decode_bytes(ids).hex()})
    return {"model": model, "num_special_tokens": NUM_SPECIAL_TOKENS, "cases": out}


def huggingface_cases(all_cases):
    """The common cases, plus Qwen-style chat text and text that NFC changes."""
    chat = "<|im_start|>user\nDefine abacus.<|im_end|>\n<|im_start|>assistant\n<think>\nok</think>A frame.<|im_end|>"
    nfd = "cafe\u0301 A\u030a e\u0301\u0301 \u1100\u1161\u11a8 \u0041\u0308\u0304 x\u0323\u0307"
    extra = [("qwen chat allowed", chat.encode(), "allow", False, False),
             ("qwen chat as text", chat.encode(), "text", False, False),
             ("special glued to text", b"abc<|endoftext|>def<|endoftext|><|endoftext|>x", "text", False, False),
             ("decomposed accents (NFC)", nfd.encode(), "text", False, True)]
    return all_cases + extra


def huggingface_reference(folder, all_cases):
    """Ids from the `tokenizers` library: its default encode for "allow", and with
    encode_special_tokens (special added tokens as text) for "text"."""
    from tokenizers import Tokenizer
    path = os.path.join(folder, "tokenizer.json")
    tok = Tokenizer.from_file(path)
    with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    ids_of = {key: (tok.token_to_id(config[key]) if config.get(key) else -1)
              for key in ("bos_token", "eos_token", "pad_token")}
    out = []
    for name, raw, special, bos, eos in huggingface_cases(all_cases):
        text = raw.decode("utf-8", "replace")  # invalid UTF-8 repaired as the C++ side does
        tok.encode_special_tokens = special == "text"
        bos = bos and ids_of["bos_token"] >= 0
        ids = ([ids_of["bos_token"]] if bos else []) + tok.encode(text, add_special_tokens=False).ids + \
            ([ids_of["eos_token"]] if eos else [])
        out.append({"name": name, "text_hex": raw.hex(), "special": special, "bos": bos, "eos": eos, "ids": ids,
                    "decoded_hex": tok.decode(ids, skip_special_tokens=False).encode("utf-8").hex()})
    return {"name": os.path.basename(folder), "model": path, "bos_id": ids_of["bos_token"],
            "eos_id": ids_of["eos_token"], "pad_id": ids_of["pad_token"],
            "vocab_size": tok.get_vocab_size(with_added_tokens=True), "cases": out}


def sentencepiece_reference(model, all_cases):
    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    out = []
    for name, raw, special, bos, eos in all_cases:
        if special != "text":
            continue
        ids = sp.encode(raw, add_bos=bos, add_eos=eos)  # bytes in: SentencePiece handles invalid UTF-8
        out.append({"name": name, "text_hex": raw.hex(), "special": special, "bos": bos, "eos": eos, "ids": ids,
                    "decoded_hex": sp.decode(ids).encode("utf-8").hex()})
    return {"model": model, "bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "pad_id": sp.pad_id(),
            "vocab_size": sp.get_piece_size(), "cases": out}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="the titan repository")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--corpus-documents", type=int, default=4, help="held-out corpus documents to encode")
    args = ap.parse_args()
    subprocess.run([os.path.join(args.root, "scripts/make_corpus.sh")], check=True)
    data = os.environ.get("TITAN_DATA_DIR", os.path.join(args.root, "data/cache"))
    docs = corpus_documents(os.path.join(data, "pretrain/python_docs_valid.txt"), args.corpus_documents)
    all_cases = cases(args.root, docs)
    reference = {
        "tiktoken": tiktoken_reference(os.path.join(data, "tokenizers/tiktoken/llama3_bpe_4k.model"), all_cases),
        "huggingface": [huggingface_reference(os.path.join(data, "tokenizers/huggingface", name), all_cases)
                        for name in ("qwen_bpe_4k", "gpt2_bpe_4k")],
        "sentencepiece": sentencepiece_reference(
            os.path.join(data, "tokenizers/sentencepiece/spm_bpe_3k.model"), all_cases),
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(reference, f)
    print(f"make_reference.py: {len(reference['tiktoken']['cases'])} tiktoken, "
          f"{sum(len(r['cases']) for r in reference['huggingface'])} huggingface and "
          f"{len(reference['sentencepiece']['cases'])} sentencepiece cases -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
