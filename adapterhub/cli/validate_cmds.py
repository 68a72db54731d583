"""Base model and validation commands: base add/list/show/rm, validate."""

from __future__ import annotations

from typing import Any

import click

from ..records import human_size
from .base import State, cli, output_options, pass_state, progress_bar
from .render import emit_fields, emit_json, emit_records

HUB_ID_HELP = "Its Hub repo id, which exports name as the base of adapters trained on it"

BASE_COLUMNS = [
    ("name", "name"),
    ("model_type", "model type"),
    ("num_params", "parameters"),
    ("num_tensors", "tensors"),
    ("dtype", "dtype"),
    ("size_bytes", "size"),
    ("num_adapters", "adapters"),
    ("fingerprint", "fingerprint"),
]


@cli.group("base", short_help="Register base checkpoints to check adapters against.")
def base_group() -> None:
    """Register base checkpoints so adapters can be checked against them from the catalog."""


@base_group.command("add", short_help="Register a base checkpoint folder (headers only).")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--name", help="Name to register it under (default: the folder name).")
@click.option("--hub-id", metavar="OWNER/NAME", help=HUB_ID_HELP + " (default: config.json's _name_or_path).")
@output_options
@pass_state
def base_add_cmd(state: State, path: str, name: str | None, hub_id: str | None, mode: str) -> None:
    """Register a base checkpoint folder (safetensors shards + config.json), reading headers only."""
    info = state.hub.add_base(path, name=name, hub_id=hub_id)
    _print_bases([info.to_dict()], mode)


@base_group.command("import-gguf", short_help="Dequantize a GGUF model and register it as a base.")
@click.argument("gguf", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", required=True, help="Name to register the base under.")
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    default="bfloat16",
    show_default=True,
    help="dtype of the dequantized checkpoint.",
)
@click.option(
    "--hub-id", metavar="OWNER/NAME", help=HUB_ID_HELP + " (default: the GGUF's source repo or general.name)."
)
@output_options
@pass_state
def base_import_gguf_cmd(
    state: State, gguf: str, name: str, dtype: str, hub_id: str | None, mode: str
) -> None:
    """Dequantize a GGUF model (llama.cpp / ollama) into a safetensors checkpoint under the home and
    register it as a base (needs the gguf and accelerate packages)."""
    if not state.quiet and mode == "table":
        click.echo(f"converting {gguf} (this reads and dequantizes every tensor) ...", err=True)
    with progress_bar(state, f"importing {name}", unit_bytes=False) as bar:
        info = state.hub.import_gguf(gguf, name=name, dtype=dtype, hub_id=hub_id, progress=bar)
    _print_bases([info.to_dict()], mode)


@base_group.command("list")
@output_options
@pass_state
def base_list_cmd(state: State, mode: str) -> None:
    """List registered base models."""
    _print_bases([b.to_dict() for b in state.hub.list_bases()], mode)


@base_group.command("show")
@click.argument("name")
@output_options
@pass_state
def base_show_cmd(state: State, name: str, mode: str) -> None:
    """Show one registered base model."""
    d = state.hub.base_info(name).to_dict()
    if mode == "json":
        emit_json(d)
    elif mode == "csv":
        _print_bases([d], mode)
    else:
        emit_fields(
            [
                (k, human_size(v) if k == "size_bytes" else (f"{v:,}" if k == "num_params" else v))
                for k, v in d.items()
            ],
            title=f"base {name}",
        )


@base_group.command("rm")
@click.argument("name")
@pass_state
def base_rm_cmd(state: State, name: str) -> None:
    """Unregister a base model (its files are not touched)."""
    state.hub.remove_base(name)
    if state.json:
        emit_json({"removed": name})
    elif not state.quiet:
        click.echo(f"removed base {name}")


def _print_bases(records: list[dict[str, Any]], mode: str) -> None:
    emit_records(
        records,
        BASE_COLUMNS,
        mode=mode,
        title="base models",
        formatters={
            "size_bytes": human_size,
            "num_params": lambda v: f"{v:,}",
            "fingerprint": lambda v: v[:12],
        },
    )


MAX_ROWS_PER_CHECK = 4
STATUS_STYLE = {"ok": "[green]ok[/green]", "warning": "[yellow]warning[/yellow]", "error": "[red]error[/red]"}


