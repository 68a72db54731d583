"""Sharing commands: push, pull, serve, token create/list/revoke."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from .base import ADAPTER_JSON, State, cli, output_options, pass_state
from .render import emit_json, emit_records


def remote_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--endpoint`` and ``--token``, shared by push, pull and search --hub."""
    f = click.option(
        "--token",
        metavar="TOKEN",
        help="Access token (default: $HF_TOKEN, else huggingface_hub's stored login). Never printed or stored.",
    )(f)
    f = click.option(
        "--endpoint",
        metavar="URL",
        help="Hub-compatible server (default: $HF_ENDPOINT, else https://huggingface.co).",
    )(f)
    return f


@cli.command("push", short_help="Upload an adapter to a Hub repo.")
@click.argument("name")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (when it does not exist yet).")
@click.option("--revision", metavar="BRANCH", help="Branch to push to (created from main if missing).")
@click.option("--message", "-m", metavar="TEXT", help="Commit message.")
@remote_options
@pass_state
def push_cmd(
    state: State,
    name: str,
    repo_id: str,
    private: bool,
    revision: str | None,
    message: str | None,
    endpoint: str | None,
    token: str | None,
) -> None:
    """Upload adapter NAME to the Hub repo REPO_ID (PEFT files, model card, adapterhub.json)."""
    res = state.hub.push_adapter(
        name,
        repo_id,
        private=private,
        revision=revision,
        message=message,
        endpoint=endpoint,
        token=token,
        progress=state.progress_enabled(),
    )
    if state.json:
        emit_json(res.to_dict())
        return
    if not state.quiet:
        what = "new commit" if res.changed else "unchanged, no new commit"
        click.echo(f"pushed {res.name} to {res.repo_id}@{res.revision} ({what})", err=True)
    click.echo(res.commit_url)


@cli.command("pull", short_help="Download an adapter from a Hub repo and catalog it.")
@click.argument("repo_id", metavar="REPO_ID[@REVISION]")
@click.option("--name", help="Catalog name (default: the name in adapterhub.json, else the repo name).")
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Accept adapter_model.bin, converted with torch.load(weights_only=True) into safetensors.",
)
@remote_options
@output_options(json_help=ADAPTER_JSON)
@pass_state
def pull_cmd(
    state: State,
    repo_id: str,
    name: str | None,
    allow_pickle: bool,
    endpoint: str | None,
    token: str | None,
    mode: str,
) -> None:
    """Download an adapter from a Hub repo, check its hashes, validate it and catalog it."""
    res = state.hub.pull_adapter(
        repo_id,
        name=name,
        endpoint=endpoint,
        token=token,
        allow_pickle=allow_pickle,
        progress=state.progress_enabled(),
    )
    if mode == "json":
        emit_json(res.to_dict())
        return
    if not state.quiet:
        if res.changed:
            click.echo(f"pulled {res.source} as {res.adapter.name}")
        else:
            click.echo(f"{res.source} is already cataloged as {res.adapter.name}; nothing to do")


