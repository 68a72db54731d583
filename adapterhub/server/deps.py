"""What every route shares: the server's state, the caller's token, visibility and write checks, bodies
read under a limit, JSON parsed off the event loop, query integers, and the raw path split so that a
percent-encoded '/' (``refs%2Fpr%2F1``) stays inside one part."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ..catalog.hubsocial import CollectionRows, LikeRows, WebhookRows
from ..catalog.hubthreads import ThreadRows
from ..errors import (
    BadRequestError,
    ForbiddenError,
    PayloadTooLargeError,
    RepoError,
    RepoNotFoundError,
    UnauthorizedError,
)
from .access import AccessRequests
from .checks import is_name, loads
from .collections import Collections
from .discussions import Discussions
from .likes import Likes
from .records import Repo, TokenInfo
from .storage import ServerStore
from .webhooks import Webhooks
from .xetstore import XetStore

JSON_LIMIT = 16 * 1024 * 1024
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


@dataclass
class Server:
    """What one running app works on: its store (repos, commits, tokens, gates), the social state
    (discussions, collections, likes, webhooks: all in the catalog), its Xet objects and the key that
    signs LFS upload URLs and Xet access tokens. Nothing here is state of its own: replicas on one
    catalog and one store agree."""

    store: ServerStore
    secret: bytes = b""  # the catalog's signing key, unless given
    xet: XetStore = field(init=False)
    access: AccessRequests = field(init=False)
    likes: Likes = field(init=False)
    discussions: Discussions = field(init=False)
    webhooks: Webhooks = field(init=False)
    collections: Collections = field(init=False)

    def __post_init__(self) -> None:
        catalog = self.store.catalog
        if not self.secret:
            self.secret = self.store.tokens.rows.signing_key()
        self.xet = XetStore(self.store)
        self.access = AccessRequests(self.store.gate_rows)
        self.likes = Likes(LikeRows(catalog), self.store.repos)
        self.discussions = Discussions(ThreadRows(catalog), self.store.repos)
        self.webhooks = Webhooks(WebhookRows(catalog))
        self.collections = Collections(CollectionRows(catalog))


def server(request: Request) -> Server:
    state: Server = request.app.state.server
    return state


async def auth(request: Request) -> TokenInfo | None:
    """The caller's token, None when the request carries none; a bad token is a 401."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise UnauthorizedError(INVALID_CREDENTIALS)
    info = await run_in_threadpool(server(request).store.tokens.authenticate, token)
    if info is None:
        raise UnauthorizedError(INVALID_CREDENTIALS)
    return info


def may_read(repo: Repo, tok: TokenInfo | None) -> bool:
    return not repo.private or (tok is not None and tok.user == repo.namespace)


async def visible(request: Request, ns: str, name: str, tok: TokenInfo | None) -> Repo:
    """The repo, if the caller may read it; else RepoNotFound (a private repo is not revealed)."""
    if not is_name(ns) or not is_name(name):
        raise RepoNotFoundError(f"{ns}/{name}")
    repo = await run_in_threadpool(server(request).store.repos.get_repo, ns, name)
    if repo is None or not may_read(repo, tok):
        raise RepoNotFoundError(f"{ns}/{name}")
    return repo


async def downloadable(request: Request, ns: str, name: str, tok: TokenInfo | None) -> Repo:
    """The repo, if the caller may read its files: a gated repo's files are for its owner and the users
    whose access request the owner accepted (or who were granted access); others get the Hub's GatedRepo
    error."""
    repo = await visible(request, ns, name, tok)
    if tok is not None and tok.user == repo.namespace:
        return repo
    srv = server(request)
    if await run_in_threadpool(srv.store.gates.gated, repo) and not (
        tok is not None and await run_in_threadpool(srv.access.accepted, repo, tok.user)
    ):
        err: RepoError = (ForbiddenError if tok is not None else UnauthorizedError)(
            f"Access to model {repo.repo_id} is restricted and you are not in the authorized list: ask "
            f"{repo.namespace} to grant you access"
        )
        err.code = "GatedRepo"
        raise err
    return repo


async def writable(request: Request, ns: str, name: str, tok: TokenInfo | None) -> Repo:
    repo = await visible(request, ns, name, tok)
    check_write(tok, repo.namespace)
    return repo


async def writable_for(request: Request, ns: str, name: str, tok: TokenInfo | None, revision: str) -> Repo:
    """The repo, if the caller may write ``revision`` of it: its owner anything; with ``create_pr`` (a new
    pull request) anyone with a token who can read it; a pull request's branch ``refs/pr/N`` its author
    too, while it is open."""
    if request.query_params.get("create_pr") in ("1", "true", "True") or revision.startswith("refs/pr/"):
        repo = await visible(request, ns, name, tok)
        if tok is None:
            check_write(tok, repo.namespace)
        assert tok is not None
        if tok.user == repo.namespace or revision in ("", "None") or not revision.startswith("refs/pr/"):
            if tok.user == repo.namespace:
                check_write(tok, repo.namespace)
            elif not tok.write:
                raise ForbiddenError(
                    "This token is read-only: create a write token (adapterhub token create USER --write)"
                )
            return repo
        num = revision[len("refs/pr/") :]
        d = await run_in_threadpool(server(request).discussions.get, repo, int(num) if num.isdigit() else -1)
        if d["author"]["name"] != tok.user or d["status"] != "open" or not tok.write:
            raise ForbiddenError(
                f"only the author of open pull request {num} or {repo.namespace} may push to it"
            )
        return repo
    return await writable(request, ns, name, tok)


def check_write(tok: TokenInfo | None, ns: str) -> TokenInfo:
    if tok is None:
        raise UnauthorizedError(
            "Authentication required: send a write token of the namespace owner "
            "(adapterhub token create USER --write)"
        )
    if tok.user != ns:
        raise ForbiddenError(f"You don't have the rights to write to {ns}: your token belongs to {tok.user}")
    if not tok.write:
        raise ForbiddenError(
            "This token is read-only: create a write token (adapterhub token create USER --write)"
        )
    return tok


def raw_parts(request: Request, skip: int) -> list[str]:
    """The request path split on '/' before percent-decoding, less its first ``skip`` parts."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    parts = raw.decode("latin-1").split("?", 1)[0].split("/")[1:]
    return [unquote(p) for p in parts[skip:]]


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


async def read_body(request: Request, limit: int, what: str) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLargeError(what, limit)
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise PayloadTooLargeError(what, limit)
    return bytes(buf)


async def read_json(request: Request, limit: int = JSON_LIMIT) -> Any:
    body = await read_body(request, limit, "the request body")
    return await run_in_threadpool(loads, body or b"{}", "the request body")


async def read_form_or_json(request: Request) -> dict[str, list[str]] | Any:
    """A form-encoded body as ``{key: [values]}`` (what the client sends to paths-info), else JSON."""
    if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        body = await read_body(request, JSON_LIMIT, "the request body")
        try:
            return parse_qs(body.decode(), keep_blank_values=True, max_num_fields=10_000)
        except (UnicodeDecodeError, ValueError):
            raise BadRequestError("the form body is not valid") from None
    return await read_json(request)


def query_int(request: Request, name: str, default: int, *, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequestError(f"{name} must be an integer, not {raw!r}") from None
    if not low <= value <= high:
        raise BadRequestError(f"{name} must be between {low} and {high}, not {value}")
    return value


def query_flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "").lower() in ("1", "true")
