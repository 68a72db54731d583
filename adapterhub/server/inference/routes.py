"""The OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings`` and ``/metrics`` (vLLM's companion routes are in `companion`). Bodies are read bounded
(`http`) and typed (`requests`); errors take OpenAI's shape ``{"error": {message, type, param, code}}``; a
full queue is a 429 with ``Retry-After``.

A completions request may carry a list of prompts (strings or token-id lists) and ``n`` choices each:
``choices[k]`` is prompt ``k // n``'s choice ``k % n`` (as OpenAI orders them); each is one job of the
scheduler, with seed ``seed + k`` when a seed is given."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ...errors import AdapterHubError, RepoError
from .engine import Job
from .http import read_body
from .requests import ChatRequest, CompletionRequest, EmbeddingRequest, parse
from .sampling import Logprob, Sampling
from .service import Inference, Refusal, Target
from .toolformats import MarkedCalls
from .tools import Calls, ToolPlan, chat_prompt, flat_message, plan, reader, split

router = APIRouter()

#: most choices (prompts x n) in one request
MAX_CHOICES = 256


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


async def token_of(request: Request, svc: Inference) -> Any:
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
    request: Request, svc: Inference, endpoint: str, kind: Any
) -> tuple[Any, Target] | Refusal:
    token = await token_of(request, svc)
    if isinstance(token, Refusal):
        return token
    body = await read_body(request, svc.max_request_bytes, svc.body_timeout)
    if isinstance(body, Refusal):
        return body
    req = parse(kind, body)
    if isinstance(req, Refusal):
        return req
    target = await run_in_threadpool(svc.target, req.model, token)
    if isinstance(target, Refusal):
        return target
    if endpoint == "embeddings" and svc.causal:
        return Refusal(
            400, f"{svc.name} is a causal LM; embeddings need an encoder base (MiniLM, say)", param="model"
        )
    if endpoint != "embeddings" and not svc.causal:
        return Refusal(400, f"{svc.name} is an encoder; it answers /v1/embeddings only", param="model")
    return req, target


def _sampling(req: Any, svc: Inference, prompt_len: int, chat: bool) -> Sampling | Refusal:
    room = svc.engine.max_context - prompt_len
    if room < 1:
        return Refusal(400, f"the prompt has {prompt_len} tokens; this model's context is {svc.engine.max_context}",
                       param="messages" if chat else "prompt", code="context_length_exceeded")  # fmt: skip
    bias: list[tuple[int, float]] = []
    for key, value in (req.logit_bias or {}).items():
        if int(key) >= svc.vocab:
            return Refusal(
                400, f"logit_bias names token {key}; the vocabulary has {svc.vocab}", param="logit_bias"
            )
        bias.append((int(key), float(value)))
    if chat:
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        prompt_logprobs = False
    else:
        logprobs = req.logprobs
        prompt_logprobs = bool(req.echo) and logprobs is not None
    return Sampling(
        max_tokens=min(req.limit or room, room),
        temperature=1.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p),
        seed=req.seed,
        stop=req.stops(),
        top_k=max(req.top_k or 0, 0),
        min_p=float(req.min_p or 0),
        presence_penalty=float(req.presence_penalty or 0),
        frequency_penalty=float(req.frequency_penalty or 0),
        repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
        logit_bias=tuple(bias),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


class _Feed:
    """Events of a request's jobs, handed from the scheduler thread to the event loop as (job index, event)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, tuple[str, Any]]] = asyncio.Queue()

    def sink(self, index: int) -> Any:
        def put(event: tuple[str, Any]) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        return put


