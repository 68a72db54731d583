"""Where the JSON Schemas and the Alembic migrations live.

In a built wheel they ship inside the package (``adapterhub/_data/``); in a source checkout (editable
install, tests) they are the top-level ``schemas/`` and ``migrations/`` folders.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

_PKG = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    for candidate in (_PKG / "_data" / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"adapterhub's {name}/ folder is missing from the installation")


@cache
def load_schema(name: str) -> dict[str, Any]:
    """A schema from ``schemas/`` by file name, e.g. ``adapter.schema.json``."""
    with open(data_dir("schemas") / name, encoding="utf-8") as f:
        doc: dict[str, Any] = json.load(f)
    return doc
