"""Catalog commands: add, list, search, show, tag, rm, export, db."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import click

from ..records import human_size
from .base import ADAPTER_JSON, State, cli, output_options, pass_state, progress_bar
from .render import emit_fields, emit_json, emit_json_lines, emit_records

LIST_COLUMNS = [
    ("name", "name"),
    ("format", "format"),
    ("base_model", "base model"),
    ("rank", "rank"),
    ("alpha", "alpha"),
    ("target_modules", "targets"),
    ("size_bytes", "size"),
    ("tags", "tags"),
]


def filter_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The filters `list` and `search` share."""
    for opt in reversed(
        [
            click.option(
                "--base", metavar="MODEL", help="Only adapters for this base model (case-insensitive)."
            ),
            click.option("--rank", type=click.IntRange(min=1), help="Only adapters of exactly this rank."),
            click.option(
                "--min-rank", type=click.IntRange(min=1), help="Only adapters of at least this rank."
            ),
            click.option(
                "--max-rank", type=click.IntRange(min=1), help="Only adapters of at most this rank."
            ),
            click.option(
                "--target", metavar="MODULE", help="Only adapters that target this module (e.g. q_proj)."
            ),
            click.option("--tag", metavar="TAG", help="Only adapters with this tag."),
            click.option(
                "--format", "fmt", type=click.Choice(["peft", "kohya"]), help="Only this file format."
            ),
            click.option(
                "--compatible-with",
                metavar="BASE",
                help="Only adapters whose every target fits this base (registered name or folder).",
            ),
        ]
    ):
        f = opt(f)
    return f


def _filters(kw: dict[str, Any]) -> dict[str, Any]:
    if kw.get("min_rank") and kw.get("max_rank") and kw["min_rank"] > kw["max_rank"]:
        raise click.UsageError("--min-rank is larger than --max-rank")
    kw["format"] = kw.pop("fmt")
    return kw


def _print_list(records: list[dict[str, Any]], mode: str) -> None:
    emit_records(records, LIST_COLUMNS, mode=mode, formatters={"size_bytes": human_size})


@cli.command("add", short_help="Check adapters and add them to the catalog.")
@click.argument("path", type=click.Path(), required=False)
@click.option("--recursive", "-r", is_flag=True, help="PATH is a folder tree: add every adapter found in it.")
@click.option(
    "--hf-cache", is_flag=True, help="Add the LoRA adapters in the Hugging Face cache (no PATH needed)."
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    help="With --hf-cache: the cache folder (default: $HF_HUB_CACHE).",
)
@click.option("--name", help="Catalog name (default: the folder or file name).")
@click.option("--base", metavar="MODEL", help="Base model name, overriding base_model_name_or_path.")
@click.option("--tag", "tags", multiple=True, metavar="TAG", help="A tag; repeat for more.")
@click.option("--description", metavar="TEXT", help="A description to search by.")
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Convert adapter_model.bin with torch.load(weights_only=True) into safetensors.",
)
@output_options(json_help=ADAPTER_JSON)
@pass_state
def add_cmd(
    state: State,
    path: str | None,
    recursive: bool,
    hf_cache: bool,
    cache_dir: str | None,
    name: str | None,
    base: str | None,
    tags: tuple[str, ...],
    description: str | None,
    allow_pickle: bool,
    mode: str,
) -> None:
    """Check an adapter (PEFT folder or .safetensors file) and add it to the catalog; with --recursive,
    every adapter under a folder; with --hf-cache, those in the Hugging Face cache."""
    if hf_cache or recursive:
        if hf_cache and (path or recursive):
            raise click.UsageError("--hf-cache takes no PATH and no --recursive")
        if recursive and not path:
            raise click.UsageError("--recursive needs a PATH to walk")
        if name or description:
            raise click.UsageError(
                "--name and --description name one adapter; bulk imports name each by its path"
            )
        if cache_dir and not hf_cache:
            raise click.UsageError("--cache-dir goes with --hf-cache")
        _bulk_add(
            state,
            path,
            hf_cache=hf_cache,
            cache_dir=cache_dir,
            base=base,
            tags=tags,
            allow_pickle=allow_pickle,
            mode=mode,
        )
        return
    if not path:
        raise click.UsageError("give the PATH of an adapter (or --hf-cache)")
    if not os.path.lexists(path):  # a symlink loop exists as a link: the add says what is wrong with it
        raise click.BadParameter(f"Path {path!r} does not exist.", param_hint="'PATH'")
    with progress_bar(state, "adding", unit_bytes=True) as progress:
        info = state.hub.add_adapter(
            path,
            name=name,
            base=base,
            tags=tags,
            description=description,
            allow_pickle=allow_pickle,
            progress=progress,
        )
    if mode == "json":
        emit_json(info.to_dict())
    else:
        _print_list([info.to_dict()], mode)


