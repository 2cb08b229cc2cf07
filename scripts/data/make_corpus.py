#!/usr/bin/env python3
"""Builds titan's offline corpus from two Debian packages (deterministic, standard library only).

  python3.11-doc  /usr/share/doc/python3.11/html/**.html  ->  pretraining text: the main body of
                  each page of the Python 3.11 documentation converted to plain text (one page is
                  one document).
  dict-gcide      /usr/share/dictd/gcide.{index,dict.dz}  ->  Alpaca instructions: "Define the
                  word" with a headword of the GNU Collaborative International Dictionary of English
                  (Webster's 1913 + WordNet) as input and its first definition as output.

Outputs (under --out, normally data/cache/):
  pretrain/python_docs.txt        training documents; each document ends with a line holding only
                                  the form feed character U+000C (see docs/tokenizers.md)
  pretrain/python_docs.jsonl      the same documents, one {"text": ...} per line
  pretrain/python_docs_valid.txt  held-out documents (every 20th page), same layout
  pretrain/python_docs_valid.jsonl
  alpaca/gcide_instruct.jsonl     {"instruction", "input", "output"} per line
  alpaca/gcide_instruct_valid.jsonl  held-out records (every 20th), same layout
  chat/gcide_chat.jsonl           {"messages": [{"role", "content"}, ...]} per line: the same
                                  records as conversations of one to three questions, every
                                  other one opened by a system message
  chat/gcide_chat_valid.jsonl     conversations of the held-out records
"""

import argparse
import gzip
import html.parser
import json
import os
import re
import sys

DOC_ROOT = "/usr/share/doc/python3.11/html"
# Sections in order of preference: prose first, reference pages last.
DOC_SECTIONS = ["tutorial", "howto", "faq", "reference", "using", "extending", "library"]
GCIDE_INDEX = "/usr/share/dictd/gcide.index"
GCIDE_DICT = "/usr/share/dictd/gcide.dict.dz"
DOC_SEPARATOR = "\f"  # a line holding only this ends each document in the .txt files
VALID_EVERY = 20      # every 20th page goes to the held-out split

BLOCK_TAGS = {"p", "div", "section", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "pre",
              "tr", "blockquote", "table", "ul", "ol", "dl", "figure", "caption", "br"}
SKIP_TAGS = {"script", "style"}


