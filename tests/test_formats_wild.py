"""Configs of the wild (issue 16): every file in tests/data/wild_configs/ (sources in SOURCES.md) becomes a
tiny adapter; PEFT is the oracle for what it means.

- ``ok``: PEFT builds the weights on a tiny model of the config's family, the real config text replaces
  the one PEFT wrote, and adapterhub must read exactly the modules, ranks, scales, deltas, DoRA and
  biases that ``PeftModel.from_pretrained`` holds.
- ``refused``: PEFT loads these, but their math is not one adapterhub can do yet: refused by name.
- ``foreign``: not a PEFT LoRA config at all: one line that says what the file is.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from helpers.formats_fixtures import lora_layers, peft_linear_tensors, save_peft_tensors
from helpers.models import randomize_adapter

from adapterhub.errors import InvalidConfigError
from adapterhub.formats import detect, read_adapter
from adapterhub.lora import LoraWeights
from adapterhub.ops import check_integrity

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

DATA = Path(__file__).parent / "data" / "wild_configs"
CASES: list[dict[str, Any]] = json.loads((DATA / "cases.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------ tiny models


class _Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.to_out = nn.ModuleList([nn.Linear(d, d)])


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn1 = _Attention(d)
        self.attn2 = _Attention(d)


class _Transformer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(d, d)
        self.transformer_blocks = nn.ModuleList([_Block(d)])
        self.proj_out = nn.Linear(d, d)


class TinyUNet(nn.Module):
    """Module names like a diffusers UNet2DConditionModel's attention blocks."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList([nn.Module()])
        self.down_blocks[0].attentions = nn.ModuleList([_Transformer(d)])
        self.mid_block = nn.Module()
        self.mid_block.attentions = nn.ModuleList([_Transformer(d)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _model(family: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    small = dict(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    if family in ("llama", "llama_cls"):
        cfg = tf.LlamaConfig(**small, num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0)
        return tf.LlamaForCausalLM(cfg) if family == "llama" else tf.LlamaForSequenceClassification(cfg)
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**small, num_key_value_heads=1, max_position_embeddings=32))
    if family == "gemma2":
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**small, num_key_value_heads=1, head_dim=8))
    if family == "phi":
        return tf.PhiForCausalLM(tf.PhiConfig(**small, max_position_embeddings=32))
    if family == "neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**small, max_position_embeddings=32))
    if family in ("bert", "bert_cls"):
        cfg = tf.BertConfig(**small, max_position_embeddings=32)
        return tf.BertModel(cfg) if family == "bert" else tf.BertForSequenceClassification(cfg)
    if family == "t5":
        cfg = tf.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
        return tf.T5ForConditionalGeneration(cfg)
    if family == "whisper":
        cfg = tf.WhisperConfig(
            vocab_size=64,
            num_mel_bins=8,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_source_positions=16,
            max_target_positions=16,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        )
        return tf.WhisperForConditionalGeneration(cfg)
    if family == "gpt2":
        return tf.GPT2LMHeadModel(
            tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)
        )
    if family == "unet":
        return TinyUNet()
    raise AssertionError(family)


_MODELS: dict[str, nn.Module] = {}


def model(family: str) -> nn.Module:
    if family not in _MODELS:
        _MODELS[family] = _model(family).eval()
    return _MODELS[family]


def build(case: dict[str, Any], dest: Path) -> Path:
    """PEFT makes the weights from the config on a tiny model; then the real config text goes back in."""
    from peft import LoraConfig, get_peft_model

    text = (DATA / case["file"]).read_text(encoding="utf-8")
    cfg_dir = dest.parent / (dest.name + "-config")
    cfg_dir.mkdir(parents=True)
    (cfg_dir / "adapter_config.json").write_text(text, encoding="utf-8")
    config = LoraConfig.from_pretrained(str(cfg_dir))  # the oracle reads the config as it is
    torch.manual_seed(7)
    pm = get_peft_model(copy.deepcopy(model(case["family"])), config)
    randomize_adapter(pm, 7)
    pm.save_pretrained(str(dest))
    shutil.rmtree(cfg_dir)
    (dest / "adapter_config.json").write_text(text, encoding="utf-8")
    return dest