def _bulk_add(
    state: State,
    path: str | None,
    *,
    hf_cache: bool,
    cache_dir: str | None,
    base: str | None,
    tags: tuple[str, ...],
    allow_pickle: bool,
    mode: str,
) -> None:
    def report(item: Any) -> None:
        if mode == "table" and not state.quiet:
            why = f": {item.message}" if item.message else ""
            click.echo(f"{item.status:8} {item.name}{why}", err=True)

    if hf_cache:
        result = state.hub.add_hf_cache(cache_dir=cache_dir, tags=tags, on_item=report)
    else:
        assert path is not None
        result = state.hub.add_tree(path, base=base, tags=tags, allow_pickle=allow_pickle, on_item=report)
    if mode == "json":
        emit_json(result.to_dict())
    elif mode == "csv":
        emit_records([i.to_dict() for i in result.items], BULK_COLUMNS, mode=mode)
    elif not state.quiet:
        counts = ", ".join(f"{result.count(s)} {s}" for s in ("added", "skipped", "failed"))
        click.echo(f"{len(result.items)} adapters found: {counts}", err=True)
    if result.count("failed"):
        raise click.exceptions.Exit(1)


BULK_COLUMNS = [("path", "path"), ("name", "name"), ("status", "status"), ("message", "message")]


@cli.command("list")
@filter_options
@click.option(
    "--sort",
    metavar="DATASET:METRIC",
    help="Best first by the latest evaluation record of METRIC on DATASET (e.g. qa:loss).",
)
@output_options(json_help=ADAPTER_JSON)
@pass_state
def list_cmd(state: State, mode: str, sort: str | None, **filters: Any) -> None:
    """List cataloged adapters, optionally filtered."""
    if sort is not None:
        ranked = [r.to_dict() for r in state.hub.rank_adapters(sort, **_filters(filters))]
        for r in ranked:
            r["score"] = r["evaluation"]["value"]
        if mode == "json":
            emit_json(ranked)
            return
        emit_records(
            ranked,
            [*LIST_COLUMNS[:1], ("score", sort), *LIST_COLUMNS[1:]],
            mode=mode,
            formatters={"size_bytes": human_size},
        )
        return
    if mode == "json":
        emit_json_lines(state.hub.adapter_records_json(**_filters(filters)))
        return
    records = [a.to_dict() for a in state.hub.list_adapters(**_filters(filters))]
    _print_list(records, mode)


@cli.command("search", short_help="Find adapters by name, description, tags or base model.")
@click.argument("query")
@filter_options
@click.option(
    "--hub",
    "on_hub",
    is_flag=True,
    help="Search a Hub for PEFT adapter repos instead (only --base applies; see --endpoint).",
)
@click.option(
    "--endpoint", metavar="URL", help="With --hub: the server (default: $HF_ENDPOINT, else huggingface.co)."
)
@click.option(
    "--token", metavar="TOKEN", help="With --hub: access token (default: $HF_TOKEN or the stored login)."
)
@output_options(json_help=ADAPTER_JSON)
@pass_state
def search_cmd(
    state: State, query: str, mode: str, on_hub: bool, endpoint: str | None, token: str | None, **filters: Any
) -> None:
    """Find adapters whose name, description, tags or base model contain every word of QUERY."""
    if on_hub:
        others = [k for k, v in filters.items() if v is not None and k != "base"]
        if others:
            flag = "format" if others[0] == "fmt" else others[0].replace("_", "-")
            raise click.UsageError(f"--hub takes only --base as a filter, not --{flag}")
        found = [
            r.to_dict()
            for r in state.hub.search_hub(query, base=filters["base"], endpoint=endpoint, token=token)
        ]
        emit_records(
            found,
            [
                ("repo_id", "repo"),
                ("base_model", "base model"),
                ("tags", "tags"),
                ("last_modified", "updated"),
            ],
            mode=mode,
            title="adapters on the Hub",
        )
        return
    if endpoint or token:
        raise click.UsageError("--endpoint and --token go with --hub")
    if mode == "json":
        emit_json_lines(state.hub.adapter_records_json(query, **_filters(filters)))
        return
    records = [a.to_dict() for a in state.hub.search_adapters(query, **_filters(filters))]
    _print_list(records, mode)


