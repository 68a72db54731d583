"""The OpenAI API whole, in process (`fastapi.testclient` on the app of test_serve_strict): log-probabilities
equal ``log_softmax`` of transformers' / PEFT's fp32 logits, ``echo`` with token-id prompts (what lm-eval's
loglikelihood sends), ``n``, lists of prompts, the sampling extras, and vLLM's companion routes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_serve_strict import MSG, _chat, env  # noqa: F401  (the module's app)

from adapterhub.server.tokens import create_token

pytest.importorskip("fastapi")


def _oracle(e: dict[str, Any], ids: list[int], adapter: str | None = None) -> torch.Tensor:
    """log_softmax of the fp32 logits of transformers (with PEFT for ``adapter``) over ``ids``: (len, V)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(e["base"], dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, e["root"] / adapter)
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def test_echo_logprobs_of_token_prompts_equal_transformers(env: dict[str, Any]) -> None:  # noqa: F811
    c = env["c"]
    prompts = [[6, 7, 8, 9, 10, 11], [12, 13, 14]]
    for model, adapter in (("tiny", None), ("a0", "a0")):
        r = c.post(
            "/v1/completions",
            json={
                "model": model,
                "prompt": prompts,
                "temperature": 0,
                "max_tokens": 1,
                "logprobs": 1,
                "echo": True,
                "seed": 1234,
            },
        )
        assert r.status_code == 200, r.text
        choices = sorted(r.json()["choices"], key=lambda ch: ch["index"])
        assert [ch["index"] for ch in choices] == [0, 1]
        for ids, ch in zip(prompts, choices, strict=True):
            lp = ch["logprobs"]
            ref = _oracle(env, ids, adapter)
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            assert len(lp["tokens"]) == len(ids) + 1 == len(lp["token_logprobs"]) == len(lp["text_offset"])
            for t in range(1, len(ids)):
                assert abs(lp["token_logprobs"][t] - float(ref[t - 1, ids[t]])) < 1e-4
                (best,) = lp["top_logprobs"][t].values()
                assert abs(best - float(ref[t - 1].max())) < 1e-4
            generated = int(ref[-1].argmax())
            assert abs(lp["token_logprobs"][-1] - float(ref[-1, generated])) < 1e-4


def test_chat_logprobs_and_top_logprobs_equal_transformers(env: dict[str, Any]) -> None:  # noqa: F811
    from adapterhub.runtime.generate import chat_ids

    c = env["c"]
    r = _chat(c, "a0", logprobs=True, top_logprobs=3, max_tokens=4)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(env["base"])
    prompt = chat_ids(tok, MSG)
    gen = [tok.convert_tokens_to_ids(e["token"].strip()) for e in content]
    ref = _oracle(env, prompt + gen, "a0")
    for k, e in enumerate(content):
        row = ref[len(prompt) - 1 + k]
        assert abs(e["logprob"] - float(row[gen[k]])) < 1e-4 and e["bytes"] == list(e["token"].encode())
        assert len(e["top_logprobs"]) == 3
        assert abs(e["top_logprobs"][0]["logprob"] - float(row.max())) < 1e-4
    plain = _chat(c, "a0", max_tokens=4).json()["choices"][0]
    assert (
        plain["logprobs"] is None
        and plain["message"]["content"] == r.json()["choices"][0]["message"]["content"]
    )


def test_n_and_lists_of_prompts(env: dict[str, Any]) -> None:  # noqa: F811
    c = env["c"]
    r = _chat(c, "tiny", n=3, temperature=1.0, seed=7, max_tokens=6).json()
    assert [ch["index"] for ch in r["choices"]] == [0, 1, 2]
    again = _chat(c, "tiny", n=3, temperature=1.0, seed=7, max_tokens=6).json()
    assert [ch["message"]["content"] for ch in r["choices"]] == [
        ch["message"]["content"] for ch in again["choices"]
    ]
    greedy = _chat(c, "tiny", n=2).json()
    assert greedy["choices"][0]["message"] == greedy["choices"][1]["message"]
    single = [
        c.post("/v1/completions", json={"model": "a0", "prompt": p, "max_tokens": 4, "temperature": 0}).json()
        for p in ("hello world", "the sql query")
    ]
    both = c.post(
        "/v1/completions",
        json={
            "model": "a0",
            "prompt": ["hello world", "the sql query"],
            "n": 2,
            "max_tokens": 4,
            "temperature": 0,
        },
    ).json()
    assert [ch["text"] for ch in both["choices"]] == [single[0]["choices"][0]["text"]] * 2 + [
        single[1]["choices"][0]["text"]
    ] * 2
    assert (
        both["usage"]["prompt_tokens"]
        == single[0]["usage"]["prompt_tokens"] + single[1]["usage"]["prompt_tokens"]
    )


