"""PEFT and kohya readers/writers, checked against PEFT itself on tiny models built from configs."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.formats_fixtures import (
    ConvNet,
    image_input,
    kohya_file,
    load_peft,
    lora_layers,
    make_peft,
    outputs,
    peft_linear_tensors,
    save_peft_tensors,
    tiny_gpt2,
    tiny_llama,
    token_input,
    write_config,
)
from safetensors import safe_open
from safetensors.torch import save_file

from adapterhub.errors import InvalidAdapterError, InvalidConfigError, PickleRefusedError
from adapterhub.formats import convert_pickle, detect, read_adapter, write_adapter
from adapterhub.formats.peft import derive_config, validate_config
from adapterhub.lora import LoraModule, LoraWeights, lora_scale

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture(scope="module")
def gpt2() -> torch.nn.Module:
    return tiny_gpt2()


@pytest.fixture(scope="module")
def convnet() -> torch.nn.Module:
    return ConvNet()


def _file_numel(path: Path) -> int:
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        names = f.keys()
        return sum(math.prod(f.get_slice(k).get_shape()) for k in names)


def _check_against_peft(weights: LoraWeights, peft_model: Any) -> None:
    """Every module: rank, scale and dense delta equal what PEFT's own layer holds."""
    layers = lora_layers(peft_model)
    assert {m.module for m in weights.values()} == set(layers)
    for m in weights.values():
        layer = layers[m.module]
        assert m.rank == layer.r["default"], m.key
        assert m.scale == pytest.approx(layer.scaling["default"], rel=1e-12), m.key
        peft_delta = layer.get_delta_weight("default").detach()
        ours = m.delta()
        if getattr(layer, "fan_in_fan_out", False):  # GPT-2 Conv1D: PEFT's delta is (in, out)
            ours = ours.T
        torch.testing.assert_close(ours, peft_delta, rtol=1e-5, atol=1e-6)


def _round_trip(
    weights: LoraWeights, base: torch.nn.Module, original: Any, dest: Path, x: torch.Tensor
) -> None:
    write_adapter(weights, dest, format="peft")
    assert sorted(os.listdir(dest)) == ["adapter_config.json", "adapter_model.safetensors"]
    reloaded = load_peft(base, dest)
    torch.testing.assert_close(outputs(reloaded, x), outputs(original, x), rtol=0, atol=1e-6)
    _check_against_peft(read_adapter(dest, load=True), reloaded)


# ---------------------------------------------------------------- PEFT adapters made by PEFT


