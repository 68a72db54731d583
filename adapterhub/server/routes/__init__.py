"""The server's routers, one per part of the Hub API; `adapterhub.server.app` mounts them in order.

Routes take the rest of a path with ``{rest:anypath}``: Starlette's ``path``, but matching control
characters too (a percent-encoded newline in a file name must reach its route and get the Hub's
EntryNotFound, not fall through to a bare 404). The routes re-split the raw path themselves, so that a
percent-encoded '/' in a revision stays inside it.
"""

from __future__ import annotations

from starlette.convertors import Convertor, register_url_convertor


class _AnyPath(Convertor[str]):
    """Like Starlette's ``path``, but matching control characters too (a percent-encoded newline in a
    file name must reach its route and get the Hub's EntryNotFound, not fall through to a bare 404)."""

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anypath", _AnyPath())
