"""Access requests of gated repos, for their owner: list by status, accept / reject / cancel (``handle``),
and ``grant`` access to a user outright. An accepted user may download the repo's files."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ...errors import BadRequestError
from ..deps import auth, read_json, server, writable
from ..records import Repo, TokenInfo

router = APIRouter()
BASE = "/api/models/{ns}/{name}/user-access-request"


async def _gated(request: Request, ns: str, name: str, tok: TokenInfo | None) -> Repo:
    repo = await writable(request, ns, name, tok)
    if not await run_in_threadpool(server(request).store.gates.gated, repo):
        raise BadRequestError(f"{repo.repo_id} is not gated: update its settings with gated='auto' first")
    return repo


@router.get(BASE + "/{status}")
async def list_requests(
    request: Request, ns: str, name: str, status: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    repo = await _gated(request, ns, name, tok)
    found = await run_in_threadpool(server(request).access.list, repo, status)
    return JSONResponse([r.to_dict() for r in found])


@router.post(BASE + "/handle")
async def handle(request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)) -> JSONResponse:
    repo = await _gated(request, ns, name, tok)
    body = await read_json(request)
    user = body.get("user") if isinstance(body, dict) else None
    status = body.get("status") if isinstance(body, dict) else None
    reason = body.get("rejectionReason") if isinstance(body, dict) else None
    if not isinstance(user, str) or not isinstance(status, str) or not isinstance(reason, (str, type(None))):
        raise BadRequestError("give {user, status: pending | accepted | rejected, rejectionReason}")
    r = await run_in_threadpool(server(request).access.handle, repo, user, status, reason)
    return JSONResponse(r.to_dict())


@router.post(BASE + "/grant")
async def grant(request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)) -> JSONResponse:
    repo = await _gated(request, ns, name, tok)
    body = await read_json(request)
    user = body.get("user") if isinstance(body, dict) else None
    if not isinstance(user, str):
        raise BadRequestError("give {user}")
    r = await run_in_threadpool(server(request).access.grant, repo, user)
    return JSONResponse(r.to_dict())
