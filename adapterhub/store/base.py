"""The interface every blob store has, and what the backends share.

A store keeps files under their sha256 (content-addressed), writes each object once and atomically, and
has a local folder of its own (``root``) for scratch (``tmp/``) on the same file system as the callers'
temporary files. `path` gives a local file with an object's content: the object itself for the local
folder, a sha256-checked copy in a local cache for object storage.
"""

from __future__ import annotations

import abc
import hashlib
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InvalidAdapterError, StoreError

if TYPE_CHECKING:
    from ..formats.safetensors_header import SafetensorsHeader

CHUNK = 4 * 1024 * 1024

#: scratch without a live writer to ask about is a leftover once it is this old (seconds)
STALE_AFTER = 3600

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


def scratch_prefix(kind: str) -> str:
    """The name prefix of a scratch file or folder this process makes (``in-1234-``): `db gc` tells from
    the process id whether its writer is still alive."""
    return f"{kind}-{os.getpid()}-"


def scratch_owner(name: str) -> int | None:
    """The process id a scratch name was made with (`scratch_prefix`, or a trashed ``digest.pid.x``)."""
    parts = name.replace(".", "-").split("-")
    for p in parts[1:3]:
        if p.isdigit():
            return int(p)
    return None


def pid_alive(pid: int | None) -> bool:
    """Whether process ``pid`` of this machine is running (this one always is)."""
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


def host_tag() -> str:
    """This machine's name, safe inside an object key (a trashed object names the machine that moved it,
    so a pid is only ever looked up on the machine it belongs to)."""
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"


def check_digest(sha256: str) -> str:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise StoreError(f"not a sha256 digest: {sha256!r}")
    return sha256


@dataclass(frozen=True)
class StoredFile:
    sha256: str
    size: int
    created: bool  # False when the store already held this content


@dataclass(frozen=True)
class Scratch:
    """Something a writer left in a store: a file or folder in ``tmp/``, a trashed object, an unfinished
    multipart upload. ``digest`` is the object a trash entry holds; ``stale`` says its writer is gone."""

    subject: str  # a local path or an s3:// address
    size: int
    stale: bool
    digest: str | None = None
    handle: object = None  # what `BlobStore.restore` / `BlobStore.discard` take


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tree_size(path: Path) -> int:
    try:
        if path.is_dir() and not path.is_symlink():
            return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
        return path.lstat().st_size
    except OSError:
        return 0


def older_than(path: Path, seconds: float, now: float | None = None) -> bool:
    try:
        return (now or time.time()) - path.lstat().st_mtime > seconds
    except OSError:
        return False


class BlobStore(abc.ABC):
    """Content-addressed blobs. ``root`` is a local folder of the store's own (scratch, caches)."""

    root: Path

    @property
    def tmp(self) -> Path:
        """Local scratch: callers write a file here and hand it to `commit`."""
        return self.root / "tmp"

    @property
    def trash_dir(self) -> Path:
        return self.root / "trash"

    @property
    def location(self) -> str:
        """Where the objects live, for messages (a folder or an ``s3://`` address)."""
        return str(self.root)

    @property
    def is_local(self) -> bool:
        """True when `path` is the object itself, not a fetched copy."""
        return True

    @abc.abstractmethod
    def child(self, name: str) -> BlobStore:
        """A store of its own beside this one's objects (``root/name`` locally, ``prefix/name/`` in a
        bucket), on the same backend."""

    @abc.abstractmethod
    def has(self, sha256: str) -> bool: ...

    @abc.abstractmethod
    def size(self, sha256: str) -> int | None:
        """The object's size in bytes; None when it is absent."""

    @abc.abstractmethod
    def path(self, sha256: str) -> Path:
        """A local file holding the object (for object storage a sha256-checked cached copy, fetched on
        first use); raises `StoreError` if the object is missing."""

    @abc.abstractmethod
    def put_file(
        self,
        src: str | os.PathLike[str],
        *,
        digest: str | None = None,
        size: int | None = None,
        progress: Progress | None = None,
    ) -> StoredFile:
        """Copy ``src`` into the store, hashing it on the way. ``digest`` and ``size``, when given, were
        checked by the caller, which also owns ``src``."""

    @abc.abstractmethod
    def put_bytes(self, data: bytes) -> StoredFile: ...

    @abc.abstractmethod
    def commit(self, tmp_name: str, digest: str, size: int) -> StoredFile:
        """Make a complete file ``tmp_name`` (in ``tmp/``) object ``digest``; the scratch file is gone
        afterwards either way."""

    @abc.abstractmethod
    def read_range(self, sha256: str, start: int, length: int) -> bytes:
        """``length`` bytes of the object from ``start`` (fewer at its end), reading no more than that."""

    @abc.abstractmethod
    def remove(self, sha256: str) -> None: ...

    @abc.abstractmethod
    def trash(self, sha256: str) -> object | None:
        """Take an object out of the store in a way `restore` can undo and `purge` finishes; None if
        the object is absent."""

    @abc.abstractmethod
    def restore(self, trashed: object, sha256: str) -> None: ...

    @abc.abstractmethod
    def purge(self, trashed: Iterable[object]) -> None: ...

    @abc.abstractmethod
    def copy_out(
        self, sha256: str, dest: str | os.PathLike[str], *, progress: Progress | None = None
    ) -> Path:
        """Write the object to ``dest`` (through ``dest.tmp``, renamed into place when complete)."""

    @abc.abstractmethod
    def verify(self, sha256: str) -> bool:
        """Whether the object is present and its content has its sha256 (reads it all)."""

    @abc.abstractmethod
    def listing(self) -> Iterator[tuple[str, int, float]]:
        """Every object as (digest, size, modification time), in digest order."""

    def __iter__(self) -> Iterator[str]:
        for digest, _, _ in self.listing():
            yield digest

    def cached(self) -> Iterator[tuple[str, Path]]:
        """Local copies of objects (object storage keeps a cache; a folder needs none)."""
        return iter(())

    @abc.abstractmethod
    def object_name(self, sha256: str) -> str:
        """The object's address, for messages and reports (a path or an ``s3://`` address)."""

    def leftovers(self, *, now: float | None = None) -> list[Scratch]:
        """What writers left in ``tmp/`` and the trash, stale or not."""
        now = now or time.time()
        found: list[Scratch] = []
        for folder in (self.tmp, self.trash_dir):
            if not folder.is_dir():
                continue
            for entry in sorted(folder.iterdir()):
                pid = scratch_owner(entry.name)
                stale = not pid_alive(pid) if pid is not None else older_than(entry, STALE_AFTER, now)
                digest = entry.name.split(".")[0] if folder == self.trash_dir else None
                found.append(Scratch(str(entry), tree_size(entry), stale, digest, entry))
        return found

    def discard(self, item: Scratch) -> None:
        """Delete a piece of scratch that `leftovers` found."""
        import shutil

        path = item.handle
        if isinstance(path, Path):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def safetensors_header(self, sha256: str) -> SafetensorsHeader:
        """A stored safetensors file's header, read with two range reads (never the tensor data)."""
        import struct

        from ..formats.safetensors_header import MAX_HEADER_BYTES, parse_header

        name = self.object_name(sha256)
        size = self.size(sha256)
        if size is None:
            raise StoreError(f"store object {sha256} is missing from {self.location}")
        head = self.read_range(sha256, 0, 8)
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (size,)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise InvalidAdapterError(f"{name}: not a safetensors file (header length {n} of {size} bytes)")
        return parse_header(self.read_range(sha256, 8, n), file_size=size, path=name)
