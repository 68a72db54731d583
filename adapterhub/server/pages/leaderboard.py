"""Evaluation results on the pages: ``/leaderboard`` (the datasets), ``/leaderboard/{dataset}`` (a table
of every subject's latest result for one metric, sortable by its column headers through links, with a
bar chart drawn as inline SVG on the server), and the results section of ``/adapters/{name}``.

Records name adapters by content (sha256): a result is shown under the names of cataloged adapters with
that content which the viewer may see; one whose adapter is private to someone else, or no longer
cataloged, is left out, as is a combination any of whose parts the viewer may not see. The base's own
rows are always shown.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ...records import EvaluationRecord
from ..privacy import is_private, may_see
from ..records import TokenInfo
from .html import Safe, join, render, table, when
from .state import hub_of

if TYPE_CHECKING:
    from ...hub import Hub

__all__ = ["bar_chart", "datasets_body", "leaderboard_body", "leaderboard_href", "results_section"]

LOWER_IS_BETTER = ("loss", "perplexity")
SORTS = ("value", "subject", "rows", "when")


def leaderboard_href(dataset: str, metric: str | None = None) -> str:
    return "/leaderboard/" + quote(dataset, safe="") + (f"?{urlencode({'metric': metric})}" if metric else "")


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


@dataclass(frozen=True)
class Entry:
    subject: str
    href: str | None
    record: EvaluationRecord


def _namer(hub: Hub, user: TokenInfo | None) -> tuple[Callable[[str], str | None], Callable[[str], bool]]:
    """(adapter sha256 -> a name the viewer may see, or None; name -> may the viewer see it)."""
    names: dict[str, list[str]] = {}
    visible: dict[str, bool] = {}
    for doc in hub.adapter_records_json():
        a = json.loads(doc)
        ok = may_see(a["name"], is_private(a.get("tags")), user)
        visible[a["name"]] = ok
        if ok:
            names.setdefault(a["sha256"], []).append(a["name"])

    def name_of(sha: str) -> str | None:
        found = names.get(sha)
        return found[0] if found else None

    return name_of, lambda n: visible.get(n, False)


def entries(hub: Hub, records: Sequence[EvaluationRecord], user: TokenInfo | None) -> list[Entry]:
    """The records the viewer may see, each under a name they may see. A record made under a name the
    viewer may not see stays hidden even when a public adapter has the same content (its dataset, time and
    source are the private one's), and a base row shows only beside a subject of its run the viewer may see,
    or in a run of the base alone (else it would tell that a private evaluation happened, on what data and
    when)."""
    name_of, can_see = _namer(hub, user)
    out: list[Entry] = []
    bases: list[EvaluationRecord] = []
    with_subjects = {r.run for r in records if r.adapter_sha256 is not None or r.combination}
    for r in records:
        if r.adapter_sha256 is not None:
            name = r.subject if can_see(r.subject) and name_of(r.adapter_sha256) else None
            if name is None:
                continue
            out.append(Entry(name, "/adapters/" + quote(name, safe="/"), r))
        elif r.combination:
            if all(can_see(n) for n in r.combination):
                out.append(Entry(r.subject, None, r))
        else:
            bases.append(r)
    runs = {e.record.run for e in out}
    out += [Entry(f"{r.base} (base)", None, r) for r in bases if r.run in runs or r.run not in with_subjects]
    return out


def bar_chart(rows: Sequence[tuple[str, float]], *, label: str) -> Safe:
    """Horizontal bars, one per (name, value), lengths proportional to the value (drawn on the server)."""
    shown = [(n, v) for n, v in rows if v == v and abs(v) != float("inf")]
    if not shown:
        return Safe("")
    top = max(abs(v) for _, v in shown) or 1.0
    bar_h, gap, left, width = 22, 6, 220, 420
    parts = []
    for i, (name, v) in enumerate(shown):
        y = 10 + i * (bar_h + gap)
        w = max(1.0, width * abs(v) / top)
        parts.append(
            render(
                '<g class="bar"><title>{name}: {v}</title><text x="{tx}" y="{ty}" class="label" text-anchor="end">'
                '{short}</text><rect x="{x}" y="{y}" width="{w}" height="{h}" rx="3"/>'
                '<text x="{vx}" y="{ty}" class="value">{v}</text></g>',
                name=name,
                v=_fmt(v),
                tx=left - 8,
                ty=y + 15,
                short=name if len(name) <= 28 else name[:27] + "…",
                x=left,
                y=y,
                w=f"{w:.1f}",
                h=bar_h,
                vx=f"{left + w + 6:.1f}",
            )
        )
    height = 20 + len(shown) * (bar_h + gap)
    return render(
        '<svg class="bars" role="img" aria-label="{label}" viewBox="0 0 {vw} {vh}" width="{vw}" height="{vh}">'
        "{bars}</svg>",
        label=label,
        vw=left + width + 80,
        vh=height,
        bars=join(parts),
    )


def _latest(es: Sequence[Entry]) -> list[Entry]:
    """The latest record per subject (records come oldest first)."""
    by: dict[str, Entry] = {}
    for e in es:
        by[e.subject] = e
    return list(by.values())


def _th(dataset: str, metric: str, key: str, label: str, sort: str, order: str) -> Safe:
    active = key == sort
    nxt = "desc" if active and order == "asc" else "asc"
    href = (
        f"/leaderboard/{quote(dataset, safe='')}?{urlencode({'metric': metric, 'sort': key, 'order': nxt})}"
    )
    aria = ("ascending" if order == "asc" else "descending") if active else "none"
    return render('<th scope="col" aria-sort="{a}"><a href="{h}">{l}</a></th>', a=aria, h=href, l=label)


def load_board(
    hub: Hub, dataset: str, metric: str | None, user: TokenInfo | None
) -> tuple[list[str], str, list[Entry]] | None:
    records = hub.evaluations(dataset=dataset)
    if not records:
        return None
    visible = entries(hub, records, user)
    metrics = list(dict.fromkeys(e.record.metric for e in visible))
    if not metrics:
        return None
    chosen = metric if metric in metrics else ("loss" if "loss" in metrics else metrics[0])
    return metrics, chosen, _latest([e for e in visible if e.record.metric == chosen])


async def leaderboard_body(request: Request, dataset: str, user: TokenInfo | None) -> tuple[str, Safe] | None:
    q = request.query_params
    found = await run_in_threadpool(load_board, hub_of(request), dataset, q.get("metric"), user)
    if found is None:
        return None
    metrics, metric, rows = found
    sort = str(q.get("sort")) if q.get("sort") in SORTS else "value"
    default = "asc" if metric in LOWER_IS_BETTER else "desc"
    order = (
        str(q.get("order")) if q.get("order") in ("asc", "desc") else (default if sort == "value" else "asc")
    )
    keys: dict[str, Callable[[Entry], Any]] = {
        "value": lambda e: (e.record.value is None, e.record.value or 0.0),
        "subject": lambda e: e.subject.lower(),
        "rows": lambda e: e.record.rows,
        "when": lambda e: e.record.id,
    }
    rows = sorted(rows, key=keys[sort], reverse=order == "desc")
    head = join(
        _th(dataset, metric, k, lab, sort, order)
        for k, lab in (("subject", "Subject"), ("value", metric), ("rows", "Rows"), ("when", "When"))
    )
    body = join(
        render(
            "<tr><th scope='row'>{s}</th><td class='num'>{v}</td><td class='num'>{n}</td><td>{w}</td>"
            "<td>{b}</td><td>{src}</td></tr>",
            s=render("<a href='{h}'>{n}</a>", h=e.href, n=e.subject) if e.href else e.subject,
            v=_fmt(e.record.value),
            n=e.record.rows,
            w=when(e.record.created_at),
            b=e.record.base,
            src=e.record.source,
        )
        for e in rows
    )
    tabs = join(
        render(
            "<a class='chip{on}' href='{h}'>{m}</a> ",
            on=" on" if m == metric else "",
            h=leaderboard_href(dataset, m),
            m=m,
        )
        for m in metrics
    )
    better = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
    chart = bar_chart(
        [(e.subject, e.record.value) for e in rows if e.record.value is not None],
        label=f"{metric} on {dataset}, {better}",
    )
    page = render(
        "<h1>Leaderboard: {d}</h1><p class='lead'>The latest result of each adapter, combination and base on "
        "<code>{d}</code> ({better}). Metric: {tabs}</p><figure class='plot'>{chart}<figcaption>{metric} per "
        "subject</figcaption></figure><div class='scroll'><table class='grid leaderboard' id='leaderboard'>"
        "<caption>{n} results for {metric}</caption><thead><tr>{head}<th scope='col'>Base</th>"
        "<th scope='col'>Source</th></tr></thead><tbody>{body}</tbody></table></div>",
        d=dataset,
        better=better,
        tabs=tabs,
        chart=chart,
        metric=metric,
        n=len(rows),
        head=head,
        body=body,
    )
    return f"Leaderboard {dataset}", page


def load_datasets(hub: Hub, user: TokenInfo | None) -> list[tuple[str, int, list[str]]]:
    seen: dict[str, tuple[set[str], set[str]]] = {}
    for e in entries(hub, hub.evaluations(), user):
        subjects, metrics = seen.setdefault(e.record.dataset, (set(), set()))
        subjects.add(e.subject)
        metrics.add(e.record.metric)
    return [(d, len(s), sorted(m)) for d, (s, m) in sorted(seen.items())]


async def datasets_body(request: Request, user: TokenInfo | None) -> tuple[str, Safe]:
    found = await run_in_threadpool(load_datasets, hub_of(request), user)
    rows = [
        (render("<a href='{h}'>{d}</a>", h=leaderboard_href(d), d=d), n, ", ".join(ms)) for d, n, ms in found
    ]
    content = (
        table("Evaluated datasets", ("Dataset", "Subjects", "Metrics"), rows, css="grid datasets")
        if rows
        else Safe("<p class='muted'>No evaluation results yet (<code>adapterhub eval</code>).</p>")
    )
    return "Leaderboards", render("<h1>Leaderboards</h1>{c}", c=content)


def results_section(records: Sequence[EvaluationRecord]) -> Safe:
    """The adapter page's results: every record of its content, newest first, datasets linked."""
    if not records:
        return Safe(
            '<section aria-labelledby="res-h"><h2 id="res-h">Results</h2><p class="muted">Not evaluated yet '
            "(<code>adapterhub eval</code>).</p></section>"
        )
    rows = [
        (
            render("<a href='{h}'>{d}</a>", h=leaderboard_href(r.dataset, r.metric), d=r.dataset),
            r.metric,
            render("<span class='num'>{v}</span>", v=_fmt(r.value)),
            r.rows,
            r.base,
            r.source,
            when(r.created_at),
        )
        for r in reversed(records)
    ]
    return render(
        '<section aria-labelledby="res-h"><h2 id="res-h">Results</h2>{t}</section>',
        t=table(
            f"{len(records)} evaluation results",
            ("Dataset", "Metric", "Value", "Rows", "Base", "Source", "When"),
            rows,
            css="grid results",
        ),
    )
