"""`validate --for vllm`: what vLLM's LoRA loader would refuse, told before deploying."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from helpers.cli import Cli
from helpers.models import make_adapter, save_model, tiny_llama

from adapterhub import Hub
from adapterhub.errors import InvalidOptionError
from adapterhub.lora import LoraModule, LoraWeights
from adapterhub.ops.targets_vllm import check_vllm
from adapterhub.ops.validate import BaseLayout


def _weights(
    rank: int = 8, *, modules: tuple[str, ...] = ("q_proj",), fmt: str = "peft", **cfg: object
) -> LoraWeights:
    mods = {}
    for short in modules:
        key = f"model.layers.0.self_attn.{short}.weight"
        mods[key] = LoraModule(key, "linear", rank, 16.0, 16.0 / rank, (rank, 32), (32, rank))
    return LoraWeights(modules=mods, format=fmt, config=dict(cfg))


def _by(checks: list, name: str) -> list:
    return [c for c in checks if c.check == name]


def test_rank_rules() -> None:
    ok = check_vllm(_weights(16))
    assert [c.status for c in _by(ok, "vllm.rank")] == ["ok"]
    assert _by(ok, "vllm")[0].status == "ok"
    (w,) = _by(check_vllm(_weights(32)), "vllm.rank")
    assert (
        w.status == "warning"
        and "--max-lora-rank 32" in w.message
        and "default max_lora_rank 16" in w.message
    )
    (e,) = _by(check_vllm(_weights(48), max_lora_rank=32), "vllm.rank")
    assert e.status == "error"
    assert "LoRA rank 48 is greater than max_lora_rank 32" in e.message and "--max-lora-rank 64" in e.message
    (big,) = _by(check_vllm(_weights(600), max_lora_rank=512), "vllm.rank")
    assert big.status == "error" and "at most 512" in big.message
    odd = _by(check_vllm(_weights(8), max_lora_rank=24), "vllm.rank")
    assert [c.status for c in odd] == ["warning", "ok"] and "1, 8, 16, 32" in odd[0].message


def test_feature_rules() -> None:
    checks = check_vllm(_weights(8, modules_to_save=["lm_head"], bias="all"))
    assert "vLLM only supports modules_to_save being None" in _by(checks, "vllm.modules_to_save")[0].message
    assert "Adapter bias is not supported" in _by(checks, "vllm.bias")[0].message
    assert not _by(checks, "vllm")
    w = _weights(8)
    m = next(iter(w.modules.values()))
    m.magnitude_shape = (32,)
    m.bias_shape = (32,)
    checks = check_vllm(w)
    assert "does not yet support DoRA" in _by(checks, "vllm.dora")[0].message
    assert "lora_B.bias is unsupported LoRA weight" in _by(checks, "vllm.bias")[0].message


def test_target_rules() -> None:
    llama = BaseLayout(name="b", shapes={}, model_type="llama", config={"vocab_size": 64})
    w = _weights(8, modules=("q_proj", "rotary"))
    (e,) = _by(check_vllm(w, base=llama), "vllm.target")
    assert e.status == "error" and "expected target modules in" in e.message and "rotary" in e.message
    assert not _by(check_vllm(w), "vllm.target")  # unknown model type: vLLM adapts any linear layer
    emb = LoraWeights(
        modules={
            "model.embed_tokens.weight": LoraModule(
                "model.embed_tokens.weight", "embedding", 4, 4.0, 1.0, (4, 32), (65, 4)
            )
        },
        format="peft",
    )
    (e,) = _by(check_vllm(emb, base=llama), "vllm.embedding")
    assert (
        e.status == "error" and "embedding LoRA size(65)" in e.message and "vocabulary size(64)" in e.message
    )
    (w,) = _by(check_vllm(emb), "vllm.embedding")
    assert w.status == "warning"
    conv = LoraWeights(
        modules={"conv.weight": LoraModule("conv.weight", "conv", 4, 4.0, 1.0, (4, 3, 3, 3), (8, 4, 1, 1))},
        format="peft",
    )
    assert _by(check_vllm(conv), "vllm.target")[0].status == "error"
    assert _by(check_vllm(_weights(8, fmt="kohya")), "vllm.format")[0].status == "error"
    assert _by(check_vllm(_weights(8, fmt="gguf")), "vllm.format")[0].status == "warning"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm")
    model = tiny_llama()
    save_model(model, root / "llama")
    return {
        "llama": root / "llama",
        "good": make_adapter(model, root / "good", r=4),
        "r32": make_adapter(model, root / "r32", r=32),
        "dora": make_adapter(model, root / "dora", r=4, use_dora=True),
        "mts": make_adapter(model, root / "mts", r=4, modules_to_save=["lm_head"]),
        "lbias": make_adapter(model, root / "lbias", r=4, lora_bias=True),
    }


def test_hub_validate_for_vllm(tmp_path: Path, world: dict[str, Path]) -> None:
    hub = Hub(tmp_path / "home")
    hub.add_base(world["llama"], name="tiny")
    for name in ("good", "r32", "dora", "mts", "lbias"):
        hub.add_adapter(world[name], name=name)
    assert hub.validate("good", for_="vllm").ok
    assert not any(c.check.startswith("vllm") for c in hub.validate("good").checks)
    r32 = hub.validate("r32", for_="vllm")
    assert r32.ok and _by(list(r32.checks), "vllm.rank")[0].status == "warning"
    assert not hub.validate("r32", for_="vllm", max_lora_rank=16).ok
    assert hub.validate("r32", for_="vllm", max_lora_rank=32, base="tiny").ok
    for name, check in (("dora", "vllm.dora"), ("mts", "vllm.modules_to_save"), ("lbias", "vllm.bias")):
        report = hub.validate(name, for_="vllm")
        assert not report.ok and any(c.check == check for c in report.errors), name
    with pytest.raises(InvalidOptionError, match="unknown serving target 'tgi'"):
        hub.validate("good", for_="tgi")
    with pytest.raises(InvalidOptionError, match="max_lora_rank"):
        hub.validate("good", max_lora_rank=8)


def test_cli_validate_for_vllm(
    tmp_path: Path, world: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cli = Cli(tmp_path / "home", capsys)
    cli("add", str(world["r32"]), "--name", "r32")
    doc = json.loads(cli("validate", "r32", "--for", "vllm", "--max-lora-rank", "16", "--json", code=1))
    (rank,) = [c for c in doc["checks"] if c["check"] == "vllm.rank"]
    assert rank["status"] == "error" and "greater than max_lora_rank 16" in rank["message"]
    out = cli("validate", "r32", "--for", "vllm", "--max-lora-rank", "32")
    assert "vllm.rank" in out
    cli("validate", "r32", "--max-lora-rank", "32", code=2)
    assert "--max-lora-rank needs --for vllm" in cli.err
