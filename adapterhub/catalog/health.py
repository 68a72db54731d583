"""Catalog reads for `db check` / `db gc`: what every row references, and the database's own checks."""

from __future__ import annotations

import math

from sqlalchemy import Connection, select

from .tables import adapter_files as files_table
from .tables import adapter_modules, adapters, hub_commit_files


def adapter_files(conn: Connection) -> list[tuple[str, str, str]]:
    """(adapter name, filename, sha256) of every stored file of every cataloged adapter."""
    stmt = (
        select(adapters.c.name, files_table.c.filename, files_table.c.sha256)
        .join(files_table, files_table.c.adapter_id == adapters.c.id)
        .order_by(adapters.c.name, files_table.c.filename)
    )
    return [(n, f, d) for n, f, d in conn.execute(stmt)]


def server_digests(conn: Connection) -> set[str]:
    """sha256 of every file a hosted repo's commit holds (the server keeps them in its own store)."""
    return set(conn.execute(select(hub_commit_files.c.sha256).distinct()).scalars())


def integrity(conn: Connection) -> list[str]:
    """What the database's own consistency checks report (SQLite's integrity and foreign-key checks)."""
    if conn.dialect.name != "sqlite":
        conn.exec_driver_sql("SELECT 1")
        return []
    out = [r[0] for r in conn.exec_driver_sql("PRAGMA integrity_check").fetchall() if r[0] != "ok"]
    out += [
        f"row {r[1]} of {r[0]} points at a missing {r[2]} row"
        for r in conn.exec_driver_sql("PRAGMA foreign_key_check")
    ]
    return out


def non_finite(conn: Connection) -> list[tuple[str, str]]:
    """(adapter, what) for stored numbers that are not finite (older versions accepted them)."""
    out = []
    for name, alpha in conn.execute(select(adapters.c.name, adapters.c.alpha)):
        if alpha is not None and not math.isfinite(alpha):
            out.append((name, f"alpha is {alpha}; re-add the adapter with a finite lora_alpha"))
    stmt = select(adapters.c.name, adapter_modules.c.module, adapter_modules.c.scale).join(
        adapter_modules, adapter_modules.c.adapter_id == adapters.c.id
    )
    for name, module, scale in conn.execute(stmt):
        if scale is not None and not math.isfinite(scale):
            out.append((name, f"module {module} has scale {scale}"))
    return out
