"""The index's view of the catalog: the Hub's own filtered listing (as JSON text, which SQLite writes
itself), parsed once per distinct record and reused while the record's text is unchanged, then sorted,
counted into facets and cut into pages in Python."""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request

from ..privacy import is_private, may_see
from ..records import TokenInfo

if TYPE_CHECKING:
    from ...hub import Hub

SORTS = {
    "name": lambda r: r["name"].lower(),
    "base": lambda r: ((r["base_model"] or "").lower(), r["name"].lower()),
    "rank": lambda r: (r["rank"], r["name"].lower()),
    "modules": lambda r: (r["num_modules"], r["name"].lower()),
    "size": lambda r: (r["size_bytes"], r["name"].lower()),
    "created": lambda r: (r["created_at"] or "", r["name"].lower()),
}
FIELDS = (
    "name",
    "format",
    "base_model",
    "rank",
    "target_modules",
    "tags",
    "num_modules",
    "size_bytes",
    "created_at",
    "description",
)


@dataclass(frozen=True)
class Query:
    """What the index was asked for; every filter is passed to the Hub as is."""

    q: str | None = None
    base: str | None = None
    format: str | None = None
    tag: str | None = None
    target: str | None = None
    min_rank: int | None = None
    max_rank: int | None = None
    sort: str = "name"
    order: str = "asc"
    page: int = 1
    per_page: int = 50

    def filters(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "format": self.format,
            "tag": self.tag,
            "target": self.target,
            "min_rank": self.min_rank,
            "max_rank": self.max_rank,
        }


@dataclass(frozen=True)
class Facets:
    bases: list[tuple[str, int]]
    formats: list[tuple[str, int]]
    tags: list[tuple[str, int]]
    targets: list[tuple[str, int]]


@dataclass(frozen=True)
class PageOfAdapters:
    rows: list[dict[str, Any]]
    total: int
    page: int
    pages: int
    facets: Facets


class Listing:
    """Parsed records keyed by their JSON text (a changed record has new text, so it is parsed again)."""

    def __init__(self) -> None:
        self._parsed: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def records(self, hub: Hub, query: Query) -> list[dict[str, Any]]:
        texts = hub.adapter_records_json(query.q or None, **query.filters())
        parsed = self._parsed
        out = []
        for text in texts:
            rec = parsed.get(text)
            if rec is None:
                full = json.loads(text)
                rec = {k: full.get(k) for k in FIELDS}
                parsed[text] = rec
            out.append(rec)
        if len(parsed) > 4 * max(len(texts), 5000):  # drop what old versions of records left behind
            with self._lock:
                self._parsed = {t: parsed[t] for t in texts if t in parsed}
        return out

    def page(self, hub: Hub, query: Query, user: TokenInfo | None) -> PageOfAdapters:
        """The page ``query`` asks for, of the adapters ``user`` may see (private ones are left out of
        the rows, the total and the facet counts alike)."""
        rows = [r for r in self.records(hub, query) if may_see(r["name"], is_private(r["tags"]), user)]
        facets = count_facets(rows)
        if query.sort != "name" or query.order != "asc":
            rows = sorted(rows, key=SORTS.get(query.sort, SORTS["name"]), reverse=query.order == "desc")
        total = len(rows)
        pages = max(1, -(-total // query.per_page))
        page = min(max(1, query.page), pages)
        start = (page - 1) * query.per_page
        return PageOfAdapters(rows[start : start + query.per_page], total, page, pages, facets)


def count_facets(rows: list[dict[str, Any]]) -> Facets:
    bases: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    tags: Counter[str] = Counter()
    targets: Counter[str] = Counter()
    for r in rows:
        if r["base_model"]:
            bases[r["base_model"]] += 1
        formats[r["format"]] += 1
        tags.update(r["tags"] or ())
        targets.update(r["target_modules"] or ())

    def top(c: Counter[str], n: int = 200) -> list[tuple[str, int]]:
        return sorted(c.most_common(n), key=lambda kv: kv[0].lower())

    return Facets(top(bases), top(formats), top(tags), top(targets))


def listing_of(request: Request) -> Listing:
    listing: Listing = request.app.state.pages_listing
    return listing
