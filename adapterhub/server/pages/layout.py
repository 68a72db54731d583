"""The frame every page shares: head (styles and script from this package), header with the login state,
skip link, main landmark, footer."""

from __future__ import annotations

from fastapi import Request

from ..records import TokenInfo
from .html import Safe, render
from .security import CSRF_FIELD, csrf_token

ASSET_VERSION = "1"


def session_box(request: Request, user: TokenInfo | None) -> Safe:
    if user is None:
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return render(
            '<a class="button" href="/login?next={next}">Log in</a>', next=here if here != "/login" else "/"
        )
    return render(
        '<form class="inline" method="post" action="/logout">'
        '<input type="hidden" name="{field}" value="{csrf}">'
        "<span>Signed in as <strong>{user}</strong> ({role})</span> "
        '<button type="submit">Log out</button></form>',
        field=CSRF_FIELD,
        csrf=csrf_token(request),
        user=user.user,
        role="write" if user.write else "read",
    )


def page(request: Request, title: str, body: Safe, user: TokenInfo | None) -> str:
    """A whole HTML document around ``body``."""
    return render(
        """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · adapterhub</title>
<link rel="stylesheet" href="/static/style.css?v={v}">
<link rel="icon" href="/static/favicon.svg?v={v}" type="image/svg+xml">
<script src="/static/app.js?v={v}" defer></script>
</head>
<body>
<a class="skip" href="#main">Skip to content</a>
<header class="top">
<nav aria-label="Site"><a class="brand" href="/">adapterhub</a></nav>
<div class="session">{session}</div>
</header>
<main id="main" tabindex="-1">
{body}
</main>
<footer><p>Served by <code>adapterhub serve</code> · the API lives beside these pages at
<code>/api</code></p></footer>
</body>
</html>
""",
        title=title,
        v=ASSET_VERSION,
        session=session_box(request, user),
        body=body,
    )


def message_page(request: Request, title: str, text: str, user: TokenInfo | None) -> str:
    body = render(
        '<h1>{title}</h1><p class="notice">{text}</p><p><a href="/">Back to the index</a></p>',
        title=title,
        text=text,
    )
    return page(request, title, body, user)
