"""The OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``, and ``/metrics``. Errors take OpenAI's shape ``{"error": {message, type, param,
code}}``; a full queue is a 429 with ``Retry-After``."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ...errors import AdapterHubError, RepoError
from .engine import Job, Sampling
from .http import read_body
from .service import Inference, Refusal, Target

router = APIRouter()


def _svc(request: Request) -> Inference:
    svc: Inference = request.app.state.inference
    return svc


def refuse(svc: Inference, endpoint: str, r: Refusal) -> JSONResponse:
    svc.metrics.request(endpoint, r.status)
    headers = {"Retry-After": str(r.retry_after)} if r.retry_after is not None else None
    return JSONResponse(r.body(), status_code=r.status, headers=headers)


def _from_error(exc: AdapterHubError) -> Refusal:
    status = exc.status if isinstance(exc, RepoError) else 400
    return Refusal(status, str(exc) if not isinstance(exc, RepoError) else exc.message)


async def _token(request: Request, svc: Inference) -> Any:
    """The caller's token (None for none, or for a bearer that is no token of this server, unless tokens
    are required), or a 401 `Refusal`."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    value = value.strip()
    info = None
    if scheme.lower() == "bearer" and value and len(value) <= 512:
        info = await run_in_threadpool(request.app.state.server.store.tokens.authenticate, value)
    if info is None and svc.require_token:
        return Refusal(
            401,
            "This server requires a token: send one of this server's tokens as the API key "
            "(adapterhub token create USER)",
            code="invalid_api_key",
        )
    return info


async def _prepare(
    request: Request, svc: Inference, endpoint: str
) -> tuple[dict[str, Any], Target] | Refusal:
    token = await _token(request, svc)
    if isinstance(token, Refusal):
        return token
    body = await read_body(request, svc.max_request_bytes, svc.body_timeout)
    if isinstance(body, Refusal):
        return body
    if not isinstance(body, dict):
        return Refusal(400, "the request body must be a JSON object")
    target = await run_in_threadpool(svc.target, body.get("model"), token)
    if isinstance(target, Refusal):
        return target
    if endpoint == "embeddings" and svc.causal:
        return Refusal(
            400, f"{svc.name} is a causal LM; embeddings need an encoder base (MiniLM, say)", param="model"
        )
    if endpoint != "embeddings" and not svc.causal:
        return Refusal(400, f"{svc.name} is an encoder; it answers /v1/embeddings only", param="model")
    return body, target


