"""`db check` and `db gc`: find what a killed run or a hand edit left wrong, and reclaim what no one uses.

Scratch files and folders carry the process id that makes them (`store.scratch_prefix`), and outputs
written outside the home (merge and export folders) are noted in ``HOME/work/`` while they are being
written (`journal`), so a check can tell a live writer's files from a dead one's leftovers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from ..records import CheckReport, GcReport, Problem
from ..store import STALE_AFTER, BlobStore, open_store, pid_alive, scratch_owner
from ..store.base import tree_size

if TYPE_CHECKING:
    from ..catalog.library import Library

log = logging.getLogger(__name__)


@contextlib.contextmanager
def journal(lib: Library, out: Path, *, kind: str = "write") -> Iterator[None]:
    """Note in the home that this process (a ``kind`` run: merge, export) is writing ``out`` (and its
    hidden scratch beside it)."""
    work = lib.home / "work"
    try:
        work.mkdir(parents=True, exist_ok=True)
        entry = work / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        entry.write_text(json.dumps({"out": str(Path(out).resolve()), "pid": os.getpid(), "kind": kind}))
    except OSError:
        entry = None  # a read-only home: the output is still written, only not journaled
    try:
        yield
    finally:
        if entry is not None:
            entry.unlink(missing_ok=True)


#: the scratch each kind of run makes in the store's ``tmp/`` (`scratch_prefix`) and, for runs that
#: write outside the home, the journal kind; a run clears only these of dead runs (`sweep`)
SCRATCH_KINDS: dict[str, tuple[str, ...]] = {
    "add": ("in", "pickle"),
    "combine": ("derived", "in"),
    "pull": ("pull", "in"),
    "merge": (),
    "export": (),
}


@dataclass(frozen=True)
class _Finding:
    problem: Problem
    fix: Callable[[], None] | None = None  # what gc does about it (orphans: see `gc`)
    orphan: tuple[BlobStore, str] | None = None


def _journaled(lib: Library, kind: str | None = None) -> list[tuple[Path, list[Path]]]:
    """Journals of dead processes (of ``kind`` only, when given) and the scratch beside their outputs."""
    work = lib.home / "work"
    found: list[tuple[Path, list[Path]]] = []
    if not work.is_dir():
        return found
    for entry in sorted(work.glob("*.json")):
        if pid_alive(scratch_owner("x-" + entry.name)):
            continue
        try:
            doc = json.loads(entry.read_text())
            out = Path(doc["out"])
        except (OSError, ValueError, KeyError, TypeError):
            doc, out = {}, None
        if kind is not None and (not isinstance(doc, dict) or doc.get("kind") != kind):
            continue
        scratch: list[Path] = []
        if out is not None and out.parent.is_dir():
            scratch = sorted(out.parent.glob(f".{out.name}.tmp-*")) + sorted(
                out.parent.glob(f".{out.name}.old-*")
            )
        found.append((entry, scratch))
    return found


def _rm(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _leftovers(stores: list[tuple[BlobStore, set[str]]], lib: Library) -> list[_Finding]:
    """Scratch of dead processes: the stores' tmp/ and trash (and, in a bucket, unfinished uploads), and
    journaled outputs' scratch. A trashed object that a row still references (its removal was killed
    before it committed) is reported as ``trashed``: gc puts it back."""
    found: list[_Finding] = []
    for store, refs in stores:
        for item in store.leftovers():
            if not item.stale:
                continue
            if item.digest is not None and item.digest in refs and not store.has(item.digest):
                found.append(
                    _Finding(
                        Problem("trashed", item.subject, "a removal that never committed took this object"),
                        partial(store.restore, item.handle, item.digest),
                    )
                )
            else:
                found.append(
                    _Finding(
                        Problem("leftover", item.subject, "scratch of a process that is gone", item.size),
                        partial(store.discard, item),
                    )
                )
    for entry, scratch in _journaled(lib):
        for p in scratch:
            found.append(
                _Finding(
                    Problem("leftover", str(p), "unfinished output of a run that is gone", tree_size(p)),
                    partial(_rm, p),
                )
            )
        found.append(
            _Finding(
                Problem("leftover", str(entry), "journal of a process that is gone", tree_size(entry)),
                partial(_rm, entry),
            )
        )
    return found


def _objects(store: BlobStore, refs: set[str], what: str, *, grace: float = 0.0) -> list[_Finding]:
    """Objects no row references (younger than ``grace`` seconds are left alone: an upload waits a
    while for the commit that references it), and cached copies of objects no row references."""
    now = time.time()
    found: list[_Finding] = []
    present: set[str] = set()
    for digest, size, mtime in store.listing():
        present.add(digest)
        if digest not in refs and now - mtime > grace:
            found.append(
                _Finding(
                    Problem("orphan", store.object_name(digest), f"no {what} references this object", size),
                    orphan=(store, digest),
                )
            )
    for digest, path in store.cached():
        if digest not in refs:
            found.append(
                _Finding(
                    Problem(
                        "leftover", str(path), "a cached copy of an object no row references", tree_size(path)
                    ),
                    partial(_rm, path),
                )
            )
    return found


def _survey(lib: Library, *, verify: bool) -> tuple[list[_Finding], int]:
    from ..catalog import health

    found: list[_Finding] = []
    with lib.catalog.read() as conn:
        files = health.adapter_files(conn)
        server_refs = health.server_digests(conn)
        found += [_Finding(Problem("database", "catalog", msg)) for msg in health.integrity(conn)]
        found += [_Finding(Problem("value", name, msg)) for name, msg in health.non_finite(conn)]
    referenced = {d for _, _, d in files}
    server = open_store(lib.home / "server", name="server")
    leftovers = _leftovers([(lib.store, referenced), (server, server_refs)], lib)
    trashed = {
        f.problem.subject.rsplit("/", 1)[-1].split(".")[0] for f in leftovers if f.problem.kind == "trashed"
    }
    present = set(lib.store)
    for name, filename, digest in files:
        if digest in trashed:
            continue  # reported with the trash entry it can be restored from
        if digest not in present:
            found.append(
                _Finding(Problem("missing", name, f"stored file {filename} ({digest[:12]}) is missing"))
            )
        elif verify and not lib.store.verify(digest):
            found.append(
                _Finding(
                    Problem(
                        "corrupt", name, f"stored file {filename} ({digest[:12]}) does not match its sha256"
                    )
                )
            )
    found += _objects(lib.store, referenced, "catalog row")
    found += _objects(server, server_refs, "hosted repo", grace=STALE_AFTER)
    server_present = set(server)
    for digest in sorted(server_refs):
        if digest not in server_present and digest not in trashed:
            found.append(
                _Finding(Problem("missing", "server", f"a hosted repo's file {digest[:12]} is missing"))
            )
    return found + leftovers, len(files)


def check(lib: Library, *, verify: bool = True) -> CheckReport:
    """Every row's files present (and, with ``verify``, matching their sha256), objects no row
    references, leftovers of killed runs, values JSON cannot hold, and the database's own check; in the
    bucket too when the store is one."""
    found, checked = _survey(lib, verify=verify)
    return CheckReport(problems=tuple(f.problem for f in found), files_checked=checked, verified=verify)


def gc(lib: Library, *, dry_run: bool = True) -> GcReport:
    """Remove orphaned objects and dead runs' leftovers (nothing a row references or a live process is
    writing). Orphans are re-checked under the catalog's write lock before they go."""
    from ..catalog import health

    found, _ = _survey(lib, verify=False)
    candidates = [f for f in found if f.problem.kind in ("orphan", "leftover", "trashed")]
    if dry_run:
        return GcReport(items=tuple(f.problem for f in candidates), dry_run=True)
    removed: list[Problem] = []
    orphans = [f for f in candidates if f.orphan is not None]
    if orphans:
        with lib.catalog.write() as conn:  # an add that committed meanwhile keeps its objects
            keep = {d for _, _, d in health.adapter_files(conn)} | health.server_digests(conn)
            for f in orphans:
                store, digest = f.orphan  # type: ignore[misc]
                if digest in keep:
                    continue
                store.remove(digest)
                removed.append(f.problem)
    for f in candidates:
        if f.fix is not None:
            f.fix()
            removed.append(f.problem)
    return GcReport(items=tuple(removed), dry_run=False)


def sweep(lib: Library, kind: str) -> int:
    """Clear what dead runs of ``kind`` (add, combine, pull, merge, export) left: scratch in the store's
    ``tmp/`` whose name says it is that kind's and whose process is gone, and the journaled scratch of
    dead runs of that kind. Returns the bytes freed. Anything else is left to `db gc`."""
    freed = 0
    prefixes = SCRATCH_KINDS.get(kind, ())
    tmp = lib.store.tmp
    if prefixes and tmp.is_dir():
        for entry in tmp.iterdir():
            head, _, rest = entry.name.partition("-")
            pid = rest.split("-", 1)[0]
            if head in prefixes and pid.isdigit() and not pid_alive(int(pid)):
                freed += tree_size(entry)
                _rm(entry)
    for entry, scratch in _journaled(lib, kind):
        for p in scratch:
            freed += tree_size(p)
            _rm(p)
        entry.unlink(missing_ok=True)
    if freed:
        log.info("cleared %d bytes that killed %s runs left", freed, kind)
    return freed