def test_plain_linear(tmp_path: Path, llama: torch.nn.Module) -> None:
    pm = make_peft(llama, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    files = detect(tmp_path / "a")
    assert files.format == "peft" and not files.pickle
    w = read_adapter(tmp_path / "a")
    assert w.format == "peft" and len(w) == 4
    assert all(m.A is None and m.B is None for m in w.values())
    assert w.rank == 4 and w.dtype == "F32" and not w.has_dora
    assert w.target_modules == ["q_proj", "v_proj"]
    assert w.num_params == _file_numel(tmp_path / "a")
    assert {m.kind for m in w.values()} == {"linear"}
    assert all(m.alpha == 8 and m.scale == 2.0 for m in w.values())
    base_keys = set(llama.state_dict())
    assert set(w) <= base_keys  # keys are the base checkpoint's own weight names
    assert w[Q0 + ".weight"].a_shape == (4, 16) and w[Q0 + ".weight"].b_shape == (16, 4)
    loaded = read_adapter(tmp_path / "a", load=True)
    _check_against_peft(loaded, pm)
    _round_trip(loaded, llama, pm, tmp_path / "rt", token_input())


def test_metadata_only_read_touches_no_tensor_data(
    tmp_path: Path, llama: torch.nn.Module, monkeypatch
) -> None:
    make_peft(llama, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    import safetensors

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tensor data was opened")

    monkeypatch.setattr(safetensors, "safe_open", boom)
    w = read_adapter(tmp_path / "a")
    assert all(m.A is None and m.B is None and m.magnitude is None for m in w.values())
    assert all(m.magnitude_shape == (16,) for m in w.values())
    with pytest.raises(ValueError, match="tensors were not loaded"):
        w[Q0 + ".weight"].delta()
    with pytest.raises(InvalidAdapterError, match="tensors were not loaded; cannot write"):
        write_adapter(w, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rslora(tmp_path: Path, llama: torch.nn.Module) -> None:
    pm = make_peft(
        llama, tmp_path / "a", r=4, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "o_proj"]
    )
    w = read_adapter(tmp_path / "a", load=True)
    assert w.use_rslora
    assert all(m.scale == 8 / math.sqrt(4) for m in w.values())
    _check_against_peft(w, pm)
    _round_trip(w, llama, pm, tmp_path / "rt", token_input())
    cfg = json.loads((tmp_path / "rt" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["lora_alpha"] * 1 / cfg["r"] == pytest.approx(4.0)


def test_rank_and_alpha_patterns(tmp_path: Path, llama: torch.nn.Module) -> None:
    pm = make_peft(
        llama,
        tmp_path / "a",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "up_proj"],
        rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
        alpha_pattern={"down_proj": 3, "layers.0.self_attn.v_proj": 5},
    )
    w = read_adapter(tmp_path / "a", load=True)
    assert {m.rank for m in w.values()} == {2, 4, 6}
    assert w.rank == 6
    _check_against_peft(w, pm)  # per-module rank and scale equal PEFT's layer.r / layer.scaling
    _round_trip(w, llama, pm, tmp_path / "rt", token_input())


def test_rslora_with_patterns_round_trip(tmp_path: Path, llama: torch.nn.Module) -> None:
    pm = make_peft(
        llama,
        tmp_path / "a",
        r=4,
        lora_alpha=6,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "gate_proj"],
        rank_pattern={"v_proj": 2, "gate_proj": 8},
        alpha_pattern={"gate_proj": 3},
    )
    w = read_adapter(tmp_path / "a", load=True)
    _check_against_peft(w, pm)
    _round_trip(w, llama, pm, tmp_path / "rt", token_input())


def test_dora(tmp_path: Path, llama: torch.nn.Module) -> None:
    pm = make_peft(
        llama, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True
    )
    w = read_adapter(tmp_path / "a", load=True)
    assert w.has_dora
    layers = lora_layers(pm)
    for m in w.values():
        assert m.is_dora and m.magnitude_shape == (m.out_features,)
        expected = layers[m.module].lora_magnitude_vector["default"].weight.detach()
        torch.testing.assert_close(m.magnitude, expected.reshape(-1))
    assert w.num_params == _file_numel(tmp_path / "a")
    _check_against_peft(w, pm)
    _round_trip(w, llama, pm, tmp_path / "rt", token_input())


def test_embedding_lora(tmp_path: Path, llama: torch.nn.Module) -> None:
    pm = make_peft(llama, tmp_path / "a", r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    w = read_adapter(tmp_path / "a", load=True)
    emb = w["model.embed_tokens.weight"]
    assert emb.kind == "embedding"
    assert emb.delta_shape == (64, 16)  # (num_embeddings, dim), the layout of nn.Embedding.weight
    layer = lora_layers(pm)["model.embed_tokens"]
    torch.testing.assert_close(emb.delta(), layer.get_delta_weight("default").detach())
    # PEFT saves the embedding's base weight too (save_embedding_layers)
    assert w.replacement_shapes == {"model.embed_tokens.weight": (64, 16)}
    assert w.num_params == _file_numel(tmp_path / "a")
    _check_against_peft(w, pm)
    _round_trip(w, llama, pm, tmp_path / "rt", token_input())


def test_embedding_dora(tmp_path: Path, llama: torch.nn.Module) -> None:
    # PEFT's magnitude for an embedding has one entry per embedding dim, not per token
    pm = make_peft(llama, tmp_path / "a", r=4, lora_alpha=8, target_modules=["embed_tokens"], use_dora=True)
    w = read_adapter(tmp_path / "a", load=True)
    emb = w["model.embed_tokens.weight"]
    assert emb.magnitude_shape == (16,)
    _round_trip(w, llama, pm, tmp_path / "rt", token_input())


def test_conv_lora(tmp_path: Path, convnet: torch.nn.Module) -> None:
    pm = make_peft(convnet, tmp_path / "a", r=2, lora_alpha=4, target_modules=["conv", "lin"])
    w = read_adapter(tmp_path / "a", load=True)
    conv = w["conv.weight"]
    assert conv.kind == "conv" and conv.kernel_size == (3, 3)
    assert conv.a_shape == (2, 3, 3, 3) and conv.b_shape == (6, 2, 1, 1)
    assert conv.delta_shape == tuple(convnet.conv.weight.shape)
    assert w.target_modules == ["conv", "lin"]
    _check_against_peft(w, pm)
    _round_trip(w, convnet, pm, tmp_path / "rt", image_input())


def test_conv_dora(tmp_path: Path, convnet: torch.nn.Module) -> None:
    # PEFT keeps a conv's DoRA magnitude as (1, out, 1, 1)
    pm = make_peft(convnet, tmp_path / "a", r=2, lora_alpha=4, target_modules=["conv"], use_dora=True)
    w = read_adapter(tmp_path / "a", load=True)
    assert w["conv.weight"].magnitude_shape == (1, 6, 1, 1)
    _round_trip(w, convnet, pm, tmp_path / "rt", image_input())


def test_lora_bias(tmp_path: Path, llama: torch.nn.Module) -> None:
    pm = make_peft(llama, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True)
    w = read_adapter(tmp_path / "a", load=True)
    layers = lora_layers(pm)
    for m in w.values():
        assert m.bias_shape == (16,)
        torch.testing.assert_close(m.bias, layers[m.module].lora_B["default"].bias.detach())
    assert w.num_params == _file_numel(tmp_path / "a")
    _round_trip(w, llama, pm, tmp_path / "rt", token_input())
    assert json.loads((tmp_path / "rt" / "adapter_config.json").read_text())["lora_bias"] is True


def test_modules_to_save(tmp_path: Path, llama: torch.nn.Module) -> None:
    pm = make_peft(
        llama, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    with torch.no_grad():  # make the saved head differ from the base head
        pm.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    pm.save_pretrained(str(tmp_path / "a"))
    w = read_adapter(tmp_path / "a")
    assert w.replacement_shapes == {"lm_head.weight": (64, 16)}
    assert w.num_params == _file_numel(tmp_path / "a")
    w = read_adapter(tmp_path / "a", load=True)
    expected = pm.base_model.model.lm_head.modules_to_save["default"].weight.detach()
    torch.testing.assert_close(w.replacements["lm_head.weight"], expected)
    _round_trip(w, llama, pm, tmp_path / "rt", token_input())


def test_gpt2_conv1d(tmp_path: Path, gpt2: torch.nn.Module) -> None:
    pm = make_peft(
        gpt2, tmp_path / "a", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True
    )
    w = read_adapter(tmp_path / "a", load=True)
    m = w["transformer.h.0.attn.c_attn.weight"]
    assert m.a_shape == (4, 16) and m.b_shape == (48, 4)  # (out, in) layout even though Conv1D is (in, out)
    _check_against_peft(w, pm)
    _round_trip(w, gpt2, pm, tmp_path / "rt", token_input())


def test_peft_keyed_single_file_with_config_beside(tmp_path: Path, llama: torch.nn.Module) -> None:
    pm = make_peft(llama, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    folder = tmp_path / "single"
    folder.mkdir()
    shutil.copy(tmp_path / "a" / "adapter_config.json", folder / "adapter_config.json")
    shutil.copy(tmp_path / "a" / "adapter_model.safetensors", folder / "my_lora.safetensors")
    files = detect(folder / "my_lora.safetensors")
    assert files.format == "peft" and files.config == folder / "adapter_config.json"
    w = read_adapter(folder / "my_lora.safetensors", load=True)
    _check_against_peft(w, pm)
    # the config path itself also finds the folder
    assert (
        detect(tmp_path / "a" / "adapter_config.json").weights == tmp_path / "a" / "adapter_model.safetensors"
    )


def test_peft_weights_without_prefix(tmp_path: Path) -> None:
    tensors = {k.removeprefix("base_model.model."): v for k, v in peft_linear_tensors().items()}
    save_peft_tensors(tmp_path / "a", tensors, {"r": 4, "lora_alpha": 8})
    w = read_adapter(tmp_path / "a", load=True)
    m = w[Q0 + ".weight"]
    torch.testing.assert_close(m.A, tensors[Q0 + ".lora_A.weight"])
    assert m.scale == 2.0


# ---------------------------------------------------------------- derive_config


def _module(key: str, rank: int, scale: float, d: int = 16) -> LoraModule:
    g = torch.Generator().manual_seed(rank)
    return LoraModule(
        key=key,
        kind="linear",
        rank=rank,
        alpha=scale * rank,
        scale=scale,
        a_shape=(rank, d),
        b_shape=(d, rank),
        A=torch.randn(rank, d, generator=g),
        B=torch.randn(d, rank, generator=g),
    )


def test_derive_config_reproduces_every_scale(tmp_path: Path, llama: torch.nn.Module) -> None:
    mods = [
        _module("model.layers.0.self_attn.q_proj.weight", 4, 2.0),
        _module("model.layers.1.self_attn.q_proj.weight", 4, 2.0),
        _module("model.layers.0.self_attn.k_proj.weight", 4, 8 / math.sqrt(4)),  # rslora folded: 4.0
        _module("model.layers.1.self_attn.o_proj.weight", 8, 16 / math.sqrt(8)),  # rslora, other rank
        _module("model.layers.1.self_attn.k_proj.weight", 2, 0.5),
    ]
    for m in mods:
        m.b_shape = (8 if "k_proj" in m.key else 16, m.rank)
        m.B = m.B[: m.b_shape[0]]
    w = LoraWeights(modules={m.key: m for m in mods}, format="peft")
    cfg = derive_config(w)
    validate_config(cfg)
    assert cfg["r"] == 4 and cfg["use_rslora"] is False
    assert set(cfg["rank_pattern"]) == {"model.layers.1.self_attn.o_proj", "model.layers.1.self_attn.k_proj"}
    write_adapter(w, tmp_path / "d")
    layers = lora_layers(load_peft(llama, tmp_path / "d"))
    assert set(layers) == {m.module for m in mods} | {"model.layers.0.self_attn.o_proj"}
    for m in mods:
        assert layers[m.module].r["default"] == m.rank
        assert layers[m.module].scaling["default"] == pytest.approx(m.scale, rel=1e-12)


def test_derive_config_when_one_module_name_ends_another(tmp_path: Path, convnet: torch.nn.Module) -> None:
    # "lin" as a PEFT pattern key also matches "block.lin"; each must still get its own rank
    pm = make_peft(
        convnet, tmp_path / "a", r=2, lora_alpha=4, target_modules=["lin"], rank_pattern={"block.lin": 3}
    )
    w = read_adapter(tmp_path / "a", load=True)
    assert {m.module: m.rank for m in w.values()} == {"lin": 2, "block.lin": 3}
    _round_trip(w, convnet, pm, tmp_path / "rt", image_input())
    # and the same with equal ranks but different scales (alpha_pattern)
    pm = make_peft(
        convnet, tmp_path / "b", r=2, lora_alpha=4, target_modules=["lin"], alpha_pattern={"lin": 6}
    )
    w = read_adapter(tmp_path / "b", load=True)
    assert {m.module: m.scale for m in w.values()} == {"lin": 3.0, "block.lin": 3.0}
    pm = make_peft(
        convnet, tmp_path / "c", r=2, lora_alpha=4, target_modules=["lin"], alpha_pattern={"block.lin": 6}
    )
    w = read_adapter(tmp_path / "c", load=True)
    assert {m.module: m.scale for m in w.values()} == {"lin": 2.0, "block.lin": 3.0}
    # "lin" alone gets an alpha_pattern entry, which PEFT would also apply to "block.lin"
    w["lin.weight"].scale = 5.0
    w["block.lin.weight"].scale = 1.0
    conv = _module("conv.weight", 2, 1.0)
    conv.kind, conv.a_shape, conv.b_shape = "conv", (2, 3, 3, 3), (6, 2, 1, 1)
    conv.A, conv.B = torch.randn(2, 3, 3, 3), torch.randn(6, 2, 1, 1)
    w.modules["conv.weight"] = conv
    write_adapter(w, tmp_path / "c2")
    layers = lora_layers(load_peft(convnet, tmp_path / "c2"))
    assert {k: v.scaling["default"] for k, v in layers.items()} == {"conv": 1.0, "lin": 5.0, "block.lin": 1.0}


# ---------------------------------------------------------------- kohya


UNET_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def test_kohya_with_alpha(tmp_path: Path) -> None:
    path = tmp_path / "k.safetensors"
    tensors = kohya_file(path, alpha=2.0)
    assert detect(path).format == "kohya"
    w = read_adapter(path)
    assert w.format == "kohya" and set(w) == {UNET_Q, TE_Q}
    assert all(m.A is None for m in w.values())
    assert all(m.rank == 4 and m.alpha == 2.0 and m.scale == 0.5 for m in w.values())
    assert w.target_modules == ["attn1_to_q", "self_attn_q_proj"]
    assert w.metadata["ss_network_dim"] == "4" and w.metadata["ss_output_name"] == "tiny"
    assert w.base_model == "sd_v1"
    assert w.num_params == sum(t.numel() for k, t in tensors.items() if not k.endswith(".alpha"))
    assert w.dtype == "F32"
    w = read_adapter(path, load=True)
    m = w[UNET_Q]
    torch.testing.assert_close(
        m.delta(), 0.5 * tensors[UNET_Q + ".lora_up.weight"] @ tensors[UNET_Q + ".lora_down.weight"]
    )


def test_kohya_without_alpha_has_scale_one(tmp_path: Path) -> None:
    path = tmp_path / "k.safetensors"
    kohya_file(path, alpha=None)
    w = read_adapter(path)
    assert all(m.alpha == 4.0 and m.scale == 1.0 for m in w.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_kohya_alpha_dtypes(tmp_path: Path, dtype: torch.dtype) -> None:
    path = tmp_path / "k.safetensors"
    tensors = kohya_file(path, alpha=None, stems={"lora_unet_a": (4, 8, 8)})
    tensors["lora_unet_a.alpha"] = torch.tensor(3.0, dtype=dtype)
    save_file(tensors, str(path))
    assert read_adapter(path)["lora_unet_a"].scale == 0.75


def test_kohya_conv(tmp_path: Path) -> None:
    path = tmp_path / "k.safetensors"
    tensors = kohya_file(path, conv=True, stems={"lora_unet_conv_in": (2, 4, 8)}, alpha=1.0)
    w = read_adapter(path, load=True)
    m = w["lora_unet_conv_in"]
    assert m.kind == "conv" and m.kernel_size == (3, 3) and m.delta_shape == (8, 4, 3, 3)
    down, up = tensors["lora_unet_conv_in.lora_down.weight"], tensors["lora_unet_conv_in.lora_up.weight"]
    expected = 0.5 * torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    torch.testing.assert_close(m.delta(), expected)


def test_kohya_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "k.safetensors"
    kohya_file(src, alpha=3.0)
    w = read_adapter(src, load=True)
    out = write_adapter(w, tmp_path / "out" / "k2.safetensors", format="kohya")
    w2 = read_adapter(out, load=True)
    assert set(w2) == set(w)
    for key, m in w.items():
        assert w2[key].scale == m.scale and w2[key].rank == m.rank
        torch.testing.assert_close(w2[key].A, m.A)
        torch.testing.assert_close(w2[key].B, m.B)
    assert w2.metadata["ss_output_name"] == "tiny" and w2.metadata["ss_network_dim"] == "4"
    conv = tmp_path / "c.safetensors"
    kohya_file(conv, conv=True, alpha=1.0)
    wc = read_adapter(conv, load=True)
    wc2 = read_adapter(write_adapter(wc, tmp_path / "c2.safetensors", format="kohya"), load=True)
    for key, m in wc.items():
        torch.testing.assert_close(wc2[key].delta(), m.delta())


def test_peft_to_kohya_keeps_scales(tmp_path: Path, llama: torch.nn.Module) -> None:
    make_peft(
        llama,
        tmp_path / "a",
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2},
    )
    w = read_adapter(tmp_path / "a", load=True)
    k = read_adapter(write_adapter(w, tmp_path / "k.safetensors", format="kohya"), load=True)
    assert set(k) == {
        "lora_unet_model_layers_0_self_attn_q_proj",
        "lora_unet_model_layers_1_self_attn_q_proj",
    }
    for m in w.values():
        km = k["lora_unet_" + m.module.replace(".", "_")]
        assert km.scale == pytest.approx(m.scale, rel=1e-6)
        torch.testing.assert_close(km.delta(), m.delta())


def test_kohya_refusals(tmp_path: Path) -> None:
    path = tmp_path / "k.safetensors"
    t = kohya_file(path, stems={"lora_unet_a": (4, 8, 8)})
    save_file({k: v for k, v in t.items() if "lora_up" not in k}, str(path))
    with pytest.raises(InvalidAdapterError, match="module lora_unet_a has no lora_up factor"):
        read_adapter(path)
    save_file({**t, "lora_unet_a.lora_up.weight": torch.zeros(8, 3)}, str(path))
    with pytest.raises(InvalidAdapterError, match="lora_down has rank 4 but lora_up has rank 3"):
        read_adapter(path)
    save_file({**t, "lora_unet_a.alpha": torch.tensor(float("nan"))}, str(path))
    with pytest.raises(InvalidAdapterError, match="alpha is nan, not a finite number"):
        read_adapter(path)
    save_file({**t, "lora_unet_a.lora_mid.weight": torch.zeros(4, 4, 3, 3)}, str(path))
    with pytest.raises(InvalidAdapterError, match="lora_unet_a.lora_mid.weight is not a plain LoRA factor"):
        read_adapter(path)


def test_write_refusals(tmp_path: Path, llama: torch.nn.Module) -> None:
    make_peft(llama, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    w = read_adapter(tmp_path / "a", load=True)
    with pytest.raises(InvalidAdapterError, match="kohya files hold plain linear/conv LoRA only"):
        write_adapter(w, tmp_path / "k.safetensors", format="kohya")
    with pytest.raises(InvalidAdapterError, match="unknown format 'diffusers'; choose one of peft, kohya"):
        write_adapter(w, tmp_path / "x", format="diffusers")
    kohya_file(tmp_path / "k.safetensors")
    kw = read_adapter(tmp_path / "k.safetensors", load=True)
    with pytest.raises(
        InvalidAdapterError, match="cannot be written as PEFT without a base model's key list"
    ):
        write_adapter(kw, tmp_path / "p", format="peft")
    assert not (tmp_path / "p").exists() and not (tmp_path / "x").exists()


# ---------------------------------------------------------------- broken PEFT adapters


def _write_broken(
    folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any] | None = None
) -> Path:
    return save_peft_tensors(folder, tensors, config or {"r": 4, "lora_alpha": 8, "peft_type": "LORA"})


def test_missing_lora_b(tmp_path: Path) -> None:
    t = peft_linear_tensors()
    del t[f"base_model.model.{Q0}.lora_B.weight"]
    with pytest.raises(InvalidAdapterError, match=f"module {Q0} has no lora_B factor") as info:
        read_adapter(_write_broken(tmp_path / "a", t))
    assert info.value.module == Q0


def test_mismatched_ranks(tmp_path: Path) -> None:
    t = peft_linear_tensors()
    t[f"base_model.model.{Q0}.lora_B.weight"] = torch.zeros(16, 3)
    with pytest.raises(InvalidAdapterError, match=f"module {Q0}: A has rank 4 but B has rank 3"):
        read_adapter(_write_broken(tmp_path / "a", t))


def test_config_rank_disagrees_with_tensors(tmp_path: Path) -> None:
    folder = _write_broken(tmp_path / "a", peft_linear_tensors(), {"r": 8, "lora_alpha": 16})
    with pytest.raises(InvalidAdapterError, match="the config says r=8 but the tensors have rank 4"):
        read_adapter(folder)
    folder = _write_broken(tmp_path / "b", peft_linear_tensors(), {"r": 4, "rank_pattern": {"q_proj": 2}})
    with pytest.raises(InvalidAdapterError, match="the config says r=2 but the tensors have rank 4"):
        read_adapter(folder)


def test_zero3_empty_factors(tmp_path: Path) -> None:
    pre = f"base_model.model.{Q0}"
    t = {f"{pre}.lora_A.weight": torch.empty(0), f"{pre}.lora_B.weight": torch.empty(0)}
    with pytest.raises(
        InvalidAdapterError, match="factors must be at least 2-D, got A \\[0\\] and B \\[0\\].*ZeRO-3"
    ):
        read_adapter(_write_broken(tmp_path / "a", t))
    t = {f"{pre}.lora_A.weight": torch.empty(0, 16), f"{pre}.lora_B.weight": torch.empty(16, 0)}
    with pytest.raises(InvalidAdapterError, match="empty factor A \\[0, 16\\] / B \\[16, 0\\].*ZeRO-3"):
        read_adapter(_write_broken(tmp_path / "b", t))


def test_one_dimensional_factors(tmp_path: Path) -> None:
    pre = f"base_model.model.{Q0}"
    t = {f"{pre}.lora_A.weight": torch.zeros(4), f"{pre}.lora_B.weight": torch.zeros(16, 4)}
    with pytest.raises(
        InvalidAdapterError, match="factors must be at least 2-D, got A \\[4\\] and B \\[16, 4\\]"
    ):
        read_adapter(_write_broken(tmp_path / "a", t))


def test_bad_dora_magnitude(tmp_path: Path) -> None:
    t = peft_linear_tensors()
    t[f"base_model.model.{Q0}.lora_magnitude_vector"] = torch.ones(5)
    with pytest.raises(InvalidAdapterError, match="DoRA magnitude \\[5\\] does not match 16 outputs"):
        read_adapter(_write_broken(tmp_path / "a", t))


def test_no_lora_tensors(tmp_path: Path) -> None:
    folder = _write_broken(tmp_path / "a", {"base_model.model.foo.bar": torch.zeros(2)})
    with pytest.raises(InvalidAdapterError, match="holds no LoRA tensors"):
        read_adapter(folder)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"r": "4"}, "r: '4' is not of type 'integer'"),
        ({"r": 0}, "r: 0 is less than the minimum of 1"),
        ({"r": -2}, "r: -2 is less than the minimum of 1"),
        ({"r": True}, "r: True is not of type 'integer'"),
        ({"lora_alpha": 8}, "'r' is a required property"),
        ({"r": 4, "lora_alpha": "8"}, "lora_alpha: '8' is not of type 'number'"),
        ({"r": 4, "use_rslora": "yes"}, "use_rslora: 'yes' is not of type 'boolean'"),
        ({"r": 4, "rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"r": 4, "target_modules": 3}, "target_modules"),
        ({"r": 4, "bias": "some"}, "bias: 'some' is not one of"),
    ],
)
def test_config_breaks_schema(tmp_path: Path, config: dict[str, Any], match: str) -> None:
    folder = _write_broken(tmp_path / "a", peft_linear_tensors(), config)
    with pytest.raises(InvalidConfigError, match=match) as info:
        read_adapter(folder)
    assert "schemas/lora_config.schema.json" in str(info.value)
    assert info.value.path == str(folder / "adapter_config.json")


def test_config_not_json_or_not_object(tmp_path: Path) -> None:
    folder = _write_broken(tmp_path / "a", peft_linear_tensors())
    (folder / "adapter_config.json").write_text("{nope", encoding="utf-8")
    with pytest.raises(InvalidConfigError, match="adapter_config.json: not valid JSON"):
        read_adapter(folder)
    (folder / "adapter_config.json").write_text("[1]", encoding="utf-8")
    with pytest.raises(InvalidConfigError, match="adapter config must be a JSON object"):
        read_adapter(folder)


@pytest.mark.parametrize("peft_type", ["PREFIX_TUNING", "IA3", "VERA"])
def test_peft_type_not_lora(tmp_path: Path, peft_type: str) -> None:
    folder = _write_broken(tmp_path / "a", peft_linear_tensors(), {"r": 4, "peft_type": peft_type})
    with pytest.raises(
        InvalidConfigError, match=f"peft_type is '{peft_type}'; adapterhub handles LoRA adapters only"
    ):
        read_adapter(folder)


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidAdapterError, match="no adapter_config.json here"):
        detect(tmp_path / "empty")
    with pytest.raises(InvalidAdapterError, match="no such file or folder"):
        detect(tmp_path / "missing")
    write_config(tmp_path / "cfg_only", {"r": 4})
    with pytest.raises(InvalidAdapterError, match="has adapter_config.json but no adapter_model.safetensors"):
        detect(tmp_path / "cfg_only")


def test_peft_weights_without_config(tmp_path: Path) -> None:
    folder = _write_broken(tmp_path / "a", peft_linear_tensors())
    (folder / "adapter_config.json").unlink()
    match = "PEFT-style LoRA weights, but no adapter_config.json beside them to give rank and alpha"
    with pytest.raises(InvalidAdapterError, match=match):
        read_adapter(folder)
    with pytest.raises(InvalidAdapterError, match=match):
        read_adapter(folder / "adapter_model.safetensors")


def test_not_an_adapter(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(
        InvalidAdapterError, match="not an adapter; give a PEFT folder or a .safetensors file"
    ):
        detect(tmp_path / "notes.txt")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(InvalidAdapterError, match="no LoRA tensors found"):
        detect(tmp_path / "model.safetensors")


# ---------------------------------------------------------------- pickles


def _pickled_adapter(folder: Path, llama: torch.nn.Module) -> tuple[Any, dict[str, torch.Tensor]]:
    pm = make_peft(llama, folder, r=4, lora_alpha=8, target_modules=["q_proj"])
    from safetensors.torch import load_file

    state = load_file(str(folder / "adapter_model.safetensors"))
    (folder / "adapter_model.safetensors").unlink()
    torch.save(state, str(folder / "adapter_model.bin"))
    return pm, state


def test_pickle_refused_then_converted(tmp_path: Path, llama: torch.nn.Module) -> None:
    folder = tmp_path / "a"
    pm, state = _pickled_adapter(folder, llama)
    for path in (folder, folder / "adapter_model.bin"):
        with pytest.raises(PickleRefusedError, match="weights are a pickle \\(adapter_model.bin\\)"):
            read_adapter(path)
    files = detect(folder, allow_pickle=True)
    assert files.pickle and files.weights == folder / "adapter_model.bin"
    with pytest.raises(PickleRefusedError):
        read_adapter(files)  # allow_pickle only locates it; it is never unpickled by a reader
    out = convert_pickle(folder / "adapter_model.bin", folder / "adapter_model.safetensors")
    assert out == folder / "adapter_model.safetensors"
    assert not (folder / "adapter_model.safetensors.tmp").exists()
    w = read_adapter(folder, load=True)
    _check_against_peft(w, pm)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for k, v in state.items():
            torch.testing.assert_close(f.get_tensor(k), v)


class _Marker:
    """Unpickling this would create a marker file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


@pytest.mark.parametrize("how", ["torch.save", "pickle2", "pickle5"])
def test_convert_pickle_never_executes_code(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "MARKER"
    evil = {"base_model.model.x.lora_A.weight": torch.zeros(2, 2), "payload": _Marker(str(marker))}
    src = tmp_path / "adapter_model.bin"
    if how == "torch.save":
        torch.save(evil, str(src))
    else:
        src.write_bytes(pickle.dumps(evil, protocol=int(how[-1])))
    # sanity: a plain unpickle really would run it
    assert not marker.exists()
    dest = tmp_path / "adapter_model.safetensors"
    with pytest.raises(
        InvalidAdapterError, match="could not be loaded safely with torch.load\\(weights_only=True\\)"
    ) as info:
        convert_pickle(src, dest)
    assert not marker.exists()
    assert not dest.exists() and not (tmp_path / "adapter_model.safetensors.tmp").exists()
    assert "weights_only` set to `False`" not in str(info.value)  # never advise the unsafe retry
    if how == "torch.save":
        assert "builtins.open" in str(info.value) or "GLOBAL" in str(info.value)


def test_marker_would_run_under_plain_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    pickle.loads(pickle.dumps(_Marker(str(marker))))  # what torch.load(weights_only=False) would do
    assert marker.exists()


@pytest.mark.parametrize(
    "obj, match",
    [
        ({"a": torch.zeros(2), "b": 3}, "does not hold a flat dict of tensors"),
        ({"a": {"b": torch.zeros(2)}}, "does not hold a flat dict of tensors"),
        ([torch.zeros(2)], "does not hold a flat dict of tensors"),
        ({1: torch.zeros(2)}, "does not hold a flat dict of tensors keyed by name"),
    ],
)
def test_convert_pickle_refuses_non_tensor_content(tmp_path: Path, obj: object, match: str) -> None:
    src = tmp_path / "w.bin"
    torch.save(obj, str(src))
    with pytest.raises(InvalidAdapterError, match=match):
        convert_pickle(src, tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()


def test_convert_pickle_bad_files(tmp_path: Path) -> None:
    for name, blob in (("empty.bin", b""), ("junk.bin", b"\x80\x04junk"), ("zip.bin", b"PK\x03\x04")):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(InvalidAdapterError, match="could not be loaded safely"):
            convert_pickle(tmp_path / name, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_pickle_shared_storage(tmp_path: Path) -> None:
    t = torch.randn(4, 4)
    torch.save({"a": t, "b": t, "c": t[:2]}, str(tmp_path / "w.bin"))
    out = convert_pickle(tmp_path / "w.bin", tmp_path / "w.safetensors")
    with safe_open(str(out), framework="pt") as f:
        torch.testing.assert_close(f.get_tensor("a"), t)
        torch.testing.assert_close(f.get_tensor("c"), t[:2])


def test_lora_scale() -> None:
    assert lora_scale(4, 8) == 2.0
    assert lora_scale(4, 8, use_rslora=True) == 4.0
    with pytest.raises(ValueError, match="rank must be positive"):
        lora_scale(0, 8)
