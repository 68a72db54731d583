"""Function-calling rows in `train` and `eval` (``{"tools": [...], "messages": [... tool_calls ...,
{"role": "tool", ...}]}``) are rendered exactly as the server renders a request with that history and
those tools: at every assistant turn the tokens before it are `chat_prompt`'s prompt for the history
before it, a call turn's target is the text the server's reader parses back into those calls, and the
loss covers the assistant turns (calls included) and nothing else. Templates: a Qwen 2.5-style one that
shows tools and calls itself, SmolLM2's (which ignores ``tools``: they are described in a system turn, calls
written ``<tool_call>``), and each marker format's (tests/test_serve_formats.py's families)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers.trainkit import tiny_tokenizer

from adapterhub.runtime.chat import chat_text
from adapterhub.server.inference.tools import CLOSE, OPEN, chat_prompt, split, tool_format
from adapterhub.services.scoring import EvalData, loss_sequences
from adapterhub.services.train_data import chat_row, encode_rows, read_rows

pytest.importorskip("fastapi")

QWEN = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object within <tool_call></tool_call> XML tags."
    "<|im_end|>\\n' }}{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' }}{{- tool_call.name }}{{- \'", "arguments": \' }}'
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
#: SmolLM2-Instruct's own template (it ignores ``tools``)
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
PAINT = {"type": "function", "function": {"name": "paint", "parameters": {
    "type": "object", "properties": {"ok": {"type": "boolean"}, "pick": {"enum": ["red", "blue"]}}}}}  # fmt: skip
TOOLS = [WEATHER, PAINT]
ROW = {
    "tools": TOOLS,
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello, the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18}'},
        {"role": "assistant", "content": "It is 18 degrees in Paris."},
        {"role": "user", "content": "paint it red and the weather in Rome"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "paint", "arguments": {"ok": True, "pick": "red"}}},
            {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "content": "done"},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Painted red; sunny in Rome."},
    ],
}  # fmt: skip


def _chatml(template: str) -> Any:
    tok = tiny_tokenizer()
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.add_tokens([OPEN, CLOSE])  # as Qwen's tokenizers have them
    tok.chat_template = template
    return tok


def _tokenizers() -> list[Any]:
    from test_serve_formats import FAMILIES, _tokenizer

    return [
        pytest.param(lambda: _chatml(QWEN), "tagged", id="qwen"),
        pytest.param(lambda: _chatml(SMOLLM2), "tagged", id="smollm2"),
        *(pytest.param(lambda k=k: _tokenizer(k), k, id=k) for k in FAMILIES if k not in TOOLS_LAST),
    ]


#: Mistral's templates put the tools right before the last user message, so a conversation's rendering
#: changes turn by turn: their rows are refused (one line) rather than learned after a prompt the server
#: never builds
TOOLS_LAST = ("mistral", "mistral_args")


def _rows(tmp_path: Path, rows: list[Any]) -> Path:
    p = tmp_path / "rows.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.mark.parametrize(("make", "mode"), _tokenizers())
def test_every_assistant_turn_is_learned_after_the_servers_prompt(
    make: Any, mode: str, tmp_path: Path
) -> None:
    tok = make()
    assert tool_format(tok).kind == mode
    rows, kind, _ = read_rows(_rows(tmp_path, [ROW]))
    ((ids, labels),) = encode_rows(tok, rows, kind, max_length=4096, path=tmp_path / "rows.jsonl")
    msgs, tools = chat_row(ROW)
    learned: set[int] = set()
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = chat_prompt(tok, msgs[:i], tools)  # what the server answers this history with
        assert ids[: len(prompt)] == prompt, (i, tok.decode(ids[: len(prompt)]), tok.decode(prompt))
        upto = chat_text(tok, msgs[: i + 1], tools, generation=False)
        end = len(tok(upto, add_special_tokens=False)["input_ids"])
        assert end > len(prompt)
        learned |= set(range(len(prompt), end))
        target = tok.decode(ids[len(prompt) : end])
        if m.get("tool_calls"):  # the server's reader reads this turn's text back into these calls
            content, calls = split(target, mode)
            assert not content, target
            got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
            want = [(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            if mode == "pythonic":  # Llama 4's template writes every argument as a quoted string
                want = [(n, {k: str(v) for k, v in a.items()}) for n, a in want]
            assert got == want, target
        else:
            assert m["content"] in target
    assert {j for j, lab in enumerate(labels) if lab != -100} == learned  # no tool result, no prompt
    assert all(labels[j] == ids[j] for j in learned)


@pytest.mark.parametrize("kind", TOOLS_LAST)
def test_a_template_that_moves_the_tools_is_refused_in_one_line(kind: str, tmp_path: Path) -> None:
    from test_serve_formats import _tokenizer

    from adapterhub.errors import InvalidOptionError

    rows, shape, _ = read_rows(_rows(tmp_path, [ROW]))
    with pytest.raises(InvalidOptionError, match="turn by turn") as err:
        encode_rows(_tokenizer(kind), rows, shape, max_length=4096, path=tmp_path / "rows.jsonl")
    assert "\n" not in str(err.value)


def test_smollm2_calls_are_written_as_described_tags(tmp_path: Path) -> None:
    tok = _chatml(SMOLLM2)
    rows, kind, _ = read_rows(_rows(tmp_path, [ROW]))
    ((ids, labels),) = encode_rows(tok, rows, kind, max_length=4096, path=tmp_path / "rows.jsonl")
    text = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != -100])
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in text
    )
    assert '"description": "the weather"' in tok.decode(ids)  # the tools described in the system turn
    assert "temp" not in text and "sunny" not in tok.decode(ids[-12:])  # tool results are not learned


def test_eval_scores_tool_rows_and_refuses_a_reference_call(tmp_path: Path) -> None:
    from adapterhub.errors import InvalidOptionError
    from adapterhub.services.scoring import _prompts

    tok = _chatml(QWEN)
    p = _rows(tmp_path, [ROW])
    rows, kind, digest = read_rows(p)
    data = EvalData(path=p, rows=tuple(rows), kind=kind, sha256=digest)
    ((seq_ids, _),) = encode_rows(tok, rows, kind, max_length=4096, path=p)
    (seq,) = loss_sequences(tok, data, 4096)
    assert seq.ids == seq_ids
    msgs, tools = chat_row(ROW)
    ((prompt, ref),) = _prompts(tok, data)
    assert prompt == chat_prompt(tok, msgs[:-1], tools) and ref == "Painted red; sunny in Rome."
    cut = {"tools": TOOLS, "messages": ROW["messages"][:3]}
    data = EvalData(path=p, rows=((1, cut),), kind="messages", sha256="")
    with pytest.raises(InvalidOptionError, match="line 1: the answer is a tool call"):
        _prompts(tok, data)
