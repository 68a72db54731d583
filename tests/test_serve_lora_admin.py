"""``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` under hostile writers, in process
(`fastapi.testclient`, the real app and engine on the tiny random Llama of test_serve_v1): local paths only
inside the server's ``--lora-dir`` folders (symlinks resolved), one answer for every refused path, Hub
repos pulled without the server's credentials (against a real `adapterhub serve` subprocess), names without
a namespace never written, and ``load_inplace`` that changes nothing unless it succeeds."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
from test_serve_strict import _app, _chat
from test_serve_v1 import _adapter, _tiny_base

from adapterhub import Hub
from adapterhub.server.tokens import create_token

pytest.importorskip("fastapi")

LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Base 'tiny'; the operator's public 'a0' and 'twin'; 'alice/secret' (private) added from ``sec``,
    outside the lora folder ``loras`` (which holds adapters 'good' and 'good2', 'wide' for another base,
    a text file and a symlink to ``sec``); write tokens of mallory, carol and alice."""
    root = tmp_path_factory.mktemp("lora-admin")
    hub = Hub(root / "home")
    base = _tiny_base(root / "tiny")
    hub.add_base(base, name="tiny")
    hub.add_adapter(_adapter(base, root / "a0", seed=10, targets=("q_proj", "v_proj")), name="a0")
    secret = _adapter(base, root / "sec", seed=99, targets=("v_proj",))
    hub.add_adapter(secret, name="alice/secret")
    hub.tag_adapter("alice/secret", ["private"])
    hub.add_adapter(secret, name="twin")
    loras = root / "loras"
    _adapter(base, loras / "good", seed=7, targets=("q_proj",))
    _adapter(base, loras / "good2", seed=8, targets=("v_proj",))
    _adapter(_tiny_base(root / "wide-base", hidden=48), loras / "wide", seed=5, targets=("q_proj",))
    (loras / "notes.txt").write_text("not an adapter")
    (loras / "escape").symlink_to(secret)
    tokens = {
        u: {"Authorization": f"Bearer {create_token(hub, u, write=True).token}"}
        for u in ("mallory", "carol", "alice")
    }
    with _app(hub, root / "home", lora_dirs=[str(loras)]) as c:
        yield {"hub": hub, "c": c, "root": root, "loras": loras, **tokens}
    hub.close()


def _sha(hub: Hub, name: str) -> str | None:
    return hub.adapter_info(name).sha256 if hub.library.exists(name) else None


def _names(hub: Hub) -> list[str]:
    return sorted(a.name for a in hub.list_adapters())


def test_local_paths_only_inside_the_lora_dirs(env: dict[str, Any]) -> None:
    c, hub, root, loras = env["c"], env["hub"], env["root"], env["loras"]
    before = _names(hub)
    for path in (root / "sec", loras / "escape", loras / ".." / "sec", root):
        r = c.post(LOAD, json={"lora_name": "mallory/stolen", "lora_path": str(path)}, headers=env["mallory"])
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", (path, r.text)
    assert _names(hub) == before and _chat(c, "mallory/stolen", env["mallory"]).status_code == 404
    body = {"lora_name": "mallory/mine", "lora_path": str(loras / "good")}
    r = c.post(LOAD, json=body, headers=env["mallory"])
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'mallory/mine' added successfully.", (
        r.text
    )
    assert c.post(LOAD, json=body, headers=env["mallory"]).status_code == 400  # already there
    assert _chat(c, "mallory/mine", env["mallory"]).status_code == 200
    assert c.post(UNLOAD, json={"lora_name": "mallory/mine"}, headers=env["mallory"]).status_code == 200
    assert _chat(c, "mallory/mine", env["mallory"]).status_code == 200  # loads again on demand
    assert _names(hub) == sorted([*before, "mallory/mine"])


def test_every_refused_path_gets_the_same_answer(env: dict[str, Any]) -> None:
    c, root, loras = env["c"], env["root"], env["loras"]
    paths = [
        "/etc/shadow",
        "/etc/passwd",
        "/root",
        "/nonexistent/x",
        "/",
        str(root / "sec"),
        str(root),
        str(loras / "notes.txt"),
        str(loras / "missing"),
        str(loras / "escape"),
        str(loras / "good" / "x"),
    ]
    answers = set()
    for path in paths:
        r = c.post(LOAD, json={"lora_name": "mallory/probe", "lora_path": path}, headers=env["mallory"])
        assert r.status_code == 400, (path, r.text)
        answers.add(r.text)
        assert r.json()["error"]["param"] == "lora_path"
    assert len(answers) == 1, answers
    (answer,) = answers
    assert not any(word in answer for word in ("/etc", "/root", "shadow", "nonexistent", "sec", "notes"))


def test_no_local_path_without_a_lora_dir(env: dict[str, Any]) -> None:
    hub, root = env["hub"], env["root"]
    with _app(hub, root / "home") as bare:
        r = bare.post(
            LOAD, json={"lora_name": "carol/x", "lora_path": str(env["loras"] / "good")}, headers=env["carol"]
        )
        assert r.status_code == 400 and "--lora-dir" in r.json()["error"]["message"]
    assert not hub.library.exists("carol/x")


