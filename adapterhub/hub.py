"""`Hub`: the Python API. Composes the catalog, the store, the formats and the ops.

Every CLI command is one call here; every method returns frozen dataclasses from `records` and raises
the errors of `errors`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import (
    AdapterExistsError,
    AdapterHubError,
    AdapterNotFoundError,
    CatalogError,
    InvalidAdapterError,
    StoreError,
)
from .hub_bases import BasesMixin
from .hub_ops import OpsMixin
from .records import AdapterInfo
from .remote.api import RemoteMixin
from .store import Store

if TYPE_CHECKING:
    from .catalog import Catalog
    from .formats import AdapterFiles
    from .lora import LoraWeights

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]{0,199}$")
TAG_RE = re.compile(r"^[^\s,]{1,100}$")


def default_home() -> Path:
    """``$ADAPTERHUB_HOME``, else the platform's user data folder."""
    env = os.environ.get("ADAPTERHUB_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "adapterhub"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "adapterhub"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "adapterhub"


def check_name(name: str) -> str:
    if not NAME_RE.match(name) or ".." in name:
        raise InvalidAdapterError(
            f"invalid adapter name {name!r}: use letters, digits, '.', '_', '-' and '/', starting with a "
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


class Hub(OpsMixin, BasesMixin, RemoteMixin):
    """A catalog of adapters in one home folder (or one database URL)."""

    def __init__(self, home: str | os.PathLike[str] | None = None, *, db: str | None = None) -> None:
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.db_url = db or os.environ.get("ADAPTERHUB_DB") or None
        self.store = Store(self.home / "store")
        self._catalog: Catalog | None = None

    # ------------------------------------------------------------------ plumbing
    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            from .catalog import Catalog
            from .catalog.db import sqlite_url

            try:
                self.home.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CatalogError(
                    f"cannot use {self.home} as the adapterhub home: {exc.strerror or exc}"
                ) from None
            url = self.db_url or sqlite_url(self.home / "catalog.db")
            self._catalog = Catalog(url, lock_path=self.home / ".catalog.lock")
        return self._catalog

    def close(self) -> None:
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def upgrade_db(self) -> str:
        """Apply pending catalog migrations (also done on open); returns the schema revision."""
        return self.catalog.upgrade()

    def db_revision(self) -> str | None:
        return self.catalog.revision()

    # ------------------------------------------------------------------ add
    def add_adapter(
        self,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        base: str | None = None,
        tags: Sequence[str] = (),
        description: str | None = None,
        allow_pickle: bool = False,
        source: str | None = None,
    ) -> AdapterInfo:
        """Check an adapter, copy its files into the store and catalog it, all or nothing."""
        from .formats import AdapterFiles, convert_pickle, detect, read_adapter

        src = Path(path)
        files = detect(src, allow_pickle=allow_pickle)
        name = check_name(name if name is not None else _default_name(src, files))
        tag_list = check_tags(tags)
        if self._exists(name):
            raise AdapterExistsError(name)
        tmpdir: str | None = None
        try:
            if files.pickle:
                self.store.tmp.mkdir(parents=True, exist_ok=True)
                tmpdir = tempfile.mkdtemp(dir=self.store.tmp, prefix="pickle-")
                converted = convert_pickle(files.weights, Path(tmpdir) / "adapter_model.safetensors")
                files = AdapterFiles("peft", converted, files.config)
            weights = read_adapter(files)
            return self._catalog_files(
                name,
                files,
                weights,
                base=base,
                tags=tag_list,
                description=description,
                source=source or str(src.resolve()),
            )
        finally:
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)

    def _exists(self, name: str) -> bool:
        from .catalog import queries

        with self.catalog.read() as conn:
            return queries.find_id(conn, name) is not None

    def _catalog_files(
        self,
        name: str,
        files: AdapterFiles,
        weights: LoraWeights,
        *,
        base: str | None,
        tags: Sequence[str],
        description: str | None,
        source: str | None,
        parents: Sequence[dict[str, Any]] = (),
    ) -> AdapterInfo:
        from sqlalchemy.exc import IntegrityError

        from .catalog import queries

        stored: list[tuple[str, str, Any]] = []  # (filename, role, StoredFile)
        try:
            if files.config is not None:
                stored.append(("adapter_config.json", "config", self.store.put_file(files.config)))
            wname = "adapter_model.safetensors" if files.format == "peft" else files.weights.name
            stored.append((wname, "weights", self.store.put_file(files.weights)))
            weights_digest = stored[-1][2].sha256
            row = _adapter_row(weights, files.format, weights_digest, sum(s.size for _, _, s in stored))
            row.update(name=name, description=description, source=source)
            if base:
                row["base_model"] = base
            modules = [_module_row(m) for m in weights.modules.values()]
            file_rows = [
                {"filename": fn, "role": role, "sha256": s.sha256, "size_bytes": s.size}
                for fn, role, s in stored
            ]
            with self.catalog.write() as conn:
                if queries.find_id(conn, name) is not None:
                    raise AdapterExistsError(name)
                queries.insert_adapter(
                    conn, row=row, modules=modules, files=file_rows, tag_names=tags, parents=parents
                )
        except IntegrityError:
            self._drop_unreferenced(s.sha256 for _, _, s in stored if s.created)
            raise AdapterExistsError(name) from None
        except BaseException:
            self._drop_unreferenced(s.sha256 for _, _, s in stored if s.created)
            raise
        log.info("cataloged %s (%s, %d modules)", name, files.format, len(weights))
        return self.adapter_info(name)

    def _drop_unreferenced(self, digests: Iterable[str]) -> None:
        """Remove store objects that no catalog row points at (after a failed add or a removal)."""
        from .catalog import queries

        ds = set(digests)
        if not ds:
            return
        try:
            with self.catalog.read() as conn:
                keep = queries.referenced_digests(conn, ds)
        except AdapterHubError:
            return  # better a stray object than a missing one
        for d in ds - keep:
            self.store.remove(d)

    # ------------------------------------------------------------------ read
    def list_adapters(
        self,
        *,
        base: str | None = None,
        rank: int | None = None,
        min_rank: int | None = None,
        max_rank: int | None = None,
        target: str | None = None,
        tag: str | None = None,
        format: str | None = None,
        compatible_with: str | None = None,
    ) -> list[AdapterInfo]:
        """Cataloged adapters, filtered; ``compatible_with`` keeps those whose every target fits that
        base (a registered name or a checkpoint folder), judged from the catalog alone."""
        return self._select(
            None, base=base, rank=rank, min_rank=min_rank, max_rank=max_rank, target=target, tag=tag, format=format,
            compatible_with=compatible_with,
        )  # fmt: skip

    def search_adapters(self, query: str, **filters: Any) -> list[AdapterInfo]:
        """Adapters whose name, description, tags or base model contain every word of ``query``;
        ``filters`` are those of `list_adapters`."""
        return self._select(query, **filters)

    def adapter_records_json(
        self, query: str | None = None, *, compatible_with: str | None = None, **filters: Any
    ) -> list[str]:
        """`list_adapters` / `search_adapters` as JSON text, one `AdapterInfo.to_dict()` record each.

        On SQLite the database writes the JSON itself, which keeps `adapterhub list --json` fast on
        large catalogs; on other backends it is `json.dumps` of each record.
        """
        from .catalog import queries

        names = sorted(self.compatible_names(compatible_with)) if compatible_with is not None else None
        with self.catalog.read() as conn:
            fast = queries.select_adapter_json(conn, query=query, names=names, **filters)
        if fast is not None:
            return fast
        found = self._select(query, compatible_with=compatible_with, **filters)
        return [json.dumps(a.to_dict(), ensure_ascii=False) for a in found]

    def _select(
        self, query: str | None, *, compatible_with: str | None = None, **filters: Any
    ) -> list[AdapterInfo]:
        from .catalog import queries

        with self.catalog.read() as conn:
            found = queries.select_adapters(conn, query=query, **filters)
        if compatible_with is not None:
            fits = self.compatible_names(compatible_with)
            found = [a for a in found if a.name in fits]
        return found

    def adapter_info(self, name: str) -> AdapterInfo:
        from .catalog import bases, queries

        with self.catalog.read() as conn:
            info = queries.adapter_detail(conn, name)
            if info is None:
                raise AdapterNotFoundError(name)
            merges = tuple(bases.merges_of(conn, name))
            children = tuple(queries.children_of(conn, name))
        pushes = tuple(
            {k: v for k, v in p.to_dict().items() if k != "name"} for p in self.adapter_pushes(name)
        )
        return replace(info, merges=merges, children=children, pushes=pushes)

    def adapter_files(self, name: str) -> AdapterFiles:
        """The stored files of a cataloged adapter, as `AdapterFiles` pointing into the store."""
        from .formats import AdapterFiles

        info = self.adapter_info(name)
        by_role = {f.role: f for f in info.files or ()}
        for f in by_role.values():
            if not self.store.has(f.sha256):
                raise StoreError(
                    f"{name}: stored file {f.filename} ({f.sha256[:12]}) is missing from the store"
                )
        config = self.store.path(by_role["config"].sha256) if "config" in by_role else None
        return AdapterFiles(info.format, self.store.path(by_role["weights"].sha256), config)

    def load_adapter(self, name: str) -> LoraWeights:
        """A cataloged adapter with its tensors loaded."""
        from .formats import read_adapter

        return read_adapter(self.adapter_files(name), load=True)

    # ------------------------------------------------------------------ change
    def tag_adapter(self, name: str, tags: Sequence[str], *, remove: bool = False) -> AdapterInfo:
        from .catalog import queries

        tag_list = check_tags(tags)
        with self.catalog.write() as conn:
            adapter_id = queries.find_id(conn, name)
            if adapter_id is None:
                raise AdapterNotFoundError(name)
            if remove:
                queries.change_tags(conn, adapter_id, remove=tag_list)
            else:
                queries.change_tags(conn, adapter_id, add=tag_list)
        return self.adapter_info(name)

    def remove_adapter(self, name: str) -> None:
        self.remove_adapters([name])

    def remove_adapters(self, names: Sequence[str]) -> list[str]:
        """Remove adapters (all or none) and the stored files no other adapter uses."""
        from .catalog import queries

        digests: list[str] = []
        with self.catalog.write() as conn:
            ids = []
            for n in dict.fromkeys(names):
                adapter_id = queries.find_id(conn, n)
                if adapter_id is None:
                    raise AdapterNotFoundError(n)
                ids.append(adapter_id)
            for adapter_id in ids:
                digests += queries.file_digests(conn, adapter_id)
                queries.delete_adapter(conn, adapter_id)
        self._drop_unreferenced(digests)
        return list(dict.fromkeys(names))

    def export_adapter(
        self, name: str, dest: str | os.PathLike[str], *, format: str | None = None, overwrite: bool = False
    ) -> Path:
        """Write a cataloged adapter out: a PEFT folder or a kohya ``.safetensors`` file.

        In its own format the stored files are copied byte for byte; otherwise it is converted.
        """
        from .formats import FORMATS, read_adapter, write_adapter

        info = self.adapter_info(name)
        fmt = format or info.format
        if fmt not in FORMATS:
            raise InvalidAdapterError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        files = self.adapter_files(name)
        out = Path(dest)
        if fmt == "kohya" and out.is_dir():
            out = out / (Path(name).name + ".safetensors")
        if out.exists() and not (overwrite or (out.is_dir() and not any(out.iterdir()))):
            raise InvalidAdapterError(f"{out} already exists; choose another destination", path=str(out))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        try:
            if fmt == info.format:
                for f in info.files or ():
                    self.store.copy_out(f.sha256, tmp / f.filename)
                produced = (
                    tmp
                    if fmt == "peft"
                    else tmp / next(f.filename for f in info.files or () if f.role == "weights")
                )
            else:
                weights = read_adapter(files, load=True)
                target = tmp if fmt == "peft" else tmp / out.name
                produced = write_adapter(weights, target, format=fmt)
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            os.replace(produced, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out


def _default_name(src: Path, files: AdapterFiles) -> str:
    stem = src.name if src.is_dir() else src.stem
    if src.name in ("adapter_model.safetensors", "adapter_config.json"):
        stem = src.parent.name
    cleaned = re.sub(r"[^A-Za-z0-9._\-]+", "-", stem).strip("-.") or "adapter"
    return cleaned


def _adapter_row(weights: LoraWeights, fmt: str, digest: str, size: int) -> dict[str, Any]:
    cfg = weights.config
    meta = {k: v for k, v in weights.metadata.items() if not (k == "format" and v == "pt")}
    alphas = {m.alpha for m in weights.modules.values()}
    alpha = float(cfg["lora_alpha"]) if "lora_alpha" in cfg else (alphas.pop() if len(alphas) == 1 else None)
    if fmt == "kohya" and len(alphas) > 1:
        alpha = None
    return {
        "sha256": digest,
        "format": fmt,
        "peft_type": cfg.get("peft_type", "LORA") if fmt == "peft" else None,
        "base_model": weights.base_model,
        "base_revision": cfg.get("revision"),
        "rank": weights.rank,
        "alpha": alpha,
        "use_rslora": weights.use_rslora,
        "use_dora": weights.has_dora,
        "rank_pattern": cfg.get("rank_pattern") or {},
        "alpha_pattern": cfg.get("alpha_pattern") or {},
        "task_type": cfg.get("task_type"),
        "dtype": weights.dtype,
        "num_params": weights.num_params,
        "size_bytes": size,
        "num_modules": len(weights.modules),
        "target_modules": weights.target_modules,
        "config": cfg or None,
        "extra": meta or None,
        "replacements": {k: list(v) for k, v in weights.replacement_shapes.items()} or None,
    }


def _module_row(m: Any) -> dict[str, Any]:
    return {
        "module": m.module,
        "short_name": m.short_name,
        "kind": m.kind,
        "rank": m.rank,
        "alpha": m.alpha,
        "scale": m.scale,
        "in_features": m.in_features,
        "out_features": m.out_features,
        "kernel_size": list(m.kernel_size) or None,
        "dora": m.is_dora,
        "dtype": m.dtype,
        "lora_bias": m.bias_shape is not None,
    }
