"""Tool-call formats that open with a marker token (`adapterhub.server.inference.toolformats`): Mistral's
``[TOOL_CALLS]`` (a JSON list, or ``name[ARGS]{...}``), Granite 3.x's ``<|tool_call|>`` and DeepSeek V3's
``<｜tool▁calls▁begin｜>``.

Each format is found from a template that copies the tool parts of the model family's real chat template
(Mistral 7B v0.3 / Large 2407; Ministral 3 / Devstral; Granite 3.1; DeepSeek V3 / R1). What is proved:
the reader on realistic answers, whole and fed in two pieces cut at every character (the deltas join to
the whole answer's calls), broken calls read as text; the prompt (history written by the template
itself, Mistral's 9-character ids, Granite's calls in the content, DeepSeek's tools described); the lazy
grammar of each format with llguidance; and end to end, with the real ``openai`` client against a server
on 127.0.0.1 serving a tiny random Llama whose tokenizer has the markers as special tokens (as the real
ones do): ``logit_bias`` on the marker makes the model open a call, the grammar makes it a valid one,
and the call comes back parsed, the same whole and streamed."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from adapterhub import Hub
from adapterhub.server.inference.toolformats import DS_BEGIN, DS_CALL, DS_CALL_END, DS_END, DS_SEP
from adapterhub.server.inference.tools import chat_prompt, reader, short_id, split, tool_format

pytest.importorskip("fastapi")

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "pick": {"enum": ["red", "blue"]}},
    "required": ["ok", "pick"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "paint", "description": "paint it", "parameters": SCHEMA}},
    {"type": "function", "function": {"name": "wait", "parameters": {"type": "object", "properties": {}}}},
]

#: Mistral 7B v0.3 / Large 2407 (mistralai's "v3" template): a JSON list after [TOOL_CALLS], 9-character ids
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- if not tools is defined %}{%- set tools = none %}{%- endif %}"
    "{%- set user_messages = loop_messages | selectattr('role', 'equalto', 'user') | list %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if tools is not none and (message == user_messages[-1]) %}{{- '[AVAILABLE_TOOLS] [' }}"
    '{%- for tool in tools %}{%- set tool = tool.function %}{{- \'{"type": "function", "function": {\' }}'
    "{%- for key, val in tool.items() if key != 'return' %}{%- if val is string %}"
    "{{- '\"' + key + '\": \"' + val + '\"' }}{%- else %}{{- '\"' + key + '\": ' + val|tojson }}{%- endif %}"
    "{%- if not loop.last %}{{- ', ' }}{%- endif %}{%- endfor %}{{- '}}' }}"
    "{%- if not loop.last %}{{- ', ' }}{%- else %}{{- ']' }}{%- endif %}{%- endfor %}"
    "{{- '[/AVAILABLE_TOOLS]' }}{%- endif %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message.tool_calls is defined and message.tool_calls is not none %}{{- '[TOOL_CALLS] [' }}"
    "{%- for tool_call in message.tool_calls %}{%- set out = tool_call.function|tojson %}{{- out[:-1] }}"
    "{%- if not tool_call.id is defined or tool_call.id|length != 9 %}"
    "{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif %}"
    "{{- ', \"id\": \"' + tool_call.id + '\"}' }}"
    "{%- if not loop.last %}{{- ', ' }}{%- else %}{{- ']' + eos_token }}{%- endif %}{%- endfor %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content']|trim + eos_token}}"
    "{%- elif message['role'] == 'tool_results' or message['role'] == 'tool' %}"
    "{%- set content = message.content %}{{- '[TOOL_RESULTS] {\"content\": ' + content|string + ', ' }}"
    "{%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}"
    "{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif %}"
    "{{- '\"call_id\": \"' + message.tool_call_id + '\"}[/TOOL_RESULTS]' }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported!') }}{%- endif %}"
    "{%- endfor %}"
)
#: Ministral 3 / Devstral / Magistral: [TOOL_CALLS]name[ARGS]{...} per call
MISTRAL_ARGS = (
    "{%- set ns = namespace(last_user=-1) %}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{{- bos_token }}{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{%- if tools and loop.index0 == ns.last_user %}"
    "{{- '[AVAILABLE_TOOLS]' + tools|tojson + '[/AVAILABLE_TOOLS]' }}{%- endif %}"
    "{{- '[INST]' + message['content'] + '[/INST]' }}{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] %}{{- message['content'] }}{%- endif %}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] is not none %}"
    "{%- for tool in message['tool_calls'] %}{%- set arguments = tool['function']['arguments'] %}"
    "{%- if arguments is not string %}{%- set arguments = arguments|tojson|safe %}"
    "{%- elif arguments == '' %}{%- set arguments = '{}' %}{%- endif %}"
    "{{- '[TOOL_CALLS]' + tool['function']['name'] + '[ARGS]' + arguments }}{%- endfor %}{%- endif %}"
    "{{- eos_token }}{%- elif message['role'] == 'tool' %}"
    "{{- '[TOOL_RESULTS]' + message['content']|string + '[/TOOL_RESULTS]' }}"
    "{%- else %}{{- raise_exception('Only user, assistant and tool roles are supported') }}{%- endif %}"
    "{%- endfor %}"
)
#: Granite 3.1: tools in a "tools" turn, the <|tool_call|> instruction in the default system message, and
#: every message written as its role and content only
GRANITE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}"
    '{%- set system_message = "Knowledge Cutoff Date: April 2024.\\nYou are Granite, developed by IBM." %}'
    '{%- if tools %}{%- set system_message = system_message + " You are a helpful AI assistant with access '
    "to the following tools. When a tool is required to answer the user's query, respond with <|tool_call|>"
    ' followed by a JSON list of tools used." %}{%- endif %}{%- set loop_messages = messages %}{%- endif %}'
    "{{- '<|start_of_role|>system<|end_of_role|>' + system_message + '<|end_of_text|>\\n' }}"
    "{%- if tools %}{{- '<|start_of_role|>tools<|end_of_role|>' }}{{- tools | tojson(indent=4) }}"
    "{{- '<|end_of_text|>\\n' }}{%- endif %}{%- for message in loop_messages %}"
    "{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\\n' }}"
    "{%- if loop.last and add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}"
    "{%- endif %}{%- endfor %}"
)
#: DeepSeek V3 / R1: ignores ``tools``; the calls' arguments joined as text; outputs after the calls
DEEPSEEK = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + "
    "'<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + "
    "'```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}"
    "{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"
)
#: DeepSeek V3.1: no json fence; the calls shown for an empty content too; a tool's output after the calls
DEEPSEEK_V31 = (
    "{%- set ns = namespace(is_first=false, is_tool=false, system_prompt='', is_last_user=false) -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'system' -%}"
    "{%- set ns.system_prompt = ns.system_prompt + message['content'] -%}{%- endif -%}{%- endfor -%}"
    "{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages -%}{%- if message['role'] == 'user' -%}"
    "{%- set ns.is_tool = false -%}{%- set ns.is_first = false -%}{%- set ns.is_last_user = true -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif -%}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] is not none -%}"
    "{%- if ns.is_last_user -%}{{'<｜Assistant｜></think>'}}{%- endif -%}{%- set ns.is_last_user = false -%}"
    "{%- set ns.is_first = false -%}{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls'] -%}"
    "{%- if not ns.is_first -%}{%- if message['content'] is none -%}"
    "{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>'+ tool['function']['name'] + '<｜tool▁sep｜>' + "
    "tool['function']['arguments'] + '<｜tool▁call▁end｜>'}}{%- else -%}"
    "{{message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['function']['name'] + "
    "'<｜tool▁sep｜>' + tool['function']['arguments'] + '<｜tool▁call▁end｜>'}}{%- endif -%}"
    "{%- set ns.is_first = true -%}{%- else -%}{{'<｜tool▁call▁begin｜>'+ tool['function']['name'] + "
    "'<｜tool▁sep｜>' + tool['function']['arguments'] + '<｜tool▁call▁end｜>'}}{%- endif -%}{%- endfor -%}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif -%}"
    "{%- if message['role'] == 'assistant' and (message['tool_calls'] is not defined or message['tool_calls'] is none) -%}"
    "{%- if ns.is_last_user -%}{{'<｜Assistant｜></think>'}}{%- endif -%}{%- set ns.is_last_user = false -%}"
    "{{message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- endif -%}"
    "{%- if message['role'] == 'tool' -%}{%- set ns.is_last_user = false -%}{%- set ns.is_tool = true -%}"
    "{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt and ns.is_last_user and not ns.is_tool -%}{{'<｜Assistant｜></think>'}}"
    "{%- endif %}"
)
#: Llama 4 (vLLM's pythonic template): the calls a Python list, the arguments written as quoted strings
LLAMA4 = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set messages = messages[1:] %}{%- elif tools %}{%- set system_message = 'You are a helpful assistant "
    "and an expert in function composition.\\n- Use exact format: [func_name1(param1=value1, param2=value2), "
    "func_name2(...)]\\nHere is a list of functions in JSON format that you can invoke:\\n' %}{%- else %}"
    "{%- set system_message = '' %}{%- endif %}{%- if system_message %}"
    "{{- '<|header_start|>system<|header_end|>\\n\\n' + system_message }}"
    "{%- if tools %}{{- tools | tojson(indent=4) + '\\n' }}{%- endif %}{{- '<|eot|>' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'ipython' or message.role == 'tool' or ('tool_calls' in message and "
    "message.tool_calls|length != 0)) %}"
    "{{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' + message['content'] + '<|eot|>' }}"
    "{%- elif 'tool_calls' in message %}{{- '<|header_start|>assistant<|header_end|>\\n\\n' -}}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- endif %}{{- '[' }}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}{{- tool_call.name + '(' -}}"
    "{%- for param in tool_call.arguments %}{{- param + '=\"' -}}{{- '%s' | format(tool_call.arguments[param]) -}}"
    "{{- '\"' -}}{% if not loop.last %}, {% endif %}{%- endfor %}{{- ')' -}}{% if not loop.last %}, {% endif %}"
    "{%- endfor %}{{- ']<|eot|>' }}"
    "{%- elif message.role == 'tool' or message.role == 'ipython' %}"
    "{{- '<|header_start|>ipython<|header_end|>\\n\\n' + message.content | tojson + '<|eot|>' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}{%- endif %}"
)
DS_MARKERS = [DS_BEGIN, DS_END, DS_CALL, DS_SEP, DS_CALL_END, "<｜User｜>", "<｜Assistant｜>",
              "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"]  # fmt: skip
#: per format: its template, its marker tokens (special ones, as the real vocabularies have them) and the
#: token that opens a call
FAMILIES: dict[str, tuple[str, list[str], bool, str]] = {
    "mistral": (MISTRAL, ["[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[INST]", "[/INST]",
                          "[TOOL_RESULTS]", "[/TOOL_RESULTS]"], True, "[TOOL_CALLS]"),
    "mistral_args": (MISTRAL_ARGS, ["[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "[AVAILABLE_TOOLS]",
                                    "[/AVAILABLE_TOOLS]", "[INST]", "[/INST]"], True, "[TOOL_CALLS]"),
    "granite": (GRANITE, ["<|tool_call|>", "<|start_of_role|>", "<|end_of_role|>"], True, "<|tool_call|>"),
    "deepseek": (DEEPSEEK, DS_MARKERS, False, DS_BEGIN),
    "deepseek_v31": (DEEPSEEK_V31, DS_MARKERS, False, DS_BEGIN),
    "pythonic": (LLAMA4, ["<|header_start|>", "<|header_end|>", "<|eot|>", "<|python_start|>",
                          "<|python_end|>"], True, "["),
}  # fmt: skip


def _tokenizer(kind: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    template, markers, special, _ = FAMILIES[kind]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(['{"ok": true, "pick": "red"} paint wait ```json', "hello world"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    tok.add_tokens(markers, special_tokens=special)
    tok.chat_template = template
    return tok


def _fed(text: str, mode: str, cuts: list[int]) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """``text`` fed in pieces cut at ``cuts``: the content and calls the deltas join to (as the openai
    client joins them), and the deltas."""
    r = reader(mode)
    deltas = []
    for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True):
        deltas += r.feed(text[a:b])
    deltas += r.close()
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            c = calls.setdefault(tc["index"], {"id": tc.get("id"), "name": "", "arguments": ""})
            c["name"] += tc.get("function", {}).get("name") or ""
            c["arguments"] += tc["function"].get("arguments") or ""
    joined = [{"name": c["name"], "arguments": c["arguments"]} for _, c in sorted(calls.items())]
    return "".join(d.get("content", "") for d in deltas), joined, deltas


def _pairs(calls: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


PAINT = '{"ok": true, "pick": "red", "deep": [1, {"s": "}]\\" [TOOL_CALLS] ```"}]}'
ANSWERS = {  # per format: answers in the model's own syntax -> (content, [(name, arguments)])
    "mistral": [
        (f'Sure.[TOOL_CALLS] [{{"name": "paint", "arguments": {PAINT}}}, {{"arguments": {{}}, "name": "wait"}}]',
         "Sure.", [("paint", PAINT), ("wait", "{}")]),
        (f'[TOOL_CALLS][{{"name": "paint", "arguments": {PAINT}, "id": "abcDEF123"}}]', None, [("paint", PAINT)]),
        (f"[TOOL_CALLS]paint{PAINT}", None, [("paint", PAINT)]),  # vLLM's v11 text: no [ARGS]
    ],
    "mistral_args": [
        (f"I will.[TOOL_CALLS]paint[ARGS]{PAINT}[TOOL_CALLS]wait[ARGS]{{}}", "I will.",
         [("paint", PAINT), ("wait", "{}")]),
        (f"[TOOL_CALLS]paint[CALL_ID]abcDEF123[ARGS]{PAINT}", None, [("paint", PAINT)]),
    ],
    "granite": [
        (f'<|tool_call|>[{{"name": "paint", "arguments": {PAINT}}}, {{"name": "wait", "arguments": {{}}}}]',
         None, [("paint", PAINT), ("wait", "{}")]),
    ],
    "deepseek": [
        (f"Let me see.{DS_BEGIN}{DS_CALL}function{DS_SEP}paint\n```json\n{PAINT}\n```{DS_CALL_END}\n"
         f"{DS_CALL}function{DS_SEP}wait\n```json\n{{}}\n```{DS_CALL_END}{DS_END}", "Let me see.",
         [("paint", PAINT), ("wait", "{}")]),
        (f"{DS_BEGIN}{DS_CALL}paint{DS_SEP}{PAINT}{DS_CALL_END}{DS_END}", None, [("paint", PAINT)]),  # V3.1
    ],
    "pythonic": [
        ('[paint(ok=True, pick="red", deep=[1, {"s": "}]\\" [TOOL_CALLS] ```"}]), wait()]', None,
         [("paint", PAINT), ("wait", "{}")]),
        ("<|python_start|>[paint(ok=False, pick='blue', n=None)]<|python_end|>", None,
         [("paint", '{"ok": false, "pick": "blue", "n": null}')]),
    ],
}  # fmt: skip
BROKEN = {  # no valid call, found before anything of a call went out: text, whole and streamed
    "mistral": ["[TOOL_CALLS] oops no call", '[TOOL_CALLS] [{"name": 3, "arguments": {}}]'],
    "mistral_args": ["[TOOL_CALLS]pa int[ARGS]{}", "[TOOL_CALLS]what is this?"],
    "granite": ['<|tool_call|>{"name": "paint", "arguments": {}}'],
    "deepseek": [f"{DS_BEGIN}no call at all", f"{DS_BEGIN}{DS_CALL}function{DS_SEP}pa int\n```json\n{{}}"],
    "pythonic": ["[1, 2, 3] are numbers", "Let me call [paint()]", "[a b(x=1)]"],
}
LATE = {  # broken once its name went out: text whole; streamed, a call begun and never completed
    "mistral": '[TOOL_CALLS] [{"name": "paint", "arguments": {"ok": tru}}]',
    "mistral_args": '[TOOL_CALLS]paint[ARGS]{"ok": tru}',
    "granite": '<|tool_call|>[{"name": "paint", "arguments"',
    "deepseek": f"{DS_BEGIN}{DS_CALL}function{DS_SEP}paint\n```json\n{{oops}}\n```{DS_CALL_END}{DS_END}",
    "pythonic": "[paint(ok=yes)]",  # a name, no literal: nothing of it is evaluated
}


@pytest.mark.parametrize("mode", list(ANSWERS))
def test_reading_answers_whole_and_at_every_cut(mode: str) -> None:
    for text, content, calls in ANSWERS[mode]:
        got_content, got = split(text, mode)
        assert (got_content, _pairs(got)) == (content, calls), text
        assert all(c["type"] == "function" for c in got)
        if mode.startswith("mistral"):  # Mistral's templates take only 9 letters or digits as ids
            assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in got)
        else:
            assert all(c["id"].startswith("call_") for c in got)
        for cuts in [[k] for k in range(1, len(text))] + [list(range(1, len(text)))]:
            streamed_content, streamed, deltas = _fed(text, mode, cuts)
            assert streamed_content == (content or ""), (text, cuts)
            assert [(c["name"], c["arguments"]) for c in streamed] == calls, (text, cuts)
            heads = [d["tool_calls"][0] for d in deltas if "id" in d.get("tool_calls", [{}])[0]]
            assert [(h["function"]["name"], h["function"]["arguments"]) for h in heads] == [
                (n, "") for n, _ in calls
            ]  # the name comes first and whole, the arguments after it
        pieces = [d for d in _fed(text, mode, list(range(1, len(text))))[2] if "tool_calls" in d]
        if mode != "pythonic":  # fed a character at a time, the arguments stream in pieces
            assert len(pieces) > len(PAINT) // 2
    for text in BROKEN[mode] + ["no call here [TOOL or <|tool", "a < b"]:
        assert split(text, mode) == (text, []), text
        assert _fed(text, mode, list(range(1, len(text))))[:2] == (text, []), text
    assert split(LATE[mode], mode) == (LATE[mode], [])
    r = reader(mode)
    for ch in LATE[mode]:
        r.feed(ch)
    r.close()
    assert r.broken and not r.calls and not r.content


def test_formats_found_and_history_written_by_each_template() -> None:
    """Each template's format; earlier calls and results in the prompt as the model's own template writes
    them (Mistral's ids mapped to 9 characters, the same for a call and its result); where the template
    shows no calls, they are written into the content in the model's format (Granite's shows only content;
    DeepSeek's only a call message whose content is None, a key transformers drops); DeepSeek's tools are
    described to it."""
    history = [
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_0123456789abcdef01234567", "type": "function",
             "function": {"name": "paint", "arguments": {"ok": True, "pick": "red"}}}]},
        {"role": "tool", "tool_call_id": "call_0123456789abcdef01234567", "content": "done"},
    ]  # fmt: skip
    sid = short_id("call_0123456789abcdef01234567")
    assert len(sid) == 9 and sid.isalnum() and short_id("abcDEF123") == "abcDEF123"
    expect = {
        "mistral": f'[TOOL_CALLS] [{{"name": "paint", "arguments": {{"ok": true, "pick": "red"}}, "id": "{sid}"}}]'
        f'</s>[TOOL_RESULTS] {{"content": done, "call_id": "{sid}"}}[/TOOL_RESULTS]',
        "mistral_args": '[TOOL_CALLS]paint[ARGS]{"ok": true, "pick": "red"}</s>[TOOL_RESULTS]done[/TOOL_RESULTS]',
        "granite": '<|start_of_role|>assistant<|end_of_role|><|tool_call|>[{"name": "paint", "arguments": '
        '{"ok": true, "pick": "red"}}]<|end_of_text|>\n<|start_of_role|>tool<|end_of_role|>done<|end_of_text|>',
        "deepseek": f'<｜Assistant｜>{DS_BEGIN}{DS_CALL}function{DS_SEP}paint\n```json\n{{"ok": true, "pick": "red"}}'
        f"\n```{DS_CALL_END}{DS_END}<｜end▁of▁sentence｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>done"
        "<｜tool▁output▁end｜><｜tool▁outputs▁end｜>",
        "deepseek_v31": f'<｜Assistant｜></think>{DS_BEGIN}{DS_CALL}paint{DS_SEP}{{"ok": true, "pick": "red"}}'
        f"{DS_CALL_END}{DS_END}<｜end▁of▁sentence｜><｜tool▁output▁begin｜>done<｜tool▁output▁end｜>",
        "pythonic": '<|header_start|>assistant<|header_end|>\n\n[paint(ok="True", pick="red")]<|eot|>'
        '<|header_start|>ipython<|header_end|>\n\n"done"<|eot|>',
    }  # fmt: skip
    for kind in FAMILIES:
        tok = _tokenizer(kind)
        fmt = tool_format(tok)
        assert (fmt.kind, fmt.inject) == (kind, kind.startswith("deepseek")), kind
        shown = tok.decode(chat_prompt(tok, history, TOOLS))
        assert expect[kind] in shown, (kind, shown)
        assert '"paint"' in shown.split(expect[kind])[0]  # the tools, before the history
    # DeepSeek V3's template shows no tools: they are described to it, in its format, in a system turn
    tok = _tokenizer("deepseek")
    shown = tok.decode(chat_prompt(tok, history[:1], TOOLS))
    assert shown.startswith("<s># Tools") and f"{DS_CALL}function{DS_SEP}<function-name>\n```json\n" in shown
    assert shown.endswith("<｜User｜>hello world<｜Assistant｜>")


def _grammar_run(svc: Any, grammar: str, text: str) -> tuple[bool, bool]:
    """Whether the grammar takes all of ``text``'s tokens, and may end there."""
    m = svc.grammars.matcher(grammar)
    ids = svc.tokenizer(text, add_special_tokens=False)["input_ids"]
    return all(m.consume_token(t) for t in ids), m.is_accepting()


GOOD = {
    "mistral": '[TOOL_CALLS] [{"name": "paint", "arguments": {"ok": true, "pick": "red"}}]',
    "mistral_args": '[TOOL_CALLS]paint[ARGS]{"ok": true, "pick": "red"}',
    "granite": '<|tool_call|>[{"name": "paint", "arguments": {"ok": true, "pick": "red"}}]',
    "deepseek_v31": f'{DS_BEGIN}{DS_CALL}paint{DS_SEP}{{"ok": true, "pick": "red"}}{DS_CALL_END}{DS_END}',
    "deepseek": f'{DS_BEGIN}{DS_CALL}function{DS_SEP}paint\n```json\n{{"ok": true, "pick": "red"}}\n```{DS_CALL_END}{DS_END}',
}  # fmt: skip


@pytest.mark.parametrize("kind", [k for k in FAMILIES if k != "pythonic"])
def test_lazy_grammar_of_each_format(kind: str) -> None:
    """``auto``: free text may end anywhere; after the marker only a valid call of a request's tool."""
    pytest.importorskip("llguidance")
    from types import SimpleNamespace

    from adapterhub.server.inference.grammar import Grammars
    from adapterhub.server.inference.requests import ChatRequest, parse
    from adapterhub.server.inference.tools import plan

    tok = _tokenizer(kind)
    svc = SimpleNamespace(tokenizer=tok, grammars=Grammars(tok, len(tok)))
    req = parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
                              "parallel_tool_calls": False})  # fmt: skip
    p = plan(svc, req)
    assert p.mode == kind and p.grammar is not None
    trigger = FAMILIES[kind][3]
    assert tok.convert_tokens_to_ids(trigger) in p.keep
    assert _grammar_run(svc, p.grammar, "hello world, no call {here}") == (True, True)
    assert _grammar_run(svc, p.grammar, "Sure. " + GOOD[kind]) == (True, True)
    assert split("Sure. " + GOOD[kind], kind)[1][0]["function"]["name"] == "paint"
    for bad in (GOOD[kind].replace("paint", "nope"), GOOD[kind].replace("true", "1")):
        assert not _grammar_run(svc, p.grammar, bad)[0], bad
    two = split(GOOD[kind] + GOOD[kind], kind)[1] if kind == "mistral_args" else []
    assert len(two) == (2 if kind == "mistral_args" else 0)
    assert not _grammar_run(svc, p.grammar, GOOD[kind] + GOOD[kind])[0]  # one call: not parallel


