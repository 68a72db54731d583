"""The server's state is rows of the catalog, on SQLite and PostgreSQL alike: what older versions kept in
files under ``HOME/server`` is brought in once on open; writes made at once from many threads all land
(each one transaction, no process lock); and no module of the server or the catalog holds a lock or a
file of state of its own."""

from __future__ import annotations

import ast
import json
import threading
from pathlib import Path

import adapterhub
from adapterhub import Hub
from adapterhub.catalog.hubgates import GateRows
from adapterhub.catalog.hubsocial import CollectionRows, LikeRows, WebhookRows
from adapterhub.catalog.hubthreads import ThreadRows
from adapterhub.server import server_store

PACKAGE = Path(adapterhub.__file__).parent
SHA = "ab" * 32
XORB = "cd" * 32


def test_state_in_files_is_brought_into_the_catalog_once(hub: Hub) -> None:
    store = server_store(hub.catalog, hub.home)
    repo = store.repos.create_repo("alice", "old", private=False, author="alice")
    gone = store.repos.create_repo("alice", "gone", private=False, author="alice")
    key = f"{repo.id}-{repo.created_at:%Y%m%d%H%M%S%f}"
    gone_key = f"{gone.id}-{gone.created_at:%Y%m%d%H%M%S%f}"
    store.repos.delete_repo(gone)
    root = hub.home / "server"
    (root / "gated").mkdir(parents=True)
    (root / "gated" / key).write_text("manual")
    (root / "gated" / f"{key}.access.json").write_text(
        json.dumps(
            {
                "bob": {
                    "user": "bob",
                    "request_id": "r1",
                    "status": "accepted",
                    "timestamp": "2026-12-01T10:00:00.000Z",
                    "reason": None,
                }
            }
        )
    )
    (root / "uploads" / key / "by" / "bob").mkdir(parents=True)
    (root / "uploads" / key / SHA).touch()
    (root / "uploads" / key / "by" / "bob" / SHA).touch()
    (root / "uploads" / key / "xorbs").mkdir()
    (root / "uploads" / key / "xorbs" / XORB).write_text(SHA)
    (root / "uploads" / "users" / "alice" / "xorbs").mkdir(parents=True)
    (root / "uploads" / "users" / "alice" / "xorbs" / XORB).write_text(SHA)
    (root / "renames.json").write_text(json.dumps({"alice/older": key, "alice/vanished": gone_key}))
    (root / "likes").mkdir()
    (root / "likes" / "bob.json").write_text(json.dumps({key: "2026-12-02T10:00:00.000Z", gone_key: "x"}))
    (root / "discussions").mkdir()
    thread = {
        "num": 1,
        "title": "hi",
        "status": "open",
        "isPullRequest": False,
        "createdAt": "2026-12-01T10:00:00.000Z",
        "author": {"name": "bob"},
        "pinned": False,
        "events": [
            {
                "id": "e1",
                "type": "comment",
                "createdAt": "2026-12-01T10:00:00.000Z",
                "author": {"name": "bob"},
                "data": {"latest": {"raw": "hello", "html": "hello"}},
            }
        ],
    }
    (root / "discussions" / f"{key}.json").write_text(json.dumps({"next": 2, "items": {"1": thread}}))
    (root / "collections").mkdir()
    (root / "collections" / "alice.json").write_text(
        json.dumps(
            {
                "c1": {
                    "slug": "alice/mine-c1",
                    "title": "Mine",
                    "description": None,
                    "items": [
                        {
                            "_id": "i1",
                            "id": "alice/old",
                            "type": "model",
                            "position": 0,
                            "note": {"text": "n", "html": "n"},
                        }
                    ],
                    "lastUpdated": "2026-12-03T10:00:00.000Z",
                    "position": 0,
                    "private": False,
                    "theme": "default",
                }
            }
        )
    )
    (root / "webhooks").mkdir()
    (root / "webhooks" / "alice.json").write_text(
        json.dumps(
            {
                "h1": {
                    "id": "h1",
                    "url": "http://127.0.0.1:9/hook",
                    "watched": [{"type": "user", "name": "alice"}],
                    "domains": ["repo"],
                    "secret": "s",
                    "disabled": False,
                    "createdAt": "2026-12-01T10:00:00.000Z",
                }
            }
        )
    )

    store = server_store(hub.catalog, hub.home)  # a server opening this home: the files come in
    gates = GateRows(hub.catalog)
    assert store.gates.gated(repo) == "manual"
    req = gates.request_of(repo, "bob")
    assert req is not None and req.status == "accepted"
    assert gates.uploaded(repo, "alice", SHA) and gates.uploaded(repo, "bob", SHA)
    assert gates.xorb_digests(repo, "alice", XORB, []) == [SHA, SHA]
    assert store.repos.renamed("alice", "older") == repo and store.repos.renamed("alice", "vanished") is None
    assert [rid for rid, _ in LikeRows(hub.catalog).liked("bob")] == [repo.id]
    d = ThreadRows(hub.catalog).get(repo, 1)
    assert d is not None and d["title"] == "hi" and [e["id"] for e in d["events"]] == ["e1"]
    c = CollectionRows(hub.catalog).get("alice", "c1")
    assert c is not None and c["items"][0]["note"] == {"text": "n", "html": "n"}
    assert [h["id"] for h in WebhookRows(hub.catalog).of_user("alice")] == ["h1"]

    LikeRows(hub.catalog).unlike("bob", repo)
    server_store(hub.catalog, hub.home)  # once only: the files are not read again
    assert LikeRows(hub.catalog).liked("bob") == []


