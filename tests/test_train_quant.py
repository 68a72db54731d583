"""QLoRA: a base quantized through bitsandbytes (NF4 / int8) trains, runs from the CLI and the API, and
the lineage records the quantization; the memory plan (and ``--dry-run``) on paper."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.cli import Cli
from helpers.trainkit import jsonl, text_rows, tiny_base

from adapterhub import Hub
from adapterhub.services.train_plan import memory_plan

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    root = tmp_path_factory.mktemp("quant")
    h = Hub(root / "home")
    h.add_base(tiny_base(root / "tiny", hidden_size=64, intermediate_size=128), name="tiny")
    yield h
    h.close()


def test_65b_with_nf4_plans_about_48_gb_as_the_qlora_paper() -> None:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        hidden_size=8192,
        intermediate_size=22016,
        num_hidden_layers=80,
        num_attention_heads=64,
        vocab_size=32000,
        max_position_embeddings=2048,
        dtype="float16",
    )
    plan = memory_plan(
        cfg,
        targets="all-linear",
        rank=64,
        quantize="nf4",
        micro_batch=1,
        max_length=512,
        gradient_checkpointing=True,
        device="cpu",
    )
    assert 65.0e9 < plan.base_params < 65.5e9
    assert plan.base == pytest.approx(34.46e9, rel=0.01)  # 4.127 bits a linear weight, the rest in bf16
    assert 44e9 < plan.total < 50e9  # "from >780GB of GPU memory to <48GB"
    full = memory_plan(cfg, targets="all-linear", rank=64, device="cpu", gradient_checkpointing=True)
    assert full.base == 2 * full.base_params  # fp16 weights
    assert plan.base < 0.27 * full.base


def test_dry_run_prints_only_the_plan(hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = jsonl(tmp_path / "t.jsonl", text_rows(4))
    cli = Cli(hub.home, capsys)
    out = cli("train", "tiny", "--data", str(data), "--name", "dry", "--quantize", "nf4", "--dry-run")
    assert out.startswith("base weights") and "nf4" in out and "total" in out and "this plan fits" in out
    doc = json.loads(cli("train", "tiny", "--data", str(data), "--name", "dry", "--dry-run", "--json"))
    assert doc["total"] == sum(doc[k] for k in ("base", "adapter", "gradients", "optimizer", "activations"))
    assert not hub.library.exists("dry") and not (hub.home / "training" / "dry").exists()


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_qlora_trains_from_the_cli_and_records_the_quantization(
    hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str], quantize: str
) -> None:
    data = jsonl(tmp_path / "t.jsonl", text_rows(8))
    cli = Cli(hub.home, capsys)
    name = f"q-{quantize}"
    doc = json.loads(
        cli(
            "train",
            "tiny",
            "--data",
            str(data),
            "--name",
            name,
            "--steps",
            "4",
            "--lr",
            "1e-2",
            "--quantize",
            quantize,
            "--targets",
            "all-linear",
            "--json",
        )
    )
    assert doc["last_loss"] < doc["first_loss"]
    assert '"plan"' in cli.err and quantize in cli.err
    params = hub.adapter_info(name).parents[0].params
    assert params["quantize"] == quantize
    assert hub.validate(name, base="tiny").ok  # factors in the full-precision shapes, not the packed ones


def test_load_base_quantized_and_run_from_the_cli(hub: Hub, capsys: pytest.CaptureFixture[str]) -> None:
    import bitsandbytes as bnb

    model, tok = hub.load_base("tiny", device="cpu", quantize="nf4")
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.numel() * 2 == q.in_features * q.out_features
    assert tok is not None and model.lm_head.weight.dtype.itemsize == 2
    cli = Cli(hub.home, capsys)
    doc = json.loads(
        cli("run", "tiny", "hello", "--quantize", "nf4", "--device", "cpu", "--max-tokens", "3", "--json")
    )
    assert doc["text"] is not None


@pytest.mark.parametrize("quantize", ["nf4", "nf4-all"])
def test_an_adapter_runs_and_serves_on_a_quantized_base(hub: Hub, tmp_path: Path, quantize: str) -> None:
    """QLoRA's other half: a cataloged adapter on the NF4 base answers from ``run --quantize`` (the API)
    and from ``serve --model --quantize`` (the /v1 API), the same greedy tokens (also with the embeddings
    quantized: ``nf4-all``)."""
    import os
    import subprocess
    import sys
    import urllib.request

    from helpers.models import make_adapter
    from transformers import AutoModelForCausalLM

    base = hub.base_info("tiny").path
    made = make_adapter(
        AutoModelForCausalLM.from_pretrained(base),
        tmp_path / "qa",
        r=4,
        target_modules=["q_proj", "v_proj", "down_proj"],
        seed=3,
    )
    name = f"served-on-{quantize}"
    hub.add_adapter(made, name=name)
    want = hub.generate(
        "tiny", "hello world", adapters=[(name, 1.0)], quantize=quantize, device="cpu", max_tokens=4
    )
    env = {k: v for k, v in os.environ.items() if k not in ("ADAPTERHUB_HOME", "ADAPTERHUB_DB")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "adapterhub",
            "--home",
            str(hub.home),
            "serve",
            "--port",
            "0",
            "--model",
            "tiny",
            "--quantize",
            quantize,
            "--device",
            "cpu",
            # the batching path rounds as generate does (the batch-invariant steps use their own attention
            # and batch sizes, so a near tie of this random model may go the other way)
            "--no-batch-invariant",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert " on http" in line, proc.stderr.read() if proc.stderr else line
        url = line.split(" on ")[1].split()[0]
        body = {
            "model": name,
            "messages": [{"role": "user", "content": "hello world"}],
            "max_tokens": 4,
            "temperature": 0,
        }
        req = urllib.request.Request(
            url + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            got = json.loads(r.read())
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert got["choices"][0]["message"]["content"] == want.text
