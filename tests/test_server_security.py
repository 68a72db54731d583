"""The server's blob store is shared by every repo (content-addressed, deduplicated), so knowing a sha256
must never be enough to reach its content: a commit may reference an LFS object only when it was uploaded
to that repo or a repo the committer can read holds it, and the LFS batch API does not tell whether other
repos hold an object. Run against a real ``adapterhub serve`` with the real huggingface_hub client."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_server import Server, ndjson, online_hf, server_on

# later tests build on the repos earlier ones made (bob/public): one worker runs the module in order
pytestmark = pytest.mark.xdist_group("server_security")


@pytest.fixture
def hf(monkeypatch: pytest.MonkeyPatch) -> Any:
    return online_hf(monkeypatch)


@pytest.fixture(scope="module", params=("sqlite", "postgresql"))
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from server_on(request, tmp_path_factory)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lfs_commit(server: Server, repo: str, token: str, path: str, oid: str, size: int) -> tuple[int, Any]:
    body = ndjson(
        {"key": "header", "value": {"summary": f"add {path}"}},
        {"key": "lfsFile", "value": {"path": path, "algo": "sha256", "oid": oid, "size": size}},
    )
    status, _, data = server.request("POST", f"/api/models/{repo}/commit/main", body=body, token=token)
    return status, json.loads(data)


def batch(server: Server, repo: str, token: str, oid: str, size: int) -> dict[str, Any]:
    status, _, reply = server.json(
        "POST",
        f"/{repo}.git/info/lfs/objects/batch",
        {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": size}]},
        token=token,
    )
    assert status == 200, reply
    (obj,) = reply["objects"]
    return dict(obj)


def verify(server: Server, repo: str, token: str, oid: str, size: int) -> int:
    doc = {"oid": oid, "size": size}
    return server.json("POST", f"/{repo}.git/info/lfs/objects/verify", doc, token=token)[0]


@pytest.fixture(scope="module")
def secret(server: Server) -> bytes:
    """Weights in alice's private repo alice/vault."""
    data = b"private weights " + os.urandom(4000)
    with pytest.MonkeyPatch.context() as mp:
        hf = online_hf(mp)
        alice = hf.HfApi(endpoint=server.url, token=server.alice)
        alice.create_repo("alice/vault", private=True)
        alice.upload_file(path_or_fileobj=data, path_in_repo="w.safetensors", repo_id="alice/vault")
        hf.HfApi(endpoint=server.url, token=server.bob).create_repo("bob/public")
    return data


def test_a_digest_alone_does_not_reach_another_users_private_file(
    server: Server, hf: Any, secret: bytes, tmp_path: Path
) -> None:
    before = server.json("GET", "/api/models/bob/public")[2]["sha"]
    status, reply = lfs_commit(
        server, "bob/public", server.bob, "stolen.safetensors", sha(secret), len(secret)
    )
    assert status == 400 and "was not uploaded to bob/public" in reply["error"]
    # the same answer as for an object that exists nowhere, and it does not tell the size either
    status, unknown = lfs_commit(server, "bob/public", server.bob, "stolen.safetensors", "1" * 64, 1)
    assert status == 400 and unknown["error"] == reply["error"].replace(sha(secret), "1" * 64)
    status, wrong_size = lfs_commit(server, "bob/public", server.bob, "stolen.safetensors", sha(secret), 1)
    assert status == 400 and wrong_size["error"] == reply["error"]
    assert server.json("GET", "/api/models/bob/public")[2]["sha"] == before
    with pytest.raises(hf.errors.EntryNotFoundError):
        hf.hf_hub_download(
            "bob/public",
            "stolen.safetensors",
            endpoint=server.url,
            token=False,
            cache_dir=str(tmp_path / "cache"),
        )
    # alice's read token cannot be used to plant it in a repo of alice's either (it cannot write at all)
    status, _ = lfs_commit(
        server, "alice/vault", server.alice_read, "copy.safetensors", sha(secret), len(secret)
    )
    assert status == 403


