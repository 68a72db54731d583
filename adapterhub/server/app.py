"""The Hub-compatible HTTP API (FastAPI), over `ServerStore`.

It speaks what the huggingface_hub client calls, without Xet: whoami, repo create/delete, model info
and listing, tree, refs and commits, preupload, the git-LFS batch API (upload by ``PUT`` to a signed
URL, then verify), NDJSON commits, ``resolve`` (HEAD/GET with ranges) and ``validate-yaml``. Errors carry
the Hub's shapes (JSON ``{"error": ...}``, ``X-Error-Code``), and a private repo is a 404 to anyone but
its owner.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import time
from typing import Any
from urllib.parse import unquote, urlencode

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor
from starlette.responses import FileResponse

from .errors import HubHTTPError, bad_request, entry_not_found, repo_not_found, too_large
from .storage import (
    NAME_RE,
    OID_RE,
    SHA256_RE,
    Commit,
    Entry,
    Op,
    Repo,
    ServerStore,
    TokenInfo,
    card_tags,
    check_name,
    check_path,
    decode_base64,
    iso,
    parse_card,
    upload_mode,
)

log = logging.getLogger(__name__)


class _AnyPath(Convertor[str]):
    """Like Starlette's ``path``, but matching control characters too (a percent-encoded newline in a
    file name must reach the route and get the Hub's EntryNotFound, not fall through to a bare 404)."""

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anypath", _AnyPath())

JSON_LIMIT = 16 * 1024 * 1024
COMMIT_LIMIT = 512 * 1024 * 1024
REGULAR_FILE_LIMIT = 64 * 1024 * 1024
LFS_OBJECT_LIMIT = 64 * 1024**3
UPLOAD_URL_TTL = 3600
WRITE_CHUNK = 4 * 1024 * 1024


class _BlobResponse(FileResponse):
    chunk_size = 4 * 1024 * 1024


def header_safe(value: str, limit: int = 1000) -> str:
    """``value`` as an HTTP header value: printable ASCII only (control characters escaped, others '?'),
    at most ``limit`` characters. A raw NUL or newline in a header would make the server drop the reply."""
    out = []
    for ch in value[:limit]:
        o = ord(ch)
        if 0x20 <= o < 0x7F:
            out.append(ch)
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\x{o:02x}")
        else:
            out.append("?")
    return "".join(out)


def _error(exc: HubHTTPError) -> JSONResponse:
    headers = {k: header_safe(v) for k, v in exc.headers.items()}
    if exc.code:
        headers["X-Error-Code"] = exc.code
    headers["X-Error-Message"] = header_safe(exc.message)
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)