@cli.command("show", short_help="Everything the catalog knows about one adapter.")
@click.argument("name")
@output_options(json_help=ADAPTER_JSON)
@pass_state
def show_cmd(state: State, name: str, mode: str) -> None:
    """Everything the catalog knows about one adapter: metadata, files, modules, lineage."""
    info = state.hub.adapter_info(name)
    d = info.to_dict()
    d["evaluations"] = [e.to_dict() for e in state.hub.evaluations(name)]
    if mode == "json":
        emit_json(d)
        return
    if mode == "csv":
        emit_records(
            d["modules"],
            [
                (k, k)
                for k in (
                    "module",
                    "short_name",
                    "kind",
                    "rank",
                    "alpha",
                    "scale",
                    "in_features",
                    "out_features",
                    "dora",
                )
            ],
            mode="csv",
        )
        return
    pairs: list[tuple[str, Any]] = [
        ("name", d["name"]),
        ("format", d["format"]),
        *([("kind", d["metadata"]["adapterhub.kind"])] if "adapterhub.kind" in d["metadata"] else []),
        ("base model", d["base_model"] or "(unknown)"),
        ("rank", d["rank"]),
        ("alpha", d["alpha"]),
        ("rslora", d["use_rslora"]),
        ("dora", d["use_dora"]),
        ("targets", d["target_modules"]),
        ("modules", d["num_modules"]),
        ("dtype", d["dtype"]),
        ("parameters", f"{d['num_params']:,}"),
        ("size", human_size(d["size_bytes"])),
        ("sha256", d["sha256"]),
        ("tags", d["tags"]),
        ("description", d["description"]),
        ("source", d["source"]),
        ("added", d["created_at"]),
    ]
    if d["rank_pattern"]:
        pairs.append(("rank pattern", d["rank_pattern"]))
    if d["alpha_pattern"]:
        pairs.append(("alpha pattern", d["alpha_pattern"]))
    for p in d["parents"]:
        w = "" if p["weight"] is None else f" x {p['weight']:g}"
        pairs.append(("parent", f"{p['name']}{w} ({p['method']})"))
    for m in d.get("merges") or ():
        verb = "unmerged from" if m.get("unmerge") else "merged into"
        pairs.append((verb, f"{m['out']} (base {m['base']}, weight {m['weight']:g}, {m['at']})"))
    if d.get("children"):
        pairs.append(("children", d["children"]))
    for push in d.get("pushes") or ():
        pairs.append(
            (
                "pushed to",
                f"{push['repo_id']}@{push['commit'][:12]} on {push['endpoint']} ({push['pushed_at']})",
            )
        )
    for e in d["evaluations"]:
        value = "" if e["value"] is None else f"{e['value']:.4g}"
        pairs.append(
            (
                "evaluation",
                f"{e['dataset']} {e['metric']} = {value} ({e['rows']} rows, base {e['base']}, "
                f"{e['source']}, {e['created_at']})",
            )
        )
    for k, v in sorted(d["metadata"].items()):
        if k.startswith(("ss_", "modelspec.")) and len(str(v)) < 200:
            pairs.append((k, str(v)))
    emit_fields(pairs, title=f"adapter {d['name']}")


@cli.command("tag")
@click.argument("name")
@click.argument("tags", nargs=-1, required=True)
@click.option("--remove", is_flag=True, help="Remove these tags instead of adding them.")
@output_options(json_help=ADAPTER_JSON)
@pass_state
def tag_cmd(state: State, name: str, tags: tuple[str, ...], remove: bool, mode: str) -> None:
    """Add tags to an adapter (or remove them with --remove)."""
    info = state.hub.tag_adapter(name, list(tags), remove=remove)
    if mode == "json":
        emit_json(info.to_dict())
    elif not state.quiet:
        click.echo(f"{info.name}: tags {', '.join(info.tags) or '(none)'}")