def test_the_lfs_batch_and_verify_calls_reveal_nothing_about_other_repos(
    server: Server, secret: bytes
) -> None:
    held = batch(server, "bob/public", server.bob, sha(secret), len(secret))
    absent = batch(server, "bob/public", server.bob, "2" * 64, len(secret))
    assert "upload" in held["actions"], held  # "upload needed", as for an object the server does not have
    assert set(held) == set(absent) and set(held["actions"]) == set(absent["actions"])
    assert verify(server, "bob/public", server.bob, sha(secret), len(secret)) == 404
    assert verify(server, "bob/public", server.bob, "2" * 64, len(secret)) == 404
    # the owner is told the object is there: nothing to upload again
    assert "actions" not in batch(server, "alice/vault", server.alice, sha(secret), len(secret))
    assert verify(server, "alice/vault", server.alice, sha(secret), len(secret)) == 200


def test_an_upload_must_carry_the_bytes_even_when_the_store_has_them(server: Server, secret: bytes) -> None:
    obj = batch(server, "bob/public", server.bob, sha(secret), len(secret))
    path = obj["actions"]["upload"]["href"][len(server.url) :]
    forged = b"x" * len(secret)
    assert server.request("PUT", path, body=forged)[0] == 400
    assert verify(server, "bob/public", server.bob, sha(secret), len(secret)) == 404
    status, _ = lfs_commit(server, "bob/public", server.bob, "stolen.safetensors", sha(secret), len(secret))
    assert status == 400
    # an upload URL is signed for one repo: bob's URL does not prove anything for another repo
    other = path.replace("/bob/public/", "/bob/other/")
    assert server.request("PUT", other, body=secret)[0] == 403


def test_a_user_who_has_the_same_bytes_uploads_them_like_anyone(
    server: Server, hf: Any, secret: bytes, tmp_path: Path
) -> None:
    bob = hf.HfApi(endpoint=server.url, token=server.bob)
    bob.create_repo("bob/same")
    ci = bob.upload_file(path_or_fileobj=secret, path_in_repo="mine.safetensors", repo_id="bob/same")
    got = hf.hf_hub_download(
        "bob/same", "mine.safetensors", endpoint=server.url, token=False, cache_dir=str(tmp_path / "cache")
    )
    assert Path(got).read_bytes() == secret
    assert bob.model_info("bob/same", files_metadata=True).sha == ci.oid
    # once uploaded to bob/same, bob may reference it there again
    status, reply = lfs_commit(server, "bob/same", server.bob, "again.safetensors", sha(secret), len(secret))
    assert status == 200, reply


def test_legitimate_references_still_work(server: Server, hf: Any, secret: bytes, tmp_path: Path) -> None:
    alice = hf.HfApi(endpoint=server.url, token=server.alice)
    bob = hf.HfApi(endpoint=server.url, token=server.bob)
    # re-commit an existing file of one's own repo under another path (what a rename or copy sends)
    status, reply = lfs_commit(
        server, "alice/vault", server.alice, "backup/w.safetensors", sha(secret), len(secret)
    )
    assert status == 200, reply
    assert "backup/w.safetensors" in alice.list_repo_files("alice/vault")
    # the owner may reference a blob of one of her private repos from another of her repos
    alice.create_repo("alice/derived")
    status, reply = lfs_commit(
        server, "alice/derived", server.alice, "w.safetensors", sha(secret), len(secret)
    )
    assert status == 200, reply
    # anyone may reference what a public repo holds (CommitOperationCopy across repos sends exactly this)
    shared = b"public weights " + os.urandom(3000)
    alice.create_repo("alice/open")
    alice.upload_file(path_or_fileobj=shared, path_in_repo="w.safetensors", repo_id="alice/open")
    assert "actions" not in batch(server, "bob/public", server.bob, sha(shared), len(shared))
    status, reply = lfs_commit(
        server, "bob/public", server.bob, "copied.safetensors", sha(shared), len(shared)
    )
    assert status == 200, reply
    got = hf.hf_hub_download(
        "bob/public",
        "copied.safetensors",
        endpoint=server.url,
        token=False,
        cache_dir=str(tmp_path / "cache"),
    )
    assert Path(got).read_bytes() == shared
    # an ordinary upload of a new file, and an unchanged re-upload that makes no commit
    data = os.urandom(5000)
    first = bob.upload_file(path_or_fileobj=data, path_in_repo="new.safetensors", repo_id="bob/public")
    again = bob.upload_file(path_or_fileobj=data, path_in_repo="new.safetensors", repo_id="bob/public")
    assert first.oid == again.oid
    # a regular (inline) file is content, not a reference: always fine
    body = ndjson(
        {"key": "header", "value": {"summary": "note"}},
        {"key": "file", "value": {"path": "note.txt", "content": base64.b64encode(b"hi").decode()}},
    )
    assert server.request("POST", "/api/models/bob/public/commit/main", body=body, token=server.bob)[0] == 200