class _BodyText(html.parser.HTMLParser):
    """Collects the text of <div class="body">, one paragraph per block element."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth = 0          # element depth inside the body div (0: outside)
        self.skip_depth = 0     # > 0 while inside an element whose text is dropped
        self.pre = 0
        self.blocks = []
        self.current = []

    def _flush(self):
        text = "".join(self.current)
        self.current = []
        if not self.pre:
            text = re.sub(r"\s+", " ", text).strip()
        else:
            text = text.strip("\n")
        if text.strip():
            self.blocks.append(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.depth == 0:
            if tag == "div" and "body" in (attrs.get("class") or "").split():
                self.depth = 1
            return
        if tag in ("br", "img", "hr", "meta", "link", "input", "wbr"):
            if tag == "br":
                self.current.append("\n" if self.pre else " ")
            return
        self.depth += 1
        classes = (attrs.get("class") or "").split()
        if self.skip_depth or tag in SKIP_TAGS or "headerlink" in classes or "linenos" in classes:
            self.skip_depth += 1
            return
        if tag in BLOCK_TAGS:
            self._flush()
        if tag == "pre":
            self.pre += 1

    def handle_endtag(self, tag):
        if self.depth == 0 or tag in ("br", "img", "hr", "meta", "link", "input", "wbr"):
            return
        self.depth -= 1
        if self.skip_depth:
            self.skip_depth -= 1
            return
        if tag in BLOCK_TAGS or self.depth == 0:
            self._flush()
        if tag == "pre":
            self.pre -= 1

    def handle_data(self, data):
        if self.depth and not self.skip_depth:
            self.current.append(data)


def page_text(path):
    parser = _BodyText()
    with open(path, encoding="utf-8") as f:
        parser.feed(f.read())
    parser.close()
    return "\n\n".join(parser.blocks).replace(DOC_SEPARATOR, " ")


def python_docs(limit_bytes):
    """(relative path, text) of documentation pages in section order until `limit_bytes`."""
    total = 0
    for section in DOC_SECTIONS:
        pages = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(DOC_ROOT, section)):
            dirnames.sort()
            pages += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".html")]
        for path in sorted(pages):
            if section == "library" and os.path.basename(path) == "index.html":
                continue
            text = page_text(path)
            if len(text) < 500:  # tables of contents and stubs
                continue
            size = len(text.encode("utf-8"))
            if total + size > limit_bytes:
                return
            total += size
            yield os.path.relpath(path, DOC_ROOT), text


def write_docs(docs, txt_path, jsonl_path):
    with open(txt_path, "w", encoding="utf-8", newline="\n") as txt, \
            open(jsonl_path, "w", encoding="utf-8", newline="\n") as jsonl:
        for text in docs:
            txt.write(text + "\n" + DOC_SEPARATOR + "\n")
            jsonl.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(s):
    value = 0
    for c in s:
        value = value * 64 + _B64[c]
    return value


_POS = {"n.": "noun", "v. t.": "transitive verb", "v. i.": "intransitive verb", "a.": "adjective",
        "adv.": "adverb", "prep.": "preposition", "conj.": "conjunction", "interj.": "interjection",
        "pron.": "pronoun", "adj.": "adjective", "v.": "verb"}
_POS_RE = re.compile(r"\\,?\s*(?:\([^)]*\),?\s*)?(v\. t\.|v\. i\.|n\.|a\.|adv\.|adj\.|prep\.|conj\.|interj\.|pron\.|v\.)[,;\s]")


def _first_definition(entry, headword):
    """(part of speech or None, first definition) of a GCIDE entry, or None when not clean."""
    lines = entry.split("\n")
    if not lines[0].startswith(headword + " \\"):
        return None  # the index points into another headword's entry
    # The header (headword, pronunciation, part of speech, etymology) ends where the square
    # brackets it opened are closed again.
    depth, body_start = 0, None
    for i, line in enumerate(lines):
        depth += line.count("[") - line.count("]")
        if depth <= 0:
            body_start = i + 1
            break
    if body_start is None:
        return None
    header = " ".join(l.strip() for l in lines[:body_start])
    pos = _POS_RE.search(header + " ")
    paragraph = []
    for line in lines[body_start:]:
        stripped = line.strip()
        if not stripped or stripped.startswith("[") or stripped.startswith("Note:"):
            break
        if stripped.startswith("2.") and paragraph:
            break
        paragraph.append(stripped)
    text = " ".join(paragraph)
    text = re.sub(r"^1\.\s*", "", text)
    text = re.sub(r"\s*--\s*[A-Z][\w. ]*\.?$", "", text)  # trailing citation ("--Shak.")
    text = re.sub(r"[{}]", "", text)
    text = re.sub(r"\s+", " ", text).strip()
    # Keep the definition proper: drop a quoted example or a "--" citation / derived form after it.
    text = re.split(r"(?<=\.)\s+(?:\"|--)", text)[0]
    if any(c in text for c in "*`\""):  # leftover syllable marks or quotations
        return None
    # Pronunciation markup ([a^], [=e]), unknown Greek (???) and cross references are not prose.
    if "[" in text or "?" in text or "\ufffd" in text or "\\" in text or text.startswith("See ") or "See under" in text:
        return None
    if not 40 <= len(text) <= 400 or not text.endswith("."):
        return None
    return (_POS[pos.group(1)] if pos else None), text


def gcide_instructions(count):
    """Alpaca records for `count` headwords spread evenly over the dictionary."""
    with gzip.open(GCIDE_DICT) as f:
        data = f.read()
    candidates = []
    with open(GCIDE_INDEX, encoding="utf-8") as f:
        for line in f:
            word, offset, length = line.rstrip("\n").split("\t")
            if not re.fullmatch(r"[A-Z]?[a-z]{3,}", word):
                continue
            start = _dictd_number(offset)
            entry = data[start:start + _dictd_number(length)].decode("utf-8", "replace")
            parsed = _first_definition(entry, word)
            if parsed:
                candidates.append((word, parsed))
    seen, records = set(), []
    step = max(1, len(candidates) // count)
    for word, (pos, definition) in candidates[::step]:
        if word.lower() in seen:
            continue
        seen.add(word.lower())
        if pos:
            records.append({"instruction": "Define the word and give its part of speech.",
                            "input": word.lower(), "output": f"{word.lower()} ({pos}): {definition}"})
        else:
            records.append({"instruction": "Define the word.", "input": word.lower(),
                            "output": definition})
    return records[:count]


CHAT_SYSTEM = "You are a dictionary. Answer with the definition only."


def gcide_conversations(records):
    """Chat records: consecutive Alpaca records as the turns of one conversation (1 to 3 turns)."""
    conversations, i = [], 0
    while i < len(records):
        turns = 1 + len(conversations) % 3
        messages = [{"role": "system", "content": CHAT_SYSTEM}] if len(conversations) % 2 == 0 else []
        for r in records[i:i + turns]:
            messages.append({"role": "user", "content": f"{r['instruction']} {r['input']}"})
            messages.append({"role": "assistant", "content": r["output"]})
        conversations.append({"messages": messages})
        i += turns
    return conversations


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (data/cache)")
    ap.add_argument("--pretrain-bytes", type=int, default=4_000_000, help="text budget of the pages")
    ap.add_argument("--instructions", type=int, default=4000, help="number of Alpaca records")
    args = ap.parse_args()

    for path in (DOC_ROOT, GCIDE_INDEX, GCIDE_DICT):
        if not os.path.exists(path):
            sys.exit(f"make_corpus.py: {path} is missing: install python3.11-doc and dict-gcide")

    pretrain = os.path.join(args.out, "pretrain")
    alpaca = os.path.join(args.out, "alpaca")
    chat = os.path.join(args.out, "chat")
    for folder in (pretrain, alpaca, chat):
        os.makedirs(folder, exist_ok=True)

    docs = list(python_docs(args.pretrain_bytes))
    train = [text for i, (_, text) in enumerate(docs) if i % VALID_EVERY != VALID_EVERY - 1]
    valid = [text for i, (_, text) in enumerate(docs) if i % VALID_EVERY == VALID_EVERY - 1]
    write_docs(train, os.path.join(pretrain, "python_docs.txt"), os.path.join(pretrain, "python_docs.jsonl"))
    write_docs(valid, os.path.join(pretrain, "python_docs_valid.txt"),
               os.path.join(pretrain, "python_docs_valid.jsonl"))

    records = gcide_instructions(args.instructions)
    held_out = lambda i: i % VALID_EVERY == VALID_EVERY - 1
    for suffix, keep in (("", lambda i: not held_out(i)), ("_valid", held_out)):
        kept = [r for i, r in enumerate(records) if keep(i)]
        for path, lines in ((os.path.join(alpaca, f"gcide_instruct{suffix}.jsonl"), kept),
                            (os.path.join(chat, f"gcide_chat{suffix}.jsonl"), gcide_conversations(kept))):
            with open(path, "w", encoding="utf-8", newline="\n") as f:
                for line in lines:
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
    print(f"make_corpus.py: {len(train)} training and {len(valid)} held-out pages, "
          f"{len(records)} instructions (every {VALID_EVERY}th held out)", file=sys.stderr)


if __name__ == "__main__":
    main()
