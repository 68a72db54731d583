"""Catalog reads and writes about sharing: where adapters were pushed, which came from where."""

from __future__ import annotations

from sqlalchemy import Connection, insert, select

from ..records import PushRecord
from .queries import find_id, utcnow
from .tables import adapters, remote_pushes


def record_push(
    conn: Connection,
    name: str,
    *,
    endpoint: str,
    repo_id: str,
    revision: str,
    commit: str,
    commit_url: str | None,
) -> bool:
    """Record a push of adapter ``name``; False if it was removed meanwhile."""
    adapter_id = find_id(conn, name)
    if adapter_id is None:
        return False
    conn.execute(
        insert(remote_pushes).values(
            adapter_id=adapter_id,
            endpoint=endpoint,
            repo_id=repo_id,
            revision=revision,
            commit_oid=commit,
            commit_url=commit_url,
            pushed_at=utcnow(),
        )
    )
    return True


def pushes_of(conn: Connection, name: str) -> list[PushRecord] | None:
    """Pushes of adapter ``name``, oldest first; None if there is no such adapter."""
    adapter_id = find_id(conn, name)
    if adapter_id is None:
        return None
    rows = conn.execute(
        select(remote_pushes).where(remote_pushes.c.adapter_id == adapter_id).order_by(remote_pushes.c.id)
    ).all()
    return [
        PushRecord(
            name,
            r.endpoint,
            r.repo_id,
            r.revision,
            r.commit_oid,
            r.commit_url,
            r.pushed_at.replace(microsecond=0).isoformat() + "Z",
        )
        for r in rows
    ]


def names_by_source(conn: Connection, source: str) -> list[str]:
    """Cataloged adapters whose source is ``source`` (``repo@commit`` for pulled ones), oldest first."""
    return list(
        conn.execute(
            select(adapters.c.name).where(adapters.c.source == source).order_by(adapters.c.id)
        ).scalars()
    )
