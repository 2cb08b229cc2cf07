#!/usr/bin/env python3
"""Parity of examples/common/chat.cpp with the models' own chat templates.

Each conversation is rendered by transformers' chat-template renderer (jinja2) with the official
template of Meta-Llama-3-8B-Instruct, Llama-3.2-3B-Instruct (given the date), Qwen2.5-Instruct,
Qwen3, Llama-2-chat or Mixtral-8x7B-Instruct (below, verbatim from their tokenizer_config.json),
tokenized by the reference libraries on the test tokenizers (tiktoken for the Llama 3 ranks file,
`tokenizers` for the Qwen-layout tokenizer.json and for the Llama tokenizer transformers builds
from the SentencePiece model, special tokens parsed as the models' tokenizers do), and each token
is marked trained when it starts inside an assistant turn: after the generation prompt
("<|start_header_id|>assistant<|end_header_id|>\\n\\n", "<|im_start|>assistant\\n" or "[/INST]")
up to and including the end-of-turn token. The reference (ids without the leading BOS, which the
data loader adds, and the mask) goes to reference.json; the C++ test case renders the same
conversations with render_chat and compares. A conversation a template refuses (Llama 2's and
Mistral's raise when roles do not alternate; Mistral's on a system message) is recorded as refused,
and render_chat must refuse it too.

The SentencePiece model is read by transformers' LlamaTokenizer (the `tokenizers` library, Metaspace
with the dummy prefix on every stretch between special tokens: the legacy behaviour of the
Llama-2-chat and Mixtral-Instruct tokenizer.json files, and of Meta's reference, which encodes each
turn on its own), not by libsentencepiece, which titan uses.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from jinja2.exceptions import TemplateError
from tokenizers import Tokenizer
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import render_jinja_template

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tokenizers"))
from make_reference import NUM_SPECIAL_TOKENS, PATTERN, llama3_special_tokens  # noqa: E402

CASE = "chat: parity with the models' chat templates"

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN3_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

# meta-llama/Llama-3.2-3B-Instruct (as mirrored by unsloth/Llama-3.2-3B-Instruct); Llama 3.1 and 3.3
# Instruct's templates write the same for conversations without tools, with "26 Jul 2024" as the date
LLAMA32_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# meta-llama/Llama-2-13b-chat-hf
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

# mistralai/Mixtral-8x7B-Instruct-v0.1
MIXTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# (format, template, titan's ChatOptions::system, generation prompt, end of turn, tokenizer, BOS, EOS,
#  the date_string given to the template and ChatOptions::date)
LLAMA3_TURNS = ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>", "llama3", "<|begin_of_text|>",
                "<|eot_id|>")
FORMATS = [
    ("llama3", LLAMA3_TEMPLATE, "", *LLAMA3_TURNS),
    ("llama3.1", LLAMA32_TEMPLATE, "", *LLAMA3_TURNS, "26 Jul 2024"),
    ("llama3.1", LLAMA32_TEMPLATE, "", *LLAMA3_TURNS, "06 Dec 2026"),
    ("chatml", QWEN25_TEMPLATE, QWEN25_SYSTEM, "<|im_start|>assistant\n", "<|im_end|>", "qwen", None, None),
    ("qwen3", QWEN3_TEMPLATE, "", "<|im_start|>assistant\n", "<|im_end|>", "qwen", None, None),
    ("llama2", LLAMA2_TEMPLATE, "", "[/INST]", "</s>", "spm", "<s>", "</s>"),
    ("mistral", MIXTRAL_TEMPLATE, "", "[/INST]", "</s>", "spm", "<s>", "</s>"),
]


def m(role, content, **extra):
    return dict(role=role, content=content, **extra)


SYSTEM = m("system", "You are terse.")
CONVERSATIONS = {
    "one turn": [m("user", "Define the word. abaca"), m("assistant", "A plant of the Philippines.")],
    "system and two turns": [SYSTEM, m("user", "Hi!"), m("assistant", "Hello."), m("user", "And the word 'tome'?"),
                             m("assistant", "A large book.")],
    "whitespace around content": [m("user", "  \n\tpadded question \n"), m("assistant", "\n\n  padded answer\t \n")],
    "answer opening with newlines": [m("user", "q"), m("assistant", "\nline one\n\nline two\n")],
    "unicode": [m("user", "Übersetze: café, naïve, e\u0301 (combining), 東京, 😀"),
                m("assistant", "\u3000Tōkyō — 東京 😀\u00a0done\u2028")],
    "empty answer and a trailing user turn": [m("user", "Say nothing."), m("assistant", ""), m("user", "Thanks.")],
    "system later in the conversation": [m("user", "a"), m("assistant", "b"), m("system", "Be brief now."),
                                         m("user", "c"), m("assistant", "d")],
    "special-looking text": [m("user", "What is <think>?"), m("assistant", "A tag: <think>x</think> in text.")],
    "runs of spaces and punctuation at the borders": [m("user", "a  b   c?"), m("assistant", "?! ..  x  "),
                                                       m("user", "]]"), m("assistant", "]] [[")],
    "assistant first": [m("assistant", "Welcome."), m("user", "Hi"), m("assistant", "Hello.")],
    "two user messages in a row": [m("user", "a"), m("user", "b"), m("assistant", "c")],
}
QWEN3_ONLY = {
    "reasoning_content": [m("user", "2+2?"), m("assistant", "4", reasoning_content="\nAdd two and two.\n")],
    "reasoning in content": [m("user", "3+3?"), m("assistant", "<think>\nsix\n</think>\n\n6")],
    "earlier reasoning dropped": [m("user", "1?"), m("assistant", "one", reasoning_content="think 1"),
                                  m("user", "2?"), m("assistant", "<think>t2</think>two")],
    "tool response is not a query": [m("user", "q1"), m("assistant", "a1"),
                                     m("user", "<tool_response>data</tool_response>"),
                                     m("assistant", "a2", reasoning_content="r2"), m("assistant", "a3")],
}


def tiktoken_encoder(path):
    ranks = load_tiktoken_bpe(path)
    specials = {t: len(ranks) + i for i, t in enumerate(llama3_special_tokens(NUM_SPECIAL_TOKENS))}
    return tiktoken.Encoding("titan-chat-test", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def tokens_with_offsets(tokenizer, text):
    """(ids, start character of each token) with special tokens parsed, as the models' tokenizers do."""
    if isinstance(tokenizer, tiktoken.Encoding):
        ids = tokenizer.encode(text, allowed_special="all")
        decoded, starts = tokenizer.decode_with_offsets(ids)
        assert decoded == text
        return ids, starts
    encoding = tokenizer.encode(text, add_special_tokens=False)
    return encoding.ids, [start for start, _ in encoding.offsets]