def test_pythonic_is_read_but_not_held() -> None:
    """The pythonic format is read under ``auto`` but held by no grammar (Python literals); a forced call
    is still one JSON call object, as for every format."""
    pytest.importorskip("llguidance")
    from types import SimpleNamespace

    from adapterhub.server.inference.grammar import Grammars
    from adapterhub.server.inference.requests import ChatRequest, parse
    from adapterhub.server.inference.tools import plan

    tok = _tokenizer("pythonic")
    svc = SimpleNamespace(tokenizer=tok, grammars=Grammars(tok, len(tok)))
    ask = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    p = plan(svc, parse(ChatRequest, ask))
    assert (p.mode, p.grammar) == ("pythonic", None) and tok.convert_tokens_to_ids(
        "<|python_start|>"
    ) in p.keep
    forced = plan(svc, parse(ChatRequest, {**ask, "tool_choice": "required"}))
    assert forced.mode == "forced" and forced.grammar is not None


@pytest.fixture(scope="module", params=["mistral_args", "granite", "deepseek"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("openai")
    pytest.importorskip("llguidance")
    from test_serve_v1 import Server
    from transformers import LlamaConfig, LlamaForCausalLM

    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    tok = _tokenizer(kind)
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=0, eos_token_id=1)  # fmt: skip
    LlamaForCausalLM(cfg).eval().save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    hub = Hub(root / "home")
    hub.add_base(root / "base", name="tiny")
    hub.close()
    s = Server(root / "home", "tiny")
    s.kind, s.trigger = kind, tok.convert_tokens_to_ids(FAMILIES[kind][3])
    yield s
    s.close()


def test_auto_calls_end_to_end(served: Any) -> None:
    """Asked with the marker favoured, the model opens a call and the grammar makes it valid: parsed,
    the same whole and streamed (joined by the openai client's own accumulator); without it, text; and a
    history holding that call and its result is taken back."""
    import jsonschema

    client = served.client()
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 80,
           "temperature": 0, "tools": TOOLS[:1], "parallel_tool_calls": False}  # fmt: skip
    text = client.chat.completions.create(**{**ask, "max_tokens": 16}).choices[0]
    assert text.message.tool_calls is None and text.finish_reason in ("stop", "length")
    bias = {"logit_bias": {str(served.trigger): 100}}
    whole = client.chat.completions.create(**ask, **bias).choices[0]
    assert whole.finish_reason == "tool_calls", whole
    (call,) = whole.message.tool_calls
    assert call.function.name == "paint" and not whole.message.content
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA)
    assert (len(call.id) == 9) == (served.kind == "mistral_args")
    with client.chat.completions.stream(**ask, **bias) as stream:
        events = list(stream)
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == [
        ("paint", call.function.arguments)
    ]
    assert len([e for e in events if e.type == "tool_calls.function.arguments.delta"]) > 2
    forced = client.chat.completions.create(**ask, tool_choice="required").choices[0]
    assert forced.finish_reason == "tool_calls" and forced.message.tool_calls[0].function.name == "paint"
    again = ask["messages"] + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "done"},
    ]
    assert client.chat.completions.create(**{**ask, "messages": again}).choices[0].message is not None


def test_tool_choice_none_reads_nothing(served: Any) -> None:
    """``tool_choice: none`` with the marker favoured: text, nothing parsed as calls."""
    client = served.client()
    none = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello world"}], max_tokens=5, temperature=0,
        tools=TOOLS, tool_choice="none", logit_bias={str(served.trigger): 100},
    ).choices[0]  # fmt: skip
    assert none.message.tool_calls is None and none.finish_reason == "length"
