"""Merge, combine, resize and extract through the `Hub` and the CLI: catalog names, preflight
refusals, lineage and merge records, and PEFT / transformers as the oracles of the results."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from helpers.cli import home_args
from peft import PeftModel
from test_validate import llama, save_adapter
from transformers import LlamaForCausalLM

from adapterhub import AdapterExistsError, Hub, IncompatibleAdapterError
from adapterhub.cli import main
from adapterhub.resources import load_schema


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hubops")
    llama().save_pretrained(str(root / "llama"))
    llama(hidden_size=48, intermediate_size=64).save_pretrained(str(root / "wide"))
    return {
        "llama": root / "llama",
        "wide": root / "wide",
        "a": save_adapter(llama(), root / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": save_adapter(
            llama(), root / "b", r=8, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_rslora=True
        ),
        "d1": save_adapter(llama(), root / "d1", r=4, target_modules=["v_proj"], use_dora=True),
        "d2": save_adapter(llama(), root / "d2", r=4, target_modules=["v_proj"], use_dora=True),
        "w": save_adapter(
            llama(hidden_size=48, intermediate_size=64), root / "w", r=4, target_modules=["q_proj"]
        ),
    }


@pytest.fixture
def hub(new_hub, world: dict[str, Path]) -> Hub:  # type: ignore[no-untyped-def]
    h = new_hub()
    h.add_base(world["llama"], name="tiny")
    for n in ("a", "b", "d1", "d2"):
        h.add_adapter(world[n], base="tiny")
    return h


def logits(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        return model(input_ids=x).logits


def peft_applied(world: dict[str, Path], weighted: list[tuple[str, float]]) -> torch.Tensor:
    """Logits of the base with PEFT's own merge of each adapter (scaled by its weight) folded in."""
    base = LlamaForCausalLM.from_pretrained(str(world["llama"]))
    for name, w in weighted:
        pm = PeftModel.from_pretrained(base, str(world[name]))
        for mod in pm.modules():
            if hasattr(mod, "scaling") and isinstance(mod.scaling, dict):
                mod.scaling = {k: v * w for k, v in mod.scaling.items()}
        base = pm.merge_and_unload()
    return logits(base)


def test_merge_by_name_with_weights_matches_peft_and_is_recorded(
    hub: Hub, world: dict[str, Path], tmp_path: Path
) -> None:
    result = hub.merge("tiny", [("a", 1.0), ("b", -0.5)], out=tmp_path / "merged")
    assert result.tensors_changed == 6  # q (both), v (a), o (b) in two layers
    ours = logits(LlamaForCausalLM.from_pretrained(str(tmp_path / "merged")))
    torch.testing.assert_close(ours, peft_applied(world, [("a", 1.0), ("b", -0.5)]), rtol=1e-4, atol=1e-5)
    info = hub.adapter_info("b")
    assert [(m.base, m.weight) for m in info.merges or ()] == [("tiny", -0.5)]
    assert info.merges[0].out == str((tmp_path / "merged").resolve())  # type: ignore[index]
    jsonschema.validate(info.to_dict(), load_schema("adapter.schema.json"))