def test_sampling_extras(env: dict[str, Any]) -> None:  # noqa: F811
    from transformers import AutoTokenizer, LlamaForCausalLM

    c = env["c"]
    tok = AutoTokenizer.from_pretrained(env["base"])
    ids = tok("what is a sql query")["input_ids"]
    model = LlamaForCausalLM.from_pretrained(env["base"], dtype=torch.float32)

    def hf(**kw: Any) -> str:
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=2,
            **kw,
        )
        return str(tok.decode(out[0, len(ids) :], skip_special_tokens=True))

    def ours(**kw: Any) -> str:
        r = c.post(
            "/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 8, "temperature": 0, **kw}
        )
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["text"])

    assert ours(repetition_penalty=1.8) == hf(repetition_penalty=1.8)
    assert ours(logit_bias={"20": 100}) == " ".join(["sql"] * 8).replace("sql", tok.decode([20]))
    assert ours(top_k=1, temperature=1.0, seed=3) == ours() == ours(min_p=1.0, temperature=1.0, seed=4)
    assert ours(frequency_penalty=2.0) != ours() or ours(presence_penalty=2.0) != ours()


def test_companion_routes(env: dict[str, Any]) -> None:  # noqa: F811
    c = env["c"]
    assert c.get("/health").status_code == 200 and "version" in c.get("/version").json()
    t = c.post("/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()
    assert t["count"] == len(t["tokens"]) == 2 and t["max_model_len"] == 512
    assert c.post("/detokenize", json={"tokens": t["tokens"]}).json()["prompt"] == "hello world"
    assert c.post("/v1/tokenize", json={"prompt": "hello world"}).json()["tokens"] == t["tokens"]
    assert c.post("/detokenize", json={"tokens": [10**6]}).status_code == 400
    assert c.post("/tokenize", json={"messages": MSG}).json()["count"] > 2
    assert c.get("/tokenizer_info").json()["eos_token"] == "</s>"
    row = c.get("/v1/models/a0:0.5+twin:0.5").json()
    assert row["parent"] == "tiny" and row["max_model_len"] == 512 and len(row["adapterhub"]["adapters"]) == 2
    assert c.get("/v1/models/alice/secret").status_code == 404
    rows = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert rows["a0"]["max_model_len"] == 512 and rows["a0"]["adapterhub"]["adapters"][0]["rank"] == 4
    assert set(rows["a0"]["adapterhub"]["adapters"][0]["targets"]) == {"q_proj", "v_proj"}


def test_load_and_unload_lora_adapter_need_a_writer_of_the_namespace(env: dict[str, Any]) -> None:  # noqa: F811
    c, hub = env["c"], env["hub"]
    writer = {"Authorization": f"Bearer {create_token(hub, 'carol', write=True).token}"}
    body = {"lora_name": "carol/new", "lora_path": str(env["root"] / "a0")}
    assert c.post("/v1/load_lora_adapter", json=body).status_code == 401
    assert c.post("/v1/load_lora_adapter", json=body, headers=env["bob"]).status_code == 403
    for name in ("dave/x", "new", "a0"):
        r = c.post(
            "/v1/load_lora_adapter", json={**body, "lora_name": name, "load_inplace": True}, headers=writer
        )
        assert r.status_code == 403, r.text
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": name}, headers=writer).status_code == 403
    # this server names no --lora-dir, so no local path loads (test_serve_lora_admin: the folders, the swap)
    r = c.post("/v1/load_lora_adapter", json=body, headers=writer)
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    assert not hub.library.exists("carol/new") and hub.library.exists("a0")
    r = c.post("/v1/unload_lora_adapter", json={"lora_name": "carol/new"}, headers=writer)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_active_requests_gauge_returns_to_zero(env: dict[str, Any]) -> None:  # noqa: F811
    import time

    c = env["c"]
    assert _chat(c, "a0", max_tokens=5).status_code == 200
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        line = [
            ln for ln in c.get("/metrics").text.splitlines() if ln.startswith("adapterhub_active_requests ")
        ]
        if line == ["adapterhub_active_requests 0"]:
            return
        time.sleep(0.05)
    raise AssertionError(line)
