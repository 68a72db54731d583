"""Gated repos and access requests, super-squash, moved repos, LFS-file purges, likes, collections, and
the Hub's wording where the client or its users match on it (found with huggingface_hub's own test
suite, bench/hub_suite.py). Real client, real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_server import Server, online_hf, server_on


@pytest.fixture(scope="module", params=("sqlite", "postgresql"))
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """On each catalog backend: this state is rows of the catalog on both."""
    yield from server_on(request, tmp_path_factory)


@pytest.fixture
def hf(monkeypatch: pytest.MonkeyPatch) -> Any:
    return online_hf(monkeypatch)


def test_a_gated_repos_files_are_for_its_owner_and_the_users_let_in(
    server: Server, hf: Any, tmp_path: Path
) -> None:
    alice = hf.HfApi(endpoint=server.url, token=server.alice)
    bob = hf.HfApi(endpoint=server.url, token=server.bob)
    alice.create_repo("alice/gated")
    alice.upload_file(path_or_fileobj=b"weights", path_in_repo="w.bin", repo_id="alice/gated")
    alice.update_repo_settings("alice/gated", gated="auto")
    assert alice.model_info("alice/gated").gated == "auto"
    assert bob.model_info("alice/gated").gated == "auto"  # the card is public, the files are not
    with pytest.raises(
        hf.errors.GatedRepoError, match="is restricted and you are not in the authorized list"
    ):
        bob.auth_check("alice/gated")
    with pytest.raises(hf.errors.GatedRepoError):
        hf.hf_hub_download(
            "alice/gated", "w.bin", endpoint=server.url, token=server.bob, cache_dir=str(tmp_path)
        )
    status, headers, _ = server.request("GET", "/alice/gated/resolve/main/w.bin")
    assert status == 401 and headers["X-Error-Code"] == "GatedRepo"
    assert (
        Path(
            hf.hf_hub_download(
                "alice/gated", "w.bin", endpoint=server.url, token=server.alice, cache_dir=str(tmp_path / "a")
            )
        ).read_bytes()
        == b"weights"
    )

    assert list(alice.list_accepted_access_requests("alice/gated")) == []
    alice.grant_access("alice/gated", "bob")
    with pytest.raises(hf.errors.HfHubHTTPError):
        alice.grant_access("alice/gated", "bob")
    (req,) = alice.list_accepted_access_requests("alice/gated")
    assert req.username == "bob" and req.status == "accepted"
    bob.auth_check("alice/gated")
    assert (
        Path(
            hf.hf_hub_download(
                "alice/gated", "w.bin", endpoint=server.url, token=server.bob, cache_dir=str(tmp_path / "b")
            )
        ).read_bytes()
        == b"weights"
    )
    alice.reject_access_request("alice/gated", "bob", rejection_reason="not yet")
    with pytest.raises(hf.errors.HfHubHTTPError):
        alice.reject_access_request("alice/gated", "bob", rejection_reason="not yet")
    with pytest.raises(hf.errors.GatedRepoError):
        bob.auth_check("alice/gated")
    alice.cancel_access_request("alice/gated", "bob")
    assert [r.username for r in alice.list_pending_access_requests("alice/gated")] == ["bob"]
    with pytest.raises(hf.errors.HfHubHTTPError) as err:  # only the owner sees and handles requests
        list(bob.list_pending_access_requests("alice/gated"))
    assert err.value.response.status_code == 403

    alice.update_repo_settings("alice/gated", gated=False)
    assert bob.model_info("alice/gated").gated is False
    bob.auth_check("alice/gated")


def test_super_squash_keeps_the_files_in_one_commit(server: Server, hf: Any) -> None:
    api = hf.HfApi(endpoint=server.url, token=server.alice)
    api.create_repo("alice/squash")
    for i in range(3):
        api.upload_file(path_or_fileobj=f"v{i}".encode(), path_in_repo="f.txt", repo_id="alice/squash")
    api.create_branch("alice/squash", branch="dev")
    api.super_squash_history("alice/squash")
    (only,) = api.list_repo_commits("alice/squash")
    assert only.title == "Super-squash branch 'main' using huggingface_hub"
    assert len(api.list_repo_commits("alice/squash", revision="dev")) == 4
    status, _, body = server.request("GET", "/alice/squash/resolve/main/f.txt")
    assert status == 200 and body == b"v2"
    bob = hf.HfApi(endpoint=server.url, token=server.bob)
    with pytest.raises(hf.errors.HfHubHTTPError) as err:
        bob.super_squash_history("alice/squash")
    assert err.value.response.status_code == 403


def test_the_hubs_wording(server: Server, hf: Any) -> None:
    api = hf.HfApi(endpoint=server.url, token=server.alice)
    api.create_repo("alice/wording")
    api.create_branch("alice/wording", branch="b1")
    with pytest.raises(hf.errors.HfHubHTTPError, match="Reference refs/heads/b1 already exists"):
        api.create_branch("alice/wording", branch="b1")
    with pytest.raises(hf.errors.HfHubHTTPError, match="Cannot delete refs/heads/main"):
        api.delete_branch("alice/wording", branch="main")
    with pytest.raises(hf.errors.RevisionNotFoundError):  # the missing revision is named first
        api.create_tag("alice/wording", tag="not a tag", revision="nope")
    head = api.model_info("alice/wording").sha
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/wording")
    with pytest.raises(hf.errors.HfHubHTTPError, match="The branch was updated since you opened this page"):
        api.upload_file(
            path_or_fileobj=b"y", path_in_repo="y.txt", repo_id="alice/wording", parent_commit=head
        )
    with pytest.raises(hf.errors.HfHubHTTPError) as err:
        api.upload_file(path_or_fileobj=b"z", path_in_repo="..\\z", repo_id="alice/wording")
    assert err.value.response.status_code == 422
    assert "(Request ID: " in str(err.value)
    with pytest.warns(UserWarning, match="Empty or missing yaml metadata"):
        api.upload_file(path_or_fileobj=b"# no metadata\n", path_in_repo="README.md", repo_id="alice/wording")
    (latest, *_) = api.list_repo_commits("alice/wording", formatted=True)
    assert latest.formatted_title == "Upload README.md with huggingface_hub"
    api.create_repo("alice/wording-2")
    with pytest.raises(
        hf.errors.HfHubHTTPError, match="A model repository called alice/wording-2 already exists"
    ):
        api.move_repo("alice/wording", "alice/wording-2")


def test_a_moved_repos_old_links_still_resolve(server: Server, hf: Any, tmp_path: Path) -> None:
    api = hf.HfApi(endpoint=server.url, token=server.alice)
    api.create_repo("alice/before", private=True)
    api.upload_file(path_or_fileobj=b"content", path_in_repo="file.txt", repo_id="alice/before")
    api.move_repo("alice/before", "alice/after")
    got = hf.hf_hub_download(
        "alice/before", "file.txt", endpoint=server.url, token=server.alice, cache_dir=str(tmp_path)
    )
    assert Path(got).read_bytes() == b"content"
    status, _, _ = server.request("GET", "/alice/before/resolve/main/file.txt", token=server.bob)
    assert status == 404  # a private repo's new name is not revealed
    api.create_repo("alice/before")  # a repo that takes the old name wins over the redirect
    status, _, _ = server.request("GET", "/alice/before/resolve/main/file.txt", token=server.alice)
    assert status == 404


def test_lfs_files_are_listed_and_purged_from_the_history(server: Server, hf: Any) -> None:
    api = hf.HfApi(endpoint=server.url, token=server.alice)
    api.create_repo("alice/purge")
    api.upload_file(path_or_fileobj=b"LFS 1", path_in_repo="a.bin", repo_id="alice/purge")
    api.upload_file(path_or_fileobj=b"text", path_in_repo="t.txt", repo_id="alice/purge")
    api.create_branch("alice/purge", branch="dev")
    api.upload_file(path_or_fileobj=b"LFS 2", path_in_repo="b.bin", repo_id="alice/purge", revision="dev")
    files = list(api.list_lfs_files("alice/purge"))
    assert {(f.filename, f.ref) for f in files} == {("a.bin", "main"), ("b.bin", "dev")}
    api.permanently_delete_lfs_files("alice/purge", [f for f in files if f.ref == "main"])
    assert [f.filename for f in api.list_lfs_files("alice/purge")] == ["b.bin"]
    assert set(api.list_repo_files("alice/purge")) == {".gitattributes", "t.txt"}
    assert set(api.list_repo_files("alice/purge", revision="dev")) == {".gitattributes", "t.txt", "b.bin"}
    with pytest.raises(hf.errors.HfHubHTTPError) as err:
        list(hf.HfApi(endpoint=server.url, token=server.bob).list_lfs_files("alice/purge"))
    assert err.value.response.status_code == 403


def test_likes(server: Server, hf: Any) -> None:
    alice = hf.HfApi(endpoint=server.url, token=server.alice)
    bob = hf.HfApi(endpoint=server.url, token=server.bob)
    alice.create_repo("alice/liked")
    alice.create_repo("alice/liked-private", private=True)
    # the client has no like() (the Hub likes from its web page): POST /api/models/{repo}/like
    assert server.request("POST", "/api/models/alice/liked/like", token=server.bob)[0] == 200
    assert server.request("POST", "/api/models/alice/liked-private/like", token=server.alice)[0] == 200
    assert server.request("POST", "/api/models/alice/liked-private/like", token=server.bob)[0] == 404
    assert bob.list_liked_repos().models == ["alice/liked"]
    assert alice.list_liked_repos("bob").models == ["alice/liked"]
    assert alice.list_liked_repos().models == ["alice/liked-private"]
    assert bob.list_liked_repos("alice").models == []  # a private repo's likes are not shown to others
    assert [u.username for u in alice.list_repo_likers("alice/liked")] == ["bob"]
    assert alice.model_info("alice/liked").likes == 1
    alice.move_repo("alice/liked", "alice/liked-moved")
    assert bob.list_liked_repos().models == ["alice/liked-moved"]
    bob.unlike("alice/liked-moved")
    assert bob.list_liked_repos().total == 0


def test_collections(server: Server, hf: Any) -> None:
    alice = hf.HfApi(endpoint=server.url, token=server.alice)
    bob = hf.HfApi(endpoint=server.url, token=server.bob)
    alice.create_repo("alice/for-llama")
    c = alice.create_collection("Llama adapters", description="r=8 and r=16", private=True)
    assert c.slug.startswith("alice/llama-adapters-") and c.items == [] and c.private
    with pytest.raises(hf.errors.HfHubHTTPError):
        bob.get_collection(c.slug)
    c = alice.add_collection_item(c.slug, item_id="alice/for-llama", item_type="model", note="the r=8 one")
    (item,) = c.items
    assert item.item_id == "alice/for-llama" and item.note == "the r=8 one"
    renamed = alice.update_collection_metadata(c.slug, title="Llama 3 adapters", private=False)
    assert renamed.slug != c.slug and renamed.slug.split("-")[-1] == c.slug.split("-")[-1]
    assert bob.get_collection(c.slug).slug == renamed.slug  # the old slug still works, now public
    with pytest.raises(hf.errors.HfHubHTTPError) as err:
        bob.delete_collection(renamed.slug)
    assert err.value.response.status_code == 403
    # a private repo in a public collection is shown only to who may read it (the Hub hides it too)
    alice.create_repo("alice/for-llama-private", private=True)
    alice.add_collection_item(renamed.slug, item_id="alice/for-llama-private", item_type="model")
    assert [i.item_id for i in alice.get_collection(renamed.slug).items] == [
        "alice/for-llama",
        "alice/for-llama-private",
    ]
    for api in (bob, hf.HfApi(endpoint=server.url, token=False)):
        assert [i.item_id for i in api.get_collection(renamed.slug).items] == ["alice/for-llama"]
        listed = [
            i.item_id for c in api.list_collections(owner="alice", item="alice/for-llama") for i in c.items
        ]
        assert "alice/for-llama-private" not in listed
    status, _, raw = server.request("GET", "/api/collections?owner=alice")
    assert status == 200 and b"for-llama-private" not in raw
    assert [c.slug for c in bob.list_collections(item="models/alice/for-llama")] == [renamed.slug]
    assert list(bob.list_collections(item="models/alice/for-llama-private")) == []
    alice.delete_repo("alice/for-llama-private")
    alice.delete_collection_item(renamed.slug, item.item_object_id)
    alice.delete_collection_item(renamed.slug, alice.get_collection(renamed.slug).items[-1].item_object_id)
    assert alice.get_collection(renamed.slug).items == []
    alice.delete_collection(renamed.slug)
    with pytest.raises(hf.errors.HfHubHTTPError):
        alice.get_collection(renamed.slug)
