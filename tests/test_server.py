"""`adapterhub serve` against the real huggingface_hub client and raw HTTP: the Hub protocol, revisions,
private repos, tokens, and bad requests that must get the Hub's error shapes and leave repos untouched.

The server runs as a real subprocess (``python -m adapterhub serve --port 0``) on a temporary home.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from adapterhub.server.tokens import create_token, revoke_token

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")


class Server:
    """A running ``adapterhub serve`` with a home of its own and tokens for alice (write, read) and bob."""

    def __init__(self, home: Path, db: str | None = None) -> None:
        from adapterhub import Hub

        self.home, self.db = home, db
        with Hub(home, db=db) as hub:
            self.alice = create_token(hub, "alice", write=True).token
            self.alice_read = create_token(hub, "alice").token
            self.bob = create_token(hub, "bob", write=True).token
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("HF_HUB_OFFLINE", "ADAPTERHUB_HOME", "ADAPTERHUB_DB")
        }
        if db is not None:  # the server's repos, commits and tokens in that database
            env["ADAPTERHUB_DB"] = db
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adapterhub", "--home", str(home), "serve", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"server did not start: {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.url = line.split()[-1]
        assert self.url.startswith("http://127.0.0.1:")

    def stop(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        h = dict(headers or {})
        if token:
            h["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.headers, resp.read()  # type: ignore[return-value]
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read()  # type: ignore[return-value]

    def json(self, method: str, path: str, doc: Any = None, **kw: Any) -> tuple[int, dict[str, str], Any]:
        body = None if doc is None else json.dumps(doc).encode()
        headers = {"Content-Type": "application/json"} if doc is not None else {}
        status, h, data = self.request(method, path, body=body, headers=headers, **kw)
        return status, h, json.loads(data) if data else None


def start_server(tmp_path_factory: pytest.TempPathFactory, db: str | None = None) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("server-home"), db=db)
    try:
        yield srv
    finally:
        err = srv.stop()
        for tok in (srv.alice, srv.alice_read, srv.bob):
            assert tok not in err, "a token reached the server's log"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from start_server(tmp_path_factory)


def server_on(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """For a module fixture with ``params=("sqlite", "postgresql")``: a server whose repos are in SQLite
    (the home's catalog.db) or in a fresh PostgreSQL database (skipped where PostgreSQL is not installed)."""
    db = None
    if request.param == "postgresql":
        pg = request.getfixturevalue("pg_server")
        if pg is None:
            if os.environ.get("ADAPTERHUB_REQUIRE_PG"):
                pytest.fail(
                    "PostgreSQL is required (ADAPTERHUB_REQUIRE_PG) but its binaries are not installed"
                )
            pytest.skip("PostgreSQL is not installed here (apt-get install postgresql)")
        db = pg.new_database()
    yield from start_server(tmp_path_factory, db)


def online_hf(monkeypatch: pytest.MonkeyPatch) -> Any:
    """huggingface_hub, online, without Xet (as a user would set HF_HUB_DISABLE_XET=1)."""
    import huggingface_hub
    import huggingface_hub.errors
    from huggingface_hub import constants
    from huggingface_hub.utils import disable_progress_bars

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    disable_progress_bars()
    return huggingface_hub


@pytest.fixture
def hf(monkeypatch: pytest.MonkeyPatch) -> Any:
    return online_hf(monkeypatch)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ndjson(*items: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(i).encode() + b"\n" for i in items)


def head_of(server: Server, repo: str, token: str | None = None) -> str:
    status, _, info = server.json("GET", f"/api/models/{repo}", token=token)
    assert status == 200, info
    return str(info["sha"])


def test_whoami_and_bad_tokens(server: Server, hf: Any) -> None:
    api = hf.HfApi(endpoint=server.url)
    me = api.whoami(token=server.alice)
    assert me["name"] == "alice" and me["auth"]["accessToken"]["role"] == "write"
    assert api.whoami(token=server.alice_read)["auth"]["accessToken"]["role"] == "read"
    status, headers, body = server.json("GET", "/api/whoami-v2", token="ahub_not-a-token")
    assert status == 401 and body == {"error": "Invalid credentials in Authorization header"}
    assert server.json("GET", "/api/whoami-v2")[0] == 401


def test_upload_folder_snapshot_download_and_revisions(server: Server, hf: Any, tmp_path: Path) -> None:
    api = hf.HfApi(endpoint=server.url, token=server.alice)
    url = api.create_repo("alice/plain")
    assert url == f"{server.url}/alice/plain"
    assert api.create_repo("alice/plain", exist_ok=True).repo_id == "alice/plain"  # 409 carries the url
    folder = tmp_path / "up"
    (folder / "sub").mkdir(parents=True)
    weights = os.urandom(300_000)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "sub" / "notes.txt").write_text("v1")
    first = api.upload_folder(folder_path=str(folder), repo_id="alice/plain")
    assert len(first.oid) == 40 and "/commit/" in first.commit_url
    assert sorted(api.list_repo_files("alice/plain")) == [
        ".gitattributes",
        "config.json",
        "model.safetensors",
        "sub/notes.txt",
    ]
    info = api.model_info("alice/plain", files_metadata=True)
    lfs = {s.rfilename: s.lfs for s in info.siblings}
    assert lfs["model.safetensors"].sha256 == sha(weights) and lfs["config.json"] is None
    assert info.sha == first.oid

    again = api.upload_folder(folder_path=str(folder), repo_id="alice/plain")
    assert again.oid == first.oid  # nothing changed: no new commit

    (folder / "sub" / "notes.txt").write_text("v2")
    second = api.upload_folder(folder_path=str(folder), repo_id="alice/plain")
    assert second.oid != first.oid
    snap = Path(hf.snapshot_download("alice/plain", endpoint=server.url, cache_dir=str(tmp_path / "cache")))
    assert (snap / "sub" / "notes.txt").read_text() == "v2"
    assert sha((snap / "model.safetensors").read_bytes()) == sha(weights)
    old = hf.hf_hub_download(
        "alice/plain",
        "sub/notes.txt",
        revision=first.oid,
        endpoint=server.url,
        cache_dir=str(tmp_path / "cache2"),
    )
    assert Path(old).read_text() == "v1"  # every revision stays downloadable
    commits = api.list_repo_commits("alice/plain")
    assert [c.commit_id for c in commits[:2]] == [second.oid, first.oid] and commits[
        -1
    ].title == "initial commit"
    assert [b.target_commit for b in api.list_repo_refs("alice/plain").branches] == [second.oid]
    tree = {e.path for e in api.list_repo_tree("alice/plain")}
    assert tree == {".gitattributes", "config.json", "model.safetensors", "sub"}  # not recursive: a folder


