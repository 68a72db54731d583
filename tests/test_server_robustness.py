"""Hostile input to ``adapterhub serve``: control characters in paths, broken and explosive YAML, deeply
nested JSON, bad query integers. Each gets a Hub-shaped 4xx, the connection survives, and the server keeps
answering other requests. Real server subprocess; real huggingface_hub client where a client is involved."""

from __future__ import annotations

import base64
import http.client
import json
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from test_server import Server, head_of, ndjson, online_hf, server_on


@pytest.fixture
def hf(monkeypatch: pytest.MonkeyPatch) -> Any:
    return online_hf(monkeypatch)


@pytest.fixture(scope="module", params=("sqlite", "postgresql"))
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from server_on(request, tmp_path_factory)


@pytest.fixture(scope="module")
def repo(server: Server) -> str:
    with pytest.MonkeyPatch.context() as mp:
        api = online_hf(mp).HfApi(endpoint=server.url, token=server.alice)
        api.create_repo("alice/robust")
        api.upload_file(path_or_fileobj=b"keep", path_in_repo="keep.txt", repo_id="alice/robust")
    return "alice/robust"


def bomb(levels: int = 9) -> str:
    """The classic "billion laughs" in YAML: a few hundred bytes that expand to 9**levels strings."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def readme_commit(text: str) -> bytes:
    content = base64.b64encode(text.encode()).decode()
    return ndjson(
        {"key": "header", "value": {"summary": "card"}},
        {"key": "file", "value": {"path": "README.md", "content": content}},
    )


def test_control_characters_in_a_path_get_a_404_and_keep_the_connection(server: Server, repo: str) -> None:
    u = urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        for raw in ("a%00b.txt", "a%0d%0aX-Injected:%20yes", "tab%09and%7fdel"):
            conn.request("GET", f"/{repo}/resolve/main/{raw}")
            resp = conn.getresponse()
            body = json.loads(resp.read())
            assert resp.status == 404 and resp.getheader("X-Error-Code") == "EntryNotFound", raw
            assert resp.getheader("X-Injected") is None
            message = resp.getheader("X-Error-Message")
            assert message.startswith("Entry not found: a") or message.startswith("Entry not found: tab")
            assert all(0x20 <= ord(c) < 0x7F for c in message)
            assert "\\x" in message and body["error"].startswith("Entry not found")
        conn.request("GET", "/api/models/ali%00ce/robust")  # and in a repo id
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 404 and resp.getheader("X-Error-Code") == "RepoNotFound"
        conn.request("GET", f"/api/models/{repo}")  # the same connection still works
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["id"] == repo
    finally:
        conn.close()


def test_a_nul_in_a_filename_is_an_entry_not_found_for_the_client(server: Server, hf: Any, repo: str) -> None:
    api = hf.HfApi(endpoint=server.url, token=False)
    assert api.file_exists(repo, "a\x00b.txt") is False
    with pytest.raises(hf.errors.EntryNotFoundError, match=r"Entry not found: a\\x00b.txt"):
        api.get_hf_file_metadata(url=hf.hf_hub_url(repo, "a\x00b.txt", endpoint=server.url))
    assert api.file_exists(repo, "keep.txt") is True


def test_broken_readme_yaml_sent_to_the_commit_endpoint_is_a_400(server: Server, repo: str) -> None:
    before = head_of(server, repo)
    for text in ("---\ntags: [unclosed\n---\n", "---\n: : :\n  - x\n---\n", "---\n\t- tab\n---\n"):
        status, _, data = server.request(
            "POST", f"/api/models/{repo}/commit/main", body=readme_commit(text), token=server.alice
        )
        assert status == 400, (text, data)
        assert "Invalid metadata in README.md" in json.loads(data)["error"]
    assert head_of(server, repo) == before


def test_a_yaml_alias_bomb_is_refused_without_being_expanded(server: Server, repo: str) -> None:
    text = bomb()
    assert len(text) < 1000
    status, _, reply = server.json("POST", "/api/validate-yaml", {"content": f"---\n{text}---\n"})
    assert status == 400 and "aliases" in reply["error"]
    for card in (
        f"---\n{text}---\n# bomb\n",
        "---\nloop: &l [*l]\n---\n",
        "---\n" + "[" * 5000 + "]" * 5000 + "\n---\n",
    ):
        status, _, data = server.request(
            "POST", f"/api/models/{repo}/commit/main", body=readme_commit(card), token=server.alice
        )
        assert status == 400 and "Invalid metadata in README.md" in json.loads(data)["error"], data
    # a card that shares a few anchors is fine
    ok = "---\nbase: &b org/base\nbase_model: *b\ntags: [x]\n---\n"
    assert server.json("POST", "/api/validate-yaml", {"content": ok})[0] == 200


def test_a_slow_card_is_parsed_off_the_event_loop(server: Server) -> None:
    """While a large (legal) card is parsed, the server answers other requests."""
    card = (
        "---\n"
        + "".join(f"key{i}: [value {i}, more {i}, {{a: {i}, b: [{i}, {i}]}}]\n" for i in range(12_000))
        + "---\n"
    )
    order: list[str] = []
    started = threading.Event()

    def big() -> None:
        started.set()
        status, _, _ = server.json("POST", "/api/validate-yaml", {"content": card})
        order.append(f"card {status}")

    t = threading.Thread(target=big)
    t.start()
    started.wait()
    import time

    time.sleep(0.3)
    status, _, _ = server.json("GET", "/api/whoami-v2", token=server.alice)
    order.append(f"whoami {status}")
    t.join(60)
    assert order == ["whoami 200", "card 200"]


def test_deeply_nested_json_is_a_400(server: Server, repo: str) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    status, headers, data = server.request(
        "POST",
        "/api/repos/create",
        body=deep,
        token=server.alice,
        headers={"Content-Type": "application/json"},
    )
    assert status == 400 and "nested too deeply" in json.loads(data)["error"]
    line = (
        b'{"key": "header", "value": {"summary": "x", "description": '
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}}\n"
    )
    status, _, data = server.request("POST", f"/api/models/{repo}/commit/main", body=line, token=server.alice)
    assert status == 400 and "nested too deeply" in json.loads(data)["error"]
    status, _, reply = server.json("POST", "/api/validate-yaml", None)
    assert status == 400


@pytest.mark.parametrize("value", ["-5", "0", "abc", "1e3", "99999999999999999999999"])
def test_bad_query_integers_are_a_400(server: Server, value: str) -> None:
    status, _, reply = server.json("GET", f"/api/models?limit={value}")
    assert status == 400 and "limit" in reply["error"]
    assert server.json("GET", "/api/models?limit=2")[0] == 200


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        ("model-index: {name: x}", "model-index must be a list"),
        ("model-index:\n- results: []", "needs a name"),
        ("model-index:\n- name: m\n  results:\n  - task: {name: t}", "task needs a type"),
        ("model-index:\n- name: m\n  results:\n  - task: {type: t}\n    metrics: [{type: acc}]", "metrics"),
        ("tags: [{a: 1}]", "tags must be a string or a list of strings"),
        ("library_name: [peft]", "library_name must be a string"),
    ],
)
def test_card_metadata_of_the_wrong_shape_is_refused(
    server: Server, repo: str, meta: str, reason: str
) -> None:
    status, _, reply = server.json("POST", "/api/validate-yaml", {"content": f"---\n{meta}\n---\n"})
    assert status == 400 and reason in reply["error"], reply
    before = head_of(server, repo)
    status, _, data = server.request(
        "POST",
        f"/api/models/{repo}/commit/main",
        body=readme_commit(f"---\n{meta}\n---\n"),
        token=server.alice,
    )
    assert status == 400 and reason in json.loads(data)["error"]
    assert head_of(server, repo) == before


def test_a_sound_model_index_is_accepted(server: Server) -> None:
    card = """---
tags: [lora, 2024]
base_model: org/base
model-index:
- name: my-lora
  results:
  - task: {type: text-generation}
    dataset: {name: wiki, type: wikitext}
    metrics: [{type: perplexity, value: 12.5}]
---
"""
    assert server.json("POST", "/api/validate-yaml", {"content": card})[0] == 200
