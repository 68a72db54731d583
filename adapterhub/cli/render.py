"""Output for the CLI: one row iterator, rendered as a rich table, JSON or CSV.

rich is imported only when a table is actually drawn, so ``--json`` output stays fast.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import click

from ..records import finite


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


def emit_json(doc: Any) -> None:
    sys.stdout.write(
        json.dumps(finite(doc), indent=2, ensure_ascii=False, default=str, allow_nan=False) + "\n"
    )


def emit_json_lines(encoded: list[str]) -> None:
    """A JSON array of already encoded records, one compact record per line (readable, and no slow
    indenting encoder on large lists)."""
    sys.stdout.write("[\n" + ",\n".join(encoded) + "\n]\n" if encoded else "[]\n")


def emit_records(
    records: Sequence[dict[str, Any]],
    columns: Sequence[tuple[str, str]],
    *,
    mode: str,
    title: str | None = None,
    formatters: dict[str, Any] | None = None,
) -> None:
    """Print records as ``mode`` (table, json or csv); ``columns`` are (key, heading) for table/CSV."""
    formatters = formatters or {}
    if mode == "json":
        encode = json.JSONEncoder(ensure_ascii=False, default=str, allow_nan=False).encode
        emit_json_lines([encode(finite(r)) for r in records])
        return
    if mode == "csv":
        w = csv.writer(sys.stdout)
        w.writerow([key for key, _ in columns])
        for r in records:
            w.writerow([_fmt(r.get(key)) for key, _ in columns])
        return
    if not records:
        click.echo("(no adapters)" if title is None else f"(no {title})", err=True)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False, header_style="bold")
    for _, heading in columns:
        table.add_column(heading, overflow="fold")
    for r in records:
        table.add_row(*[formatters.get(key, _fmt)(r.get(key)) for key, _ in columns])
    Console(soft_wrap=False).print(table)


def emit_fields(pairs: Iterable[tuple[str, Any]], *, title: str | None = None) -> None:
    """A two-column key/value table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for k, v in pairs:
        table.add_row(k, v if isinstance(v, str) else _fmt(v))
    Console(soft_wrap=False).print(table)
