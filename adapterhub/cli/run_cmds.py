"""Commands that run a model: run (generate with adapters, or embed)."""

from __future__ import annotations

import sys

import click

from .base import State, cli, pass_state
from .ops_cmds import parse_weighted
from .render import emit_json


@cli.command("run", short_help="Answer a prompt with a base and adapters, or embed it.")
@click.argument("base")
@click.argument("prompt", required=False)
@click.option(
    "-a",
    "--adapter",
    "adapters",
    multiple=True,
    metavar="NAME[:W]",
    help="A cataloged adapter, with an optional weight; several give their exact combination.",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Tokens to generate at most.",
)
@click.option(
    "--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True, help="0 is greedy."
)
@click.option("--seed", type=int, help="Seed for sampling.")
@click.option("--system", metavar="TEXT", help="A system message before the prompt.")
@click.option("--device", metavar="DEV", help="cpu, cuda, cuda:1, ... (default: CUDA when there is one).")
@click.option(
    "--quantize",
    type=click.Choice(["nf4", "nf4-all", "int8"]),
    help="Load the base quantized through bitsandbytes (nf4: 4-bit linears, as QLoRA trains; nf4-all: "
    "the embeddings and output layer too).",
)
@click.option(
    "--embed", is_flag=True, help="Print the embedding of PROMPT (an encoder base, such as MiniLM)."
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object at the end instead of streaming."
)
@click.option(
    "--server",
    metavar="URL",
    help="Ask a running `adapterhub serve --model` (or any OpenAI-compatible server) instead of loading BASE here.",
)
@click.option(
    "--token",
    metavar="TOKEN",
    help="With --server: access token (default: $ADAPTERHUB_TOKEN, else $HF_TOKEN).",
)
@pass_state
def run_cmd(
    state: State,
    base: str,
    prompt: str | None,
    adapters: tuple[str, ...],
    max_tokens: int,
    temperature: float,
    seed: int | None,
    system: str | None,
    device: str | None,
    quantize: str | None,
    embed: bool,
    as_json: bool,
    server: str | None,
    token: str | None,
) -> None:
    """Answer PROMPT (or stdin with '-') with BASE and the chat template, adapters active, streamed to
    the terminal; with --embed, print the embedding instead. With --server a running server answers
    (BASE is then the served base's name)."""
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise click.UsageError("give a PROMPT (or '-' to read it from stdin)")
    pairs = [parse_weighted(a) for a in adapters]
    use_json = as_json or state.json
    if quantize is not None and (server is not None or embed):
        raise click.UsageError("--quantize loads a causal LM here; it goes with neither --server nor --embed")
    if embed:
        (vector,) = state.hub.embed(base, [prompt], adapters=pairs, device=device, server=server, token=token)
        if use_json:
            emit_json({"model": base, "adapters": dict(pairs), "embedding": vector})
        else:
            click.echo(" ".join(f"{v:.6f}" for v in vector))
        return

    def show(text: str) -> None:
        click.echo(text, nl=False)
        sys.stdout.flush()

    stream = None if use_json else show
    result = state.hub.generate(
        base,
        prompt,
        adapters=pairs,
        system=system,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        device=device,
        on_text=stream,
        server=server,
        token=token,
        quantize=quantize,
    )
    if use_json:
        emit_json({"model": base, "adapters": dict(pairs), **result.to_dict()})
    else:
        click.echo()
