"""Writing a commit: the new file listing from the old one and the operations, and the rows that record
it. Pure functions over a connection; `ServerStore.commit` stages the contents and calls them in one
transaction."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from ..catalog.tables import hub_commit_files, hub_commits, hub_refs
from ..errors import EntryNotFoundError
from .records import Commit, Entry, Op


def edit_tree(
    before: dict[str, Entry], staged: Sequence[tuple[Op, Entry | None]], head_oid: str
) -> dict[str, Entry]:
    """The listing after applying ``staged`` (an operation and, for additions, its entry) to ``before``.

    A ``delete`` of a path that is no file but a folder deletes the folder, as the Hub does, so both
    idioms of the client (``CommitOperationDelete("dir/")`` and ``("dir")``) work.
    """
    after = dict(before)
    for op, entry in staged:
        if entry is not None:
            after[op.path] = entry
            continue
        if op.kind == "delete" and op.path in after:
            del after[op.path]
            continue
        prefix = op.path.rstrip("/") + "/"
        gone = [p for p in after if p.startswith(prefix)]
        if not gone:
            what = "folder" if op.kind == "delete_folder" else "file"
            raise EntryNotFoundError(f"A {what} with this name doesn't exist: {op.path}", head_oid)
        for p in gone:
            del after[p]
    return after


def insert_commit(
    conn: Connection,
    repo_id: int,
    branch: str,
    parent: Commit | None,
    files: dict[str, Entry],
    title: str,
    message: str,
    author: str,
    card: dict[str, Any] | None,
    now: dt.datetime,
) -> Commit:
    """Record a commit with its full file listing and point ``branch`` at it."""
    tree = hashlib.sha1(
        "".join(
            f"{e.path}\0{e.blob_oid}\0{e.sha256}\0{e.size}\n"
            for e in sorted(files.values(), key=lambda e: e.path)
        ).encode()
    ).hexdigest()
    body = (
        f"tree {tree}\nparent {parent.oid if parent else ''}\nauthor {author}\ndate {now.isoformat()}\n\n"
        f"{title}\n\n{message}"
    )
    oid = hashlib.sha1(body.encode()).hexdigest()
    parent_oid = parent.oid if parent else None
    cid = conn.execute(
        insert(hub_commits)
        .values(
            repo_id=repo_id,
            oid=oid,
            parent_oid=parent_oid,
            title=title,
            message=message,
            author=author,
            card=card,
            created_at=now,
        )  # fmt: skip
        .returning(hub_commits.c.id)
    ).scalar_one()
    if files:
        rows = [
            {"commit_id": cid, "path": e.path, "size": e.size, "blob_oid": e.blob_oid, "sha256": e.sha256, "lfs": e.lfs}
            for e in files.values()
        ]  # fmt: skip
        conn.execute(insert(hub_commit_files), rows)
    where = (hub_refs.c.repo_id == repo_id) & (hub_refs.c.name == branch)
    if conn.execute(select(func.count()).select_from(hub_refs).where(where)).scalar_one():
        conn.execute(update(hub_refs).where(where).values(commit_id=cid))
    else:
        conn.execute(insert(hub_refs).values(repo_id=repo_id, name=branch, commit_id=cid))
    return Commit(cid, oid, parent_oid, title, message, author, card, now)
