"""Collections: a user's named, ordered lists of repos (say, the adapters that go with one base model),
public or private. One JSON file per owner (``HOME/server/collections/<owner>.json``), rewritten whole
through a temporary file under a lock."""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import BadRequestError, ConflictError, ForbiddenError, RepoNotFoundError
from ..store import scratch_prefix
from .checks import is_name
from .records import iso, utcnow

ITEM_TYPES = ("model", "dataset", "space", "paper", "collection")
ITEMS_LIMIT = 1000
_LOCK = threading.Lock()


def _slugify(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:80] or "collection"


def _str(body: dict[str, Any], key: str, limit: int) -> str | None:
    value = body.get(key)
    if value is not None and (not isinstance(value, str) or len(value) > limit):
        raise BadRequestError(f"{key} must be a string of at most {limit} characters")
    return value


class Collections:
    def __init__(self, root: Path) -> None:
        self.root = root / "collections"

    def _file(self, owner: str) -> Path:
        return self.root / f"{owner}.json"

    def _load(self, owner: str) -> dict[str, dict[str, Any]]:
        try:
            data: dict[str, dict[str, Any]] = json.loads(self._file(owner).read_text())
            return data
        except FileNotFoundError:
            return {}

    def _save(self, owner: str, data: dict[str, dict[str, Any]]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=scratch_prefix("collections"))
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self._file(owner))

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
        c = self._load(owner).get(cid)
        if c is None or (c["private"] and viewer != owner):
            raise RepoNotFoundError(f"collection {slug}")
        return c if may_see_model is None else self._shown(c, viewer, may_see_model)

    def listing(
        self, owner: str | None, viewer: str | None, may_see_model: Callable[[str], bool] | None = None
    ) -> list[dict[str, Any]]:
        owners = [owner] if owner else [p.stem for p in sorted(self.root.glob("*.json"))]
        out = [c for o in owners for c in self._load(o).values() if not c["private"] or viewer == o]
        if may_see_model is not None:
            out = [self._shown(c, viewer, may_see_model) for c in out]
        return sorted(out, key=lambda c: c["lastUpdated"], reverse=True)

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
        slug = f"{user}/{_slugify(title)}-{cid}"
        c: dict[str, Any] = {"slug": slug, "title": title, "description": _str(body, "description", 5000),
             "owner": {"name": user, "type": "user"}, "items": [], "lastUpdated": iso(utcnow()),
             "position": 0, "private": bool(body.get("private")), "theme": "default", "upvotes": 0}  # fmt: skip
        with _LOCK:
            data = self._load(user)
            if any(x["title"] == title for x in data.values()):
                raise ConflictError(f"a collection called {title!r} already exists")
            data[cid] = c
            self._save(user, data)
        return c

    def _change(self, slug: str, user: str, change: Any) -> dict[str, Any]:
        owner, cid = self._owner(slug)
        with _LOCK:
            data = self._load(owner)
            c = data.get(cid)
            if c is None or (c["private"] and user != owner):
                raise RepoNotFoundError(f"collection {slug}")
            if user != owner:
                raise ForbiddenError(f"only {owner} may change collection {slug}")
            change(c)
            c["lastUpdated"] = iso(utcnow())
            self._save(owner, data)
            return c

    def update(self, slug: str, user: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise BadRequestError("give {title, description, position, private, theme}")

        def apply(c: dict[str, Any]) -> None:
            for key, limit in (("title", 200), ("description", 5000), ("theme", 40)):
                if body.get(key) is not None:
                    c[key] = _str(body, key, limit)
            owner, cid = self._owner(c["slug"])
            c["slug"] = (
                f"{owner}/{_slugify(c['title'])}-{cid}"  # a new title, a new slug; the old one still works
            )
            if body.get("private") is not None:
                c["private"] = bool(body["private"])
            if isinstance(body.get("position"), int):
                c["position"] = body["position"]

        return self._change(slug, user, apply)

    def delete(self, slug: str, user: str) -> None:
        owner, cid = self._owner(slug)
        self._change(slug, user, lambda c: None)
        with _LOCK:
            data = self._load(owner)
            data.pop(cid, None)
            self._save(owner, data)

    def add_item(self, slug: str, user: str, body: Any) -> dict[str, Any]:
        item = body.get("item") if isinstance(body, dict) else None
        if (
            not isinstance(item, dict)
            or item.get("type") not in ITEM_TYPES
            or not isinstance(item.get("id"), str)
        ):
            raise BadRequestError(f"give {{item: {{type: {' | '.join(ITEM_TYPES)}, id}}, note}}")
        note = _str(body, "note", 500)

        def apply(c: dict[str, Any]) -> None:
            if any(i["type"] == item["type"] and i["id"] == item["id"] for i in c["items"]):
                raise ConflictError(f"{item['id']} is in the collection already")
            if len(c["items"]) >= ITEMS_LIMIT:
                raise BadRequestError(f"a collection holds at most {ITEMS_LIMIT} items")
            entry: dict[str, Any] = {"_id": secrets.token_hex(12), "id": item["id"], "type": item["type"],
                                     "position": len(c["items"])}  # fmt: skip
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
