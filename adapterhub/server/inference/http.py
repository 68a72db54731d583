"""Bounded reading of requests for the inference API: a byte cap on the body (checked against
``Content-Length`` and again while reading), a deadline for the whole body, a one-line log for a client
that goes away mid-body. (The deadline for a request's head is `adapterhub.server.timed.TimedH11`.)"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from ...errors import AdapterHubError
from ..checks import loads
from .refusal import Refusal

logger = logging.getLogger(__name__)


async def read_body(request: Request, limit: int, timeout: float) -> Any:
    """The request's JSON body, or a `Refusal`: 413 over ``limit`` bytes, 408 when it takes longer than
    ``timeout`` seconds, 400 when it is not JSON; a client gone mid-body is logged in one line (499)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        return _too_large(limit)
    buf = bytearray()

    async def read() -> bool:
        async for chunk in request.stream():
            buf.extend(chunk)
            if len(buf) > limit:
                return False
        return True

    try:
        whole = await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        logger.info("%s: the request body took over %.0f s; refused", _who(request), timeout)
        return Refusal(408, f"the request body took over {timeout:.0f} s to arrive", code="request_timeout")
    except ClientDisconnect:
        logger.info("%s: the client went away while sending its request", _who(request))
        return Refusal(499, "the client closed the connection", code="client_closed")
    if not whole:
        return _too_large(limit)
    try:
        return await run_in_threadpool(loads, bytes(buf) or b"{}", "the request body")
    except AdapterHubError as exc:
        return Refusal(400, str(exc))


def _too_large(limit: int) -> Refusal:
    return Refusal(
        413,
        f"the request body is larger than this server accepts ({limit:,} bytes; --max-request-bytes)",
        code="request_too_large",
    )


def _who(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port} {request.url.path}" if client else request.url.path
