"""``/{owner}/{name}/raw/{path}?rev=...``: one file of a hosted repo for the browser, read with the login
cookie (the API's ``resolve`` wants an Authorization header, which a page's link cannot send).

A repo's files are untrusted: they are served as downloads (``Content-Disposition: attachment``), except
raster images that a card shows, always with ``nosniff`` and a sandboxing Content-Security-Policy, so
no file can run script on this site."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from ...errors import RevisionNotFoundError
from ..checks import is_name
from ..deps import may_read
from ..records import TokenInfo
from .state import store_of

IMAGES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
}


def locate(
    request: Request, owner: str, name: str, path: str, rev: str, user: TokenInfo | None
) -> Path | None:
    if not is_name(owner) or not is_name(name):
        return None
    store = store_of(request)
    repo = store.repos.get_repo(owner, name)
    if repo is None or not may_read(repo, user):
        return None
    try:
        entry = store.repos.files(store.repos.resolve(repo, rev)).get(path)
    except RevisionNotFoundError:
        return None
    return None if entry is None else store.blobs.path(entry.sha256)


async def raw_file(
    request: Request, owner: str, name: str, path: str, user: TokenInfo | None
) -> Response | None:
    """The file, or None when there is no such file the caller may read."""
    rev = request.query_params.get("rev", "main")[:200] or "main"
    blob = await run_in_threadpool(locate, request, owner, name, path, rev, user)
    if blob is None:
        return None
    kind = IMAGES.get(Path(path).suffix.lower())
    headers = {
        "Content-Security-Policy": "default-src 'none'; sandbox",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "private, no-cache",
        "Referrer-Policy": "same-origin",
    }
    if kind is None:
        headers["Content-Disposition"] = f"attachment; filename*=UTF-8''{quote(Path(path).name, safe='')}"
    return FileResponse(blob, media_type=kind or "application/octet-stream", headers=headers)