@cli.command("serve", short_help="Run a Hub-compatible adapter server with web pages.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port (0 picks a free one).",
)
@click.option(
    "--home",
    "serve_home",
    type=click.Path(file_okay=False),
    help="Home folder to serve (default: the global --home).",
)
@click.option(
    "--log-level",
    default="warning",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    help="Server log level.",
)
@click.option("--model", metavar="BASE", help="Also serve the OpenAI-compatible /v1 API over this base.")
@click.option(
    "--device", metavar="DEV", help="With --model: cpu, cuda, ... (default: CUDA when there is one)."
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
    default="auto",
    show_default=True,
    help="With --model: the dtype the base runs in.",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="With --model: requests decoded together at most.",
)
@click.option(
    "--adapter-memory",
    metavar="SIZE",
    help="With --model: budget for resident adapters (e.g. 2GB; default unbounded).",
)
@click.option(
    "--require-token", is_flag=True, help="With --model: refuse inference requests without a token."
)
@click.option(
    "--max-request-bytes",
    metavar="SIZE",
    help="With --model: largest inference request body (default 4MB); larger ones are a 413 unread.",
)
@click.option(
    "--batch-invariant/--no-batch-invariant",
    default=None,
    help="With --model: a greedy answer never depends on what else shares the batch, in any dtype "
    "(default: on); --no-batch-invariant batches without that "
    "guarantee, faster with adapters (bench/RESULTS.md).",
)
@click.option(
    "--quantize",
    type=click.Choice(["nf4", "nf4-all", "int8"]),
    help="With --model: load the base quantized through bitsandbytes (nf4: 4-bit linears, as QLoRA "
    "trains; nf4-all: the embeddings and output layer too).",
)
@click.option(
    "--lora-dir",
    "lora_dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    metavar="DIR",
    help="With --model: a folder whose adapters POST /v1/load_lora_adapter may load by path (repeatable; "
    "symlinks out of it are refused). Without one, only public Hub repos load that way.",
)
@click.option(
    "--graphs/--no-graphs",
    default=None,
    help="With --model: decode steps over static buffers, each step shape captured in a CUDA graph "
    "(default: on a GPU, where the model is covered); --no-graphs runs them eagerly (with "
    "--no-batch-invariant: over a growing cache).",
)
@pass_state
def serve_cmd(
    state: State,
    host: str,
    port: int,
    serve_home: str | None,
    log_level: str,
    model: str | None,
    device: str | None,
    dtype: str,
    max_batch: int,
    adapter_memory: str | None,
    require_token: bool,
    graphs: bool | None,
    max_request_bytes: str | None,
    batch_invariant: bool | None,
    quantize: str | None,
    lora_dirs: tuple[str, ...],
) -> None:
    """Run a Hub-compatible adapter server with web pages on this home (needs the 'serve' extra); with
    --model, also an OpenAI-compatible /v1 API over that base and the cataloged adapters that fit it."""
    if serve_home is not None:
        state.home = serve_home
    if model is None and (
        device
        or dtype != "auto"
        or adapter_memory
        or require_token
        or max_batch != 32
        or graphs is not None
        or max_request_bytes
        or batch_invariant is not None
        or quantize
        or lora_dirs
    ):
        raise click.UsageError(
            "--device, --dtype, --max-batch, --adapter-memory, --require-token, --graphs, "
            "--max-request-bytes, --[no-]batch-invariant, --quantize and --lora-dir go with --model"
        )
    hub = state.hub

    def ready(url: str) -> None:
        click.echo(f"adapterhub serving {hub.home} on {url}" + (f" (/v1: {model})" if model else ""))
        sys.stdout.flush()

    inference = (
        {
            "device": device,
            "dtype": dtype,
            "max_batch": max_batch,
            "adapter_memory": adapter_memory,
            "require_token": require_token,
            "graphs": graphs,
            "max_request_bytes": max_request_bytes,
            "batch_invariant": batch_invariant,
            "quantize": quantize,
            "lora_dirs": lora_dirs,
        }
        if model
        else {}
    )
    from ..server import serve

    serve(hub, host=host, port=port, ready=ready, log_level=log_level, model=model, **inference)


@cli.group("token")
def token_group() -> None:
    """Access tokens of this home's server (stored hashed)."""


@token_group.command("create")
@click.argument("user")
@click.option("--write", is_flag=True, help="Allow pushing to USER's repos (default: read only).")
@pass_state
def token_create_cmd(state: State, user: str, write: bool) -> None:
    """Make a token for USER; it is shown once and only its hash is kept."""
    from ..server.tokens import create_token

    new = create_token(state.hub, user, write=write)
    if state.json:
        emit_json(new.to_dict())
        return
    if not state.quiet:
        role = "write" if new.write else "read"
        click.echo(f"{role} token {new.id} for {new.user} (shown once, keep it now):", err=True)
    click.echo(new.token)


@token_group.command("list")
@output_options
@pass_state
def token_list_cmd(state: State, mode: str) -> None:
    """List the server's tokens (ids, users, roles; never the tokens)."""
    from ..server.tokens import list_tokens

    rows = [t.to_dict() for t in list_tokens(state.hub)]
    cols = [
        ("id", "id"),
        ("user", "user"),
        ("role", "role"),
        ("created_at", "created"),
        ("last_used_at", "last used"),
    ]
    emit_records(rows, cols, mode=mode, title="tokens")


@token_group.command("revoke", short_help="Revoke a token, by its id or the token itself.")
@click.argument("token_or_id", metavar="ID_OR_TOKEN")
@pass_state
def token_revoke_cmd(state: State, token_or_id: str) -> None:
    """Revoke a token, by the id `token list` shows or by the token itself."""
    from ..server.tokens import revoke_token

    info = revoke_token(state.hub, token_or_id)
    if state.json:
        emit_json({"revoked": info.id, "user": info.user})
    elif not state.quiet:
        click.echo(f"revoked token {info.id} of {info.user}")