def assert_matches_peft(weights: LoraWeights, peft_model: Any) -> None:
    layers = lora_layers(peft_model)
    assert {m.module for m in weights.values()} == set(layers)
    for m in weights.values():
        layer = layers[m.module]
        assert m.rank == layer.r["default"], m.key
        assert m.scale == pytest.approx(layer.scaling["default"], rel=1e-12), m.key
        assert m.is_dora == bool(layer.use_dora["default"]), m.key
        assert (m.bias is not None) == bool(layer.lora_bias["default"]), m.key
        ours = m.delta()
        if getattr(layer, "fan_in_fan_out", False):
            ours = ours.T
        torch.testing.assert_close(ours, layer.get_delta_weight("default").detach(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ the corpus


def test_corpus_is_varied_and_documented() -> None:
    sources = (DATA / "SOURCES.md").read_text(encoding="utf-8")
    assert len(CASES) >= 40
    assert {c["expect"] for c in CASES} == {"ok", "refused", "foreign"}
    assert len({c["family"] for c in CASES if c["expect"] == "ok"}) >= 10
    for c in CASES:
        assert (DATA / c["file"]).is_file() and f"| {c['file']} |" in sources, c["file"]
    assert sum("verbatim" in c["source"] for c in CASES) >= 15


@pytest.mark.parametrize("case", [c for c in CASES if c["expect"] == "ok"], ids=lambda c: c["file"])
def test_wild_config_reads_as_peft_loads_it(case: dict[str, Any], tmp_path: Path) -> None:
    from peft import PeftModel

    folder = build(case, tmp_path / "ad")
    weights = read_adapter(folder, load=True)
    reference = PeftModel.from_pretrained(copy.deepcopy(model(case["family"])), str(folder)).eval()
    assert_matches_peft(weights, reference)
    checks, _ = check_integrity(detect(folder))
    assert not [c for c in checks if c.status == "error"], checks


@pytest.mark.parametrize("case", [c for c in CASES if c["expect"] == "refused"], ids=lambda c: c["file"])
def test_math_adapterhub_cannot_do_is_refused_by_name(case: dict[str, Any], tmp_path: Path) -> None:
    from peft import LoraConfig

    text = (DATA / case["file"]).read_text(encoding="utf-8")
    r = json.loads(text).get("r", 8)
    folder = save_peft_tensors(tmp_path / "a", peft_linear_tensors(r=r), {})
    (folder / "adapter_config.json").write_text(text, encoding="utf-8")
    LoraConfig.from_pretrained(str(folder))  # PEFT takes the config: refusing it is adapterhub's choice
    with pytest.raises(InvalidConfigError, match=case["needle"]) as info:
        read_adapter(folder)
    message = str(info.value)
    assert "\n" not in message and message.count(". ") <= 2
    key = case["needle"].split(" ")[0]
    assert info.value.key == key


@pytest.mark.parametrize("case", [c for c in CASES if c["expect"] == "foreign"], ids=lambda c: c["file"])
def test_files_that_are_not_peft_lora_configs_say_what_they_are(case: dict[str, Any], tmp_path: Path) -> None:
    folder = save_peft_tensors(tmp_path / "a", peft_linear_tensors(), {})
    shutil.copyfile(DATA / case["file"], folder / "adapter_config.json")
    with pytest.raises(InvalidConfigError, match=case["needle"]) as info:
        read_adapter(folder)
    assert "\n" not in str(info.value)
    assert "required property" not in str(info.value) and "not valid JSON" not in str(info.value)
    checks, _ = check_integrity(detect(folder))
    assert checks[0].status == "error" and case["needle"].split(";")[0] in checks[0].message


# ------------------------------------------------------------------------------------ single rules


def test_null_booleans_and_missing_r_read_as_peft_does(tmp_path: Path) -> None:
    cfg = {"peft_type": "LORA", "lora_alpha": 16, "target_modules": ["q_proj"], "fan_in_fan_out": None}
    cfg.update(use_dora=None, use_rslora=None, lora_bias=None, bias=None)
    folder = save_peft_tensors(tmp_path / "a", peft_linear_tensors(r=8), cfg)
    w = read_adapter(folder)
    m = next(iter(w.values()))
    assert (m.rank, m.scale, w.use_rslora, w.has_dora) == (8, 2.0, False, False)
    assert w.config["fan_in_fan_out"] is False and w.config["bias"] == "none"


def test_unknown_fields_are_kept_and_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "zz_new_knob_test": 1}
    folder = save_peft_tensors(tmp_path / "a", peft_linear_tensors(), cfg)
    with caplog.at_level(logging.WARNING, logger="adapterhub.formats.peft_config"):
        assert read_adapter(folder).config["zz_new_knob_test"] == 1
        read_adapter(folder)
    hits = [r for r in caplog.records if "zz_new_knob_test" in r.getMessage()]
    assert len(hits) == 1 and hits[0].levelno == logging.WARNING


def test_trained_base_biases_are_refused_by_name(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(model("bert")), LoraConfig(r=4, target_modules=["query"], bias="all"))
    pm.save_pretrained(str(tmp_path / "a"))
    with pytest.raises(Exception, match="bias is 'all' and the file holds trained base biases"):
        read_adapter(tmp_path / "a")


def test_layers_to_transform_only_restricts_the_weights_present(tmp_path: Path) -> None:
    """PEFT saves only the selected layers, and adapterhub reads what is there: no further work needed."""
    case = next(c for c in CASES if c["file"] == "layers_pattern_subset.json")
    weights = read_adapter(build(case, tmp_path / "ad"))
    assert {m.module.split(".")[2] for m in weights.values()} == {"1"}


def test_other_tools_weights_get_a_hint(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from adapterhub.errors import InvalidAdapterError

    mlx = tmp_path / "mlx"
    mlx.mkdir()
    shutil.copyfile(DATA / "mlx_lm.json", mlx / "adapter_config.json")
    save_file(
        {"model.layers.0.self_attn.q_proj.lora_a": torch.zeros(16, 4)}, str(mlx / "adapters.safetensors")
    )
    with pytest.raises(InvalidConfigError, match="MLX-LM LoRA config"):
        detect(mlx)
    (mlx / "adapter_config.json").unlink()
    with pytest.raises(
        InvalidAdapterError, match="no LoRA tensors found .*lora_a / lora_b keys are MLX-LM's"
    ):
        detect(mlx)
    lyco = tmp_path / "lyco.safetensors"
    save_file(
        {"lora_unet_x.hada_w1_a": torch.zeros(4, 4), "lora_unet_x.hada_w1_b": torch.zeros(4, 4)}, str(lyco)
    )
    assert detect(lyco).format == "kohya"  # a LyCORIS LoHa file (tests/test_formats_lycoris.py)
    with pytest.raises(InvalidAdapterError, match="lora_unet_x: LoHa tensor hada_w2_a is missing"):
        read_adapter(lyco)
    save_file({"lora_unet_x.lokr_w2": torch.zeros(4, 4)}, str(lyco))
    with pytest.raises(InvalidAdapterError, match="LoHa / LoKr tensors, but no module with its first factor"):
        detect(lyco)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({"model.norm.weight": torch.ones(4)}, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    with pytest.raises(
        InvalidAdapterError, match="looks like a model checkpoint: register it as a base model"
    ):
        detect(ckpt)


def test_kohya_base_name_is_capped(tmp_path: Path) -> None:
    from helpers.formats_fixtures import kohya_file

    from adapterhub.errors import InvalidAdapterError

    kohya_file(tmp_path / "k.safetensors", metadata={"ss_sd_model_name": "m" * 2000})
    with pytest.raises(InvalidAdapterError, match="2000 characters long, over the 512-character limit"):
        read_adapter(tmp_path / "k.safetensors")


def test_a_broken_regex_is_refused_by_name(tmp_path: Path) -> None:
    for key, value in (("target_modules", ".*(q_proj"), ("exclude_modules", "[")):
        cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], key: value}
        folder = save_peft_tensors(tmp_path / key, peft_linear_tensors(), cfg)
        with pytest.raises(InvalidConfigError, match=f"{key} is not a valid regular expression") as info:
            read_adapter(folder)
        assert info.value.key == key
