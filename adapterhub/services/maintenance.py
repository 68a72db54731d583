"""`db check` and `db gc`: find what a killed run or a hand edit left wrong, and reclaim what no one uses.

Scratch files and folders carry the process id that makes them (`store.scratch_prefix`), and outputs
written outside the home (merge and export folders) are noted in ``HOME/work/`` while they are being
written (`journal`), so a check can tell a live writer's files from a dead one's leftovers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..records import CheckReport, GcReport, Problem
from ..store import Store, scratch_owner

if TYPE_CHECKING:
    from ..catalog.library import Library

#: scratch without a process id in its name is a leftover once it is this old (seconds)
STALE_AFTER = 3600


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _size(path: Path) -> int:
    try:
        if path.is_dir() and not path.is_symlink():
            return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
        return path.lstat().st_size
    except OSError:
        return 0


@contextlib.contextmanager
def journal(lib: Library, out: Path) -> Iterator[None]:
    """Note in the home that this process is writing ``out`` (and its hidden scratch beside it)."""
    work = lib.home / "work"
    try:
        work.mkdir(parents=True, exist_ok=True)
        entry = work / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        entry.write_text(json.dumps({"out": str(Path(out).resolve()), "pid": os.getpid()}))
    except OSError:
        entry = None  # a read-only home: the output is still written, only not journaled
    try:
        yield
    finally:
        if entry is not None:
            entry.unlink(missing_ok=True)


def _older(path: Path, now: float) -> bool:
    try:
        return now - path.lstat().st_mtime > STALE_AFTER
    except OSError:
        return False


def _is_stale(entry: Path, now: float) -> bool:
    pid = scratch_owner(entry.name)
    return not _alive(pid) if pid is not None else _older(entry, now)


def _leftovers(lib: Library, referenced: dict[Store, set[str]]) -> list[Problem]:
    """Scratch of dead processes: store and server tmp/ and trash/, and journaled outputs' scratch. A
    trashed object that a row still references (its removal was killed before it committed) is reported
    as ``trashed``: gc puts it back."""
    found: list[Problem] = []
    now = time.time()
    for store, refs in referenced.items():
        for folder in (store.tmp, store.trash_dir):
            if not folder.is_dir():
                continue
            for entry in sorted(folder.iterdir()):
                if not _is_stale(entry, now):
                    continue
                digest = entry.name.split(".")[0]
                if folder == store.trash_dir and digest in refs and not store.has(digest):
                    found.append(
                        Problem("trashed", str(entry), "a removal that never committed took this object")
                    )
                else:
                    found.append(
                        Problem("leftover", str(entry), "scratch of a process that is gone", _size(entry))
                    )
    work = lib.home / "work"
    if work.is_dir():
        for entry in sorted(work.glob("*.json")):
            pid = scratch_owner("x-" + entry.name)
            if _alive(pid):
                continue
            try:
                out = Path(json.loads(entry.read_text())["out"])
            except (OSError, ValueError, KeyError, TypeError):
                out = None
            if out is not None and out.parent.is_dir():
                for scratch in sorted(out.parent.glob(f".{out.name}.tmp-*")) + sorted(
                    out.parent.glob(f".{out.name}.old-*")
                ):
                    found.append(
                        Problem("leftover", str(scratch), f"unfinished output of {out}", _size(scratch))
                    )
            found.append(Problem("leftover", str(entry), "journal of a process that is gone", _size(entry)))
    return found


def check(lib: Library, *, verify: bool = True) -> CheckReport:
    """Every row's files present (and, with ``verify``, matching their sha256), objects no row
    references, leftovers of killed runs, values JSON cannot hold, and the database's own check."""
    from ..catalog import health

    problems: list[Problem] = []
    with lib.catalog.read() as conn:
        files = health.adapter_files(conn)
        server_refs = health.server_digests(conn)
        problems += [Problem("database", "catalog", msg) for msg in health.integrity(conn)]
        problems += [Problem("value", name, msg) for name, msg in health.non_finite(conn)]
    referenced = {d for _, _, d in files}
    server = Store(lib.home / "server")
    leftovers = _leftovers(lib, {lib.store: referenced, server: server_refs})
    trashed = {Path(p.subject).name.split(".")[0] for p in leftovers if p.kind == "trashed"}
    checked = 0
    for name, filename, digest in files:
        checked += 1
        path = lib.store.path(digest)
        if digest in trashed:
            continue  # reported with the trash entry it can be restored from
        if not path.is_file():
            problems.append(Problem("missing", name, f"stored file {filename} ({digest[:12]}) is missing"))
        elif verify and not lib.store.verify(digest):
            problems.append(
                Problem("corrupt", name, f"stored file {filename} ({digest[:12]}) does not match its sha256")
            )
    for digest in lib.store:
        if digest not in referenced:
            path = lib.store.path(digest)
            problems.append(
                Problem("orphan", str(path), "no catalog row references this object", _size(path))
            )
    now = time.time()
    for digest in server:  # an upload waits a while for the commit that references it
        path = server.path(digest)
        if digest not in server_refs and _older(path, now):
            problems.append(
                Problem("orphan", str(path), "no hosted repo references this object", _size(path))
            )
    for digest in sorted(server_refs):
        if not server.has(digest) and digest not in trashed:
            problems.append(Problem("missing", "server", f"a hosted repo's file {digest[:12]} is missing"))
    problems += leftovers
    return CheckReport(problems=tuple(problems), files_checked=checked, verified=verify)


def gc(lib: Library, *, dry_run: bool = True) -> GcReport:
    """Remove orphaned objects and dead runs' leftovers (nothing a row references or a live process is
    writing). Orphans are re-checked under the catalog's write lock before they go."""
    from ..catalog import health

    report = check(lib, verify=False)
    candidates = [p for p in report.problems if p.kind in ("orphan", "leftover", "trashed")]
    removed: list[Problem] = []
    if dry_run:
        return GcReport(items=tuple(candidates), dry_run=True)
    orphans = [p for p in candidates if p.kind == "orphan"]
    if orphans:
        with lib.catalog.write() as conn:  # an add that committed meanwhile keeps its objects
            keep = {d for _, _, d in health.adapter_files(conn)} | health.server_digests(conn)
            for p in orphans:
                path = Path(p.subject)
                digest = path.parent.name + path.name
                if digest in keep:
                    continue
                path.unlink(missing_ok=True)
                removed.append(p)
    for p in candidates:
        if p.kind == "trashed":
            path = Path(p.subject)
            owner = lib.store if path.parent == lib.store.trash_dir else Store(lib.home / "server")
            owner.restore(path, path.name.split(".")[0])
            removed.append(p)
            continue
        if p.kind != "leftover":
            continue
        path = Path(p.subject)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(p)
    return GcReport(items=tuple(removed), dry_run=False)
