"""Parts of the Hub API that real clients call beyond push and pull: tags, paths-info and
`CommitOperationCopy`, repo settings, case-insensitive repo ids, both folder-delete idioms, ids without a
namespace, and the error shape of routes the server does not have. Real huggingface_hub client against a
real ``adapterhub serve``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_server import Server, online_hf, server_on


@pytest.fixture
def hf(monkeypatch: pytest.MonkeyPatch) -> Any:
    return online_hf(monkeypatch)


@pytest.fixture(scope="module", params=("sqlite", "postgresql"))
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from server_on(request, tmp_path_factory)


def test_tags(server: Server, hf: Any, tmp_path: Path) -> None:
    api = hf.HfApi(endpoint=server.url, token=server.alice)
    api.create_repo("alice/tagged")
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="notes.txt", repo_id="alice/tagged")
    api.create_tag("alice/tagged", tag="v1.0", tag_message="first release")
    second = api.upload_file(path_or_fileobj=b"v2", path_in_repo="notes.txt", repo_id="alice/tagged")
    api.create_tag("alice/tagged", tag="v0.9", revision=first.oid)
    refs = api.list_repo_refs("alice/tagged")
    assert {(t.name, t.ref, t.target_commit) for t in refs.tags} == {
        ("v1.0", "refs/tags/v1.0", first.oid),
        ("v0.9", "refs/tags/v0.9", first.oid),
    }
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", second.oid)]
    assert api.model_info("alice/tagged", revision="v1.0").sha == first.oid
    got = hf.hf_hub_download(
        "alice/tagged",
        "notes.txt",
        revision="v1.0",
        endpoint=server.url,
        token=False,
        cache_dir=str(tmp_path / "c1"),
    )
    assert Path(got).read_bytes() == b"v1"
    assert api.model_info("alice/tagged", revision="refs/tags/v1.0").sha == first.oid
    with pytest.raises(hf.errors.HfHubHTTPError) as exc:
        api.create_tag("alice/tagged", tag="v1.0")
    assert exc.value.response.status_code == 409
    api.create_tag("alice/tagged", tag="v1.0", exist_ok=True)
    # only branches move: a commit to a tag is refused and the tag stays where it was
    with pytest.raises(hf.errors.RevisionNotFoundError):
        api.upload_file(
            path_or_fileobj=b"v3", path_in_repo="notes.txt", repo_id="alice/tagged", revision="v1.0"
        )
    assert api.model_info("alice/tagged", revision="v1.0").sha == first.oid
    with pytest.raises(hf.errors.HfHubHTTPError):
        hf.HfApi(endpoint=server.url, token=server.bob).create_tag("alice/tagged", tag="bobs")
    api.delete_tag("alice/tagged", tag="v1.0")
    assert [t.name for t in api.list_repo_refs("alice/tagged").tags] == ["v0.9"]
    with pytest.raises(hf.errors.RevisionNotFoundError):
        api.model_info("alice/tagged", revision="v1.0")
    with pytest.raises(hf.errors.RevisionNotFoundError):
        api.delete_tag("alice/tagged", tag="v1.0")
    with pytest.raises(hf.errors.RevisionNotFoundError):
        api.create_tag("alice/tagged", tag="v2", revision="no-such-branch")
    with pytest.raises(hf.errors.BadRequestError):
        api.create_tag("alice/tagged", tag="bad..name")


def test_paths_info_and_commit_operation_copy(server: Server, hf: Any, tmp_path: Path) -> None:
    api = hf.HfApi(endpoint=server.url, token=server.alice)
    api.create_repo("alice/paths")
    weights = os.urandom(2000)
    ops = [
        hf.CommitOperationAdd(path_in_repo="w.safetensors", path_or_fileobj=weights),
        hf.CommitOperationAdd(path_in_repo="sub/config.json", path_or_fileobj=b'{"a": 1}'),
    ]
    api.create_commit("alice/paths", operations=ops, commit_message="add")
    info = {p.path: p for p in api.get_paths_info("alice/paths", ["w.safetensors", "sub", "sub/", "missing"])}
    assert set(info) == {"w.safetensors", "sub"}
    assert isinstance(info["sub"], hf.hf_api.RepoFolder)
    assert info["w.safetensors"].lfs.sha256 == __import__("hashlib").sha256(weights).hexdigest()
    copies = [
        hf.CommitOperationCopy(src_path_in_repo="w.safetensors", path_in_repo="copy/w.safetensors"),
        hf.CommitOperationCopy(src_path_in_repo="sub/config.json", path_in_repo="copy/config.json"),
    ]
    api.create_commit("alice/paths", operations=copies, commit_message="copy")
    assert {"copy/w.safetensors", "copy/config.json"} <= set(api.list_repo_files("alice/paths"))
    # across repos: from a public repo anyone may copy; from a private repo of another user nobody else may.
    # (huggingface_hub 2.4 copies LFS files across repos only through Xet's lfs-files/duplicate, which this
    # server does not speak; regular files it downloads and re-sends. The server side of an LFS reference
    # across repos is tested in test_server_security.py.)
    bob = hf.HfApi(endpoint=server.url, token=server.bob)
    bob.create_repo("bob/copies")
    bob.create_commit(
        "bob/copies",
        commit_message="copy",
        operations=[
            hf.CommitOperationCopy(
                src_path_in_repo="sub/config.json",
                path_in_repo="config.json",
                src_repo_id="alice/paths",
                src_repo_type="model",
            )
        ],
    )
    got = hf.hf_hub_download(
        "bob/copies", "config.json", endpoint=server.url, token=False, cache_dir=str(tmp_path / "c")
    )
    assert Path(got).read_bytes() == b'{"a": 1}'
    api.update_repo_settings("alice/paths", private=True)
    with pytest.raises(hf.errors.RepositoryNotFoundError):
        bob.create_commit(
            "bob/copies",
            commit_message="copy again",
            operations=[
                hf.CommitOperationCopy(
                    src_path_in_repo="sub/config.json",
                    path_in_repo="c.json",
                    src_repo_id="alice/paths",
                    src_repo_type="model",
                )
            ],
        )


def test_repo_settings_visibility(server: Server, hf: Any) -> None:
    alice = hf.HfApi(endpoint=server.url, token=server.alice)
    anon = hf.HfApi(endpoint=server.url, token=False)
    alice.create_repo("alice/toggle", private=True)
    with pytest.raises(hf.errors.RepositoryNotFoundError):
        anon.model_info("alice/toggle")
    alice.update_repo_settings("alice/toggle", private=False)
    assert anon.model_info("alice/toggle").private is False
    alice.update_repo_settings("alice/toggle", private=True)
    assert alice.model_info("alice/toggle").private is True
    with pytest.raises(hf.errors.RepositoryNotFoundError):
        anon.model_info("alice/toggle")
    with pytest.raises(hf.errors.RepositoryNotFoundError):  # bob does not learn it exists
        hf.HfApi(endpoint=server.url, token=server.bob).update_repo_settings("alice/toggle", private=False)
    with pytest.raises(hf.errors.HfHubHTTPError) as exc:
        hf.HfApi(endpoint=server.url, token=server.alice_read).update_repo_settings(
            "alice/toggle", private=False
        )
    assert exc.value.response.status_code == 403
    assert alice.model_info("alice/toggle").private is True


def test_repo_ids_ignore_case(server: Server, hf: Any, tmp_path: Path) -> None:
    api = hf.HfApi(endpoint=server.url, token=server.alice)
    assert api.create_repo("alice/CaseRepo").repo_id == "alice/CaseRepo"
    with pytest.raises(hf.errors.HfHubHTTPError) as exc:
        api.create_repo("alice/caserepo")
    assert exc.value.response.status_code == 409
    assert api.create_repo("alice/caserepo", exist_ok=True).repo_id == "alice/CaseRepo"
    api.upload_file(path_or_fileobj=b"hi", path_in_repo="a.txt", repo_id="alice/caserepo")
    assert api.model_info("ALICE/CASEREPO").id == "alice/CaseRepo"
    got = hf.hf_hub_download(
        "alice/caserepo", "a.txt", endpoint=server.url, token=False, cache_dir=str(tmp_path)
    )
    assert Path(got).read_bytes() == b"hi"
    assert [m.id for m in api.list_models(search="caserepo")] == ["alice/CaseRepo"]


def test_both_folder_delete_idioms(server: Server, hf: Any) -> None:
    api = hf.HfApi(endpoint=server.url, token=server.alice)
    api.create_repo("alice/folders")
    ops = [
        hf.CommitOperationAdd(path_in_repo=p, path_or_fileobj=p.encode())
        for p in ("one/a.txt", "one/b/c.txt", "two/a.txt", "keep/x.txt")
    ]
    api.create_commit("alice/folders", operations=ops, commit_message="add")
    api.create_commit(
        "alice/folders", operations=[hf.CommitOperationDelete("one/")], commit_message="rm one/"
    )
    api.create_commit("alice/folders", operations=[hf.CommitOperationDelete("two")], commit_message="rm two")
    assert sorted(api.list_repo_files("alice/folders")) == [".gitattributes", "keep/x.txt"]
    with pytest.raises(hf.errors.EntryNotFoundError):
        api.create_commit("alice/folders", operations=[hf.CommitOperationDelete("gone/")], commit_message="x")
    api.delete_folder("keep", repo_id="alice/folders")
    assert api.list_repo_files("alice/folders") == [".gitattributes"]


def test_ids_without_a_namespace_and_unknown_routes(server: Server, hf: Any, tmp_path: Path) -> None:
    api = hf.HfApi(endpoint=server.url, token=False)
    with pytest.raises(hf.errors.RepositoryNotFoundError):
        api.model_info("gpt2")
    with pytest.raises(hf.errors.RepositoryNotFoundError):
        api.model_info("gpt2", revision="main")
    with pytest.raises(hf.errors.RepositoryNotFoundError):
        hf.hf_hub_download("gpt2", "config.json", endpoint=server.url, token=False, cache_dir=str(tmp_path))
    for path in ("/api/models/gpt2", "/api/models/gpt2/revision/main", "/gpt2/resolve/main/config.json"):
        status, headers, body = server.request("GET", path)
        assert status == 404 and headers["X-Error-Code"] == "RepoNotFound", path
        assert "gpt2" in json.loads(body)["error"]
    # a route this server does not have gets the Hub's error shape too, without an error code
    status, headers, body = server.request("GET", "/api/spaces/alice/x")
    assert status == 404 and "X-Error-Code" not in headers and "no such endpoint" in json.loads(body)["error"]
    # datasets and spaces are refused by design
    with pytest.raises(hf.errors.HfHubHTTPError) as exc:
        hf.HfApi(endpoint=server.url, token=server.alice).create_repo("alice/data", repo_type="dataset")
    assert exc.value.response.status_code == 400 and "model repos only" in str(exc.value)


def test_move_and_duplicate_repos(server: Server, hf: Any, tmp_path: Path) -> None:
    alice = hf.HfApi(endpoint=server.url, token=server.alice)
    alice.create_repo("alice/before")
    ci = alice.upload_file(
        path_or_fileobj=os.urandom(500), path_in_repo="w.safetensors", repo_id="alice/before"
    )
    alice.move_repo("alice/before", "alice/after")
    with pytest.raises(hf.errors.RepositoryNotFoundError):
        alice.model_info("alice/before")
    assert alice.model_info("alice/after").sha == ci.oid  # the history came along
    with pytest.raises(hf.errors.HfHubHTTPError) as exc:  # not into someone else's namespace
        alice.move_repo("alice/after", "bob/after")
    assert exc.value.response.status_code == 403
    alice.create_repo("alice/taken")
    with pytest.raises(hf.errors.HfHubHTTPError) as exc:
        alice.move_repo("alice/after", "alice/Taken")
    assert exc.value.response.status_code == 409

    bob = hf.HfApi(endpoint=server.url, token=server.bob)
    url = bob.duplicate_repo("alice/after", to_id="bob/copy")
    assert url.repo_id == "bob/copy"
    assert sorted(bob.list_repo_files("bob/copy")) == [".gitattributes", "w.safetensors"]
    got = hf.hf_hub_download(
        "bob/copy", "w.safetensors", endpoint=server.url, token=False, cache_dir=str(tmp_path)
    )
    assert (
        Path(got).read_bytes()
        == Path(
            hf.hf_hub_download(
                "alice/after", "w.safetensors", endpoint=server.url, token=False, cache_dir=str(tmp_path)
            )
        ).read_bytes()
    )
    assert bob.duplicate_repo("alice/after", to_id="bob/copy", exist_ok=True).repo_id == "bob/copy"
    alice.create_repo("alice/hidden", private=True)
    with pytest.raises(hf.errors.RepositoryNotFoundError):
        bob.duplicate_repo("alice/hidden", to_id="bob/stolen")


def test_auth_check(server: Server, hf: Any) -> None:
    alice = hf.HfApi(endpoint=server.url, token=server.alice)
    alice.create_repo("alice/checked", private=True)
    alice.auth_check("alice/checked")
    alice.auth_check("alice/checked", write=True)
    with pytest.raises(hf.errors.RepositoryNotFoundError):
        hf.HfApi(endpoint=server.url, token=server.bob).auth_check("alice/checked")
    reader = hf.HfApi(endpoint=server.url, token=server.alice_read)
    reader.auth_check("alice/checked")
    with pytest.raises(hf.errors.HfHubHTTPError) as exc:
        reader.auth_check("alice/checked", write=True)
    assert exc.value.response.status_code == 403


def test_list_models_pages_through_link_headers(server: Server, hf: Any) -> None:
    alice = hf.HfApi(endpoint=server.url, token=server.alice)
    for i in range(5):
        alice.create_repo(f"alice/paged-{i}")
    status, headers, first = server.json("GET", "/api/models?search=paged-&limit=2")
    assert status == 200 and len(first) == 2 and 'rel="next"' in headers["Link"]
    from huggingface_hub.utils import paginate

    every = [
        m["id"]
        for m in paginate(f"{server.url}/api/models", params={"search": "paged-", "limit": 2}, headers={})
    ]
    assert sorted(every) == [f"alice/paged-{i}" for i in range(5)] and len(every) == 5
    assert len(list(hf.HfApi(endpoint=server.url).list_models(search="paged-", limit=3))) == 3
    status, headers, last = server.json("GET", "/api/models?search=paged-&limit=2&cursor=4")
    assert len(last) == 1 and "Link" not in headers


def test_gitignore_and_gitattributes_of_the_repo_are_honoured(server: Server, hf: Any) -> None:
    api = hf.HfApi(endpoint=server.url, token=server.alice)
    api.create_repo("alice/rules")
    api.upload_file(
        path_or_fileobj=b"*.log\nbuild/\n!keep.log\n", path_in_repo=".gitignore", repo_id="alice/rules"
    )
    ops = [
        hf.CommitOperationAdd(path_in_repo=p, path_or_fileobj=b"x")
        for p in ("debug.log", "keep.log", "build/out.txt", "src/build/o.txt", "ok.txt")
    ]
    api.create_commit("alice/rules", operations=ops, commit_message="add")
    assert sorted(api.list_repo_files("alice/rules")) == [
        ".gitattributes",
        ".gitignore",
        "keep.log",
        "ok.txt",
    ]
    # a .gitignore in the same commit applies to that commit (the client sends it with preupload)
    ops = [
        hf.CommitOperationAdd(path_in_repo=".gitignore", path_or_fileobj=b"secret/\n"),
        hf.CommitOperationAdd(path_in_repo="secret/key.txt", path_or_fileobj=b"k"),
        hf.CommitOperationAdd(path_in_repo="debug.log", path_or_fileobj=b"now allowed"),
    ]
    api.create_commit("alice/rules", operations=ops, commit_message="new rules")
    files = set(api.list_repo_files("alice/rules"))
    assert "secret/key.txt" not in files and "debug.log" in files
    # .gitattributes decides what goes through LFS
    attrs = b"*.dat filter=lfs diff=lfs merge=lfs -text\n"
    api.upload_file(path_or_fileobj=attrs, path_in_repo=".gitattributes", repo_id="alice/rules")
    api.upload_file(path_or_fileobj=b"small text", path_in_repo="table.dat", repo_id="alice/rules")
    api.upload_file(path_or_fileobj=b"small text", path_in_repo="table.txt", repo_id="alice/rules")
    info = {s.rfilename: s for s in api.model_info("alice/rules", files_metadata=True).siblings}
    assert info["table.dat"].lfs is not None and info["table.txt"].lfs is None


@pytest.mark.parametrize(
    ("rules", "path", "ignored"),
    [
        ("*.log", "a/b/c.log", True),
        ("/top.txt", "top.txt", True),
        ("/top.txt", "sub/top.txt", False),
        ("build/", "build", False),  # a file named like an ignored folder
        ("build/", "x/build/y.txt", True),
        ("docs/**/*.tmp", "docs/a/b/c.tmp", True),
        ("*.log\n!keep.log", "keep.log", False),
        ("[ab].txt", "b.txt", True),
        ("[!ab].txt", "b.txt", False),
        ("# comment\n\n", "# comment", False),
        ("a?c", "a/c", False),
    ],
)
def test_gitignore_patterns(rules: str, path: str, ignored: bool) -> None:
    from adapterhub.server.gitfiles import compile_rules, is_ignored

    assert is_ignored(compile_rules(rules), path) is ignored


def test_tree_and_paths_info_expand_give_each_entrys_last_commit(server: Server, hf: Any) -> None:
    api = hf.HfApi(endpoint=server.url, token=server.alice)
    api.create_repo("alice/expand")
    first = api.create_commit(
        "alice/expand",
        commit_message="first",
        operations=[
            hf.CommitOperationAdd(path_in_repo="a.txt", path_or_fileobj=b"a"),
            hf.CommitOperationAdd(path_in_repo="sub/b.txt", path_or_fileobj=b"b"),
            hf.CommitOperationAdd(path_in_repo="sub/c.txt", path_or_fileobj=b"c"),
        ],
    )
    second = api.upload_file(path_or_fileobj=b"c2", path_in_repo="sub/c.txt", repo_id="alice/expand")
    third = api.upload_file(path_or_fileobj=b"d", path_in_repo="d.txt", repo_id="alice/expand")
    tree = {e.path: e for e in api.list_repo_tree("alice/expand", expand=True)}
    assert tree["a.txt"].last_commit.oid == first.oid and tree["a.txt"].last_commit.title == "first"
    assert tree["sub"].last_commit.oid == second.oid
    assert tree["d.txt"].last_commit.oid == third.oid
    deep = {e.path: e for e in api.list_repo_tree("alice/expand", recursive=True, expand=True)}
    assert deep["sub/b.txt"].last_commit.oid == first.oid and deep["sub/c.txt"].last_commit.oid == second.oid
    assert all(e.last_commit is None for e in api.list_repo_tree("alice/expand"))
    info = {e.path: e for e in api.get_paths_info("alice/expand", ["sub/b.txt", "sub"], expand=True)}
    assert info["sub/b.txt"].last_commit.oid == first.oid and info["sub"].last_commit.oid == second.oid
    at_first = {e.path: e for e in api.list_repo_tree("alice/expand", revision=first.oid, expand=True)}
    assert at_first["sub"].last_commit.oid == first.oid and "d.txt" not in at_first


def test_hf_repos_list_cli(server: Server, hf: Any, tmp_path: Path) -> None:
    """huggingface_hub 2.4's ``hf repos list`` (GET /api/settings/repositories): the caller's repos,
    private ones included, with the bytes their files take; others' repos are not listed (issue 28, 7)."""
    import subprocess
    import sys

    alice = hf.HfApi(endpoint=server.url, token=server.alice)
    alice.create_repo("alice/sized")
    alice.upload_file(path_or_fileobj=b"x" * 1000, path_in_repo="w.safetensors", repo_id="alice/sized")
    alice.upload_file(path_or_fileobj=b"y" * 500, path_in_repo="w.safetensors", repo_id="alice/sized")
    alice.create_repo("alice/sized-private", private=True)
    alice.upload_file(path_or_fileobj=b"z" * 300, path_in_repo="a.bin", repo_id="alice/sized-private")
    hf.HfApi(endpoint=server.url, token=server.bob).create_repo("bob/not-alices")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(
        HF_ENDPOINT=server.url, HF_TOKEN=server.alice, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1"
    )
    res = subprocess.run(
        [str(Path(sys.executable).parent / "hf"), "repos", "list", "--json", "--limit", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {r["id"]: r for r in json.loads(res.stdout)}
    assert "alice/sized" in rows and "alice/sized-private" in rows and "bob/not-alices" not in rows
    assert all(r["type"] == "model" for r in rows.values())
    assert (
        rows["alice/sized-private"]["visibility"] == "private"
        and rows["alice/sized"]["visibility"] == "public"
    )
    mine = {r.id: r for r in alice.list_user_repos()}
    # both versions of w.safetensors are kept (every revision stays downloadable), plus .gitattributes
    assert mine["alice/sized"].storage >= 1500 and mine["alice/sized-private"].storage >= 300
    assert sum(r.storage_percent for r in mine.values()) == pytest.approx(100, abs=0.1)
    assert [r.id for r in alice.list_user_repos(namespace="alice")] == list(mine)
    with pytest.raises(hf.errors.HfHubHTTPError) as err:
        list(alice.list_user_repos(namespace="bob"))
    assert err.value.response.status_code == 403
    with pytest.raises(hf.errors.HfHubHTTPError) as err:
        list(hf.HfApi(endpoint=server.url, token=False).list_user_repos())
    assert err.value.response.status_code == 401


def test_repos_list_matches_the_user_exactly(server: Server) -> None:
    """Users differ by case (a token of ALICE reads none of alice's private repos), so the storage
    listing of ``alice`` is not ALICE's either (the review found it listed them, case-folded)."""
    from adapterhub import Hub
    from adapterhub.server.tokens import create_token

    with Hub(server.home, db=server.db) as hub:
        upper = create_token(hub, "ALICE", write=True).token
    status, _, _ = server.json(
        "POST", "/api/repos/create", {"name": "case-secret", "private": True}, token=server.alice
    )
    assert status == 200
    status, _, _ = server.json("GET", "/api/models/alice/case-secret", token=upper)
    assert status == 404
    status, _, rows = server.json("GET", "/api/settings/repositories", token=upper)
    assert status == 200 and all(not r["id"].startswith("alice/") for r in rows), rows
    status, _, _ = server.json("GET", "/api/organizations/alice/settings/repositories", token=upper)
    assert status == 403
