"""Tool calls in the chat template's format (`adapterhub.server.inference.tools`): ``tool_choice`` auto
(the model decides; a lazy llguidance grammar holds a call, once ``<tool_call>`` is written, to the tools'
schemas) and calls streamed as OpenAI streams them (the name, then the arguments in pieces).

What is proved where: the reader of the answer on written text (every format, and fed a character at a
time it gives the stream deltas that join to the whole answer's calls); the lazy grammar with llguidance
on a real tokenizer; and end to end with the real ``openai`` and ``langchain-openai`` clients against a
server on 127.0.0.1 serving a tiny random Llama whose tokenizer has ``<tool_call>`` as one token. A random
model never chooses a call by itself, so the auto call end to end is made by ``logit_bias`` on that token:
the model writes the trigger, and from there the grammar (not the bias) makes the call valid; without the
bias the same request is answered in text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from adapterhub import Hub
from adapterhub.server.inference.tools import CLOSE, OPEN, Calls, chat_prompt, split, tool_format

pytest.importorskip("fastapi")

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "pick": {"enum": ["red", "blue"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["ok", "pick", "n"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "paint", "description": "paint it", "parameters": SCHEMA}},
    {
        "type": "function",
        "function": {
            "name": "wait",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
        },
    },
]
#: a Qwen-style template: the tools in the system turn, calls as <tool_call>{json}</tool_call>
HERMES = (
    "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools> call a tool as "
    '<tool_call>{"name": ..., "arguments": ...}</tool_call>\n{% endif %}'
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
PLAIN = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
LLAMA = (
    "{% if tools %}Respond with a JSON of the form "
    '{"name": function name, "parameters": dictionary of argument name and its value}.'
    "{% for t in tools %}{{ t | tojson }}{% endfor %}\n{% endif %}" + PLAIN
)


def _tokenizer(template: str, tags: bool = True) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(
        ['{"ok": true, "pick": "red", "n": 3}', "user: hello world assistant:"] * 20, trainer
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    if tags:
        tok.add_tokens([OPEN, CLOSE])  # as Qwen's and Hermes' tokenizers have them
    tok.chat_template = template
    return tok


def _base(dest: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer(HERMES)
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=0, eos_token_id=1)  # fmt: skip
    LlamaForCausalLM(cfg).eval().save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def _fed(text: str, mode: str, step: int = 1) -> tuple[list[dict[str, Any]], str, list[dict[str, Any]]]:
    """``text`` fed ``step`` characters at a time: the deltas, and the content and calls they join to
    (as the openai client joins them)."""
    reader = Calls(mode)
    deltas = []
    for i in range(0, len(text), step):
        deltas += reader.feed(text[i : i + step])
    deltas += reader.close()
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            c = calls.setdefault(tc["index"], {"id": tc.get("id"), "name": "", "arguments": ""})
            c["name"] += tc.get("function", {}).get("name") or ""
            c["arguments"] += tc["function"].get("arguments") or ""
    return deltas, content, [calls[i] for i in sorted(calls)]


def _names_args(calls: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def test_reading_calls_whole_and_streamed() -> None:
    args = '{"city": "Paris", "deep": [1, {"a": "}]\\" <tool_call>"}], "u": null}'
    text = f'Let me look.\n<tool_call>\n{{"name": "weather", "arguments": {args}}}\n</tool_call>\n' + (
        '<tool_call>\n{"name": "wait", "arguments": {}}\n</tool_call>\ntrailing words'
    )
    content, calls = split(text, "tagged")
    assert content == "Let me look.\n"
    assert _names_args(calls) == [("weather", args), ("wait", "{}")]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    for step in (1, 3, 7, len(text)):
        deltas, streamed_content, streamed = _fed(text, "tagged", step)
        assert streamed_content == content  # text after the calls is dropped, as vLLM drops it
        assert [(c["name"], c["arguments"]) for c in streamed] == _names_args(calls)
        heads = [d["tool_calls"][0] for d in deltas if "id" in d.get("tool_calls", [{}])[0]]
        assert [h["function"] for h in heads] == [
            {"name": "weather", "arguments": ""},
            {"name": "wait", "arguments": ""},
        ]
        if step == 1:  # the arguments come in pieces, never a piece of the closing tag
            pieces = [d for d in deltas if "tool_calls" in d and "id" not in d["tool_calls"][0]]
            assert len(pieces) > len(args) // 2 and not any(
                "<" in json.dumps(p) and "/" in json.dumps(p) for p in pieces[-2:]
            )
    # a partial trigger is held back, then given as text when it is no trigger
    _, c1, calls1 = _fed("a < b and <tool", "tagged")
    assert c1 == "a < b and <tool" and not calls1
    assert split("a < b", "tagged") == ("a < b", [])
    # a list of calls inside one tag (SmolLM2-1.7B's training format)
    _, lc = split(
        '<tool_call>[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]</tool_call>',
        "tagged",
    )
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in lc] == [
        ("a", {"x": 1}),
        ("b", {}),
    ]
    # Llama 3's bare JSON: "parameters", ";" between calls; text that opens otherwise is text
    bare = '{"name": "f", "parameters": {"x": [1, 2]}}; {"name": "g", "parameters": {}}'
    assert split(bare, "bare")[0] is None
    assert _names_args(split(bare, "bare")[1]) == [("f", '{"x": [1, 2]}'), ("g", "{}")]
    assert [(c["name"], c["arguments"]) for c in _fed(bare, "bare")[2]] == [
        ("f", '{"x": [1, 2]}'),
        ("g", "{}"),
    ]
    assert split('The answer is {"name": 1}', "bare") == ('The answer is {"name": 1}', [])
    # a call that is no valid call is text, whole
    for broken in (
        '<tool_call>\n{"name": oops}</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": {"a": tru}}',
    ):
        assert split(broken, "tagged") == (broken, [])
    _, c2, calls2 = _fed('<tool_call>\n{"nom": 1}', "tagged")
    assert c2 == '<tool_call>\n{"nom": 1}' and not calls2
    # forced: the answer is the call object
    assert _names_args(split('{"name": "paint", "arguments": {"ok": true}}', "forced")[1]) == [
        ("paint", '{"ok": true}')
    ]


def test_template_formats_and_prompts() -> None:
    msgs = [{"role": "user", "content": "hello world"}]
    hermes, plain, llama = _tokenizer(HERMES), _tokenizer(PLAIN), _tokenizer(LLAMA)
    assert (tool_format(hermes).tagged, tool_format(hermes).inject) == (True, False)
    assert (tool_format(llama).tagged, tool_format(llama).inject) == (False, False)
    assert (tool_format(plain).tagged, tool_format(plain).inject) == (True, True)
    shown = hermes.decode(chat_prompt(hermes, msgs, TOOLS))
    assert shown.startswith("<tools>") and '"name": "paint"' in shown
    # a template that ignores tools: they are described in a system turn, in the tagged format
    shown = plain.decode(chat_prompt(plain, msgs, TOOLS))
    assert shown.startswith("system: # Tools") and "<tool_call>" in shown and '"name": "paint"' in shown
    history = msgs + [
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "wait", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
    ]  # fmt: skip
    shown = plain.decode(chat_prompt(plain, history, TOOLS))
    assert 'assistant: <tool_call>\n{"name": "wait", "arguments": {}}\n</tool_call>' in shown
    assert "tool: <tool_response>\ndone\n</tool_response>" in shown
    assert plain.decode(chat_prompt(plain, msgs, None)) == "user: hello world\nassistant:"


def test_lazy_grammar_on_a_real_tokenizer() -> None:
    pytest.importorskip("llguidance")
    from adapterhub.server.inference.grammar import Grammars, lazy_tool_grammar, mask, tool_schema

    call, _ = tool_schema(TOOLS, "required")
    assert call is not None
    for tags in (True, False):  # the tags as added tokens (Qwen's), and spelled in text
        tok = _tokenizer(HERMES, tags)
        tok.add_tokens(["<think>"])  # a special token free text may hold (Qwen 3 opens with it)
        g = Grammars(tok, len(tok), eos=[0, 1])  # two end tokens, as generation configs often give
        ids = (tok.convert_tokens_to_ids(OPEN), tok.convert_tokens_to_ids(CLOSE)) if tags else (None, None)
        specials = [i for i in g.specials() if i not in ids]
        assert specials == [len(tok) - 1]  # <think>: not the tags, not the end tokens
        one = g.compile(call, "tools", lark=lazy_tool_grammar(call, False, *ids, specials))
        many = g.compile(call, "tools", lark=lazy_tool_grammar(call, True, *ids, specials))
        assert isinstance(one, str) and isinstance(many, str)

        def run(grammar: str, text: str, g: Any = g, tok: Any = tok) -> tuple[int, bool, bool]:
            """How many tokens of ``text`` the grammar takes, whether it may end there, and has ended."""
            m = g.matcher(grammar)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            for i, t in enumerate(ids):
                if not m.consume_token(t):
                    return i, False, False
            return len(ids), m.is_accepting(), m.is_stopped()

        def size(text: str, tok: Any = tok) -> int:
            return len(tok(text, add_special_tokens=False)["input_ids"])

        good = (
            f'Sure.{OPEN}\n{{"name": "paint", "arguments": {{"ok": true, "pick": "red", "n": 3}}}}\n{CLOSE}'
        )
        free = "<think>hello world, no call < here {}"
        assert run(one, free) == (size(free), True, False)  # free text: anything, and it may end
        assert run(one, "<think>x" + good[5:])[1:] == (True, True)  # a call after a special token
        assert run(one, f'<think>x{OPEN}\n{{"name": "nope"')[0] < size(f'<think>x{OPEN}\n{{"name": "nope"')
        allowed = mask(torch.zeros(len(tok)), g.matcher(one))
        assert bool(torch.isfinite(allowed[[0, 1]]).all())  # with either end token
        assert run(one, good) == (size(good), True, True)  # one call: the grammar is done
        assert run(many, good)[:2] == (size(good), True) and not run(many, good)[2]  # more may follow
        for bad in (f'Sure.{OPEN}\n{{"name": "paint", "arguments": {{"ok": 1', f'x{OPEN}\n{{"name": "nope"'):
            assert run(one, bad)[0] < size(bad)  # refused after the trigger


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("openai")
    pytest.importorskip("llguidance")
    from test_serve_v1 import Server

    root = tmp_path_factory.mktemp("tools")
    hub = Hub(root / "home")
    hub.add_base(_base(root / "bpe"), name="bpe")
    hub.close()
    s = Server(root / "home", "bpe")
    s.trigger = _tokenizer(HERMES).convert_tokens_to_ids("<tool_call>")
    yield s
    s.close()


def _create(client: Any, **kw: Any) -> Any:
    args = {"model": "bpe", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 60,
            "temperature": 0, "tools": TOOLS, **kw}  # fmt: skip
    return client.chat.completions.create(**args)


def test_auto_tool_calls_against_a_server(server: Any) -> None:
    """``auto``: in text without the trigger; with it, a valid call (of either tool), whole and streamed,
    the stream joined by the openai client's own accumulator equal to the whole answer."""
    import jsonschema

    client = server.client()
    text = _create(client).choices[0]
    assert (
        text.message.tool_calls is None and text.message.content and text.finish_reason in ("stop", "length")
    )
    none = _create(client, tool_choice="none", logit_bias={str(server.trigger): 100}).choices[0]
    assert none.message.tool_calls is None and none.message.content.startswith("<tool_call>")
    bias = {str(server.trigger): 100}
    either = _create(client, logit_bias=bias, parallel_tool_calls=False).choices[0]
    assert either.finish_reason == "tool_calls" and either.message.content is None
    (call,) = either.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    paint = TOOLS[:1]  # a tool with arguments to stream
    whole = _create(client, tools=paint, logit_bias=bias, parallel_tool_calls=False).choices[0]
    (call,) = whole.message.tool_calls
    assert call.function.name == "paint" and whole.finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA)
    with client.chat.completions.stream(
        model="bpe", messages=[{"role": "user", "content": "hello world"}], max_tokens=60, temperature=0,
        tools=paint, logit_bias=bias, parallel_tool_calls=False,
    ) as stream:  # fmt: skip
        events = list(stream)
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls" and not final.message.content
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == [
        ("paint", call.function.arguments)
    ]
    pieces = [e for e in events if e.type == "tool_calls.function.arguments.delta"]
    assert len(pieces) > 3  # the arguments came in pieces, not in one chunk