def test_writes_from_many_threads_at_once_all_land(hub: Hub) -> None:
    from adapterhub.server.discussions import Discussions

    store = server_store(hub.catalog, hub.home)
    repo = store.repos.create_repo("alice", "busy", private=False, author="alice")
    threads = Discussions(ThreadRows(hub.catalog), store.repos)
    likes = LikeRows(hub.catalog)
    d = threads.create(repo, "alice", "busy thread", "", pull_request=False)

    def work(n: int) -> None:
        for i in range(5):
            threads.comment(repo, d["num"], f"user{n}", f"{n}-{i}")
        likes.like(f"user{n}", repo)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    said = [e["data"]["latest"]["raw"] for e in threads.get(repo, d["num"])["events"]]
    assert sorted(said) == sorted(f"{n}-{i}" for n in range(6) for i in range(5))
    assert likes.likers(repo) == [f"user{n}" for n in range(6)]
    store.repos.delete_repo(repo)  # its threads and likes go with it
    assert likes.liked("user0") == []


def test_no_module_keeps_a_lock_or_a_state_file() -> None:
    found = []
    for p in sorted(
        [
            *(PACKAGE / "server").glob("*.py"),
            *(PACKAGE / "server" / "routes").glob("*.py"),
            *(PACKAGE / "catalog").glob("*.py"),
        ]
    ):
        tree = ast.parse(p.read_text())
        for node in tree.body:  # module level
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Call):
                name = ast.unparse(node.value.func)
                if name.endswith(("Lock", "RLock", "Semaphore", "Condition")):
                    found.append(f"{p.name}: {ast.unparse(node)}")
        if p.name != "legacy.py":
            found += [
                f"{p.name}: json.dump"
                for n in ast.walk(tree)
                if isinstance(n, ast.Attribute) and ast.unparse(n) == "json.dump"
            ]
    assert found == []


def test_the_hub_imports_nothing_of_the_server_and_no_sql_lives_outside_the_catalog() -> None:
    hub = ast.parse((PACKAGE / "hub.py").read_text())
    found = [
        ast.unparse(n)
        for n in ast.walk(hub)
        if isinstance(n, ast.ImportFrom) and "server" in (n.module or "")
    ]
    for p in sorted(PACKAGE.rglob("*.py")):
        if "catalog" not in p.relative_to(PACKAGE).parts:
            found += [
                f"{p.name}: {ast.unparse(n)}"
                for n in ast.walk(ast.parse(p.read_text()))
                if isinstance(n, (ast.Import, ast.ImportFrom))
                and any(
                    "sqlalchemy" in (m or "")
                    for m in [getattr(n, "module", None), *(a.name for a in n.names)]
                )
            ]
    assert found == []


def test_values_longer_than_their_columns_are_a_400_on_both_backends(hub: Hub) -> None:
    import pytest

    from adapterhub.errors import BadRequestError
    from adapterhub.server.collections import Collections

    collections = Collections(CollectionRows(hub.catalog))
    c = collections.create("alice", {"title": "Mine"})
    with pytest.raises(BadRequestError, match="at most 300 characters"):
        collections.add_item(c["slug"], "alice", {"item": {"type": "model", "id": "a/" + "x" * 1000}})
    assert collections.get(c["slug"], "alice")["items"] == []
    added = collections.add_item(c["slug"], "alice", {"item": {"type": "model", "id": "a/" + "x" * 290}})
    assert [i["id"] for i in added["items"]] == ["a/" + "x" * 290]
