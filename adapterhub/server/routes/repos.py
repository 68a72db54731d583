"""Repos as a whole: create, delete, change settings (visibility); and ``validate-yaml``, which the
client calls before it commits a README.md."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ...errors import BadRequestError, ConflictError, UnauthorizedError
from ..cards import parse_card
from ..checks import check_name
from ..deps import auth, base_url, check_write, may_read, read_json, server, writable
from ..records import TokenInfo

log = logging.getLogger(__name__)
router = APIRouter()


def repo_target(body: Any, tok: TokenInfo | None) -> tuple[str, str]:
    """``{name, organization}`` (or ``{name: "ns/name"}``) -> (namespace, name)."""
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        raise BadRequestError("give the repo as JSON {name, organization}")
    if body.get("type", "model") not in ("model", None):
        raise BadRequestError("this server holds model repos only")
    name = body["name"]
    ns = body.get("organization") or (tok.user if tok else None)
    if "/" in name and not body.get("organization"):
        ns, name = name.split("/", 1)
    if not isinstance(ns, str) or not ns:
        raise UnauthorizedError("Authentication required to create a repo without an organization")
    return ns, name


def visibility(body: dict[str, Any]) -> bool | None:
    """The ``private`` / ``visibility`` fields of a request -> private or not, None when not given."""
    private = body.get("private")
    vis = body.get("visibility")
    if vis is not None:
        if vis not in ("private", "public"):
            raise BadRequestError(f"visibility must be 'private' or 'public', not {vis!r}")
        return vis == "private"
    if private is not None and not isinstance(private, bool):
        raise BadRequestError("private must be true or false")
    return private


@router.post("/api/repos/create")
async def create_repo(request: Request, tok: TokenInfo | None = Depends(auth)) -> JSONResponse:
    store = server(request).store
    body = await read_json(request)
    ns, name = repo_target(body, tok)
    check_name("namespace", ns)
    check_name("repo name", name)
    private = bool(visibility(body))
    existing = await run_in_threadpool(store.get_repo, ns, name)
    if existing is not None and may_read(existing, tok):
        check_write(tok, existing.namespace)
        url = f"{base_url(request)}/{existing.repo_id}"
        return JSONResponse({"error": "You already created this model repo", "url": url}, status_code=409)
    writer = check_write(tok, ns)
    try:
        repo = await run_in_threadpool(
            lambda: store.create_repo(ns, name, private=private, author=writer.user)
        )
    except ConflictError as exc:
        return JSONResponse(
            {"error": exc.message, "url": f"{base_url(request)}/{ns}/{name}"}, status_code=409
        )
    log.info("created repo %s (private=%s)", repo.repo_id, repo.private)
    return JSONResponse(
        {"url": f"{base_url(request)}/{repo.repo_id}", "name": repo.repo_id, "id": f"{repo.id:024x}"}
    )


@router.delete("/api/repos/delete")
async def delete_repo(request: Request, tok: TokenInfo | None = Depends(auth)) -> JSONResponse:
    body = await read_json(request)
    ns, name = repo_target(body, tok)
    repo = await writable(request, ns, name, tok)
    await run_in_threadpool(server(request).store.delete_repo, repo)
    log.info("deleted repo %s", repo.repo_id)
    return JSONResponse({})


@router.put("/api/models/{ns}/{name}/settings")
async def update_settings(
    request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    repo = await writable(request, ns, name, tok)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequestError("give the settings as JSON {visibility: 'private' | 'public'}")
    if body.get("gated") not in (None, False):
        raise BadRequestError("gated repos are not supported by this server")
    private = visibility(body)
    if private is not None and private != repo.private:
        repo = await run_in_threadpool(server(request).store.set_private, repo, private)
        log.info("repo %s is now %s", repo.repo_id, "private" if private else "public")
    return JSONResponse({"private": repo.private})


@router.post("/api/validate-yaml")
async def validate_yaml(request: Request) -> JSONResponse:
    body = await read_json(request)
    content = body.get("content") if isinstance(body, dict) else None
    if not isinstance(content, str):
        raise BadRequestError("give {content: <README.md text>}")
    try:  # off the event loop: a hostile card must not stall other requests
        await run_in_threadpool(parse_card, content.encode())
    except BadRequestError as exc:
        msg = exc.message
        return JSONResponse({"errors": [{"message": msg}], "warnings": [], "error": msg}, status_code=400)
    return JSONResponse({"errors": [], "warnings": []})