def test_streamed_forced_call_equals_whole(server: Any) -> None:
    client = server.client()
    named = {"type": "function", "function": {"name": "paint"}}
    whole = _create(client, tool_choice=named).choices[0]
    chunks = list(_create(client, tool_choice=named, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    first = deltas[1].tool_calls[0]  # after the role chunk
    assert (first.index, first.type, first.function.name, first.function.arguments) == (
        0,
        "function",
        "paint",
        "",
    )
    assert first.id and all(d.tool_calls[0].id is None for d in deltas[2:] if d.tool_calls)
    joined = "".join(d.tool_calls[0].function.arguments for d in deltas if d.tool_calls)
    assert joined == whole.message.tool_calls[0].function.arguments
    assert chunks[-2].choices[0].finish_reason == "tool_calls" and chunks[-1].usage is not None


def test_langchain_streams_tool_calls(server: Any) -> None:
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="bpe", base_url=server.url + "/v1", api_key="EMPTY", temperature=0, max_tokens=60,
                     max_retries=0, logit_bias={server.trigger: 100})  # fmt: skip
    bound = llm.bind_tools(TOOLS[:1], parallel_tool_calls=False)  # tool_choice left out: auto
    whole = bound.invoke("hello world")
    acc, pieces = None, 0
    for part in bound.stream("hello world"):
        acc = part if acc is None else acc + part
        pieces += bool(part.tool_call_chunks)
    assert pieces > 3
    assert acc is not None and len(whole.tool_calls) == 1
    assert [(c["name"], c["args"]) for c in acc.tool_calls] == [
        (c["name"], c["args"]) for c in whole.tool_calls
    ]
    assert acc.response_metadata.get("finish_reason") == "tool_calls"
    # with_structured_output through a (forced) tool call, streamed (LangChain's pydantic parser yields
    # only whole objects): the same object as asked whole
    from pydantic import BaseModel, Field

    class Paint(BaseModel):
        ok: bool
        n: int = Field(ge=0, le=9)

    structured = llm.with_structured_output(Paint, method="function_calling", strict=True)
    streamed = list(structured.stream("hello world"))
    assert streamed and streamed[-1] == structured.invoke("hello world")


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2")
def test_smollm2_auto_answers_in_text_and_a_forced_call_streams(
    tmp_path: Path, smollm2_checkpoint: Path
) -> None:
    """The real SmolLM2-135M-Instruct, whose template ignores tools (they are described to it in a system
    turn): asked arithmetic with a weather tool at hand, ``auto`` lets it answer in text; a forced call
    is a valid call, streamed in pieces that join to the whole answer's arguments."""
    pytest.importorskip("openai")
    pytest.importorskip("llguidance")
    from test_serve_v1 import Server

    weather = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                               "required": ["city"], "additionalProperties": False}}}]  # fmt: skip
    hub = Hub(tmp_path / "home")
    hub.add_base(smollm2_checkpoint, name="smollm2")
    hub.close()
    s = Server(tmp_path / "home", "smollm2")
    try:
        client = s.client()

        def ask(q: str, **kw: Any) -> Any:
            return client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": q}],
                                                  max_tokens=40, temperature=0, tools=weather, **kw)  # fmt: skip

        text = ask("What is 2+2?").choices[0]
        assert text.message.tool_calls is None and "4" in text.message.content, text.message.content
        whole = ask("What is the weather in Paris?", tool_choice="required").choices[0]
        (call,) = whole.message.tool_calls
        assert call.function.name == "get_weather" and whole.finish_reason == "tool_calls"
        assert set(json.loads(call.function.arguments)) == {"city"}
        parts = [
            c.choices[0].delta.tool_calls[0]
            for c in ask("What is the weather in Paris?", tool_choice="required", stream=True)
            if c.choices and c.choices[0].delta.tool_calls
        ]
        assert parts[0].function.name == "get_weather" and len(parts) > 2
        assert "".join(p.function.arguments for p in parts) == call.function.arguments
    finally:
        s.close()


