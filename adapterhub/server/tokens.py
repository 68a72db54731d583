"""The server's access tokens: made once, shown once, kept only as their sha256 (in the catalog:
`adapterhub.catalog.hubtokens`). The CLI's ``token`` commands call `create_token`, `list_tokens` and
`revoke_token` with the home's `Hub`."""

from __future__ import annotations

import hashlib
import secrets
from typing import TYPE_CHECKING

from ..catalog import Catalog
from ..catalog.hubtokens import TokenRows
from ..errors import BadRequestError, TokenError
from .checks import check_name
from .records import TokenInfo

if TYPE_CHECKING:
    from ..hub import Hub
    from ..remote.results import NewToken

__all__ = ["TOKEN_PREFIX", "Tokens", "create_token", "hash_token", "list_tokens", "revoke_token"]

TOKEN_PREFIX = "ahub_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Tokens:
    """Create, list, revoke and check tokens in one catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self.rows = TokenRows(catalog)

    def create(self, user: str, *, write: bool = False) -> tuple[str, TokenInfo]:
        """A new token for ``user``; the token itself is returned once and only its sha256 is kept."""
        try:
            check_name("user name", user)
        except BadRequestError as exc:
            raise TokenError(exc.message) from None
        token = TOKEN_PREFIX + secrets.token_urlsafe(30)
        return token, self.rows.insert(user, hash_token(token), write=write)

    def list(self, *, user: str | None = None) -> list[TokenInfo]:
        return self.rows.list(user=user)

    def revoke(self, token_or_id: str) -> TokenInfo:
        """Revoke by the id `token list` shows, or by the token itself."""
        if token_or_id.isdigit():
            info = self.rows.delete(token_id=int(token_or_id))
        else:
            info = self.rows.delete(token_hash=hash_token(token_or_id))
        if info is None:
            raise TokenError("no such token; `adapterhub token list` shows the ids of the tokens there are")
        return info

    def authenticate(self, token: str) -> TokenInfo | None:
        return self.rows.find(hash_token(token))


def create_token(hub: Hub, user: str, *, write: bool = False) -> NewToken:
    """A token for the server of ``hub``'s home; returned once, stored only as its sha256."""
    from ..remote.results import NewToken

    token, info = Tokens(hub.catalog).create(user, write=write)
    return NewToken(token, info.id, info.user, info.write)


def list_tokens(hub: Hub, *, user: str | None = None) -> list[TokenInfo]:
    return Tokens(hub.catalog).list(user=user)


def revoke_token(hub: Hub, token_or_id: str) -> TokenInfo:
    return Tokens(hub.catalog).revoke(token_or_id)
