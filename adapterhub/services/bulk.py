"""Bulk import: every adapter under a folder tree, or in the Hugging Face cache, each cataloged or reported."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AdapterHubError, InvalidOptionError
from ..records import BulkAddResult, BulkItem
from .adapters import add_adapter

if TYPE_CHECKING:
    from ..catalog.library import Library

#: folders never looked into
SKIP_DIRS = {".git", "__pycache__", "node_modules", ".venv", ".cache"}


def find_adapters(root: Path) -> Iterator[Path]:
    """PEFT folders (an ``adapter_config.json``) and loose ``.safetensors`` files (kohya LoRAs) under
    ``root``; a PEFT folder's own files are not reported again, nor is anything below it."""
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        here = Path(folder)
        if "adapter_config.json" in files:
            dirs[:] = []
            yield here
            continue
        if "config.json" in files:  # a model checkpoint's weights, not a LoRA
            continue
        for f in sorted(files):
            if f.endswith(".safetensors"):
                yield here / f


def _name_for(root: Path, path: Path) -> str:
    rel = path.relative_to(root) if path != root else Path(path.name)
    parts = [p for p in (rel.with_suffix("") if path.is_file() else rel).parts if p]
    cleaned = [re.sub(r"[^A-Za-z0-9._\-]+", "-", p).strip("-.") or "adapter" for p in parts]
    return "/".join(cleaned)[:200] or "adapter"


def add_tree(
    lib: Library,
    root: str | os.PathLike[str],
    *,
    base: str | None = None,
    tags: Sequence[str] = (),
    allow_pickle: bool = False,
    on_item: Callable[[BulkItem], None] | None = None,
) -> BulkAddResult:
    """Catalog every adapter under ``root``, named by its path below ``root``; one that is already
    cataloged (same name) is skipped, one that fails is reported with its one-line reason."""
    top = Path(root)
    if not top.is_dir():
        raise InvalidOptionError(f"{top} is not a folder; --recursive walks a folder tree")
    items = []
    for path in find_adapters(top):
        items.append(
            _one(
                lib, path, _name_for(top, path), base=base, tags=tags, allow_pickle=allow_pickle, source=None
            )
        )
        if on_item is not None:
            on_item(items[-1])
    return BulkAddResult(tuple(items))


def hf_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def add_hf_cache(
    lib: Library,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    tags: Sequence[str] = (),
    on_item: Callable[[BulkItem], None] | None = None,
) -> BulkAddResult:
    """Catalog the LoRA adapters in the Hugging Face cache: every ``models--OWNER--NAME`` snapshot with an
    ``adapter_config.json``, named ``OWNER/NAME`` (``OWNER/NAME@REV`` when several revisions are cached),
    with source ``OWNER/NAME@COMMIT`` as a pull would record it."""
    cache = hf_cache_dir(cache_dir)
    if not cache.is_dir():
        raise InvalidOptionError(f"no Hugging Face cache at {cache}; give --cache-dir or set HF_HUB_CACHE")
    items = []
    for repo in sorted(cache.glob("models--*")):
        repo_id = "/".join(repo.name.split("--")[1:])
        snaps = sorted(s for s in (repo / "snapshots").glob("*") if (s / "adapter_config.json").is_file())
        for snap in snaps:
            name = repo_id if len(snaps) == 1 else f"{repo_id}@{snap.name[:12]}"
            source = f"{repo_id}@{snap.name}"
            if lib.names_by_source(source):
                items.append(
                    BulkItem(
                        str(snap), name, "skipped", f"already cataloged as {lib.names_by_source(source)[0]}"
                    )
                )
            else:
                items.append(_one(lib, snap, name, base=None, tags=tags, allow_pickle=False, source=source))
            if on_item is not None:
                on_item(items[-1])
    return BulkAddResult(tuple(items))


def _one(
    lib: Library,
    path: Path,
    name: str,
    *,
    base: str | None,
    tags: Sequence[str],
    allow_pickle: bool,
    source: str | None,
) -> BulkItem:
    if lib.exists(name):
        return BulkItem(str(path), name, "skipped", "an adapter of this name is already cataloged")
    try:
        info = add_adapter(
            lib, path, name=name, base=base, tags=tags, allow_pickle=allow_pickle, source=source
        )
    except AdapterHubError as exc:
        return BulkItem(str(path), name, "failed", str(exc))
    return BulkItem(str(path), info.name, "added", None, info)