def query_int(request: Request, name: str, default: int, *, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(f"{name} must be an integer, not {raw!r}") from None
    if not low <= value <= high:
        raise bad_request(f"{name} must be between {low} and {high}, not {value}")
    return value


def loads(data: bytes | str, what: str) -> Any:
    """JSON that is malformed or nested too deeply for the parser is the client's error."""
    try:
        return json.loads(data)
    except RecursionError:
        raise bad_request(f"{what} is nested too deeply") from None
    except ValueError as exc:
        raise bad_request(f"{what} is not valid JSON: {exc}") from None


def create_app(store: ServerStore) -> FastAPI:
    app = FastAPI(title="adapterhub server", docs_url=None, redoc_url=None, openapi_url=None)
    secret = secrets.token_bytes(32)

    @app.exception_handler(HubHTTPError)
    async def _on_hub_error(_request: Request, exc: HubHTTPError) -> JSONResponse:
        return _error(exc)

    # ------------------------------------------------------------------ helpers
    async def auth(request: Request) -> TokenInfo | None:
        header = request.headers.get("authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        info = await run_in_threadpool(store.authenticate, token)
        if info is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return info

    def segments(request: Request, skip: int) -> list[str]:
        """The request path split on '/' before percent-decoding (so a quoted 'a%2Fb' stays one part)."""
        raw = request.scope.get("raw_path") or request.url.path.encode()
        parts = raw.decode("latin-1").split("?", 1)[0].split("/")[1:]
        return [unquote(p) for p in parts[skip:]]

    async def visible(ns: str, name: str, tok: TokenInfo | None) -> Repo:
        if not NAME_RE.match(ns) or not NAME_RE.match(name):
            raise repo_not_found(f"{ns}/{name}")
        repo = await run_in_threadpool(store.get_repo, ns, name)
        if repo is None or (repo.private and (tok is None or tok.user != repo.namespace)):
            raise repo_not_found(f"{ns}/{name}")
        return repo

    async def writable(ns: str, name: str, tok: TokenInfo | None) -> Repo:
        repo = await visible(ns, name, tok)
        check_write(tok, ns)
        return repo

    def check_write(tok: TokenInfo | None, ns: str) -> TokenInfo:
        if tok is None:
            raise HubHTTPError(
                401,
                "Authentication required: send a write token of the namespace owner (adapterhub token create USER --write)",
            )
        if tok.user != ns:
            raise HubHTTPError(
                403, f"You don't have the rights to write to {ns}: your token belongs to {tok.user}"
            )
        if not tok.write:
            raise HubHTTPError(
                403, "This token is read-only: create a write token (adapterhub token create USER --write)"
            )
        return tok

    async def read_body(request: Request, limit: int, what: str) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large(what, limit)
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise too_large(what, limit)
        return bytes(buf)

    async def read_json(request: Request, limit: int = JSON_LIMIT) -> Any:
        body = await read_body(request, limit, "the request body")
        return await run_in_threadpool(loads, body or b"{}", "the request body")

    def base(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    def sign(repo_id: str, oid: str, size: int, exp: int) -> str:
        return hmac.new(secret, f"{repo_id}\n{oid}\n{size}\n{exp}".encode(), hashlib.sha256).hexdigest()

    def model_json(
        request: Request, repo: Repo, commit: Commit, files: dict[str, Entry] | None, blobs: bool
    ) -> dict[str, Any]:
        tags, library = card_tags(commit.card)
        d: dict[str, Any] = {
            "_id": f"{repo.id:024x}",
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.namespace,
            "sha": commit.oid,
            "lastModified": iso(commit.created_at),
            "createdAt": iso(repo.created_at),
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "library_name": library,
        }
        if commit.card is not None:
            d["cardData"] = commit.card
        if files is not None:
            sib = []
            for e in files.values():
                s: dict[str, Any] = {"rfilename": e.path}
                if blobs:
                    s.update(size=e.size, blobId=e.blob_oid)
                    if e.lfs:
                        s["lfs"] = {"size": e.size, "sha256": e.sha256, "pointerSize": e.pointer_size}
                sib.append(s)
            d["siblings"] = sib
        return d

    def tree_entry(e: Entry) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "file", "oid": e.blob_oid, "size": e.size, "path": e.path}
        if e.lfs:
            d["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": e.pointer_size}
        return d

    # ------------------------------------------------------------------ account
    @app.get("/api/whoami-v2")
    async def whoami(request: Request) -> JSONResponse:
        tok = await auth(request)
        if tok is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        role = "write" if tok.write else "read"
        return JSONResponse(
            {
                "type": "user",
                "id": f"{tok.id:024x}",
                "name": tok.user,
                "fullname": tok.user,
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": f"token {tok.id}", "role": role},
                },
            }
        )

    # ------------------------------------------------------------------ repos
    def repo_target(body: Any, tok: TokenInfo | None) -> tuple[str, str]:
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            raise bad_request("give the repo as JSON {name, organization}")
        if body.get("type", "model") not in ("model", None):
            raise bad_request("this server holds model repos only")
        name = body["name"]
        ns = body.get("organization") or (tok.user if tok else None)
        if "/" in name and not body.get("organization"):
            ns, name = name.split("/", 1)
        if not isinstance(ns, str) or not ns:
            raise HubHTTPError(401, "Authentication required to create a repo without an organization")
        return ns, name

    @app.post("/api/repos/create")
    async def create_repo(request: Request) -> JSONResponse:
        tok = await auth(request)
        body = await read_json(request)
        ns, name = repo_target(body, tok)
        check_name("namespace", ns)
        check_name("repo name", name)
        url = f"{base(request)}/{ns}/{name}"
        existing = await run_in_threadpool(store.get_repo, ns, name)
        if existing is not None and not (existing.private and (tok is None or tok.user != ns)):
            check_write(tok, ns)
            return JSONResponse({"error": "You already created this model repo", "url": url}, status_code=409)
        writer = check_write(tok, ns)
        private = body.get("private")
        if body.get("visibility") is not None:
            private = body.get("visibility") == "private"
        try:
            repo = await run_in_threadpool(
                store.create_repo, ns, name, private=bool(private), author=writer.user
            )
        except HubHTTPError as exc:
            if exc.status == 409:
                return JSONResponse({"error": exc.message, "url": url}, status_code=409)
            raise
        log.info("created repo %s (private=%s)", repo.repo_id, repo.private)
        return JSONResponse({"url": url, "name": repo.repo_id, "id": f"{repo.id:024x}"})

    @app.delete("/api/repos/delete")
    async def delete_repo(request: Request) -> JSONResponse:
        tok = await auth(request)
        body = await read_json(request)
        ns, name = repo_target(body, tok)
        repo = await writable(ns, name, tok)
        await run_in_threadpool(store.delete_repo, repo)
        log.info("deleted repo %s", repo.repo_id)
        return JSONResponse({})

    @app.post("/api/validate-yaml")
    async def validate_yaml(request: Request) -> JSONResponse:
        body = await read_json(request)
        content = body.get("content") if isinstance(body, dict) else None
        if not isinstance(content, str):
            raise bad_request("give {content: <README.md text>}")
        try:  # off the event loop: a hostile card must not stall other requests
            await run_in_threadpool(parse_card, content.encode())
        except ValueError as exc:
            msg = f"Invalid YAML in the metadata block of README.md: {str(exc).splitlines()[0]}"
            return JSONResponse({"errors": [{"message": msg}], "warnings": [], "error": msg}, status_code=400)
        return JSONResponse({"errors": [], "warnings": []})

    # ------------------------------------------------------------------ listing
    @app.get("/api/models")
    async def list_models(request: Request) -> JSONResponse:
        tok = await auth(request)
        q = request.query_params
        search = (q.get("search") or "").lower()
        author = q.get("author")
        filters = [f for f in q.getlist("filter") if f]
        library = q.get("library")
        base_model = (q.get("base_model") or "").lower()
        limit = query_int(request, "limit", 1000, low=1, high=1000)
        full = q.get("full") in ("1", "true", "True")
        rows = await run_in_threadpool(store.visible_repos, tok.user if tok else None)
        out = []
        for repo, head in rows:
            tags, lib = card_tags(head.card)
            if search and search not in repo.repo_id.lower():
                continue
            if author and repo.namespace != author:
                continue
            if library and (lib or "").lower() != library.lower() and library not in tags:
                continue
            if any(f not in tags and f != lib for f in filters):
                continue
            if base_model:
                bases = (head.card or {}).get("base_model") or []
                bases = bases if isinstance(bases, list) else [bases]
                if base_model not in [str(b).lower() for b in bases]:
                    continue
            files = await run_in_threadpool(store.files, head) if full else None
            out.append(model_json(request, repo, head, files, False))
            if len(out) >= limit:
                break
        return JSONResponse(out)

    # ------------------------------------------------------------------ /api/models/{ns}/{name}/...
    @app.api_route("/api/models/{rest:anypath}", methods=["GET", "POST", "DELETE"])
    async def model_api(request: Request, rest: str) -> Response:
        seg = segments(request, 2)
        if len(seg) < 2:
            raise repo_not_found("/".join(seg))
        ns, name, action, args = seg[0], seg[1], (seg[2] if len(seg) > 2 else None), seg[3:]
        tok = await auth(request)
        method = request.method
        if method == "GET" and action is None:
            return await model_info(request, ns, name, tok, "main")
        if method == "GET" and action == "revision" and args:
            return await model_info(request, ns, name, tok, "/".join(args))
        if method == "GET" and action == "tree" and args:
            return await tree(request, ns, name, tok, args[0], "/".join(args[1:]))
        if method == "GET" and action == "refs":
            repo = await visible(ns, name, tok)
            refs = await run_in_threadpool(store.refs, repo)
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": o} for n, o in refs]
            return JSONResponse({"branches": branches, "converts": [], "tags": [], "pullRequests": []})
        if method == "GET" and action == "commits" and args:
            repo = await visible(ns, name, tok)
            head = await run_in_threadpool(store.resolve, repo, args[0])
            hist = await run_in_threadpool(store.history, repo, head)
            return JSONResponse(
                [
                    {
                        "id": c.oid,
                        "title": c.title,
                        "message": c.message,
                        "date": iso(c.created_at),
                        "authors": [{"user": c.author or "unknown"}],
                    }  # fmt: skip
                    for c in hist
                ]
            )
        if method == "POST" and action == "preupload" and args:
            return await preupload(request, ns, name, tok, args[0])
        if method == "POST" and action == "commit" and args:
            return await commit(request, ns, name, tok, "/".join(args))
        if action == "branch" and args and method in ("POST", "DELETE"):
            repo = await writable(ns, name, tok)
            branch = "/".join(args)
            if method == "POST":
                body = await read_json(request)
                start = body.get("startingPoint") if isinstance(body, dict) else None
                await run_in_threadpool(store.create_branch, repo, branch, starting_point=start)
            else:
                await run_in_threadpool(store.delete_branch, repo, branch)
            return JSONResponse({})
        raise HubHTTPError(404, f"no such endpoint: {method} {request.url.path}")

    async def model_info(
        request: Request, ns: str, name: str, tok: TokenInfo | None, rev: str
    ) -> JSONResponse:
        repo = await visible(ns, name, tok)
        head = await run_in_threadpool(store.resolve, repo, rev)
        files = await run_in_threadpool(store.files, head)
        blobs = request.query_params.get("blobs") in ("1", "true", "True")
        return JSONResponse(model_json(request, repo, head, files, blobs))

    async def tree(
        request: Request, ns: str, name: str, tok: TokenInfo | None, rev: str, path: str
    ) -> JSONResponse:
        repo = await visible(ns, name, tok)
        head = await run_in_threadpool(store.resolve, repo, rev)
        files = await run_in_threadpool(store.files, head)
        recursive = request.query_params.get("recursive", "").lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            raise entry_not_found(path, head.oid)
        out: list[dict[str, Any]] = []
        dirs: dict[str, None] = {}
        for p, e in files.items():
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix) :]
            parts = rel.split("/")
            for i in range(1, len(parts)):
                d = prefix + "/".join(parts[:i])
                if recursive or i == 1:
                    dirs.setdefault(d)
            if recursive or len(parts) == 1:
                out.append(tree_entry(e))
        for d in dirs:
            oid = hashlib.sha1(f"{head.oid}:{d}".encode()).hexdigest()
            out.append({"type": "directory", "oid": oid, "size": 0, "path": d})
        out.sort(key=lambda x: x["path"])
        return JSONResponse(out)

    async def preupload(
        request: Request, ns: str, name: str, tok: TokenInfo | None, rev: str
    ) -> JSONResponse:
        repo = await writable(ns, name, tok)
        if request.query_params.get("create_pr"):
            raise bad_request("pull requests are not supported by this server")
        body = await read_json(request)
        files = body.get("files") if isinstance(body, dict) else None
        if not isinstance(files, list) or len(files) > 1000:
            raise bad_request("give {files: [{path, sample, size}, ...]} (at most 1000 files)")
        head = await run_in_threadpool(store.resolve, repo, rev)
        current = await run_in_threadpool(store.files, head)
        out = []
        for f in files:
            if not isinstance(f, dict) or not isinstance(f.get("size"), int) or f["size"] < 0:
                raise bad_request("each file needs a path, a base64 sample and an integer size")
            path = check_path(f.get("path"))
            sample = decode_base64(f.get("sample", ""), path)
            mode = upload_mode(path, f["size"], sample)
            existing = current.get(path)
            oid = None
            if existing is not None:
                oid = existing.sha256 if mode == "lfs" else existing.blob_oid
            out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return JSONResponse({"files": out, "commitOid": head.oid})

    async def commit(
        request: Request, ns: str, name: str, tok: TokenInfo | None, branch: str
    ) -> JSONResponse:
        repo = await writable(ns, name, tok)
        assert tok is not None
        if request.query_params.get("create_pr"):
            raise bad_request("pull requests are not supported by this server")
        body = await read_body(request, COMMIT_LIMIT, "the commit payload")
        title, message, parent, ops = await run_in_threadpool(parse_commit, body)
        new, _changed = await run_in_threadpool(
            lambda: store.commit(
                repo, branch, ops, title=title, message=message, author=tok.user, parent_commit=parent
            )
        )
        url = f"{base(request)}/{repo.repo_id}/commit/{new.oid}"
        return JSONResponse({"success": True, "commitOid": new.oid, "commitUrl": url, "pullRequestUrl": None})

    # ------------------------------------------------------------------ LFS
    @app.post("/{ns}/{repo_git}/info/lfs/objects/batch")
    async def lfs_batch(request: Request, ns: str, repo_git: str) -> JSONResponse:
        if not repo_git.endswith(".git"):
            raise HubHTTPError(404, "not found")
        name = repo_git[: -len(".git")]
        tok = await auth(request)
        body = await read_json(request)
        if not isinstance(body, dict) or body.get("operation") != "upload":
            raise bad_request(
                "this server's LFS batch API takes operation 'upload' only; download with /resolve"
            )
        repo = await writable(ns, name, tok)
        objs = body.get("objects")
        if not isinstance(objs, list) or len(objs) > 10_000:
            raise bad_request("give objects: [{oid, size}, ...]")
        exp = int(time.time()) + UPLOAD_URL_TTL
        out = []
        for o in objs:
            oid, size = (o.get("oid"), o.get("size")) if isinstance(o, dict) else (None, None)
            if not isinstance(oid, str) or not SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                out.append({"oid": str(oid), "size": size if isinstance(size, int) else 0,
                            "error": {"code": 422, "message": "oid must be a sha256 (64 hex digits) and size an integer"}})  # fmt: skip
                continue
            if size > LFS_OBJECT_LIMIT:
                out.append(
                    {
                        "oid": oid,
                        "size": size,
                        "error": {"code": 413, "message": f"object larger than {LFS_OBJECT_LIMIT} bytes"},
                    }
                )
                continue
            # "already there" only for what this commit could reference anyway: never a probe of other repos
            have = await run_in_threadpool(store.referable_size, repo, tok.user if tok else None, oid)
            if have == size:
                out.append({"oid": oid, "size": size, "authenticated": True})
                continue
            query = urlencode({"size": size, "exp": exp, "sig": sign(repo.repo_id, oid, size, exp)})
            out.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": {
                            "href": f"{base(request)}/lfs-upload/{repo.repo_id}/{oid}?{query}",
                            "expires_in": UPLOAD_URL_TTL,
                        },
                        "verify": {"href": f"{base(request)}/{repo.repo_id}.git/info/lfs/objects/verify"},
                    },
                }
            )
        return JSONResponse({"transfer": "basic", "objects": out, "hash_algo": "sha256"},
                            media_type="application/vnd.git-lfs+json")  # fmt: skip

    @app.post("/{ns}/{repo_git}/info/lfs/objects/verify")
    async def lfs_verify(request: Request, ns: str, repo_git: str) -> JSONResponse:
        if not repo_git.endswith(".git"):
            raise HubHTTPError(404, "not found")
        tok = await auth(request)
        repo = await writable(ns, repo_git[: -len(".git")], tok)
        body = await read_json(request)
        oid, size = (body.get("oid"), body.get("size")) if isinstance(body, dict) else (None, None)
        if not isinstance(oid, str) or not SHA256_RE.match(oid):
            raise bad_request("give {oid, size}")
        have = await run_in_threadpool(store.referable_size, repo, tok.user if tok else None, oid)
        if have is None or (isinstance(size, int) and have != size):
            raise HubHTTPError(404, f"LFS object {oid} was not uploaded")
        return JSONResponse({})

    @app.put("/lfs-upload/{ns}/{name}/{oid}")
    async def lfs_upload(request: Request, ns: str, name: str, oid: str) -> JSONResponse:
        q = request.query_params
        try:
            size, exp = int(q["size"]), int(q["exp"])
        except (KeyError, ValueError):
            raise HubHTTPError(403, "this upload URL is not signed") from None
        if (
            not hmac.compare_digest(sign(f"{ns}/{name}", oid, size, exp), q.get("sig", ""))
            or exp < time.time()
        ):
            raise HubHTTPError(
                403, "this upload URL is not valid or has expired; ask the LFS batch API again"
            )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) != size:
            raise HubHTTPError(400, f"the body has {length} bytes, but the object was announced with {size}")
        repo = await run_in_threadpool(store.get_repo, ns, name)
        if repo is None:
            raise repo_not_found(f"{ns}/{name}")
        # the bytes are read and checked even when the store holds them already: the upload is the proof
        # that the uploader has the content, which is what lets this repo reference the object
        await receive_object(request, oid, size, keep=not store.blobs.has(oid))
        await run_in_threadpool(store.record_upload, repo, oid)
        return JSONResponse({})

    async def receive_object(request: Request, oid: str, size: int, *, keep: bool) -> None:
        """Stream the body, hashing it (to a temporary file when ``keep``); keep it only if it has the
        announced sha256 and size."""
        blobs = store.blobs
        blobs.tmp.mkdir(parents=True, exist_ok=True)
        blobs.objects.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=blobs.tmp, prefix="lfs-")
        if not keep:
            os.close(fd)
            os.unlink(tmp)
            fd = -1
        h = hashlib.sha256()
        total = 0
        buf = bytearray()

        def flush(data: bytes | bytearray) -> None:
            h.update(data)
            if fd >= 0:
                _write_all(fd, data)

        loop = asyncio.get_running_loop()
        pending: asyncio.Future[None] | None = None  # hashing + writing overlap with receiving the next chunk
        try:
            async for chunk in request.stream():
                total += len(chunk)
                if total > size:
                    raise HubHTTPError(400, f"the body is larger than the announced {size} bytes")
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
                raise HubHTTPError(
                    400, f"the body has {total} bytes, but the object was announced with {size}"
                )
            if h.hexdigest() != oid:
                raise HubHTTPError(400, f"the body's sha256 is {h.hexdigest()}, not the announced {oid}")
            if keep:
                await run_in_threadpool(blobs._commit, tmp, oid, size)
        finally:
            if pending is not None:
                await asyncio.wait([pending])
            if fd >= 0:
                os.close(fd)
            if os.path.exists(tmp):
                os.unlink(tmp)

    # ------------------------------------------------------------------ downloads
    @app.api_route("/{ns}/{name}/resolve/{rest:anypath}", methods=["GET", "HEAD"])
    async def resolve(request: Request, ns: str, name: str, rest: str) -> Response:
        seg = segments(request, 3)
        if len(seg) < 2:
            raise entry_not_found(rest)
        rev, path = seg[0], "/".join(seg[1:])
        tok = await auth(request)
        repo = await visible(ns, name, tok)
        head = await run_in_threadpool(store.resolve, repo, rev)
        files = await run_in_threadpool(store.files, head)
        e = files.get(path)
        if e is None:
            raise entry_not_found(path, head.oid)
        blob = store.blobs.path(e.sha256)
        if not blob.is_file():
            raise HubHTTPError(500, f"{path}: the stored object {e.sha256} is missing on the server")
        headers = {"ETag": f'"{e.etag}"', "X-Repo-Commit": head.oid, "Cache-Control": "private, max-age=0"}
        if e.lfs:
            headers.update({"X-Linked-Etag": f'"{e.sha256}"', "X-Linked-Size": str(e.size)})
        return _BlobResponse(blob, headers=headers, media_type="application/octet-stream")

    @app.get("/{ns}/{name}/commit/{oid}")
    async def show_commit(request: Request, ns: str, name: str, oid: str) -> JSONResponse:
        tok = await auth(request)
        repo = await visible(ns, name, tok)
        c = await run_in_threadpool(store.resolve, repo, oid)
        files = await run_in_threadpool(store.files, c)
        return JSONResponse(
            {
                "id": c.oid,
                "parent": c.parent_oid,
                "title": c.title,
                "message": c.message,
                "author": c.author,
                "date": iso(c.created_at),
                "files": [tree_entry(e) for e in files.values()],
            }  # fmt: skip
        )

    return app


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def parse_commit(body: bytes) -> tuple[str, str, str | None, list[Op]]:
    """The NDJSON commit payload -> (summary, description, parent commit, operations), checked line by line."""
    title: str | None = None
    message = ""
    parent: str | None = None
    ops: list[Op] = []
    for n, line in enumerate(body.split(b"\n"), 1):
        if not line.strip():
            continue
        item = loads(line, f"malformed NDJSON commit payload: line {n}")
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("key"), str)
            or not isinstance(item.get("value"), dict)
        ):
            raise bad_request(f"malformed NDJSON commit payload, line {n}: expected {{key, value}}")
        key, value = item["key"], item["value"]
        if key == "header":
            if title is not None:
                raise bad_request(f"malformed NDJSON commit payload, line {n}: a second header")
            if not isinstance(value.get("summary"), str) or not value["summary"].strip():
                raise bad_request("the commit header needs a non-empty summary")
            title = value["summary"]
            message = str(value.get("description") or "")
            parent = value.get("parentCommit")
            continue
        if title is None:
            raise bad_request("malformed NDJSON commit payload: the first line must be the header")
        path = check_path(value.get("path"))
        if key == "file":
            if value.get("encoding", "base64") != "base64":
                raise bad_request(f"{path}: only base64 file content is supported")
            content = decode_base64(value.get("content"), path)
            if len(content) > REGULAR_FILE_LIMIT:
                raise too_large(f"{path} (a regular file; upload it through LFS)", REGULAR_FILE_LIMIT)
            ops.append(Op("file", path, content=content))
        elif key == "lfsFile":
            size = value.get("size")
            if value.get("algo", "sha256") != "sha256" or (size is not None and not isinstance(size, int)):
                raise bad_request(f"{path}: lfsFile needs algo sha256, an oid and an integer size")
            ops.append(Op("lfs", path, oid=value.get("oid"), size=size))
        elif key == "deletedFile":
            ops.append(Op("delete", path))
        elif key == "deletedFolder":
            ops.append(Op("delete_folder", path))
        else:
            raise bad_request(f"malformed NDJSON commit payload, line {n}: unknown key {key!r}")
    if title is None:
        raise bad_request("malformed NDJSON commit payload: no header line")
    if parent is not None and (not isinstance(parent, str) or not OID_RE.match(parent)):
        raise bad_request("parentCommit must be a commit id")
    return title, message, parent, ops
