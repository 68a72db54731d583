"""Repos as a whole: create, delete, change settings (visibility); and ``validate-yaml``, which the
client calls before it commits a README.md."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ...errors import BadRequestError, ConflictError, ForbiddenError, UnauthorizedError
from ..cards import parse_card
from ..checks import check_name
from ..deps import auth, base_url, check_write, downloadable, may_read, read_json, server, visible, writable
from ..records import TokenInfo, iso

log = logging.getLogger(__name__)
router = APIRouter()
EMPTY_CARD_WARNING = (
    "Empty or missing yaml metadata in repo card: add a YAML block between '---' lines at the top of "
    "README.md (base_model, library_name: peft, tags) so that the adapter can be found"
)


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
    existing = await run_in_threadpool(store.repos.get_repo, ns, name)
    if existing is not None and may_read(existing, tok):
        check_write(tok, existing.namespace)
        url = f"{base_url(request)}/{existing.repo_id}"
        return JSONResponse({"error": "You already created this model repo", "url": url}, status_code=409)
    writer = check_write(tok, ns)
    try:
        repo = await run_in_threadpool(
            lambda: store.repos.create_repo(ns, name, private=private, author=writer.user)
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
    await run_in_threadpool(server(request).store.repos.delete_repo, repo)
    log.info("deleted repo %s", repo.repo_id)
    return JSONResponse({})


def _split_id(value: Any, what: str) -> tuple[str, str]:
    if not isinstance(value, str) or value.count("/") != 1:
        raise BadRequestError(f"{what} must be a repo id NAMESPACE/NAME")
    ns, name = value.split("/")
    return ns, name


@router.post("/api/repos/move")
async def move_repo(request: Request, tok: TokenInfo | None = Depends(auth)) -> JSONResponse:
    """``{fromRepo, toRepo, type}``: rename a repo (its history comes along). The caller must be able to
    write to both namespaces."""
    body = await read_json(request)
    if not isinstance(body, dict) or body.get("type", "model") not in ("model", None):
        raise BadRequestError("give {fromRepo, toRepo} of model repos")
    src_ns, src_name = _split_id(body.get("fromRepo"), "fromRepo")
    ns, name = _split_id(body.get("toRepo"), "toRepo")
    repo = await writable(request, src_ns, src_name, tok)
    check_write(tok, ns)
    moved = await run_in_threadpool(server(request).store.repos.rename_repo, repo, ns, name)
    log.info("moved repo %s to %s", repo.repo_id, moved.repo_id)
    return JSONResponse({"url": f"{base_url(request)}/{moved.repo_id}"})


@router.post("/api/models/{ns}/{name}/duplicate")
async def duplicate_repo(
    request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    """``{repository, visibility}``: a new repo with the files of this one's main branch."""
    store = server(request).store
    source = await visible(request, ns, name, tok)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequestError("give {repository: NAMESPACE/NAME}")
    to_ns, to_name = _split_id(body.get("repository"), "repository")
    writer = check_write(tok, to_ns)
    private = visibility(body)
    url = f"{base_url(request)}/{to_ns}/{to_name}"
    try:
        repo = await run_in_threadpool(
            lambda: store.repos.duplicate_repo(
                source,
                to_ns,
                to_name,
                private=source.private if private is None else private,
                author=writer.user,
            )
        )
    except ConflictError as exc:
        return JSONResponse({"error": exc.message, "url": url}, status_code=409)
    log.info("duplicated repo %s as %s", source.repo_id, repo.repo_id)
    return JSONResponse({"url": f"{base_url(request)}/{repo.repo_id}", "filesCopyPending": False})


@router.get("/api/models/{ns}/{name}/auth-check")
async def auth_check(
    request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    await downloadable(request, ns, name, tok)
    return JSONResponse({})


@router.get("/api/models/{ns}/{name}/auth-check/write")
async def auth_check_write(
    request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    await writable(request, ns, name, tok)
    return JSONResponse({})


@router.put("/api/models/{ns}/{name}/settings")
async def update_settings(
    request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    repo = await writable(request, ns, name, tok)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequestError("give the settings as JSON {visibility: 'private' | 'public'}")
    gated = body.get("gated")
    if gated is not None:
        await run_in_threadpool(server(request).store.gates.set_gated, repo, gated)
    private = visibility(body)
    if private is not None and private != repo.private:
        repo = await run_in_threadpool(server(request).store.repos.set_private, repo, private)
        log.info("repo %s is now %s", repo.repo_id, "private" if private else "public")
    gated = await run_in_threadpool(server(request).store.gates.gated, repo)
    return JSONResponse({"private": repo.private, "gated": gated})


@router.get("/api/settings/repositories")
async def my_repositories(request: Request, tok: TokenInfo | None = Depends(auth)) -> JSONResponse:
    """The caller's repos with the storage each takes (``hf repos list``), private ones included."""
    if tok is None:
        raise UnauthorizedError("Authentication required: send a token (adapterhub token create USER)")
    return await _repositories(request, tok.user)


@router.get("/api/organizations/{ns}/settings/repositories")
async def namespace_repositories(
    request: Request, ns: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    """The same for a namespace: only its own user may list it (this server has no organizations)."""
    if tok is None:
        raise UnauthorizedError("Authentication required: send a token of that namespace's user")
    if ns != tok.user:
        raise ForbiddenError(f"only {ns} may list the repositories of {ns}: your token belongs to {tok.user}")
    return await _repositories(request, ns)


async def _repositories(request: Request, ns: str) -> JSONResponse:
    rows = await run_in_threadpool(server(request).store.repos.namespace_storage, ns)
    total = sum(size for _, size in rows)
    return JSONResponse(
        [
            {
                "id": repo.repo_id,
                "type": "model",
                "updatedAt": iso(repo.updated_at),
                "visibility": "private" if repo.private else "public",
                "storage": size,
                "storagePercent": round(100 * size / total, 2) if total else 0,
            }
            for repo, size in rows
        ]
    )


@router.post("/api/validate-yaml")
async def validate_yaml(request: Request) -> JSONResponse:
    body = await read_json(request)
    content = body.get("content") if isinstance(body, dict) else None
    if not isinstance(content, str):
        raise BadRequestError("give {content: <README.md text>}")
    try:  # off the event loop: a hostile card must not stall other requests
        card = await run_in_threadpool(parse_card, content.encode())
    except BadRequestError as exc:
        msg = exc.message
        return JSONResponse({"errors": [{"message": msg}], "warnings": [], "error": msg}, status_code=400)
    warnings = [] if card else [{"message": EMPTY_CARD_WARNING}]
    return JSONResponse({"errors": [], "warnings": warnings})
