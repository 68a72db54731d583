"""Reading model repos: listing and search, model info at a revision, the file tree, paths-info, refs and
commit history; and moving refs: branches and tags."""

from __future__ import annotations

import html
from itertools import islice
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ...errors import BadRequestError, EndpointNotFoundError, EntryNotFoundError, RepoNotFoundError
from ..cards import card_tags
from ..checks import is_name
from ..deps import (
    auth,
    base_url,
    may_read,
    query_flag,
    query_int,
    raw_parts,
    read_form_or_json,
    read_json,
    server,
    visible,
    writable,
)
from ..records import Commit, Entry, Repo, TokenInfo
from ..views import (
    commit_json,
    file_json,
    folder_json,
    folder_last_commits,
    model_json,
    tree_json,
    tree_paths,
)

router = APIRouter()
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
PATHS_INFO_LIMIT = 1000
PAGE_SIZE = 1000
# what follows a namespace-less id (``gpt2/revision/main``): the id is the first part alone
NAMESPACE_LESS_ACTIONS = (
    "revision",
    "tree",
    "refs",
    "commits",
    "paths-info",
    "preupload",
    "commit",
    "branch",
    "tag",
)


def _rest(request: Request) -> str:
    """What follows ``/api/models/{ns}/{name}/{action}/`` (a revision, possibly with '/')."""
    return "/".join(raw_parts(request, 5))


def _matches(repo: Repo, head: Commit, q: Any) -> bool:
    tags, lib = card_tags(head.card)
    if (search := (q.get("search") or "").lower()) and search not in repo.repo_id.lower():
        return False
    if (author := q.get("author")) and repo.namespace.lower() != author.lower():
        return False
    if (library := q.get("library")) and (lib or "").lower() != library.lower() and library not in tags:
        return False
    if any(f not in tags and f != lib for f in q.getlist("filter") if f):
        return False
    if base_model := (q.get("base_model") or "").lower():
        bases = (head.card or {}).get("base_model") or []
        bases = bases if isinstance(bases, list) else [bases]
        if base_model not in [str(b).lower() for b in bases]:
            return False
    return True


@router.get("/api/models")
async def list_models(request: Request, tok: TokenInfo | None = Depends(auth)) -> JSONResponse:
    """Pages of at most `PAGE_SIZE`; a ``Link: <...>; rel="next"`` header (what the client follows) while
    more match. ``limit`` caps one page; ``cursor`` is where the next page starts."""
    store = server(request).store
    page = query_int(request, "limit", PAGE_SIZE, low=1, high=10**9)
    page = min(page, PAGE_SIZE)
    start = query_int(request, "cursor", 0, low=0, high=10**9)
    full = query_flag(request, "full")
    rows = await run_in_threadpool(store.repos.visible_repos, tok.user if tok else None)
    matching = (pair for pair in rows if _matches(*pair, request.query_params))
    picked = list(islice(matching, start, start + page + 1))
    out = []
    for repo, head in picked[:page]:
        files = await run_in_threadpool(store.repos.files, head) if full else None
        out.append(model_json(repo, head, files, False, store.gates.gated(repo)))
    headers = {}
    if len(picked) > page:
        query = [(k, v) for k, v in request.query_params.multi_items() if k != "cursor"]
        query.append(("cursor", str(start + page)))
        headers["Link"] = f'<{base_url(request)}/api/models?{urlencode(query)}>; rel="next"'
    return JSONResponse(out, headers=headers)


async def _at(
    request: Request, ns: str, name: str, tok: TokenInfo | None, rev: str
) -> tuple[Repo, Commit, dict[str, Entry]]:
    store = server(request).store
    repo = await visible(request, ns, name, tok)
    head = await run_in_threadpool(store.repos.resolve, repo, rev)
    files = await run_in_threadpool(store.repos.files, head)
    return repo, head, files


async def _info(request: Request, repo: Repo, head: Commit, files: dict[str, Entry]) -> dict[str, Any]:
    srv = server(request)
    gated = await run_in_threadpool(srv.store.gates.gated, repo)
    info = model_json(repo, head, files, query_flag(request, "blobs"), gated)
    info["likes"] = len(await run_in_threadpool(srv.likes.likers, repo))
    return info


