"""Name and tag rules for cataloged adapters and bases (imports nothing of the package but its errors)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from .errors import InvalidAdapterError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]{0,199}$")
TAG_RE = re.compile(r"^[^\s,]{1,100}$")


def is_valid_name(name: str) -> bool:
    return bool(NAME_RE.match(name)) and ".." not in name


def check_name(name: str) -> str:
    """``name`` if it is a valid adapter or base name, else `InvalidAdapterError`."""
    if not is_valid_name(name):
        shown = name if len(name) <= 80 else name[:60] + f"... ({len(name)} characters)"
        raise InvalidAdapterError(
            f"invalid adapter name {shown!r}: use letters, digits, '.', '_', '-' and '/', starting with a "
            "letter or digit (at most 200 characters)"
        )
    return name


def check_tags(tags: Iterable[str]) -> list[str]:
    out = []
    for t in tags:
        if not TAG_RE.match(t):
            raise InvalidAdapterError(
                f"invalid tag {t!r}: tags are 1-100 characters without spaces or commas"
            )
        out.append(t)
    return out


def name_from_path(src: Path) -> str:
    """The default catalog name of an adapter at ``src``: its folder or file stem, cleaned."""
    stem = src.name if src.is_dir() else src.stem
    if src.name in ("adapter_model.safetensors", "adapter_config.json"):
        stem = src.parent.name
    return re.sub(r"[^A-Za-z0-9._\-]+", "-", stem).strip("-.") or "adapter"