def test_merge_refuses_misfits_before_writing(hub: Hub, world: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(IncompatibleAdapterError, match="base weight is \\[32, 48\\]|matches no tensor|48"):
        hub.merge("tiny", [str(world["w"])], out=tmp_path / "x")
    with pytest.raises(IncompatibleAdapterError, match="both adapters use DoRA") as err:
        hub.merge("tiny", ["d1", "d2"], out=tmp_path / "x")
    assert err.value.report is not None and not err.value.report.ok  # type: ignore[attr-defined]
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x")]
    assert hub.adapter_info("d1").merges == ()


def test_combine_exact_is_loaded_by_peft_and_keeps_lineage(
    hub: Hub, world: dict[str, Path], tmp_path: Path
) -> None:
    summary = hub.combine(0.7 * hub.adapter("a") - 0.3 * hub.adapter("b"), name="mix", tags=["mix"])
    assert summary.error == pytest.approx(0.0, abs=1e-6)
    info = summary.adapter
    assert info.tags == ("mix",) and info.source == "derived:linear"
    assert [(p.name, p.weight, p.method) for p in info.parents] == [
        ("a", 0.7, "linear"),
        ("b", -0.3, "linear"),
    ]
    assert hub.adapter_info("a").children == ("mix",)
    out = hub.export_adapter("mix", tmp_path / "mix")
    base = LlamaForCausalLM.from_pretrained(str(world["llama"]))
    ours = logits(PeftModel.from_pretrained(base, str(out)).merge_and_unload())
    torch.testing.assert_close(ours, peft_applied(world, [("a", 0.7), ("b", -0.3)]), rtol=1e-4, atol=1e-5)


def test_combine_compressed_and_resize_auto(hub: Hub) -> None:
    s = hub.combine([("a", 1.0), ("b", 1.0)], name="ab4", rank=4)
    assert s.adapter.rank == 4 and 0 < s.error < 1
    assert set(s.ranks.values()) == {4}
    exact = hub.combine([("a", 1.0), ("b", 1.0)], name="ab")
    assert exact.adapter.rank == 12 and exact.adapter.rank_pattern  # q: 4 + 8, v: 4, o: 8
    r = hub.resize_adapter("ab", rank="auto", keep=0.999, new_name="ab-auto")
    assert r.error <= (1 - 0.999) ** 0.5 + 1e-9
    assert r.adapter.parents[0].name == "ab" and r.adapter.parents[0].method == "resize"


def test_combine_refusals_write_nothing(hub: Hub, world: dict[str, Path]) -> None:
    before = ([a.name for a in hub.list_adapters()], sorted(hub.store))
    with pytest.raises(IncompatibleAdapterError, match="DoRA"):
        hub.combine(["d1", "d2"], name="dd")
    with pytest.raises(IncompatibleAdapterError, match="made for different base models"):
        hub.combine(["a", str(world["w"])], name="aw")
    with pytest.raises(AdapterExistsError):
        hub.combine(["a", "b"], name="a")
    with pytest.raises(IncompatibleAdapterError, match="given twice"):
        hub.combine(["a", ("a", 2.0)], name="aa")
    assert ([a.name for a in hub.list_adapters()], sorted(hub.store)) == before


def test_extract_recovers_a_merged_delta(hub: Hub, tmp_path: Path) -> None:
    hub.merge("tiny", ["a"], out=tmp_path / "ft")
    s = hub.extract_adapter("tiny", tmp_path / "ft", rank=4, name="extracted")
    assert s.error < 1e-4 and s.adapter.num_modules == 4
    assert s.adapter.parents[0].method == "extract"


def test_cli_merge_combine_resize(
    hub: Hub, world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main([*home_args(hub), *args])
        out, err = capsys.readouterr()
        return rc, out, err

    rc, out, _ = run("merge", "tiny", "a:0.5", "b:-1", "--out", str(tmp_path / "m"), "--json")
    assert rc == 0 and json.loads(out)["tensors_changed"] == 6
    rc, out, _ = run("show", "a", "--json")
    assert json.loads(out)["merges"][0]["weight"] == 0.5
    rc, out, _ = run("combine", "a:0.7", "b:0.3", "--name", "cli-mix", "--rank", "4", "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["adapter"]["rank"] == 4 and doc["method"] == "linear"
    assert [p["name"] for p in doc["adapter"]["parents"]] == ["a", "b"]
    rc, out, _ = run("resize", "cli-mix", "--rank", "2", "--name", "cli-mix-r2")
    assert rc == 0 and "cli-mix-r2" in out
    rc, _, err = run("combine", "a", "b", "--name", "bad", "--method", "nope")
    assert rc == 1 and "unknown method 'nope'" in err and "linear" in err
    rc, _, err = run("merge", "tiny", "d1", "d2", "--out", str(tmp_path / "dd"))
    assert rc == 1 and "DoRA" in err and not (tmp_path / "dd").exists()
    hub.merge("tiny", ["b"], out=tmp_path / "ft-b")
    rc, out, _ = run(
        "extract", "tiny", str(tmp_path / "ft-b"), "--rank", "8", "--svd", "exact", "--name", "b-x", "--json"
    )
    doc = json.loads(out)
    assert rc == 0 and doc["method"] == "extract" and doc["error"] < 1e-4 and doc["params"]["svd"] == "exact"
    rc, _, err = run("resize", "a", "--rank", "zero", "--name", "a0")
    assert rc == 1 and "rank must be a positive integer or 'auto'" in err