def test_resolve_headers_and_ranges(server: Server, hf: Any) -> None:
    api = hf.HfApi(endpoint=server.url, token=server.alice)
    api.create_repo("alice/ranges")
    data = bytes(range(256)) * 40
    ci = api.upload_file(path_or_fileobj=data, path_in_repo="w.safetensors", repo_id="alice/ranges")
    status, headers, _ = server.request("HEAD", "/alice/ranges/resolve/main/w.safetensors")
    assert status == 200 and headers["X-Repo-Commit"] == ci.oid
    assert headers["ETag"] == f'"{sha(data)}"' and int(headers["Content-Length"]) == len(data)
    status, headers, body = server.request(
        "GET", "/alice/ranges/resolve/main/w.safetensors", headers={"Range": "bytes=100-199"}
    )
    assert (
        status == 206 and body == data[100:200] and headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    )
    status, headers, body = server.json("GET", "/alice/ranges/resolve/main/missing.bin")
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound" and headers["X-Repo-Commit"] == ci.oid
    status, headers, _ = server.json("GET", "/alice/ranges/resolve/nobranch/w.safetensors")
    assert status == 404 and headers["X-Error-Code"] == "RevisionNotFound"
    with pytest.raises(hf.errors.RevisionNotFoundError):
        api.model_info("alice/ranges", revision="nobranch")


def test_private_repos_are_invisible_without_the_owners_token(
    server: Server, hf: Any, tmp_path: Path
) -> None:
    alice = hf.HfApi(endpoint=server.url, token=server.alice)
    alice.create_repo("alice/secret", private=True)
    alice.upload_file(path_or_fileobj=b"x" * 10, path_in_repo="w.safetensors", repo_id="alice/secret")
    assert alice.model_info("alice/secret").private is True
    assert hf.HfApi(endpoint=server.url, token=server.alice_read).model_info("alice/secret").private
    for token in (False, server.bob):
        api = hf.HfApi(endpoint=server.url, token=token)
        with pytest.raises(hf.errors.RepositoryNotFoundError):
            api.model_info("alice/secret")
        with pytest.raises(hf.errors.RepositoryNotFoundError):
            api.list_repo_files("alice/secret")
        assert "alice/secret" not in [m.id for m in api.list_models()]
    status, headers, _ = server.request("GET", "/alice/secret/resolve/main/w.safetensors", token=server.bob)
    assert status == 404 and headers["X-Error-Code"] == "RepoNotFound"
    assert "alice/secret" in [m.id for m in alice.list_models()]
    # bob cannot even learn that it exists by trying to create it in alice's namespace
    status, _, _ = server.json(
        "POST", "/api/repos/create", {"name": "secret", "organization": "alice"}, token=server.bob
    )
    assert status == 403


