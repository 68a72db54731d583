"""push / pull / search through the `Hub` API, against a real `adapterhub serve` subprocess and the real
huggingface_hub client: round trips, model cards, unchanged re-push, revisions, private repos, tokens,
and every refusal of `pull` (pickle, path traversal, no adapter, checksum mismatch)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from conftest import BACKENDS
from helpers.adapters import BASE_NAME, make_catalog_adapter, make_kohya
from test_server import Server, online_hf, start_server

from adapterhub import AdapterExistsError, Hub, InvalidAdapterError, PickleRefusedError, RemoteError
from adapterhub.resources import load_schema

VOLATILE = ("source", "created_at", "updated_at")


@pytest.fixture
def hf(monkeypatch: pytest.MonkeyPatch) -> Any:
    return online_hf(monkeypatch)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Module-scoped here, so that each backend's tests get a server (and its repos) of their own."""
    return str(request.param)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, backend: str) -> Iterator[Server]:
    yield from start_server(tmp_path_factory)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("remote-adapters")
    return {
        "sql": make_catalog_adapter(root / "sql", 8, 16, ["q_proj", "v_proj"], seed=1),
        "chat": make_catalog_adapter(root / "chat", 4, 8, ["q_proj", "k_proj"], seed=2, use_rslora=True),
        "kohya": make_kohya(root / "anime.safetensors"),
    }


@pytest.fixture
def home(new_hub: Any, hf: Any) -> Hub:
    return new_hub("home")


@pytest.fixture
def other(new_hub: Any) -> Hub:
    return new_hub("other")


def snapshot(hub: Hub) -> tuple[list[str], list[str]]:
    return [a.name for a in hub.list_adapters()], sorted(hub.store)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_push_then_pull_round_trip(
    home: Hub, other: Hub, server: Server, made: dict[str, Path], hf: Any
) -> None:
    info = home.add_adapter(made["sql"], name="sql", tags=["sql", "prod"], description="text to SQL")
    res = home.push_adapter("sql", "alice/sql-lora", endpoint=server.url, token=server.alice)
    assert (
        res.changed
        and len(res.commit) == 40
        and res.commit_url == f"{server.url}/alice/sql-lora/commit/{res.commit}"
    )
    assert [(p.repo_id, p.commit, p.endpoint) for p in home.adapter_pushes("sql")] == [
        ("alice/sql-lora", res.commit, server.url)
    ]
    shown = home.adapter_info("sql").to_dict()  # `show` tells where it was pushed
    jsonschema.Draft202012Validator(load_schema("adapter.schema.json")).validate(shown)
    assert [(p["repo_id"], p["commit"]) for p in shown["pushes"]] == [("alice/sql-lora", res.commit)]

    api = hf.HfApi(endpoint=server.url)
    files = sorted(api.list_repo_files("alice/sql-lora"))
    assert files == [
        ".gitattributes",
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "adapterhub.json",
    ]
    card = Path(
        hf.hf_hub_download(
            "alice/sql-lora", "README.md", endpoint=server.url, cache_dir=str(home.home / "hf-cache")
        )
    ).read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == BASE_NAME and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft" and {"lora", "sql", "prod"} <= set(meta["tags"])
    assert 'PeftModel.from_pretrained(base, "alice/sql-lora")' in card and "| rank | 8 |" in card
    record = json.loads(
        Path(
            hf.hf_hub_download(
                "alice/sql-lora",
                "adapterhub.json",
                endpoint=server.url,
                cache_dir=str(home.home / "hf-cache"),
            )
        ).read_text()
    )
    jsonschema.Draft202012Validator(load_schema("adapter.schema.json")).validate(record)
    local = ("merges", "pushes", "children")  # this catalog's history, not part of the shared record
    expected = {k: v for k, v in info.to_dict().items() if k not in local}
    assert info.source == str(made["sql"].resolve())
    expected["source"] = None  # a local path is not published
    assert record == json.loads(json.dumps(expected))

    pulled = other.pull_adapter("alice/sql-lora", endpoint=server.url)
    assert (
        pulled.changed
        and pulled.commit == res.commit
        and pulled.files == ("adapter_config.json", "adapter_model.safetensors")
    )
    got = pulled.adapter
    assert got.sha256 == info.sha256 == sha(made["sql"] / "adapter_model.safetensors")
    assert got.source == f"alice/sql-lora@{res.commit}"
    a, b = info.to_dict(), got.to_dict()
    assert {k: v for k, v in a.items() if k not in VOLATILE} == {
        k: v for k, v in b.items() if k not in VOLATILE
    }
    assert other.store.verify(got.sha256)
    # the same commit again is a no-op
    before = snapshot(other)
    again = other.pull_adapter(f"alice/sql-lora@{res.commit}", endpoint=server.url)
    assert not again.changed and again.adapter.name == "sql" and snapshot(other) == before


