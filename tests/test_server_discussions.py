"""Discussions and pull requests with the real client, Xet on: a teammate opens a pull request on
someone else's adapter repo (uploading weights through Xet), pushes to it, the owner merges; a pull
request whose files the base branch changed meanwhile is refused; only the right people may act; webhooks
are told of commits and discussions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from test_server import Server, server_on
from test_server_xet import hf, weights  # noqa: F401  (the Xet-on client fixture)


@pytest.fixture(scope="module", params=("sqlite", "postgresql"))
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """On each catalog backend: this state is rows of the catalog on both."""
    yield from server_on(request, tmp_path_factory)


def test_a_pull_request_from_another_user_through_xet_is_merged_by_the_owner(server: Server, hf: Any) -> None:  # noqa: F811
    alice = hf.HfApi(endpoint=server.url, token=server.alice)
    bob = hf.HfApi(endpoint=server.url, token=server.bob)
    alice.create_repo("alice/pr-repo")
    alice.upload_file(path_or_fileobj=b"v1", path_in_repo="notes.txt", repo_id="alice/pr-repo")
    info = bob.upload_file(
        path_or_fileobj=weights(11),
        path_in_repo="adapter_model.safetensors",
        repo_id="alice/pr-repo",
        create_pr=True,
        commit_message="better weights",
    )
    assert info.pr_num == 1 and info.pr_revision == "refs/pr/1"
    assert "adapter_model.safetensors" not in alice.list_repo_files("alice/pr-repo")
    assert "adapter_model.safetensors" in alice.list_repo_files("alice/pr-repo", revision="refs/pr/1")
    bob.upload_file(
        path_or_fileobj=b"more", path_in_repo="more.txt", repo_id="alice/pr-repo", revision="refs/pr/1"
    )
    with pytest.raises(hf.errors.HfHubHTTPError) as err:  # bob may push to his PR, not to main
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/pr-repo")
    assert err.value.response.status_code == 403
    pr = alice.get_discussion_details("alice/pr-repo", 1)
    assert (
        pr.is_pull_request
        and pr.author == "bob"
        and pr.status == "open"
        and pr.target_branch == "refs/heads/main"
    )
    assert [e.summary for e in pr.events if e.type == "commit"] == [
        "better weights",
        "Upload more.txt with huggingface_hub",
    ]
    refs = alice.list_repo_refs("alice/pr-repo", include_pull_requests=True)
    assert [r.ref for r in refs.pull_requests or []] == ["refs/pr/1"] and [b.name for b in refs.branches] == [
        "main"
    ]
    with pytest.raises(hf.errors.HfHubHTTPError) as err:
        bob.merge_pull_request("alice/pr-repo", 1)
    assert err.value.response.status_code == 403
    alice.comment_discussion("alice/pr-repo", 1, "looks good")
    alice.merge_pull_request("alice/pr-repo", 1)
    merged = alice.get_discussion_details("alice/pr-repo", 1)
    assert merged.status == "merged" and merged.merge_commit_oid == alice.model_info("alice/pr-repo").sha
    status, _, body = server.request("GET", "/alice/pr-repo/resolve/main/adapter_model.safetensors")
    assert status == 200 and body == weights(11)
    assert set(alice.list_repo_files("alice/pr-repo")) == {
        ".gitattributes",
        "notes.txt",
        "adapter_model.safetensors",
        "more.txt",
    }


def test_a_conflicting_pull_request_is_not_merged(server: Server, hf: Any) -> None:  # noqa: F811
    alice = hf.HfApi(endpoint=server.url, token=server.alice)
    alice.create_repo("alice/pr-conflict")
    alice.upload_file(path_or_fileobj=b"base", path_in_repo="f.txt", repo_id="alice/pr-conflict")
    pr = alice.upload_file(
        path_or_fileobj=b"theirs", path_in_repo="f.txt", repo_id="alice/pr-conflict", create_pr=True
    )
    alice.upload_file(path_or_fileobj=b"ours", path_in_repo="f.txt", repo_id="alice/pr-conflict")
    head = alice.model_info("alice/pr-conflict").sha
    with pytest.raises(hf.errors.HfHubHTTPError, match="both changed f.txt") as err:
        alice.merge_pull_request("alice/pr-conflict", pr.pr_num)
    assert err.value.response.status_code == 409
    assert alice.model_info("alice/pr-conflict").sha == head
    assert alice.get_discussion_details("alice/pr-conflict", pr.pr_num).status == "open"


def test_discussions(server: Server, hf: Any) -> None:  # noqa: F811
    alice = hf.HfApi(endpoint=server.url, token=server.alice)
    bob = hf.HfApi(endpoint=server.url, token=server.bob)
    alice.create_repo("alice/talk")
    alice.create_repo("alice/talk-private", private=True)
    d = bob.create_discussion("alice/talk", title="  Which base?  ", description="Llama or Qwen?")
    assert d.num == 1 and d.title == "Which base?" and not d.is_pull_request and d.author == "bob"
    first = d.events[0]
    assert first.type == "comment" and first.content == "Llama or Qwen?"
    edited = bob.edit_discussion_comment("alice/talk", 1, first.id, "Llama 3 or Qwen 2?")
    assert edited.edited and edited.content == "Llama 3 or Qwen 2?"
    with pytest.raises(hf.errors.HfHubHTTPError) as err:  # only its author edits a comment
        alice.edit_discussion_comment("alice/talk", 1, first.id, "changed")
    assert err.value.response.status_code == 403
    alice.comment_discussion("alice/talk", 1, "Llama")
    assert alice.rename_discussion("alice/talk", 1, "Base model").new_title == "Base model"
    assert alice.change_discussion_status("alice/talk", 1, "closed").new_status == "closed"
    assert [x.num for x in alice.get_repo_discussions("alice/talk", discussion_status="closed")] == [1]
    assert list(alice.get_repo_discussions("alice/talk", discussion_status="open")) == []
    assert list(alice.get_repo_discussions("alice/talk", author="carol")) == []
    with pytest.raises(hf.errors.RepositoryNotFoundError):  # a private repo's threads are not shown
        list(bob.get_repo_discussions("alice/talk-private"))
    status, _, _ = server.json("POST", "/api/models/alice/talk/discussions", {"title": "anonymous"})
    assert status == 401


def test_webhooks_are_told_of_commits_and_discussions(server: Server, hf: Any) -> None:  # noqa: F811
    import json
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    got: list[tuple[str | None, dict[str, Any]]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append((self.headers.get("X-Webhook-Secret"), json.loads(body)))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    receiver = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    try:
        alice = hf.HfApi(endpoint=server.url, token=server.alice)
        bob = hf.HfApi(endpoint=server.url, token=server.bob)
        alice.create_repo("alice/hooked")
        alice.create_repo("alice/hooked-private", private=True)
        hook = alice.create_webhook(url=url, watched=[{"type": "model", "name": "alice/hooked"}], secret="s3")
        bobs = bob.create_webhook(url=url, watched=[{"type": "user", "name": "alice"}], domains=["repo"])
        assert [h.id for h in alice.list_webhooks()] == [hook.id] and alice.get_webhook(hook.id).url == url
        with pytest.raises(hf.errors.HfHubHTTPError):  # another user's webhook is not found
            bob.get_webhook(hook.id)
        alice.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/hooked")
        alice.upload_file(path_or_fileobj=b"y", path_in_repo="y.txt", repo_id="alice/hooked-private")
        bob.create_discussion("alice/hooked", title="hello")
        deadline = time.time() + 10
        while len(got) < 3 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        events = sorted((secret or "", p["event"]["scope"], p["repo"]["name"]) for secret, p in got)
        assert events == [
            ("", "repo.content", "alice/hooked"),  # bob's (no secret); not the private repo's commit
            ("s3", "discussion", "alice/hooked"),
            ("s3", "repo.content", "alice/hooked"),
        ], events
        assert alice.disable_webhook(hook.id).disabled and not alice.enable_webhook(hook.id).disabled
        assert alice.update_webhook(hook.id, url=url + "2", watched=[]).url == url + "2"
        alice.delete_webhook(hook.id)
        bob.delete_webhook(bobs.id)
        with pytest.raises(hf.errors.HfHubHTTPError):
            alice.get_webhook(hook.id)
    finally:
        receiver.shutdown()


def test_a_pull_request_cannot_reach_what_the_owner_uploaded_but_never_committed(
    server: Server,
    hf: Any,  # noqa: F811
) -> None:
    import hashlib
    import json
    import os

    alice = hf.HfApi(endpoint=server.url, token=server.alice)
    alice.create_repo("alice/open")
    secret = os.urandom(300_000)  # no chunk in common with what bob sent from this process's Xet cache
    op = hf.CommitOperationAdd("w.safetensors", secret)
    alice.preupload_lfs_files("alice/open", additions=[op])  # uploaded (through Xet), never committed
    digest = hashlib.sha256(secret).hexdigest()
    line = {
        "key": "lfsFile",
        "value": {"path": "w.safetensors", "algo": "sha256", "oid": digest, "size": len(secret)},
    }
    body = b"".join(
        json.dumps(x).encode() + b"\n" for x in ({"key": "header", "value": {"summary": "take"}}, line)
    )
    status, _, reply = server.request(
        "POST",
        "/api/models/alice/open/commit/main?create_pr=1",
        body=body,
        token=server.bob,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert status == 400, reply
    status, _, _ = server.request("GET", "/alice/open/resolve/refs%2Fpr%2F1/w.safetensors", token=server.bob)
    assert status == 404
    # the owner herself may commit it
    status, _, reply = server.request(
        "POST",
        "/api/models/alice/open/commit/main",
        body=body,
        token=server.alice,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert status == 200, reply
