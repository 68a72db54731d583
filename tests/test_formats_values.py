"""Data-corruption regressions (issue 15, items 3 and 4): values no adapter can hold are refused at read,
validate, merge and combine, and weights must be what the config says PEFT loads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from helpers.formats_fixtures import kohya_file, peft_linear_tensors, save_peft_tensors
from helpers.models import make_adapter, save_model, tiny_llama
from safetensors.torch import save_file

from adapterhub.errors import (
    IncompatibleAdapterError,
    InvalidAdapterError,
    InvalidConfigError,
)
from adapterhub.formats import check_finite, detect, non_finite, read_adapter
from adapterhub.ops import check_integrity, combine, merge_checkpoint

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

Q0 = "model.layers.0.self_attn.q_proj"
PRE = f"base_model.model.{Q0}"
CFG: dict[str, Any] = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}


def _adapter(
    folder: Path, config: dict[str, Any] | str, tensors: dict[str, torch.Tensor] | None = None
) -> Path:
    save_peft_tensors(folder, tensors or peft_linear_tensors(), {})
    text = config if isinstance(config, str) else json.dumps(config)
    (folder / "adapter_config.json").write_text(text, encoding="utf-8")
    return folder


def _no_leftovers(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


# ------------------------------------------------------------------------------- config values


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e400"])
def test_non_finite_alpha_refused(tmp_path: Path, literal: str) -> None:
    text = json.dumps(CFG).replace('"lora_alpha": 8', f'"lora_alpha": {literal}')
    folder = _adapter(tmp_path / "a", text)
    with pytest.raises(InvalidConfigError, match="lora_alpha is not a finite number") as info:
        read_adapter(folder)
    assert info.value.key == "lora_alpha"
    assert "\n" not in str(info.value)
    checks, weights = check_integrity(detect(folder))
    assert weights is None and checks[0].status == "error" and "lora_alpha" in checks[0].message


def test_non_finite_pattern_alpha_refused(tmp_path: Path) -> None:
    text = json.dumps({**CFG, "alpha_pattern": {"q_proj": 1}}).replace('"q_proj": 1', '"q_proj": NaN')
    with pytest.raises(InvalidConfigError, match="alpha_pattern.q_proj is not a finite number"):
        read_adapter(_adapter(tmp_path / "a", text))


@pytest.mark.parametrize(
    "over, match",
    [
        ({"lora_alpha": 0}, "lora_alpha is 0; .* alpha must be positive"),
        ({"lora_alpha": -16}, "lora_alpha is -16; .* alpha must be positive"),
        ({"alpha_pattern": {"q_proj": -1.5}}, "alpha_pattern.q_proj is -1.5"),
        ({"base_model_name_or_path": "x" * 600}, "600 characters long, over the 512-character limit"),
    ],
)
def test_config_values_refused(tmp_path: Path, over: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidConfigError, match=match):
        read_adapter(_adapter(tmp_path / "a", {**CFG, **over}))


def test_huge_config_refused_before_parsing(tmp_path: Path) -> None:
    folder = _adapter(tmp_path / "a", CFG)
    big = {**CFG, "notes": "y" * 1_200_000}
    (folder / "adapter_config.json").write_text(json.dumps(big), encoding="utf-8")
    with pytest.raises(InvalidConfigError, match="larger than 1000000 bytes"):
        read_adapter(folder)
    # not even JSON: still the size message, so nothing was parsed
    (folder / "adapter_config.json").write_bytes(b"{" * 1_500_000)
    with pytest.raises(InvalidConfigError, match="larger than 1000000 bytes"):
        read_adapter(folder)


# ------------------------------------------------------------------------------- factor values


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_factors_refused(tmp_path: Path, dtype: torch.dtype) -> None:
    t = {k: v.to(dtype) for k, v in peft_linear_tensors().items()}
    with pytest.raises(
        InvalidAdapterError, match="tensor is stored as .*; LoRA tensors must be floating point"
    ):
        read_adapter(_adapter(tmp_path / "a", CFG, t))


def test_integer_kohya_factors_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.safetensors"
    t = kohya_file(path)
    save_file({k: (v.to(torch.int64) if "lora_down" in k else v) for k, v in t.items()}, str(path))
    with pytest.raises(InvalidAdapterError, match="is stored as I64; LoRA tensors must be floating point"):
        read_adapter(path)


def test_kohya_alpha_zero_means_rank_and_negative_is_refused(tmp_path: Path) -> None:
    kohya_file(tmp_path / "z.safetensors", alpha=0.0)
    w = read_adapter(tmp_path / "z.safetensors")
    assert {m.scale for m in w.values()} == {1.0}  # sd-scripts: alpha 0 means alpha = rank
    kohya_file(tmp_path / "n.safetensors", alpha=-2.0)
    with pytest.raises(InvalidAdapterError, match="alpha is -2.0; it must be positive"):
        read_adapter(tmp_path / "n.safetensors")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_factors(tmp_path: Path, value: float) -> None:
    t = peft_linear_tensors()
    t[f"{PRE}.lora_B.weight"][3, 1] = value
    folder = _adapter(tmp_path / "a", CFG, t)
    files = detect(folder)
    assert len(read_adapter(folder)) == 1  # the header alone says nothing about values
    with pytest.raises(InvalidAdapterError, match="lora_B.weight holds 1 NaN/Inf value of 64") as info:
        check_finite(files)
    assert info.value.path == str(files.weights)
    with pytest.raises(InvalidAdapterError, match=f"{Q0} \\(B\\) holds 1 NaN/Inf value of 64"):
        read_adapter(folder, load=True)
    checks, _ = check_integrity(files)
    assert [c.check for c in checks if c.status == "error"] == ["values"]
    good = _adapter(tmp_path / "b", CFG)
    check_finite(detect(good))
    assert non_finite(read_adapter(good, load=True)) == []


# ------------------------------------------------------------------------------- targets vs weights


def _qv_tensors() -> dict[str, torch.Tensor]:
    t = peft_linear_tensors()
    t.update(peft_linear_tensors("model.layers.1.self_attn.v_proj"))
    return t


@pytest.mark.parametrize(
    "targets, ok",
    [
        (["k_proj"], False),
        (["q_proj"], False),  # v_proj of layer 1 is not selected
        (["q_proj", "v_proj"], True),
        (["model.layers.0.self_attn.q_proj", "v_proj"], True),
        (r".*\.(q|v)_proj", True),
        (r".*\.q_proj", False),
        ("q_proj", False),  # a string is a full-match regex, not a name
        ("all-linear", True),
    ],
)
def test_weights_must_be_selected_by_target_modules(tmp_path: Path, targets: Any, ok: bool) -> None:
    folder = _adapter(tmp_path / "a", {**CFG, "target_modules": targets}, _qv_tensors())
    if ok:
        assert len(read_adapter(folder)) == 2
        return
    with pytest.raises(
        InvalidAdapterError, match="does not select it, so PEFT would load the adapter without it"
    ):
        read_adapter(folder)
    checks, _ = check_integrity(detect(folder))
    assert any("does not select it" in c.message for c in checks if c.status == "error")


@pytest.mark.parametrize(
    "over, ok",
    [
        ({"exclude_modules": ["v_proj"]}, False),
        ({"exclude_modules": r".*layers\.1\..*"}, False),
        ({"exclude_modules": ["k_proj"]}, True),
        ({"layers_to_transform": [0, 1]}, True),
        ({"layers_to_transform": [0]}, False),
        ({"layers_to_transform": 1}, False),
        ({"layers_to_transform": [0, 1], "layers_pattern": "layers"}, True),
        ({"layers_to_transform": [0, 1], "layers_pattern": "blocks"}, False),
    ],
)
def test_exclude_and_layers_follow_peft(tmp_path: Path, over: dict[str, Any], ok: bool) -> None:
    cfg = {**CFG, "target_modules": ["q_proj", "v_proj"], **over}
    folder = _adapter(tmp_path / "a", cfg, _qv_tensors())
    if ok:
        assert len(read_adapter(folder)) == 2
    else:
        with pytest.raises(InvalidAdapterError, match="does not select it"):
            read_adapter(folder)


def test_dora_flag_must_match_magnitudes(tmp_path: Path) -> None:
    with pytest.raises(InvalidAdapterError, match="use_dora is true but there is no lora_magnitude_vector"):
        read_adapter(_adapter(tmp_path / "a", {**CFG, "use_dora": True}))
    t = {**peft_linear_tensors(), f"{PRE}.lora_magnitude_vector": torch.ones(16)}
    with pytest.raises(InvalidAdapterError, match="has a DoRA magnitude .* but use_dora is false"):
        read_adapter(_adapter(tmp_path / "b", CFG, t))
    assert read_adapter(_adapter(tmp_path / "c", {**CFG, "use_dora": True}, t)).has_dora


def test_lora_bias_flag_must_match_biases(tmp_path: Path) -> None:
    t = {**peft_linear_tensors(), f"{PRE}.lora_B.bias": torch.ones(16)}
    with pytest.raises(InvalidAdapterError, match="has a lora_B bias but lora_bias is false"):
        read_adapter(_adapter(tmp_path / "a", CFG, t))
    assert read_adapter(_adapter(tmp_path / "b", {**CFG, "lora_bias": True}, t))[Q0 + ".weight"].bias_shape


# ------------------------------------------------------------------------------- merge and combine


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    root = tmp_path_factory.mktemp("values")
    model = tiny_llama()
    return model, save_model(model, root / "base"), root


def test_merge_refuses_non_finite_factors_and_writes_nothing(llama: Any, tmp_path: Path) -> None:
    model, base, root = llama
    w = read_adapter(make_adapter(model, tmp_path / "ad"), load=True)
    next(iter(w.values())).B[0, 0] = float("nan")  # in memory, past the reader's check
    with pytest.raises(
        IncompatibleAdapterError, match="NaN/Inf value.*nothing was written|nothing was written"
    ):
        merge_checkpoint(base, [(w, 1.0)], tmp_path / "out")
    _no_leftovers(tmp_path, tmp_path / "out")
    w2 = read_adapter(make_adapter(model, tmp_path / "ad2"), load=True)
    with pytest.raises(IncompatibleAdapterError, match="not a finite number"):
        merge_checkpoint(base, [(w2, float("inf"))], tmp_path / "out")
    _no_leftovers(tmp_path, tmp_path / "out")


def test_merge_refuses_an_overflowing_result(llama: Any, tmp_path: Path) -> None:
    model, base, _ = llama
    w = read_adapter(make_adapter(model, tmp_path / "ad"), load=True)
    with pytest.raises(
        IncompatibleAdapterError, match="non-finite value.*overflow float16.*nothing was written"
    ):
        merge_checkpoint(base, [(w, 1e6)], tmp_path / "out", dtype="float16")
    _no_leftovers(tmp_path, tmp_path / "out")
    with pytest.raises(IncompatibleAdapterError, match="non-finite value.*too large"):
        merge_checkpoint(base, [(w, 1e39)], tmp_path / "out")
    _no_leftovers(tmp_path, tmp_path / "out")
    merge_checkpoint(base, [(w, 1.0)], tmp_path / "out", dtype="float16")  # a sane weight still merges
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_combine_refuses_non_finite(llama: Any, tmp_path: Path) -> None:
    model, _, _ = llama
    w = read_adapter(make_adapter(model, tmp_path / "ad"), load=True)
    next(iter(w.values())).A[0, 0] = float("inf")
    with pytest.raises(InvalidAdapterError, match="adapter #1: .* holds 1 NaN/Inf value"):
        combine([(w, 1.0)])


def test_catalog_add_refuses_non_finite_alpha_and_bad_targets(tmp_path: Path) -> None:
    from adapterhub import Hub

    inf = _adapter(tmp_path / "inf", json.dumps(CFG).replace('"lora_alpha": 8', '"lora_alpha": Infinity'))
    wrong = _adapter(tmp_path / "wrong", {**CFG, "target_modules": ["k_proj"]})
    with Hub(tmp_path / "home") as hub:
        with pytest.raises(InvalidConfigError, match="lora_alpha is not a finite number"):
            hub.add_adapter(inf)
        with pytest.raises(InvalidAdapterError, match="does not select it"):
            hub.add_adapter(wrong)
        assert hub.list_adapters() == []
