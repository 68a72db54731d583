"""Composition recipes: named steps, each a method over cataloged adapters or earlier steps.

A recipe is YAML or JSON checked against ``schemas/recipe.schema.json``. `load_recipe` parses and
checks it into a `Recipe` (a plan: steps with resolved inputs); `Hub.compose` runs it. No database here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AdapterHubError, RecipeError


@dataclass(frozen=True)
class StepPlan:
    name: str
    method: str
    inputs: tuple[tuple[str, float], ...]
    rank: int | str | None = None
    keep: float = 0.99
    density: float | None = None
    majority_sign: str = "total"
    seed: int | None = None
    base: str | None = None
    tags: tuple[str, ...] = ()
    description: str | None = None

    @property
    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rank": self.rank}
        if self.method not in ("resize", "linear", "cat", "svd"):  # the pruning methods
            out.update(density=self.density, seed=self.seed)
            if "ties" in self.method:
                out["majority_sign"] = self.majority_sign
        if self.rank == "auto":
            out["keep"] = self.keep
        return {k: v for k, v in out.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "method": self.method,
            "inputs": [{"adapter": a, "weight": w} for a, w in self.inputs],
            "params": self.params,
            "base": self.base,
            "tags": list(self.tags),
            "description": self.description,
        }


@dataclass(frozen=True)
class Recipe:
    path: str
    steps: tuple[StepPlan, ...]
    description: str | None = None

    @property
    def outputs(self) -> list[str]:
        return [s.name for s in self.steps]

    def external_inputs(self) -> list[str]:
        """Inputs that are not made by an earlier step: they must be cataloged."""
        made: set[str] = set()
        out: list[str] = []
        for s in self.steps:
            for a, _ in s.inputs:
                if a not in made and a not in out:
                    out.append(a)
            made.add(s.name)
        return out


@dataclass(frozen=True)
class ComposeResult:
    recipe: Recipe
    dry_run: bool
    summaries: tuple[Any, ...] = field(default_factory=tuple)  # CombineSummary per step when run

    def to_dict(self) -> dict[str, Any]:
        steps = []
        for i, s in enumerate(self.recipe.steps):
            d = s.to_dict()
            if i < len(self.summaries):
                d["result"] = self.summaries[i].to_dict()
            steps.append(d)
        return {"recipe": self.recipe.path, "dry_run": self.dry_run, "steps": steps}


def parse_recipe_text(text: str, *, path: str = "<recipe>") -> dict[str, Any]:
    if path.endswith(".json"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"{path}: not valid JSON ({exc})", path=path) from None
    else:
        import yaml

        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})", path=path) from None
    if not isinstance(doc, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with a 'steps' list", path=path)
    return doc


def load_recipe(source: str | os.PathLike[str] | dict[str, Any]) -> Recipe:
    """Parse and check a recipe file (or an already-parsed mapping) into a `Recipe`."""
    if isinstance(source, dict):
        path, doc = "<recipe>", source
    else:
        path = str(source)
        try:
            text = Path(source).read_text(encoding="utf-8")
        except OSError as exc:
            raise RecipeError(f"{path}: cannot read the recipe ({exc.strerror or exc})", path=path) from None
        doc = parse_recipe_text(text, path=path)
    import jsonschema

    from .resources import load_schema

    validator = jsonschema.Draft202012Validator(load_schema("recipe.schema.json"))
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        err = min(errors, key=lambda e: len(list(e.absolute_path)))
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise RecipeError(
            f"{path}: {where}: {err.message} (schema: schemas/recipe.schema.json)", path=path, key=where
        )
    default_base = doc.get("base")
    steps: list[StepPlan] = []
    seen: set[str] = set()
    for i, raw in enumerate(doc["steps"]):
        name = raw["name"]
        if name in seen:
            raise RecipeError(f"{path}: steps/{i}: step name {name!r} is used twice", path=path)
        inputs = []
        for item in raw["inputs"]:
            adapter, weight = (
                (item, 1.0) if isinstance(item, str) else (item["adapter"], float(item.get("weight", 1.0)))
            )
            if adapter == name:
                raise RecipeError(f"{path}: steps/{i}: step {name!r} uses itself as an input", path=path)
            inputs.append((adapter, weight))
        if raw["method"] == "resize" and len(inputs) != 1:
            raise RecipeError(f"{path}: steps/{i}: resize takes exactly one input", path=path)
        if raw["method"] == "resize" and "rank" not in raw:
            raise RecipeError(f"{path}: steps/{i}: resize needs a rank", path=path)
        steps.append(
            StepPlan(
                name=name,
                method=raw["method"],
                inputs=tuple(inputs),
                rank=raw.get("rank"),
                keep=float(raw.get("keep", 0.99)),
                density=raw.get("density"),
                majority_sign=raw.get("majority_sign", "total"),
                seed=raw.get("seed"),
                base=raw.get("base", default_base),
                tags=tuple(raw.get("tags", ())),
                description=raw.get("description"),
            )
        )
        seen.add(name)
    return Recipe(path=path, steps=tuple(steps), description=doc.get("description"))


def check_methods(recipe: Recipe) -> None:
    """Every step's method exists (resize, or a registered combine method)."""
    from .ops.combine import COMBINE_METHODS

    for s in recipe.steps:
        if s.method != "resize":
            try:
                COMBINE_METHODS.get(s.method)
            except AdapterHubError as exc:
                raise RecipeError(f"{recipe.path}: step {s.name!r}: {exc}", path=recipe.path) from None
