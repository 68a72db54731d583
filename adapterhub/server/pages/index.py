"""``/``: the hosted repos the caller may see and the home's catalog, searched, filtered, sorted and
paginated by a plain GET form (no script needed)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ...records import human_size
from ..records import Commit, Repo, TokenInfo
from .html import Safe, join, render, when
from .listing import SORTS, Facets, PageOfAdapters, Query, listing_of
from .state import hub_of, store_of

PER_PAGE = (10, 25, 50, 100, 200)
REPOS_SHOWN = 30
COLUMNS = (
    ("name", "Name"),
    ("base", "Base model"),
    (None, "Format"),
    ("rank", "Rank"),
    (None, "Targets"),
    (None, "Tags"),
    ("modules", "Modules"),
    ("size", "Size"),
    ("created", "Added"),
)


def parse_query(request: Request) -> tuple[Query, list[str]]:
    """The index's query from the URL; a value that cannot be used is dropped with a note."""
    p = request.query_params
    notes: list[str] = []

    def text(name: str) -> str | None:
        v = p.get(name, "").strip()
        return v[:200] or None

    def integer(name: str, low: int, high: int) -> int | None:
        raw = p.get(name, "").strip()
        if not raw:
            return None
        try:
            v = int(raw)
        except ValueError:
            notes.append(f"{name} must be a whole number, not {raw[:40]!r}: ignored")
            return None
        if not low <= v <= high:
            notes.append(f"{name} must be between {low} and {high}: ignored")
            return None
        return v

    sort = p.get("sort", "name")
    order = p.get("order", "asc")
    per = integer("per_page", 1, 200) or 50
    q = Query(
        q=text("q"),
        base=text("base"),
        format=text("format"),
        tag=text("tag"),
        target=text("target"),
        min_rank=integer("min_rank", 0, 1 << 20),
        max_rank=integer("max_rank", 0, 1 << 20),
        sort=sort if sort in SORTS else "name",
        order=order if order in ("asc", "desc") else "asc",
        page=integer("page", 1, 1 << 30) or 1,
        per_page=per,
    )
    return q, notes


def link(query: Query, **change: Any) -> str:
    """The index URL of ``query`` with ``change`` applied (defaults left out)."""
    values = {**query.__dict__, **change}
    defaults = Query().__dict__
    kept = {k: v for k, v in values.items() if v is not None and v != "" and v != defaults[k]}
    return "/?" + urlencode(kept) if kept else "/"


def select(name: str, label: str, options: list[tuple[str, int]], current: str | None) -> Safe:
    seen = {o for o, _ in options}
    if current and current not in seen:
        options = [(current, 0), *options]
    opts = join(
        render(
            '<option value="{v}"{sel}>{v} ({n})</option>',
            v=o,
            n=n,
            sel=Safe(" selected" if o == current else ""),
        )
        for o, n in options
    )
    return render(
        '<label>{label} <select name="{name}" data-autosubmit><option value="">any</option>{opts}</select></label>',
        label=label,
        name=name,
        opts=opts,
    )


def filter_form(query: Query, facets: Facets) -> Safe:
    targets = join(render('<option value="{v}">', v=t) for t, _ in facets.targets)
    sorts = join(
        render('<option value="{v}"{sel}>{v}</option>', v=s, sel=Safe(" selected" if s == query.sort else ""))
        for s in SORTS
    )
    orders = join(
        render(
            '<option value="{v}"{sel}>{t}</option>',
            v=v,
            t=t,
            sel=Safe(" selected" if v == query.order else ""),
        )
        for v, t in (("asc", "ascending"), ("desc", "descending"))
    )
    pers = join(
        render(
            '<option value="{v}"{sel}>{v}</option>', v=n, sel=Safe(" selected" if n == query.per_page else "")
        )
        for n in sorted({*PER_PAGE, query.per_page})
    )
    return render(
        """<search><form class="filters" method="get" action="/" role="search" aria-label="Search the catalog">
<label class="wide">Search <input type="search" name="q" value="{q}" placeholder="name, description, tag, base"
 autocomplete="off"></label>
{base}{fmt}{tag}
<label>Target module <input name="target" value="{target}" list="targets" size="12"></label>
<datalist id="targets">{targets}</datalist>
<fieldset class="range"><legend>Rank</legend>
<label>from <input type="number" name="min_rank" min="0" value="{min_rank}" inputmode="numeric"></label>
<label>to <input type="number" name="max_rank" min="0" value="{max_rank}" inputmode="numeric"></label>
</fieldset>
<label>Sort <select name="sort" data-autosubmit>{sorts}</select></label>
<label>Order <select name="order" data-autosubmit>{orders}</select></label>
<label>Per page <select name="per_page" data-autosubmit>{pers}</select></label>
<button type="submit">Apply</button> <a href="/">Clear</a>
</form></search>""",
        q=query.q or "",
        target=query.target or "",
        targets=targets,
        min_rank="" if query.min_rank is None else query.min_rank,
        max_rank="" if query.max_rank is None else query.max_rank,
        base=select("base", "Base", facets.bases, query.base),
        fmt=select("format", "Format", facets.formats, query.format),
        tag=select("tag", "Tag", facets.tags, query.tag),
        sorts=sorts,
        orders=orders,
        pers=pers,
    )


def header_cell(query: Query, key: str | None, label: str) -> Safe:
    if key is None:
        return render('<th scope="col">{label}</th>', label=label)
    active = query.sort == key
    order = "desc" if active and query.order == "asc" else "asc"
    aria = ("ascending" if query.order == "asc" else "descending") if active else "none"
    arrow = ("▲" if query.order == "asc" else "▼") if active else ""
    return render(
        '<th scope="col" aria-sort="{aria}"><a href="{href}">{label}</a> <span aria-hidden="true">{arrow}</span></th>',
        aria=aria,
        href=link(query, sort=key, order=order, page=1),
        label=label,
        arrow=arrow,
    )


