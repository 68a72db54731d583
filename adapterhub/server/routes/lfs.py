"""The git-LFS batch API for uploads: ``batch`` hands out signed upload URLs, the upload ``PUT`` streams
the body into the store (hashing it; kept only if it has the announced sha256 and size), ``verify``
confirms. Downloads go through ``resolve``. An upload for a branch (the batch call's ``ref``) is for those
who may write it; one without a ref is for a pull request, as on the Hub.

"Already there" is answered only for objects that a commit to the repo could reference anyway (uploaded
to it, or held by a repo the caller can read), so the batch call never tells whether other repos hold an
object. An upload is always read and hashed, even when the store has the bytes: it is the proof of
possession that lets the repo reference the object.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import tempfile
import time
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ...errors import (
    BadRequestError,
    EndpointNotFoundError,
    EntryNotFoundError,
    ForbiddenError,
    RepoNotFoundError,
)
from ...store import scratch_prefix
from ..checks import SHA256_RE
from ..deps import (
    Server,
    auth,
    base_url,
    check_write,
    read_json,
    server,
    visible,
    writable,
    writable_for,
)
from ..records import Repo, TokenInfo

router = APIRouter()
LFS_OBJECT_LIMIT = 64 * 1024**3
LFS_BATCH_OBJECTS = 10_000
UPLOAD_URL_TTL = 3600
WRITE_CHUNK = 4 * 1024 * 1024
LFS_MEDIA_TYPE = "application/vnd.git-lfs+json"


def sign(srv: Server, repo_id: str, oid: str, size: int, exp: int, user: str) -> str:
    msg = f"{repo_id}\n{oid}\n{size}\n{exp}\n{user}"
    return hmac.new(srv.secret, msg.encode(), hashlib.sha256).hexdigest()


async def uploader(
    request: Request, ns: str, name: str, tok: TokenInfo | None, ref: str | None = None
) -> Repo:
    """The repo, if the caller may upload objects to it for ``ref`` (the batch call's ``ref.name``): a
    branch only its owner (others get a 403, or a 404 for a private repo, as on the Hub), a pull request's
    ``refs/pr/N`` its author too. Without a ref (what huggingface_hub sends for ``create_pr``, so that a
    reader may open a pull request) anyone with a write token who can read it. Uploading only proves having
    the bytes; what reaches a branch is still decided by the commit."""
    if ref is not None:
        return await writable_for(request, ns, name, tok, ref)
    repo = await visible(request, ns, name, tok)
    if tok is None or tok.user == repo.namespace:
        return await writable(request, ns, name, tok)
    check_write(tok, tok.user)  # a write token, of its own user
    return repo


def _repo_name(repo_git: str) -> str:
    if not repo_git.endswith(".git"):
        raise EndpointNotFoundError("not found")
    return repo_git[: -len(".git")]


def _ref_name(body: dict[str, Any]) -> str | None:
    """The branch or pull request the upload is for, or None when the batch call names none."""
    ref = body.get("ref")
    if ref is None:
        return None
    name = ref.get("name") if isinstance(ref, dict) else None
    if not isinstance(name, str) or not name:
        raise BadRequestError('ref must be {"name": "<branch or refs/pr/N>"}')
    return name.removeprefix("refs/heads/")


def _object_error(oid: Any, size: Any, code: int, message: str) -> dict[str, Any]:
    return {
        "oid": str(oid),
        "size": size if isinstance(size, int) else 0,
        "error": {"code": code, "message": message},
    }


async def _answer(request: Request, repo: Repo, tok: TokenInfo | None, o: Any, exp: int) -> dict[str, Any]:
    srv = server(request)
    oid, size = (o.get("oid"), o.get("size")) if isinstance(o, dict) else (None, None)
    if not isinstance(oid, str) or not SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
        return _object_error(oid, size, 422, "oid must be a sha256 (64 hex digits) and size an integer")
    if size > LFS_OBJECT_LIMIT:
        return _object_error(oid, size, 413, f"object larger than {LFS_OBJECT_LIMIT} bytes")
    owner = tok is not None and tok.user == repo.namespace
    # a pull request's author (not the owner) always sends the bytes: no "already there" for others' repos
    have = (
        await run_in_threadpool(srv.store.gates.referable_size, repo, tok.user, oid)
        if owner and tok
        else None
    )
    if have == size:
        return {"oid": oid, "size": size, "authenticated": True}
    user = tok.user if tok else ""
    query = urlencode(
        {"size": size, "exp": exp, "user": user, "sig": sign(srv, repo.repo_id, oid, size, exp, user)}
    )
    base = base_url(request)
    return {
        "oid": oid,
        "size": size,
        "authenticated": True,
        "actions": {
            "upload": {
                "href": f"{base}/lfs-upload/{repo.repo_id}/{oid}?{query}",
                "expires_in": UPLOAD_URL_TTL,
            },
            "verify": {"href": f"{base}/{repo.repo_id}.git/info/lfs/objects/verify"},
        },
    }


@router.post("/{ns}/{repo_git}/info/lfs/objects/batch")
async def batch(
    request: Request, ns: str, repo_git: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    name = _repo_name(repo_git)
    body = await read_json(request)
    if not isinstance(body, dict) or body.get("operation") != "upload":
        raise BadRequestError(
            "this server's LFS batch API takes operation 'upload' only; download with /resolve"
        )
    repo = await uploader(request, ns, name, tok, _ref_name(body))
    objs = body.get("objects")
    if not isinstance(objs, list) or len(objs) > LFS_BATCH_OBJECTS:
        raise BadRequestError(f"give objects: [{{oid, size}}, ...] (at most {LFS_BATCH_OBJECTS})")
    exp = int(time.time()) + UPLOAD_URL_TTL
    out = [await _answer(request, repo, tok, o, exp) for o in objs]
    return JSONResponse(
        {"transfer": "basic", "objects": out, "hash_algo": "sha256"}, media_type=LFS_MEDIA_TYPE
    )


@router.post("/{ns}/{repo_git}/info/lfs/objects/verify")
async def verify(
    request: Request, ns: str, repo_git: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    repo = await uploader(request, ns, _repo_name(repo_git), tok)
    body = await read_json(request)
    oid, size = (body.get("oid"), body.get("size")) if isinstance(body, dict) else (None, None)
    if not isinstance(oid, str) or not SHA256_RE.match(oid):
        raise BadRequestError("give {oid, size}")
    have = await run_in_threadpool(
        server(request).store.gates.referable_size, repo, tok.user if tok else None, oid
    )
    if have is None or (isinstance(size, int) and have != size):
        raise EntryNotFoundError(f"LFS object {oid} (it was not uploaded to {repo.repo_id})")
    return JSONResponse({})


@router.put("/lfs-upload/{ns}/{name}/{oid}")
async def upload(request: Request, ns: str, name: str, oid: str) -> JSONResponse:
    srv = server(request)
    q = request.query_params
    try:
        size, exp = int(q["size"]), int(q["exp"])
    except (KeyError, ValueError):
        raise ForbiddenError("this upload URL is not signed") from None
    if (
        not hmac.compare_digest(
            sign(srv, f"{ns}/{name}", oid, size, exp, q.get("user", "")), q.get("sig", "")
        )
        or exp < time.time()
    ):
        raise ForbiddenError("this upload URL is not valid or has expired; ask the LFS batch API again")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) != size:
        raise BadRequestError(f"the body has {length} bytes, but the object was announced with {size}")
    repo = await run_in_threadpool(srv.store.repos.get_repo, ns, name)
    if repo is None or repo.repo_id != f"{ns}/{name}":
        raise RepoNotFoundError(f"{ns}/{name}")
    await receive_object(request, srv, oid, size, keep=not srv.store.blobs.has(oid))
    await run_in_threadpool(srv.store.gates.record_upload, repo, oid, q.get("user") or None)
    return JSONResponse({})


async def receive_object(request: Request, srv: Server, oid: str, size: int, *, keep: bool) -> None:
    """Stream the body, hashing it (into a temporary file when ``keep``); keep it only if it has the
    announced sha256 and size. Hashing and writing overlap with receiving the next chunk."""
    blobs = srv.store.blobs
    blobs.tmp.mkdir(parents=True, exist_ok=True)
    tmp = ""
    fd = -1
    if keep:
        fd, tmp = tempfile.mkstemp(dir=blobs.tmp, prefix=scratch_prefix("lfs"))
    h = hashlib.sha256()
    total = 0
    buf = bytearray()

    def flush(data: bytes | bytearray) -> None:
        h.update(data)
        if fd >= 0:
            _write_all(fd, data)

    loop = asyncio.get_running_loop()
    pending: asyncio.Future[None] | None = None
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > size:
                raise BadRequestError(f"the body is larger than the announced {size} bytes")
            buf += chunk
            if len(buf) >= WRITE_CHUNK:
                data, buf = buf, bytearray()
                if pending is not None:
                    await pending
                pending = loop.run_in_executor(None, flush, data)
        if pending is not None:
            await pending
            pending = None
        if buf:
            await run_in_threadpool(flush, buf)
        if fd >= 0:
            os.close(fd)
            fd = -1
        if total != size:
            raise BadRequestError(f"the body has {total} bytes, but the object was announced with {size}")
        if h.hexdigest() != oid:
            raise BadRequestError(f"the body's sha256 is {h.hexdigest()}, not the announced {oid}")
        if keep:
            await run_in_threadpool(blobs.commit, tmp, oid, size)
    finally:
        if pending is not None:
            await asyncio.wait([pending])
        if fd >= 0:
            os.close(fd)
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
