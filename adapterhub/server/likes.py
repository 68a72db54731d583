"""Who likes which repo: one small JSON file per user (``HOME/server/likes/<user>.json``: repo key -> when),
so that a like follows its repo through a move and goes with it when it is deleted."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..store import scratch_prefix
from .records import Repo, iso, utcnow
from .storage import ServerStore


class Likes:
    def __init__(self, store: ServerStore) -> None:
        self.store = store
        self.root = store.blobs.root / "likes"

    def _file(self, user: str) -> Path:
        return self.root / f"{user}.json"

    def _load(self, user: str) -> dict[str, str]:
        try:
            return {str(k): str(v) for k, v in json.loads(self._file(user).read_text()).items()}
        except FileNotFoundError:
            return {}

    def _save(self, user: str, likes: dict[str, str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=scratch_prefix("likes"))
        with os.fdopen(fd, "w") as f:
            json.dump(likes, f)
        os.replace(tmp, self._file(user))

    def like(self, user: str, repo: Repo) -> None:
        likes = self._load(user)
        likes.setdefault(self.store.repo_key(repo), iso(utcnow()))
        self._save(user, likes)

    def unlike(self, user: str, repo: Repo) -> None:
        likes = self._load(user)
        if likes.pop(self.store.repo_key(repo), None) is not None:
            self._save(user, likes)

    def liked(self, user: str, viewer: str | None) -> list[tuple[Repo, str]]:
        """The repos ``user`` likes that ``viewer`` may see, newest like first, with when."""
        likes = self._load(user)
        seen = {self.store.repo_key(r): r for r, _ in self.store.visible_repos(viewer)}
        found = [(seen[k], at) for k, at in likes.items() if k in seen]
        return sorted(found, key=lambda pair: pair[1], reverse=True)

    def likers(self, repo: Repo) -> list[str]:
        key = self.store.repo_key(repo)
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.json") if key in self._load(p.stem))
