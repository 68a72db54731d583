"""The server's social state in the catalog: likes (of repos, so a like follows its repo through a move
and goes with it), webhooks (each user's), and collections (a user's ordered lists of items). Each
write is one transaction; collections travel as the Hub's dicts, edited by the server's functions
inside `CollectionRows.change`."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, delete, insert, select, update

from ..errors import BadRequestError, ConflictError, EntryNotFoundError, ForbiddenError, RepoNotFoundError
from . import Catalog
from .hubrecords import Repo, iso, utcnow
from .tables import hub_collection_items, hub_collections, hub_likes, hub_webhooks

__all__ = ["CollectionRows", "LikeRows", "WebhookRows", "slugify"]

T = TypeVar("T")


def slugify(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:80] or "collection"


# ---------------------------------------------------------------------- likes
class LikeRows:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def like(self, user: str, repo: Repo) -> None:
        with self.catalog.write() as conn:
            where = (hub_likes.c.user == user) & (hub_likes.c.repo_id == repo.id)
            if conn.execute(select(hub_likes.c.user).where(where)).first() is None:
                conn.execute(insert(hub_likes).values(user=user, repo_id=repo.id, created_at=utcnow()))

    def unlike(self, user: str, repo: Repo) -> None:
        with self.catalog.write() as conn:
            conn.execute(delete(hub_likes).where(hub_likes.c.user == user, hub_likes.c.repo_id == repo.id))

    def liked(self, user: str) -> list[tuple[int, str]]:
        """(repo row id, when) of each like of ``user``, newest first."""
        with self.catalog.read() as conn:
            rows = conn.execute(
                select(hub_likes.c.repo_id, hub_likes.c.created_at)
                .where(hub_likes.c.user == user)
                .order_by(hub_likes.c.created_at.desc())
            ).all()
        return [(rid, iso(at)) for rid, at in rows]

    def likers(self, repo: Repo) -> list[str]:
        with self.catalog.read() as conn:
            return list(
                conn.execute(
                    select(hub_likes.c.user).where(hub_likes.c.repo_id == repo.id).order_by(hub_likes.c.user)
                ).scalars()
            )


# ---------------------------------------------------------------------- webhooks
def _hook(r: Any) -> dict[str, Any]:
    return {
        "id": r.id,
        "secret": r.secret,
        "disabled": bool(r.disabled),
        "createdAt": iso(r.created_at),
        "url": r.url,
        "watched": r.watched,
        "domains": r.domains,
    }


class WebhookRows:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def of_user(self, user: str) -> list[dict[str, Any]]:
        with self.catalog.read() as conn:
            rows = conn.execute(
                select(hub_webhooks).where(hub_webhooks.c.user == user).order_by(hub_webhooks.c.created_at)
            )
            return [_hook(r) for r in rows]

    def get(self, user: str, hook_id: str) -> dict[str, Any]:
        with self.catalog.read() as conn:
            r = conn.execute(
                select(hub_webhooks).where(hub_webhooks.c.user == user, hub_webhooks.c.id == hook_id)
            ).first()
        if r is None:
            raise EntryNotFoundError(f"webhook {hook_id}")
        return _hook(r)

    def insert(self, user: str, hook_id: str, fields: dict[str, Any], *, limit: int) -> dict[str, Any]:
        """A new webhook of ``user`` (``url``, ``watched``, ``domains``, ``secret``); at most ``limit`` each."""
        with self.catalog.write() as conn:
            n = len(conn.execute(select(hub_webhooks.c.id).where(hub_webhooks.c.user == user)).all())
            if n >= limit:
                raise BadRequestError(f"at most {limit} webhooks per user")
            conn.execute(
                insert(hub_webhooks).values(
                    id=hook_id,
                    user=user,
                    url=fields["url"],
                    watched=fields["watched"],
                    domains=fields["domains"],
                    secret=fields.get("secret"),
                    disabled=False,
                    created_at=utcnow(),
                )
            )
            return _hook(conn.execute(select(hub_webhooks).where(hub_webhooks.c.id == hook_id)).one())

    def change(self, user: str, hook_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        allowed = {
            k: v for k, v in fields.items() if k in ("url", "watched", "domains", "secret", "disabled")
        }
        with self.catalog.write() as conn:
            where = (hub_webhooks.c.user == user) & (hub_webhooks.c.id == hook_id)
            if conn.execute(select(hub_webhooks.c.id).where(where)).first() is None:
                raise EntryNotFoundError(f"webhook {hook_id}")
            if allowed:
                conn.execute(update(hub_webhooks).where(where).values(**allowed))
            return _hook(conn.execute(select(hub_webhooks).where(where)).one())

    def delete(self, user: str, hook_id: str) -> None:
        with self.catalog.write() as conn:
            n = conn.execute(
                delete(hub_webhooks).where(hub_webhooks.c.user == user, hub_webhooks.c.id == hook_id)
            ).rowcount
        if not n:
            raise EntryNotFoundError(f"webhook {hook_id}")

    def watching(self, repo: Repo) -> list[dict[str, Any]]:
        """The enabled webhooks of users who may see ``repo`` (all for a public repo, its owner's for a
        private one); the server picks those that watch it."""
        stmt = select(hub_webhooks).where(hub_webhooks.c.disabled.is_(False)).order_by(hub_webhooks.c.user)
        if repo.private:
            stmt = stmt.where(hub_webhooks.c.user == repo.namespace)
        with self.catalog.read() as conn:
            return [_hook(r) for r in conn.execute(stmt)]


# ---------------------------------------------------------------------- collections
def _collection(r: Any, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "slug": f"{r.owner}/{slugify(r.title)}-{r.id}",
        "title": r.title,
        "description": r.description,
        "owner": {"name": r.owner, "type": "user"},
        "items": items,
        "lastUpdated": iso(r.updated_at),
        "position": r.position,
        "private": bool(r.private),
        "theme": r.theme,
        "upvotes": 0,
    }


def _item(r: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"_id": r.item_id, "id": r.ref, "type": r.kind, "position": r.position}
    if r.note:
        out["note"] = {"text": r.note, "html": r.note}
    return out


class CollectionRows:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    @staticmethod
    def _load(conn: Connection, where: Any) -> list[dict[str, Any]]:
        rows = conn.execute(
            select(hub_collections).where(where).order_by(hub_collections.c.updated_at.desc())
        ).all()
        if not rows:
            return []
        items: dict[str, list[dict[str, Any]]] = {r.id: [] for r in rows}
        for i in conn.execute(
            select(hub_collection_items)
            .where(hub_collection_items.c.collection_id.in_(list(items)))
            .order_by(hub_collection_items.c.position)
        ):
            items[i.collection_id].append(_item(i))
        return [_collection(r, items[r.id]) for r in rows]

    def get(self, owner: str, cid: str) -> dict[str, Any] | None:
        with self.catalog.read() as conn:
            found = self._load(conn, (hub_collections.c.owner == owner) & (hub_collections.c.id == cid))
        return found[0] if found else None

    def listing(self, owner: str | None) -> list[dict[str, Any]]:
        """Every collection (of ``owner``), newest change first."""
        with self.catalog.read() as conn:
            return self._load(
                conn, hub_collections.c.owner == owner if owner else hub_collections.c.id.isnot(None)
            )

    def insert(self, owner: str, cid: str, c: dict[str, Any]) -> dict[str, Any]:
        with self.catalog.write() as conn:
            if conn.execute(
                select(hub_collections.c.id).where(
                    hub_collections.c.owner == owner, hub_collections.c.title == c["title"]
                )
            ).first():
                raise ConflictError(f"a collection called {c['title']!r} already exists")
            conn.execute(
                insert(hub_collections).values(
                    id=cid,
                    owner=owner,
                    title=c["title"],
                    description=c.get("description"),
                    private=bool(c["private"]),
                    theme=c.get("theme") or "default",
                    position=int(c.get("position") or 0),
                    updated_at=utcnow(),
                )
            )
            return self._load(conn, hub_collections.c.id == cid)[0]

    def change(
        self, owner: str, cid: str, edit: Callable[[dict[str, Any]], None], *, slug: str, user: str
    ) -> dict[str, Any]:
        """Load the collection, check ``user`` may change it, let ``edit`` change it (fields, items) and write
        it back, in one transaction."""
        with self.catalog.write() as conn:
            found = self._load(conn, (hub_collections.c.owner == owner) & (hub_collections.c.id == cid))
            if not found or (found[0]["private"] and user != owner):
                raise RepoNotFoundError(f"collection {slug}")
            if user != owner:
                raise ForbiddenError(f"only {owner} may change collection {slug}")
            c = found[0]
            edit(c)
            conn.execute(
                update(hub_collections)
                .where(hub_collections.c.id == cid)
                .values(
                    title=c["title"],
                    description=c.get("description"),
                    private=bool(c["private"]),
                    theme=c["theme"],
                    position=int(c["position"]),
                    updated_at=utcnow(),
                )
            )
            conn.execute(delete(hub_collection_items).where(hub_collection_items.c.collection_id == cid))
            if c["items"]:
                conn.execute(
                    insert(hub_collection_items),
                    [
                        {
                            "collection_id": cid,
                            "item_id": i["_id"],
                            "position": n,
                            "kind": i["type"],
                            "ref": i["id"],
                            "note": (i.get("note") or {}).get("text"),
                        }
                        for n, i in enumerate(c["items"])
                    ],
                )
            return self._load(conn, hub_collections.c.id == cid)[0]

    def delete(self, owner: str, cid: str, *, slug: str, user: str) -> None:
        with self.catalog.write() as conn:
            found = self._load(conn, (hub_collections.c.owner == owner) & (hub_collections.c.id == cid))
            if not found or (found[0]["private"] and user != owner):
                raise RepoNotFoundError(f"collection {slug}")
            if user != owner:
                raise ForbiddenError(f"only {owner} may change collection {slug}")
            conn.execute(delete(hub_collection_items).where(hub_collection_items.c.collection_id == cid))
            conn.execute(delete(hub_collections).where(hub_collections.c.id == cid))
