"""Collections: a user's named, ordered lists of repos (say, the adapters that go with one base model),
public or private. Rows of the catalog (`adapterhub.catalog.hubsocial`); each change is one transaction."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from ..catalog.hubsocial import CollectionRows, slugify
from ..errors import BadRequestError, ConflictError, ForbiddenError, RepoNotFoundError
from .checks import is_name
from .records import iso, utcnow

ITEM_TYPES = ("model", "dataset", "space", "paper", "collection")
ITEMS_LIMIT = 1000
ITEM_ID_LIMIT = 300  # the catalog's column


def _str(body: dict[str, Any], key: str, limit: int) -> str | None:
    value = body.get(key)
    if value is not None and (not isinstance(value, str) or len(value) > limit):
        raise BadRequestError(f"{key} must be a string of at most {limit} characters")
    return value


class Collections:
    def __init__(self, rows: CollectionRows) -> None:
        self.rows = rows

    @staticmethod
    def _owner(slug: str) -> tuple[str, str]:
        """``owner/title-words-ID`` -> (owner, ID): the title part may change, the id does not."""
        owner = slug.split("/", 1)[0]
        if "/" not in slug or not is_name(owner):
            raise RepoNotFoundError(f"collection {slug}")
        return owner, slug.rsplit("-", 1)[-1]

    def get(
        self, slug: str, viewer: str | None, may_see_model: Callable[[str], bool] | None = None
    ) -> dict[str, Any]:
        """The collection, as ``viewer`` may see it: a private one only by its owner, and (given
        ``may_see_model``) without the items that ``viewer`` may not see (private repos and
        collections), as the Hub hides them."""
        owner, cid = self._owner(slug)
        c = self.rows.get(owner, cid)
        if c is None or (c["private"] and viewer != owner):
            raise RepoNotFoundError(f"collection {slug}")
        return c if may_see_model is None else self._shown(c, viewer, may_see_model)

    def listing(
        self, owner: str | None, viewer: str | None, may_see_model: Callable[[str], bool] | None = None
    ) -> list[dict[str, Any]]:
        out = [c for c in self.rows.listing(owner) if not c["private"] or viewer == c["owner"]["name"]]
        if may_see_model is not None:
            out = [self._shown(c, viewer, may_see_model) for c in out]
        return out

    def _shown(
        self, c: dict[str, Any], viewer: str | None, may_see_model: Callable[[str], bool]
    ) -> dict[str, Any]:
        def visible(item: dict[str, Any]) -> bool:
            if item["type"] == "model":
                return may_see_model(item["id"])
            if item["type"] == "collection":
                try:
                    self.get(item["id"], viewer)
                except RepoNotFoundError:
                    return False
            return True

        items = [i for i in c["items"] if visible(i)]
        return c if len(items) == len(c["items"]) else {**c, "items": items}

    def create(self, user: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise BadRequestError("give {title, namespace, description, private}")
        title = _str(body, "title", 200)
        if not title:
            raise BadRequestError("a collection needs a title")
        namespace = body.get("namespace") or user
        if namespace != user:
            raise ForbiddenError(f"You don't have the rights to create a collection in {namespace}")
        cid = secrets.token_hex(12)
        slug = f"{user}/{slugify(title)}-{cid}"
        c: dict[str, Any] = {
            "slug": slug,
            "title": title,
            "description": _str(body, "description", 5000),
            "owner": {"name": user, "type": "user"},
            "items": [],
            "lastUpdated": iso(utcnow()),
            "position": 0,
            "private": bool(body.get("private")),
            "theme": "default",
            "upvotes": 0,
        }
        return self.rows.insert(user, cid, c)

    def _change(self, slug: str, user: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        owner, cid = self._owner(slug)
        return self.rows.change(owner, cid, change, slug=slug, user=user)

    def update(self, slug: str, user: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise BadRequestError("give {title, description, position, private, theme}")

        def apply(c: dict[str, Any]) -> None:
            for key, limit in (("title", 200), ("description", 5000), ("theme", 40)):
                if body.get(key) is not None:
                    c[key] = _str(body, key, limit)
            # a new title, a new slug (made from it when read back); the old one still works
            if body.get("private") is not None:
                c["private"] = bool(body["private"])
            if isinstance(body.get("position"), int):
                c["position"] = body["position"]

        return self._change(slug, user, apply)

    def delete(self, slug: str, user: str) -> None:
        owner, cid = self._owner(slug)
        self.rows.delete(owner, cid, slug=slug, user=user)

    def add_item(self, slug: str, user: str, body: Any) -> dict[str, Any]:
        item = body.get("item") if isinstance(body, dict) else None
        if (
            not isinstance(item, dict)
            or item.get("type") not in ITEM_TYPES
            or not isinstance(item.get("id"), str)
            or not 0 < len(item["id"]) <= ITEM_ID_LIMIT
        ):
            raise BadRequestError(
                f"give {{item: {{type: {' | '.join(ITEM_TYPES)}, id (at most {ITEM_ID_LIMIT} characters)}}, note}}"
            )
        note = _str(body, "note", 500)

        def apply(c: dict[str, Any]) -> None:
            if any(i["type"] == item["type"] and i["id"] == item["id"] for i in c["items"]):
                raise ConflictError(f"{item['id']} is in the collection already")
            if len(c["items"]) >= ITEMS_LIMIT:
                raise BadRequestError(f"a collection holds at most {ITEMS_LIMIT} items")
            entry: dict[str, Any] = {
                "_id": secrets.token_hex(12),
                "id": item["id"],
                "type": item["type"],
                "position": len(c["items"]),
            }
            if note:
                entry["note"] = {"text": note, "html": note}
            c["items"].append(entry)

        return self._change(slug, user, apply)

    def update_item(self, slug: str, user: str, item_id: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise BadRequestError("give {note, position}")

        def apply(c: dict[str, Any]) -> None:
            found = [i for i in c["items"] if i["_id"] == item_id]
            if not found:
                raise RepoNotFoundError(f"item {item_id} of collection {slug}")
            if body.get("note") is not None:
                text = _str(body, "note", 500)
                found[0]["note"] = {"text": text, "html": text}
            if isinstance(body.get("position"), int):
                c["items"].remove(found[0])
                c["items"].insert(max(0, body["position"]), found[0])
                for n, i in enumerate(c["items"]):
                    i["position"] = n

        return self._change(slug, user, apply)

    def delete_item(self, slug: str, user: str, item_id: str) -> dict[str, Any]:
        def apply(c: dict[str, Any]) -> None:
            before = len(c["items"])
            c["items"] = [i for i in c["items"] if i["_id"] != item_id]
            if len(c["items"]) == before:
                raise RepoNotFoundError(f"item {item_id} of collection {slug}")
            for n, i in enumerate(c["items"]):
                i["position"] = n

        return self._change(slug, user, apply)
