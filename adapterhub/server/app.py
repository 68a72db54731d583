"""The Hub-compatible HTTP API (FastAPI): the routers of `adapterhub.server.routes` over one
`ServerStore`, and the one place where domain errors become the Hub's HTTP error shapes.

It speaks what the huggingface_hub client calls: whoami, repo create/delete/settings, model
info and listing, tree, paths-info, refs (branches and tags) and commits, preupload, the git-LFS batch
API (upload by ``PUT`` to a signed URL, then verify), the Xet upload protocol (a write token, then xorbs
and shards; see `adapterhub.server.routes.xet`), NDJSON commits, ``resolve`` (HEAD/GET with ranges)
and ``validate-yaml``. A private repo is a 404 to anyone but its owner.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import AdapterHubError, CatalogError, EndpointNotFoundError, RepoError, StoreError
from .deps import Server
from .routes import (
    access,
    auth,
    collections,
    commit,
    discussions,
    files,
    lfs,
    likes,
    models,
    repos,
    webhooks,
    xet,
)
from .storage import ServerStore

log = logging.getLogger(__name__)


def header_safe(value: str, limit: int = 1000) -> str:
    """``value`` as an HTTP header value: printable ASCII only (control characters escaped, others '?'),
    at most ``limit`` characters. A raw NUL or newline in a header would make the server drop the reply."""
    out = []
    for ch in value[:limit]:
        o = ord(ch)
        if 0x20 <= o < 0x7F:
            out.append(ch)
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\x{o:02x}")
        else:
            out.append("?")
    return "".join(out)


def error_response(exc: AdapterHubError) -> JSONResponse:
    """A domain error in the Hub's shape: JSON ``{"error": message}``, ``X-Error-Code`` (the type the
    client raises, e.g. ``RepoNotFound``) and ``X-Error-Message``. A `RepoError` carries its status; a
    damaged store or catalog is the server's fault (500); any other `AdapterHubError` is a 400."""
    if isinstance(exc, RepoError):
        status, code, message, extra = exc.status, exc.code, exc.message, exc.headers
    else:
        status = 500 if isinstance(exc, (StoreError, CatalogError)) else 400
        code, message, extra = None, str(exc), {}
    if status >= 500:
        log.error("%s", message)
    headers = {k: header_safe(v) for k, v in extra.items()}
    if code:
        headers["X-Error-Code"] = code
    headers["X-Error-Message"] = header_safe(message)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _on_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AdapterHubError)
    return error_response(exc)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (no route: 404, wrong method: 405) in the same shape, through the same
    mapping. A handler rather than a catch-all route, so that routers mounted later still match."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return error_response(EndpointNotFoundError(f"no such endpoint: {request.method} {request.url.path}"))
    err = RepoError(f"{exc.detail}: {request.method} {request.url.path}")
    err.status = exc.status_code
    return error_response(err)


class RequestIdMiddleware:
    """Every reply carries an ``X-Request-Id`` (the client quotes it in its error messages)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = f"Root=1-{uuid.uuid4().hex}".encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid)]
            await send(message)

        await self.app(scope, receive, send_with_id)


def create_app(store: ServerStore) -> FastAPI:
    """The server's app over ``store``; it signs LFS upload URLs and Xet tokens with the catalog's key, so
    that every replica on that catalog accepts them."""
    app = FastAPI(title="adapterhub server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = Server(store)
    app.add_exception_handler(AdapterHubError, _on_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_middleware(RequestIdMiddleware)
    # order matters: models.py ends with its catch-all for /api/models/..., after commit's routes
    for module in (
        auth,
        repos,
        commit,
        lfs,
        xet,
        access,
        likes,
        discussions,
        webhooks,
        collections,
        models,
        files,
    ):
        app.include_router(module.router)
    return app
