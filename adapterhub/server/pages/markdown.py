"""Model cards as HTML: Markdown rendered by markdown-it-py with raw HTML disabled (so a card holding
``<script>`` shows it as text), links checked by markdown-it's own validator and marked ``nofollow``,
images shown as links (nothing is fetched from another site), and the YAML front matter as a box."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any
from urllib.parse import quote, urlencode

from .html import Safe, definition_list, esc, join, render

FRONT_MATTER = re.compile(r"^---\s*\n(.*?)\n---\s*(\n|$)", re.S)
CARD_LIMIT = 1024 * 1024
RELATIVE_NOT = re.compile(
    r"^([a-zA-Z][a-zA-Z0-9+.-]*:|/|#|\?)"
)  # a scheme, an absolute path, a fragment, a query


@lru_cache(maxsize=1)
def _parser() -> Any:
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    md.enable("table").enable("strikethrough")

    def link_open(self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
        tok = tokens[idx]
        tok.attrSet("href", in_repo(str(tok.attrGet("href") or ""), env))
        tok.attrSet("rel", "nofollow noopener noreferrer")
        return str(self.renderToken(tokens, idx, options, env))

    def image(self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
        tok = tokens[idx]
        alt = self.renderInlineAsText(tok.children or [], options, env) or "image"
        src = str(tok.attrGet("src") or "")
        local = in_repo(src, env)
        if local != src:  # a file of this repo, served by this server: shown
            return str(render('<img src="{src}" alt="{alt}" loading="lazy">', src=local, alt=alt))
        return str(
            render(
                '<a class="image-link" href="{src}" rel="nofollow noopener noreferrer">[image: {alt}]</a>',
                src=src,
                alt=alt,
            )
        )

    md.add_render_rule("link_open", link_open)
    md.add_render_rule("image", image)
    return md


def in_repo(url: str, env: Any) -> str:
    """A relative link of a card made to point at that file of the repo (``env["raw"]``, ``env["rev"]``)."""
    raw = env.get("raw") if isinstance(env, dict) else None
    if not raw or not url or RELATIVE_NOT.match(url):
        return url
    path = url.split("#", 1)[0].split("?", 1)[0]
    while path.startswith("./"):
        path = path[2:]
    return f"{raw}{quote(path, safe='/')}?{urlencode({'rev': env.get('rev', 'main')})}" if path else url


def split_card(text: str) -> str:
    """The Markdown body of a README (its front matter taken off)."""
    m = FRONT_MATTER.match(text)
    return text[m.end() :] if m else text


def render_markdown(text: str, *, raw: str | None = None, rev: str = "main") -> Safe:
    """``text`` as HTML; with ``raw`` (``/owner/name/raw/``), relative links and images point into the repo."""
    return Safe(_parser().render(text[:CARD_LIMIT], {"raw": raw, "rev": rev}))


def card_value(value: Any) -> Safe:
    if isinstance(value, list):
        return render("<ul>{items}</ul>", items=join(render("<li>{v}</li>", v=card_value(v)) for v in value))
    if isinstance(value, dict):
        return esc(json.dumps(value, ensure_ascii=False, default=str)[:2000])
    return esc(value)


def metadata_box(card: dict[str, Any] | None) -> Safe:
    if not card:
        return Safe("")
    items = [(str(k), card_value(v)) for k, v in list(card.items())[:100]]
    return render(
        '<aside class="card-meta" aria-labelledby="meta-h"><h2 id="meta-h">Metadata</h2>{dl}</aside>',
        dl=definition_list(items),
    )
