"""`RemoteMixin`: the sharing half of the `Hub` API (push, pull, search a Hub; serve one; its tokens).

Imports nothing heavy: huggingface_hub, FastAPI and SQLAlchemy load inside the methods.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .._hubcore import HubCore
from .results import NewToken, PullResult, PushRecord, PushResult, RemoteAdapter

if TYPE_CHECKING:
    from ..server.storage import ServerStore, TokenInfo


class RemoteMixin(HubCore):
    """Methods of `Hub` that talk to a Hub-compatible server, or are one."""

    # ------------------------------------------------------------------ client
    def push_adapter(
        self,
        name: str,
        repo_id: str,
        *,
        private: bool = False,
        revision: str | None = None,
        message: str | None = None,
        endpoint: str | None = None,
        token: str | None = None,
        progress: bool = False,
    ) -> PushResult:
        """Upload a cataloged adapter to ``repo_id`` (created if missing): its PEFT files, a model card and
        ``adapterhub.json``. An unchanged adapter makes no new commit. The push is recorded in the catalog.

        ``endpoint`` defaults to ``$HF_ENDPOINT``, else huggingface.co; ``token`` to ``$HF_TOKEN``, else
        huggingface_hub's stored login.
        """
        from .push import push_adapter

        return push_adapter(
            self,  # type: ignore[arg-type]
            name,
            repo_id,
            private=private,
            revision=revision,
            message=message,
            endpoint=endpoint,
            token=token,
            progress=progress,
        )

    def pull_adapter(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        name: str | None = None,
        endpoint: str | None = None,
        token: str | None = None,
        allow_pickle: bool = False,
        progress: bool = False,
    ) -> PullResult:
        """Download an adapter from ``repo_id`` (``"user/repo"`` or ``"user/repo@revision"``), check every file
        against the server's hashes, validate it and catalog it with source ``repo@commit``. Pulling a commit
        that is already cataloged is a no-op."""
        from .pull import pull_adapter

        spec = repo_id if revision is None else f"{repo_id.split('@', 1)[0]}@{revision}"
        return pull_adapter(
            self,  # type: ignore[arg-type]
            spec,
            name=name,
            endpoint=endpoint,
            token=token,
            allow_pickle=allow_pickle,
            progress=progress,
        )

    def search_hub(
        self,
        query: str | None = None,
        *,
        base: str | None = None,
        endpoint: str | None = None,
        token: str | None = None,
        limit: int = 50,
    ) -> list[RemoteAdapter]:
        """Adapter repos on a Hub: PEFT models whose id matches ``query``, optionally for one base model."""
        from .search import search_hub

        return search_hub(query, base=base, endpoint=endpoint, token=token, limit=limit)

    def adapter_pushes(self, name: str) -> list[PushRecord]:
        """Where and at which commit an adapter was pushed, oldest first."""
        from sqlalchemy import select

        from ..catalog import queries
        from ..catalog.tables import remote_pushes
        from ..errors import AdapterNotFoundError

        with self.catalog.read() as conn:
            adapter_id = queries.find_id(conn, name)
            if adapter_id is None:
                raise AdapterNotFoundError(name)
            rows = conn.execute(
                select(remote_pushes)
                .where(remote_pushes.c.adapter_id == adapter_id)
                .order_by(remote_pushes.c.id)
            ).all()
        return [
            PushRecord(
                name,
                r.endpoint,
                r.repo_id,
                r.revision,
                r.commit_oid,
                r.commit_url,
                r.pushed_at.replace(microsecond=0).isoformat() + "Z",
            )  # fmt: skip
            for r in rows
        ]

    # ------------------------------------------------------------------ server
    def create_token(self, user: str, *, write: bool = False) -> NewToken:
        """A token for this home's server; returned once, stored only as its sha256."""
        token, info = self._server_store().create_token(user, write=write)
        return NewToken(token, info.id, info.user, info.write)

    def list_tokens(self, *, user: str | None = None) -> list[TokenInfo]:
        return self._server_store().list_tokens(user=user)

    def revoke_token(self, token_or_id: str) -> TokenInfo:
        return self._server_store().revoke_token(token_or_id)

    def serve(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        ready: Callable[[str], None] | None = None,
        log_level: str = "warning",
    ) -> None:
        """Run the Hub-compatible server on this home until interrupted (needs the ``serve`` extra)."""
        from ..server import serve

        serve(self.catalog, self.home, host=host, port=port, ready=ready, log_level=log_level)

    def _server_store(self) -> ServerStore:
        from ..server import server_store

        return server_store(self.catalog, self.home)
