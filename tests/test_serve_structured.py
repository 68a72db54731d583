"""Constrained decoding (`adapterhub.server.inference.grammar`, llguidance): ``response_format``
``json_object`` / ``json_schema`` and forced ``tools`` calls on a tiny random Llama whose tokenizer is a
byte-level BPE trained here (so JSON's characters are tokens), in process: whatever the random model
prefers, the answer parses and validates."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from adapterhub import Hub

pytest.importorskip("llguidance")
pytest.importorskip("fastapi")

TEMPLATE = (
    "{% if tools %}tools: {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
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


def _base(dest: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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
    tok.chat_template = TEMPLATE
    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
    )
    LlamaForCausalLM(cfg).eval().save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from adapterhub.server import create_app, server_store
    from adapterhub.server.inference import mount_inference

    root = tmp_path_factory.mktemp("structured")
    hub = Hub(root / "home")
    hub.add_base(_base(root / "bpe"), name="bpe")
    app = create_app(server_store(hub.catalog, root / "home"))
    mount_inference(app, hub, model="bpe", device="cpu")
    with TestClient(app) as client:
        yield client
    hub.close()


def _ask(c: Any, **kw: Any) -> Any:
    body = {"model": "bpe", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 60, **kw}
    return c.post("/v1/chat/completions", json=body)


def test_json_object_and_json_schema(c: Any) -> None:
    import jsonschema

    free = _ask(c, temperature=0).json()["choices"][0]["message"]["content"]
    with pytest.raises(ValueError):
        json.loads(free)  # the random model alone writes no JSON
    r = _ask(c, temperature=0, response_format={"type": "json_object"}, max_tokens=200)
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    assert ch["message"]["content"].startswith("{")  # any object: its strings may outlast max_tokens
    if ch["finish_reason"] == "stop":
        assert isinstance(json.loads(ch["message"]["content"]), dict)
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    for seed in range(3):
        r = _ask(c, temperature=1.0, seed=seed, response_format=fmt, n=2)
        for ch in r.json()["choices"]:
            jsonschema.validate(json.loads(ch["message"]["content"]), SCHEMA)
            assert ch["finish_reason"] == "stop"
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    r = _ask(c, response_format=bad)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    assert _ask(c, response_format={"type": "xml"}).status_code == 400


def test_forced_tool_calls(c: Any) -> None:
    import jsonschema

    tools = [
        {"type": "function", "function": {"name": "paint", "parameters": SCHEMA}},
        {
            "type": "function",
            "function": {"name": "other", "parameters": {"type": "object", "properties": {}}},
        },
    ]
    named = {"type": "function", "function": {"name": "paint"}}
    r = _ask(c, temperature=0, tools=tools, tool_choice=named)
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    assert ch["finish_reason"] == "tool_calls" and ch["message"]["content"] is None
    (call,) = ch["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "paint"
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMA)
    r = _ask(c, temperature=0, tools=tools, tool_choice="required")
    assert r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] in ("paint", "other")
    chunks = [
        json.loads(line[6:])
        for line in _ask(c, temperature=0, tools=tools, tool_choice=named, stream=True).text.splitlines()
        if line.startswith("data: {")
    ]
    deltas = [ch["choices"][0]["delta"] for ch in chunks if ch["choices"]]
    streamed = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    # OpenAI's stream: the name (and empty arguments) first, then the arguments in pieces
    assert streamed and streamed[0]["function"] == {"name": "paint", "arguments": ""}
    assert "".join(p["function"]["arguments"] for p in streamed) == call["function"]["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert (
        _ask(c, tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}}).status_code
        == 400
    )
    assert _ask(c, tool_choice="required").status_code == 400  # no tools


def test_openai_and_langchain_structured_output_against_a_server(tmp_path: Path) -> None:
    """The real clients over 127.0.0.1: openai's ``json_schema`` and forced tools, LangChain's
    ``with_structured_output`` (a pydantic model, through ``json_schema`` and through a tool call)."""
    openai = pytest.importorskip("openai")
    from pydantic import BaseModel, Field
    from test_serve_v1 import Server

    class Paint(BaseModel):
        ok: bool
        n: int = Field(ge=0, le=9)

    hub = Hub(tmp_path / "home")
    hub.add_base(_base(tmp_path / "bpe"), name="bpe")
    hub.close()
    s = Server(tmp_path / "home", "bpe")
    try:
        client = s.client()
        msgs = [{"role": "user", "content": "hello world"}]
        fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
        r = client.chat.completions.create(
            model="bpe", messages=msgs, max_tokens=60, temperature=0, response_format=fmt
        )
        assert set(json.loads(r.choices[0].message.content)) == {"ok", "pick", "n"}
        tools = [{"type": "function", "function": {"name": "paint", "parameters": SCHEMA}}]
        r = client.chat.completions.create(
            model="bpe", messages=msgs, max_tokens=60, temperature=0, tools=tools, tool_choice="required"
        )
        assert r.choices[0].finish_reason == "tool_calls"
        assert set(json.loads(r.choices[0].message.tool_calls[0].function.arguments)) == {"ok", "pick", "n"}
        assert isinstance(openai, object)
        pytest.importorskip("langchain_openai")
        from langchain_openai import ChatOpenAI

        llm = ChatOpenAI(
            model="bpe", base_url=s.url + "/v1", api_key="EMPTY", temperature=0, max_tokens=150, max_retries=0
        )
        for method in ("json_schema", "function_calling"):
            got = llm.with_structured_output(Paint, method=method, strict=True).invoke("hello world")
            assert isinstance(got, Paint), method
    finally:
        s.close()
