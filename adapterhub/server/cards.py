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
    card = json.loads(json.dumps(data, default=str))
    check_card(card)
    return card


def _strings(card: dict[str, Any], key: str) -> None:
    """A string or a list of strings (numbers pass too: YAML reads an unquoted ``2024`` as one)."""
    v = card.get(key)
    scalar = (str, int, float)
    if (
        v is not None
        and not isinstance(v, scalar)
        and not (isinstance(v, list) and all(isinstance(x, scalar) for x in v))
    ):
        raise _invalid(f"{key} must be a string or a list of strings")


def check_card(card: dict[str, Any]) -> None:
    """The fields the Hub checks: ``tags``, ``base_model``, ``datasets`` and ``language`` are strings or
    lists of strings; ``library_name`` and ``license`` strings; ``model-index`` a list of models, each with
    a ``name`` and ``results`` of ``{task: {type}, dataset: {name, type}, metrics: [{type, value}]}``."""
    for key in ("tags", "base_model", "datasets", "language"):
        _strings(card, key)
    for key in ("library_name", "license", "base_model_relation", "pipeline_tag"):
        if card.get(key) is not None and not isinstance(card[key], str):
            raise _invalid(f"{key} must be a string")
    index = card.get("model-index")
    if index is None:
        return
    if not isinstance(index, list):
        raise _invalid("model-index must be a list of models")
    for i, model in enumerate(index):
        where = f"model-index[{i}]"
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            raise _invalid(f"{where} needs a name")
        results = model.get("results")
        if not isinstance(results, list):
            raise _invalid(f"{where}.results must be a list")
        for j, result in enumerate(results):
            at = f"{where}.results[{j}]"
            task = result.get("task") if isinstance(result, dict) else None
            if not isinstance(task, dict) or not isinstance(task.get("type"), str):
                raise _invalid(f"{at}.task needs a type")
            dataset = result.get("dataset")
            if dataset is not None and (
                not isinstance(dataset, dict)
                or not isinstance(dataset.get("name"), str)
                or not isinstance(dataset.get("type"), str)
            ):
                raise _invalid(f"{at}.dataset needs a name and a type")
            metrics = result.get("metrics")
            if metrics is not None and (
                not isinstance(metrics, list)
                or not all(
                    isinstance(m, dict) and isinstance(m.get("type"), str) and "value" in m for m in metrics
                )
            ):
                raise _invalid(f"{at}.metrics must be a list of {{type, value}}")


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
