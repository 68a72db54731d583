"""vLLM's companion routes, in vLLM's shapes: ``GET /health``, ``GET /version``, ``POST /tokenize``,
``POST /detokenize`` (also under ``/v1``), ``GET /tokenizer_info`` (what lm-eval's remote tokenizer asks), ``POST
/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``; and the last route under ``/v1``: a 404 for an
unknown path, a 405 (with ``Allow``) for a known path asked with the wrong method, in OpenAI's shape.

``load_lora_adapter`` (``{"lora_name", "lora_path", "load_inplace"}``, a write token of ``lora_name``'s
namespace: only ``USER/...`` names, never one without a namespace): an absolute ``lora_path`` is a folder or
file inside one of the server's ``--lora-dir`` folders (after resolving symlinks; every other, missing or
invalid path gets the same answer, so the disk cannot be probed); any other ``lora_path`` (or none: then
``lora_name``) is a public Hub repo id, pulled as ``adapterhub pull`` without the server's credentials. The
content is cataloged under a scratch name, checked against the base, and only then takes ``lora_name``
(replacing the adapter there with ``load_inplace``, in one transaction) and is made resident; on any error
the catalog is as it was. ``unload_lora_adapter`` (``{"lora_name"}``, same tokens) drops the adapter's
content from memory; its catalog entry stays (``adapterhub rm`` removes it), so the next request for it
loads it again.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match

from ...errors import AdapterExistsError, AdapterHubError
from .http import read_body
from .requests import Message, parse_model
from .routes import refuse, token_of
from .service import Inference, Refusal

router = APIRouter()


def _svc(request: Request) -> Inference:
    svc: Inference = request.app.state.inference
    return svc


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


class TokenizeRequest(_Body):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[Message] | None = None
    add_special_tokens: StrictBool | None = None
    add_generation_prompt: StrictBool | None = None
    return_token_strs: StrictBool | None = None


class DetokenizeRequest(_Body):
    model: StrictStr | None = None
    tokens: list[StrictInt]


class LoadRequest(_Body):
    lora_name: StrictStr = Field(min_length=1, max_length=200)
    lora_path: StrictStr | None = Field(None, min_length=1, max_length=4096)
    load_inplace: StrictBool | None = None


async def _body(request: Request, svc: Inference, kind: type[BaseModel]) -> Any:
    token = await token_of(request, svc)
    if isinstance(token, Refusal):
        return token, None
    body = await read_body(request, svc.max_request_bytes, svc.body_timeout)
    if isinstance(body, Refusal):
        return body, None
    return parse_model(kind, body), token


@router.get("/health")
async def health(request: Request) -> Response:
    return Response(status_code=200)


@router.get("/version")
async def version(request: Request) -> Response:
    from ... import __version__

    return JSONResponse({"version": __version__})


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> Response:
    svc = _svc(request)
    token = await token_of(request, svc)
    if isinstance(token, Refusal):
        return refuse(svc, "tokenizer_info", token)
    tok = svc.tokenizer
    return JSONResponse(
        {
            "tokenizer_class": type(tok).__name__,
            "eos_token": tok.eos_token,
            "bos_token": tok.bos_token,
            "pad_token": tok.pad_token,
            "unk_token": getattr(tok, "unk_token", None),
            "chat_template": getattr(tok, "chat_template", None),
            "model_max_length": svc.engine.max_context,
            "vocab_size": svc.vocab,
            "add_bos_token": getattr(tok, "add_bos_token", None),
        }
    )


@router.post("/tokenize")
@router.post("/v1/tokenize", include_in_schema=False)
async def tokenize(request: Request) -> Response:
    from ...runtime.generate import chat_ids

    svc = _svc(request)
    req, _ = await _body(request, svc, TokenizeRequest)
    if isinstance(req, Refusal):
        return refuse(svc, "tokenize", req)
    if (req.prompt is None) == (req.messages is None):
        return refuse(svc, "tokenize", Refusal(400, "give prompt or messages", param="prompt"))
    if req.prompt is not None:
        if len(req.prompt) > svc.max_chars:
            return refuse(
                svc, "tokenize", Refusal(400, "the prompt is longer than the context", param="prompt")
            )
        special = req.add_special_tokens is not False
        ids = list(svc.tokenizer(req.prompt, add_special_tokens=special)["input_ids"])
    else:
        flat = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages
        ]
        if sum(len(m["content"]) for m in flat) > svc.max_chars:
            return refuse(
                svc, "tokenize", Refusal(400, "the messages are longer than the context", param="messages")
            )
        try:
            ids = await run_in_threadpool(chat_ids, svc.tokenizer, flat)
        except Exception as exc:
            return refuse(
                svc,
                "tokenize",
                Refusal(400, f"the chat template refuses these messages: {exc}", param="messages"),
            )
    out: dict[str, Any] = {
        "count": len(ids),
        "max_model_len": svc.engine.max_context,
        "tokens": ids,
        "token_strs": [svc.token_text(i) for i in ids] if req.return_token_strs else None,
    }
    return JSONResponse(out)


@router.post("/detokenize")
@router.post("/v1/detokenize", include_in_schema=False)
async def detokenize(request: Request) -> Response:
    svc = _svc(request)
    req, _ = await _body(request, svc, DetokenizeRequest)
    if isinstance(req, Refusal):
        return refuse(svc, "detokenize", req)
    bad = next((i for i in req.tokens if not 0 <= i < svc.vocab), None)
    if bad is not None:
        return refuse(
            svc,
            "detokenize",
            Refusal(400, f"token id {bad} is out of the vocabulary (size {svc.vocab})", param="tokens"),
        )
    return JSONResponse({"prompt": svc.tokenizer.decode(req.tokens)})


def _writer(token: Any, name: str) -> Refusal | None:
    """Only a write token of ``name``'s namespace: names without one (the operator's) are never written here."""
    if token is None:
        return Refusal(
            401,
            "loading adapters needs a write token (adapterhub token create USER --write)",
            code="invalid_api_key",
        )
    owner, sep, rest = name.partition("/")
    if not token.write or not sep or not rest or owner != token.user:
        return Refusal(
            403,
            f"this token may not write {name} (a write token of USER may write USER/...)",
            type="permission_error",
            code="forbidden",
        )
    return None


#: the one answer to every local path refused, missing or not an adapter (no probing of the disk)
BAD_PATH = (
    "lora_path is not an adapter this server may load: give a public Hub repo id, or a folder or file "
    "inside one of the server's --lora-dir folders"
)


def _inside(svc: Inference, path: str) -> str | None:
    """The real path of ``path`` when it lies inside one of the server's --lora-dir folders, else None."""
    try:
        real = os.path.realpath(path)
    except (OSError, ValueError):  # a NUL byte, a symlink loop
        return None
    if any(os.path.commonpath([d, real]) == d for d in svc.lora_dirs):
        return real
    return None


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request) -> Response:
    svc = _svc(request)
    req, token = await _body(request, svc, LoadRequest)
    if isinstance(req, Refusal):
        return refuse(svc, "load_lora_adapter", req)
    why = _writer(token, req.lora_name)
    if why is not None:
        return refuse(svc, "load_lora_adapter", why)
    result = await run_in_threadpool(_load, svc, req, token)
    if isinstance(result, Refusal):
        return refuse(svc, "load_lora_adapter", result)
    svc.metrics.request("load_lora_adapter", 200)
    return Response(f"Success: LoRA adapter '{req.lora_name}' added successfully.", media_type="text/plain")


