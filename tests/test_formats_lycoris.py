"""LoHa, LoKr (PEFT's and LyCORIS / kohya layouts), block-diagonal LoRA and KaSA: read as exact LoRA
factors, checked against PEFT (``get_delta_weight``, merged logits), through catalog, validate, merge,
export and the runtime."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.models import save_model, tiny_convnet, tiny_llama
from safetensors.torch import load_file, save_file

from adapterhub import Hub
from adapterhub.errors import IncompatibleAdapterError, InvalidAdapterError, InvalidOptionError
from adapterhub.formats import detect, read_adapter, write_adapter
from adapterhub.lora import LoraWeights
from adapterhub.ops import check_base, combine, merge_checkpoint, resolve_with, resolve_with_base
from adapterhub.ops.validate import BaseLayout

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.tensor([[3, 14, 15, 9, 26, 5, 35, 8]])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tiny_llama(0), tmp_path_factory.mktemp("base") / "tiny")


def _base(base_dir: Path) -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(base_dir)).eval()


def _randomize(pm: Any, seed: int) -> None:
    """PEFT starts every variant as a no-op; fill all adapter tensors so each one changes something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if any(k in name for k in ("lora_", "hada_", "lokr_")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _make(model: Any, config: Any, dest: Path, seed: int = 1) -> Path:
    from peft import get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(model), config)
    _randomize(pm, seed)
    pm.save_pretrained(str(dest))
    return dest


def _configs() -> dict[str, Any]:
    from peft import BdLoraConfig, KasaConfig, LoHaConfig, LoKrConfig, LoraConfig

    return {
        "loha": LoHaConfig(r=3, alpha=6, target_modules=TARGETS, rank_pattern={"down_proj": 2}),
        # r=2 < half the factor sides: w1 and w2 both decomposed (factored, rank 4)
        "lokr_low": LoKrConfig(r=2, alpha=3, target_modules=TARGETS, decompose_both=True),
        # r=8: w1 and w2 full (the update is dense: exact factors of full rank)
        "lokr_full": LoKrConfig(r=8, alpha=4, target_modules=TARGETS),
        "bdlora": LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=TARGETS,
            use_bdlora=BdLoraConfig(
                target_modules_bd_a=["down_proj"], target_modules_bd_b=["q_proj", "v_proj"], nblocks=2
            ),
        ),
        "kasa": LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, kasa_config=KasaConfig()),
    }


KINDS = list(_configs())


