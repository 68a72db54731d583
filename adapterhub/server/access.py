"""Access requests to gated repos: who the owner let read a gated repo's files (``accepted``), turned
down (``rejected``) or has yet to decide on (``pending``). One small JSON file per repo beside its gate
(``HOME/server/gated/<repo key>.access.json``), written whole through a temporary file."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadRequestError, ConflictError
from ..store import scratch_prefix
from .checks import check_name
from .records import Repo, iso, utcnow
from .storage import ServerStore

STATUSES = ("pending", "accepted", "rejected")


@dataclass(frozen=True)
class AccessRequest:
    user: str
    request_id: str
    status: str
    timestamp: str
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "user": {"user": self.user, "fullname": self.user},
            "requestId": self.request_id,
            "status": self.status,
            "timestamp": self.timestamp,
        }
        if self.reason:
            d["rejectionReason"] = self.reason
        return d


class AccessRequests:
    def __init__(self, store: ServerStore) -> None:
        self.store = store

    def _file(self, repo: Repo) -> Path:
        return self.store.blobs.root / "gated" / f"{self.store.repo_key(repo)}.access.json"

    def _load(self, repo: Repo) -> dict[str, AccessRequest]:
        try:
            raw = json.loads(self._file(repo).read_text())
        except FileNotFoundError:
            return {}
        return {u: AccessRequest(**r) for u, r in raw.items()}

    def _save(self, repo: Repo, requests: dict[str, AccessRequest]) -> None:
        path = self._file(repo)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=scratch_prefix("access"))
        with os.fdopen(fd, "w") as f:
            json.dump({u: r.__dict__ for u, r in requests.items()}, f)
        os.replace(tmp, path)

    def list(self, repo: Repo, status: str) -> list[AccessRequest]:
        if status not in STATUSES:
            raise BadRequestError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
        return [r for r in self._load(repo).values() if r.status == status]

    def accepted(self, repo: Repo, user: str) -> bool:
        r = self._load(repo).get(user)
        return r is not None and r.status == "accepted"

    def grant(self, repo: Repo, user: str) -> AccessRequest:
        """Let ``user`` read the repo's files without a request of theirs."""
        check_name("user name", user)
        requests = self._load(repo)
        if user in requests and requests[user].status == "accepted":
            raise ConflictError(f"{user} already has access to {repo.repo_id}")
        r = AccessRequest(user, secrets.token_hex(12), "accepted", iso(utcnow()))
        requests[user] = r
        self._save(repo, requests)
        return r

    def handle(self, repo: Repo, user: str, status: str, reason: str | None) -> AccessRequest:
        """Move ``user``'s request to ``status`` (``pending`` cancels an acceptance or a rejection)."""
        if status not in STATUSES:
            raise BadRequestError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
        requests = self._load(repo)
        old = requests.get(user)
        if old is None:
            raise BadRequestError(f"{user} has no access request for {repo.repo_id}; grant access instead")
        if old.status == status:
            raise BadRequestError(f"the access request of {user} is already {status}")
        requests[user] = AccessRequest(user, old.request_id, status, iso(utcnow()),
                                       reason if status == "rejected" else None)  # fmt: skip
        self._save(repo, requests)
        return requests[user]

    def drop(self, repo: Repo) -> None:
        self._file(repo).unlink(missing_ok=True)
