"""The server's access tokens in the catalog, kept only as their sha256 (the server makes and hashes
them: `adapterhub.server.tokens`), and the key that signs its LFS upload URLs and Xet access tokens (one
for every server on the catalog, so that a URL one replica signs, another accepts)."""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import delete, insert, select, update

from . import Catalog
from .hubrecords import TokenInfo, iso, utcnow
from .tables import hub_settings, hub_tokens

__all__ = ["SIGNING_KEY", "TokenRows"]

LAST_USED_RESOLUTION_S = 60
SIGNING_KEY = "signing_key"


def _tok(r: Any) -> TokenInfo:
    return TokenInfo(
        r.id,
        r.user,
        bool(r.write),
        iso(r.created_at)[:19] + "Z",
        iso(r.last_used_at)[:19] + "Z" if r.last_used_at else None,
    )


class TokenRows:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def insert(self, user: str, token_hash: str, *, write: bool) -> TokenInfo:
        now = utcnow().replace(microsecond=0)
        with self.catalog.write() as conn:
            tid = conn.execute(
                insert(hub_tokens)
                .values(user=user, token_hash=token_hash, write=write, created_at=now)
                .returning(hub_tokens.c.id)
            ).scalar_one()
            row = conn.execute(select(hub_tokens).where(hub_tokens.c.id == tid)).one()
        return _tok(row)

    def list(self, *, user: str | None = None) -> list[TokenInfo]:
        stmt = select(hub_tokens).order_by(hub_tokens.c.id)
        if user is not None:
            stmt = stmt.where(hub_tokens.c.user == user)
        with self.catalog.read() as conn:
            return [_tok(r) for r in conn.execute(stmt)]

    def delete(self, *, token_id: int | None = None, token_hash: str | None = None) -> TokenInfo | None:
        """Remove the token of that id (or hash); None when there is none."""
        cond = hub_tokens.c.id == token_id if token_id is not None else hub_tokens.c.token_hash == token_hash
        with self.catalog.write() as conn:
            row = conn.execute(select(hub_tokens).where(cond)).first()
            if row is None:
                return None
            conn.execute(delete(hub_tokens).where(hub_tokens.c.id == row.id))
        return _tok(row)

    def find(self, token_hash: str) -> TokenInfo | None:
        """The token of that hash, noting its use (to the minute)."""
        with self.catalog.read() as conn:
            row = conn.execute(select(hub_tokens).where(hub_tokens.c.token_hash == token_hash)).first()
        if row is None:
            return None
        now = utcnow().replace(microsecond=0)
        if row.last_used_at is None or (now - row.last_used_at).total_seconds() > LAST_USED_RESOLUTION_S:
            with self.catalog.write() as conn:
                conn.execute(update(hub_tokens).where(hub_tokens.c.id == row.id).values(last_used_at=now))
        return _tok(row)

    def signing_key(self) -> bytes:
        """The servers' signing key: made (32 random bytes) by the first server that asks, in one
        transaction, and the same for every server on this catalog after."""
        with self.catalog.read() as conn:
            found = conn.execute(
                select(hub_settings.c.value).where(hub_settings.c.name == SIGNING_KEY)
            ).scalar()
        if found is None:
            with self.catalog.write() as conn:
                found = conn.execute(
                    select(hub_settings.c.value).where(hub_settings.c.name == SIGNING_KEY)
                ).scalar()
                if found is None:
                    found = secrets.token_hex(32)
                    conn.execute(insert(hub_settings).values(name=SIGNING_KEY, value=found))
        return bytes.fromhex(found)
