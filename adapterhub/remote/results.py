"""What push, pull and search return (frozen dataclasses, no huggingface_hub types)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..records import AdapterInfo


@dataclass(frozen=True)
class PushResult:
    name: str
    repo_id: str
    endpoint: str
    revision: str
    commit: str
    commit_url: str
    changed: bool  # False when the repo already held exactly these files (no new commit)
    private: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "repo_id": self.repo_id,
            "endpoint": self.endpoint,
            "revision": self.revision,
            "commit": self.commit,
            "commit_url": self.commit_url,
            "changed": self.changed,
            "private": self.private,
        }


@dataclass(frozen=True)
class PullResult:
    adapter: AdapterInfo
    repo_id: str
    endpoint: str
    commit: str
    changed: bool  # False when this commit was already cataloged (nothing downloaded)
    files: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        return f"{self.repo_id}@{self.commit}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "endpoint": self.endpoint,
            "commit": self.commit,
            "source": self.source,
            "changed": self.changed,
            "files": list(self.files),
            "adapter": self.adapter.to_dict(),
        }


@dataclass(frozen=True)
class RemoteAdapter:
    """An adapter repo found on a Hub by `search_hub`."""

    repo_id: str
    base_model: str | None
    tags: tuple[str, ...] = ()
    private: bool = False
    last_modified: str | None = None
    downloads: int | None = None
    likes: int | None = None
    sha: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "base_model": self.base_model,
            "tags": list(self.tags),
            "private": self.private,
            "last_modified": self.last_modified,
            "downloads": self.downloads,
            "likes": self.likes,
            "sha": self.sha,
        }


@dataclass(frozen=True)
class NewToken:
    """A token made by `create_token`: ``token`` is shown once and stored only as a hash."""

    token: str
    id: int
    user: str
    write: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "id": self.id,
            "user": self.user,
            "role": "write" if self.write else "read",
        }

    def __repr__(self) -> str:  # never print the token by accident
        return f"NewToken(id={self.id}, user={self.user!r}, write={self.write}, token='***')"
