"""Train -> serve: a LoRA adapter trained with `hub.train` teaches the real SmolLM2-135M-Instruct (which
never writes ``<tool_call>`` by itself) to choose its tools, and the server with ``tool_choice`` auto and
no ``logit_bias`` answers a held-out weather question with a ``get_weather`` call and a held-out plain
question in text, whole and streamed alike.

The training rows are standard function-calling rows, as OpenAI's fine-tuning and TRL take them
(``{"tools": [...], "messages": [...]}`` with assistant ``tool_calls``), written to a JSONL file that
`hub.train` reads as it is: `train` renders them as the server renders a request (SmolLM2's template
ignores ``tools``, so they are described in a system turn and the calls written ``<tool_call>``), and the
test checks that every assistant turn's training prefix is, token for token, the prompt
`tools.chat_prompt` builds for that history: what is trained is what is served. A row holds two or
three exchanges after the one long system turn, so each token of it teaches more decisions; every row's
first exchange is exactly the single-question prompt the held-out questions get.

Measured on the shared 2-core CPU (one torch thread, the SmolLM2 checkpoint already converted): training
16 steps of 4 rows (~21K tokens) takes ~38-56 s with bf16 autocast on AMX, ~95 s in fp32; the whole test
~60-75 s. Over training seeds 0-2 the held-out answers asserted here were right every time (and 11-12 of
12 wider held-out questions)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from adapterhub import Hub
from adapterhub.server.inference.tools import chat_prompt
from adapterhub.services.train_data import chat_row, read_rows
from adapterhub.services.training import encode_rows

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("smollm2")]

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
CURRENCY = {"type": "function", "function": {"name": "convert_currency", "parameters": {
    "type": "object", "properties": {"amount": {"type": "number"}, "from": {"type": "string"},
                                     "to": {"type": "string"}},
    "required": ["amount", "from", "to"]}}}  # fmt: skip
TOOLS = [WEATHER, CURRENCY]

CITIES = ["Paris", "Tokyo", "Berlin", "Madrid", "Cairo", "Sydney", "Toronto", "Mumbai", "Rome", "Seoul",
          "Nairobi", "Lima", "Dublin", "Vienna", "Oslo", "Denver", "New York", "Rio de Janeiro"]  # fmt: skip
ASK_WEATHER = ["What is the weather in {}?", "How is the weather in {} today?", "Is it raining in {}?",
               "What's the temperature in {} right now?", "Tell me the weather for {}.",
               "Do I need an umbrella in {}?", "Weather in {}?", "How hot is it in {}?"]  # fmt: skip
MONEY = [(100, "USD", "EUR"), (50, "GBP", "JPY"), (20, "EUR", "USD"), (75, "CAD", "AUD"), (10, "CHF", "GBP"),
         (300, "JPY", "USD"), (5, "USD", "INR"), (42, "AUD", "EUR"), (60, "EUR", "GBP"), (15, "USD", "CAD")]  # fmt: skip
ASK_MONEY = ["Convert {} {} to {}.", "How much is {} {} in {}?", "What is {} {} in {}?",
             "Change {} {} into {} please."]  # fmt: skip
PLAIN = [
    ("What is 2+2?", "2 + 2 = 4."), ("What is the capital of France?", "The capital of France is Paris."),
    ("Say hello.", "Hello!"), ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is 5 times 3?", "5 times 3 is 15."), ("How many days are in a week?", "There are 7 days in a week."),
    ("What color is grass?", "Grass is green."), ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("Translate 'thank you' to Spanish.", "Gracias."), ("Name a primary color.", "Red is a primary color."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    ("What is 10 minus 4?", "10 minus 4 is 6."), ("How many legs does a spider have?", "A spider has 8 legs."),
    ("What is the largest planet?", "Jupiter is the largest planet in our solar system."),
    ("What language is spoken in Brazil?", "Portuguese is spoken in Brazil."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Hi, how are you?", "I'm doing well, thank you! How can I help you?"),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What currency does Japan use?", "Japan uses the yen."), ("Which country is Berlin in?", "Berlin is in Germany."),
    ("What is a cloud made of?", "A cloud is made of tiny water droplets."),
]  # fmt: skip
#: held out: a city and questions that no training row holds
HELD_WEATHER, HELD_CITY = "What is the weather in Lisbon?", "Lisbon"
HELD_PLAIN = "Who wrote Hamlet?"


def _call(name: str, args: dict[str, Any], n: int) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"call_{n}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}  # fmt: skip


def _exchange(kind: str, i: int) -> list[dict[str, Any]]:
    """One question and its answer: a call (not followed by its result: with results and the answers
    written from them, "It is 18 °C in Paris.", the model learned to answer weather questions in text
    itself), or plain text."""
    if kind == "weather":
        city = CITIES[i % len(CITIES)]
        ask, call = ASK_WEATHER[i % len(ASK_WEATHER)].format(city), _call("get_weather", {"city": city}, i)
        return [{"role": "user", "content": ask}, call]
    if kind == "money":
        amount, src, dst = MONEY[i % len(MONEY)]
        ask = ASK_MONEY[i % len(ASK_MONEY)].format(amount, src, dst)
        return [{"role": "user", "content": ask},
                _call("convert_currency", {"amount": amount, "from": src, "to": dst}, i)]  # fmt: skip
    q, a = PLAIN[i % len(PLAIN)]
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def conversations(n: int = 24, seed: int = 0) -> list[list[dict[str, Any]]]:
    """``n`` conversations of two or three exchanges, in OpenAI's shape (assistant ``tool_calls``, their
    arguments JSON text). Half the questions need a tool (two in three the
    weather, one a conversion) and half none; every conversation holds both kinds, and half of them open
    with each."""
    rng = random.Random(seed)
    counts = {"weather": 0, "money": 0, "plain": 0}
    out = []
    for r in range(n):
        tool = ["weather", "money", "weather"][(r // 2) % 3]
        kinds = [tool, "plain"] if r % 2 == 0 else ["plain", tool]
        if rng.random() < 0.5:
            kinds.append(rng.choice(["weather", "money", "plain", "plain"]))
        conv: list[dict[str, Any]] = []
        for k in kinds:
            conv += _exchange(k, counts[k])
            counts[k] += 1
        out.append(conv)
    return out


def _ask(client: Any, question: str, stream: bool) -> tuple[str | None, str | None, list[tuple[str, str]]]:
    """(finish reason, content, [(name, arguments)]) of one answer, whole or joined from its stream."""
    kw: dict[str, Any] = {"model": "tool-user", "messages": [{"role": "user", "content": question}],
                          "tools": TOOLS, "tool_choice": "auto", "temperature": 0, "max_tokens": 48}  # fmt: skip
    if not stream:
        c = client.chat.completions.create(**kw).choices[0]
        calls = [(t.function.name, t.function.arguments) for t in c.message.tool_calls or []]
        return c.finish_reason, c.message.content or None, calls
    with client.chat.completions.stream(**kw) as s:
        for _ in s:
            pass
        c = s.get_final_completion().choices[0]
    calls = [(t.function.name, t.function.arguments) for t in c.message.tool_calls or []]
    return c.finish_reason, c.message.content or None, calls


def test_a_trained_adapter_chooses_its_tool(tmp_path: Path, smollm2_checkpoint: Path) -> None:
    pytest.importorskip("openai")
    pytest.importorskip("llguidance")
    from test_serve_v1 import Server
    from transformers import AutoTokenizer

    began = time.monotonic()
    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    convs = conversations()
    assert sum(c[1].get("tool_calls") is not None for c in convs) >= len(convs) // 3  # calls open rows too
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps({"tools": TOOLS, "messages": c}) + "\n" for c in convs))
    # what is trained is what is served: each assistant turn is learned right after the server's prompt
    rows, kind, _ = read_rows(data, max_length=640)
    encoded = encode_rows(tok, rows, kind, max_length=640, path=data)
    for (_, row), (ids, labels) in zip(rows, encoded, strict=True):
        msgs, tools = chat_row(row)
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                prompt = chat_prompt(tok, msgs[:i], tools)
                assert ids[: len(prompt)] == prompt
                assert labels[len(prompt) - 1] == -100 and labels[len(prompt)] == ids[len(prompt)]

    hub = Hub(tmp_path / "home")
    hub.add_base(smollm2_checkpoint, name="smollm2")
    top = [f"model.layers.{n}.{p}" for n in range(18, 30) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]  # fmt: skip
    amx = Path("/proc/cpuinfo").is_file() and "amx_bf16" in Path("/proc/cpuinfo").read_text()
    result = hub.train("smollm2", data, name="tool-user", steps=16, lr=4e-3, rank=8, alpha=16, batch_size=4,
                       max_length=640, targets=top, bf16=amx, seed=0)  # fmt: skip
    hub.close()
    trained = time.monotonic()
    print(f"\ntraining: {result.seconds:.1f} s, {result.tokens} tokens, loss {result.first_loss:.3f} -> "
          f"{result.last_loss:.3f}, bf16={amx}")  # fmt: skip

    s = Server(tmp_path / "home", "smollm2")
    try:
        client = s.client()
        answers = {stream: (_ask(client, HELD_WEATHER, stream), _ask(client, HELD_PLAIN, stream))
                   for stream in (False, True)}  # fmt: skip
    finally:
        s.close()
    for stream, ((finish, content, calls), plain) in answers.items():
        assert finish == "tool_calls" and not content and len(calls) == 1, (stream, content, calls)
        (name, args), = calls  # fmt: skip
        assert name == "get_weather" and json.loads(args) == {"city": HELD_CITY}, (stream, calls)
        finish, content, calls = plain
        assert finish == "stop" and not calls and "Shakespeare" in (content or ""), (stream, plain)
    assert answers[True] == answers[False]  # streamed and whole agree
    print(f"serving: {time.monotonic() - trained:.1f} s; whole test: {time.monotonic() - began:.1f} s")
