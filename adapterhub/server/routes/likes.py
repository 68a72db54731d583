"""Likes: like / unlike a model repo, a user's liked repos, a repo's likers."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ...errors import UnauthorizedError
from ..checks import check_name
from ..deps import auth, server, visible
from ..records import TokenInfo

router = APIRouter()


@router.api_route("/api/models/{ns}/{name}/like", methods=["POST", "DELETE"])
async def like(request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)) -> JSONResponse:
    repo = await visible(request, ns, name, tok)
    if tok is None:
        raise UnauthorizedError("Authentication required to like a repo: send a token")
    likes = server(request).likes
    if request.method == "POST":
        await run_in_threadpool(likes.like, tok.user, repo)
    else:
        await run_in_threadpool(likes.unlike, tok.user, repo)
    return JSONResponse({})


@router.get("/api/users/{user}/likes")
async def user_likes(request: Request, user: str, tok: TokenInfo | None = Depends(auth)) -> JSONResponse:
    check_name("user name", user)
    found = await run_in_threadpool(server(request).likes.liked, user, tok.user if tok else None)
    return JSONResponse([{"createdAt": at, "repo": {"name": r.repo_id, "type": "model"}} for r, at in found])


@router.get("/api/models/{ns}/{name}/likers")
async def likers(request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)) -> JSONResponse:
    repo = await visible(request, ns, name, tok)
    users = await run_in_threadpool(server(request).likes.likers, repo)
    return JSONResponse([{"user": u, "fullname": u, "avatarUrl": "", "type": "user"} for u in users])
