"""Recipes: the schema, dry runs, all-or-nothing runs, and every recipe in examples/recipes/."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from helpers.cli import home_args
from test_validate import llama, save_adapter

from adapterhub import AdapterExistsError, AdapterNotFoundError, ComposeError, Hub, IncompatibleAdapterError
from adapterhub.cli import main
from adapterhub.compose import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "examples" / "recipes").glob("*.*"))
TARGETS = [["q_proj", "v_proj"], ["q_proj", "k_proj"], ["v_proj", "o_proj"], ["q_proj"]]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compose")
    llama().save_pretrained(str(root / "llama"))
    out = {"base": root / "llama"}
    for i, t in enumerate(TARGETS):
        out[f"ad{i}"] = save_adapter(llama(), root / f"ad{i}", r=4 + 4 * i, lora_alpha=8, target_modules=t)
    out["wide"] = save_adapter(
        llama(hidden_size=48, intermediate_size=64), root / "wide", r=4, target_modules=["q_proj"]
    )
    return out


def catalog_for(hub: Hub, made: dict[str, Path], names: list[str], base_name: str | None) -> None:
    """Catalog tiny-llama adapters under the names a recipe expects (a stand-in for the real ones)."""
    hub.add_base(made["base"], name=base_name or "tiny")
    for i, n in enumerate(names):
        hub.add_adapter(made[f"ad{i % len(TARGETS)}"], name=n, base=base_name)


def snapshot(hub: Hub) -> tuple[list[str], list[str]]:
    return [a.name for a in hub.list_adapters()], sorted(hub.store)


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_example_recipes_run(recipe: Path, made: dict[str, Path], tmp_path: Path) -> None:
    plan = load_recipe(recipe)
    bases = {s.base for s in plan.steps}
    base = bases.pop() if len(bases) == 1 else None
    with Hub(tmp_path / "home") as hub:
        catalog_for(hub, made, plan.external_inputs(), base)
        before = snapshot(hub)
        dry = hub.compose(recipe, dry_run=True)
        assert dry.dry_run and snapshot(hub) == before
        result = hub.compose(recipe)
        assert [s.adapter.name for s in result.summaries] == plan.outputs
        for step, summary in zip(plan.steps, result.summaries, strict=True):
            info = hub.adapter_info(step.name)
            assert [p.name for p in info.parents] == [a for a, _ in step.inputs]
            assert info.tags == tuple(sorted(step.tags))
            if isinstance(step.rank, int):
                assert info.rank == step.rank
            if step.method == "linear" and step.rank is None:
                assert summary.error < 1e-5


RECIPE = {
    "version": 1,
    "steps": [
        {
            "name": "mix",
            "method": "linear",
            "inputs": [{"adapter": "x", "weight": 0.5}, {"adapter": "y", "weight": 0.5}],
        },
        {"name": "mix-r2", "method": "resize", "inputs": ["mix"], "rank": 2},
    ],
}


@pytest.fixture
def hub(new_hub, made: dict[str, Path]) -> Hub:  # type: ignore[no-untyped-def]
    h = new_hub()
    catalog_for(h, made, ["x", "y"], None)
    h.add_adapter(made["wide"], name="wide")
    return h


def test_failing_step_removes_earlier_outputs(hub: Hub) -> None:
    before = snapshot(hub)
    bad = json.loads(json.dumps(RECIPE))
    bad["steps"].append(
        {"name": "broken", "method": "ties", "inputs": ["mix", "x"], "density": 0.5}
    )  # no rank
    with pytest.raises(ComposeError, match="step 'broken' failed \\(removed mix, mix-r2 again\\)") as err:
        hub.compose(bad)
    assert err.value.step == "broken"
    assert snapshot(hub) == before


def test_refusals_before_anything_is_written(hub: Hub) -> None:
    before = snapshot(hub)
    with pytest.raises(RecipeError, match="steps/0: 'inputs' is a required property"):
        hub.compose({"steps": [{"name": "a", "method": "linear"}]})
    with pytest.raises(RecipeError, match="unknown method 'blend'"):
        hub.compose({"steps": [{"name": "a", "method": "blend", "inputs": ["x"]}]})
    with pytest.raises(AdapterNotFoundError, match="'nope'"):
        hub.compose({"steps": [{"name": "a", "method": "linear", "inputs": ["nope"]}]})
    with pytest.raises(AdapterExistsError, match="'x'"):
        hub.compose({"steps": [{"name": "x", "method": "linear", "inputs": ["y"]}]})
    with pytest.raises(IncompatibleAdapterError, match="step 'a'"):
        hub.compose({"steps": [{"name": "a", "method": "linear", "inputs": ["x", "wide"]}]})
    with pytest.raises(RecipeError, match="used twice"):
        hub.compose({"steps": [{"name": "a", "method": "linear", "inputs": ["x"]}] * 2})
    with pytest.raises(RecipeError, match="resize takes exactly one input"):
        hub.compose({"steps": [{"name": "a", "method": "resize", "inputs": ["x", "y"], "rank": 2}]})
    assert snapshot(hub) == before


def test_compose_cli(hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("steps:\n  - name: mix\n    method: linear\n    inputs: [x, {adapter: y, weight: -1}]\n")
    capsys.readouterr()
    assert main([*home_args(hub), "compose", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "plan of" in out and "1 x x + -1 x y" in out and "(dry run)" in out
    assert main([*home_args(hub), "--json", "compose", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["steps"][0]["result"]["adapter"]["name"] == "mix"
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [\n")
    assert main([*home_args(hub), "compose", str(bad)]) == 1
    assert "not valid YAML" in capsys.readouterr().err