def test_writes_need_a_write_token_of_the_namespace_owner(server: Server, hf: Any) -> None:
    alice = hf.HfApi(endpoint=server.url, token=server.alice)
    alice.create_repo("alice/guarded")
    before = head_of(server, "alice/guarded")
    for token, code in ((None, 401), (server.alice_read, 403), (server.bob, 403)):
        status, _, body = server.json(
            "POST", "/api/repos/create", {"name": "new", "organization": "alice"}, token=token
        )
        assert status == code, body
        payload = ndjson(
            {"key": "header", "value": {"summary": "x"}},
            {"key": "file", "value": {"path": "a.txt", "content": "eA==", "encoding": "base64"}},
        )
        status, _, body = server.request(
            "POST", "/api/models/alice/guarded/commit/main", body=payload, token=token
        )
        assert status == code, body
        status, _, _ = server.json(
            "DELETE", "/api/repos/delete", {"name": "guarded", "organization": "alice"}, token=token
        )
        assert status == code
    assert head_of(server, "alice/guarded") == before
    with pytest.raises(hf.errors.HfHubHTTPError):
        hf.HfApi(endpoint=server.url, token=server.bob).upload_file(
            path_or_fileobj=b"x", path_in_repo="a.txt", repo_id="alice/guarded"
        )
    # a revoked token is refused
    from adapterhub import Hub

    with Hub(server.home) as hub:
        tok = create_token(hub, "carol", write=True)
        assert server.json("GET", "/api/whoami-v2", token=tok.token)[0] == 200
        revoke_token(hub, str(tok.id))
    assert server.json("GET", "/api/whoami-v2", token=tok.token)[0] == 401


def test_bad_requests_get_hub_errors_and_never_change_a_repo(server: Server, hf: Any, tmp_path: Path) -> None:
    alice = hf.HfApi(endpoint=server.url, token=server.alice)
    alice.create_repo("alice/strict")
    alice.upload_file(path_or_fileobj=b"keep", path_in_repo="keep.txt", repo_id="alice/strict")
    before = head_of(server, "alice/strict")
    header = {"key": "header", "value": {"summary": "bad"}}
    good_file = {"key": "file", "value": {"path": "new.txt", "content": base64.b64encode(b"new").decode()}}
    bad_bodies = {
        "traversal": ndjson(
            header, good_file, {"key": "file", "value": {"path": "../../etc/passwd", "content": "eA=="}}
        ),
        "absolute": ndjson(header, {"key": "file", "value": {"path": "/abs", "content": "eA=="}}),
        "dot-git": ndjson(header, {"key": "file", "value": {"path": ".git/config", "content": "eA=="}}),
        "malformed": ndjson(header, good_file) + b"{not json\n",
        "no header": ndjson(good_file),
        "bad base64": ndjson(header, {"key": "file", "value": {"path": "x.txt", "content": "%%%"}}),
        "unknown key": ndjson(header, {"key": "symlink", "value": {"path": "x"}}),
        "unknown oid": ndjson(
            header,
            good_file,
            {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "0" * 64, "size": 3}},
        ),
        "missing file": ndjson(header, good_file, {"key": "deletedFile", "value": {"path": "nope.txt"}}),
    }
    objects_before = sorted(p for p in (server.home / "server" / "objects").rglob("*") if p.is_file())
    for what, body in bad_bodies.items():
        status, headers, data = server.request(
            "POST", "/api/models/alice/strict/commit/main", body=body, token=server.alice
        )
        assert status in (400, 404), (what, status, data)
        assert "error" in json.loads(data), what
        assert head_of(server, "alice/strict") == before, what
    # all or nothing: the good file of a refused commit was not kept either
    assert sorted(p for p in (server.home / "server" / "objects").rglob("*") if p.is_file()) == objects_before

    # oversized bodies are refused from the Content-Length alone
    u = urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.putrequest("POST", "/api/models/alice/strict/commit/main")
    conn.putheader("Authorization", f"Bearer {server.alice}")
    conn.putheader("Content-Length", str(10**12))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "larger than this server accepts" in json.loads(resp.read())["error"]
    conn.close()

    # LFS: an object whose bytes do not match its oid is refused and not stored
    data = b"lfs object"
    status, _, batch = server.json(
        "POST",
        "/alice/strict.git/info/lfs/objects/batch",
        {"operation": "upload", "objects": [{"oid": sha(data), "size": len(data)}]},
        token=server.alice,
    )
    href = batch["objects"][0]["actions"]["upload"]["href"]
    path = href[len(server.url) :]
    status, _, _ = server.request("PUT", path, body=b"lfs objecX")
    assert status == 400
    assert (
        server.json(
            "POST",
            "/alice/strict.git/info/lfs/objects/verify",
            {"oid": sha(data), "size": len(data)},
            token=server.alice,
        )[0]
        == 404
    )
    status, _, _ = server.request("PUT", path.replace("sig=", "sig=0"), body=data)
    assert status == 403  # the upload URL is signed
    assert server.request("PUT", path, body=data)[0] == 200
    assert (
        server.json(
            "POST",
            "/alice/strict.git/info/lfs/objects/verify",
            {"oid": sha(data), "size": len(data)},
            token=server.alice,
        )[0]
        == 200
    )
    status, _, batch = server.json(
        "POST",
        "/alice/strict.git/info/lfs/objects/batch",
        {"operation": "upload", "objects": [{"oid": "xyz", "size": 1}]},
        token=server.alice,
    )
    assert status == 200 and batch["objects"][0]["error"]["code"] == 422
    assert head_of(server, "alice/strict") == before

    # a README whose YAML is broken is refused by validate-yaml, before anything is uploaded
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        alice.upload_file(
            path_or_fileobj=b"---\ntags: [unclosed\n---\n", path_in_repo="README.md", repo_id="alice/strict"
        )
    assert head_of(server, "alice/strict") == before


