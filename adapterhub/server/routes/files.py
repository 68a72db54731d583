"""Downloads: ``resolve`` (HEAD/GET of a file at a revision, with ranges) and a commit's listing."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse

from ...errors import EntryNotFoundError, RepoNotFoundError, StoreError
from ...store import BlobStore
from ..deps import auth, downloadable, may_read, raw_parts, server, visible
from ..records import TokenInfo, iso
from ..views import file_json

router = APIRouter()


class _BlobResponse(FileResponse):
    chunk_size = 4 * 1024 * 1024


@router.api_route("/{ns}/{name}/resolve/{rest:anypath}", methods=["GET", "HEAD"])
async def resolve(request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)) -> Response:
    store = server(request).store
    parts = raw_parts(request, 3)
    if len(parts) < 2:
        raise EntryNotFoundError("/".join(parts))
    rev, path = parts[0], "/".join(parts[1:])
    try:
        repo = await downloadable(request, ns, name, tok)
    except RepoNotFoundError:
        moved = await run_in_threadpool(server(request).store.repos.renamed, ns, name)
        if moved is None or not may_read(moved, tok):
            raise
        # the repo was moved: send the client on to its new name, as the Hub does
        rest = (request.scope.get("raw_path") or request.url.path.encode()).decode("latin-1")
        rest = rest.split("/", 3)[3]
        query = f"?{request.url.query}" if request.url.query else ""
        return RedirectResponse(f"/{moved.repo_id}/{rest}{query}", status_code=307)
    head = await run_in_threadpool(store.repos.resolve, repo, rev)
    files = await run_in_threadpool(store.repos.files, head)
    e = files.get(path)
    if e is None:
        raise EntryNotFoundError(path, head.oid)
    headers = {"ETag": f'"{e.etag}"', "X-Repo-Commit": head.oid, "Cache-Control": "private, max-age=0"}
    if e.lfs:
        headers.update({"X-Linked-Etag": f'"{e.sha256}"', "X-Linked-Size": str(e.size)})
    if not store.blobs.is_local:  # object storage: a HEAD or a small range needs no local copy
        quick = await run_in_threadpool(_remote_part, request, store.blobs, e.sha256, e.size, headers)
        if quick is not None:
            return quick
    blob = await run_in_threadpool(_local_blob, store.blobs, e.sha256, path)
    return _BlobResponse(blob, headers=headers, media_type="application/octet-stream")


#: a ranged GET of at most this many bytes is answered from object storage with a range read (a
#: safetensors header, as huggingface_hub's ``get_safetensors_metadata`` asks), not a whole fetch
RANGE_READ_LIMIT = 16 * 1024 * 1024


def _remote_part(
    request: Request, blobs: BlobStore, sha256: str, size: int, headers: dict[str, str]
) -> Response | None:
    """A HEAD, or a GET of one small ``bytes=a-b`` range, answered from the bucket; None otherwise."""
    if request.method == "HEAD":
        return Response(
            headers={**headers, "Content-Length": str(size), "Accept-Ranges": "bytes"},
            media_type="application/octet-stream",
        )
    unit, _, spec = request.headers.get("range", "").partition("=")
    first, dash, last = spec.strip().partition("-")
    if unit.strip() != "bytes" or not dash or "," in spec or not first.isdigit():
        return None
    start = int(first)
    end = min(int(last) if last.isdigit() else size - 1, size - 1)
    if start > end or end - start + 1 > RANGE_READ_LIMIT:
        return None
    data = blobs.read_range(sha256, start, end - start + 1)
    return Response(
        data,
        status_code=206,
        media_type="application/octet-stream",
        headers={**headers, "Content-Range": f"bytes {start}-{end}/{size}", "Accept-Ranges": "bytes"},
    )


def _local_blob(blobs: BlobStore, sha256: str, path: str) -> Path:
    """A local file with the object (from object storage: a sha256-checked cached copy)."""
    if blobs.is_local:
        blob = blobs.path(sha256)
        if not blob.is_file():
            raise StoreError(f"{path}: the stored object {sha256} is missing on the server")
        return blob
    return blobs.path(sha256)


@router.api_route("/{name}/resolve/{rest:anypath}", methods=["GET", "HEAD"])
async def resolve_without_namespace(name: str) -> Response:
    """``gpt2/resolve/main/config.json``: this server's repos all have a namespace."""
    raise RepoNotFoundError(name)


@router.get("/{ns}/{name}/commit/{oid}")
async def show_commit(
    request: Request, ns: str, name: str, oid: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    store = server(request).store
    repo = await visible(request, ns, name, tok)
    c = await run_in_threadpool(store.repos.resolve, repo, oid)
    files = await run_in_threadpool(store.repos.files, c)
    return JSONResponse(
        {
            "id": c.oid,
            "parent": c.parent_oid,
            "title": c.title,
            "message": c.message,
            "author": c.author,
            "date": iso(c.created_at),
            "files": [file_json(e) for e in files.values()],
        }
    )