def test_unchanged_push_makes_no_commit_and_changes_do(
    home: Hub, server: Server, made: dict[str, Path], hf: Any
) -> None:
    home.add_adapter(made["chat"], name="chat")
    first = home.push_adapter("chat", "alice/chat", endpoint=server.url, token=server.alice)
    same = home.push_adapter("chat", "alice/chat", endpoint=server.url, token=server.alice)
    assert not same.changed and same.commit == first.commit
    commits = hf.HfApi(endpoint=server.url).list_repo_commits("alice/chat")
    assert len(commits) == 2  # the initial commit and one push
    home.tag_adapter("chat", ["v2"])
    changed = home.push_adapter(
        "chat", "alice/chat", endpoint=server.url, token=server.alice, message="retag"
    )
    assert changed.changed and changed.commit != first.commit
    assert hf.HfApi(endpoint=server.url).list_repo_commits("alice/chat")[0].title == "retag"
    # every revision stays pullable
    with Hub(home.home.parent / "old") as h:
        old = h.pull_adapter("alice/chat", revision=first.commit, endpoint=server.url)
        assert old.commit == first.commit and old.adapter.tags == ()
        new = h.pull_adapter("alice/chat", name="chat-new", endpoint=server.url)
        assert new.adapter.tags == ("v2",)


def test_branches_and_kohya_files(home: Hub, other: Hub, server: Server, made: dict[str, Path]) -> None:
    home.add_adapter(made["kohya"], name="anime")
    res = home.push_adapter("anime", "alice/anime", endpoint=server.url, token=server.alice, revision="dev")
    assert res.revision == "dev"
    with pytest.raises(InvalidAdapterError, match="holds no adapter"):
        other.pull_adapter("alice/anime", endpoint=server.url)  # main has only .gitattributes
    got = other.pull_adapter("alice/anime@dev", endpoint=server.url)
    assert got.adapter.format == "kohya" and got.adapter.sha256 == sha(made["kohya"])
    assert got.files == ("anime.safetensors",)


def test_private_repos_and_tokens(
    home: Hub, other: Hub, server: Server, made: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    home.add_adapter(made["sql"], name="secret")
    res = home.push_adapter(
        "secret", "alice/secret-lora", private=True, endpoint=server.url, token=server.alice
    )
    assert res.private
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(home.home / "no-token"))
    before = snapshot(other)
    with pytest.raises(RemoteError, match="repository not found"):
        other.pull_adapter("alice/secret-lora", endpoint=server.url)
    with pytest.raises(RemoteError, match="repository not found"):
        other.pull_adapter("alice/secret-lora", endpoint=server.url, token=server.bob)
    assert snapshot(other) == before
    assert "alice/secret-lora" not in [r.repo_id for r in other.search_hub(None, endpoint=server.url)]
    monkeypatch.setenv("HF_TOKEN", server.alice)  # the environment variable is used when --token is not given
    assert other.pull_adapter("alice/secret-lora", endpoint=server.url).changed
    assert "alice/secret-lora" in [r.repo_id for r in other.search_hub(None, endpoint=server.url)]
    monkeypatch.delenv("HF_TOKEN")

    with pytest.raises(RemoteError, match="needs a write token"):
        home.push_adapter("secret", "alice/x", endpoint=server.url)
    with pytest.raises(RemoteError, match="403") as err:
        home.push_adapter("secret", "alice/x", endpoint=server.url, token=server.bob)
    assert server.bob not in str(err.value)
    with pytest.raises(RemoteError, match="401") as err:
        home.push_adapter("secret", "alice/x", endpoint=server.url, token="ahub_wrong")
    assert "ahub_wrong" not in str(err.value)
    # tokens never reach a catalog: not the client's, not the server's (stored hashed)
    for db in (home.home / "catalog.db", other.home / "catalog.db", server.home / "catalog.db"):
        raw = b"".join(p.read_bytes() for p in db.parent.glob("catalog.db*"))
        for tok in (server.alice, server.bob, server.alice_read):
            assert tok.encode() not in raw


