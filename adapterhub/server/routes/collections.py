"""``/api/collections``: create, list, get, update, delete collections and their items."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ...errors import UnauthorizedError
from ..deps import auth, may_read, read_json, server
from ..records import TokenInfo

router = APIRouter()
BASE = "/api/collections"


def _user(tok: TokenInfo | None) -> str:
    if tok is None:
        raise UnauthorizedError("Authentication required: send a token to manage collections")
    return tok.user


def _may_see_model(request: Request, tok: TokenInfo | None) -> Callable[[str], bool]:
    """Whether ``tok`` may see a model repo by id (one not hosted here is not ours to hide)."""
    store = server(request).store

    def visible(repo_id: str) -> bool:
        ns, _, name = repo_id.partition("/")
        repo = store.repos.get_repo(ns, name) if ns and name else None
        return repo is None or may_read(repo, tok)

    return visible


@router.get(BASE)
async def list_collections(request: Request, tok: TokenInfo | None = Depends(auth)) -> JSONResponse:
    owner = request.query_params.get("owner")
    found = await run_in_threadpool(
        server(request).collections.listing, owner, tok.user if tok else None, _may_see_model(request, tok)
    )
    item = request.query_params.get("item")  # "models/ns/name" (the Hub's spelling) or "ns/name"
    if item:
        wanted = item.split("/", 1)[1] if item.count("/") >= 2 else item
        found = [c for c in found if any(i["id"] == wanted for i in c["items"])]
    # the client numbers the listing itself (Collection(position=..., **each)): no position of ours
    return JSONResponse([{k: v for k, v in c.items() if k != "position"} for c in found])


@router.post(BASE)
async def create(request: Request, tok: TokenInfo | None = Depends(auth)) -> JSONResponse:
    user = _user(tok)
    body = await read_json(request)
    return JSONResponse(await run_in_threadpool(server(request).collections.create, user, body))


@router.api_route(BASE + "/{owner}/{slug}", methods=["GET", "PATCH", "DELETE"])
async def one(request: Request, owner: str, slug: str, tok: TokenInfo | None = Depends(auth)) -> JSONResponse:
    c = server(request).collections
    full = f"{owner}/{slug}"
    if request.method == "GET":
        viewer = tok.user if tok else None
        return JSONResponse(await run_in_threadpool(c.get, full, viewer, _may_see_model(request, tok)))
    user = _user(tok)
    if request.method == "DELETE":
        await run_in_threadpool(c.delete, full, user)
        return JSONResponse({})
    body = await read_json(request)
    return JSONResponse({"data": await run_in_threadpool(c.update, full, user, body)})


@router.post(BASE + "/{owner}/{slug}/items")
async def add_item(
    request: Request, owner: str, slug: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    user = _user(tok)
    body = await read_json(request)
    return JSONResponse(
        await run_in_threadpool(server(request).collections.add_item, f"{owner}/{slug}", user, body)
    )


@router.api_route(BASE + "/{owner}/{slug}/items/{item_id}", methods=["PATCH", "DELETE"])
async def item(
    request: Request, owner: str, slug: str, item_id: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    user = _user(tok)
    c = server(request).collections
    if request.method == "DELETE":
        return JSONResponse(await run_in_threadpool(c.delete_item, f"{owner}/{slug}", user, item_id))
    body = await read_json(request)
    return JSONResponse(await run_in_threadpool(c.update_item, f"{owner}/{slug}", user, item_id, body))
