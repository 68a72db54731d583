"""Pictures drawn as inline SVG on the server (readable without JavaScript; styled by the package's CSS
through classes, no inline style, so the Content-Security-Policy can forbid inline styles)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .html import Safe, join, render

# ---------------------------------------------------------------------- lineage


@dataclass(frozen=True)
class Node:
    label: str
    detail: str = ""
    href: str | None = None
    kind: str = "adapter"  # adapter | self | merge | push
    title: str = ""  # the full text, when the label is short for it


BOX_W, BOX_H, GAP = 230, 38, 12
COL_X = (10, 300, 590)
WIDTH = COL_X[2] + BOX_W + 10


def _short(text: str, n: int = 30) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _box(node: Node, x: int, y: int) -> Safe:
    inner = render(
        '<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="6"/>'
        '<text x="{tx}" y="{ty}" class="label">{label}</text><text x="{tx}" y="{dy}" class="detail">{detail}</text>',
        x=x,
        y=y,
        w=BOX_W,
        h=BOX_H,
        tx=x + 8,
        ty=y + 16,
        dy=y + 31,
        label=_short(node.label),
        detail=_short(node.detail, 36),
    )
    full = render("<title>{t}</title>", t=node.title or f"{node.label} {node.detail}".strip())
    if node.href:
        return render(
            '<a href="{h}" class="node {k}">{full}{inner}</a>',
            h=node.href,
            k=node.kind,
            full=full,
            inner=inner,
        )
    return render('<g class="node {k}">{full}{inner}</g>', k=node.kind, full=full, inner=inner)


def _edge(x1: int, y1: int, x2: int, y2: int, kind: str) -> Safe:
    mid = (x1 + x2) // 2
    return render(
        '<path class="edge {k}" d="M{x1},{y1} C{m},{y1} {m},{y2} {x2},{y2}" marker-end="url(#arrow)"/>',
        k=kind,
        x1=x1,
        y1=y1,
        x2=x2,
        y2=y2,
        m=mid,
    )


def lineage_svg(me: Node, parents: list[Node], after: list[Node]) -> Safe:
    """Parents on the left, the adapter in the middle, what came of it (children, merges, pushes) on the
    right; every box links to its page where there is one."""
    rows = max(len(parents), len(after), 1)
    top = 30
    height = top + rows * (BOX_H + GAP) + 10

    def ys(n: int) -> list[int]:
        span = n * (BOX_H + GAP) - GAP
        start = top + (rows * (BOX_H + GAP) - GAP - span) // 2
        return [start + i * (BOX_H + GAP) for i in range(n)]

    my = ys(1)[0]
    parts: list[Safe] = []
    for node, y in zip(parents, ys(len(parents)), strict=True):
        parts.append(_edge(COL_X[0] + BOX_W, y + BOX_H // 2, COL_X[1] - 4, my + BOX_H // 2, "from"))
        parts.append(_box(node, COL_X[0], y))
    for node, y in zip(after, ys(len(after)), strict=True):
        parts.append(_edge(COL_X[1] + BOX_W, my + BOX_H // 2, COL_X[2] - 4, y + BOX_H // 2, node.kind))
        parts.append(_box(node, COL_X[2], y))
    parts.append(_box(me, COL_X[1], my))
    heads = join(
        render('<text class="colhead" x="{x}" y="16">{t}</text>', x=x, t=t)
        for x, t in zip(COL_X, ("Parents", "This adapter", "Children, merges, pushes"), strict=True)
    )
    summary = f"{me.label}: {len(parents)} parents, {len(after)} children, merges and pushes"
    return render(
        '<svg class="lineage" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-labelledby="lin-t">'
        '<title id="lin-t">{summary}</title><defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" '
        'markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z"/></marker></defs>'
        "{heads}{parts}</svg>",
        w=WIDTH,
        h=height,
        summary=summary,
        heads=heads,
        parts=join(parts),
    )


# ---------------------------------------------------------------------- spectra

PW, PH, PAD_L, PAD_B, PAD_T, PAD_R = 640, 260, 48, 36, 14, 14


def energy_svg(modules: list[dict[str, Any]]) -> Safe:
    """The energy the first k ranks keep, one curve per module, with the 90% and 99% lines."""
    rmax = max((len(m["energy"]) for m in modules), default=1) or 1
    iw, ih = PW - PAD_L - PAD_R, PH - PAD_T - PAD_B

    def px(k: float) -> float:
        return PAD_L + iw * k / rmax

    def py(e: float) -> float:
        return PAD_T + ih * (1 - e)

    curves = []
    for i, m in enumerate(modules):
        pts = " ".join(f"{px(k):.1f},{py(e):.1f}" for k, e in enumerate([0.0, *m["energy"]]))
        curves.append(
            render(
                '<polyline class="curve" data-module="{i}" points="{p}"><title>{t}</title></polyline>',
                i=i,
                p=pts,
                t=f"{m['module']}: effective rank {m['effective_rank']:.2f}",
            )
        )
    ticks_x = sorted({0, rmax, *range(0, rmax + 1, max(1, rmax // 8))})
    grid = [
        render(
            '<line class="grid" x1="{a}" y1="{y}" x2="{b}" y2="{y}"/><text class="tick" x="{t}" y="{ty}" '
            'text-anchor="end">{lab}</text>',
            a=PAD_L,
            b=PW - PAD_R,
            y=f"{py(e):.1f}",
            t=PAD_L - 6,
            ty=f"{py(e) + 4:.1f}",
            lab=lab,
        )
        for e, lab in ((0.0, "0"), (0.5, "50%"), (0.9, "90%"), (0.99, "99%"), (1.0, ""))
    ]
    grid += [
        render(
            '<text class="tick" x="{x}" y="{y}" text-anchor="middle">{k}</text>',
            x=f"{px(k):.1f}",
            y=PH - PAD_B + 16,
            k=k,
        )
        for k in ticks_x
    ]
    return render(
        '<svg class="spectrum" id="energy-plot" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
        'aria-labelledby="energy-t energy-d"><title id="energy-t">Energy kept by the first k ranks</title>'
        '<desc id="energy-d">One curve per module ({n} modules); the x axis is the rank k, the y axis the share '
        "of the squared singular values kept.</desc>{grid}"
        '<line class="axis" x1="{l}" y1="{b}" x2="{r}" y2="{b}"/><line class="axis" x1="{l}" y1="{t}" x2="{l}" y2="{b}"/>'
        '<text class="axis-label" x="{cx}" y="{h2}" text-anchor="middle">rank k</text>{curves}</svg>',
        w=PW,
        h=PH,
        n=len(modules),
        grid=join(grid),
        l=PAD_L,
        r=PW - PAD_R,
        t=PAD_T,
        b=PH - PAD_B,
        cx=PAD_L + iw // 2,
        h2=PH - 4,
        curves=join(curves),
    )


def sparkline(sigma: list[float], label: str) -> Safe:
    """Singular values over their largest, as bars (up to 64) or a line."""
    w, h = 160, 32
    top = max(sigma, default=0.0) or 1.0
    n = len(sigma) or 1
    if n <= 64:
        bw = w / n
        shapes = join(
            render(
                '<rect x="{x}" y="{y}" width="{bw}" height="{bh}"/>',
                x=f"{i * bw:.2f}",
                y=f"{h - h * s / top:.2f}",
                bw=f"{max(bw - 0.6, 0.4):.2f}",
                bh=f"{h * s / top:.2f}",
            )
            for i, s in enumerate(sigma)
        )
    else:
        pts = " ".join(f"{w * i / (n - 1):.1f},{h - h * s / top:.1f}" for i, s in enumerate(sigma))
        shapes = render('<polyline points="{p}"/>', p=pts)
    return render(
        '<svg class="spark" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{l}">'
        "{s}</svg>",
        w=w,
        h=h,
        l=label,
        s=shapes,
    )
