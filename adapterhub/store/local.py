"""The local folder store (the default): every file kept once, under its sha256.

Layout under the store root: ``objects/ab/cdef...`` (the first two hex digits make a folder),
``tmp/`` for files being written and ``trash/`` for objects being removed. A file is hashed while it is
copied (one read), written to ``tmp/`` and renamed into place with `os.replace`, so an object is either
complete or absent. Removal is two-phase: `trash` renames an object out of ``objects/`` inside the
catalog transaction that stops referencing it (so `restore` can undo it if that transaction fails), and
`purge` deletes it after the commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from .. import faults
from ..errors import StoreError
from .base import (
    CHUNK,
    BlobStore,
    Progress,
    StoredFile,
    check_digest,
    scratch_prefix,
    sha256_file,
)


def _copy_with_progress(src: Path, dest: Path, progress: Progress) -> None:
    total = src.stat().st_size
    done = 0
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        while chunk := fin.read(CHUNK):
            fout.write(chunk)
            done += len(chunk)
            progress(done, total)


class LocalStore(BlobStore):
    """Objects as read-only files under ``root/objects/``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"

    def child(self, name: str) -> LocalStore:
        return LocalStore(self.root / name)

    def object_name(self, sha256: str) -> str:
        return str(self.path(sha256))

    def _ensure(self) -> None:
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        """Where object ``sha256`` is (or would be): callers check it is there."""
        check_digest(sha256)
        return self.objects / sha256[:2] / sha256[2:]

    def size(self, sha256: str) -> int | None:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def read_range(self, sha256: str, start: int, length: int) -> bytes:
        try:
            with open(self.path(sha256), "rb") as f:
                f.seek(start)
                return f.read(length)
        except FileNotFoundError:
            raise StoreError(f"store object {sha256} is missing from {self.objects}") from None

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put_file(
        self,
        src: str | os.PathLike[str],
        *,
        digest: str | None = None,
        size: int | None = None,
        progress: Progress | None = None,
    ) -> StoredFile:
        """Copy ``src`` into the store, hashing it on the way.

        With ``digest`` (and ``size``) already verified by the caller, which also owns ``src`` (a download
        in the store's ``tmp/``), the file is hard-linked in without a second read where it can be.
        """
        self._ensure()
        if digest is not None and size is not None:
            if self.has(digest):
                return StoredFile(digest, size, created=False)
            tmp_name = str(self.tmp / f"{scratch_prefix('in')}{uuid.uuid4().hex}")
            try:
                os.link(src, tmp_name)
            except OSError:
                shutil.copyfile(src, tmp_name)
            return self.commit(tmp_name, digest, size)
        h = hashlib.sha256()
        size = 0
        total = os.stat(src).st_size
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix=scratch_prefix("in"))
        try:
            with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
                buf = bytearray(CHUNK)
                view = memoryview(buf)
                while n := fin.readinto(buf):
                    h.update(view[:n])
                    fout.write(view[:n])
                    size += n
                    if progress is not None:
                        progress(size, total)
                    faults.point("add.copying")
            return self.commit(tmp_name, h.hexdigest(), size)
        except BaseException:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
            raise

    def put_bytes(self, data: bytes) -> StoredFile:
        self._ensure()
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix=scratch_prefix("in"))
        try:
            with os.fdopen(fd, "wb") as fout:
                fout.write(data)
            return self.commit(tmp_name, hashlib.sha256(data).hexdigest(), len(data))
        except BaseException:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
            raise

    def commit(self, tmp_name: str, digest: str, size: int) -> StoredFile:
        """Rename a complete, checked file ``tmp_name`` into place as object ``digest``."""
        dest = self.path(digest)
        if dest.is_file():
            os.unlink(tmp_name)
            return StoredFile(digest, size, created=False)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp_name, 0o444)
        os.replace(tmp_name, dest)
        return StoredFile(digest, size, created=True)

    def remove(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(sha256).unlink()

    def trash(self, sha256: str) -> Path | None:
        """Move an object out of ``objects/`` (undo with `restore`, finish with `purge`); None if absent."""
        self.path(sha256)
        self.trash_dir.mkdir(parents=True, exist_ok=True)
        dest = self.trash_dir / f"{sha256}.{os.getpid()}.{uuid.uuid4().hex[:12]}"
        try:
            os.replace(self.path(sha256), dest)
        except FileNotFoundError:
            return None
        return dest

    def restore(self, trashed: object, sha256: str) -> None:
        dest = self.path(sha256)
        src = Path(str(trashed))
        if dest.is_file():
            src.unlink(missing_ok=True)
        else:
            os.replace(src, dest)

    def purge(self, trashed: Iterable[object]) -> None:
        for t in trashed:
            with contextlib.suppress(FileNotFoundError):
                Path(str(t)).unlink()

    def copy_out(
        self, sha256: str, dest: str | os.PathLike[str], *, progress: Progress | None = None
    ) -> Path:
        src = self.path(sha256)
        if not src.is_file():
            raise StoreError(
                f"store object {sha256} is missing from {self.objects}; the store was changed by hand"
            )
        out = Path(dest)
        tmp = out.with_name(out.name + ".tmp")
        try:
            if progress is None:
                shutil.copyfile(src, tmp)
            else:
                _copy_with_progress(src, tmp, progress)
        except OSError as exc:  # the failing side is the destination (a full disk, a size limit)
            tmp.unlink(missing_ok=True)
            raise OSError(exc.errno, exc.strerror, str(out)) from None
        os.replace(tmp, out)
        return out

    def verify(self, sha256: str) -> bool:
        p = self.path(sha256)
        return p.is_file() and sha256_file(p) == sha256

    def listing(self) -> Iterator[tuple[str, int, float]]:
        if not self.objects.is_dir():
            return
        for sub in sorted(self.objects.iterdir()):
            for f in sorted(sub.iterdir()):
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                yield sub.name + f.name, st.st_size, st.st_mtime


#: the name the local store has always had
Store = LocalStore