@pytest.fixture(scope="module")
def made(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    base = _base(base_dir)
    return {k: _make(base, cfg, root / k, seed=i + 1) for i, (k, cfg) in enumerate(_configs().items())}


def _peft(base_dir: Path, folder: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(_base(base_dir), str(folder)).eval()


def _reference_delta(layer: Any) -> torch.Tensor:
    """PEFT's own delta of a layer, through the variant that owns it."""
    from peft.tuners.lora.variants import BdLoraLinearVariant, KasaLinearVariant

    variant = getattr(layer, "lora_variant", {}).get("default")
    if isinstance(variant, BdLoraLinearVariant):
        return BdLoraLinearVariant._get_bdlora_delta_weight(layer, "default")
    if isinstance(variant, KasaLinearVariant):
        return KasaLinearVariant._get_delta_weight(layer, "default")
    return layer.get_delta_weight("default")


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def assert_deltas_match(weights: LoraWeights, pm: Any) -> None:
    assert weights.modules
    for m in weights.values():
        layer = pm.base_model.model.get_submodule(m.module)
        ref = _reference_delta(layer).detach()
        torch.testing.assert_close(m.delta().reshape(ref.shape), ref, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------- PEFT layouts


@pytest.mark.parametrize("kind", KINDS)
def test_delta_equals_peft_get_delta_weight(kind: str, made: dict[str, Path], base_dir: Path) -> None:
    weights = read_adapter(made[kind], load=True)
    pm = _peft(base_dir, made[kind])
    assert_deltas_match(weights, pm)
    variant = {"lokr_low": "lokr", "lokr_full": "lokr"}.get(kind, kind)
    assert {m.variant for m in weights.values()} == {variant}
    stored = sum(t.numel() for t in load_file(str(made[kind] / "adapter_model.safetensors")).values())
    assert weights.num_params == stored  # what the file holds, not the size of the factors
    if kind == "lokr_low":
        assert weights.rank == 8  # 4 (w1 full, 4x4) * 2 (w2 decomposed): factored, not dense (32)
    if kind == "loha":
        assert {m.rank for m in weights.values()} == {9, 4}  # r^2, with rank_pattern for down_proj


@pytest.mark.parametrize("kind", KINDS)
def test_merge_equals_peft_merged_model(
    kind: str, made: dict[str, Path], base_dir: Path, tmp_path: Path
) -> None:
    weights = read_adapter(made[kind], load=True)
    merge_checkpoint(base_dir, [weights], tmp_path / "merged", device="cpu")
    from transformers import LlamaForCausalLM

    ours = _logits(LlamaForCausalLM.from_pretrained(str(tmp_path / "merged")).eval())
    pm = _peft(base_dir, made[kind])
    unmerged = _logits(pm)
    reference = _logits(pm.merge_and_unload())
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unmerged, reference, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, _logits(_base(base_dir)), atol=1e-3)  # it changed something


def test_kasa_needs_the_base_and_resolves_exactly(made: dict[str, Path], base_dir: Path) -> None:
    weights = read_adapter(made["kasa"], load=True)
    assert weights.needs_base and "KaSA" in weights.describe_kind()
    with pytest.raises(IncompatibleAdapterError, match="KaSA removes the base weight's smallest singular"):
        combine([(weights, 1.0)])
    resolved = resolve_with_base(weights, base_dir)
    assert not resolved.needs_base and resolved.rank == 8  # r of the adapter + r removed components
    base = _base(base_dir)
    pm = _peft(base_dir, made["kasa"])  # PEFT truncates the base weights on load
    for m in resolved.values():
        w0 = base.get_submodule(m.module).weight.detach()
        layer = pm.base_model.model.get_submodule(m.module)
        effective = layer.get_base_layer().weight.detach() + _reference_delta(layer).detach()
        torch.testing.assert_close(w0 + m.delta(), effective, rtol=0, atol=2e-6)
    live = resolve_with(weights, lambda key: base.get_submodule(key[: -len(".weight")]).weight)
    for key, m in resolved.items():  # from a live model's parameters, as a runtime would
        torch.testing.assert_close(live[key].delta(), m.delta(), rtol=0, atol=0)
    # resolved, it combines (and resizes) as plain LoRA
    result = combine([(resolved, 0.5)])
    assert result.weights.modules
    with pytest.raises(IncompatibleAdapterError, match="cannot be unmerged"):
        merge_checkpoint(base_dir, [weights], base_dir.parent / "never", unmerge=True, device="cpu")
    assert not (base_dir.parent / "never").exists()


def test_kasa_rank_must_leave_a_component(made: dict[str, Path], base_dir: Path) -> None:
    weights = read_adapter(made["kasa"])
    from adapterhub.formats.checkpoint import read_checkpoint

    layout = BaseLayout.from_checkpoint(read_checkpoint(base_dir))
    assert not [c for c in check_base(weights, layout) if c.status == "error"]
    m = next(iter(weights.values()))
    m.base_svd_drop = 99
    bad = [c for c in check_base(weights, layout) if c.status == "error"]
    assert bad and "removes 99 singular components" in bad[0].message


@pytest.mark.parametrize("kind", ["loha", "lokr_low", "bdlora", "kasa"])
def test_peft_export_loads_in_peft_with_the_same_outputs(
    kind: str, made: dict[str, Path], base_dir: Path, tmp_path: Path
) -> None:
    weights = read_adapter(made[kind], load=True)
    out = write_adapter(weights, tmp_path / "exported", format="peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "use_bdlora" not in config
    assert bool(config.get("kasa_config")) == (kind == "kasa")
    again = read_adapter(out, load=True)
    for key, m in weights.items():
        torch.testing.assert_close(again[key].delta(), m.delta(), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        _logits(_peft(base_dir, out)), _logits(_peft(base_dir, made[kind])), rtol=1e-4, atol=1e-5
    )
    if kind in ("loha", "lokr_low", "bdlora"):
        from safetensors import safe_open

        with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
            assert f.metadata()["adapterhub.converted_from"] == {"lokr_low": "lokr"}.get(kind, kind)


def test_kasa_kohya_export_is_refused(made: dict[str, Path], tmp_path: Path) -> None:
    weights = read_adapter(made["kasa"], load=True)
    with pytest.raises(InvalidAdapterError, match="KaSA removes singular components of the base weight"):
        write_adapter(weights, tmp_path / "k.safetensors", format="kohya")
    assert not (tmp_path / "k.safetensors").exists()


@pytest.mark.parametrize("kind", ["loha", "lokr_full", "bdlora", "kasa"])
def test_catalog_validate_merge_export_through_the_hub(
    kind: str, made: dict[str, Path], base_dir: Path, tmp_path: Path, hub: Hub
) -> None:
    info = hub.add_adapter(made[kind], name=kind)
    word = {"loha": "LoHa", "lokr_full": "LoKr", "bdlora": "block-diagonal LoRA", "kasa": "KaSA"}[kind]
    assert word in info.metadata["adapterhub.kind"]
    shown = hub.adapter_info(kind)
    assert shown.num_params == read_adapter(made[kind]).num_params
    hub.add_base(base_dir, name="tiny")
    report = hub.validate(kind, base="tiny")
    assert report.ok, report
    hub.merge("tiny", [kind], out=tmp_path / "merged")
    from transformers import LlamaForCausalLM

    ours = _logits(LlamaForCausalLM.from_pretrained(str(tmp_path / "merged")).eval())
    torch.testing.assert_close(
        ours, _logits(_peft(base_dir, made[kind]).merge_and_unload()), rtol=1e-4, atol=1e-5
    )
    copied = hub.export_adapter(kind, tmp_path / "copy")  # its own format: the stored files as they are
    assert (copied / "adapter_config.json").read_text() == (made[kind] / "adapter_config.json").read_text()
    if kind != "kasa":
        kohya = hub.export_adapter(kind, tmp_path / "k.safetensors", format="kohya")
        back = read_adapter(kohya, load=True)
        assert back.variants == []  # written as the plain LoRA it equals
        src = read_adapter(made[kind], load=True)
        for m in src.values():
            stem = "lora_unet_" + m.module.replace(".", "_")
            torch.testing.assert_close(back[stem].delta(), m.delta(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["loha", "lokr_low", "bdlora"])
def test_runtime_matches_peft(kind: str, made: dict[str, Path], base_dir: Path) -> None:
    from adapterhub.runtime import attach

    rt = attach(_base(base_dir))
    rt.load(made[kind], name=kind)
    rt.activate(kind)
    torch.testing.assert_close(_logits(rt.model), _logits(_peft(base_dir, made[kind])), rtol=1e-4, atol=1e-5)
    rt.detach()


def test_runtime_applies_kasa_as_peft(made: dict[str, Path], base_dir: Path) -> None:
    """KaSA on a live model: its update is resolved from the live weights (the SVD PEFT takes at load) into
    exact factors, so the runtime's logits equal PEFT's, and switching it off gives the base again."""
    from adapterhub.runtime import attach

    model = _base(base_dir)
    plain = _logits(model)
    rt = attach(model)
    rt.load(made["kasa"], name="kasa")
    rt.activate("kasa")
    torch.testing.assert_close(
        _logits(rt.model), _logits(_peft(base_dir, made["kasa"])), rtol=1e-4, atol=1e-4
    )
    rt.activate(None)
    torch.testing.assert_close(_logits(rt.model), plain, rtol=0, atol=0)
    rt.merge("kasa")
    with pytest.raises(InvalidOptionError, match="unmerge"):
        rt.load(made["kasa"], name="kasa-again")
    rt.unmerge()
    rt.detach()


# ------------------------------------------------------------------------------- LyCORIS / kohya files


def _lycoris_file(folder: Path, dest: Path, *, alpha: float | None, scale_w1: float = 1.0) -> Path:
    """A LyCORIS / kohya file made by hand from PEFT's tensors, under the documented key names."""
    tensors: dict[str, torch.Tensor] = {}
    for name, t in load_file(str(folder / "adapter_model.safetensors")).items():
        module, role = name[len("base_model.model.") :].rsplit(".", 1)
        stem = "lora_unet_" + module.replace(".", "_")
        tensors[f"{stem}.{role}"] = t * scale_w1 if role == "lokr_w1" else t
        if alpha is not None:
            tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(dest), metadata={"ss_network_module": "lycoris.kohya"})
    return dest


@pytest.mark.parametrize("kind", ["loha", "lokr_low", "lokr_full"])
def test_lycoris_file_reads_as_peft_computes(
    kind: str, made: dict[str, Path], base_dir: Path, tmp_path: Path
) -> None:
    cfg = json.loads((made[kind] / "adapter_config.json").read_text())
    if kind == "lokr_full":  # both sides full: LyCORIS scales by 1, so the scale goes into w1
        path = _lycoris_file(
            made[kind], tmp_path / "a.safetensors", alpha=None, scale_w1=cfg["alpha"] / cfg["r"]
        )
    else:  # LyCORIS scales by alpha / rank (of w1_b for LoHa, of the decomposed side for LoKr), as PEFT
        path = _lycoris_file(made[kind], tmp_path / "a.safetensors", alpha=cfg["alpha"])
    assert detect(path).format == "kohya"
    ours = read_adapter(path, load=True)
    peft_read = read_adapter(made[kind], load=True)
    assert len(ours) == len(peft_read)
    for m in peft_read.values():
        stem = "lora_unet_" + m.module.replace(".", "_")
        torch.testing.assert_close(ours[stem].delta(), m.delta(), rtol=0, atol=1e-6)
    merge_checkpoint(base_dir, [ours], tmp_path / "merged", device="cpu")
    from transformers import LlamaForCausalLM

    merged = _logits(LlamaForCausalLM.from_pretrained(str(tmp_path / "merged")).eval())
    torch.testing.assert_close(
        merged, _logits(_peft(base_dir, made[kind]).merge_and_unload()), rtol=1e-4, atol=1e-5
    )


def test_lycoris_file_refusals_are_one_line(made: dict[str, Path], tmp_path: Path) -> None:
    good = load_file(str(_lycoris_file(made["loha"], tmp_path / "g.safetensors", alpha=6.0)))
    stem = next(k for k in good if k.endswith(".hada_w1_a")).rsplit(".", 1)[0]
    cases = {
        "missing": ({k: v for k, v in good.items() if k != f"{stem}.hada_w2_b"}, "hada_w2_b is missing"),
        "dora": ({**good, f"{stem}.dora_scale": torch.ones(32)}, "dora_scale"),
        "mixed": ({**good, f"{stem}.lora_down.weight": torch.ones(2, 32)}, "beside LoHa / LoKr tensors"),
        "ranks": ({**good, f"{stem}.hada_w1_b": torch.ones(5, 32)}, "LoHa ranks disagree"),
    }
    for label, (tensors, needle) in cases.items():
        path = tmp_path / f"{label}.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(InvalidAdapterError, match=needle) as info:
            read_adapter(path)
        assert "\n" not in str(info.value), label


# ------------------------------------------------------------------------------------ conv layers


@pytest.mark.parametrize("algo", ["loha", "lokr"])
@pytest.mark.parametrize("effective", [True, False])
def test_conv_variants_merge_exactly(algo: str, effective: bool, tmp_path: Path) -> None:
    from peft import LoHaConfig, LoKrConfig, PeftModel

    net = tiny_convnet(0)
    base_dir = save_model(net, tmp_path / "conv")
    cls = LoHaConfig if algo == "loha" else LoKrConfig
    cfg = cls(r=2, alpha=3, target_modules=["conv_in", "conv_out"], use_effective_conv2d=effective)
    folder = _make(net, cfg, tmp_path / "ad")
    weights = read_adapter(folder, load=True)
    pm = PeftModel.from_pretrained(copy.deepcopy(net), str(folder)).eval()
    assert_deltas_match(weights, pm)
    merge_checkpoint(base_dir, [weights], tmp_path / "merged", device="cpu")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    reference = pm.merge_and_unload().state_dict()
    for name in ("conv_in.weight", "conv_out.weight"):
        torch.testing.assert_close(merged[name], reference[name], rtol=0, atol=2e-6)
    from adapterhub.lora import conv_view, flat_conv_fits

    flat = [m for m in weights.values() if flat_conv_fits(m, tuple(net.get_submodule(m.module).weight.shape))]
    assert bool(flat) == (not effective and algo == "loha")  # LoKr's full conv w2 keeps its kernel
    for m in flat:  # stored flat (out, in * kh * kw): viewed as the conv LoRA it equals
        shape = tuple(net.get_submodule(m.module).weight.shape)
        view = conv_view(m, shape)
        assert view.kind == "conv" and view.delta_shape == shape
        torch.testing.assert_close(view.delta(), m.delta().reshape(shape), rtol=0, atol=0)
    from adapterhub.runtime import attach  # the runtime applies every form, flat ones as conv LoRA

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    rt = attach(copy.deepcopy(net))
    rt.load(weights, name=algo)
    rt.activate(algo)
    with torch.no_grad():
        torch.testing.assert_close(rt.model(x), pm(x), rtol=1e-4, atol=1e-5)
    rt.detach()


# ------------------------------------------------------------------------------------ wild configs

WILD = Path(__file__).parent / "data" / "wild_configs"


def test_wild_loha_config_reads_as_peft_loads_it(base_dir: Path, tmp_path: Path) -> None:
    from peft import LoHaConfig

    text = (WILD / "loha.json").read_text(encoding="utf-8")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "adapter_config.json").write_text(text, encoding="utf-8")
    folder = _make(_base(base_dir), LoHaConfig.from_pretrained(str(tmp_path / "cfg")), tmp_path / "ad")
    (folder / "adapter_config.json").write_text(text, encoding="utf-8")
    weights = read_adapter(folder, load=True)
    assert weights.target_modules == ["q_proj", "v_proj"] and weights.rank == 32  # 8 * 8 = min(out, in)
    assert_deltas_match(weights, _peft(base_dir, folder))


def test_wild_bdlora_config_is_refused_where_peft_refuses_it(base_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    text = json.loads((WILD / "bdlora.json").read_text(encoding="utf-8"))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "adapter_config.json").write_text(json.dumps(text), encoding="utf-8")
    strict = LoraConfig.from_pretrained(str(tmp_path / "cfg"))
    with pytest.raises(ValueError, match="matches neither"):  # v_proj is in neither block list
        get_peft_model(_base(base_dir), strict)
    loose = dict(text, use_bdlora={**text["use_bdlora"], "match_strict": False}, r=4)
    (tmp_path / "cfg" / "adapter_config.json").write_text(json.dumps(loose), encoding="utf-8")
    folder = _make(_base(base_dir), LoraConfig.from_pretrained(str(tmp_path / "cfg")), tmp_path / "ad")
    weights = read_adapter(folder, load=True)
    assert {m.variant for m in weights.values()} == {"bdlora", "lora"}
    assert_deltas_match(weights, _peft(base_dir, folder))
    (folder / "adapter_config.json").write_text(json.dumps(dict(text, r=4)), encoding="utf-8")
    with pytest.raises(InvalidAdapterError, match="matches neither .* with match_strict, which PEFT refuses"):
        read_adapter(folder)


def test_vllm_check_names_the_variant(made: dict[str, Path]) -> None:
    from adapterhub.ops.targets_vllm import check_vllm

    for kind, fix in (("loha", "adapterhub resize"), ("kasa", "merge it into its base")):
        errors = [c for c in check_vllm(read_adapter(made[kind])) if c.check == "vllm.variant"]
        assert len(errors) == 1 and fix in errors[0].message, errors
    assert [c for c in check_vllm(read_adapter(made["bdlora"])) if c.check == "vllm.variant"]


def test_resolved_kasa_exports_as_plain_lora(made: dict[str, Path], base_dir: Path, tmp_path: Path) -> None:
    resolved = resolve_with_base(read_adapter(made["kasa"], load=True), base_dir)
    out = write_adapter(resolved, tmp_path / "plain", format="peft")
    assert "kasa_config" not in json.loads((out / "adapter_config.json").read_text())
    from adapterhub.ops import merge_checkpoint as merge

    merge(base_dir, [read_adapter(out, load=True)], tmp_path / "merged", device="cpu")
    from transformers import LlamaForCausalLM

    ours = _logits(LlamaForCausalLM.from_pretrained(str(tmp_path / "merged")).eval())
    torch.testing.assert_close(ours, _logits(_peft(base_dir, made["kasa"])), rtol=1e-4, atol=1e-5)


def test_show_names_the_kind(
    made: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers.cli import Cli

    cli = Cli(tmp_path / "home", capsys)
    cli("add", str(made["loha"]), "--name", "hada")
    table = cli("show", "hada")
    assert "LoHa r=2..3 (held as exact LoRA factors of rank 9)" in table
    assert cli.json("show", "hada")["metadata"]["adapterhub.kind"].startswith("LoHa")
