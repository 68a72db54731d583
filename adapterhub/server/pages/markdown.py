"""Model cards as HTML: Markdown rendered by markdown-it-py with raw HTML disabled (so a card holding
``<script>`` shows it as text), links checked by markdown-it's own validator and marked ``nofollow``,
images shown as links (nothing is fetched from another site), and the YAML front matter as a box."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from .html import Safe, definition_list, esc, join, render

FRONT_MATTER = re.compile(r"^---\s*\n(.*?)\n---\s*(\n|$)", re.S)
CARD_LIMIT = 1024 * 1024


@lru_cache(maxsize=1)
def _parser() -> Any:
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    md.enable("table").enable("strikethrough")

    def link_open(self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
        tokens[idx].attrSet("rel", "nofollow noopener noreferrer")
        return str(self.renderToken(tokens, idx, options, env))

    def image(self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
        tok = tokens[idx]
        alt = self.renderInlineAsText(tok.children or [], options, env) or "image"
        src = str(tok.attrGet("src") or "")
        return str(render('<a class="image-link" href="{src}" rel="nofollow noopener noreferrer">[image: {alt}]</a>',
                          src=src, alt=alt))  # fmt: skip

    md.add_render_rule("link_open", link_open)
    md.add_render_rule("image", image)
    return md


def split_card(text: str) -> str:
    """The Markdown body of a README (its front matter taken off)."""
    m = FRONT_MATTER.match(text)
    return text[m.end() :] if m else text


def render_markdown(text: str) -> Safe:
    return Safe(_parser().render(text[:CARD_LIMIT]))


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
