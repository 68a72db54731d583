"""A tiny HTML renderer with escaping by default: templates are ``str.format`` strings whose values are
escaped unless they are `Safe` (already-rendered HTML). No template engine, nothing to configure."""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Iterable
from typing import Any


class Safe(str):
    """A string that is already HTML: `render` and `esc` leave it as it is."""

    __slots__ = ()


def esc(value: Any) -> Safe:
    """``value`` as HTML text: ``& < > " '`` escaped; `Safe` values pass unchanged; None is empty."""
    if isinstance(value, Safe):
        return value
    if value is None:
        return Safe("")
    return Safe(html.escape(str(value), quote=True))


def render(template: str, **values: Any) -> Safe:
    """``template`` with ``{name}`` fields filled, each value escaped unless it is `Safe`."""
    return Safe(template.format_map({k: esc(v) for k, v in values.items()}))


def join(parts: Iterable[Any], sep: str = "") -> Safe:
    return Safe(sep.join(esc(p) for p in parts))


def when(value: dt.datetime | str | None) -> Safe:
    """A timestamp as a ``<time>`` element (UTC, to the minute)."""
    if value is None:
        return Safe("")
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return esc(value)
    stamp = value.replace(tzinfo=None)
    return render(
        '<time datetime="{iso}">{shown}</time>',
        iso=stamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
        shown=stamp.strftime("%Y-%m-%d %H:%M UTC"),
    )


def number(value: float | int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    return f"{int(value):,}"


def definition_list(items: Iterable[tuple[str, Any]], css: str = "meta") -> Safe:
    rows = [render("<dt>{k}</dt><dd>{v}</dd>", k=k, v=v) for k, v in items if v not in (None, "", (), [])]
    return render('<dl class="{css}">{rows}</dl>', css=css, rows=join(rows))


def table(caption: str, head: Iterable[str], rows: Iterable[Iterable[Any]], *, css: str = "grid") -> Safe:
    """A table with a caption, a header row and body rows (cells escaped unless `Safe`)."""
    th = join(render('<th scope="col">{h}</th>', h=h) for h in head)
    body = join(render("<tr>{cells}</tr>", cells=join(render("<td>{c}</td>", c=c) for c in r)) for r in rows)
    return render(
        '<div class="scroll"><table class="{css}"><caption>{caption}</caption><thead><tr>{th}</tr></thead>'
        "<tbody>{body}</tbody></table></div>",
        css=css,
        caption=caption,
        th=th,
        body=body,
    )
