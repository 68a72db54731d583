"""Web pages beside the API: ``/`` (hosted repos and the catalog), ``/{owner}/{name}`` (a hosted repo),
``/{owner}/{name}/raw/{path}`` (one of its files, read with the login cookie), ``/adapters/{name}``
(a cataloged adapter), ``/bases/{name}`` (a registered base and the adapters that fit it),
``/leaderboard`` and ``/leaderboard/{dataset}`` (evaluation results), ``/login`` and ``/logout``, and ``/static/...`` (this
package's own CSS, script and icon; nothing comes from another site).

Pages see exactly what the API shows the same token: the login form keeps the token in an HttpOnly,
SameSite=Strict cookie and every page resolves it through `ServerStore.authenticate`.

`mount_pages` adds them to an app made by `adapterhub.server.create_app`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ...errors import ForbiddenError
from ..records import TokenInfo
from .adapter import adapter_body
from .base import base_body
from .html import render
from .index import index_body
from .layout import message_page, page
from .leaderboard import datasets_body, leaderboard_body
from .listing import Listing
from .raw import raw_file
from .repo import repo_body
from .security import (
    CSRF_FIELD,
    csrf_token,
    finish,
    html_response,
    login_cookie,
    logout_cookie,
    page_user,
    read_form,
    redirect,
    safe_next,
)
from .state import store_of

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ...hub import Hub

__all__ = ["mount_pages", "router"]

STATIC = Path(__file__).parent / "static"
ASSETS = {
    "style.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

router = APIRouter()
READ = ["GET", "HEAD"]


@router.api_route("/static/{asset}", methods=READ, include_in_schema=False)
async def static(request: Request, asset: str) -> Response:
    kind = ASSETS.get(asset)
    if kind is None:
        return html_response(request, message_page(request, "Not found", "No such file.", None), status=404)
    data = await run_in_threadpool((STATIC / asset).read_bytes)
    response = finish(request, Response(data, media_type=kind))
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response


@router.api_route("/", methods=READ, include_in_schema=False)
async def index(request: Request) -> Response:
    started = time.perf_counter()
    user = await page_user(request)
    body = await index_body(request, user)
    return html_response(request, page(request, "Adapters", body, user), started=started)


def login_form(request: Request, next_: str, error: str | None = None) -> str:
    return page(
        request,
        "Log in",
        render(
            '<h1>Log in</h1>{err}<form class="login" method="post" action="/login">'
            '<input type="hidden" name="{field}" value="{csrf}"><input type="hidden" name="next" value="{next}">'
            '<label for="token">Access token</label><input id="token" name="token" type="password" required '
            'autocomplete="current-password" spellcheck="false">'
            '<p class="muted">A token of this server (<code>adapterhub token create USER</code>). It is kept in a '
            'cookie scripts cannot read, sent only to this server.</p><button type="submit">Log in</button></form>',
            err=render('<p class="notice" role="alert">{e}</p>', e=error) if error else "",
            field=CSRF_FIELD,
            csrf=csrf_token(request),
            next=next_,
        ),
        None,
    )


@router.api_route("/login", methods=READ, include_in_schema=False)
async def login_page(request: Request) -> Response:
    return html_response(request, login_form(request, safe_next(request.query_params.get("next"))))


@router.post("/login", include_in_schema=False)
async def login(request: Request) -> Response:
    try:
        form = await read_form(request)
    except ForbiddenError as exc:
        return html_response(request, login_form(request, "/", str(exc)), status=403)
    token = form.get("token", "").strip()
    next_ = safe_next(form.get("next"))
    info = (
        await run_in_threadpool(store_of(request).tokens.authenticate, token)
        if 0 < len(token) <= 512
        else None
    )
    if info is None:
        return html_response(request, login_form(request, next_, "That token is not valid here."), status=401)
    response = redirect(request, next_)
    login_cookie(request, response, token)
    return response


@router.post("/logout", include_in_schema=False)
async def logout(request: Request) -> Response:
    try:
        await read_form(request)
    except ForbiddenError as exc:
        user = await page_user(request)
        return html_response(request, message_page(request, "Not logged out", str(exc), user), status=403)
    response = redirect(request, "/")
    logout_cookie(response)
    return response


def not_found(request: Request, user: TokenInfo | None, what: str) -> Response:
    text = f"There is no {what} here, or you may not see it" + (" (log in?)." if user is None else ".")
    return html_response(request, message_page(request, "Not found", text, user), status=404)


@router.api_route("/adapters/{name:path}", methods=READ, include_in_schema=False)
async def adapter(request: Request, name: str) -> Response:
    started = time.perf_counter()
    user = await page_user(request)
    found = await adapter_body(request, name, user)
    if found is None:
        if name.count("/") == 0:  # a hosted repo in a namespace called "adapters"
            shown = await repo_body(request, "adapters", name, user)
            if shown is not None:
                return html_response(request, page(request, shown[0], shown[1], user), started=started)
        return not_found(request, user, f"adapter called {name!r}")
    return html_response(request, page(request, found[0], found[1], user), started=started)


@router.api_route("/bases/{name:path}", methods=READ, include_in_schema=False)
async def base(request: Request, name: str) -> Response:
    started = time.perf_counter()
    user = await page_user(request)
    found = await base_body(request, name, user)
    if found is None:
        if name.count("/") == 0:  # a hosted repo in a namespace called "bases"
            shown = await repo_body(request, "bases", name, user)
            if shown is not None:
                return html_response(request, page(request, shown[0], shown[1], user), started=started)
        return not_found(request, user, f"base model called {name!r}")
    return html_response(request, page(request, found[0], found[1], user), started=started)


@router.api_route("/leaderboard", methods=READ, include_in_schema=False)
async def leaderboards(request: Request) -> Response:
    started = time.perf_counter()
    user = await page_user(request)
    title, body = await datasets_body(request, user)
    return html_response(request, page(request, title, body, user), started=started)


@router.api_route("/leaderboard/{dataset}", methods=READ, include_in_schema=False)
async def leaderboard(request: Request, dataset: str) -> Response:
    started = time.perf_counter()
    user = await page_user(request)
    found = await leaderboard_body(request, dataset, user)
    if found is None:
        shown = await repo_body(request, "leaderboard", dataset, user)  # a hosted repo in that namespace
        if shown is not None:
            return html_response(request, page(request, shown[0], shown[1], user), started=started)
        return not_found(request, user, f"evaluation result on {dataset!r}")
    return html_response(request, page(request, found[0], found[1], user), started=started)


@router.api_route("/{owner}/{name}/raw/{path:path}", methods=READ, include_in_schema=False)
async def raw(request: Request, owner: str, name: str, path: str) -> Response:
    user = await page_user(request)
    found = await raw_file(request, owner, name, path, user)
    return found if found is not None else not_found(request, user, f"file {path!r} in {owner}/{name}")


@router.api_route("/{owner}/{name}", methods=READ, include_in_schema=False)
async def repo(request: Request, owner: str, name: str) -> Response:
    started = time.perf_counter()
    user = await page_user(request)
    shown = await repo_body(request, owner, name, user)
    if shown is None:
        return not_found(request, user, f"repo {owner}/{name}")
    return html_response(request, page(request, shown[0], shown[1], user), started=started)


def mount_pages(app: FastAPI, hub: Hub) -> None:
    """Serve the pages from ``app`` over the catalog of ``hub`` (an `adapterhub.Hub`): its routes go after
    the API's and before the app's final catch-all."""
    app.state.hub = hub
    getattr(hub, "catalog", None)  # open the catalog now, not in two request threads at once
    app.state.pages_listing = Listing()
    before = list(app.router.routes)
    app.include_router(router)
    added = app.router.routes[len(before) :]
    catch_all = next(
        (i for i, r in enumerate(before) if getattr(r, "path", None) == "/{rest:anypath}"), len(before)
    )
    app.router.routes[:] = before[:catch_all] + added + before[catch_all:]
