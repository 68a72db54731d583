"""Validation against bases and between adapters, with mismatches built by transformers + PEFT."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from adapterhub import Hub

LLAMA = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)


def llama(**over: int) -> LlamaForCausalLM:
    from helpers.models import tiny_llama

    return tiny_llama(0, spread=False, **{**LLAMA, **over})


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16))


def save_adapter(model: torch.nn.Module, dest: Path, **cfg: object) -> Path:
    pm = get_peft_model(model, LoraConfig(**cfg))  # type: ignore[arg-type]
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    pm.save_pretrained(str(dest))
    return dest


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("validate")
    llama().save_pretrained(str(root / "llama"))
    llama(hidden_size=48, intermediate_size=64).save_pretrained(str(root / "llama-wide"))
    gpt2().save_pretrained(str(root / "gpt2"))
    out = {"llama": root / "llama", "llama-wide": root / "llama-wide", "gpt2": root / "gpt2"}
    out["ad"] = save_adapter(llama(), root / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    big = llama()
    big.resize_token_embeddings(65)
    out["vocab"] = save_adapter(big, root / "vocab", r=4, target_modules=["q_proj", "embed_tokens"])
    out["conv1d"] = save_adapter(
        gpt2(), root / "conv1d", r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True
    )
    out["dora1"] = save_adapter(llama(), root / "dora1", r=4, target_modules=["v_proj"], use_dora=True)
    out["dora2"] = save_adapter(
        llama(), root / "dora2", r=2, target_modules=["v_proj", "q_proj"], use_dora=True
    )
    out["pattern"] = save_adapter(
        llama(),
        root / "pattern",
        r=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"q_proj": 32},
    )
    out["mts1"] = save_adapter(
        llama(), root / "mts1", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    out["mts2"] = save_adapter(
        llama(), root / "mts2", r=4, target_modules=["v_proj"], modules_to_save=["lm_head"]
    )
    out["bias"] = save_adapter(llama(), root / "bias", r=4, target_modules=["q_proj"], lora_bias=True)
    return out


@pytest.fixture
def hub(tmp_path: Path):  # type: ignore[no-untyped-def]
    with Hub(tmp_path / "home") as h:
        yield h


def errors(report) -> list[tuple[str, str | None]]:  # type: ignore[no-untyped-def]
    return [(c.check, c.module) for c in report.checks if c.status == "error"]


def test_compatible_adapter_passes(hub: Hub, world: dict[str, Path]) -> None:
    hub.add_base(world["llama"], name="tiny-llama")
    hub.add_adapter(world["ad"], base="tiny-llama")
    report = hub.validate("ad", base="tiny-llama")
    assert report.ok and report.base == "tiny-llama"
    assert [c.check for c in report.checks] == ["store", "integrity", "base"]
    assert report.checks[-1].message == "all 4 targets fit base tiny-llama"
    # a path works the same, and so does a base folder that is not registered
    assert hub.validate(world["ad"], base=world["llama"]).ok


def test_base_with_another_hidden_size(hub: Hub, world: dict[str, Path]) -> None:
    report = hub.validate(world["ad"], base=world["llama-wide"])
    assert not report.ok
    assert sorted(errors(report)) == sorted(
        ("base.shape", f"model.layers.{i}.self_attn.{p}_proj") for i in range(2) for p in "qv"
    )
    msg = next(c.message for c in report.checks if c.status == "error")
    assert "the adapter's update has shape [32, 32] but the base weight is [48, 48]" in msg


def test_resized_vocabulary_is_named_as_such(hub: Hub, world: dict[str, Path]) -> None:
    report = hub.validate(world["vocab"], base=world["llama"])
    vocab = [c for c in report.checks if c.check == "base.vocab"]
    assert vocab and all(c.module == "model.embed_tokens" for c in vocab)
    assert "the classic added-tokens mismatch (65 vs 64)" in vocab[0].message
    assert "resize_token_embeddings(65)" in vocab[0].message


def test_gpt2_conv1d_orientation(hub: Hub, world: dict[str, Path], tmp_path: Path) -> None:
    assert hub.validate(world["conv1d"], base=world["gpt2"]).ok
    # without model_type the square attn.c_proj (32 x 32) cannot be oriented: refused, not guessed ...
    blind = tmp_path / "gpt2-blind"
    blind.mkdir()
    for f in world["gpt2"].iterdir():
        (blind / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((blind / "config.json").read_text())
    del cfg["model_type"]
    (blind / "config.json").write_text(json.dumps(cfg))
    cfg_a = json.loads((world["conv1d"] / "adapter_config.json").read_text())
    assert cfg_a["fan_in_fan_out"] is True
    # ... unless the adapter's config says fan_in_fan_out, which decides it
    assert hub.validate(world["conv1d"], base=blind).ok
    ad = tmp_path / "conv1d-nofan"
    ad.mkdir()
    for f in world["conv1d"].iterdir():
        (ad / f.name).write_bytes(f.read_bytes())
    cfg_a["fan_in_fan_out"] = False
    (ad / "adapter_config.json").write_text(json.dumps(cfg_a))
    report = hub.validate(ad, base=blind)
    assert sorted(errors(report)) == [("base.shape", f"transformer.h.{i}.attn.c_proj") for i in range(2)]
    assert "cannot tell whether the square base weight [32, 32]" in report.errors[0].message


def test_dora_and_modules_to_save_conflicts(hub: Hub, world: dict[str, Path]) -> None:
    report = hub.validate(world["dora1"], with_=[str(world["dora2"])])
    assert errors(report) == [("together.dora", f"model.layers.{i}.self_attn.v_proj") for i in range(2)]
    assert any(c.check == "together.rank" and "ranks differ (4 vs 2)" in c.message for c in report.checks)
    report = hub.validate(world["mts1"], with_=[str(world["mts2"])])
    assert errors(report) == [("together.modules_to_save", "lm_head")]
    assert any(c.check == "together.overlap" and c.status == "warning" for c in report.checks)
    assert hub.validate(world["ad"], with_=[str(world["pattern"])]).ok


def test_registered_fingerprints_decide_same_base(hub: Hub, world: dict[str, Path]) -> None:
    hub.add_base(world["llama"], name="tiny-llama")
    hub.add_base(world["llama-wide"], name="wide-llama")
    hub.add_adapter(world["ad"], base="tiny-llama")
    hub.add_adapter(world["pattern"], base="wide-llama")
    report = hub.validate("ad", with_=["pattern"])
    assert ("together.base", None) in errors(report)


def test_patterns_and_bias_and_declared_name(hub: Hub, world: dict[str, Path]) -> None:
    hub.add_base(world["llama"], name="tiny-llama")
    hub.add_adapter(world["pattern"], base="some/other-model")
    report = hub.validate("pattern", base="tiny-llama")
    assert report.ok
    assert [c.check for c in report.warnings] == ["base.name"]
    assert "'some/other-model'" in report.warnings[0].message
    report = hub.validate(world["bias"], base="tiny-llama")
    assert report.ok and {c.check for c in report.warnings} == {"base.bias"}


def _hostile(
    tmp_path: Path, world: dict[str, Path], name: str, tensors: dict[str, torch.Tensor], **cfg: object
) -> Path:
    d = tmp_path / name
    d.mkdir()
    config = json.loads((world["ad"] / "adapter_config.json").read_text())
    config.update(cfg)
    (d / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


PRE = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("case", "tensors", "cfg", "check", "needle"),
    [
        (
            "zero3",
            {f"{PRE}.lora_A.weight": torch.zeros(0), f"{PRE}.lora_B.weight": torch.zeros(0)},
            {},
            "structure",
            "ZeRO-3",
        ),
        (
            "one-d",
            {f"{PRE}.lora_A.weight": torch.zeros(4), f"{PRE}.lora_B.weight": torch.zeros(4)},
            {},
            "structure",
            "at least 2-D",
        ),
        (
            "ranks",
            {f"{PRE}.lora_A.weight": torch.zeros(4, 32), f"{PRE}.lora_B.weight": torch.zeros(32, 3)},
            {},
            "structure",
            "A has rank 4 but B has rank 3",
        ),
        (
            "config-r",
            {f"{PRE}.lora_A.weight": torch.zeros(4, 32), f"{PRE}.lora_B.weight": torch.zeros(32, 4)},
            {"r": 8},
            "structure",
            "the config says r=8 but the tensors have rank 4",
        ),
        ("no-b", {f"{PRE}.lora_A.weight": torch.zeros(4, 32)}, {}, "structure", "has no lora_B factor"),
        (
            "nan",
            {
                f"{PRE}.lora_A.weight": torch.full((4, 32), float("nan")),
                f"{PRE}.lora_B.weight": torch.zeros(32, 4),
            },
            {},
            "values",
            "128 NaN/Inf values",
        ),
        (
            "typed",
            {f"{PRE}.lora_A.weight": torch.zeros(4, 32), f"{PRE}.lora_B.weight": torch.zeros(32, 4)},
            {"lora_alpha": "sixteen"},
            "config",
            "'sixteen' is not of type 'number'",
        ),
        (
            "stray",
            {
                f"{PRE}.lora_A.weight": torch.zeros(4, 32),
                f"{PRE}.lora_B.weight": torch.zeros(32, 4),
                "optimizer.state": torch.zeros(3),
            },
            {},
            "structure",
            "optimizer.state is not part of a LoRA adapter",
        ),
    ],
)
def test_broken_adapters_get_specific_messages(
    hub: Hub,
    world: dict[str, Path],
    tmp_path: Path,
    case: str,
    tensors: dict[str, torch.Tensor],
    cfg: dict[str, object],
    check: str,
    needle: str,
) -> None:
    d = _hostile(tmp_path, world, case, tensors, **cfg)
    before = {p: p.stat().st_mtime_ns for p in d.iterdir()}
    report = hub.validate(d)
    assert not report.ok
    assert any(c.check == check and needle in c.message for c in report.errors), report.to_dict()
    assert {p: p.stat().st_mtime_ns for p in d.iterdir()} == before  # nothing written
    assert hub.list_adapters() == []


def test_truncated_and_pickled_files(hub: Hub, world: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "trunc"
    d.mkdir()
    (d / "adapter_config.json").write_bytes((world["ad"] / "adapter_config.json").read_bytes())
    data = (world["ad"] / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[:-10])
    report = hub.validate(d)
    assert [c.check for c in report.errors] == ["header"] and "truncated" in report.errors[0].message
    p = tmp_path / "pickled"
    p.mkdir()
    (p / "adapter_config.json").write_bytes((world["ad"] / "adapter_config.json").read_bytes())
    torch.save({"x": torch.zeros(1)}, p / "adapter_model.bin")
    report = hub.validate(p)
    assert [c.check for c in report.errors] == ["files"] and "pickle" in report.errors[0].message


def test_catalog_alone_answers_compatibility(hub: Hub, world: dict[str, Path]) -> None:
    hub.add_base(world["llama"], name="tiny-llama")
    for n in ("ad", "vocab", "pattern", "dora1"):
        hub.add_adapter(world[n])
    hub.add_adapter(world["conv1d"])
    for digest in list(hub.store):  # prove no adapter file is opened
        hub.store.remove(digest)
    assert [a.name for a in hub.list_adapters(compatible_with="tiny-llama")] == ["ad", "dora1", "pattern"]
    reports = {r.subject: r for r in hub.validate_catalog(base="tiny-llama")}
    assert not reports["vocab"].ok and not reports["conv1d"].ok
    assert {c.check for c in reports["vocab"].errors} == {"base.vocab"}
    assert {c.check for c in reports["conv1d"].errors} == {"base.target"}
    # the store damage itself is what a full validate reports
    assert [c.check for c in hub.validate("ad").errors] == ["store", "store"]


def test_base_registry(hub: Hub, world: dict[str, Path]) -> None:
    from adapterhub import BaseModelError

    info = hub.add_base(world["llama"], name="tiny-llama")
    assert info.model_type == "llama" and info.architectures == ("LlamaForCausalLM",)
    assert info.num_tensors == 21 and info.dtype == "F32"
    copy = hub.add_base(world["llama"], name="tiny-copy")
    assert copy.fingerprint == info.fingerprint
    with pytest.raises(BaseModelError, match="already registered"):
        hub.add_base(world["llama"], name="tiny-llama")
    hub.add_adapter(world["ad"], base="tiny-llama")
    assert hub.base_info("tiny-llama").num_adapters == 1
    hub.remove_base("tiny-copy")
    assert [b.name for b in hub.list_bases()] == ["tiny-llama"]
    with pytest.raises(BaseModelError, match="no base model named 'nope'"):
        hub.base_info("nope")
    with pytest.raises(BaseModelError, match="neither a registered base model nor a checkpoint folder"):
        hub.validate("ad", base="nope")
