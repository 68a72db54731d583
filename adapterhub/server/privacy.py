"""Which cataloged adapters a caller may see: one rule for the web pages and the inference API.

A cataloged adapter tagged ``private`` is listed, shown and served only to a token that may read it: for
a name ``owner/...``, a token of user ``owner``; for a name without a namespace, any token of this
server. Everything else in the catalog is public to whoever can reach the server.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .records import TokenInfo

PRIVATE_TAG = "private"


def is_private(tags: Iterable[str] | None) -> bool:
    return PRIVATE_TAG in (tags or ())


def may_see(name: str, private: bool, token: TokenInfo | None) -> bool:
    """Whether ``token`` (None: nobody logged in) may see the adapter ``name`` (see the module docstring)."""
    if not private:
        return True
    if token is None:
        return False
    owner, sep, _ = name.partition("/")
    return not sep or token.user == owner
