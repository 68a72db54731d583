"""Discussions and pull requests: open, list (by type, status, author), details, comment, edit and hide
comments, rename, open/close, merge. Anyone who can read a repo and has a token may open a thread and
comment; its author or the repo's owner may rename or close it; the owner merges."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ...errors import BadRequestError, UnauthorizedError
from ..deps import auth, base_url, query_int, read_json, server, visible
from ..discussions import details, summary
from ..records import Repo, TokenInfo
from ..webhooks import repo_payload

router = APIRouter()
BASE = "/api/models/{ns}/{name}/discussions"
PAGE = 50


async def _caller(request: Request, ns: str, name: str, tok: TokenInfo | None) -> tuple[Repo, str]:
    repo = await visible(request, ns, name, tok)
    if tok is None:
        raise UnauthorizedError("Authentication required: send a token to take part in discussions")
    return repo, tok.user


async def _notify(request: Request, repo: Repo, num: int, action: str, scope: str) -> None:
    d = await run_in_threadpool(server(request).discussions.get, repo, num)
    payload = repo_payload(repo, base_url(request), action, scope, discussion=summary(d))
    await run_in_threadpool(server(request).webhooks.notify, repo, "discussion", payload)


async def _body(request: Request) -> dict[str, Any]:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequestError("give a JSON object")
    return body


@router.post(BASE)
async def create(request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)) -> JSONResponse:
    repo, user = await _caller(request, ns, name, tok)
    body = await _body(request)
    d = await run_in_threadpool(
        lambda: server(request).discussions.create(
            repo, user, body.get("title"), body.get("description"), pull_request=bool(body.get("pullRequest"))
        )
    )
    await _notify(request, repo, d["num"], "create", "discussion")
    return JSONResponse(summary(d))


@router.get(BASE)
async def listing(
    request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    repo = await visible(request, ns, name, tok)
    q = request.query_params
    kind, status, author = q.get("type", "all"), q.get("status", "all"), q.get("author")
    found = await run_in_threadpool(server(request).discussions.list, repo)
    found = [
        d
        for d in found
        if (kind == "all" or d["isPullRequest"] == (kind == "pull_request"))
        and (status == "all" or d["status"] == status)
        and (not author or d["author"]["name"] == author)
    ]
    page = query_int(request, "p", 0, low=0, high=10**6)
    shown = found[page * PAGE : (page + 1) * PAGE]
    return JSONResponse(
        {
            "discussions": [summary(d) for d in shown],
            "count": len(found),
            "start": page * PAGE,
            "numClosedDiscussions": sum(d["status"] != "open" for d in found),
        }
    )


@router.get(BASE + "/{num}")
async def get(
    request: Request, ns: str, name: str, num: int, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    repo = await visible(request, ns, name, tok)
    return JSONResponse(details(await run_in_threadpool(server(request).discussions.get, repo, num)))


@router.post(BASE + "/{num}/comment")
async def comment(
    request: Request, ns: str, name: str, num: int, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    repo, user = await _caller(request, ns, name, tok)
    body = await _body(request)
    e = await run_in_threadpool(server(request).discussions.comment, repo, num, user, body.get("comment"))
    await _notify(request, repo, num, "create", "discussion.comment")
    return JSONResponse({"newMessage": e})


@router.post(BASE + "/{num}/comment/{comment_id}/edit")
async def edit_comment(
    request: Request, ns: str, name: str, num: int, comment_id: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    repo, user = await _caller(request, ns, name, tok)
    body = await _body(request)
    e = await run_in_threadpool(
        server(request).discussions.edit_comment, repo, num, user, comment_id, body.get("content")
    )
    return JSONResponse({"updatedComment": e})


@router.post(BASE + "/{num}/comment/{comment_id}/hide")
async def hide_comment(
    request: Request, ns: str, name: str, num: int, comment_id: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    repo, user = await _caller(request, ns, name, tok)
    e = await run_in_threadpool(server(request).discussions.hide_comment, repo, num, user, comment_id)
    return JSONResponse({"updatedComment": e})


@router.post(BASE + "/{num}/title")
async def title(
    request: Request, ns: str, name: str, num: int, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    repo, user = await _caller(request, ns, name, tok)
    body = await _body(request)
    e = await run_in_threadpool(server(request).discussions.rename, repo, num, user, body.get("title"))
    return JSONResponse({"newTitle": e})


@router.post(BASE + "/{num}/status")
async def status(
    request: Request, ns: str, name: str, num: int, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    repo, user = await _caller(request, ns, name, tok)
    body = await _body(request)
    e = await run_in_threadpool(
        server(request).discussions.set_status, repo, num, user, body.get("status"), body.get("comment")
    )
    await _notify(request, repo, num, "update", "discussion")
    return JSONResponse({"newStatus": e})


@router.post(BASE + "/{num}/merge")
async def merge(
    request: Request, ns: str, name: str, num: int, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    repo, user = await _caller(request, ns, name, tok)
    body = await _body(request)
    await run_in_threadpool(server(request).discussions.merge, repo, num, user, body.get("comment"))
    await _notify(request, repo, num, "update", "discussion")
    return JSONResponse({})
