"""Commands that make adapters by training: train."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

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
        TextColumn("loss (mean of last 10 steps) {task.fields[loss]}"),
        TimeRemainingColumn(),
    ]
    with Progress("[bold]training", *columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("training", total=None, loss="-")

        def update(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, loss=f"{loss:.4f}")

        yield update


def _log_lines(state: State, as_json: bool) -> Callable[[dict[str, Any]], None] | None:
    """One line on stderr every --log-every steps when there is no bar (JSON lines with --json)."""
    if state.quiet or state.progress_enabled():
        return None

    def log(r: dict[str, Any]) -> None:
        if as_json:
            line = json.dumps(r)
        else:
            line = (
                f"step {r['step']}/{r['steps']}  loss {r['loss']:.4f}  loss (mean of last 10) "
                f"{r['loss_mean10']:.4f}  lr {r['lr']:.3g}  {r['tokens_per_second']:.0f} tokens/s"
            )
            if "eval_loss" in r:
                line += f"  eval loss {r['eval_loss']:.4f}"
        click.echo(line, err=True)
        sys.stderr.flush()

    return log


@cli.command("train", short_help="Train a new LoRA adapter on JSONL data and catalog it.")
@click.argument("base")
@click.option(
    "--data",
    required=True,
    type=click.Path(dir_okay=False),
    help="JSONL: messages (tools too), prompt/completion or text rows.",
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
    help="Peak learning rate.",
)
@click.option(
    "--schedule",
    type=click.Choice(["linear", "cosine", "constant"]),
    default="linear",
    show_default=True,
    help="Learning-rate decay after the warm-up.",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Warm-up steps (the rate rises from 0).",
)
@click.option(
    "--max-grad-norm",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Clip the gradient norm (0: off).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Examples per step (all processes together).",
)
@click.option(
    "--grad-accum",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Micro-batches a step is split into.",
)
@click.option(
    "--max-length",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="Longest example in tokens; longer ones are refused.",
)
@click.option(
    "--gradient-checkpointing", is_flag=True, help="Recompute activations in backward (less memory)."
)
@click.option(
    "--optim",
    type=click.Choice(["adamw", "adamw8bit", "paged_adamw8bit"]),
    default="adamw",
    show_default=True,
    help="Optimizer (8-bit ones: bitsandbytes).",
)
@click.option("--bf16/--no-bf16", default=None, help="bf16 autocast (default: on a GPU that supports it).")
@click.option(
    "--quantize",
    type=click.Choice(["nf4", "nf4-all", "int8"]),
    help="Load the base quantized (QLoRA: nf4; nf4-all: the embeddings and output layer too).",
)
@click.option(
    "--group-by-length/--no-group-by-length",
    default=True,
    show_default=True,
    help="Batch rows of similar length.",
)
@click.option(
    "--packing",
    is_flag=True,
    help="Pack examples into rows of --max-length tokens (each attends only to itself).",
)
@click.option("--eval-data", type=click.Path(dir_okay=False), help="JSONL rows for the eval loss.")
@click.option(
    "--eval-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Hold out this share of --data.",
)
@click.option(
    "--eval-every", type=click.IntRange(min=1), help="Eval loss every N steps (default: at the end)."
)
@click.option("--save-every", type=click.IntRange(min=1), help="Checkpoint every N steps under the home.")
@click.option("--resume", is_flag=True, help="Continue a stopped run (same options).")
@click.option(
    "--nproc", type=click.IntRange(min=1), default=1, show_default=True, help="Data-parallel processes."
)
@click.option(
    "--fsdp", is_flag=True, help="Shard the base over the --nproc processes (FSDP2; for a big base)."
)
@click.option(
    "--log-every",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Log a line every N steps without a bar.",
)
@click.option("--dry-run", is_flag=True, help="Print the memory plan only.")
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
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (log lines as JSON lines).")
@pass_state
def train_cmd(
    state: State,
    base: str,
    data: str,
    name: str,
    targets: str,
    device: str | None,
    tags: tuple[str, ...],
    description: str | None,
    resume: bool,
    nproc: int,
    log_every: int,
    dry_run: bool,
    as_json: bool,
    **options: Any,
) -> None:
    """Fine-tune a new LoRA adapter NAME on the causal LM BASE with the rows of --data (loss on the
    assistant / completion tokens), and catalog it with its lineage. The memory plan is printed first;
    --nproc N (or `torchrun --nproc-per-node N -m adapterhub train ...`) trains data-parallel; with
    --fsdp each process holds 1/N of the base."""
    if options["steps"] is not None and options["epochs"] is not None:
        raise click.UsageError("give --steps or --epochs, not both")
    names = [t.strip() for t in targets.split(",") if t.strip()]
    options["targets"] = "all-linear" if names == ["all-linear"] else names
    as_json = as_json or state.json
    if dry_run:
        plan = state.hub.plan_training(base, nproc=nproc, device=device, **options)
        if as_json:
            emit_json(plan.to_dict())
        else:
            click.echo("\n".join(plan.lines()))
        return

    def show_plan(plan: Any) -> None:
        if not state.quiet:
            click.echo(json.dumps({"plan": plan.to_dict()}) if as_json else "\n".join(plan.lines()), err=True)

    with _loss_bar(state) as on_step:
        result = state.hub.train(
            base,
            data,
            name=name,
            device=device,
            tags=tags,
            description=description,
            resume=resume,
            nproc=nproc,
            log_every=log_every,
            on_step=on_step,
            on_log=_log_lines(state, as_json),
            on_plan=show_plan,
            **options,
        )
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun the first process reports
    if as_json:
        emit_json(result.to_dict())
        return
    rows = [
        ("new adapter", result.adapter.name),
        (
            "trainable parameters",
            f"{result.trainable_params:,} of {result.total_params:,} ({100 * result.trainable_share:.3f}%)",
        ),
        ("steps", f"{result.steps} ({result.epochs:.2f} epochs of {result.examples} examples)"),
        ("loss (first step -> last step)", f"{result.first_loss:.4f} -> {result.last_loss:.4f}"),
    ]
    if result.eval_losses:
        rows.append(
            ("eval loss (last)", f"{result.eval_losses[-1][1]:.4f} at step {result.eval_losses[-1][0]}")
        )
    if result.resumed_from:
        rows.append(("resumed from step", str(result.resumed_from)))
    rows += [
        ("seconds", f"{result.seconds:.1f}"),
        ("tokens/s", f"{result.tokens_per_second:.0f}"),
        ("device", result.device + (f" x {result.processes} processes" if result.processes > 1 else "")),
    ]
    emit_fields(rows, title=f"trained {result.adapter.name}")
