"""Commands that measure adapters: eval, mix."""

from __future__ import annotations

from typing import Any

import click

from .base import State, cli, output_options, pass_state
from .render import emit_fields, emit_json, emit_records


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


@cli.command("eval", short_help="Score adapters and mixes on a dataset; keep the results.")
@click.argument("adapters", nargs=-1)
@click.option("--base", required=True, help="Registered base or checkpoint folder (a causal LM).")
@click.option(
    "--data",
    required=True,
    type=click.Path(dir_okay=False),
    help="JSONL: messages (tools too), prompt/completion, text, or prompt/choices/answer rows.",
)
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    metavar="M",
    help="loss, perplexity, exact, contains, regex:PATTERN or choice (repeatable; default loss).",
)
@click.option(
    "--combination",
    "combinations",
    multiple=True,
    metavar="A:W+B:W",
    help="Also score this exact combination, e.g. sql:0.7+chat:0.3 (repeatable).",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Longest generation for exact / contains / regex.",
)
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N rows.")
@click.option("--dataset", metavar="NAME", help="Name the records use (default: the file name).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed recorded with the results.")
@click.option("--device", metavar="DEV", help="cpu, cuda, cuda:1, ... (default: CUDA when there is one).")
@click.option("--no-record", is_flag=True, help="Print the results without keeping them in the catalog.")
@output_options
@pass_state
def eval_cmd(
    state: State,
    adapters: tuple[str, ...],
    base: str,
    data: str,
    metrics: tuple[str, ...],
    combinations: tuple[str, ...],
    max_tokens: int,
    limit: int | None,
    dataset: str | None,
    seed: int,
    device: str | None,
    no_record: bool,
    mode: str,
) -> None:
    """Score the base alone, each ADAPTER and each --combination on --data in one pass of mixed
    batches, and keep the results as evaluation records (see `show` and `list --sort`)."""
    result = state.hub.evaluate(
        list(adapters),
        base=base,
        data=data,
        metrics=list(metrics) or ["loss"],
        combinations=combinations,
        max_tokens=max_tokens,
        limit=limit,
        dataset=dataset,
        seed=seed,
        device=device,
        record=not no_record,
    )
    if mode == "json":
        emit_json(result.to_dict())
        return
    records = [{"subject": s.subject, **s.values} for s in result.scores]
    columns = [("subject", "subject"), *[(m, m) for m in result.metrics]]
    emit_records(
        records,
        columns,
        mode=mode,
        title=f"{result.dataset} ({result.rows} rows) on {result.base}",
        formatters={m: _fmt for m in result.metrics},
    )


@cli.command("mix", short_help="Learn the best weights of a combination on a few rows.")
@click.argument("adapters", nargs=-1, required=True)
@click.option("--base", required=True, help="Registered base or checkpoint folder (a causal LM).")
@click.option(
    "--data",
    required=True,
    type=click.Path(dir_okay=False),
    help="JSONL rows whose answer loss the weights minimize.",
)
@click.option("--name", required=True, help="Catalog name of the combined adapter.")
@click.option("--steps", type=click.IntRange(min=1), default=30, show_default=True, help="Gradient steps.")
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=0.05,
    show_default=True,
    help="Adam learning rate.",
)
@click.option("--rank", metavar="N|auto", help="Compress the result to this rank, as combine --rank does.")
@click.option(
    "--search",
    type=click.Choice(["cma", "none"]),
    default="cma",
    show_default=True,
    help="Also run this gradient-free search on the same rows, for comparison.",
)
@click.option("--limit", type=click.IntRange(min=1), default=32, show_default=True, help="Rows to learn on.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the search.")
@click.option("--device", metavar="DEV", help="cpu, cuda, ... (default: CUDA when there is one).")
@click.option("--tag", "tags", multiple=True, help="Tag the new adapter (repeatable).")
@click.option("--description", help="Description of the new adapter.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_state
def mix_cmd(
    state: State,
    adapters: tuple[str, ...],
    base: str,
    data: str,
    name: str,
    steps: int,
    lr: float,
    rank: str | None,
    search: str,
    limit: int,
    seed: int,
    device: str | None,
    tags: tuple[str, ...],
    description: str | None,
    as_json: bool,
) -> None:
    """Learn the weights of an exact combination of ADAPTERS that minimize the loss on --data (every
    factor frozen), compare with a gradient-free search, and catalog the mix as --name."""
    result = state.hub.mix(
        list(adapters),
        base=base,
        data=data,
        name=name,
        steps=steps,
        lr=lr,
        rank=rank,
        search=search,
        limit=limit,
        seed=seed,
        device=device,
        tags=tags,
        description=description,
    )
    if as_json or state.json:
        emit_json(result.to_dict())
        return
    pairs: list[tuple[str, Any]] = [
        ("new adapter", result.combined.adapter.name),
        ("weights", ", ".join(f"{a}:{w:.4f}" for a, w in zip(result.adapters, result.weights, strict=True))),
        (
            "loss",
            f"{result.loss_start:.4f} -> {result.loss:.4f} ({result.steps} steps, {result.seconds:.1f} s)",
        ),
    ]
    if result.search_loss is not None and result.search_weights is not None:
        ws = ", ".join(f"{a}:{w:.4f}" for a, w in zip(result.adapters, result.search_weights, strict=True))
        pairs.append(
            (
                f"{result.search} search",
                f"loss {result.search_loss:.4f} with {ws} "
                f"({result.search_evaluations} evaluations, {result.search_seconds:.1f} s)",
            )
        )
    if result.combined.error:
        pairs.append(("compression error", f"{result.combined.error:.4g}"))
    emit_fields(pairs, title=f"mixed {result.combined.adapter.name}")
