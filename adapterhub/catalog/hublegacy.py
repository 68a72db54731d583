"""Bringing the server state that older versions kept in files (JSON files and marker files under
``HOME/server``) into the catalog's tables, once: `adapterhub.server.legacy` reads the files into a
`LegacyState`, and `import_state` writes all of it in one transaction, marked done in ``hub_settings``
so that it never runs twice (rows already there are kept)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, insert, select

from . import Catalog
from .hubthreads import ThreadRows
from .tables import (
    hub_access_requests,
    hub_collection_items,
    hub_collections,
    hub_discussions,
    hub_gates,
    hub_likes,
    hub_renames,
    hub_repo_xorbs,
    hub_repos,
    hub_settings,
    hub_upload_proofs,
    hub_user_xorbs,
    hub_webhooks,
)

__all__ = ["IMPORTED", "LegacyState", "import_state", "imported", "repo_keys"]

IMPORTED = "legacy_files_imported"


@dataclass
class LegacyState:
    """Rows to import, keyed by repo row ids (the files named repos by ``<id>-<created_at>``)."""

    gates: list[dict[str, Any]] = field(default_factory=list)
    access: list[dict[str, Any]] = field(default_factory=list)
    proofs: list[dict[str, Any]] = field(default_factory=list)
    repo_xorbs: list[dict[str, Any]] = field(default_factory=list)
    user_xorbs: list[dict[str, Any]] = field(default_factory=list)
    renames: list[dict[str, Any]] = field(default_factory=list)
    likes: list[dict[str, Any]] = field(default_factory=list)
    threads: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (repo id, the Hub's dict)
    collections: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)  # owner, id, dict
    webhooks: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(v) for v in vars(self).values())


def repo_keys(catalog: Catalog) -> dict[str, int]:
    """The name each repo had on disk (``<id>-<created_at as %Y%m%d%H%M%S%f>``) -> its row id."""
    with catalog.read() as conn:
        rows = conn.execute(select(hub_repos.c.id, hub_repos.c.created_at)).all()
    return {f"{rid}-{created:%Y%m%d%H%M%S%f}": rid for rid, created in rows}


def imported(catalog: Catalog) -> bool:
    with catalog.read() as conn:
        return (
            conn.execute(select(hub_settings.c.value).where(hub_settings.c.name == IMPORTED)).first()
            is not None
        )


def _put(conn: Connection, table: Any, rows: list[dict[str, Any]]) -> None:
    keys = [c for c in table.primary_key.columns]
    for row in rows:
        where = [c == row[c.name] for c in keys]
        if conn.execute(select(keys[0]).where(*where)).first() is None:
            conn.execute(insert(table).values(**row))


def _iso(value: str) -> dt.datetime:
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ")


def import_state(catalog: Catalog, state: LegacyState) -> bool:
    """Write ``state`` into the tables in one transaction, unless that was done before; True if done now."""
    with catalog.write() as conn:
        if conn.execute(select(hub_settings.c.value).where(hub_settings.c.name == IMPORTED)).first():
            return False
        _put(conn, hub_gates, state.gates)
        _put(conn, hub_access_requests, state.access)
        _put(conn, hub_upload_proofs, state.proofs)
        _put(conn, hub_repo_xorbs, state.repo_xorbs)
        _put(conn, hub_user_xorbs, state.user_xorbs)
        _put(conn, hub_renames, state.renames)
        _put(conn, hub_likes, state.likes)
        _put(conn, hub_webhooks, state.webhooks)
        for repo_id, d in state.threads:
            if conn.execute(
                select(hub_discussions.c.id).where(
                    hub_discussions.c.repo_id == repo_id, hub_discussions.c.num == d["num"]
                )
            ).first():
                continue
            changes = d.get("changes") or {}
            did = conn.execute(
                insert(hub_discussions)
                .values(
                    repo_id=repo_id,
                    num=int(d["num"]),
                    title=d["title"],
                    status=d["status"],
                    is_pull_request=bool(d["isPullRequest"]),
                    author=d["author"]["name"],
                    pinned=bool(d.get("pinned")),
                    base=changes.get("base"),
                    base_oid=changes.get("baseOid"),
                    merge_oid=changes.get("mergeCommitId"),
                    created_at=_iso(d["createdAt"]),
                )
                .returning(hub_discussions.c.id)
            ).scalar_one()
            ThreadRows.write_events(conn, did, [], d.get("events") or [])
        for owner, cid, c in state.collections:
            if conn.execute(select(hub_collections.c.id).where(hub_collections.c.id == cid)).first():
                continue
            conn.execute(
                insert(hub_collections).values(
                    id=cid,
                    owner=owner,
                    title=c["title"],
                    description=c.get("description"),
                    private=bool(c.get("private")),
                    theme=c.get("theme") or "default",
                    position=int(c.get("position") or 0),
                    updated_at=_iso(c["lastUpdated"]),
                )
            )
            items = [
                {
                    "collection_id": cid,
                    "item_id": i["_id"],
                    "position": n,
                    "kind": i["type"],
                    "ref": i["id"],
                    "note": (i.get("note") or {}).get("text"),
                }
                for n, i in enumerate(c.get("items") or [])
            ]
            if items:
                conn.execute(insert(hub_collection_items), items)
        conn.execute(
            insert(hub_settings).values(name=IMPORTED, value=dt.datetime.now(dt.timezone.utc).isoformat())
        )
    return True
