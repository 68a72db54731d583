"""Writing files: ``preupload`` (regular or LFS, per file) and the NDJSON ``commit``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ...errors import BadRequestError
from ..checks import check_path, decode_base64, upload_mode
from ..deps import auth, base_url, raw_parts, read_body, read_json, server, writable_for
from ..gitfiles import RULES_FILE_LIMIT, Pattern, compile_rules, is_ignored, is_lfs, lfs_patterns
from ..payload import parse_commit
from ..records import Entry, TokenInfo
from ..storage import ServerStore
from ..webhooks import repo_payload

router = APIRouter()
COMMIT_LIMIT = 512 * 1024 * 1024
PREUPLOAD_FILES = 1000


def wants_pr(request: Request) -> bool:
    return request.query_params.get("create_pr") in ("1", "true", "True")


def _rules(
    store: ServerStore, files: dict[str, Entry], gitignore: str | None
) -> tuple[list[Pattern], list[Pattern]]:
    """The ignore rules (the client's pending .gitignore, else the revision's) and the LFS rules of the
    revision's .gitattributes."""

    def text(path: str) -> str:
        e = files.get(path)
        if e is None or e.size > RULES_FILE_LIMIT:
            return ""
        return store.blobs.path(e.sha256).read_bytes().decode("utf-8", errors="replace")

    return compile_rules(gitignore if gitignore is not None else text(".gitignore")), lfs_patterns(
        text(".gitattributes")
    )


@router.post("/api/models/{ns}/{name}/preupload/{rest:anypath}")
async def preupload(
    request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    store = server(request).store
    repo = await writable_for(request, ns, name, tok, "/".join(raw_parts(request, 5)))
    body = await read_json(request)
    files = body.get("files") if isinstance(body, dict) else None
    if not isinstance(files, list) or len(files) > PREUPLOAD_FILES:
        raise BadRequestError(
            f"give {{files: [{{path, sample, size}}, ...]}} (at most {PREUPLOAD_FILES} files)"
        )
    gitignore = body.get("gitIgnore")
    if gitignore is not None and (not isinstance(gitignore, str) or len(gitignore) > RULES_FILE_LIMIT):
        raise BadRequestError(
            f"gitIgnore must be the text of a .gitignore of at most {RULES_FILE_LIMIT:,} characters"
        )
    head = await run_in_threadpool(store.repos.resolve, repo, "/".join(raw_parts(request, 5)))
    current = await run_in_threadpool(store.repos.files, head)
    ignore, lfs = await run_in_threadpool(_rules, store, current, gitignore)
    out = []
    for f in files:
        size = f.get("size") if isinstance(f, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequestError("each file needs a path, a base64 sample and an integer size")
        try:
            path = check_path(f.get("path"))
        except BadRequestError as exc:
            exc.status = 422  # what the Hub answers when preupload names a path it will not take
            raise
        mode = upload_mode(path, size, decode_base64(f.get("sample", ""), path))
        if mode == "regular" and size and is_lfs(lfs, path):
            mode = "lfs"
        existing = current.get(path)
        oid = None
        if existing is not None:
            oid = existing.sha256 if mode == "lfs" else existing.blob_oid
        out.append({"path": path, "uploadMode": mode, "shouldIgnore": is_ignored(ignore, path), "oid": oid})
    return JSONResponse({"files": out, "commitOid": head.oid})


@router.post("/api/models/{ns}/{name}/commit/{rest:anypath}")
async def commit(request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)) -> JSONResponse:
    srv = server(request)
    store = srv.store
    branch = "/".join(raw_parts(request, 5))
    repo = await writable_for(request, ns, name, tok, branch)
    assert tok is not None
    body = await read_body(request, COMMIT_LIMIT, "the commit payload")
    title, message, parent, ops = await run_in_threadpool(parse_commit, body)
    pr_url = None
    if wants_pr(request):  # a new pull request: its branch starts at the head of the one named
        d = await run_in_threadpool(
            lambda: srv.discussions.create(repo, tok.user, title, message, pull_request=True, base=branch)
        )
        branch = f"refs/pr/{d['num']}"
    new, changed = await run_in_threadpool(
        lambda: store.commits.commit(
            repo, branch, ops, title=title, message=message, author=tok.user, parent_commit=parent
        )
    )
    if branch.startswith("refs/pr/"):
        num = int(branch[len("refs/pr/") :])
        pr_url = f"{base_url(request)}/{repo.repo_id}/discussions/{num}"
        if changed:
            await run_in_threadpool(srv.discussions.add_commit, repo, num, tok.user, new)
    url = f"{base_url(request)}/{repo.repo_id}/commit/{new.oid}"
    if changed:
        payload = repo_payload(
            repo,
            base_url(request),
            "update",
            "repo.content",
            updatedRefs=[
                {"ref": branch if branch.startswith("refs/") else f"refs/heads/{branch}", "newSha": new.oid}
            ],
        )
        await run_in_threadpool(srv.webhooks.notify, repo, "repo", payload)
    return JSONResponse({"success": True, "commitOid": new.oid, "commitUrl": url, "pullRequestUrl": pr_url})
