"""The inference API under hostile and careless requests, in process (`fastapi.testclient`, the real app
and engine on the tiny random Llama of test_serve_v1): nothing private reaches who may not read it,
bounded work per request, OpenAI's error shapes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_serve_v1 import _adapter, _tiny_base

from adapterhub import Hub

pytest.importorskip("fastapi")

MSG = [{"role": "user", "content": "hello world"}]


def _app(hub: Hub, home: Path, **kw: Any) -> Any:
    from fastapi.testclient import TestClient

    from adapterhub.server import create_app, server_store
    from adapterhub.server.inference import mount_inference

    app = create_app(server_store(hub.catalog, home))
    mount_inference(app, hub, model="tiny", device="cpu", **kw)
    return TestClient(app)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Base 'tiny'; 'a0' public; 'alice/secret' private with a public twin 'twin' (same content);
    'alice/hidden-chat' private (made for another base) with a public twin 'pub-chat'; tokens of
    alice and bob; an app on it (``c``) and one that requires tokens with a 1 KB adapter budget (``strict``)."""
    root = tmp_path_factory.mktemp("strict")
    hub = Hub(root / "home")
    base = _tiny_base(root / "tiny")
    hub.add_base(base, name="tiny")
    hub.add_adapter(_adapter(base, root / "a0", seed=10, targets=("q_proj", "v_proj")), name="a0")
    secret = _adapter(base, root / "sec", seed=99, targets=("v_proj",))
    hub.add_adapter(secret, name="alice/secret")
    hub.tag_adapter("alice/secret", ["private"])
    hub.add_adapter(secret, name="twin")
    wide = _adapter(_tiny_base(root / "wide", hidden=48), root / "wide-a", seed=5, targets=("q_proj",))
    hub.add_adapter(wide, name="alice/hidden-chat")
    hub.tag_adapter("alice/hidden-chat", ["private"])
    hub.add_adapter(wide, name="pub-chat")
    alice = {"Authorization": f"Bearer {hub.create_token('alice').token}"}
    bob = {"Authorization": f"Bearer {hub.create_token('bob').token}"}
    with (
        _app(hub, root / "home") as c,
        _app(hub, root / "home", require_token=True, adapter_memory="1KB") as s,
    ):
        yield {"hub": hub, "c": c, "strict": s, "alice": alice, "bob": bob, "base": base, "root": root}
    hub.close()


def _chat(c: Any, model: str, headers: dict[str, str] | None = None, **kw: Any) -> Any:
    return c.post(
        "/v1/chat/completions",
        json={"model": model, "messages": MSG, "max_tokens": 3, "temperature": 0, **kw},
        headers=headers or {},
    )


# ---------------------------------------------------------------------------------------------- leaks


def test_misfit_message_names_the_asker_not_the_first_asker(env: dict[str, Any]) -> None:
    c = env["c"]
    first = _chat(c, "alice/hidden-chat", env["alice"])
    assert first.status_code == 400 and "alice/hidden-chat" in first.json()["error"]["message"]
    r = _chat(c, "pub-chat")
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert "alice" not in r.text and "pub-chat does not fit" in r.json()["error"]["message"]


def test_adapter_problems_do_not_name_a_private_twin(env: dict[str, Any]) -> None:
    s = env["strict"]
    r = _chat(s, "alice/secret", env["alice"])  # 1 KB cannot hold it
    assert r.status_code == 400 and "budget" in r.text
    r = _chat(s, "twin", env["bob"])
    assert r.status_code == 400 and "budget" in r.text and "alice" not in r.text


def _resident_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("adapterhub_resident_adapter")]


def test_metrics_show_no_private_row_to_who_may_not_read_it(env: dict[str, Any]) -> None:
    c, hub = env["c"], env["hub"]
    sha = hub.library.select(None, __import__("adapterhub.records", fromlist=["x"]).AdapterFilter(),
                             names=["alice/secret"])[0].sha256  # fmt: skip
    assert _chat(c, "alice/secret", env["alice"]).status_code == 200
    anon = c.get("/metrics")
    assert anon.status_code == 200
    assert "alice" not in anon.text and sha[:12] not in anon.text and "(private)" not in anon.text
    gauge = [ln for ln in _resident_lines(anon.text) if ln.startswith("adapterhub_resident_adapters ")]
    assert gauge == ["adapterhub_resident_adapters 0"]
    mine = c.get("/metrics", headers=env["alice"]).text
    assert "alice/secret" in mine and sha[:12] in mine
    assert "alice" not in c.get("/metrics", headers=env["bob"]).text
    # the public twin of the same content shows under its own name
    assert _chat(c, "twin").status_code == 200
    anon = c.get("/metrics").text
    assert "alice" not in anon and 'adapter="twin"' in anon