def _sampling(body: dict[str, Any], svc: Inference, prompt_len: int) -> Sampling | Refusal:
    try:
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        room = svc.engine.max_context - prompt_len
        max_tokens = room if max_tokens is None else int(max_tokens)
        temperature = float(body["temperature"]) if body.get("temperature") is not None else 1.0
        top_p = float(body["top_p"]) if body.get("top_p") is not None else 1.0
        seed = int(body["seed"]) if body.get("seed") is not None else None
    except (TypeError, ValueError):
        return Refusal(400, "max_tokens, temperature, top_p and seed must be numbers")
    if max_tokens < 1:
        return Refusal(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    if room < 1:
        return Refusal(400, f"the prompt has {prompt_len} tokens; this model's context is {svc.engine.max_context}",
                       param="messages", code="context_length_exceeded")  # fmt: skip
    if not 0 <= temperature <= 2 or not 0 < top_p <= 1:
        return Refusal(400, "temperature must be in [0, 2] and top_p in (0, 1]", param="temperature")
    if int(body.get("n") or 1) != 1:
        return Refusal(400, "n must be 1 (one choice per request)", param="n")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or not all(isinstance(s, str) for s in stops):
        return Refusal(400, "stop is a string or a list of up to 4 strings", param="stop")
    return Sampling(min(max_tokens, room), temperature, top_p, seed, tuple(stops))


class _Feed:
    """Events of one job, handed from the scheduler thread to the event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def __call__(self, event: tuple[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def _usage(done: dict[str, Any]) -> dict[str, int]:
    p, c = int(done["prompt_tokens"]), int(done["completion_tokens"])
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _generate(request: Request, endpoint: str, chat: bool) -> Response:
    svc = _svc(request)
    prepared = await _prepare(request, svc, endpoint)
    if isinstance(prepared, Refusal):
        return refuse(svc, endpoint, prepared)
    body, target = prepared
    prompt = await run_in_threadpool(_prompt_ids, svc, body, chat)
    if isinstance(prompt, Refusal):
        return refuse(svc, endpoint, prompt)
    sampling = _sampling(body, svc, len(prompt))
    if isinstance(sampling, Refusal):
        return refuse(svc, endpoint, sampling)
    for entry in target.entries:
        svc.pool.request(entry)
    feed = _Feed()
    job = Job(prompt, sampling, target.spec, feed)
    if not svc.engine.submit(job):
        return refuse(svc, endpoint, Refusal(429, "the server is busy: too many requests are waiting; retry shortly",
                                             type="rate_limit_error", code="overloaded", retry_after=1))  # fmt: skip
    svc.metrics.request(endpoint, 200)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    model = body["model"]
    if body.get("stream"):
        include = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(_stream(job, feed, rid, model, chat, include), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
    text: list[str] = []
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(feed.queue.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return Response(status_code=499)
                continue
            if kind == "text":
                text.append(value)
            elif kind == "error":
                return _job_error(value)
            else:
                break
    finally:
        if job.finish is None:
            job.cancel()
    created = int(time.time())
    content = value["text"]
    choice: dict[str, Any] = (
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": value["finish_reason"], "logprobs": None}
        if chat
        else {"index": 0, "text": content, "finish_reason": value["finish_reason"], "logprobs": None}
    )  # fmt: skip
    return JSONResponse(
        {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created, "model": model,
         "choices": [choice], "usage": _usage(value)}
    )  # fmt: skip


def _job_error(exc: BaseException) -> JSONResponse:
    r = (
        _from_error(exc)
        if isinstance(exc, AdapterHubError)
        else Refusal(500, f"inference failed: {exc}", type="server_error")
    )
    return JSONResponse(r.body(), status_code=r.status)


def _sse(obj: dict[str, Any]) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


async def _stream(
    job: Job, feed: _Feed, rid: str, model: str, chat: bool, include_usage: bool
) -> AsyncIterator[str]:
    created = int(time.time())
    kind_name = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if chat:
            d: dict[str, Any] = (
                {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
            )
            c: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
        else:
            c = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return {"id": rid, "object": kind_name, "created": created, "model": model, "choices": [c]}

    try:
        if chat:
            yield _sse(chunk(None, None, role=True))
        while True:
            kind, value = await feed.queue.get()
            if kind == "text":
                yield _sse(chunk(value, None))
            elif kind == "error":
                r = (
                    _from_error(value)
                    if isinstance(value, AdapterHubError)
                    else Refusal(500, str(value), "server_error")
                )
                yield _sse(r.body())
                break
            else:
                last = chunk(None, value["finish_reason"])
                last["usage"] = _usage(value)
                yield _sse(last)
                if include_usage:
                    yield _sse({"id": rid, "object": kind_name, "created": created, "model": model, "choices": [],
                                "usage": _usage(value)})  # fmt: skip
                break
        yield "data: [DONE]\n\n"
    finally:
        if job.finish is None:
            job.cancel()


def _prompt_ids(svc: Inference, body: dict[str, Any], chat: bool) -> list[int] | Refusal:
    from ...runtime.generate import chat_ids

    tok = svc.tokenizer
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return Refusal(400, "messages must be a non-empty list of {role, content}", param="messages")
        flat = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                return Refusal(400, "each message needs a role and content", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(
                    p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
                )
            if not isinstance(content, str):
                return Refusal(400, "message content must be text", param="messages")
            flat.append({"role": m["role"], "content": content})
        if sum(len(m["content"]) for m in flat) > svc.max_chars:
            return _too_long(svc, "messages")
        return _bounded(svc, chat_ids(tok, flat), "messages")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if len(prompt) > svc.max_chars:
            return _too_long(svc, "prompt")
        ids = list(tok(prompt, truncation=True, max_length=svc.engine.max_context + 1)["input_ids"])
    elif isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt):
        ids = [int(i) for i in prompt]
    else:
        return Refusal(400, "prompt must be one string or one list of token ids", param="prompt")
    if not ids:
        return Refusal(400, "the prompt is empty", param="prompt")
    return _bounded(svc, ids, "prompt")


def _too_long(svc: Inference, param: str) -> Refusal:
    return Refusal(400, f"the prompt is longer than this model's context of {svc.engine.max_context} tokens",
                   param=param, code="context_length_exceeded")  # fmt: skip


def _bounded(svc: Inference, ids: list[int], param: str) -> list[int] | Refusal:
    return ids if len(ids) < svc.engine.max_context else _too_long(svc, param)


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    svc = _svc(request)
    token = await _token(request, svc)
    if isinstance(token, Refusal):
        return refuse(svc, "models", token)
    rows = await run_in_threadpool(svc.listing, token)
    svc.metrics.request("models", 200)
    return JSONResponse({"object": "list", "data": rows})


@router.get("/v1/models/{model:path}")
async def model_info(request: Request, model: str) -> Response:
    svc = _svc(request)
    token = await _token(request, svc)
    if isinstance(token, Refusal):
        return refuse(svc, "models", token)
    rows = await run_in_threadpool(svc.listing, token)
    row = next((r for r in rows if r["id"] == model), None)
    if row is None:
        return refuse(svc, "models", Refusal(404, f"The model `{model}` does not exist.", param="model",
                                             code="model_not_found"))  # fmt: skip
    return JSONResponse(row)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _generate(request, "chat_completions", chat=True)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _generate(request, "completions", chat=False)


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> Response:
    svc = _svc(request)
    prepared = await _prepare(request, svc, "embeddings")
    if isinstance(prepared, Refusal):
        return refuse(svc, "embeddings", prepared)
    body, target = prepared
    texts = body.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    if (
        not isinstance(texts, list)
        or not texts
        or not all(isinstance(t, str) for t in texts)
        or len(texts) > 2048
    ):
        return refuse(
            svc,
            "embeddings",
            Refusal(400, "input must be a string or a list of 1-2048 strings", param="input"),
        )
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        return refuse(
            svc, "embeddings", Refusal(400, "encoding_format is float or base64", param="encoding_format")
        )
    try:
        vectors, tokens = await run_in_threadpool(
            svc.engine.run_exclusive, lambda: _embed(svc, target, texts)
        )
    except AdapterHubError as exc:
        return refuse(svc, "embeddings", _from_error(exc))
    svc.metrics.request("embeddings", 200)
    svc.metrics.tokens_in += tokens
    data = [
        {"object": "embedding", "index": i,
         "embedding": v if fmt == "float" else base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()}
        for i, v in enumerate(vectors)
    ]  # fmt: skip
    return JSONResponse({"object": "list", "data": data, "model": body["model"],
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})  # fmt: skip


def _embed(svc: Inference, target: Target, texts: list[str]) -> tuple[list[list[float]], int]:
    """On the scheduler thread: make the adapters resident (reading them here; an encoder has no decode
    steps to keep going), then one forward over the texts, each row with the request's adapters."""
    from ...runtime.generate import embed

    shas = tuple(target.spec or ())
    for entry in target.entries:
        svc.pool.request(entry)
    deadline = time.monotonic() + 120
    while not svc.pool.ready(shas):
        problem = svc.pool.problem(shas)
        if problem is not None:
            raise problem
        svc.pool.install(svc.engine.close_rows, [])
        if time.monotonic() > deadline:
            raise TimeoutError("adapters took over 2 minutes to load")
        time.sleep(0.002)
    svc.engine.close_rows()
    with svc.runtime.rows([target.spec] * len(texts)):
        return embed(svc.model, svc.tokenizer, texts)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    svc = _svc(request)
    token = await _token(request, svc)
    if isinstance(token, Refusal):
        return refuse(svc, "metrics", token)
    svc.metrics.queue_length = svc.engine.waiting
    shown = await run_in_threadpool(svc.pool.visible_resident, token)
    return Response(svc.metrics.render(shown), media_type="text/plain; version=0.0.4; charset=utf-8")
