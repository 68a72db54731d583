"""`Library`: the catalog database and the content-addressed store of one home, kept consistent.

Everything that changes which files the catalog references goes through here:
- `ingest` is the one all-or-nothing "catalog these files" step (add, combine, resize, extract, compose,
  pull and train land through it): files go into the store first, then one write transaction checks the
  name, makes sure every object it references is (still) in the store, and inserts the rows.
- `remove` deletes rows and, in the same write transaction, moves the objects no row references any
  more to the store's trash; they are deleted after the commit (restored if it fails).

Catalog writers are serialized (see `Catalog.write`), so a removal and an ingest of the same content
cannot interleave between "is this object referenced?" and "delete it": whichever commits second sees
the first one's rows, and an ingest that finds its object gone puts it back from its source.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import IntegrityError

from .. import faults
from ..errors import AdapterExistsError, AdapterNotFoundError, CatalogError, StoreError
from ..records import AdapterFilter, AdapterInfo, BaseInfo, MergeRecord, PushRecord
from ..store import BlobStore, Progress, StoredFile, open_store
from . import bases, queries, sharing
from .rows import adapter_row, module_row

if TYPE_CHECKING:
    from ..formats import AdapterFiles
    from ..lora import LoraWeights
    from . import Catalog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verified:
    """A file whose sha256 and size the caller has already checked (a pull's download). The caller owns
    the file, so it may be hard-linked into the store instead of copied and hashed again."""

    sha256: str
    size: int


@dataclass(frozen=True)
class BaseLayoutRow:
    """What the catalog holds of a registered base's layout."""

    name: str
    model_type: str | None
    fingerprint: str
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    hub_id: str | None = None


class Library:
    """The catalog (SQLite under ``home`` unless ``db`` names another SQLAlchemy URL) and the store."""

    def __init__(self, home: Path, *, db: str | None = None) -> None:
        self.home = home
        self.db_url = db
        self.store: BlobStore = open_store(home / "store", name="store")
        self._catalog: Catalog | None = None
        #: True once this Library made the home folder and a new SQLite catalog in it
        self.created_home = False

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            from . import Catalog
            from .db import sqlite_url

            fresh = self.db_url is None and not (self.home / "catalog.db").exists()
            try:
                self.home.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CatalogError(
                    f"cannot use {self.home} as the adapterhub home: {exc.strerror or exc}"
                ) from None
            url = self.db_url or sqlite_url(self.home / "catalog.db")
            self._catalog = Catalog(url, lock_path=self.home / ".catalog.lock")
            self.created_home = fresh
        return self._catalog

    def close(self) -> None:
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None

    # ------------------------------------------------------------------ adapters: read
    def exists(self, name: str) -> bool:
        with self.catalog.read() as conn:
            return queries.find_id(conn, name) is not None

    def info(self, name: str) -> AdapterInfo:
        """Everything about one adapter: record, files, modules, merges, children, pushes."""
        with self.catalog.read() as conn:
            info = queries.adapter_detail(conn, name)
            if info is None:
                raise AdapterNotFoundError(name)
            merges = tuple(bases.merges_of(conn, name))
            children = tuple(queries.children_of(conn, name))
            pushes = tuple(sharing.pushes_of(conn, name) or ())
        return replace(info, merges=merges, children=children, pushes=pushes)

    def files(self, name: str) -> AdapterFiles:
        """The stored files of a cataloged adapter, as `AdapterFiles` pointing into the store."""
        from ..formats import AdapterFiles

        info = self.info(name)
        by_role = {f.role: f for f in info.files or ()}
        for f in by_role.values():
            if not self.store.has(f.sha256):
                raise StoreError(
                    f"{name}: stored file {f.filename} ({f.sha256[:12]}) is missing from the store"
                )
        config = self.store.path(by_role["config"].sha256) if "config" in by_role else None
        return AdapterFiles(info.format, self.store.path(by_role["weights"].sha256), config)

    def select(
        self, query: str | None, where: AdapterFilter, *, names: Iterable[str] | None = None
    ) -> list[AdapterInfo]:
        with self.catalog.read() as conn:
            return queries.select_adapters(
                conn, query=query, names=None if names is None else sorted(names), **where.to_dict()
            )

    def select_json(
        self, query: str | None, where: AdapterFilter, *, names: Iterable[str] | None = None
    ) -> list[str] | None:
        """`select` as JSON text written by the database itself (SQLite); None on other backends."""
        with self.catalog.read() as conn:
            return queries.select_adapter_json(
                conn, query=query, names=None if names is None else sorted(names), **where.to_dict()
            )

    def names_by_source(self, source: str) -> list[str]:
        with self.catalog.read() as conn:
            return sharing.names_by_source(conn, source)

    # ------------------------------------------------------------------ adapters: write
    def ingest(
        self,
        name: str,
        files: AdapterFiles,
        weights: LoraWeights,
        *,
        base: str | None = None,
        tags: Sequence[str] = (),
        description: str | None = None,
        source: str | None = None,
        parents: Sequence[Mapping[str, Any]] = (),
        verified: Mapping[Path, Verified] | None = None,
        progress: Progress | None = None,
    ) -> AdapterInfo:
        """Copy ``files`` into the store and catalog them as ``name``, all or nothing.

        ``weights`` is what `formats.read_adapter` read from ``files`` (metadata is enough). ``parents``
        are lineage rows (``parent_name``, ``weight``, ``method``, ``params``).
        """
        verified = verified or {}
        wanted: list[tuple[str, str, Path]] = []  # (filename, role, source path)
        if files.config is not None:
            wanted.append(("adapter_config.json", "config", files.config))
        wanted.append(
            (
                "adapter_model.safetensors" if files.format == "peft" else files.weights.name,
                "weights",
                files.weights,
            )
        )
        stored: list[tuple[str, str, Path, StoredFile]] = []
        try:
            for filename, role, path in wanted:
                stored.append((filename, role, path, self._put(path, verified.get(path), progress)))
            faults.point("add.stored")
            weights_digest = stored[-1][3].sha256
            row = adapter_row(weights, files.format, weights_digest, sum(s.size for *_, s in stored))
            row.update(name=name, description=description, source=source)
            if base:
                row["base_model"] = base
            modules = [module_row(m) for m in weights.modules.values()]
            file_rows = [
                {"filename": fn, "role": role, "sha256": s.sha256, "size_bytes": s.size}
                for fn, role, _, s in stored
            ]
            with self.catalog.write() as conn:
                if queries.find_id(conn, name) is not None:
                    raise AdapterExistsError(name)
                for _, _, path, s in stored:  # a removal may have taken an object we found already there
                    if not self.store.has(s.sha256):
                        self._put(path, verified.get(path))
                queries.insert_adapter(
                    conn,
                    row=row,
                    modules=modules,
                    files=file_rows,
                    tag_names=list(tags),
                    parents=[dict(p) for p in parents],
                )
        except IntegrityError:
            self.drop_unreferenced(s.sha256 for *_, s in stored if s.created)
            raise AdapterExistsError(name) from None
        except BaseException:
            self.drop_unreferenced(s.sha256 for *_, s in stored if s.created)
            raise
        log.info("cataloged %s (%s, %d modules)", name, files.format, len(weights))
        return self.info(name)

    def _put(self, path: Path, known: Verified | None, progress: Progress | None = None) -> StoredFile:
        if known is not None:
            return self.store.put_file(path, digest=known.sha256, size=known.size)
        return self.store.put_file(path, progress=progress)

    def tag(self, name: str, tags: Sequence[str], *, remove: bool = False) -> None:
        with self.catalog.write() as conn:
            adapter_id = queries.find_id(conn, name)
            if adapter_id is None:
                raise AdapterNotFoundError(name)
            if remove:
                queries.change_tags(conn, adapter_id, remove=tags)
            else:
                queries.change_tags(conn, adapter_id, add=tags)

    def remove(self, names: Sequence[str]) -> list[str]:
        """Remove adapters (all or none) and the stored files no other adapter uses."""
        return self._remove(names)

    def rename(self, name: str, new: str, *, replace: bool = False) -> None:
        """Give adapter ``name`` the name ``new`` in one transaction; with ``replace`` the adapter that had
        ``new`` is removed in the same transaction (else `AdapterExistsError` if there is one)."""
        self._remove([], rename=(name, new), replace=replace)

    def _remove(
        self, names: Sequence[str], rename: tuple[str, str] | None = None, *, replace: bool = False
    ) -> list[str]:
        unique = list(dict.fromkeys(names))
        trashed: list[tuple[str, object]] = []
        try:
            with self.catalog.write() as conn:
                ids = []
                renamed = None
                if rename is not None:
                    renamed = queries.find_id(conn, rename[0])
                    if renamed is None:
                        raise AdapterNotFoundError(rename[0])
                    taken = queries.find_id(conn, rename[1])
                    if taken is not None and not replace:
                        raise AdapterExistsError(rename[1])
                    ids += [] if taken is None else [taken]
                for n in unique:
                    adapter_id = queries.find_id(conn, n)
                    if adapter_id is None:
                        raise AdapterNotFoundError(n)
                    ids.append(adapter_id)
                digests: set[str] = set()
                for adapter_id in ids:
                    digests.update(queries.file_digests(conn, adapter_id))
                    queries.delete_adapter(conn, adapter_id)
                if renamed is not None and rename is not None:
                    queries.rename_adapter(conn, renamed, rename[1])
                for d in sorted(digests - queries.referenced_digests(conn, digests)):
                    t = self.store.trash(d)
                    if t is not None:
                        trashed.append((d, t))
                faults.point("remove.trashed")
        except BaseException:
            for d, t in trashed:
                self.store.restore(t, d)
            raise
        self.store.purge(t for _, t in trashed)
        return unique

    def drop_unreferenced(self, digests: Iterable[str]) -> None:
        """Remove store objects that no catalog row points at (after a failed ingest)."""
        ds = set(digests)
        if not ds:
            return
        try:
            with self.catalog.write() as conn:
                for d in ds - queries.referenced_digests(conn, ds):
                    self.store.remove(d)
        except CatalogError:
            log.warning(
                "could not check %d new store objects after a failed add; `db gc` removes them", len(ds)
            )

    # ------------------------------------------------------------------ merges and pushes
    def record_merge(self, row: Mapping[str, Any], used: Sequence[tuple[str, float]]) -> None:
        with self.catalog.write() as conn:
            bases.record_merge(conn, dict(row), used)

    def merges_of(self, name: str) -> list[MergeRecord]:
        with self.catalog.read() as conn:
            return bases.merges_of(conn, name)

    def record_push(
        self,
        name: str,
        *,
        endpoint: str,
        repo_id: str,
        revision: str,
        commit: str,
        commit_url: str | None,
    ) -> None:
        with self.catalog.write() as conn:
            sharing.record_push(
                conn,
                name,
                endpoint=endpoint,
                repo_id=repo_id,
                revision=revision,
                commit=commit,
                commit_url=commit_url,
            )

    def pushes_of(self, name: str) -> list[PushRecord]:
        with self.catalog.read() as conn:
            found = sharing.pushes_of(conn, name)
        if found is None:
            raise AdapterNotFoundError(name)
        return found

    # ------------------------------------------------------------------ bases
    def insert_base(self, row: Mapping[str, Any], tensors: Sequence[tuple[str, Sequence[int], str]]) -> bool:
        """Register a base; False if the name is taken."""
        with self.catalog.write() as conn:
            if bases.find_base_id(conn, row["name"]) is not None:
                return False
            bases.insert_base(conn, dict(row), tensors)
        return True

    def bases(self, name: str | None = None) -> list[BaseInfo]:
        with self.catalog.read() as conn:
            return bases.select_bases(conn, name)

    def delete_base(self, name: str) -> bool:
        with self.catalog.write() as conn:
            base_id = bases.find_base_id(conn, name)
            if base_id is None:
                return False
            bases.delete_base(conn, base_id)
        return True

    def base_layout(self, name: str) -> BaseLayoutRow | None:
        with self.catalog.read() as conn:
            found = bases.base_layout_rows(conn, name)
        if found is None:
            return None
        r, shapes, config = found
        return BaseLayoutRow(r.name, r.model_type, r.fingerprint, config, shapes, r.hub_id)

    def fingerprint_of(self, model_name: str | None) -> str | None:
        """The fingerprint of the registered base an adapter's declared base model names, if any."""
        with self.catalog.read() as conn:
            name = bases.base_for_model_name(conn, model_name)
            if name is None:
                return None
            return next((b.fingerprint for b in bases.select_bases(conn, name)), None)

    def adapter_facts(self, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Per adapter, what validation against a base needs (module rows, config), from the catalog."""
        with self.catalog.read() as conn:
            return bases.adapter_facts(conn, names)
