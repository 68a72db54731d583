"""A thin client of an OpenAI-compatible server (``adapterhub serve --model``, vLLM, ...): what
``adapterhub run --server URL`` and ``Hub.generate(server=...)`` use instead of a local model.

Standard library only (``urllib``): a chat completion streamed over server-sent events, and embeddings.
Adapters go in the ``model`` field as adapterhub's server spells them: the base's name, an adapter's
name, or an exact combination ``a:0.7+b:0.3``. Errors come back as one-line `RemoteError`s with the
server's own message (the token is never shown).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

from ..errors import RemoteError
from ..records import Generation

TIMEOUT_S = 600.0


def model_field(base: str, adapters: Sequence[tuple[str, float]]) -> str:
    """The ``model`` of a request: the base without adapters, else the adapter or the combination."""
    if not adapters:
        return base
    if len(adapters) == 1 and adapters[0][1] == 1.0:
        return adapters[0][0]
    return "+".join(f"{name}:{weight!r}" for name, weight in adapters)


def chat(
    server: str,
    base: str,
    adapters: Sequence[tuple[str, float]],
    prompt: str,
    *,
    system: str | None = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    seed: int | None = None,
    token: str | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """One chat completion from ``server`` with ``base`` and ``adapters`` (`model_field`), streamed:
    ``on_text`` gets each piece as it arrives."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    body: dict[str, Any] = {
        "model": model_field(base, adapters),
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if seed is not None:
        body["seed"] = seed
    text: list[str] = []
    finish = "stop"
    usage: dict[str, Any] = {}
    for event in _events(_post(server, "/v1/chat/completions", body, token)):
        for choice in event.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") or ""
            if piece:
                text.append(piece)
                if on_text is not None:
                    on_text(piece)
            if choice.get("finish_reason"):
                finish = str(choice["finish_reason"])
        if event.get("usage"):
            usage = event["usage"]
    return Generation(
        text="".join(text),
        finish_reason=finish,
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
    )


def embeddings(
    server: str, model: str, texts: Sequence[str], *, token: str | None = None
) -> list[list[float]]:
    """Embeddings of ``texts`` from ``server`` (floats, in the order given)."""
    with _post(
        server, "/v1/embeddings", {"model": model, "input": list(texts), "encoding_format": "float"}, token
    ) as r:
        doc = json.loads(r.read())
    rows = sorted(doc.get("data") or [], key=lambda d: d.get("index", 0))
    return [[float(v) for v in row["embedding"]] for row in rows]


def _post(server: str, path: str, body: dict[str, Any], token: str | None) -> Any:
    parts = urlsplit(server)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RemoteError(
            f"server {server!r} is not an http(s) URL; give e.g. --server http://127.0.0.1:8000"
        )
    url = server.rstrip("/") + path
    token = token or os.environ.get("ADAPTERHUB_TOKEN") or os.environ.get("HF_TOKEN")
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream, application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers=headers)
    try:
        return urllib.request.urlopen(req, timeout=TIMEOUT_S)  # noqa: S310 - the scheme is checked above
    except urllib.error.HTTPError as e:
        raise RemoteError(f"{url}: {_message(e)} ({e.code})") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise RemoteError(
            f"{url}: cannot reach the server ({reason}); is `adapterhub serve --model` running?"
        ) from None


def _message(e: urllib.error.HTTPError) -> str:
    try:
        doc = json.loads(e.read() or b"{}")
    except ValueError:
        return e.reason or "the server refused the request"
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return " ".join(str(err["message"]).split())
    return str(e.reason or "the server refused the request")


def _events(response: Any) -> Iterator[dict[str, Any]]:
    """The JSON events of a server-sent-events body, up to ``data: [DONE]``."""
    with response:
        for raw in response:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                return
            try:
                event = json.loads(data)
            except ValueError:
                raise RemoteError(f"the server sent an event that is not JSON: {data[:80]!r}") from None
            if isinstance(event, dict) and isinstance(event.get("error"), dict):
                raise RemoteError(f"the server failed mid-stream: {event['error'].get('message', '')}")
            if isinstance(event, dict):
                yield event