def test_metrics_need_a_token_when_tokens_are_required(env: dict[str, Any]) -> None:
    s = env["strict"]
    r = s.get("/metrics")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert s.get("/metrics", headers=env["bob"]).status_code == 200


# ---------------------------------------------------------------------------------------------- bounded work


def test_huge_body_and_prompt_are_refused_before_tokenizing(env: dict[str, Any]) -> None:
    import time

    c = env["c"]
    started = time.perf_counter()
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "hello " * 2_500_000})  # 15 MB
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "hello " * 400_000, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    big = [{"role": "user", "content": "hello " * 400_000}]
    r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": big, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert time.perf_counter() - started < 5
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "hello " * 600, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"  # 600 tokens > 512


def test_combinations_are_capped_and_resolved_in_one_query(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    c, lib = env["c"], env["hub"].library
    calls = []
    select = lib.select
    monkeypatch.setattr(lib, "select", lambda *a, **kw: calls.append(1) or select(*a, **kw))
    r = _chat(c, "+".join(["a0:0.01"] * 20_000))
    assert r.status_code == 400 and r.json()["error"]["param"] == "model" and not calls
    assert _chat(c, "+".join(["a0:0.01", "twin:0.01"] * 32)).status_code == 200
    assert len(calls) == 1
    for model in ("a0:3e38", "a0:1e30+twin:1e30", "a0:nan", "a0:inf"):
        r = _chat(c, model)
        assert r.status_code == 400 and r.json()["error"]["param"] == "model", model


@pytest.fixture()
def live() -> Iterator[tuple[str, int, list[Any]]]:
    """A real uvicorn server with `TimedH11` (head deadline 0.5 s) on a free port, in a thread; its app
    reads bodies through `read_body` with a 0.5 s deadline."""
    import socket
    import threading

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from adapterhub.server.inference.http import read_body
    from adapterhub.server.inference.service import Refusal
    from adapterhub.server.timed import TimedH11

    class Quick(TimedH11):
        header_timeout = 0.5

    seen: list[Any] = []

    async def echo(request: Any) -> Any:
        body = await read_body(request, 1000, 0.5)
        seen.append(body)
        if isinstance(body, Refusal):
            return JSONResponse(body.body(), status_code=body.status)
        return JSONResponse(body)

    app = Starlette(routes=[Route("/echo", echo, methods=["POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(uvicorn.Config(app, http=Quick, log_level="info", lifespan="off"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    while not server.started:
        __import__("time").sleep(0.01)
    yield "127.0.0.1", sock.getsockname()[1], seen
    server.should_exit = True
    t.join(5)


def _send(addr: tuple[str, int], data: bytes, wait: float) -> bytes:
    import socket

    s = socket.create_connection(addr)
    s.settimeout(wait)
    s.sendall(data)
    got = b""
    try:
        while chunk := s.recv(4096):
            got += chunk
    except TimeoutError:
        got += b"<held>"
    s.close()
    return got


def test_half_sent_heads_and_bodies_are_not_held(live: tuple[str, int, list[Any]]) -> None:
    host, port, _ = live
    assert _send((host, port), b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Le", wait=3) == b""  # closed
    assert _send((host, port), b"", wait=3) == b""  # an idle connection too
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n"
    got = _send((host, port), head + b'{"a": ', wait=3)
    assert b" 408 " in got.split(b"\r\n")[0]
    got = _send((host, port), head.replace(b"50", b"2000") + b"{}", wait=3)
    assert b" 413 " in got.split(b"\r\n")[0]
    ok = _send((host, port), head.replace(b"50", b"8") + b'{"a": 1}', wait=1)
    assert b" 200 " in ok.split(b"\r\n")[0]


def test_a_client_gone_mid_body_is_one_log_line(
    live: tuple[str, int, list[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    import socket
    import time

    host, port, seen = live
    caplog.set_level("INFO")
    s = socket.create_connection((host, port))
    s.sendall(b'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"a"')
    time.sleep(0.1)
    s.close()
    deadline = time.monotonic() + 3
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen and seen[-1].status == 499
    text = caplog.text
    assert "went away while sending" in text and "Traceback" not in text
