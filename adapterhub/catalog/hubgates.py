"""Who may reach what on the server, in the catalog: gated repos (``auto`` or ``manual``) and the access
requests to them, proofs that a user uploaded an object to a repo (what lets a commit reference it), and
the Xet xorbs each repo and each user sent. Rows of a repo go with it (ON DELETE CASCADE)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, select, update

from ..errors import BadRequestError, ConflictError
from . import Catalog
from .hubrecords import Repo, iso, utcnow
from .tables import hub_access_requests, hub_gates, hub_repo_xorbs, hub_upload_proofs, hub_user_xorbs

__all__ = ["AccessRequest", "GateRows", "STATUSES"]

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


def _request(r: Any) -> AccessRequest:
    return AccessRequest(r.user, r.request_id, r.status, iso(r.updated_at), r.reason)


def proof_user(repo: Repo, user: str | None) -> str:
    """The owner's proofs (and user-less ones) are the repo's; another user's (a pull request's author)
    are his own."""
    return "" if user is None or user == repo.namespace else user


class GateRows:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    # ------------------------------------------------------------------ gates
    def gate(self, repo: Repo) -> str | None:
        with self.catalog.read() as conn:
            return conn.execute(select(hub_gates.c.mode).where(hub_gates.c.repo_id == repo.id)).scalar()

    def set_gate(self, repo: Repo, mode: str | None) -> None:
        with self.catalog.write() as conn:
            conn.execute(delete(hub_gates).where(hub_gates.c.repo_id == repo.id))
            if mode is not None:
                conn.execute(insert(hub_gates).values(repo_id=repo.id, mode=mode))

    # ------------------------------------------------------------------ access requests
    def requests(self, repo: Repo, status: str) -> list[AccessRequest]:
        with self.catalog.read() as conn:
            rows = conn.execute(
                select(hub_access_requests)
                .where(hub_access_requests.c.repo_id == repo.id, hub_access_requests.c.status == status)
                .order_by(hub_access_requests.c.updated_at, hub_access_requests.c.user)
            )
            return [_request(r) for r in rows]

    def request_of(self, repo: Repo, user: str) -> AccessRequest | None:
        with self.catalog.read() as conn:
            r = conn.execute(
                select(hub_access_requests).where(
                    hub_access_requests.c.repo_id == repo.id, hub_access_requests.c.user == user
                )
            ).first()
        return _request(r) if r else None

    def grant(self, repo: Repo, user: str, request_id: str) -> AccessRequest:
        """Let ``user`` read the repo's files (an accepted request, made or changed)."""
        now = utcnow()
        with self.catalog.write() as conn:
            where = (hub_access_requests.c.repo_id == repo.id) & (hub_access_requests.c.user == user)
            old = conn.execute(select(hub_access_requests).where(where)).first()
            if old is not None and old.status == "accepted":
                raise ConflictError(f"{user} already has access to {repo.repo_id}")
            conn.execute(delete(hub_access_requests).where(where))
            conn.execute(
                insert(hub_access_requests).values(
                    repo_id=repo.id,
                    user=user,
                    request_id=request_id,
                    status="accepted",
                    reason=None,
                    updated_at=now,
                )
            )
            return _request(conn.execute(select(hub_access_requests).where(where)).one())

    def handle(self, repo: Repo, user: str, status: str, reason: str | None) -> AccessRequest:
        """Move ``user``'s request to ``status`` (``pending`` cancels an acceptance or a rejection)."""
        with self.catalog.write() as conn:
            where = (hub_access_requests.c.repo_id == repo.id) & (hub_access_requests.c.user == user)
            old = conn.execute(select(hub_access_requests).where(where)).first()
            if old is None:
                raise BadRequestError(
                    f"{user} has no access request for {repo.repo_id}; grant access instead"
                )
            if old.status == status:
                raise BadRequestError(f"the access request of {user} is already {status}")
            conn.execute(
                update(hub_access_requests)
                .where(where)
                .values(status=status, updated_at=utcnow(), reason=reason if status == "rejected" else None)
            )
            return _request(conn.execute(select(hub_access_requests).where(where)).one())

    # ------------------------------------------------------------------ upload proofs
    def record_upload(self, repo: Repo, sha256: str, user: str | None) -> None:
        key = proof_user(repo, user)
        with self.catalog.write() as conn:
            found = conn.execute(
                select(hub_upload_proofs.c.sha256).where(
                    hub_upload_proofs.c.repo_id == repo.id,
                    hub_upload_proofs.c.user == key,
                    hub_upload_proofs.c.sha256 == sha256,
                )
            ).first()
            if found is None:
                conn.execute(insert(hub_upload_proofs).values(repo_id=repo.id, user=key, sha256=sha256))

    def uploaded(self, repo: Repo, user: str | None, sha256: str) -> bool:
        with self.catalog.read() as conn:
            return (
                conn.execute(
                    select(hub_upload_proofs.c.sha256).where(
                        hub_upload_proofs.c.repo_id == repo.id,
                        hub_upload_proofs.c.user == proof_user(repo, user),
                        hub_upload_proofs.c.sha256 == sha256,
                    )
                ).first()
                is not None
            )

    # ------------------------------------------------------------------ Xet xorbs
    def record_xorb(self, repo: Repo, user: str, xorb: str, sha256: str) -> bool:
        """Note that ``user`` sent ``xorb`` (stored as ``sha256``) to ``repo``: always the user's record, and
        the repo's when the user owns it. True when the user had no record of that xorb before."""
        with self.catalog.write() as conn:
            where = (hub_user_xorbs.c.user == user) & (hub_user_xorbs.c.xorb == xorb)
            new = conn.execute(select(hub_user_xorbs.c.sha256).where(where)).first() is None
            conn.execute(delete(hub_user_xorbs).where(where))
            conn.execute(insert(hub_user_xorbs).values(user=user, xorb=xorb, sha256=sha256))
            if user == repo.namespace:
                rwhere = (hub_repo_xorbs.c.repo_id == repo.id) & (hub_repo_xorbs.c.xorb == xorb)
                conn.execute(delete(hub_repo_xorbs).where(rwhere))
                conn.execute(insert(hub_repo_xorbs).values(repo_id=repo.id, xorb=xorb, sha256=sha256))
        return new

    def xorb_digests(self, repo: Repo, user: str, xorb: str, others: Iterable[Repo]) -> list[str]:
        """The stored digests ``xorb`` has as a commit to ``repo`` by ``user`` may use them, best first:
        the user's own record, the repo's (when the user owns it), then those of ``others`` in order."""
        order = [r.id for r in others]
        with self.catalog.read() as conn:
            out = list(
                conn.execute(
                    select(hub_user_xorbs.c.sha256).where(
                        hub_user_xorbs.c.user == user, hub_user_xorbs.c.xorb == xorb
                    )
                ).scalars()
            )
            ids = ([repo.id] if user == repo.namespace else []) + order
            if ids:
                held = dict(
                    conn.execute(
                        select(hub_repo_xorbs.c.repo_id, hub_repo_xorbs.c.sha256).where(
                            hub_repo_xorbs.c.xorb == xorb, hub_repo_xorbs.c.repo_id.in_(ids)
                        )
                    ).all()
                )
                out += [held[i] for i in ids if i in held]
        return out
