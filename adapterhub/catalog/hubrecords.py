"""The server's records (tokens, repos, commits, file entries, commit operations) as frozen dataclasses,
and the few pure helpers they need: timestamps and git object ids. The catalog's hub modules return them;
`adapterhub.server.records` re-exports them for the server."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Any


def utcnow() -> dt.datetime:
    """Now, in UTC, as the naive datetime the catalog stores."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def iso(value: dt.datetime) -> str:
    """A catalog datetime as the Hub writes it: ``2026-12-01T10:00:00.000Z``."""
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class TokenInfo:
    id: int
    user: str
    write: bool
    created_at: str
    last_used_at: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user": self.user,
            "role": "write" if self.write else "read",
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
        }


@dataclass(frozen=True)
class Repo:
    id: int
    namespace: str
    name: str
    private: bool
    created_at: dt.datetime
    updated_at: dt.datetime

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Commit:
    id: int
    oid: str
    parent_oid: str | None
    title: str
    message: str
    author: str | None
    card: dict[str, Any] | None
    created_at: dt.datetime


@dataclass(frozen=True)
class Entry:
    path: str
    size: int
    blob_oid: str
    sha256: str
    lfs: bool

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_oid


@dataclass(frozen=True)
class Op:
    """One line of a commit: ``file`` (content), ``lfs`` (an uploaded object), ``delete`` (a file, or a
    folder when no file has that path) or ``delete_folder``."""

    kind: str
    path: str
    content: bytes | None = None
    oid: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class Ref:
    """A branch (``refs/heads/NAME``), a tag (``refs/tags/NAME``) or a pull request's branch (``refs/pr/N``)
    and the commit it points at."""

    name: str
    kind: str  # "branch" | "tag" | "pr"
    commit_oid: str

    @property
    def ref(self) -> str:
        if self.kind == "pr":
            return self.name  # refs/pr/N
        return f"refs/{'heads' if self.kind == 'branch' else 'tags'}/{self.name}"