def test_deleting_the_public_holder_takes_the_permission_with_it(server: Server, hf: Any) -> None:
    """Deleting the only readable holder of a blob takes the permission with it."""
    alice = hf.HfApi(endpoint=server.url, token=server.alice)
    data = b"short-lived " + os.urandom(2000)
    alice.create_repo("alice/brief")
    alice.upload_file(path_or_fileobj=data, path_in_repo="w.safetensors", repo_id="alice/brief")
    alice.create_repo("alice/keeper", private=True)
    status, _ = lfs_commit(server, "alice/keeper", server.alice, "w.safetensors", sha(data), len(data))
    assert status == 200
    alice.delete_repo("alice/brief")
    status, _ = lfs_commit(server, "bob/public", server.bob, "late.safetensors", sha(data), len(data))
    assert status == 400
    assert "upload" in batch(server, "bob/public", server.bob, sha(data), len(data))["actions"]


def batch_status(server: Server, repo: str, token: str, ref: str | None) -> tuple[int, Any]:
    doc: dict[str, Any] = {
        "operation": "upload",
        "transfers": ["basic"],
        "objects": [{"oid": "3" * 64, "size": 5}],
    }
    if ref is not None:
        doc["ref"] = {"name": ref}
    status, _, reply = server.json("POST", f"/{repo}.git/info/lfs/objects/batch", doc, token=token)
    return status, reply


def test_the_lfs_batch_hands_out_no_upload_url_for_a_branch_the_caller_cannot_write(
    server: Server, hf: Any, secret: bytes
) -> None:
    """A write token of bob asking to upload to a branch of alice's repo gets the Hub's 403 (404 for a
    private repo), not an upload action; without a ref (huggingface_hub's ``create_pr``) he may still
    upload for a pull request, and push to his own pull request's ref."""
    alice = hf.HfApi(endpoint=server.url, token=server.alice)
    bob = hf.HfApi(endpoint=server.url, token=server.bob)
    alice.create_repo("alice/shop")
    for ref in ("main", "refs/heads/main"):
        status, reply = batch_status(server, "alice/shop", server.bob, ref)
        assert status == 403 and "actions" not in json.dumps(reply), reply
        assert "rights to write to alice" in reply["error"]
    status, reply = batch_status(server, "alice/vault", server.bob, "main")
    assert status == 404 and reply.get("error_code", reply.get("error")) and "objects" not in reply
    assert batch_status(server, "alice/shop", server.alice, "main")[0] == 200
    assert batch_status(server, "alice/shop", server.alice_read, "main")[0] == 403
    assert batch_status(server, "alice/shop", server.bob, "")[0] == 400
    # the real client, as bob: refused at the batch call, nothing reaches alice's repo
    weights = os.urandom(3000)
    with pytest.raises(hf.errors.HfHubHTTPError) as err:
        bob.upload_file(path_or_fileobj=weights, path_in_repo="w.safetensors", repo_id="alice/shop")
    assert err.value.response.status_code == 403
    assert "w.safetensors" not in alice.list_repo_files("alice/shop")
    # a pull request from bob still uploads its weights through LFS (no ref), and he may push to it
    pr = bob.upload_file(
        path_or_fileobj=weights, path_in_repo="w.safetensors", repo_id="alice/shop", create_pr=True
    )
    assert "w.safetensors" in alice.list_repo_files("alice/shop", revision=pr.pr_revision)
    info = bob.model_info("alice/shop", revision=pr.pr_revision, files_metadata=True)
    assert {s.rfilename: s.lfs for s in info.siblings or []}["w.safetensors"].sha256 == sha(weights)
    assert batch_status(server, "alice/shop", server.bob, pr.pr_revision)[0] == 200
    more = os.urandom(2000)
    bob.upload_file(
        path_or_fileobj=more, path_in_repo="more.safetensors", repo_id="alice/shop", revision=pr.pr_revision
    )
    assert "more.safetensors" in alice.list_repo_files("alice/shop", revision=pr.pr_revision)
