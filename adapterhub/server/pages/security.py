"""Who is looking at a page, and the protections every page response carries.

- Login keeps the token in an HttpOnly, SameSite=Strict cookie; a page resolves it through the same
  `ServerStore.authenticate` the API uses for its bearer tokens, so visibility is the API's.
- Every form carries a CSRF token (double submit: a random cookie, echoed in a hidden field and compared
  in constant time), and a POST from another origin is refused as well.
- Every response has a strict Content-Security-Policy (``default-src 'self'``), no framing, and sends its
  address as a referrer to this site only.
"""

from __future__ import annotations

import secrets
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from ...errors import ForbiddenError
from ..records import TokenInfo

SESSION_COOKIE = "adapterhub_session"
CSRF_COOKIE = "adapterhub_csrf"
CSRF_FIELD = "csrf"
FORM_LIMIT = 16 * 1024

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def is_secure(request: Request) -> bool:
    return request.url.scheme == "https"


async def page_user(request: Request) -> TokenInfo | None:
    """The token kept by the login cookie, if it is (still) valid; a revoked token is no login."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token or len(token) > 512:
        return None
    store = request.app.state.server.store
    info: TokenInfo | None = await run_in_threadpool(store.tokens.authenticate, token)
    return info


def csrf_token(request: Request) -> str:
    """This browser's CSRF token: the cookie's, or a new one that `finish` will set."""
    current = request.cookies.get(CSRF_COOKIE, "")
    if len(current) == 43 and current.replace("-", "").replace("_", "").isalnum():
        return current
    fresh = getattr(request.state, "new_csrf", None)
    if fresh is None:
        fresh = secrets.token_urlsafe(32)
        request.state.new_csrf = fresh
    return str(fresh)


def finish(request: Request, response: Response, started: float | None = None) -> Response:
    """Add the security headers (and a new CSRF cookie, and ``Server-Timing``) to a page response."""
    for k, v in SECURITY_HEADERS.items():
        response.headers[k] = v
    fresh = getattr(request.state, "new_csrf", None)
    if fresh is not None:
        response.set_cookie(
            CSRF_COOKIE, fresh, httponly=True, samesite="strict", secure=is_secure(request), path="/"
        )
    if started is not None:
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
    return response


def html_response(
    request: Request, body: str, *, status: int = 200, started: float | None = None
) -> Response:
    return finish(request, HTMLResponse(body, status_code=status), started)


def redirect(request: Request, to: str) -> Response:
    return finish(request, RedirectResponse(to, status_code=303))


def same_origin(request: Request) -> bool:
    """False when the browser says the form came from another origin (Origin, else Referer)."""
    origin = request.headers.get("origin")
    source = origin if origin and origin != "null" else request.headers.get("referer")
    if not source:
        return True  # an opaque or absent origin: the CSRF token alone decides
    parts = urlsplit(source)
    return f"{parts.scheme}://{parts.netloc}" == f"{request.url.scheme}://{request.url.netloc}"


async def read_form(request: Request) -> dict[str, str]:
    """A urlencoded form, checked: same origin, under `FORM_LIMIT`, its CSRF field equal to the cookie;
    else `ForbiddenError` (which the pages answer with a page, not the API's JSON)."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        raise ForbiddenError("the form must be sent as application/x-www-form-urlencoded")
    if not same_origin(request):
        raise ForbiddenError("the form was sent from another site")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_LIMIT:
            raise ForbiddenError("the form is too large")
    try:
        fields: dict[str, list[str]] = parse_qs(body.decode(), keep_blank_values=True, max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise ForbiddenError("the form is not valid") from None
    form = {k: v[0] for k, v in fields.items()}
    sent, kept = form.get(CSRF_FIELD, ""), request.cookies.get(CSRF_COOKIE, "")
    if not kept or not secrets.compare_digest(sent.encode(), kept.encode()):
        raise ForbiddenError("the form's security token is missing or stale: reload the page and try again")
    return form


def login_cookie(request: Request, response: Response, token: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=is_secure(request),
        path="/",
        max_age=30 * 24 * 3600,
    )


def logout_cookie(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")


def safe_next(value: Any) -> str:
    """A local path to go back to after a login (never another site)."""
    text = str(value or "/")
    if not text.startswith("/") or text.startswith("//") or "\\" in text or any(ord(c) < 0x20 for c in text):
        return "/"
    return text
