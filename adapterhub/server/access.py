"""Access requests to gated repos: who the owner let read a gated repo's files (``accepted``), turned
down (``rejected``) or has yet to decide on (``pending``). Rows of the catalog
(`adapterhub.catalog.hubgates`), one per repo and user."""

from __future__ import annotations

import secrets

from ..catalog.hubgates import STATUSES, AccessRequest, GateRows
from ..errors import BadRequestError
from .checks import check_name
from .records import Repo

__all__ = ["STATUSES", "AccessRequest", "AccessRequests"]


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise BadRequestError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")


class AccessRequests:
    def __init__(self, rows: GateRows) -> None:
        self.rows = rows

    def list(self, repo: Repo, status: str) -> list[AccessRequest]:
        _check_status(status)
        return self.rows.requests(repo, status)

    def accepted(self, repo: Repo, user: str) -> bool:
        r = self.rows.request_of(repo, user)
        return r is not None and r.status == "accepted"

    def grant(self, repo: Repo, user: str) -> AccessRequest:
        """Let ``user`` read the repo's files without a request of theirs."""
        check_name("user name", user)
        return self.rows.grant(repo, user, secrets.token_hex(12))

    def handle(self, repo: Repo, user: str, status: str, reason: str | None) -> AccessRequest:
        """Move ``user``'s request to ``status`` (``pending`` cancels an acceptance or a rejection)."""
        _check_status(status)
        return self.rows.handle(repo, user, status, reason)
