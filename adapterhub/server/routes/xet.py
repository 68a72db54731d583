"""The Xet upload protocol, which huggingface_hub 2.x uses for every LFS file whenever hf_xet is installed
(it has no fallback to the LFS batch API), served by this server itself.

- ``GET /api/models/{repo}/xet-write-token/{rev}``: for a caller who may write to the repo (or open or
  push to a pull request of it), a short-lived access token bound to that repo and user, and the CAS address (``{casUrl, accessToken, exp}``, also as
  ``X-Xet-*`` headers).
- the CAS under ``/xet-cas``: ``POST /v1/xorbs/default/{hash}`` keeps a xorb for the token's repo;
  ``POST /v1/shards`` rebuilds each file a shard describes from xorbs the repo may use, checks its sha256
  and stores it as an upload to the repo (see `adapterhub.server.xetstore`); the commit then references it
  as an ``lfsFile`` by sha256, as after an LFS upload. ``/v2/shards`` is left to 404, and the client falls
  back to v1.
- global deduplication (``GET /v1/chunks/...``) always answers 404: answering would tell whether other
  repos hold a chunk. Reconstructions are not served either: ``resolve`` never sends ``X-Xet-Hash``, so
  clients download over plain HTTP.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ...errors import BadRequestError, UnauthorizedError
from ..deps import Server, auth, base_url, raw_parts, read_body, server, writable_for
from ..records import Repo, TokenInfo

router = APIRouter()
CAS_PREFIX = "/xet-cas"
XET_TOKEN_TTL = 3600
XORB_LIMIT = 128 * 1024 * 1024
SHARD_LIMIT = 128 * 1024 * 1024
TELEMETRY_LIMIT = 1024 * 1024
BAD_XET_TOKEN = "Invalid or expired Xet access token: ask /xet-write-token again"


@dataclass(frozen=True)
class XetCaller:
    repo: Repo
    user: str


def _sign(srv: Server, payload: str) -> str:
    return hmac.new(srv.secret, b"xet\n" + payload.encode(), hashlib.sha256).hexdigest()


def make_token(srv: Server, repo: Repo, tok: TokenInfo, exp: int) -> str:
    """An access token for writing to ``repo`` as ``tok``'s user until ``exp`` (or until that token is
    revoked), signed with the app's key."""
    doc = {"repo": repo.repo_id, "id": repo.id, "user": tok.user, "tok": tok.id, "exp": exp}
    payload = base64.urlsafe_b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode().rstrip("=")
    return f"{payload}.{_sign(srv, payload)}"


async def xet_caller(request: Request) -> XetCaller:
    """The repo and user of the Xet access token a CAS request carries; anything else is a 401."""
    srv = server(request)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    payload, _, sig = token.strip().partition(".")
    if scheme.lower() != "bearer" or not hmac.compare_digest(_sign(srv, payload), sig):
        raise UnauthorizedError(BAD_XET_TOKEN)
    try:
        doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        ns, name = doc["repo"].split("/")
        rid, user, tid, exp = int(doc["id"]), str(doc["user"]), int(doc["tok"]), int(doc["exp"])
    except (binascii.Error, ValueError, KeyError, TypeError, AttributeError):
        raise UnauthorizedError(BAD_XET_TOKEN) from None
    if exp < time.time():
        raise UnauthorizedError(BAD_XET_TOKEN)
    repo = await run_in_threadpool(srv.store.repos.get_repo, ns, name)
    if repo is None or repo.id != rid:
        raise UnauthorizedError(BAD_XET_TOKEN)
    tokens = await run_in_threadpool(lambda: srv.store.tokens.list(user=user))
    if not any(t.id == tid and t.write for t in tokens):  # revoked since
        raise UnauthorizedError(BAD_XET_TOKEN)
    return XetCaller(repo, user)


@router.get("/api/models/{ns}/{name}/xet-write-token/{rest:anypath}")
async def xet_write_token(
    request: Request, ns: str, name: str, tok: TokenInfo | None = Depends(auth)
) -> JSONResponse:
    srv = server(request)
    revision = "/".join(raw_parts(request, 5))
    repo = await writable_for(request, ns, name, tok, revision)  # a pull request's author may upload too
    assert tok is not None
    if revision and revision != "None":
        await run_in_threadpool(srv.store.repos.resolve, repo, revision)
    exp = int(time.time()) + XET_TOKEN_TTL
    token = make_token(srv, repo, tok, exp)
    cas = base_url(request) + CAS_PREFIX
    headers = {"X-Xet-Cas-Url": cas, "X-Xet-Access-Token": token, "X-Xet-Token-Expiration": str(exp)}
    return JSONResponse({"casUrl": cas, "accessToken": token, "exp": exp}, headers=headers)


@router.post(CAS_PREFIX + "/v1/xorbs/{prefix}/{xorb}")
async def upload_xorb(
    request: Request, prefix: str, xorb: str, caller: XetCaller = Depends(xet_caller)
) -> JSONResponse:
    if prefix != "default":
        raise BadRequestError(f"xorbs are uploaded under the prefix 'default', not {prefix!r}")
    body = await read_body(request, XORB_LIMIT, "a xorb")
    inserted = await run_in_threadpool(server(request).xet.add_xorb, caller.repo, caller.user, xorb, body)
    return JSONResponse({"was_inserted": inserted})


@router.post(CAS_PREFIX + "/v1/shards")
async def upload_shard(request: Request, caller: XetCaller = Depends(xet_caller)) -> JSONResponse:
    body = await read_body(request, SHARD_LIMIT, "a shard")
    await run_in_threadpool(server(request).xet.add_shard, caller.repo, caller.user, body)
    return JSONResponse({"result": 1})


@router.get(CAS_PREFIX + "/v1/chunks/{prefix}/{chunk}")
async def dedup_query(prefix: str, chunk: str, caller: XetCaller = Depends(xet_caller)) -> JSONResponse:
    """No global deduplication: whether any repo holds a chunk is not for a caller to learn."""
    return JSONResponse({"error": "no global deduplication on this server"}, status_code=404)


@router.post(CAS_PREFIX + "/v1/telemetry")
async def telemetry(request: Request) -> JSONResponse:
    await read_body(request, TELEMETRY_LIMIT, "telemetry")
    return JSONResponse({})
