"""Real clients against a real server on 127.0.0.1 (tests/_serve_launcher.py on the tiny random Llama of
test_serve_v1): the ``openai`` client (logprobs, n, streaming with usage, echo), lm-eval 0.4.13's
``local-completions`` on two tasks defined here (their own JSONL: a multiple-choice loglikelihood task and
a ``generate_until`` task) with every answer equal to transformers in-process, and langchain-openai's
``ChatOpenAI`` (plain, streaming)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_serve_v1 import Server, _adapter, _tiny_base

from adapterhub import Hub

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("clients")
    hub = Hub(root / "home")
    base = _tiny_base(root / "tiny")
    hub.add_base(base, name="tiny")
    hub.add_adapter(_adapter(base, root / "a0", seed=10, targets=("q_proj", "v_proj")), name="a0")
    hub.close()
    server = Server(root / "home", "tiny")
    yield {"server": server, "base": base, "root": root}
    server.close()


def _model(e: dict[str, Any]) -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(e["base"], dtype=torch.float32).eval()


def test_openai_client_logprobs_n_and_streaming_usage(srv: dict[str, Any]) -> None:
    client = srv["server"].client()
    msgs = [{"role": "user", "content": "what is a sql query"}]
    r = client.chat.completions.create(
        model="a0", messages=msgs, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2, n=2
    )
    assert len(r.choices) == 2 and r.choices[0].message.content == r.choices[1].message.content
    content = r.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert abs(content[0].top_logprobs[0].logprob - max(t.logprob for t in content[0].top_logprobs)) < 1e-9
    chunks = list(
        client.chat.completions.create(
            model="a0",
            messages=msgs,
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            logprobs=True,
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    streamed = [
        t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content
    ]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content])
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens // 2
    )
    c = client.completions.create(
        model="tiny", prompt=[[6, 7, 8], [9, 10]], max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    assert [ch.index for ch in c.choices] == [0, 1] and c.choices[0].logprobs.token_logprobs[0] is None
    assert len(c.choices[0].logprobs.tokens) == 4 and len(c.choices[1].logprobs.top_logprobs) == 3


def _tasks(folder: Path) -> Path:
    """Two lm-eval tasks over JSONL files written here."""
    folder.mkdir(exist_ok=True)
    mc = [
        {"question": "what is a", "choices": ["sql query", "pirate ship", "red"], "answer": 0},
        {"question": "hello", "choices": ["world", "sea", "blue green"], "answer": 1},
        {"question": "the model", "choices": ["is fast", "is slow"], "answer": 0},
    ]
    gen = [
        {"question": "what is a sql query", "answer": "select"},
        {"question": "hello world", "answer": "the"},
    ]
    for name, rows in (("mc", mc), ("gen", gen)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"
    )
    (folder / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['green']\n  max_gen_toks: 6\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return folder


def test_lm_eval_local_completions_equals_transformers(srv: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    url = srv["server"].url
    args = (
        f"model=tiny,base_url={url}/v1/completions,tokenizer={srv['base']},tokenizer_backend=huggingface,"
        "num_concurrent=1,max_retries=1,tokenized_requests=True"
    )
    out = simple_evaluate(
        model="local-completions",
        model_args=args,
        tasks=["tiny_mc", "tiny_gen"],
        task_manager=TaskManager(include_path=str(_tasks(tmp_path / "tasks"))),
        log_samples=True,
        limit=None,
    )
    assert out is not None
    tok = AutoTokenizer.from_pretrained(srv["base"])
    model = _model(srv)
    correct = 0
    for s in out["samples"]["tiny_mc"]:
        ctx = tok(s["doc"]["question"])["input_ids"]
        scores = []
        for choice, resp in zip(s["doc"]["choices"], s["filtered_resps"], strict=True):
            cont = tok(" " + choice)["input_ids"]
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
            want = sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
            greedy = all(int(lp[len(ctx) - 1 + i].argmax()) == t for i, t in enumerate(cont))
            assert abs(float(resp[0]) - want) < 1e-4 and bool(resp[1]) == greedy
            scores.append(want)
        correct += int(max(range(len(scores)), key=scores.__getitem__) == s["doc"]["answer"])
    assert out["results"]["tiny_mc"]["acc,none"] == pytest.approx(correct / 3)
    for s in out["samples"]["tiny_gen"]:
        ids = tok(s["doc"]["question"])["input_ids"]
        g = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=2,
        )
        text = tok.decode(g[0, len(ids) :], skip_special_tokens=True)
        want = text.split("green")[0]
        assert s["resps"][0][0] == want


def test_langchain_chat_openai(srv: dict[str, Any]) -> None:
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model="a0",
        base_url=srv["server"].url + "/v1",
        api_key="EMPTY",
        temperature=0,
        max_tokens=6,
        max_retries=0,
    )
    direct = (
        srv["server"]
        .client()
        .chat.completions.create(
            model="a0", messages=[{"role": "user", "content": "hello world"}], max_tokens=6, temperature=0
        )
    )
    assert llm.invoke("hello world").content == direct.choices[0].message.content
    streamed = "".join(str(ch.content) for ch in llm.stream("hello world"))
    assert streamed == direct.choices[0].message.content
