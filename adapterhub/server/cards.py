"""Model cards: the YAML front matter of a README.md, read safely, and the tags the Hub derives from it.

A card is untrusted input read for every model-info request, so it is bounded before it is built: the
front matter is at most `CARD_TEXT_LIMIT` characters, and its composed node graph is sized with every
alias expanded (linear in the graph, never expanding it), which refuses a "billion laughs" card in
microseconds. Parsing is pure Python and CPU-bound; the routes call it off the event loop.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import BadRequestError

CARD_TEXT_LIMIT = 1024 * 1024
CARD_EXPANDED_LIMIT = 2_000_000
_FRONT_MATTER = re.compile(r"^---\s*\n(.*?)\n---\s*(\n|$)", re.S)


def _invalid(reason: str) -> BadRequestError:
    return BadRequestError(f"Invalid metadata in README.md: {reason}")


def parse_card(readme: bytes) -> dict[str, Any] | None:
    """The YAML front matter of a README.md, or None. Raises `BadRequestError` when the YAML is broken,
    not a mapping, too large, nested too deeply, or too large once its aliases are expanded."""
    import yaml

    text = readme.decode("utf-8", errors="replace")
    m = _FRONT_MATTER.match(text)
    if not m:
        return None
    block = m.group(1)
    if len(block) > CARD_TEXT_LIMIT:
        raise _invalid(f"the metadata block is larger than {CARD_TEXT_LIMIT:,} characters")
    loader = yaml.SafeLoader(block)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        check_expanded_size(node, CARD_EXPANDED_LIMIT)
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise _invalid(str(exc).splitlines()[0]) from None
    except RecursionError:
        raise _invalid("the metadata block is nested too deeply") from None
    finally:
        loader.dispose()
    if data is None:
        return None
    if not isinstance(data, dict):
        raise _invalid("the metadata block must be a YAML mapping")
    return json.loads(json.dumps(data, default=str))


def check_expanded_size(root: Any, limit: int) -> None:
    """Refuse a composed YAML node graph whose tree, with every alias expanded, would exceed ``limit``
    (nodes plus scalar characters), or that refers to itself. Linear in the graph, never expanding it."""
    import yaml

    def children(node: Any) -> list[Any]:
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        return []

    size: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            open_.discard(key)
            if isinstance(node, yaml.ScalarNode):
                total = 1 + len(node.value)
            else:
                total = 1 + sum(size[id(c)] for c in children(node))
            if total > limit:
                raise _invalid(
                    f"the metadata block expands to more than {limit:,} nodes and characters once its "
                    "aliases are resolved"
                )
            size[key] = total
            continue
        if key in size:
            continue
        open_.add(key)
        stack.append((node, True))
        for c in children(node):
            if id(c) in open_:
                raise _invalid("the metadata block refers to itself through an alias")
            if id(c) not in size:
                stack.append((c, False))


def card_tags(card: dict[str, Any] | None) -> tuple[list[str], str | None]:
    """The tags the Hub derives from a model card, and its library name."""
    if not card:
        return [], None
    tags: list[str] = []
    raw = card.get("tags") or []
    tags += [str(t) for t in (raw if isinstance(raw, list) else [raw])]
    library = card.get("library_name")
    library = str(library) if library else None
    if library:
        tags.append(library)
    bases = card.get("base_model") or []
    relation = card.get("base_model_relation")
    for b in bases if isinstance(bases, list) else [bases]:
        tags.append(f"base_model:{b}")
        if relation:
            tags.append(f"base_model:{relation}:{b}")
    if card.get("license"):
        tags.append(f"license:{card['license']}")
    return list(dict.fromkeys(tags)), library