def _usage(dones: list[dict[str, Any]], n: int) -> dict[str, int]:
    p = sum(int(d["prompt_tokens"]) for k, d in enumerate(dones) if k % n == 0)
    c = sum(int(d["completion_tokens"]) for d in dones)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _generate(request: Request, endpoint: str, chat: bool) -> Response:
    svc = _svc(request)
    prepared = await _prepare(request, svc, endpoint, ChatRequest if chat else CompletionRequest)
    if isinstance(prepared, Refusal):
        return refuse(svc, endpoint, prepared)
    req, target = prepared
    prompts = await run_in_threadpool(_prompt_ids, svc, req, chat)
    if isinstance(prompts, Refusal):
        return refuse(svc, endpoint, prompts)
    answer = await run_in_threadpool(plan, svc, req) if chat else ToolPlan()
    if isinstance(answer, Refusal):
        return refuse(svc, endpoint, answer)
    n = req.n or 1
    if len(prompts) * n > MAX_CHOICES:
        return refuse(
            svc, endpoint, Refusal(400, f"at most {MAX_CHOICES} choices (prompts x n) per request", param="n")
        )
    feed = _Feed()
    jobs: list[Job] = []
    for ids in prompts:
        sampling = _sampling(req, svc, len(ids), chat)
        if isinstance(sampling, Refusal):
            return refuse(svc, endpoint, sampling)
        for _ in range(n):
            k = len(jobs)
            s = sampling if sampling.seed is None or k == 0 else replace(sampling, seed=sampling.seed + k)
            jobs.append(Job(ids, s, target.spec, feed.sink(k)))
            jobs[-1].keep = frozenset(answer.keep)
            if answer.grammar is not None:
                jobs[-1].matcher = svc.grammars.matcher(answer.grammar)
    for entry in target.entries:
        svc.pool.request(entry)
    for job in jobs:
        if not svc.engine.submit(job):
            for j in jobs:
                j.cancel()
            return refuse(svc, endpoint, Refusal(429, "the server is busy: too many requests are waiting; retry shortly",
                                                 type="rate_limit_error", code="overloaded", retry_after=1))  # fmt: skip
    svc.metrics.request(endpoint, 200)
    out = _Out(svc, req, chat, prompts, n, "chatcmpl-" if chat else "cmpl-")
    out.tool_mode = answer.mode
    if req.stream:
        return StreamingResponse(
            _stream(jobs, feed, out),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    dones: dict[int, dict[str, Any]] = {}
    try:
        while len(dones) < len(jobs):
            try:
                k, (kind, value) = await asyncio.wait_for(feed.queue.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)
                continue
            if kind == "error":
                return _job_error(value)
            if kind == "done":
                dones[k] = value
    finally:
        for job in jobs:
            if job.finish is None:
                job.cancel()
    ordered = [dones[k] for k in range(len(jobs))]
    return JSONResponse(
        {"id": out.rid, "object": "chat.completion" if chat else "text_completion", "created": out.created,
         "model": req.model, "choices": [out.choice(k, d) for k, d in enumerate(ordered)],
         "usage": _usage(ordered, n)}
    )  # fmt: skip


class _Out:
    """How one request's answers are written (choices, log-probabilities, stream chunks)."""

    def __init__(
        self, svc: Inference, req: Any, chat: bool, prompts: list[list[int]], n: int, prefix: str
    ) -> None:
        self.svc, self.req, self.chat, self.prompts, self.n = svc, req, chat, prompts, n
        self.rid = prefix + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.echo = not chat and bool(req.echo)
        self.logprobs = req.logprobs if not chat else (req.logprobs or None)
        self.offsets: dict[int, int] = {}  # completions: the text offset reached by each choice
        self.tool_mode: str | None = None  # how the answer is read for tool calls (`tools.Calls`)
        self.calls: dict[int, Calls | MarkedCalls] = {}

    def tok(self, i: int) -> str:
        return self.svc.token_text(i)

    def choice(self, k: int, done: dict[str, Any]) -> dict[str, Any]:
        text, finish = done["text"], done["finish_reason"]
        gen = _trim(done["logprobs"], done)
        if self.chat:
            lp = {"content": [self._entry(r) for r in gen], "refusal": None} if self.logprobs else None
            message: dict[str, Any] = {"role": "assistant", "content": text}
            content, calls = split(text, self.tool_mode) if self.tool_mode else (text, [])
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                finish = "tool_calls" if finish == "stop" else finish
            return {"index": k, "message": message, "logprobs": lp, "finish_reason": finish}
        head = ""
        records: list[Logprob | None] = list(gen)
        if self.echo:
            prompt = self.prompts[k // self.n]
            head = self.svc.tokenizer.decode(prompt)
            if self.logprobs is not None:
                records = list(done["prompt_logprobs"] or [None] * len(prompt)) + records
            tokens = list(prompt) + [r[0] for r in gen]
        else:
            tokens = [r[0] for r in gen]
        lp = self._completion_logprobs(tokens, records, 0) if self.logprobs is not None else None
        return {"index": k, "text": head + text, "logprobs": lp, "finish_reason": finish}

    def _entry(self, r: Logprob) -> dict[str, Any]:
        tok, value, alts = r
        s = self.tok(tok)
        return {"token": s, "logprob": value, "bytes": list(s.encode()),
                "top_logprobs": [{"token": self.tok(a), "logprob": v, "bytes": list(self.tok(a).encode())}
                                 for a, v in alts]}  # fmt: skip

    def _completion_logprobs(
        self, tokens: list[int], records: list[Logprob | None], start: int
    ) -> dict[str, Any]:
        strs = [self.tok(t) for t in tokens]
        offsets, at = [], start
        for s in strs:
            offsets.append(at)
            at += len(s)
        return {
            "tokens": strs,
            "token_logprobs": [None if r is None else r[1] for r in records],
            "top_logprobs": [None if r is None else {self.tok(a): v for a, v in r[2]} for r in records],
            "text_offset": offsets,
        }

    def chunks(self, k: int, piece: str | None, finish: str | None, lps: list[Logprob]) -> list[str]:
        """The stream chunks of choice ``k``'s next ``piece`` of text (or its end, ``finish``)."""
        if not self.tool_mode:
            return [_sse(self.chunk(k, piece, finish, lps))]
        if k not in self.calls:
            self.calls[k] = reader(self.tool_mode)
        calls = self.calls[k]
        deltas = calls.feed(piece or "") if finish is None else calls.close()
        if finish == "stop" and calls.calls:
            finish = "tool_calls"
        if finish is not None or (lps and self.logprobs and not deltas):
            deltas.append({})
        last = len(deltas) - 1
        return [
            _sse(self.chunk(k, d, finish if i == last else None, lps if i == 0 else []))
            for i, d in enumerate(deltas)
        ]

    def chunk(
        self,
        k: int,
        delta: str | dict[str, Any] | None,
        finish: str | None,
        lps: list[Logprob],
        role: bool = False,
    ) -> dict[str, Any]:
        if self.chat:
            d: dict[str, Any] = {"content": delta} if isinstance(delta, str) and delta else {}
            if role:
                d = {"role": "assistant", "content": ""}
            elif isinstance(delta, dict):
                d = delta
            lp = (
                {"content": [self._entry(r) for r in lps], "refusal": None} if self.logprobs and lps else None
            )
            c: dict[str, Any] = {"index": k, "delta": d, "logprobs": lp, "finish_reason": finish}
        else:
            clp: dict[str, Any] | None = None
            if self.logprobs is not None and lps:
                at = self.offsets.get(k, 0)
                clp = self._completion_logprobs([r[0] for r in lps], list(lps), at)
                self.offsets[k] = at + sum(len(s) for s in clp["tokens"])
            c = {"index": k, "text": delta or "", "logprobs": clp, "finish_reason": finish}
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {
            "id": self.rid,
            "object": kind,
            "created": self.created,
            "model": self.req.model,
            "choices": [c],
        }


def _trim(records: list[Logprob], done: dict[str, Any]) -> list[Logprob]:
    """The generated tokens' records, less a final end token (its text is not in the answer)."""
    if (
        done["finish_reason"] == "stop"
        and records
        and len(records) == len(done["tokens"])
        and done.get("eos")
    ):
        return records[:-1]
    return records


def _job_error(exc: BaseException) -> JSONResponse:
    r = (
        _from_error(exc)
        if isinstance(exc, AdapterHubError)
        else Refusal(500, f"inference failed: {exc}", type="server_error")
    )
    return JSONResponse(r.body(), status_code=r.status)


def _sse(obj: dict[str, Any]) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


async def _stream(jobs: list[Job], feed: _Feed, out: _Out) -> AsyncIterator[str]:
    dones: dict[int, dict[str, Any]] = {}
    try:
        if out.chat:
            for k in range(len(jobs)):
                yield _sse(out.chunk(k, None, None, [], role=True))
        if out.echo:
            for k in range(len(jobs)):
                head = out.svc.tokenizer.decode(out.prompts[k // out.n])
                out.offsets[k] = len(head)
                yield _sse(out.chunk(k, head, None, []))
        while len(dones) < len(jobs):
            k, (kind, value) = await feed.queue.get()
            if kind == "text":
                piece, lps = value
                for chunk in out.chunks(k, piece, None, lps):
                    yield chunk
            elif kind == "error":
                r = (
                    _from_error(value)
                    if isinstance(value, AdapterHubError)
                    else Refusal(500, str(value), "server_error")
                )
                yield _sse(r.body())
                break
            else:
                dones[k] = value
                sent = jobs[k].logprobs_sent
                for chunk in out.chunks(
                    k, None, value["finish_reason"], _trim(value["logprobs"], value)[sent:]
                ):
                    yield chunk
        if len(dones) == len(jobs) and out.req.stream_options and out.req.stream_options.include_usage:
            usage = _usage([dones[k] for k in range(len(jobs))], out.n)
            kind_name = "chat.completion.chunk" if out.chat else "text_completion"
            yield _sse({"id": out.rid, "object": kind_name, "created": out.created, "model": out.req.model,
                        "choices": [], "usage": usage})  # fmt: skip
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:
            if job.finish is None:
                job.cancel()


def _prompt_ids(svc: Inference, req: Any, chat: bool) -> list[list[int]] | Refusal:
    tok = svc.tokenizer
    if chat:
        flat = [flat_message(m) for m in req.messages]
        if sum(len(m["content"]) for m in flat) > svc.max_chars:
            return _too_long(svc, "messages")
        try:
            ids = chat_prompt(tok, flat, req.tools)
        except Exception as exc:  # the template refuses these messages (roles out of order, say)
            return Refusal(400, f"the chat template refuses these messages: {exc}", param="messages")
        return [ids] if len(ids) < svc.engine.max_context else _too_long(svc, "messages")
    out = []
    for p in req.prompts():
        if isinstance(p, str):
            if len(p) > svc.max_chars:
                return _too_long(svc, "prompt")
            ids = list(tok(p, truncation=True, max_length=svc.engine.max_context + 1)["input_ids"])
        else:
            ids = p
            bad = next((i for i in ids if i >= svc.vocab), None)
            if bad is not None:
                return Refusal(
                    400, f"token id {bad} is out of the vocabulary (size {svc.vocab})", param="prompt"
                )
        if not ids:
            return Refusal(400, "the prompt is empty", param="prompt")
        if len(ids) >= svc.engine.max_context:
            return _too_long(svc, "prompt")
        out.append(ids)
    return out


def _too_long(svc: Inference, param: str) -> Refusal:
    return Refusal(400, f"the prompt is longer than this model's context of {svc.engine.max_context} tokens",
                   param=param, code="context_length_exceeded")  # fmt: skip


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    svc = _svc(request)
    token = await token_of(request, svc)
    if isinstance(token, Refusal):
        return refuse(svc, "models", token)
    rows = await run_in_threadpool(svc.listing, token)
    svc.metrics.request("models", 200)
    return JSONResponse({"object": "list", "data": rows})


@router.get("/v1/models/{model:path}")
async def model_info(request: Request, model: str) -> Response:
    svc = _svc(request)
    token = await token_of(request, svc)
    if isinstance(token, Refusal):
        return refuse(svc, "models", token)
    row = await run_in_threadpool(svc.model_row, model, token)
    if isinstance(row, Refusal):
        return refuse(svc, "models", row)
    svc.metrics.request("models", 200)
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
    prepared = await _prepare(request, svc, "embeddings", EmbeddingRequest)
    if isinstance(prepared, Refusal):
        return refuse(svc, "embeddings", prepared)
    req, target = prepared
    texts = req.input
    if isinstance(texts, str):
        texts = [texts]
    elif texts and not isinstance(texts[0], str):
        ids = [texts] if isinstance(texts[0], int) else texts
        if any(i >= svc.vocab for row in ids for i in row):
            return refuse(
                svc,
                "embeddings",
                Refusal(400, f"a token id is out of the vocabulary (size {svc.vocab})", param="input"),
            )
        texts = [svc.tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    if sum(len(t) for t in texts) > svc.max_chars * 8:
        return refuse(svc, "embeddings", _too_long(svc, "input"))
    fmt = req.encoding_format or "float"
    try:
        vectors, tokens = await run_in_threadpool(
            svc.engine.run_exclusive, lambda: _embed(svc, target, texts)
        )
    except AdapterHubError as exc:
        return refuse(svc, "embeddings", _from_error(exc))
    svc.metrics.request("embeddings", 200)
    svc.metrics.tokens_in += tokens
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": v if fmt == "float" else base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode(),
        }
        for i, v in enumerate(vectors)
    ]
    return JSONResponse({"object": "list", "data": data, "model": req.model,
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
    token = await token_of(request, svc)
    if isinstance(token, Refusal):
        return refuse(svc, "metrics", token)
    svc.metrics.queue_length = svc.engine.waiting
    shown = await run_in_threadpool(svc.pool.visible_resident, token)
    return Response(svc.metrics.render(shown), media_type="text/plain; version=0.0.4; charset=utf-8")