@cli.command("rm", short_help="Remove adapters from the catalog (and unshared files).")
@click.argument("names", nargs=-1, required=True)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_state
def rm_cmd(state: State, names: tuple[str, ...], yes: bool) -> None:
    """Remove adapters from the catalog (and their files from the store, unless shared)."""
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("rm removes adapters for good; pass --yes when not running interactively")
        click.confirm(f"Remove {len(names)} adapter(s): {', '.join(names)}?", abort=True)
    removed = state.hub.remove_adapters(list(names))
    if state.json:
        emit_json({"removed": removed})
    elif not state.quiet:
        click.echo(f"removed {', '.join(removed)}")


@cli.command("export", short_help="Write an adapter out as PEFT, kohya, diffusers or GGUF.")
@click.argument("name")
@click.argument("dest", type=click.Path())
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["peft", "kohya", "gguf", "diffusers"]),
    help="Output format (default: the adapter's own; same format copies the stored files). gguf: a "
    "llama.cpp / ollama LoRA for a Llama-family base; diffusers: the key layout of diffusers' "
    "load_lora_weights (a kohya UNet LoRA, mapped with its registered base's keys). Both need the "
    "adapter's base registered.",
)
@click.option("--overwrite", is_flag=True, help="Replace DEST if it exists.")
@pass_state
def export_cmd(state: State, name: str, dest: str, fmt: str | None, overwrite: bool) -> None:
    """Write an adapter out as a PEFT folder, a kohya or diffusers .safetensors file, or a GGUF LoRA."""
    with progress_bar(state, "exporting", unit_bytes=True) as progress:
        out = state.hub.export_adapter(name, dest, format=fmt, overwrite=overwrite, progress=progress)
    if state.json:
        emit_json({"name": name, "path": str(out)})
    elif not state.quiet:
        click.echo(f"exported {name} to {out}")


@cli.group("db")
def db_group() -> None:
    """Catalog database maintenance."""


@db_group.command("upgrade", short_help="Apply pending schema migrations.")
@pass_state
def db_upgrade_cmd(state: State) -> None:
    """Apply pending schema migrations (adapterhub also does this when it opens a catalog)."""
    rev = state.hub.upgrade_db()
    if state.json:
        emit_json({"revision": rev})
    elif not state.quiet:
        click.echo(f"catalog schema at revision {rev}")


@db_group.command("check", short_help="Check the catalog and the store (exit 1 if wrong).")
@click.option("--quick", is_flag=True, help="Check that stored files exist, without re-hashing them.")
@output_options
@pass_state
def db_check_cmd(state: State, quick: bool, mode: str) -> None:
    """Check the catalog and store: files present with the right sha256, orphans, leftovers of killed
    runs, the database's own integrity. Exits with code 1 when anything is wrong."""
    report = state.hub.check_db(verify=not quick)
    if mode == "json":
        emit_json(report.to_dict())
    elif report.problems:
        emit_records(
            [p.to_dict() for p in report.problems],
            PROBLEM_COLUMNS,
            mode=mode,
            formatters={"size_bytes": human_size},
        )
    if mode != "json" and not state.quiet:
        summary = "no problems" if report.ok else f"{len(report.problems)} problem(s)"
        reclaim = (
            f"; `adapterhub db gc` reclaims {human_size(report.reclaimable_bytes)}"
            if report.reclaimable_bytes
            else ""
        )
        click.echo(f"checked {report.files_checked} stored files: {summary}{reclaim}", err=True)
    if not report.ok:
        raise click.exceptions.Exit(1)


@db_group.command("gc", short_help="Remove unreferenced objects and leftovers of runs.")
@click.option("--yes", "-y", is_flag=True, help="Remove them; without it, only list what would go.")
@output_options
@pass_state
def db_gc_cmd(state: State, yes: bool, mode: str) -> None:
    """Remove store objects no catalog row references and what killed runs left behind (never what a
    live process is writing). A dry run unless --yes."""
    report = state.hub.gc(dry_run=not yes)
    if mode == "json":
        emit_json(report.to_dict())
        return
    if report.items:
        emit_records(
            [p.to_dict() for p in report.items],
            PROBLEM_COLUMNS,
            mode=mode,
            formatters={"size_bytes": human_size},
        )
    if not state.quiet:
        verb = "would remove" if report.dry_run else "removed"
        hint = " (run with --yes to remove them)" if report.dry_run and report.items else ""
        click.echo(f"{verb} {len(report.items)} item(s), {human_size(report.size_bytes)}{hint}", err=True)


PROBLEM_COLUMNS = [("kind", "kind"), ("subject", "what"), ("message", "problem"), ("size_bytes", "size")]
