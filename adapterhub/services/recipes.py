"""Composition recipes over a Library: every step checked first, then run; all outputs or none."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..errors import (
    AdapterExistsError,
    AdapterHubError,
    AdapterNotFoundError,
    ComposeError,
    IncompatibleAdapterError,
)
from .bases import base_layout
from .compute import CombineSummary, _inputs, _preflight, combine, resize_adapter

if TYPE_CHECKING:
    from ..catalog.library import Library
    from ..compose import ComposeResult


def compose(
    lib: Library,
    recipe: str | os.PathLike[str] | dict[str, Any],
    *,
    dry_run: bool = False,
    device: str = "auto",
) -> ComposeResult:
    """Run a recipe (YAML/JSON file or mapping, `schemas/recipe.schema.json`) step by step.

    Everything that can be checked before writing is checked first: the schema, the methods, that
    every outside input is cataloged and no output name is taken, and that the cataloged inputs fit
    each other and the recipe's base. ``dry_run`` stops there. If a step fails, the adapters made
    by earlier steps are removed again, so a recipe leaves all of its outputs or none.
    """
    from ..compose import ComposeResult, check_methods, load_recipe

    plan = load_recipe(recipe)
    check_methods(plan)
    for out in plan.outputs:
        if lib.exists(out):
            raise AdapterExistsError(out)
    external = plan.external_inputs()
    for ext in external:
        if not lib.exists(ext):
            raise AdapterNotFoundError(ext)
    made = set(plan.outputs)
    for step in plan.steps:  # what can be checked now: steps over cataloged inputs only
        if any(a in made for a, _ in step.inputs):
            continue
        layout = base_layout(lib, step.base) if step.base else None
        try:
            _preflight(lib, _inputs(lib, list(step.inputs), load=False), layout, subject=f"step {step.name}")
        except IncompatibleAdapterError as exc:
            raise IncompatibleAdapterError(
                f"{plan.path}: step {step.name!r}: {exc}", report=exc.report
            ) from None
    if dry_run:
        return ComposeResult(plan, dry_run=True)
    created: list[str] = []
    summaries: list[CombineSummary] = []
    current = plan.steps[0].name
    try:
        for step in plan.steps:
            current = step.name
            if step.method == "resize":
                if step.base:
                    _preflight(
                        lib,
                        _inputs(lib, list(step.inputs), load=False),
                        base_layout(lib, step.base),
                        subject=f"step {step.name}",
                    )
                summary = resize_adapter(
                    lib,
                    step.inputs[0][0],
                    rank=step.rank,  # type: ignore[arg-type]
                    new_name=step.name,
                    keep=step.keep,
                    device=device,
                    tags=step.tags,
                    description=step.description,
                )
            else:
                summary = combine(
                    lib,
                    list(step.inputs),
                    name=step.name,
                    method=step.method,
                    rank=step.rank,
                    keep=step.keep,
                    density=step.density,
                    majority_sign=step.majority_sign,
                    seed=step.seed,
                    device=device,
                    tags=step.tags,
                    description=step.description,
                    base=step.base,
                )
            created.append(step.name)
            summaries.append(summary)
    except (AdapterHubError, ValueError) as exc:
        if created:
            lib.remove(created)
        kept = f"removed {', '.join(created)} again" if created else "nothing was written"
        raise ComposeError(
            f"{plan.path}: step {current!r} failed ({kept}): {exc}", step=current, cause=exc
        ) from exc
    return ComposeResult(plan, dry_run=False, summaries=tuple(summaries))