@router.get("/api/models/{ns}/{name}")
async def model_info(
    request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    repo, head, files = await _at(request, ns, name, tok, "main")
    return JSONResponse(await _info(request, repo, head, files))


@router.get("/api/models/{ns}/{name}/revision/{rest:anypath}")
async def model_info_at(
    request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    repo, head, files = await _at(request, ns, name, tok, _rest(request))
    return JSONResponse(await _info(request, repo, head, files))


@router.get("/api/models/{ns}/{name}/tree/{rest:anypath}")
async def tree(request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)) -> JSONResponse:
    parts = raw_parts(request, 5)
    path = "/".join(parts[1:]).strip("/")
    repo, head, files = await _at(request, ns, name, tok, parts[0])
    prefix = path + "/" if path else ""
    if prefix and not any(p.startswith(prefix) for p in files):
        raise EntryNotFoundError(path, head.oid)
    recursive = query_flag(request, "recursive")
    last = None
    if query_flag(request, "expand"):
        last = await run_in_threadpool(_last_commits, request, repo, head, files, prefix, recursive)
    return JSONResponse(tree_json(head, files, prefix, recursive, last))


def _last_commits(
    request: Request, repo: Repo, head: Commit, files: dict[str, Entry], prefix: str, recursive: bool
) -> dict[str, Commit]:
    """Last commits of what a listing shows: its files, and its folders (from every file under them)."""
    folders = tree_paths(files, prefix, recursive, folders=True)
    wanted = tree_paths(files, prefix, recursive, folders=False)
    wanted += [p for p in files if any(p.startswith(d + "/") for d in folders)]
    by_file = server(request).store.repos.last_commits(repo, head, dict.fromkeys(wanted))
    return {**by_file, **folder_last_commits(by_file, folders)}


@router.post("/api/models/{ns}/{name}/paths-info/{rest:anypath}")
async def paths_info(
    request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    body = await read_form_or_json(request)
    paths = body.get("paths") if isinstance(body, dict) else None
    if isinstance(paths, str):
        paths = [paths]
    if (
        not isinstance(paths, list)
        or len(paths) > PATHS_INFO_LIMIT
        or not all(isinstance(p, str) for p in paths)
    ):
        raise BadRequestError(f"give paths: a list of at most {PATHS_INFO_LIMIT} paths in the repo")
    expand = body.get("expand") if isinstance(body, dict) else None
    expand = (expand[-1] if isinstance(expand, list) and expand else expand) in (True, "True", "true", "1")
    repo, head, files = await _at(request, ns, name, tok, _rest(request))
    wanted = [p for p in dict.fromkeys(p.strip("/") for p in paths) if p]
    found_files = [p for p in wanted if p in files]
    found_dirs = [p for p in wanted if p not in files and any(f.startswith(p + "/") for f in files)]
    last: dict[str, Commit] = {}
    if expand:
        under = [f for f in files if any(f.startswith(d + "/") for d in found_dirs)]
        by_file = await run_in_threadpool(
            server(request).store.repos.last_commits, repo, head, dict.fromkeys(found_files + under)
        )
        last = {**by_file, **folder_last_commits(by_file, found_dirs)}
    out = [file_json(files[p], last.get(p)) for p in found_files]
    out += [folder_json(head, p, last.get(p)) for p in found_dirs]
    return JSONResponse(sorted(out, key=lambda d: wanted.index(d["path"])))


@router.get("/api/models/{ns}/{name}/refs")
async def refs(request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)) -> JSONResponse:
    repo = await visible(request, ns, name, tok)
    found = await run_in_threadpool(server(request).store.repos.refs, repo)
    shown = {
        kind: [{"name": r.name, "ref": r.ref, "targetCommit": r.commit_oid} for r in found if r.kind == kind]
        for kind in ("branch", "tag", "pr")
    }
    prs = shown["pr"] if query_flag(request, "include_prs") else []
    return JSONResponse(
        {"branches": shown["branch"], "converts": [], "tags": shown["tag"], "pullRequests": prs}
    )


@router.get("/api/models/{ns}/{name}/commits/{rest:anypath}")
async def commits(
    request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    repo, head, _ = await _at(request, ns, name, tok, _rest(request))
    hist = await run_in_threadpool(server(request).store.repos.history, repo, head)
    out = [commit_json(c) for c in hist]
    if "formatted" in request.query_params.getlist("expand[]"):  # title and message as (escaped) HTML
        for d in out:
            d["formatted"] = {"title": html.escape(d["title"]), "message": html.escape(d["message"])}
    return JSONResponse(out)


@router.api_route("/api/models/{ns}/{name}/branch/{rest:anypath}", methods=["POST", "DELETE"])
async def branch(request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)) -> JSONResponse:
    store = server(request).store
    repo = await writable(request, ns, name, tok)
    branch = _rest(request)
    if request.method == "POST":
        body = await read_json(request)
        start = body.get("startingPoint") if isinstance(body, dict) else None
        if start is not None and not isinstance(start, str):
            raise BadRequestError("startingPoint must be a revision")
        await run_in_threadpool(lambda: store.repos.create_branch(repo, branch, starting_point=start))
    else:
        await run_in_threadpool(store.repos.delete_branch, repo, branch)
    return JSONResponse({})


@router.api_route("/api/models/{ns}/{name}/tag/{rest:anypath}", methods=["POST", "DELETE"])
async def tag(request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)) -> JSONResponse:
    """POST ``tag/{revision}`` with ``{tag, message}`` tags a revision; DELETE ``tag/{tag}`` removes it."""
    store = server(request).store
    repo = await writable(request, ns, name, tok)
    if request.method == "POST":
        body = await read_json(request)
        tag = body.get("tag") if isinstance(body, dict) else None
        if not isinstance(tag, str):
            raise BadRequestError("give the tag as JSON {tag, message}")
        revision = _rest(request)
        await run_in_threadpool(lambda: store.repos.create_tag(repo, tag, revision=revision))
    else:
        await run_in_threadpool(store.repos.delete_tag, repo, _rest(request))
    return JSONResponse({})


