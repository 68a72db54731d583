"""Commands that compute: merge, combine, resize, extract, compose."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ..records import human_size
from .base import State, cli, pass_state, progress_bar
from .render import emit_fields, emit_json, emit_records


def parse_weighted(spec: str) -> tuple[str, float]:
    """``NAME[:WEIGHT]`` -> (name, weight); a suffix that is not a number belongs to the name."""
    name, sep, tail = spec.rpartition(":")
    if sep and name:
        try:
            return name, float(tail)
        except ValueError:
            pass
    return spec, 1.0


WEIGHT_HELP = (
    "Cataloged names or adapter paths, each with an optional :WEIGHT (default 1.0, negative allowed)."
)


@cli.command("merge", short_help="Fold adapters into a base and write a new checkpoint.")
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@click.option(
    "--out",
    required=True,
    type=click.Path(),
    help="Folder to write the merged checkpoint to (must not exist).",
)
@click.option(
    "--dtype",
    type=click.Choice(["keep", "float32", "bfloat16", "float16"]),
    default="keep",
    show_default=True,
    help="Output dtype of the weights.",
)
@click.option("--device", metavar="DEV", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--unmerge",
    is_flag=True,
    help="Subtract the adapters instead (recovers the base of a merged checkpoint).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_state
def merge_cmd(
    state: State,
    base: str,
    adapters: tuple[str, ...],
    out: str,
    dtype: str,
    device: str,
    unmerge: bool,
    as_json: bool,
) -> None:
    """Fold ADAPTERS into the BASE checkpoint (registered name or folder) and write a new checkpoint.

    W0 + sum of weight * scale * B A for every targeted tensor, in fp32, rounded once to the output dtype.
    ADAPTERS: cataloged names or paths, each with an optional :WEIGHT.
    """
    pairs = [parse_weighted(a) for a in adapters]
    with progress_bar(state, "merging", unit_bytes=True) as progress:
        result = state.hub.merge(
            base, pairs, out=out, dtype=dtype, device=device, unmerge=unmerge, progress=progress
        )
    d: dict[str, Any] = {
        "out": str(result.out),
        "tensors_changed": result.tensors_changed,
        "bytes_written": result.bytes_written,
        "seconds": round(result.seconds, 3),
        "device": result.device,
        "untied": list(result.untied),
        "notes": list(result.notes),
    }
    if as_json or state.json:
        emit_json(d)
    elif not state.quiet:
        emit_fields(
            [
                ("out", d["out"]),
                ("tensors changed", d["tensors_changed"]),
                ("bytes written", human_size(d["bytes_written"])),
                ("seconds", f"{result.seconds:.2f}"),
                ("device", d["device"]),
                *([("untied", d["untied"])] if d["untied"] else []),
                *(("note", n) for n in d["notes"]),
            ],
            title="merged" if not unmerge else "unmerged",
        )


def combine_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed(
        [
            click.option(
                "--keep",
                type=click.FloatRange(0, 1, min_open=True),
                default=0.99,
                show_default=True,
                help="With --rank auto: the share of energy (squared Frobenius norm) each module keeps.",
            ),
            click.option(
                "--device",
                metavar="DEV",
                default="auto",
                show_default=True,
                help="auto, cpu, cuda or cuda:N.",
            ),
            click.option(
                "--tag", "tags", multiple=True, metavar="TAG", help="Tag the new adapter; repeat for more."
            ),
            click.option("--description", metavar="TEXT", help="Description of the new adapter."),
            click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
        ]
    ):
        f = opt(f)
    return f


def _print_summary(state: State, summary: Any, as_json: bool) -> None:
    d = summary.to_dict()
    if as_json or state.json:
        emit_json(d)
        return
    if state.quiet:
        return
    a = d["adapter"]
    emit_fields(
        [
            ("new adapter", a["name"]),
            ("method", d["method"]),
            ("rank", a["rank"]),
            ("modules", a["num_modules"]),
            ("size", human_size(a["size_bytes"])),
            ("relative error", f"{d['error']:.3g} (against the exact result, Frobenius)"),
            *(("parent", f"{p['name']} x {p['weight']:g}") for p in a["parents"]),
        ],
        title=f"{d['method']} -> {a['name']}",
    )
    worst = sorted(d["modules"], key=lambda m: -(m["error"] or 0))[:5]
    if worst and max(m["error"] or 0 for m in worst) > 0:
        emit_records(
            worst,
            [("module", "module (largest errors)"), ("rank", "rank"), ("error", "relative error")],
            mode="table",
            formatters={"error": lambda v: f"{v:.3g}"},
        )


@cli.command("combine", short_help="Combine adapters into a new cataloged adapter.")
@click.argument("adapters", nargs=-1, required=True)
@click.option("--name", required=True, help="Catalog name of the new adapter.")
@click.option(
    "--method",
    default="linear",
    show_default=True,
    help="linear, cat, svd, ties, dare_linear, dare_ties or magnitude_prune.",
)
@click.option(
    "--rank",
    metavar="R|auto",
    help="Target rank (an integer, or auto with --keep); linear without it is exact.",
)
@click.option(
    "--density",
    type=click.FloatRange(0, 1, min_open=True),
    help="ties/dare/magnitude_prune: share of entries kept.",
)
@click.option(
    "--majority-sign",
    type=click.Choice(["total", "frequency"]),
    default="total",
    show_default=True,
    help="ties/dare_ties: how the sign of each entry is elected.",
)
@click.option("--seed", type=int, help="Seed for DARE's random drop.")
@combine_options
@pass_state
def combine_cmd(
    state: State,
    adapters: tuple[str, ...],
    name: str,
    method: str,
    rank: str | None,
    density: float | None,
    majority_sign: str,
    seed: int | None,
    keep: float,
    device: str,
    tags: tuple[str, ...],
    description: str | None,
    as_json: bool,
) -> None:
    """Combine ADAPTERS (each NAME[:WEIGHT]) into a new cataloged adapter, with its lineage.

    linear is exactly sum of weight * scale * B A per module; with --rank it is the optimal rank-R
    approximation, computed from the factors, never the dense matrix.
    """
    with progress_bar(state, "combining", unit_bytes=False) as progress:
        summary = state.hub.combine(
            [parse_weighted(a) for a in adapters],
            name=name,
            method=method,
            rank=rank,
            keep=keep,
            density=density,
            majority_sign=majority_sign,
            seed=seed,
            device=device,
            tags=tags,
            description=description,
            progress=progress,
        )
    _print_summary(state, summary, as_json)


@cli.command("resize", short_help="Reduce an adapter's rank (truncated SVD per module).")
@click.argument("adapter")
@click.option("--rank", required=True, metavar="R|auto", help="New rank (an integer, or auto with --keep).")
@click.option("--name", required=True, help="Catalog name of the resized adapter.")
@combine_options
@pass_state
def resize_cmd(
    state: State,
    adapter: str,
    rank: str,
    name: str,
    keep: float,
    device: str,
    tags: tuple[str, ...],
    description: str | None,
    as_json: bool,
) -> None:
    """Optimal rank reduction of ADAPTER (truncated SVD per module, from the factors)."""
    summary = state.hub.resize_adapter(
        adapter, rank=rank, new_name=name, keep=keep, device=device, tags=tags, description=description
    )
    _print_summary(state, summary, as_json)


@cli.command("extract", short_help="Extract a LoRA from a full fine-tune (SVD of the change).")
@click.argument("base")
@click.argument("finetuned", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--rank", required=True, metavar="R|auto", help="Rank of the LoRA (an integer, or auto with --keep)."
)
@click.option("--max-rank", type=click.IntRange(min=1), help="With --rank auto: never above this rank.")
@click.option(
    "--svd",
    type=click.Choice(["auto", "exact", "randomized"]),
    default="auto",
    show_default=True,
    help="exact, randomized (svd_lowrank), or auto: randomized when the rank is small against the matrix.",
)
@click.option("--name", required=True, help="Catalog name of the extracted adapter.")
@combine_options
@pass_state
def extract_cmd(
    state: State,
    base: str,
    finetuned: str,
    rank: str,
    max_rank: int | None,
    svd: str,
    name: str,
    keep: float,
    device: str,
    tags: tuple[str, ...],
    description: str | None,
    as_json: bool,
) -> None:
    """A LoRA from a full fine-tune: SVD of FINETUNED - BASE per matching weight, streamed tensor by tensor."""
    with progress_bar(state, "extracting", unit_bytes=False) as progress:
        summary = state.hub.extract_adapter(
            base,
            finetuned,
            rank=rank,
            name=name,
            keep=keep,
            max_rank=max_rank,
            svd=svd,
            device=device,
            tags=tags,
            description=description,
            progress=progress,
        )
    _print_summary(state, summary, as_json)


@cli.command("compose", short_help="Run a composition recipe step by step.")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--dry-run", is_flag=True, help="Check the recipe and the inputs, print the plan, write nothing."
)
@click.option("--device", metavar="DEV", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan / results as JSON.")
@pass_state
def compose_cmd(state: State, recipe: str, dry_run: bool, device: str, as_json: bool) -> None:
    """Run a composition RECIPE (YAML or JSON, schemas/recipe.schema.json) step by step.

    A failing step removes what earlier steps made, so the recipe leaves all of its outputs or none.
    """
    result = state.hub.compose(recipe, dry_run=dry_run, device=device)
    d = result.to_dict()
    if as_json or state.json:
        emit_json(d)
        return
    if state.quiet:
        return
    rows = []
    for s in d["steps"]:
        inputs = " + ".join(f"{i['weight']:g} x {i['adapter']}" for i in s["inputs"])
        params = ", ".join(f"{k}={v}" for k, v in s["params"].items())
        res = s.get("result")
        rows.append(
            {
                "name": s["name"],
                "method": s["method"],
                "inputs": inputs,
                "params": params,
                "outcome": "(dry run)"
                if dry_run
                else f"rank {res['adapter']['rank']}, error {res['error']:.3g}",
            }
        )
    emit_records(
        rows,
        [
            ("name", "step"),
            ("method", "method"),
            ("inputs", "inputs"),
            ("params", "params"),
            ("outcome", "outcome"),
        ],
        mode="table",
        title=f"{'plan of ' if dry_run else ''}{recipe}",
    )
