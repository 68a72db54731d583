"""merge_checkpoint against PEFT's merge_and_unload and transformers, on tiny random models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.models import (
    EXTRA_FILES,
    load_folder,
    make_adapter,
    peft_merged_state,
    peft_model,
    randomize_adapter,
    save_model,
    tiny_bert,
    tiny_convnet,
    tiny_gpt2,
    tiny_llama,
)

from adapterhub.errors import BaseModelError, IncompatibleAdapterError
from adapterhub.formats import read_adapter, write_adapter
from adapterhub.formats.checkpoint import read_checkpoint
from adapterhub.ops import MergeResult, OutputExistsError, map_keys, merge_checkpoint, needs_transpose

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[1, 5, 9, 13, 2, 40, 63, 7]])


def assert_states_close(got: dict, ref: dict, *, skip: tuple[str, ...] = (), atol: float = 1e-5) -> None:
    for name, want in ref.items():
        if name in skip:
            continue
        assert name in got, f"{name} missing from the merged checkpoint"
        assert got[name].shape == want.shape, name
        torch.testing.assert_close(got[name].float(), want.float(), atol=atol, rtol=1e-5, msg=name)


def logits(model, ids=IDS):  # noqa: ANN001, ANN201
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def no_leftovers(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):  # noqa: ANN001, ANN201
    root = tmp_path_factory.mktemp("llama")
    model = tiny_llama()
    return model, save_model(model, root / "base", shard_size="20KB"), root


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):  # noqa: ANN001, ANN201
    root = tmp_path_factory.mktemp("gpt2")
    model = tiny_gpt2()
    return model, save_model(model, root / "base"), root


# ------------------------------------------------------------------------------------------------ Llama


def test_llama_sharded_matches_peft_and_transformers(llama) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    model, base, root = llama
    ad = make_adapter(
        model,
        root / "ad-full",
        target_modules=[*LLAMA_ALL, "embed_tokens"],
        use_rslora=True,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 3},
        modules_to_save=["lm_head"],
    )
    weights = read_adapter(ad, load=True)
    seen: list[tuple[int, int]] = []
    res = merge_checkpoint(
        base, [(weights, 1.0)], root / "out-full", progress=lambda d, t: seen.append((d, t))
    )
    assert isinstance(res, MergeResult) and res.device == "cpu" and res.untied == []
    out = res.out
    # 7 linear modules x 2 layers + embed_tokens + lm_head
    assert res.tensors_changed == 16

    got, ref = load_folder(out), peft_merged_state(base, [(ad, 1.0)])
    assert set(got) == set(load_folder(base))
    assert_states_close(got, ref)
    # untouched tensors are byte copies
    base_t = load_folder(base)
    assert torch.equal(got["model.norm.weight"], base_t["model.norm.weight"])

    # same shard layout and index; other files copied; config untouched
    idx_in = json.loads((base / "model.safetensors.index.json").read_text())
    idx_out = json.loads((out / "model.safetensors.index.json").read_text())
    assert idx_out["weight_map"] == idx_in["weight_map"]
    assert idx_out["metadata"]["total_size"] == idx_in["metadata"]["total_size"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())
    for name in [*EXTRA_FILES, "config.json", "generation_config.json"]:
        assert (out / name).read_bytes() == (base / name).read_bytes()
    for shard in set(idx_in["weight_map"].values()):
        assert read_checkpoint(out).headers[shard].metadata == read_checkpoint(base).headers[shard].metadata

    # progress: monotonic, ends at the bytes written
    assert seen and seen[-1] == (res.bytes_written, res.bytes_written)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:], strict=False))

    # transformers loads it and gives PEFT's outputs
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(merged), logits(peft_model(base, [(ad, 1.0)])), atol=1e-4, rtol=1e-4)


def test_stale_weight_files_not_copied(llama, tmp_path) -> None:  # noqa: ANN001
    model, base, _ = llama
    src = tmp_path / "base"
    shutil.copytree(base, src)
    (src / "pytorch_model.bin").write_bytes(b"stale")
    (src / "onnx").mkdir()
    (src / "onnx" / "model.onnx").write_bytes(b"stale")
    (src / "onnx" / "config.json").write_text("{}")
    ad = read_adapter(make_adapter(model, tmp_path / "ad", target_modules=["q_proj"]), load=True)
    res = merge_checkpoint(src, [(ad, 1.0)], tmp_path / "out")
    assert not (res.out / "pytorch_model.bin").exists() and not (res.out / "onnx" / "model.onnx").exists()
    assert (res.out / "onnx" / "config.json").read_text() == "{}"
    assert any("pytorch_model.bin" in n and "onnx/model.onnx" in n for n in res.notes)


def test_two_adapters_with_weights_match_peft(llama) -> None:  # noqa: ANN001
    model, base, root = llama
    a = make_adapter(model, root / "ad-a", seed=2, target_modules=["q_proj", "v_proj", "gate_proj"])
    b = make_adapter(
        model,
        root / "ad-b",
        seed=3,
        r=8,
        lora_alpha=4,
        target_modules=["q_proj", "k_proj", "o_proj"],
        use_rslora=True,
    )
    pairs = [(a, 0.7), (b, -1.3)]
    res = merge_checkpoint(base, [(read_adapter(p, load=True), w) for p, w in pairs], root / "out-two")
    assert_states_close(load_folder(res.out), peft_merged_state(base, pairs))


def test_dora_matches_peft(llama) -> None:  # noqa: ANN001
    """Row norms (Linear) and column norms (Embedding), DoRA between plain adapters on one module."""
    model, base, root = llama
    d = make_adapter(
        model, root / "ad-dora", seed=4, target_modules=["v_proj", "o_proj", "embed_tokens"], use_dora=True
    )
    p1 = make_adapter(model, root / "ad-p1", seed=5, target_modules=["v_proj"])
    p2 = make_adapter(model, root / "ad-p2", seed=6, target_modules=["v_proj", "embed_tokens"])
    res = merge_checkpoint(base, [(read_adapter(d, load=True), 1.0)], root / "out-dora")
    assert_states_close(load_folder(res.out), peft_merged_state(base, [(d, 1.0)]))

    pairs = [(p1, 0.5), (d, 0.8), (p2, -0.6)]
    res = merge_checkpoint(base, [(read_adapter(p, load=True), w) for p, w in pairs], root / "out-dora-mix")
    assert_states_close(load_folder(res.out), peft_merged_state(base, pairs))

    with pytest.raises(IncompatibleAdapterError, match="several DoRA"):
        merge_checkpoint(base, [(read_adapter(d, load=True), 1.0)] * 2, root / "out-dora2")
    no_leftovers(root, root / "out-dora2")


def test_bf16_rounds_once(tmp_path) -> None:  # noqa: ANN001
    model = tiny_llama(seed=7, hidden_size=64, intermediate_size=96)
    base = save_model(model.to(torch.bfloat16), tmp_path / "base")
    fp32 = tiny_llama(seed=7, hidden_size=64, intermediate_size=96)
    a = make_adapter(fp32, tmp_path / "a", seed=8, target_modules=LLAMA_ALL, r=8)
    b = make_adapter(
        fp32, tmp_path / "b", seed=9, target_modules=["q_proj", "down_proj"], r=4, use_rslora=True
    )
    wa, wb = read_adapter(a, load=True), read_adapter(b, load=True)
    res = merge_checkpoint(base, [(wa, 1.0), (wb, -0.45)], tmp_path / "out")
    got, base_t = load_folder(res.out), load_folder(base)

    def key(x: torch.Tensor) -> torch.Tensor:  # bf16 bit patterns in monotone integer order
        bits = x.view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    equal = total = 0
    for name in wa:
        want = base_t[name].double()
        for w, ad in ((1.0, wa), (-0.45, wb)):
            if name in ad:
                want = want + w * ad[name].scale * (ad[name].B.double() @ ad[name].A.double())
        want = want.to(torch.bfloat16)
        assert got[name].dtype == torch.bfloat16
        ulps = (key(got[name]) - key(want)).abs()
        assert int(ulps.max()) <= 1, name
        equal += int((ulps == 0).sum())
        total += ulps.numel()
    assert equal / total >= 0.999


def test_unmerge_recovers_base(llama) -> None:  # noqa: ANN001
    model, base, root = llama
    a = make_adapter(model, root / "ad-un", seed=10, target_modules=[*LLAMA_ALL, "embed_tokens"])
    pairs = [(read_adapter(a, load=True), 0.9)]
    merged = merge_checkpoint(base, pairs, root / "out-m").out
    back = merge_checkpoint(merged, pairs, root / "out-un", unmerge=True).out
    got, want = load_folder(back), load_folder(base)
    assert_states_close(got, want, atol=1e-5)
    assert not torch.equal(
        load_folder(merged)["model.layers.0.self_attn.q_proj.weight"],
        want["model.layers.0.self_attn.q_proj.weight"],
    )


def test_dtype_conversion(llama) -> None:  # noqa: ANN001
    model, base, root = llama
    a = make_adapter(model, root / "ad-dt", seed=11, target_modules=["q_proj"])
    w = read_adapter(a, load=True)
    res = merge_checkpoint(base, [(w, 1.0)], root / "out-bf16", dtype="bfloat16")
    got, ref = load_folder(res.out), peft_merged_state(base, [(a, 1.0)])
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    for name, t in got.items():
        assert torch.equal(t, ref[name].to(torch.bfloat16)) or (t.float() - ref[name]).abs().max() < 1e-2, (
            name
        )
    assert json.loads((res.out / "config.json").read_text())["dtype"] == "bfloat16"
    assert any("bfloat16" in n for n in res.notes)


# ------------------------------------------------------------------------------------------------ GPT-2


def test_gpt2_conv1d_and_lora_bias_match_peft(gpt2) -> None:  # noqa: ANN001
    model, base, root = gpt2
    ad = make_adapter(model, root / "ad", target_modules=["c_attn", "c_proj", "c_fc"], lora_bias=True)
    res = merge_checkpoint(base, [(read_adapter(ad, load=True), 1.0)], root / "out")
    got, ref = load_folder(res.out), peft_merged_state(base, [(ad, 1.0)])
    assert_states_close(got, ref, skip=("lm_head.weight",))  # tied to wte, absent from the files
    assert "lm_head.weight" not in got and res.untied == []
    assert not torch.equal(
        got["transformer.h.0.attn.c_proj.bias"], load_folder(base)["transformer.h.0.attn.c_proj.bias"]
    )

    dora = make_adapter(model, root / "ad-dora", seed=3, target_modules=["c_attn", "c_proj"], use_dora=True)
    res = merge_checkpoint(base, [(read_adapter(dora, load=True), 1.0)], root / "out-dora")
    assert_states_close(
        load_folder(res.out), peft_merged_state(base, [(dora, 1.0)]), skip=("lm_head.weight",)
    )


@pytest.mark.parametrize("sharded", [False, True])
def test_gpt2_tied_embedding_is_untied(gpt2, tmp_path, sharded) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    model, base, root = gpt2
    if sharded:
        base = save_model(model, tmp_path / "sharded", shard_size="30KB")
    ad = make_adapter(model, root / "ad-wte", seed=4, target_modules=["wte", "c_attn"])
    res = merge_checkpoint(base, [(read_adapter(ad, load=True), 1.0)], tmp_path / "out-wte")
    assert res.untied == ["lm_head.weight"]
    if sharded:
        wmap = json.loads((res.out / "model.safetensors.index.json").read_text())["weight_map"]
        assert wmap["lm_head.weight"] == wmap["transformer.wte.weight"]
    assert json.loads((res.out / "config.json").read_text())["tie_word_embeddings"] is False
    got = load_folder(res.out)
    assert torch.equal(got["lm_head.weight"], load_folder(base)["transformer.wte.weight"])
    merged = AutoModelForCausalLM.from_pretrained(res.out).eval()
    torch.testing.assert_close(logits(merged), logits(peft_model(base, [(ad, 1.0)])), atol=1e-4, rtol=1e-4)


def test_gpt2_tied_head_replaced_by_modules_to_save(gpt2, tmp_path) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    model, base, root = gpt2
    ad = make_adapter(model, tmp_path / "ad", seed=8, target_modules=["c_attn"], modules_to_save=["lm_head"])
    res = merge_checkpoint(base, [(read_adapter(ad, load=True), 1.0)], tmp_path / "out")
    assert res.untied == ["lm_head.weight"] and res.tensors_changed == 3  # c_attn x 2, lm_head
    got = load_folder(res.out)
    assert torch.equal(got["transformer.wte.weight"], load_folder(base)["transformer.wte.weight"])
    merged = AutoModelForCausalLM.from_pretrained(res.out).eval()
    torch.testing.assert_close(logits(merged), logits(peft_model(base, [(ad, 1.0)])), atol=1e-4, rtol=1e-4)


def test_gpt2_square_conv1d_needs_model_type(gpt2, tmp_path) -> None:  # noqa: ANN001
    model, base, root = gpt2
    nomt = save_model(model, tmp_path / "nomt")
    cfg = json.loads((nomt / "config.json").read_text())
    del cfg["model_type"]
    (nomt / "config.json").write_text(json.dumps(cfg))
    ad = make_adapter(model, root / "ad-sq", seed=5, target_modules=["c_proj"])
    weights = read_adapter(ad, load=True)
    assert weights.config["fan_in_fan_out"] is True  # PEFT 0.21 saves what it set at load time...
    weights.config["fan_in_fan_out"] = False  # ...older versions saved false
    with pytest.raises(IncompatibleAdapterError, match="model_type"):
        merge_checkpoint(nomt, [(weights, 1.0)], tmp_path / "out")
    no_leftovers(tmp_path, tmp_path / "out")
    res = merge_checkpoint(nomt, [(read_adapter(ad, load=True), 1.0)], tmp_path / "out")
    assert_states_close(load_folder(res.out), peft_merged_state(base, [(ad, 1.0)]), skip=("lm_head.weight",))


def test_lora_bias_without_base_bias_refused(gpt2, tmp_path) -> None:  # noqa: ANN001
    from safetensors.torch import save_file

    model, base, root = gpt2
    ad = make_adapter(model, root / "ad-bias", seed=6, target_modules=["c_fc"], lora_bias=True)
    nobias = tmp_path / "nobias"
    nobias.mkdir()
    state = {k: v for k, v in load_folder(base).items() if not k.endswith("mlp.c_fc.bias")}
    save_file(state, str(nobias / "model.safetensors"), metadata={"format": "pt"})
    (nobias / "config.json").write_bytes((base / "config.json").read_bytes())
    with pytest.raises(IncompatibleAdapterError, match=r"c_fc\.bias") as err:
        merge_checkpoint(nobias, [(read_adapter(ad, load=True), 1.0)], tmp_path / "out")
    assert "nothing was written" in str(err.value)
    no_leftovers(tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------------------------ BERT, conv


def test_bert_modules_to_save_matches_peft(tmp_path) -> None:  # noqa: ANN001
    from transformers import AutoModelForSequenceClassification as Loader

    model = tiny_bert()
    base = save_model(model, tmp_path / "base")
    ad = make_adapter(
        model, tmp_path / "ad", target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    res = merge_checkpoint(base, [(read_adapter(ad, load=True), 1.0)], tmp_path / "out")
    ref = peft_merged_state(base, [(ad, 1.0)], loader=Loader)
    got = load_folder(res.out)
    assert_states_close(got, ref)
    assert not torch.equal(got["classifier.weight"], load_folder(base)["classifier.weight"])
    merged = Loader.from_pretrained(res.out).eval()
    with torch.no_grad():
        want = peft_model(base, [(ad, 1.0)], loader=Loader)(input_ids=IDS).logits
        torch.testing.assert_close(merged(input_ids=IDS).logits, want, atol=1e-4, rtol=1e-4)


def test_conv_lora_and_kohya_match_peft(tmp_path) -> None:  # noqa: ANN001
    import copy

    from peft import LoraConfig, get_peft_model

    model = tiny_convnet()
    base = save_model(model, tmp_path / "base")
    pm = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=2, lora_alpha=3, target_modules=["conv_in", "mid", "conv_out"])
    )
    randomize_adapter(pm, 7)
    pm.save_pretrained(tmp_path / "ad")
    ref = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    weights = read_adapter(tmp_path / "ad", load=True)
    res = merge_checkpoint(base, [(weights, 1.0)], tmp_path / "out")
    assert_states_close(load_folder(res.out), ref)

    kohya = write_adapter(weights, tmp_path / "k.safetensors", format="kohya")
    kw = read_adapter(kohya, load=True)
    assert all(k.startswith("lora_unet_") for k in kw)
    res = merge_checkpoint(base, [(kw, 1.0)], tmp_path / "out-kohya")
    assert_states_close(load_folder(res.out), ref)


def test_kohya_linear_lora_on_1x1_conv(tmp_path) -> None:  # noqa: ANN001
    from safetensors.torch import save_file

    model = tiny_convnet()
    base = save_model(model, tmp_path / "base")
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
    save_file(
        {
            "lora_unet_mid.lora_down.weight": down,
            "lora_unet_mid.lora_up.weight": up,
            "lora_unet_mid.alpha": torch.tensor(4.0),
        },
        str(tmp_path / "k.safetensors"),
    )
    res = merge_checkpoint(
        base, [(read_adapter(tmp_path / "k.safetensors", load=True), 0.5)], tmp_path / "out"
    )
    want = model.mid.weight.detach() + 0.5 * 2.0 * (up @ down)[:, :, None, None]
    torch.testing.assert_close(load_folder(res.out)["mid.weight"], want)


# ------------------------------------------------------------------------------------------------ refusals


def test_two_different_replacements_refused(llama, tmp_path) -> None:  # noqa: ANN001
    model, base, _ = llama
    a = make_adapter(model, tmp_path / "a", seed=1, target_modules=["q_proj"], modules_to_save=["lm_head"])
    b = make_adapter(model, tmp_path / "b", seed=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(IncompatibleAdapterError, match="cannot both replace") as err:
        merge_checkpoint(
            base, [(read_adapter(a, load=True), 1.0), (read_adapter(b, load=True), 1.0)], tmp_path / "out"
        )
    assert "lm_head.weight" in str(err.value)
    no_leftovers(tmp_path, tmp_path / "out")


def test_incompatible_adapter_refused(llama, tmp_path) -> None:  # noqa: ANN001
    _, base, root = llama
    other = tiny_llama(hidden_size=48, intermediate_size=64)
    ad = make_adapter(other, tmp_path / "ad48", target_modules=["q_proj"])
    with pytest.raises(IncompatibleAdapterError, match=r"q_proj.*\[48, 48\].*\[32, 32\]") as err:
        merge_checkpoint(base, [(read_adapter(ad, load=True), 1.0)], tmp_path / "out")
    assert "nothing was written" in str(err.value)
    no_leftovers(tmp_path, tmp_path / "out")

    g = make_adapter(tiny_gpt2(), tmp_path / "adg", target_modules=["c_attn"])
    with pytest.raises(
        IncompatibleAdapterError, match=r"match no base tensor \(transformer\.h\.0\.attn\.c_attn"
    ):
        merge_checkpoint(base, [(read_adapter(g, load=True), 1.0)], tmp_path / "out")
    no_leftovers(tmp_path, tmp_path / "out")


def test_failure_midway_leaves_nothing(llama, tmp_path) -> None:  # noqa: ANN001
    model, base, _ = llama
    ad = read_adapter(make_adapter(model, tmp_path / "ad", target_modules=LLAMA_ALL), load=True)
    threads = torch.get_num_threads()

    def stop(done: int, total: int) -> None:
        if done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge_checkpoint(base, [(ad, 1.0)], tmp_path / "out", progress=stop)
    no_leftovers(tmp_path, tmp_path / "out")
    assert torch.get_num_threads() == threads


def test_out_exists_and_bad_args(llama, tmp_path) -> None:  # noqa: ANN001
    model, base, root = llama
    ad = read_adapter(make_adapter(model, tmp_path / "ad", target_modules=["q_proj"]), load=True)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    with pytest.raises(OutputExistsError, match="already exists"):
        merge_checkpoint(base, [(ad, 1.0)], tmp_path / "taken")
    assert (tmp_path / "taken" / "x").read_text() == "keep me"
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    assert (merge_checkpoint(base, [(ad, 1.0)], tmp_path / "empty").out / "config.json").is_file()
    with pytest.raises(OutputExistsError, match="inside the base"):
        merge_checkpoint(base, [(ad, 1.0)], base / "merged")
    with pytest.raises(ValueError, match="dtype"):
        merge_checkpoint(base, [(ad, 1.0)], tmp_path / "o", dtype="int8")
    with pytest.raises(BaseModelError, match="no such folder"):
        merge_checkpoint(tmp_path / "nope", [(ad, 1.0)], tmp_path / "o")
    unmergeable = read_adapter(
        make_adapter(model, tmp_path / "d", target_modules=["q_proj"], use_dora=True), load=True
    )
    with pytest.raises(IncompatibleAdapterError, match="DoRA"):
        merge_checkpoint(base, [(unmergeable, 1.0)], tmp_path / "o", unmerge=True)
    no_leftovers(tmp_path, tmp_path / "o")


# ------------------------------------------------------------------------------------------------ parts


def test_read_checkpoint(llama, tmp_path) -> None:  # noqa: ANN001
    model, sharded, _ = llama
    single = save_model(model, tmp_path / "single")
    a, b = read_checkpoint(sharded), read_checkpoint(single)
    assert a.sharded and not b.sharded and len(a.shards) > 1 and b.shards == ("model.safetensors",)
    assert a.fingerprint == b.fingerprint and a.num_params == b.num_params == sum(
        p.numel() for p in model.parameters()
    )
    assert a.model_type == "llama" and a.architectures == ("LlamaForCausalLM",)
    shard, info = a.tensors["model.norm.weight"]
    assert info.shape == (32,) and (sharded / shard).is_file()

    broken = tmp_path / "broken"
    broken.mkdir()
    for p in sharded.iterdir():
        if p.name != a.shards[-1]:
            (broken / p.name).write_bytes(p.read_bytes())
    with pytest.raises(BaseModelError, match="incomplete download"):
        read_checkpoint(broken)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match="no .safetensors file"):
        read_checkpoint(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(BaseModelError, match="not a valid safetensors"):
        read_checkpoint(tmp_path / "bad")


def test_map_keys() -> None:
    base = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "lm_head.weight",
        "bert.encoder.layer.0.attention.self.query.weight",
        "down_blocks.0.attentions.0.proj_in.weight",
        "text_model.encoder.layers.0.self_attn.q_proj.weight",
    ]
    m = map_keys(
        [
            "model.layers.0.self_attn.q_proj.weight",  # exact
            "base_model.model.model.layers.1.self_attn.q_proj.weight",  # peft prefix
            "layers.1.self_attn.q_proj.weight",  # missing model.
            "encoder.layer.0.attention.self.query.weight",  # unique suffix
            "lora_unet_down_blocks_0_attentions_0_proj_in",  # kohya unet
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj",  # kohya text encoder
            "self_attn.q_proj.weight",  # two layers end like this
            "model.layers.9.mlp.up_proj.weight",  # nothing
        ],
        base,
    )
    assert m.mapping == {
        "model.layers.0.self_attn.q_proj.weight": "model.layers.0.self_attn.q_proj.weight",
        "base_model.model.model.layers.1.self_attn.q_proj.weight": "model.layers.1.self_attn.q_proj.weight",
        "layers.1.self_attn.q_proj.weight": "model.layers.1.self_attn.q_proj.weight",
        "encoder.layer.0.attention.self.query.weight": "bert.encoder.layer.0.attention.self.query.weight",
        "lora_unet_down_blocks_0_attentions_0_proj_in": "down_blocks.0.attentions.0.proj_in.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "text_model.encoder.layers.0.self_attn.q_proj.weight",
    }
    assert m.unmatched == ["model.layers.9.mlp.up_proj.weight"]
    # tails too short to mean anything do not match: "conv_in" inside a longer kohya stem
    k = map_keys(
        ["lora_unet_down_blocks_0_resnets_0_conv_in", "extra.lm_head.weight"],
        ["conv_in.weight", "lm_head.weight"],
    )
    assert k.unmatched == ["lora_unet_down_blocks_0_resnets_0_conv_in"]
    assert k.mapping == {"extra.lm_head.weight": "lm_head.weight"}
    assert (
        list(m.ambiguous) == ["self_attn.q_proj.weight"] and len(m.ambiguous["self_attn.q_proj.weight"]) == 3
    )
    assert not m.ok


def test_needs_transpose() -> None:
    key = "transformer.h.0.attn.c_proj.weight"
    assert needs_transpose("x.c_attn.weight", (96, 32), (32, 96), model_type=None) is True  # shapes decide
    assert needs_transpose("x.q_proj.weight", (16, 32), (16, 32), model_type=None) is False
    assert needs_transpose(key, (32, 32), (32, 32), model_type="gpt2") is True
    assert (
        needs_transpose("transformer.h.0.attn.c_proj.weight", (32, 32), (32, 32), model_type="gpt_bigcode")
        is False
    )
    assert (
        needs_transpose("model.layers.0.self_attn.o_proj.weight", (32, 32), (32, 32), model_type="llama")
        is False
    )
    assert needs_transpose("lm_head.weight", (64, 64), (64, 64), model_type="gpt2") is False
    assert needs_transpose(key, (32, 32), (32, 32), model_type=None, fan_in_fan_out=True) is True
    with pytest.raises(IncompatibleAdapterError, match="model_type"):
        needs_transpose(key, (32, 32), (32, 32), model_type=None)
    with pytest.raises(IncompatibleAdapterError, match="different base model"):
        needs_transpose(key, (32, 16), (32, 32), model_type="gpt2")


def test_ops_runs_with_only_torch_and_safetensors(llama, tmp_path) -> None:  # noqa: ANN001
    """A GPU box may have only torch and safetensors: import adapterhub.ops and merge with the rest blocked."""
    model, base, _ = llama
    ad = make_adapter(model, tmp_path / "ad", target_modules=["q_proj"])
    blocked = [
        "sqlalchemy",
        "jsonschema",
        "alembic",
        "click",
        "rich",
        "yaml",
        "huggingface_hub",
        "transformers",
        "peft",
    ]
    code = (
        "import sys\n"
        f"for m in {blocked!r}: sys.modules[m] = None\n"
        "from adapterhub.formats import read_adapter\n"
        "from adapterhub.ops import merge_checkpoint\n"
        f"r = merge_checkpoint({str(base)!r}, [(read_adapter({str(ad)!r}, load=True), 1.0)], {str(tmp_path / 'out')!r})\n"
        "assert r.tensors_changed == 2, r\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
