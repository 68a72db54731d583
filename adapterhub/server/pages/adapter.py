"""``/adapters/{name}``: a cataloged adapter: metadata, files, the modules table, its lineage as a
picture, the registered bases it fits, and the singular-value spectra of its modules."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ...errors import AdapterHubError, AdapterNotFoundError
from ...records import AdapterInfo, BaseInfo, human_size
from ..privacy import is_private, may_see
from ..records import TokenInfo
from .base import base_href, base_link, registered_base
from .html import Safe, definition_list, join, number, render, table, when
from .leaderboard import entries, results_section
from .spectra import spectra
from .state import hub_of
from .svg import Node, energy_svg, lineage_svg, sparkline

if TYPE_CHECKING:
    from ...hub import Hub

log = logging.getLogger(__name__)
MODULES_SHOWN = 2000


def adapter_href(name: str) -> str:
    return "/adapters/" + quote(name, safe="/")


def metadata(info: AdapterInfo, bases: list[BaseInfo] | None = None) -> Safe:
    base = registered_base(bases or [], info.base_model)
    return definition_list(
        [
            ("Format", f"{info.format}" + (f" ({info.peft_type})" if info.peft_type else "")),
            ("Base model", _base_cell(info.base_model, base)),
            ("Rank", info.rank),
            ("Alpha", number(info.alpha)),
            ("rsLoRA", "yes" if info.use_rslora else None),
            ("DoRA", "yes" if info.use_dora else None),
            ("Rank pattern", ", ".join(f"{k}: {v}" for k, v in info.rank_pattern.items())),
            ("Targets", ", ".join(info.target_modules)),
            ("Modules", number(info.num_modules)),
            ("Parameters", number(info.num_params)),
            ("dtype", info.dtype),
            ("Size", human_size(info.size_bytes)),
            ("Task", info.task_type),
            ("Tags", join((render('<a class="chip" href="/?tag={t}">{t}</a>', t=t) for t in info.tags), " ")),
            ("Source", info.source),
            ("Added", when(info.created_at)),
            ("sha256", render('<code class="hash">{h}</code>', h=info.sha256)),
        ]
    )


def _base_cell(declared: str | None, base: BaseInfo | None) -> Any:
    """The declared base, linked to the page of the registered base it names (if any)."""
    if base is None:
        return declared
    if base.name == declared:
        return base_link(base.name)
    return render("{d} ({link})", d=declared, link=base_link(base.name))


def module_order(module: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key: the numbers in a module name as numbers (layer 2 before layer 10)."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", module) if p)


def modules_table(info: AdapterInfo) -> Safe:
    mods = sorted(info.modules or (), key=lambda m: module_order(m.module))
    rows = [
        (
            render("<code>{m}</code>", m=m.module),
            m.kind,
            render('<span class="num">{v}</span>', v=m.in_features),
            render('<span class="num">{v}</span>', v=m.out_features),
            render('<span class="num">{v}</span>', v=m.rank),
            number(m.alpha),
            number(m.scale),
            "yes" if m.dora else "",
        )
        for m in mods[:MODULES_SHOWN]
    ]
    cap = f"{len(mods)} modules" + (f" (first {MODULES_SHOWN} shown)" if len(mods) > MODULES_SHOWN else "")
    return table(
        cap, ("Module", "Kind", "In", "Out", "Rank", "Alpha", "Scale", "DoRA"), rows, css="grid modules"
    )


def lineage(
    info: AdapterInfo, endpoint: str, visible: Callable[[str], bool], bases: frozenset[str] = frozenset()
) -> Safe:
    """Parents, children, merges and pushes; parents and children that the viewer may not see (private
    ones) are left out. A trained adapter's parent is its base: linked to the base's page when registered."""

    def parent_href(name: str, method: str) -> str | None:
        if method == "train":
            return base_href(name) if name in bases else None
        return adapter_href(name)

    parents = [
        Node(
            p.name,
            f"{p.method}" + (f" × {p.weight:g}" if p.weight is not None else ""),
            parent_href(p.name, p.method),
        )
        for p in info.parents
        if visible(p.name)
    ]
    after = [Node(c, "child", adapter_href(c)) for c in info.children or () if visible(c)]
    after += [
        Node(
            m.out.rstrip("/").rsplit("/", 1)[-1] or m.out,
            f"{'unmerged from' if m.unmerge else 'merged into'} {m.base} × {m.weight:g}",
            None,
            "merge",
            f"{m.out}: {'unmerged from' if m.unmerge else 'merged into'} {m.base}",
        )
        for m in info.merges or ()
    ]
    for p in info.pushes or ():
        local = p.endpoint.rstrip("/") == endpoint
        after.append(
            Node(
                p.repo_id,
                f"pushed {p.commit[:10]} to {p.endpoint}",
                "/" + quote(p.repo_id, safe="/") if local else None,
                "push",
            )
        )
    me = Node(info.name, f"{info.format}, rank {info.rank}", None, "self")
    items = [
        render("<li>parent <a href='{h}'>{n}</a> ({d})</li>", h=n.href, n=n.label, d=n.detail)
        if n.href
        else render("<li>parent {n} ({d})</li>", n=n.label, d=n.detail)
        for n in parents
    ]
    items += [render("<li>{k} {t}</li>", k=n.kind, t=n.title or f"{n.label}: {n.detail}") for n in after]
    listing = (
        render("<ul class='lineage-list'>{i}</ul>", i=join(items))
        if items
        else Safe("<p class='muted'>No parents, children, merges or pushes recorded.</p>")
    )
    return render(
        '<section aria-labelledby="lin-h"><h2 id="lin-h">Lineage</h2><figure>{svg}'
        "<figcaption>{listing}</figcaption></figure></section>",
        svg=lineage_svg(me, parents, after),
        listing=listing,
    )


def fits(hub: Hub, info: AdapterInfo) -> Safe:
    bases = hub.list_bases()
    if not bases:
        return Safe(
            '<p class="muted">No base checkpoints are registered (<code>adapterhub base add</code>).</p>'
        )
    rows = []
    for b in bases:
        try:
            (report,) = hub.validate_catalog(base=b.name, names=[info.name])
        except AdapterHubError as exc:
            rows.append((base_link(b.name), Safe('<span class="bad">cannot check</span>'), str(exc)))
            continue
        verdict = Safe(
            '<span class="ok">fits</span>' if report.ok else '<span class="bad">does not fit</span>'
        )
        problems = report.errors or report.warnings
        detail = "; ".join(c.message for c in problems[:3]) + (
            f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        )
        rows.append((base_link(b.name), verdict, detail))
    return table("Registered bases", ("Base", "Verdict", "Details"), rows, css="grid fits")


DORA_NOTE = " For DoRA modules this is the low-rank update alone; the magnitude vector is not in it."


def spectra_section(modules: list[dict[str, Any]] | None, error: str | None, *, dora: bool = False) -> Safe:
    if error is not None:
        return render(
            '<section aria-labelledby="spec-h"><h2 id="spec-h">Spectra</h2><p class="notice">{e}</p></section>',
            e=error,
        )
    assert modules is not None
    if not modules:
        return Safe(
            '<section aria-labelledby="spec-h"><h2 id="spec-h">Spectra</h2><p>No factored modules.</p></section>'
        )
    options = join(
        render('<option value="{i}">{m}</option>', i=i, m=m["module"]) for i, m in enumerate(modules)
    )
    rows = [
        (
            render("<code>{m}</code>", m=m["module"]),
            render('<span class="num">{v}</span>', v=m["rank"]),
            f"{m['effective_rank']:.2f}",
            m["rank90"],
            m["rank99"],
            f"{m['sigma'][0]:.4g}" if m["sigma"] else "",
            sparkline(m["sigma"], f"singular values of {m['module']}"),
        )
        for m in modules
    ]
    return render(
        '<section aria-labelledby="spec-h"><h2 id="spec-h">Spectra</h2><p>Singular values of each module\'s '
        "<code>scale · B A</code>, from a QR of each factor and the SVD of the small core. The effective rank is "
        "<code>exp(entropy)</code> of the normalized singular values.{dora}</p>"
        '<figure class="plot">{plot}<figcaption><label hidden id="hl-label">Highlight a module '
        '<select id="highlight" data-plot="energy-plot"><option value="">none</option>{options}</select></label>'
        "</figcaption></figure>{table}</section>",
        plot=energy_svg(modules),
        options=options,
        dora=Safe(DORA_NOTE if dora else ""),
        table=table(
            "Per-module spectra",
            (
                "Module",
                "Rank",
                "Effective rank",
                "Rank for 90%",
                "Rank for 99%",
                "Largest σ",
                "Singular values",
            ),
            rows,
            css="grid spectra",
        ),
    )


def visible_to(hub: Hub, user: TokenInfo | None) -> Callable[[str], bool]:
    """Whether ``user`` may see a cataloged adapter by name (one no longer cataloged has no tags to
    make it private)."""

    def visible(name: str) -> bool:
        try:
            other = hub.adapter_info(name)
        except AdapterNotFoundError:
            return True
        return may_see(other.name, is_private(other.tags), user)

    return visible


def load(
    hub: Hub, name: str, user: TokenInfo | None
) -> tuple[AdapterInfo, Safe, list[dict[str, Any]] | None, str | None]:
    """What the page shows; `AdapterNotFoundError` for an adapter ``user`` may not see, as for one that
    is not there (nothing about it is computed)."""
    info = hub.adapter_info(name)
    if not may_see(info.name, is_private(info.tags), user):
        raise AdapterNotFoundError(name)
    results = results_section([e.record for e in entries(hub, hub.evaluations(name), user)])
    fit = render(
        '<section aria-labelledby="fit-h"><h2 id="fit-h">Bases it fits</h2>{f}</section>{r}',
        f=fits(hub, info),
        r=results,
    )
    try:
        return info, fit, spectra(hub, name, info.sha256), None
    except (AdapterHubError, OSError, RuntimeError, ValueError) as exc:
        log.warning("no spectra for %s: %s", name, exc)
        return info, fit, None, f"The spectra could not be computed: {exc}"


async def adapter_body(request: Request, name: str, user: TokenInfo | None) -> tuple[str, Safe] | None:
    hub = hub_of(request)
    try:
        info, fit, mods, error = await run_in_threadpool(load, hub, name, user)
    except AdapterNotFoundError:
        return None
    endpoint = str(request.base_url).rstrip("/")
    bases = await run_in_threadpool(hub.list_bases)
    files = table(
        "Stored files",
        ("File", "Role", "Size", "sha256"),
        [
            (
                f.filename,
                f.role,
                human_size(f.size_bytes),
                render('<code class="hash">{h}</code>', h=f.sha256),
            )
            for f in info.files or ()
        ],
    )
    body = render(
        '<h1>{name}</h1><p class="lead">{desc}</p><div class="adapter-meta">{meta}</div>'
        '<section aria-labelledby="mod-h"><h2 id="mod-h">Modules</h2>{mods}</section>{lineage}'
        "{fit}{spec}"
        '<section aria-labelledby="files-h"><h2 id="files-h">Files</h2>{files}</section>',
        name=info.name,
        desc=info.description or "",
        meta=metadata(info, bases),
        mods=modules_table(info),
        lineage=lineage(info, endpoint, visible_to(hub, user), frozenset(b.name for b in bases)),
        fit=fit,
        spec=spectra_section(mods, error, dora=info.use_dora),
        files=files,
    )
    return info.name, body