@cli.command("validate", short_help="Check adapters: sound, fit a base, free of conflicts.")
@click.argument("targets", nargs=-1)
@click.option(
    "--base", metavar="NAME|PATH", help="Check the fit to this base (registered name or checkpoint folder)."
)
@click.option(
    "--with",
    "others",
    multiple=True,
    metavar="NAME",
    help="Check that this adapter fits together with it; repeat for more.",
)
@click.option(
    "--all",
    "all_",
    is_flag=True,
    help="Check every cataloged adapter against --base from the catalog alone (no file is opened).",
)
@click.option("--no-values", is_flag=True, help="Skip the NaN/Inf scan of tensor values.")
@click.option(
    "--for",
    "for_",
    type=click.Choice(["vllm"]),
    help="Also check what this server would refuse (vllm: rank, modules_to_save, DoRA, bias, targets).",
)
@click.option(
    "--max-lora-rank",
    type=click.IntRange(min=1),
    metavar="N",
    help="With --for vllm: the server's --max-lora-rank (vLLM's default is 16).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_state
def validate_cmd(
    state: State,
    targets: tuple[str, ...],
    base: str | None,
    others: tuple[str, ...],
    all_: bool,
    no_values: bool,
    for_: str | None,
    max_lora_rank: int | None,
    as_json: bool,
) -> None:
    """Is an adapter sound, does it fit a base model, do adapters fit each other? Exit 1 on any error.

    TARGETS are cataloged names or adapter paths. Nothing is written. With --for vllm the report also
    says what vLLM's LoRA loader would refuse, before the adapter is deployed.
    """
    if max_lora_rank is not None and not for_:
        raise click.UsageError("--max-lora-rank needs --for vllm")
    if for_ and all_:
        raise click.UsageError("--for checks adapters one by one; give names instead of --all")
    if all_ and not base:
        raise click.UsageError("--all needs --base")
    if not targets and not all_:
        raise click.UsageError("give an adapter name or path, or --all with --base")
    if all_:
        reports = state.hub.validate_catalog(base=base, names=list(targets) or None)  # type: ignore[arg-type]
    else:
        reports = []
        for t in targets:
            with progress_bar(state, f"checking {t}", unit_bytes=True) as progress:
                reports.append(
                    state.hub.validate(
                        t,
                        base=base,
                        with_=others,
                        scan_values=not no_values,
                        for_=for_,
                        max_lora_rank=max_lora_rank,
                        progress=progress,
                    )
                )
    if as_json or state.json:
        docs = [r.to_dict() for r in reports]
        emit_json(docs[0] if len(docs) == 1 and not all_ else docs)
    else:
        _print_reports(reports, quiet=state.quiet)
    if not all(r.ok for r in reports):
        raise click.exceptions.Exit(1)


def _print_reports(reports: list[Any], *, quiet: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=False)
    if len(reports) > 1:
        bad = [r for r in reports if not r.ok]
        for r in bad:
            console.print(f"[red]error[/red] {r.summary()}")
        if not quiet:
            console.print(f"{len(reports) - len(bad)} of {len(reports)} adapters fit {reports[0].base}")
        return
    r = reports[0]
    table = Table(
        title=f"validate {r.subject}" + (f" against {r.base}" if r.base else ""), header_style="bold"
    )
    for col in ("status", "check", "module", "message"):
        table.add_column(col, overflow="fold")
    shown: dict[tuple[str, str], int] = {}
    for c in r.checks:
        if quiet and c.status == "ok":
            continue
        seen = shown[(c.status, c.check)] = shown.get((c.status, c.check), 0) + 1
        if seen <= MAX_ROWS_PER_CHECK:
            table.add_row(STATUS_STYLE[c.status], c.check, c.module or "", c.message)
    for (status, check), n in shown.items():
        if n > MAX_ROWS_PER_CHECK:
            table.add_row(
                STATUS_STYLE[status],
                check,
                "",
                f"... and {n - MAX_ROWS_PER_CHECK} more like these (--json lists all)",
            )
    console.print(table)
    console.print("[green]ok[/green]" if r.ok else f"[red]{len(r.errors)} error(s)[/red]")