def chips(values: list[str], query: Query, field: str) -> Safe:
    return join(
        render('<a class="chip" href="{h}">{v}</a>', h=link(query, **{field: v}, page=1), v=v) for v in values
    )


def adapter_rows(result: PageOfAdapters, query: Query) -> Safe:
    rows = []
    for r in result.rows:
        rows.append(
            render(
                '<tr data-text="{text}"><th scope="row"><a href="/adapters/{href}">{name}</a>'
                '<div class="desc">{desc}</div></th><td>{base}</td><td>{fmt}</td><td class="num">{rank}</td>'
                '<td>{targets}</td><td>{tags}</td><td class="num">{mods}</td><td class="num">{size}</td>'
                "<td>{created}</td></tr>",
                text=" ".join(
                    [r["name"], r["description"] or "", r["base_model"] or "", *(r["tags"] or ())]
                ).lower(),
                href=quote(r["name"], safe="/"),
                name=r["name"],
                desc=(r["description"] or "")[:160],
                base=r["base_model"] or "—",
                fmt=r["format"],
                rank=r["rank"],
                targets=chips(r["target_modules"] or [], query, "target"),
                tags=chips(r["tags"] or [], query, "tag"),
                mods=r["num_modules"],
                size=human_size(r["size_bytes"]),
                created=when(r["created_at"]),
            )
        )
    head = join(header_cell(query, k, label) for k, label in COLUMNS)
    return render(
        '<div class="scroll"><table class="grid" id="adapters"><caption>Adapters {first}–{last} of {total}</caption>'
        "<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>",
        first=(result.page - 1) * query.per_page + 1 if result.total else 0,
        last=(result.page - 1) * query.per_page + len(result.rows),
        total=f"{result.total:,}",
        head=head,
        rows=join(rows),
    )


def pager(result: PageOfAdapters, query: Query) -> Safe:
    if result.pages <= 1:
        return Safe("")
    shown = sorted({1, result.pages, *range(max(1, result.page - 2), min(result.pages, result.page + 2) + 1)})
    items: list[Safe] = []
    if result.page > 1:
        items.append(
            render('<li><a rel="prev" href="{h}">Previous</a></li>', h=link(query, page=result.page - 1))
        )
    last = 0
    for n in shown:
        if n - last > 1:
            items.append(Safe('<li aria-hidden="true">…</li>'))
        if n == result.page:
            items.append(
                render('<li><a aria-current="page" href="{h}">{n}</a></li>', h=link(query, page=n), n=n)
            )
        else:
            items.append(render('<li><a href="{h}">{n}</a></li>', h=link(query, page=n), n=n))
        last = n
    if result.page < result.pages:
        items.append(
            render('<li><a rel="next" href="{h}">Next</a></li>', h=link(query, page=result.page + 1))
        )
    return render('<nav class="pager" aria-label="Pages"><ul>{items}</ul></nav>', items=join(items))


def repo_matches(repo: Repo, commit: Commit, words: list[str]) -> bool:
    text = f"{repo.repo_id} {commit.title}".lower()
    return all(w in text for w in words)


def repos_section(repos: list[tuple[Repo, Commit]], query: Query) -> Safe:
    words = (query.q or "").lower().split()
    found = [(r, c) for r, c in repos if repo_matches(r, c, words)]
    if not found:
        return render(
            '<section aria-labelledby="repos-h"><h2 id="repos-h">Hosted repos</h2><p>{t}</p></section>',
            t="No hosted repo matches." if words else "No repos are hosted here yet.",
        )
    items = join(
        render(
            '<li><a href="/{href}">{rid}</a>{badge} <span class="muted">{title} · {when}</span></li>',
            href=quote(r.repo_id, safe="/"),
            rid=r.repo_id,
            badge=Safe(' <span class="badge">private</span>' if r.private else ""),
            title=c.title,
            when=when(r.updated_at),
        )
        for r, c in found[:REPOS_SHOWN]
    )
    more = (
        f"<p class='muted'>{len(found) - REPOS_SHOWN:,} more: narrow the search.</p>"
        if len(found) > REPOS_SHOWN
        else ""
    )
    return render(
        '<section aria-labelledby="repos-h"><h2 id="repos-h">Hosted repos <span class="count">{n}</span></h2>'
        '<ul class="repos">{items}</ul>{more}</section>',
        n=f"{len(found):,}",
        items=items,
        more=Safe(more),
    )


async def index_body(request: Request, user: TokenInfo | None) -> Safe:
    query, notes = parse_query(request)
    hub, store = hub_of(request), store_of(request)
    result = await run_in_threadpool(listing_of(request).page, hub, query, user)
    repos = await run_in_threadpool(store.repos.visible_repos, user.user if user else None)
    note = join(render('<p class="notice" role="status">{n}</p>', n=n) for n in notes)
    empty = Safe("") if result.total else Safe('<p class="notice">No cataloged adapter matches.</p>')
    return render(
        '<h1>Adapters and repos</h1>{form}{note}{repos}<section aria-labelledby="cat-h">'
        '<h2 id="cat-h">Catalog <span class="count">{total}</span></h2>{empty}{table}{pager}</section>',
        form=filter_form(query, result.facets),
        note=note,
        repos=repos_section(repos, query),
        total=f"{result.total:,}",
        empty=empty,
        table=adapter_rows(result, query) if result.total else Safe(""),
        pager=pager(result, query),
    )