def trained_spans(text, prompt, end_of_turn):
    """Character ranges of the assistant turns: after each generation prompt, through the end of turn
    (a last prompt without an end of turn, Llama 2's and Mistral's after a trailing user message,
    opens no turn)."""
    spans, at = [], text.find(prompt)
    while at >= 0:
        begin = at + len(prompt)
        end = text.find(end_of_turn, begin)
        if end < 0:
            break
        spans.append((begin, end + len(end_of_turn)))
        at = text.find(prompt, end)
    return spans


def llama_tokenizer(model, workdir):
    """The `tokenizers` Llama tokenizer transformers builds from a SentencePiece model."""
    folder = os.path.join(workdir, "spm_llama_tokenizer")
    os.makedirs(folder, exist_ok=True)
    shutil.copyfile(model, os.path.join(folder, "tokenizer.model"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": True, "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "add_bos_token": False, "add_eos_token": False}, f)
    return AutoTokenizer.from_pretrained(folder).backend_tokenizer


def reference(root, workdir):
    cache = os.path.join(root, "data/cache/tokenizers")
    tokenizers = {  # name: (titan's kind, path, the reference tokenizer)
        "llama3": ("tiktoken", os.path.join(cache, "tiktoken/llama3_bpe_4k.model")),
        "qwen": ("huggingface", os.path.join(cache, "huggingface/qwen_bpe_4k/tokenizer.json")),
        "spm": ("sentencepiece", os.path.join(cache, "sentencepiece/spm_bpe_3k.model")),
    }
    loaded = {"llama3": tiktoken_encoder(tokenizers["llama3"][1]),
              "qwen": Tokenizer.from_file(tokenizers["qwen"][1]),
              "spm": llama_tokenizer(tokenizers["spm"][1], workdir)}
    cases = []
    for fmt, template, system, prompt, end_of_turn, tokenizer, bos, eos, *date in FORMATS:
        kind, path = tokenizers[tokenizer]
        reference_tokenizer = loaded[tokenizer]
        conversations = dict(CONVERSATIONS, **(QWEN3_ONLY if fmt == "qwen3" else {}))
        dated = dict(date_string=date[0]) if date else {}
        for name, messages in conversations.items():
            case = dict(name=f"{fmt}{' ' + date[0] if date else ''} / {name}", format=fmt, system=system,
                        tokenizer_kind=kind, tokenizer_path=path, messages=messages, **dated)
            try:
                rendered = render_jinja_template(conversations=[messages], chat_template=template, bos_token=bos,
                                                 eos_token=eos, **dated)[0][0]
            except TemplateError as refused:
                cases.append(dict(case, refused=str(refused)))
                continue
            ids, starts = tokens_with_offsets(reference_tokenizer, rendered)
            spans = trained_spans(rendered, prompt, end_of_turn)
            trained = [any(b <= s < e for b, e in spans) for s in starts]
            if bos is not None:  # the template writes BOS; titan's loader adds it
                assert ids[0] == token_of(reference_tokenizer, bos), f"{fmt} / {name}: no BOS first"
                ids, trained = ids[1:], trained[1:]
            assert any(trained), f"{fmt} / {name}: nothing trained"
            cases.append(dict(case, rendered=rendered, ids=ids, trained=trained))
    return cases


def token_of(tokenizer, text):
    """The id of the special token `text`."""
    if isinstance(tokenizer, tiktoken.Encoding):
        return tokenizer.encode_single_token(text)
    return tokenizer.token_to_id(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exe", required=True, help="test_trainer")
    parser.add_argument("--root", required=True, help="the source tree (its scripts/make_corpus.sh)")
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    subprocess.run([os.path.join(args.root, "scripts/make_corpus.sh")], check=True)
    os.makedirs(args.workdir, exist_ok=True)
    path = os.path.join(args.workdir, "reference.json")
    cases = reference(args.root, args.workdir)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"cases": cases}, f, ensure_ascii=False, indent=1)
    refused = sum("refused" in case for case in cases)
    print(f"chat_parity: {len(cases)} conversations ({refused} refused by their template) in {path}")
    env = dict(os.environ, TITAN_CHAT_REFERENCE=path, OMP_NUM_THREADS="1")
    run = subprocess.run([args.exe, f"--test-case={CASE}*", "--no-skip"], env=env, capture_output=True, text=True)
    sys.stdout.write(run.stdout[-20000:])
    sys.stderr.write(run.stderr[-5000:])
    if run.returncode != 0 or not re.search(r"test cases:\s+1 \|\s+1 passed", run.stdout):
        sys.exit(f"chat_parity: the C++ case failed or did not run (exit {run.returncode})")


if __name__ == "__main__":
    main()