def test_pull_refusals_leave_nothing(
    other: Hub,
    server: Server,
    made: dict[str, Path],
    hf: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch
    from safetensors.torch import load_file

    api = hf.HfApi(endpoint=server.url, token=server.alice)
    # a repo with pickle weights only
    folder = tmp_path / "pickle"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((made["sql"] / "adapter_config.json").read_bytes())
    torch.save(load_file(str(made["sql"] / "adapter_model.safetensors")), folder / "adapter_model.bin")
    api.create_repo("alice/pickled")
    api.upload_folder(folder_path=str(folder), repo_id="alice/pickled")
    # a repo that holds no adapter
    api.create_repo("alice/empty")
    api.upload_file(path_or_fileobj=b"# nothing\n", path_in_repo="notes.md", repo_id="alice/empty")

    before = snapshot(other)
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        other.pull_adapter("alice/pickled", endpoint=server.url)
    with pytest.raises(InvalidAdapterError, match="holds no adapter"):
        other.pull_adapter("alice/empty", endpoint=server.url)
    with pytest.raises(RemoteError, match="repository not found"):
        other.pull_adapter("alice/does-not-exist", endpoint=server.url)
    with pytest.raises(RemoteError, match="no such revision"):
        other.pull_adapter("alice/pickled@nobranch", endpoint=server.url)
    with pytest.raises(RemoteError, match="invalid repo id"):
        other.pull_adapter("../etc", endpoint=server.url)

    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import BlobLfsInfo, RepoFile

    real_tree = HfApi.list_repo_tree

    def traversal_tree(self: Any, *a: Any, **kw: Any) -> Any:
        yield from real_tree(self, *a, **kw)
        yield RepoFile(path="../../outside.safetensors", size=1, oid="0" * 40)

    monkeypatch.setattr(HfApi, "list_repo_tree", traversal_tree)
    with pytest.raises(InvalidAdapterError, match="points outside the repository"):
        other.pull_adapter("alice/pickled", endpoint=server.url, allow_pickle=True)
    monkeypatch.setattr(HfApi, "list_repo_tree", real_tree)

    # a server whose listing disagrees with the bytes it sends: the sha256 check catches it
    home2 = Hub(tmp_path / "pusher")
    home2.add_adapter(made["sql"], name="sql")
    home2.push_adapter("sql", "alice/tampered", endpoint=server.url, token=server.alice)

    def lying_tree(self: Any, *a: Any, **kw: Any) -> Any:
        for f in real_tree(self, *a, **kw):
            if f.lfs is not None:
                f.lfs = BlobLfsInfo(size=f.lfs.size, sha256="0" * 64, pointer_size=f.lfs.pointer_size)
            yield f

    monkeypatch.setattr(HfApi, "list_repo_tree", lying_tree)
    with pytest.raises(RemoteError, match="does not match the server's LFS oid"):
        other.pull_adapter("alice/tampered", endpoint=server.url)
    monkeypatch.setattr(HfApi, "list_repo_tree", real_tree)
    assert snapshot(other) == before
    assert not any((other.store.tmp).iterdir()) if other.store.tmp.exists() else True

    # with --allow-pickle the pickle is converted (torch.load(weights_only=True)) and cataloged
    got = other.pull_adapter("alice/pickled", endpoint=server.url, allow_pickle=True)
    assert got.adapter.rank == 8 and got.files == ("adapter_config.json", "adapter_model.bin")
    loaded = other.load_adapter(got.adapter.name)
    assert len(loaded) == 4
    with pytest.raises(AdapterExistsError):
        other.pull_adapter("alice/tampered", name=got.adapter.name, endpoint=server.url)


def test_search_hub_filters_by_base(home: Hub, server: Server, made: dict[str, Path]) -> None:
    home.add_adapter(made["chat"], name="chat-a")
    home.add_adapter(made["sql"], name="sql-b", base="org/other-base")
    home.push_adapter("chat-a", "alice/find-chat", endpoint=server.url, token=server.alice)
    home.push_adapter("sql-b", "alice/find-sql", endpoint=server.url, token=server.alice)
    found = {r.repo_id: r for r in home.search_hub("find-", endpoint=server.url)}
    assert set(found) == {"alice/find-chat", "alice/find-sql"}
    assert found["alice/find-sql"].base_model == "org/other-base" and "lora" in found["alice/find-sql"].tags
    only = home.search_hub("find-", base="org/other-base", endpoint=server.url)
    assert [r.repo_id for r in only] == ["alice/find-sql"]


def test_peft_loads_from_the_server(home: Hub, server: Server, made: dict[str, Path], tmp_path: Path) -> None:
    home.add_adapter(made["sql"], name="sql")
    home.push_adapter("sql", "alice/peft-load", endpoint=server.url, token=server.alice)
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from helpers.adapters import tiny_llama\n"
        "from peft import PeftModel\n"
        "from safetensors.torch import load_file\n"
        "model = PeftModel.from_pretrained(tiny_llama(), 'alice/peft-load')\n"
        "want = load_file(sys.argv[2])\n"
        "got = {k.replace('.default', ''): v for k, v in model.state_dict().items() if 'lora_' in k}\n"
        "assert set(got) == set(want), (sorted(got)[:3], sorted(want)[:3])\n"
        "assert all(torch.equal(got[k], want[k]) for k in want)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(
        HF_ENDPOINT=server.url, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf")
    )
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(Path(__file__).parent),
            str(made["sql"] / "adapter_model.safetensors"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[:3000]


def test_public_source_keeps_hub_origins_and_drops_local_paths() -> None:
    from adapterhub.remote.push import public_source

    assert public_source("alice/sql-lora@" + "a" * 40) == "alice/sql-lora@" + "a" * 40
    assert public_source("derived:linear") == "derived:linear"
    assert public_source("derived:extract:/home/me/ft") == "derived:extract"
    assert public_source("/home/me/runs/sql@v2") is None
    assert public_source("C:\\runs\\sql") is None
    assert public_source(None) is None


def test_a_push_names_the_base_by_its_real_id(
    home: Hub, server: Server, made: dict[str, Path], hf: Any, tmp_path: Path
) -> None:
    """An adapter whose config names a registered base by its local name is pushed naming the base's real
    id, in adapter_config.json and in the card's base_model, as an export does (issue 28, item 5)."""
    from helpers.adapters import tiny_llama

    tiny_llama().save_pretrained(str(tmp_path / "base"), safe_serialization=True)
    home.add_base(tmp_path / "base", name=BASE_NAME, hub_id="acme/tiny-llama")
    home.add_adapter(made["sql"], name="sql")  # its config says base_model_name_or_path: tiny-llama
    home.push_adapter("sql", "alice/sql-real-base", endpoint=server.url, token=server.alice)

    def get(name: str) -> str:
        return Path(
            hf.hf_hub_download(
                "alice/sql-real-base", name, endpoint=server.url, cache_dir=str(tmp_path / "cache")
            )
        ).read_text()

    assert json.loads(get("adapter_config.json"))["base_model_name_or_path"] == "acme/tiny-llama"
    meta = yaml.safe_load(get("README.md").split("---")[1])
    assert meta["base_model"] == "acme/tiny-llama"
    assert home.adapter_info("sql").base_model == BASE_NAME  # the catalog still links the local base