@router.post("/api/models/{ns}/{name}/super-squash/{rest:anypath}")
async def super_squash(
    request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    """``{message}``: the branch keeps its files in one new commit without parents."""
    store = server(request).store
    repo = await writable(request, ns, name, tok)
    assert tok is not None
    body = await read_json(request)
    branch = _rest(request)
    message = body.get("message") if isinstance(body, dict) else None
    if message is None:
        message = f"Super-squash branch '{branch}'"
    if not isinstance(message, str):
        raise BadRequestError("message must be a string")
    squashed = await run_in_threadpool(
        lambda: store.commits.squash(repo, branch, message=message, author=tok.user)
    )
    return JSONResponse({"commitId": squashed.oid})


@router.get("/api/models/{ns}/{name}/lfs-files")
async def lfs_files(
    request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    """The repo's LFS objects, for its owner (who may purge them)."""
    repo = await writable(request, ns, name, tok)
    return JSONResponse(await run_in_threadpool(server(request).store.repos.lfs_files, repo))


@router.post("/api/models/{ns}/{name}/lfs-files/batch")
async def purge_lfs_files(
    request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    """``{deletions: {sha: [...], rewriteHistory}}``: remove those LFS objects from every commit."""
    repo = await writable(request, ns, name, tok)
    body = await read_json(request)
    deletions = body.get("deletions") if isinstance(body, dict) else None
    shas = deletions.get("sha") if isinstance(deletions, dict) else None
    if not isinstance(shas, list) or len(shas) > PATHS_INFO_LIMIT:
        raise BadRequestError(f"give {{deletions: {{sha: [at most {PATHS_INFO_LIMIT} sha256 digests]}}}}")
    if deletions.get("rewriteHistory") is False:  # type: ignore[union-attr]
        raise BadRequestError("this server purges LFS files from the whole history only (rewriteHistory)")
    await run_in_threadpool(server(request).store.repos.purge_lfs, repo, shas)
    return JSONResponse({})


@router.api_route("/api/models/{rest:anypath}", methods=ALL_METHODS)
async def not_a_model_route(request: Request, tok: TokenInfo | None = Depends(auth)) -> JSONResponse:
    """Anything else under /api/models: an id without a namespace (``gpt2``) or a repo this server does
    not have is RepoNotFound, as the Hub answers; an unknown action on a repo one can read is a 404."""
    parts = raw_parts(request, 2)
    if len(parts) >= 2 and is_name(parts[0]) and is_name(parts[1]):
        repo = await run_in_threadpool(server(request).store.repos.get_repo, parts[0], parts[1])
        if repo is not None and may_read(repo, tok):
            raise EndpointNotFoundError(f"no such endpoint: {request.method} {request.url.path}")
        if parts[1] not in NAMESPACE_LESS_ACTIONS:
            raise RepoNotFoundError(f"{parts[0]}/{parts[1]}")
    raise RepoNotFoundError(parts[0] if parts else "")
