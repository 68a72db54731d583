"""Two `adapterhub serve` processes on one PostgreSQL database and one store folder act as one hub: a push
through one is pulled through the other; tokens, gating and access requests, discussions and pull
requests, collections, likes, webhooks and moved repos are seen alike from both; an LFS upload URL one
signs, the other accepts. And a bounded load test across both (bench/replica_load.py): committers on
one repo, downloaders, commenters on one thread and a pusher (push through one, pull through the other),
split over the two replicas, lose no acknowledged commit, file, comment, like or push; nor when one
replica is killed mid-upload."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers.adapters import make_catalog_adapter
from test_server import Server, online_hf

from adapterhub import Hub
from adapterhub.server.tokens import create_token, revoke_token

ROOT = Path(__file__).resolve().parents[1]


class Replica(Server):
    """Another ``adapterhub serve`` on the home and database of ``first``, with its tokens."""

    def __init__(self, first: Server, db: str) -> None:
        self.home = first.home
        self.alice, self.alice_read, self.bob = first.alice, first.alice_read, first.bob
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "ADAPTERHUB_HOME")}
        env["ADAPTERHUB_DB"] = db
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adapterhub", "--home", str(self.home), "serve", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(
                f"replica did not start: {self.proc.stderr.read() if self.proc.stderr else ''}"
            )
        self.url = line.split()[-1]
        self.db = db


def pg_url(request: pytest.FixtureRequest) -> str:
    pg = request.getfixturevalue("pg_server")
    if pg is None:
        if os.environ.get("ADAPTERHUB_REQUIRE_PG"):
            pytest.fail("PostgreSQL is required (ADAPTERHUB_REQUIRE_PG) but its binaries are not installed")
        pytest.skip("PostgreSQL is not installed here (apt-get install postgresql)")
    return str(pg.new_database())


@pytest.fixture(scope="module")
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server]]:
    db = pg_url(request)
    a = Server(tmp_path_factory.mktemp("replicated-home"), db=db)
    b: Server | None = None
    try:
        b = Replica(a, db)
        yield a, b
    finally:
        for srv in (a, b):
            if srv is not None:
                err = srv.stop()
                assert a.alice not in err and a.bob not in err, "a token reached a replica's log"


@pytest.fixture
def hf(monkeypatch: pytest.MonkeyPatch) -> Any:
    return online_hf(monkeypatch)


def test_a_push_through_one_replica_is_pulled_through_the_other(
    pair: tuple[Server, Server], hf: Any, tmp_path: Path
) -> None:
    a, b = pair
    made = make_catalog_adapter(tmp_path / "sql", 8, 16, ["q_proj", "v_proj"], seed=3)
    with Hub(tmp_path / "pusher") as pusher, Hub(tmp_path / "puller") as puller:
        info = pusher.add_adapter(made, name="sql")
        pushed = pusher.push_adapter("sql", "alice/sql", endpoint=a.url, token=a.alice)
        pulled = puller.pull_adapter("alice/sql", endpoint=b.url, token=b.bob)
        assert pulled.changed and pulled.commit == pushed.commit and pulled.adapter.sha256 == info.sha256
        # and back: a change pushed through the second is the head the first answers
        pusher.tag_adapter("sql", ["v2"])
        again = pusher.push_adapter("sql", "alice/sql", endpoint=b.url, token=b.alice, message="retag")
        assert again.changed and hf.HfApi(endpoint=a.url).model_info("alice/sql").sha == again.commit


def test_an_upload_url_one_replica_signs_the_other_accepts(pair: tuple[Server, Server]) -> None:
    a, b = pair
    data = b"weights signed by one, accepted by the other " * 100
    oid = hashlib.sha256(data).hexdigest()
    assert a.json("POST", "/api/repos/create", {"name": "signed", "type": "model"}, token=a.alice)[0] == 200
    status, _, batch = a.json(
        "POST",
        "/alice/signed.git/info/lfs/objects/batch",
        {"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]},
        token=a.alice,
    )
    assert status == 200, batch
    href = batch["objects"][0]["actions"]["upload"]["href"]
    assert href.startswith(a.url)
    status, _, body = b.request("PUT", href[len(a.url) :], body=data)  # the URL of one, sent to the other
    assert status == 200, body
    verify = {"oid": oid, "size": len(data)}
    assert a.json("POST", "/alice/signed.git/info/lfs/objects/verify", verify, token=a.alice)[0] == 200


def test_tokens_gating_discussions_collections_likes_and_moves_are_one_state(
    pair: tuple[Server, Server], hf: Any, tmp_path: Path
) -> None:
    a, b = pair
    alice_a, alice_b = hf.HfApi(endpoint=a.url, token=a.alice), hf.HfApi(endpoint=b.url, token=b.alice)
    bob_a, bob_b = hf.HfApi(endpoint=a.url, token=a.bob), hf.HfApi(endpoint=b.url, token=b.bob)
    alice_a.create_repo("alice/shared")
    alice_b.upload_file(path_or_fileobj=b"weights", path_in_repo="w.bin", repo_id="alice/shared")

    # gating set through one is enforced by the other; access granted through the other opens the first
    alice_a.update_repo_settings("alice/shared", gated="manual")
    assert bob_b.model_info("alice/shared").gated == "manual"
    with pytest.raises(hf.errors.GatedRepoError):
        bob_b.auth_check("alice/shared")
    alice_b.grant_access("alice/shared", "bob")
    (req,) = alice_a.list_accepted_access_requests("alice/shared")
    assert req.username == "bob"
    got = hf.hf_hub_download("alice/shared", "w.bin", endpoint=a.url, token=a.bob, cache_dir=str(tmp_path))
    assert Path(got).read_bytes() == b"weights"

    # discussions and pull requests: opened on one, commented and merged on the other
    d = bob_a.create_discussion("alice/shared", title="a question", description="why r=8?")
    bob_b.comment_discussion("alice/shared", d.num, "and alpha?")
    seen = alice_a.get_discussion_details("alice/shared", d.num)
    assert [e.content for e in seen.events if e.type == "comment"] == ["why r=8?", "and alpha?"]
    pr = bob_b.create_pull_request("alice/shared", title="add notes")
    bob_a.upload_file(
        path_or_fileobj=b"notes",
        path_in_repo="notes.txt",
        repo_id="alice/shared",
        revision=f"refs/pr/{pr.num}",
    )
    alice_a.merge_pull_request("alice/shared", pr.num)
    assert bob_b.get_discussion_details("alice/shared", pr.num).status == "merged"
    assert "notes.txt" in alice_b.list_repo_files("alice/shared")
    assert [x.num for x in alice_b.get_repo_discussions("alice/shared")] == [pr.num, d.num]

    # likes and collections
    assert a.request("POST", "/api/models/alice/shared/like", token=a.bob)[0] == 200
    assert [u.username for u in alice_b.list_repo_likers("alice/shared")] == ["bob"]
    c = alice_b.create_collection("Shared adapters")
    alice_a.add_collection_item(c.slug, item_id="alice/shared", item_type="model", note="the gated one")
    (item,) = bob_b.get_collection(c.slug).items
    assert item.item_id == "alice/shared" and item.note == "the gated one"
    assert [x.slug for x in bob_a.list_collections(owner="alice")] == [c.slug]

    # a move through one: the old name resolves on the other, the like follows
    alice_a.move_repo("alice/shared", "alice/shared-moved")
    status, _, _ = b.request("GET", "/alice/shared/resolve/main/w.bin", token=b.alice)
    assert status in (200, 307)
    assert bob_b.list_liked_repos().models == ["alice/shared-moved"]

    # tokens: made and revoked on the shared catalog (as `adapterhub token` does), seen alike by both
    assert isinstance(b, Replica)
    with Hub(b.home, db=b.db) as hub:
        carol = create_token(hub, "carol")
        assert all(s.json("GET", "/api/whoami-v2", token=carol.token)[2]["name"] == "carol" for s in pair)
        revoke_token(hub, str(carol.id))
    assert [s.json("GET", "/api/whoami-v2", token=carol.token)[0] for s in pair] == [401, 401]


def test_webhooks_made_through_one_are_told_by_the_other(pair: tuple[Server, Server], hf: Any) -> None:
    a, b = pair
    got: list[dict[str, Any]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    receiver = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    try:
        alice_a, alice_b = hf.HfApi(endpoint=a.url, token=a.alice), hf.HfApi(endpoint=b.url, token=b.alice)
        alice_a.create_repo("alice/hooked")
        hook = alice_a.create_webhook(url=url, watched=[{"type": "model", "name": "alice/hooked"}])
        assert [h.id for h in alice_b.list_webhooks()] == [hook.id]
        alice_b.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/hooked")
        deadline = time.time() + 10
        while not got and time.time() < deadline:
            time.sleep(0.05)
        assert [(p["event"]["scope"], p["repo"]["name"]) for p in got] == [("repo.content", "alice/hooked")]
        alice_b.disable_webhook(hook.id)
        assert alice_a.get_webhook(hook.id).disabled
        alice_a.delete_webhook(hook.id)
        assert alice_b.list_webhooks() == []
    finally:
        receiver.shutdown()


@pytest.mark.slow
def test_load_across_two_replicas_loses_no_acknowledged_commit(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import replica_load
    finally:
        sys.path.pop(0)
    out = replica_load.run(pg_url(request), tmp_path, seconds=8.0, committers=4, downloaders=4, commenters=3)
    print(json.dumps(out, indent=2))
    assert out["lost"] == [], out["lost"]
    assert out["errors"] == 0, out["error_samples"]
    assert out["commits"] >= 8 and out["comments"] >= 6 and out["likes"] == 3 and out["pushes"] >= 1
    assert out["replicas"] == 2


@pytest.mark.slow
def test_a_replica_killed_mid_upload_leaves_the_other_serving_and_nothing_acknowledged_lost(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import replica_load
    finally:
        sys.path.pop(0)
    out = replica_load.run(
        pg_url(request), tmp_path, seconds=8.0, committers=4, downloaders=2, commenters=2, kill_after=3.0
    )
    print(json.dumps(out, indent=2))
    assert out["killed"] == 1 and out["lost"] == [], out["lost"]
    assert out["errors"] == 0, out["error_samples"]
    assert out["commits"] >= 4  # the client backs off for seconds from the dead replica: fewer than above
