"""The server's access tokens: made once, shown once, kept only as their sha256."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from sqlalchemy import delete, insert, select, update

from ..catalog import Catalog
from ..catalog.tables import hub_tokens
from ..errors import BadRequestError, TokenError
from .checks import check_name
from .records import TokenInfo, iso, utcnow

TOKEN_PREFIX = "ahub_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _tok(r: Any) -> TokenInfo:
    return TokenInfo(
        r.id,
        r.user,
        bool(r.write),
        iso(r.created_at)[:19] + "Z",
        iso(r.last_used_at)[:19] + "Z" if r.last_used_at else None,
    )


class Tokens:
    """Create, list, revoke and check tokens in one catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def create(self, user: str, *, write: bool = False) -> tuple[str, TokenInfo]:
        """A new token for ``user``; the token itself is returned once and only its sha256 is kept."""
        try:
            check_name("user name", user)
        except BadRequestError as exc:
            raise TokenError(exc.message) from None
        token = TOKEN_PREFIX + secrets.token_urlsafe(30)
        now = utcnow().replace(microsecond=0)
        with self.catalog.write() as conn:
            tid = conn.execute(
                insert(hub_tokens)
                .values(user=user, token_hash=hash_token(token), write=write, created_at=now)
                .returning(hub_tokens.c.id)
            ).scalar_one()
            row = conn.execute(select(hub_tokens).where(hub_tokens.c.id == tid)).one()
        return token, _tok(row)

    def list(self, *, user: str | None = None) -> list[TokenInfo]:
        stmt = select(hub_tokens).order_by(hub_tokens.c.id)
        if user is not None:
            stmt = stmt.where(hub_tokens.c.user == user)
        with self.catalog.read() as conn:
            return [_tok(r) for r in conn.execute(stmt)]

    def revoke(self, token_or_id: str) -> TokenInfo:
        """Revoke by the id `token list` shows, or by the token itself."""
        cond = (
            hub_tokens.c.id == int(token_or_id)
            if token_or_id.isdigit()
            else hub_tokens.c.token_hash == hash_token(token_or_id)
        )
        with self.catalog.write() as conn:
            row = conn.execute(select(hub_tokens).where(cond)).first()
            if row is None:
                raise TokenError(
                    "no such token; `adapterhub token list` shows the ids of the tokens there are"
                )
            conn.execute(delete(hub_tokens).where(hub_tokens.c.id == row.id))
        return _tok(row)

    def authenticate(self, token: str) -> TokenInfo | None:
        h = hash_token(token)
        with self.catalog.read() as conn:
            row = conn.execute(select(hub_tokens).where(hub_tokens.c.token_hash == h)).first()
        if row is None:
            return None
        now = utcnow().replace(microsecond=0)
        if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
            with self.catalog.write() as conn:
                conn.execute(update(hub_tokens).where(hub_tokens.c.id == row.id).values(last_used_at=now))
        return _tok(row)