def test_plans_and_the_bare_grammar() -> None:
    """What each request gets (`tools.plan`): the lazy grammar for a ``<tool_call>`` template, Llama's bare
    JSON grammar for its template (a call only when the answer opens with ``{``, ``parameters`` as the
    key), a forced call object, a response_format, or nothing."""
    pytest.importorskip("llguidance")
    from types import SimpleNamespace

    from adapterhub.server.inference.grammar import Grammars
    from adapterhub.server.inference.requests import ChatRequest, parse
    from adapterhub.server.inference.tools import plan

    def plan_of(template: str, **kw: Any) -> Any:
        tok = _tokenizer(template, tags=False)
        svc = SimpleNamespace(tokenizer=tok, grammars=Grammars(tok, len(tok)))
        req = parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw})
        return plan(svc, req), svc

    assert plan_of(HERMES)[0].mode is None and plan_of(HERMES)[0].grammar is None
    assert plan_of(HERMES, tools=TOOLS, tool_choice="none")[0].mode is None
    assert (
        plan_of(HERMES, tools=TOOLS)[0].mode == "tagged"
        and "<tool_call>" in plan_of(HERMES, tools=TOOLS)[0].grammar
    )
    assert plan_of(HERMES, tools=TOOLS, tool_choice="required")[0].mode == "forced"
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
    assert plan_of(HERMES, tools=TOOLS, response_format=fmt)[0].mode is None
    bad = [{"type": "function", "function": {"name": "x", "parameters": {"type": "nonsense"}}}]
    assert plan_of(HERMES, tools=bad)[0].param == "tools"
    bare, svc = plan_of(LLAMA, tools=TOOLS, parallel_tool_calls=False)
    assert bare.mode == "bare"
    tok = svc.tokenizer

    def run(text: str) -> tuple[bool, bool]:
        m = svc.grammars.matcher(bare.grammar)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return all(m.consume_token(t) for t in ids), m.is_accepting()

    assert run("hello world, no call {here}") == (True, True)
    assert run(" ") == (True, True) and run("") == (True, True)
    assert run('{"name": "paint", "parameters": {"ok": true, "pick": "red", "n": 3}}') == (True, True)
    assert run(' {"name": "wait", "parameters": {}}') == (True, True)
    assert not run('{"name": "paint", "arguments": {')[0]  # Llama's key is "parameters"
    assert not run('{"name": "nope"')[0] and not run("{hello")[0]
