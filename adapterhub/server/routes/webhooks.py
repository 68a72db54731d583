"""``/api/settings/webhooks``: the caller's webhooks (list, create, get, update, enable, disable, delete)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ...errors import UnauthorizedError
from ..deps import auth, read_json, server
from ..records import TokenInfo

router = APIRouter()
BASE = "/api/settings/webhooks"


def _user(tok: TokenInfo | None) -> str:
    if tok is None:
        raise UnauthorizedError("Authentication required: send a token to manage webhooks")
    return tok.user


@router.get(BASE)
async def list_hooks(request: Request, tok: TokenInfo | None = Depends(auth)) -> JSONResponse:
    return JSONResponse(await run_in_threadpool(server(request).webhooks.of_user, _user(tok)))


@router.post(BASE)
async def create(request: Request, tok: TokenInfo | None = Depends(auth)) -> JSONResponse:
    user = _user(tok)
    body = await read_json(request)
    return JSONResponse({"webhook": await run_in_threadpool(server(request).webhooks.create, user, body)})


@router.api_route(BASE + "/{hook_id}", methods=["GET", "POST", "DELETE"])
async def one(request: Request, hook_id: str, tok: TokenInfo | None = Depends(auth)) -> Response:
    user = _user(tok)
    hooks = server(request).webhooks
    if request.method == "DELETE":
        await run_in_threadpool(hooks.delete, user, hook_id)
        return JSONResponse({})
    if request.method == "POST":
        body = await read_json(request)
        return JSONResponse({"webhook": await run_in_threadpool(hooks.update, user, hook_id, body)})
    return JSONResponse({"webhook": await run_in_threadpool(hooks.get, user, hook_id)})


@router.post(BASE + "/{hook_id}/{action}")
async def switch(
    request: Request, hook_id: str, action: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    user = _user(tok)
    if action not in ("enable", "disable"):
        return JSONResponse({"error": f"no such action: {action}"}, status_code=404)
    hook = await run_in_threadpool(server(request).webhooks.set_disabled, user, hook_id, action == "disable")
    return JSONResponse({"webhook": hook})