def test_names_without_a_namespace_are_never_written(env: dict[str, Any]) -> None:
    c, hub, loras = env["c"], env["hub"], env["loras"]
    a0, twin = _sha(hub, "a0"), _sha(hub, "twin")
    for body in (
        {"lora_name": "a0", "lora_path": "/nonexistent/x", "load_inplace": True},
        {"lora_name": "twin", "lora_path": str(loras / "good"), "load_inplace": True},
        {"lora_name": "new-top", "lora_path": str(loras / "good")},
        {"lora_name": "carol/", "lora_path": str(loras / "good")},
        {"lora_name": "alice/secret", "lora_path": str(loras / "good"), "load_inplace": True},
    ):
        r = c.post(LOAD, json=body, headers=env["mallory"])
        assert r.status_code == 403, (body, r.text)
    for name in ("a0", "twin", "alice/secret"):
        assert c.post(UNLOAD, json={"lora_name": name}, headers=env["mallory"]).status_code == 403
    assert (_sha(hub, "a0"), _sha(hub, "twin")) == (a0, twin) and not hub.library.exists("new-top")


def test_load_inplace_changes_nothing_unless_it_succeeds(env: dict[str, Any]) -> None:
    c, hub, loras = env["c"], env["hub"], env["loras"]
    r = c.post(LOAD, json={"lora_name": "carol/swap", "lora_path": str(loras / "good")}, headers=env["carol"])
    assert r.status_code == 200, r.text
    first, names = _sha(hub, "carol/swap"), _names(hub)
    answer = _chat(c, "carol/swap", env["carol"]).json()["choices"][0]["message"]
    for path, status in (("/nonexistent/x", 400), (str(loras / "wide"), 400), ("alice/no-such-repo", 400)):
        r = c.post(
            LOAD,
            json={"lora_name": "carol/swap", "lora_path": path, "load_inplace": True},
            headers=env["carol"],
        )
        assert r.status_code == status, (path, r.text)
        assert "loading-" not in r.text
        assert _sha(hub, "carol/swap") == first and _names(hub) == names
        assert _chat(c, "carol/swap", env["carol"]).json()["choices"][0]["message"] == answer
    r = c.post(
        LOAD,
        json={"lora_name": "carol/swap", "lora_path": str(loras / "good2"), "load_inplace": True},
        headers=env["carol"],
    )
    assert r.status_code == 200, r.text
    assert _sha(hub, "carol/swap") not in (first, None) and _names(hub) == names
    weights = (loras / "good2" / "adapter_model.safetensors").read_bytes()
    assert _sha(hub, "carol/swap") == hashlib.sha256(weights).hexdigest()
    r = c.post(UNLOAD, json={"lora_name": "carol/swap"}, headers=env["carol"])
    assert r.status_code == 200, r.text
    assert c.post(UNLOAD, json={"lora_name": "carol/swap"}, headers=env["mallory"]).status_code == 403


def test_hub_repos_are_pulled_without_the_servers_credentials(
    env: dict[str, Any], tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_server import online_hf, start_server

    c, hub = env["c"], env["hub"]
    servers = start_server(tmp_path_factory)
    server = next(servers)
    try:
        online_hf(monkeypatch)
        hub.push_adapter("twin", "alice/private-lora", private=True, endpoint=server.url, token=server.alice)
        hub.push_adapter("a0", "alice/public-lora", endpoint=server.url, token=server.alice)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv(
            "HF_TOKEN", server.alice
        )  # the operator's own credentials: they read the private repo
        names = _names(hub)
        r = c.post(
            LOAD,
            json={"lora_name": "mallory/pulled", "lora_path": "alice/private-lora"},
            headers=env["mallory"],
        )
        assert r.status_code == 400 and "repository not found" in r.text, r.text
        assert _names(hub) == names
        r = c.post(
            LOAD,
            json={"lora_name": "mallory/public", "lora_path": "alice/public-lora"},
            headers=env["mallory"],
        )
        assert r.status_code == 200, r.text
        assert _sha(hub, "mallory/public") == _sha(hub, "a0")
    finally:
        next(servers, None)


def test_catalog_rename_replaces_in_one_step(hub: Hub, tmp_path: Any) -> None:
    """`Library.rename`, on SQLite and PostgreSQL: the swap ``load_inplace`` makes."""
    from helpers.adapters import make_catalog_adapter

    from adapterhub import AdapterExistsError, AdapterNotFoundError

    old = hub.add_adapter(make_catalog_adapter(tmp_path / "old", 4, 8, ["q_proj"], seed=1), name="u/x")
    new = hub.add_adapter(make_catalog_adapter(tmp_path / "new", 4, 8, ["q_proj"], seed=2), name="u/scratch")
    with pytest.raises(AdapterExistsError):
        hub.library.rename("u/scratch", "u/x")
    with pytest.raises(AdapterNotFoundError):
        hub.library.rename("u/none", "u/x", replace=True)
    assert _names(hub) == ["u/scratch", "u/x"] and old.sha256 in hub.store
    hub.library.rename("u/scratch", "u/x", replace=True)
    assert _names(hub) == ["u/x"] and hub.adapter_info("u/x").sha256 == new.sha256
    assert old.sha256 not in hub.store and hub.load_adapter("u/x").modules
    hub.library.rename("u/x", "u/y")
    assert _names(hub) == ["u/y"]
