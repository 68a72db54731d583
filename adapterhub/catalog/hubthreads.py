"""Discussions and pull requests of the server's repos in the catalog: numbered threads with their
events (comments, status and title changes, commits). A pull request's branch ``refs/pr/N`` is opened
with its thread, and merged with its status change, each in one transaction.

Threads travel as the Hub's dicts (``num``, ``title``, ``status``, ``events``, ...): `change` loads one,
lets the server's function edit it and writes back what changed, all inside one write transaction (the
catalog's write lock orders them, across processes)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, func, insert, select, update

from ..errors import BadRequestError, EntryNotFoundError
from . import Catalog
from .hubcommits import PR_PREFIX, CardOf, CommitRows, branch_name
from .hubrecords import Repo, iso, utcnow
from .tables import hub_discussion_events, hub_discussions

__all__ = ["ThreadRows"]

T = TypeVar("T")


def _parse_iso(value: str) -> dt.datetime:
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ")


def _event(r: Any) -> dict[str, Any]:
    return {
        "id": r.event_id,
        "type": r.kind,
        "createdAt": iso(r.created_at),
        "author": {"name": r.author},
        "data": r.data,
    }


def _thread(repo: Repo, r: Any, events: list[dict[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {
        "num": r.num,
        "title": r.title,
        "status": r.status,
        "isPullRequest": bool(r.is_pull_request),
        "createdAt": iso(r.created_at),
        "author": {"name": r.author},
        "repo": {"name": repo.repo_id, "type": "model"},
        "pinned": bool(r.pinned),
        "events": events,
    }
    if r.is_pull_request:
        d["changes"] = {"base": r.base, "baseOid": r.base_oid, "mergeCommitId": r.merge_oid}
    return d


class ThreadRows:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    # ------------------------------------------------------------------ reading
    @staticmethod
    def _load(conn: Connection, repo: Repo, num: int | None = None) -> list[tuple[int, dict[str, Any]]]:
        stmt = select(hub_discussions).where(hub_discussions.c.repo_id == repo.id)
        if num is not None:
            stmt = stmt.where(hub_discussions.c.num == num)
        rows = conn.execute(stmt.order_by(hub_discussions.c.num.desc())).all()
        if not rows:
            return []
        events: dict[int, list[dict[str, Any]]] = {r.id: [] for r in rows}
        for e in conn.execute(
            select(hub_discussion_events)
            .where(hub_discussion_events.c.discussion_id.in_(list(events)))
            .order_by(hub_discussion_events.c.id)
        ):
            events[e.discussion_id].append(_event(e))
        return [(r.id, _thread(repo, r, events[r.id])) for r in rows]

    def threads(self, repo: Repo) -> list[dict[str, Any]]:
        """Every thread, newest first."""
        with self.catalog.read() as conn:
            return [d for _, d in self._load(conn, repo)]

    def get(self, repo: Repo, num: int) -> dict[str, Any] | None:
        with self.catalog.read() as conn:
            found = self._load(conn, repo, num)
        return found[0][1] if found else None

    # ------------------------------------------------------------------ writing
    def create(
        self,
        repo: Repo,
        author: str,
        title: str,
        events: list[dict[str, Any]],
        *,
        pull_request: bool,
        base: str,
    ) -> dict[str, Any]:
        """A new thread (numbered after the repo's last), with its first ``events``; a pull request also
        gets its branch ``refs/pr/N`` at the head of ``base``."""
        now = utcnow()
        with self.catalog.write() as conn:
            last = conn.execute(
                select(func.max(hub_discussions.c.num)).where(hub_discussions.c.repo_id == repo.id)
            ).scalar()
            num = int(last or 0) + 1
            values: dict[str, Any] = {
                "repo_id": repo.id,
                "num": num,
                "title": title,
                "status": "open",
                "is_pull_request": pull_request,
                "author": author,
                "pinned": False,
                "created_at": now,
            }
            if pull_request:
                name = branch_name(base)
                start = CommitRows.open_pr_ref(conn, repo, f"{PR_PREFIX}{num}", name)
                values.update(base=f"refs/heads/{name}", base_oid=start.oid, merge_oid=None)
            did = conn.execute(
                insert(hub_discussions).values(**values).returning(hub_discussions.c.id)
            ).scalar_one()
            self.write_events(conn, did, [], events)
            return self._load(conn, repo, num)[0][1]

    @staticmethod
    def write_events(
        conn: Connection, did: int, old: list[dict[str, Any]], new: list[dict[str, Any]]
    ) -> None:
        before = {e["id"]: e for e in old}
        for e in new:
            prev = before.get(e["id"])
            if prev is None:
                conn.execute(
                    insert(hub_discussion_events).values(
                        discussion_id=did,
                        event_id=e["id"],
                        kind=e["type"],
                        author=e["author"]["name"],
                        data=e["data"],
                        created_at=_parse_iso(e["createdAt"]),
                    )
                )
            elif prev["data"] != e["data"]:
                conn.execute(
                    update(hub_discussion_events)
                    .where(
                        hub_discussion_events.c.discussion_id == did,
                        hub_discussion_events.c.event_id == e["id"],
                    )
                    .values(data=e["data"])
                )

    def change(self, repo: Repo, num: int, edit: Callable[[dict[str, Any]], T]) -> T:
        """Load thread ``num``, let ``edit`` change it (title, status, events added or edited) and write
        that back, in one transaction; returns what ``edit`` returns."""
        with self.catalog.write() as conn:
            found = self._load(conn, repo, num)
            if not found:
                raise EntryNotFoundError(f"Discussion {num} of {repo.repo_id}")
            did, d = found[0]
            old = [dict(e, data=dict(e["data"])) for e in d["events"]]
            out = edit(d)
            conn.execute(
                update(hub_discussions)
                .where(hub_discussions.c.id == did)
                .values(title=d["title"], status=d["status"])
            )
            self.write_events(conn, did, old, d["events"])
        return out

    def merge(
        self, repo: Repo, num: int, user: str, events: Callable[[], list[dict[str, Any]]], card_of: CardOf
    ) -> dict[str, Any]:
        """Merge pull request ``num`` into its base branch and mark it merged (with the ``events`` made
        then), in one transaction."""
        with self.catalog.write() as conn:
            found = self._load(conn, repo, num)
            if not found or not found[0][1]["isPullRequest"]:
                raise EntryNotFoundError(f"Pull request {num} of {repo.repo_id}")
            did, d = found[0]
            if d["status"] != "open":
                raise BadRequestError(f"pull request {num} is {d['status']}, not open")
            changes = d["changes"]
            merged = CommitRows.merge_pr_in(
                conn,
                repo,
                f"{PR_PREFIX}{num}",
                changes["baseOid"],
                branch_name(changes["base"]),
                title=f"Merge {PR_PREFIX}{num}: {d['title']}",
                author=user,
                card_of=card_of,
            )
            conn.execute(
                update(hub_discussions)
                .where(hub_discussions.c.id == did)
                .values(status="merged", merge_oid=merged.oid)
            )
            self.write_events(conn, did, [], events())
            return self._load(conn, repo, num)[0][1]
