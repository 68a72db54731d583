"""Commands that make adapters by training: train."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import click

from .base import State, cli, pass_state
from .render import emit_fields, emit_json


@contextlib.contextmanager
def _loss_bar(state: State) -> Iterator[Callable[[int, int, float], None] | None]:
    """A progress bar with the running loss on stderr (off as every other progress bar is)."""
    if not state.progress_enabled():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
    ]
    with Progress("[bold]training", *columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("training", total=None, loss="-")

        def update(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, loss=f"{loss:.4f}")

        yield update


@cli.command("train")
@click.argument("base")
@click.option(
    "--data",
    required=True,
    type=click.Path(dir_okay=False),
    help="JSONL: messages, prompt/completion or text rows.",
)
@click.option("--name", required=True, help="Catalog name of the new adapter.")
@click.option("--rank", type=click.IntRange(min=1), default=8, show_default=True, help="LoRA rank.")
@click.option(
    "--alpha",
    type=click.FloatRange(min=0, min_open=True),
    default=16.0,
    show_default=True,
    help="LoRA alpha (scale alpha/rank).",
)
@click.option(
    "--targets",
    default="q_proj,v_proj",
    show_default=True,
    metavar="NAMES|all-linear",
    help="Comma-separated module names, or all-linear.",
)
@click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps (default: one epoch).")
@click.option(
    "--epochs", type=click.FloatRange(min=0, min_open=True), help="Passes over the data instead of --steps."
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=2e-4,
    show_default=True,
    help="AdamW learning rate.",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=4, show_default=True, help="Examples per step."
)
@click.option(
    "--max-length",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="Longest example in tokens; longer ones are refused.",
)
@click.option(
    "--init",
    type=click.Choice(["kaiming", "gaussian"]),
    default="kaiming",
    show_default=True,
    help="Initialisation of A (B starts at zero).",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the initialisation and the shuffling."
)
@click.option("--device", metavar="DEV", help="cpu, cuda, cuda:1, ... (default: CUDA when there is one).")
@click.option("--tag", "tags", multiple=True, help="Tag the new adapter (repeatable).")
@click.option("--description", help="Description of the new adapter.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_state
def train_cmd(
    state: State, base: str, data: str, name: str, rank: int, alpha: float, targets: str, steps: int | None,
    epochs: float | None, lr: float, batch_size: int, max_length: int, init: str, seed: int,
    device: str | None, tags: tuple[str, ...], description: str | None, as_json: bool,
) -> None:  # fmt: skip
    """Fine-tune a new LoRA adapter NAME on the causal LM BASE with the rows of --data (loss on the
    assistant / completion tokens), and catalog it with its lineage."""
    if steps is not None and epochs is not None:
        raise click.UsageError("give --steps or --epochs, not both")
    names = [t.strip() for t in targets.split(",") if t.strip()]
    target: list[str] | str = "all-linear" if names == ["all-linear"] else names
    with _loss_bar(state) as on_step:
        result = state.hub.train(
            base, data, name=name, rank=rank, alpha=alpha, targets=target, steps=steps, epochs=epochs, lr=lr,
            batch_size=batch_size, max_length=max_length, init=init, seed=seed, device=device, tags=tags,
            description=description, on_step=on_step,
        )  # fmt: skip
    if as_json or state.json:
        emit_json(result.to_dict())
        return
    emit_fields(
        [
            ("new adapter", result.adapter.name),
            ("trainable parameters", f"{result.trainable_params:,} of {result.total_params:,} ({100 * result.trainable_share:.3f}%)"),
            ("steps", f"{result.steps} ({result.epochs:.2f} epochs of {result.examples} examples)"),
            ("loss", f"{result.first_loss:.4f} -> {result.last_loss:.4f}"),
            ("seconds", f"{result.seconds:.1f}"),
            ("tokens/s", f"{result.tokens_per_second:.0f}"),
            ("device", result.device),
        ],
        title=f"trained {result.adapter.name}",
    )  # fmt: skip