def _load(svc: Inference, req: LoadRequest, token: Any) -> Refusal | None:
    name = req.lora_name
    taken = Refusal(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
    if not req.load_inplace and svc.pool.resolve(name) is not None:
        return taken
    path = req.lora_path or name
    scratch = f"{token.user}/loading-{secrets.token_hex(8)}"  # the new content's name until it is checked
    if os.path.isabs(path):
        real = _inside(svc, path)
        if real is None:
            return Refusal(400, BAD_PATH, param="lora_path")
        try:
            svc.hub.add_adapter(real, name=scratch)
        except Exception:  # whatever it was, the same answer (add_adapter leaves nothing behind)
            return Refusal(400, BAD_PATH, param="lora_path")
    else:
        try:  # public repos only: never the server's own HF_TOKEN or login
            svc.hub.pull_adapter(path, name=scratch, token=False)
        except AdapterHubError as exc:
            return Refusal(400, str(exc), param="lora_path")
    try:
        checked = svc.target(scratch, token)
        if isinstance(checked, Refusal):
            return Refusal(checked.status, checked.message.replace(scratch, name), param="lora_path")
        try:  # the name changes hands only now, in one transaction
            svc.hub.library.rename(scratch, name, replace=bool(req.load_inplace))
        except AdapterExistsError:
            return taken
    finally:
        if svc.hub.library.exists(scratch):
            svc.hub.remove_adapter(scratch)
    target = svc.target(name, token)
    if isinstance(target, Refusal):
        return target
    for entry in target.entries:
        svc.pool.request(entry)
    return None


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request) -> Response:
    svc = _svc(request)
    req, token = await _body(request, svc, LoadRequest)
    if isinstance(req, Refusal):
        return refuse(svc, "unload_lora_adapter", req)
    why = _writer(token, req.lora_name)
    if why is not None:
        return refuse(svc, "unload_lora_adapter", why)
    entry = await run_in_threadpool(svc.pool.resolve, req.lora_name)
    if entry is None:
        return refuse(
            svc,
            "unload_lora_adapter",
            Refusal(
                404,
                f"The lora adapter '{req.lora_name}' cannot be found.",
                param="lora_name",
                code="model_not_found",
            ),
        )
    await run_in_threadpool(
        svc.engine.run_exclusive, lambda: svc.pool.evict(entry.sha256, svc.engine.close_rows)
    )
    svc.metrics.request("unload_lora_adapter", 200)
    return Response(f"Success: LoRA adapter '{req.lora_name}' removed successfully.", media_type="text/plain")


def _known(request: Request) -> list[str]:
    """Methods of the routes whose path matches this request's (empty: no route has this path)."""
    from .routes import router as openai

    scope = dict(request.scope)
    allowed: list[str] = []
    for route in [*openai.routes, *router.routes]:
        if getattr(route, "path", "").startswith("/v1/{rest"):
            continue
        match, _ = route.matches({**scope, "method": "\0"})
        if match is Match.PARTIAL:
            allowed += sorted(getattr(route, "methods", ()) or ())
    return allowed


METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


@router.api_route("/v1/{rest:path}", methods=METHODS, include_in_schema=False)
async def unknown_v1(request: Request, rest: str) -> Response:
    allowed = _known(request)
    if allowed:
        return JSONResponse(
            Refusal(
                405,
                f"Method {request.method} is not allowed for /v1/{rest}; use {', '.join(allowed)}",
                code="method_not_allowed",
            ).body(),
            status_code=405,
            headers={"Allow": ", ".join(allowed)},
        )
    return JSONResponse(
        Refusal(404, f"Invalid URL ({request.method} /v1/{rest})", code="unknown_url").body(), status_code=404
    )