def test_list_models_search_and_filters(server: Server, hf: Any) -> None:
    alice = hf.HfApi(endpoint=server.url, token=server.alice)
    for name, base, lib in (
        ("lora-a", "org/base-1", "peft"),
        ("lora-b", "org/base-2", "peft"),
        ("model-c", None, "transformers"),
    ):
        alice.create_repo(f"alice/{name}")
        meta = f"library_name: {lib}\ntags: [x]\n" + (
            f"base_model: {base}\nbase_model_relation: adapter\n" if base else ""
        )
        alice.upload_file(
            path_or_fileobj=f"---\n{meta}---\n# {name}\n".encode(),
            path_in_repo="README.md",
            repo_id=f"alice/{name}",
        )
    api = hf.HfApi(endpoint=server.url, token=False)
    peft = {m.id for m in api.list_models(filter="peft")}
    assert {"alice/lora-a", "alice/lora-b"} <= peft and "alice/model-c" not in peft
    assert [m.id for m in api.list_models(filter=["peft", "base_model:adapter:org/base-2"])] == [
        "alice/lora-b"
    ]
    assert {m.id for m in api.list_models(search="lora-")} == {"alice/lora-a", "alice/lora-b"}
    status, _, found = server.json("GET", "/api/models?library=peft&base_model=org/base-1")
    assert status == 200 and [m["id"] for m in found] == ["alice/lora-a"]
    info = api.model_info("alice/lora-a")
    assert info.library_name == "peft" and info.card_data["base_model"] == "org/base-1"


def test_delete_repo_and_branches(server: Server, hf: Any) -> None:
    alice = hf.HfApi(endpoint=server.url, token=server.alice)
    alice.create_repo("alice/temp")
    alice.upload_file(path_or_fileobj=os.urandom(1000), path_in_repo="w.safetensors", repo_id="alice/temp")
    alice.create_branch("alice/temp", branch="dev")
    ci = alice.upload_file(
        path_or_fileobj=b"dev only", path_in_repo="dev.txt", repo_id="alice/temp", revision="dev"
    )
    assert "dev.txt" not in alice.list_repo_files("alice/temp")
    assert "dev.txt" in alice.list_repo_files("alice/temp", revision="dev")
    assert alice.model_info("alice/temp", revision="dev").sha == ci.oid
    alice.delete_repo("alice/temp")
    with pytest.raises(hf.errors.RepositoryNotFoundError):
        alice.model_info("alice/temp")
