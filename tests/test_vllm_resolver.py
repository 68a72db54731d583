"""The vLLM LoRA resolver plugin (issue 25, "vLLM fleets"), without vLLM: `resolve_adapter` turns
``NAME`` / ``NAME@REVISION`` into a content-addressed, sha256-checked PEFT folder, never a stale one under
a reused name, and hands over nothing vLLM would refuse."""

from __future__ import annotations

import importlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.adapters import make_catalog_adapter

from adapterhub import Hub
from adapterhub.integrations import vllm
from adapterhub.integrations.vllm import MANIFEST, resolve_adapter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-resolver")
    return {
        "a": make_catalog_adapter(root / "a", 4, 8, ["q_proj", "v_proj"], seed=1),
        "b": make_catalog_adapter(root / "b", 2, 4, ["q_proj"], seed=2),
        "dora": make_catalog_adapter(root / "dora", 2, 4, ["q_proj"], seed=3, use_dora=True),
    }


def test_a_name_resolves_to_a_checked_peft_folder(tmp_path: Path, made: dict[str, Path]) -> None:
    from peft import LoraConfig

    cache = tmp_path / "cache"
    with Hub(tmp_path / "home") as hub:
        info = hub.add_adapter(made["a"], name="sql")
        got = resolve_adapter(hub, "sql", cache=cache)
        assert got is not None and got.sha256 == info.sha256
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            assert (got.path / f).read_bytes() == (made["a"] / f).read_bytes()
        assert LoraConfig.from_pretrained(str(got.path)).r == 4
        assert got.path.parent.parent == cache and got.path.name == got.key
        stamp = (got.path / "adapter_model.safetensors").stat().st_mtime_ns
        again = resolve_adapter(hub, "sql", cache=cache)
        assert again == got  # cached: the same folder and id, not written again
        assert (got.path / "adapter_model.safetensors").stat().st_mtime_ns == stamp
        # pinned revisions: a prefix of the adapter's sha256, never something else
        assert resolve_adapter(hub, f"sql@{info.sha256[:12]}", cache=cache) == got
        assert resolve_adapter(hub, "sql@" + "0" * 12, cache=cache) is None
        assert resolve_adapter(hub, f"sql@{info.sha256[:4]}", cache=cache) is None  # too short to pin
        assert resolve_adapter(hub, "nosuch", cache=cache) is None
        # a file changed by hand is caught by the manifest and written again
        victim = got.path / "adapter_model.safetensors"
        victim.chmod(0o644)
        victim.write_bytes(b"tampered")
        fixed = resolve_adapter(hub, "sql", cache=cache)
        assert fixed == got and victim.read_bytes() == (made["a"] / "adapter_model.safetensors").read_bytes()
        assert set(json.loads((got.path / MANIFEST).read_text())) == {
            "adapter_model.safetensors",
            "adapter_config.json",
        }
        assert [p.name for p in got.path.parent.iterdir()] == [got.key]  # no scratch left behind

        # the name reused for other content: another folder and id, never the old one
        hub.remove_adapter("sql")
        assert resolve_adapter(hub, "sql", cache=cache) is None
        hub.add_adapter(made["b"], name="sql")
        new = resolve_adapter(hub, "sql", cache=cache)
        assert new is not None and new.path != got.path and new.lora_int_id != got.lora_int_id
        assert (new.path / "adapter_model.safetensors").read_bytes() == (
            made["b"] / "adapter_model.safetensors"
        ).read_bytes()


def test_what_vllm_refuses_is_not_handed_over(tmp_path: Path, made: dict[str, Path]) -> None:
    cache = tmp_path / "cache"
    with Hub(tmp_path / "home") as hub:
        hub.add_adapter(made["dora"], name="dora")
        assert resolve_adapter(hub, "dora", cache=cache) is None
        assert not cache.exists() or not any(cache.rglob("adapter_model.safetensors"))


def test_the_entry_point_names_the_register_function() -> None:
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    target = doc["project"]["entry-points"]["vllm.general_plugins"]["adapterhub"]
    module, _, attr = target.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from test_server import start_server

    yield from start_server(tmp_path_factory)


def test_a_private_adapter_is_never_handed_over_unless_the_operator_allows_it(
    tmp_path: Path, made: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("ADAPTERHUB_VLLM_ALLOW_PRIVATE", raising=False)
    cache = tmp_path / "cache"
    with Hub(tmp_path / "home") as hub:
        info = hub.add_adapter(made["a"], name="alice/secret", tags=["private"])
        with caplog.at_level(logging.WARNING, logger="adapterhub.integrations.vllm"):
            assert resolve_adapter(hub, "alice/secret", cache=cache) is None
        assert len(caplog.records) == 1 and "private" in caplog.records[0].getMessage()
        assert resolve_adapter(hub, f"alice/secret@{info.sha256[:12]}", cache=cache) is None
        assert not cache.exists() or not any(cache.rglob("adapter_model.safetensors"))
        # one handed over before it was tagged private: its cached folder is not handed over again
        hub.add_adapter(made["b"], name="shared")
        assert resolve_adapter(hub, "shared", cache=cache) is not None
        hub.tag_adapter("shared", ["private"])
        assert resolve_adapter(hub, "shared", cache=cache) is None
        for almost in ("true", "yes", "0", ""):  # only the documented value opts in
            monkeypatch.setenv("ADAPTERHUB_VLLM_ALLOW_PRIVATE", almost)
            assert resolve_adapter(hub, "alice/secret", cache=cache) is None
        monkeypatch.setenv("ADAPTERHUB_VLLM_ALLOW_PRIVATE", "1")
        got = resolve_adapter(hub, "alice/secret", cache=cache)
        assert got is not None and got.sha256 == info.sha256


def _pull_env(monkeypatch: pytest.MonkeyPatch, url: str, **env: str) -> None:
    for k in ("PULL", "NAMESPACES", "TOKEN", "ALLOW_PRIVATE", "MAX_PULLS", "ENDPOINT"):
        monkeypatch.delenv(f"ADAPTERHUB_VLLM_{k}", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(vllm, "PULLS", vllm.PullBudget())  # a fresh process's count


def test_owner_repo_at_rev_is_pulled_from_a_hub_server(
    server: Any, tmp_path: Path, made: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_server import online_hf

    online_hf(monkeypatch)
    with Hub(tmp_path / "home") as hub:
        hub.add_adapter(made["a"], name="a")
        first = hub.push_adapter("a", "alice/fleet", endpoint=server.url, token=server.alice).commit
    _pull_env(monkeypatch, server.url, ADAPTERHUB_VLLM_PULL="1", ADAPTERHUB_VLLM_NAMESPACES="bob, alice")
    cache = tmp_path / "cache"
    with Hub(tmp_path / "fleet") as fleet:
        got = resolve_adapter(fleet, "alice/fleet", cache=cache)
        assert got is not None and got.name == f"alice/fleet-{first[:12]}"
        assert (got.path / "adapter_model.safetensors").read_bytes() == (
            made["a"] / "adapter_model.safetensors"
        ).read_bytes()
        assert resolve_adapter(fleet, f"alice/fleet@{first}", cache=cache) == got
        assert resolve_adapter(fleet, "alice/nosuch", cache=cache) is None
    # main moves on: the same request now gets the new commit's adapter, in a folder of its own
    with Hub(tmp_path / "home") as hub:
        hub.remove_adapter("a")
        hub.add_adapter(made["b"], name="a")
        second = hub.push_adapter("a", "alice/fleet", endpoint=server.url, token=server.alice).commit
    with Hub(tmp_path / "fleet") as fleet:
        new = resolve_adapter(fleet, "alice/fleet", cache=cache)
        assert new is not None and new.name == f"alice/fleet-{second[:12]}" and new.path != got.path
        assert resolve_adapter(fleet, f"alice/fleet@{first}", cache=cache) == got  # the pinned one stays


def test_pulling_is_off_unless_the_operator_allows_it_for_a_namespace(
    server: Any, tmp_path: Path, made: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_server import online_hf

    online_hf(monkeypatch)
    with Hub(tmp_path / "home") as hub:
        hub.add_adapter(made["a"], name="a")
        hub.push_adapter("a", "alice/open", endpoint=server.url, token=server.alice)
    with Hub(tmp_path / "fleet") as fleet:
        for env in (
            {},  # the endpoint alone pulls nothing
            {"ADAPTERHUB_VLLM_NAMESPACES": "alice"},
            {"ADAPTERHUB_VLLM_PULL": "1"},  # no allow-list: no namespace
            {"ADAPTERHUB_VLLM_PULL": "1", "ADAPTERHUB_VLLM_NAMESPACES": "bob,alic"},
            {"ADAPTERHUB_VLLM_PULL": "true", "ADAPTERHUB_VLLM_NAMESPACES": "alice"},
        ):
            _pull_env(monkeypatch, server.url, **env)
            assert resolve_adapter(fleet, "alice/open", cache=tmp_path / "cache") is None, env
        assert fleet.list_adapters() == []
        _pull_env(monkeypatch, server.url, ADAPTERHUB_VLLM_PULL="1", ADAPTERHUB_VLLM_NAMESPACES="alice")
        assert resolve_adapter(fleet, "alice/open", cache=tmp_path / "cache") is not None


def test_a_pull_uses_only_the_resolvers_token_and_keeps_a_private_repo_private(
    server: Any, tmp_path: Path, made: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_server import online_hf

    online_hf(monkeypatch)
    with Hub(tmp_path / "home") as hub:
        hub.add_adapter(made["a"], name="a")
        commit = hub.push_adapter(
            "a", "alice/hidden", endpoint=server.url, token=server.alice, private=True
        ).commit
    allow = {"ADAPTERHUB_VLLM_PULL": "1", "ADAPTERHUB_VLLM_NAMESPACES": "alice"}
    cache = tmp_path / "cache"
    with Hub(tmp_path / "fleet") as fleet:
        _pull_env(monkeypatch, server.url, **allow, HF_TOKEN=server.alice)  # the operator's own login
        assert resolve_adapter(fleet, "alice/hidden", cache=cache) is None
        assert fleet.list_adapters() == []
        _pull_env(monkeypatch, server.url, **allow, ADAPTERHUB_VLLM_TOKEN=server.alice_read)
        assert resolve_adapter(fleet, "alice/hidden", cache=cache) is None  # pulled, but private
        (info,) = fleet.list_adapters()
        assert info.name == f"alice/hidden-{commit[:12]}" and "private" in info.tags
        assert resolve_adapter(fleet, info.name, cache=cache) is None
        assert not cache.exists() or not any(cache.rglob("adapter_model.safetensors"))
        monkeypatch.setenv("ADAPTERHUB_VLLM_ALLOW_PRIVATE", "1")
        got = resolve_adapter(fleet, "alice/hidden", cache=cache)
        assert got is not None and got.name == info.name


def test_the_number_of_pulls_per_process_is_capped(
    server: Any, tmp_path: Path, made: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_server import online_hf

    online_hf(monkeypatch)
    with Hub(tmp_path / "home") as hub:
        hub.add_adapter(made["a"], name="a")
        for repo in ("alice/many-1", "alice/many-2"):
            hub.push_adapter("a", repo, endpoint=server.url, token=server.alice)
    cache = tmp_path / "cache"
    _pull_env(
        monkeypatch,
        server.url,
        ADAPTERHUB_VLLM_PULL="1",
        ADAPTERHUB_VLLM_NAMESPACES="alice",
        ADAPTERHUB_VLLM_MAX_PULLS="1",
    )
    with Hub(tmp_path / "fleet") as fleet:
        first = resolve_adapter(fleet, "alice/many-1", cache=cache)
        assert first is not None
        assert resolve_adapter(fleet, "alice/many-2", cache=cache) is None  # over the cap
        assert [i.name for i in fleet.list_adapters()] == [first.name]
        assert resolve_adapter(fleet, "alice/many-1", cache=cache) == first  # cataloged already: no new pull


def test_vllm_s_table_forgets_a_name_whose_catalog_content_changed(
    tmp_path: Path, made: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`FreshLoras` as vLLM's ``lora_requests``: a name the resolver handed over stays while the catalog
    holds the same content, and is forgotten (so vLLM resolves it again) once it changes, goes or turns
    private; entries vLLM loaded itself are left alone."""
    from types import SimpleNamespace

    from adapterhub.integrations.vllm import FreshLoras, HandedOver

    monkeypatch.setattr(vllm, "RECHECK_S", 0.0)  # read the catalog on every check
    cache = tmp_path / "cache"
    with Hub(tmp_path / "home") as hub:
        hub.add_adapter(made["a"], name="sql")
        handed = HandedOver(hub, cache)
        got = resolve_adapter(hub, "sql", cache=cache)
        assert got is not None
        handed.record("sql", got.path)
        table = FreshLoras({}, handed.is_current)
        table["sql"] = SimpleNamespace(lora_path=str(got.path))
        table["static"] = SimpleNamespace(lora_path=str(made["b"]))  # --lora-modules: not ours
        assert "sql" in table and "sql" in table and "static" in table and "nosuch" not in table

        hub.remove_adapter("sql")
        hub.add_adapter(made["b"], name="sql")  # the name reused for other content
        assert "sql" not in table and "sql" not in dict(table)
        new = resolve_adapter(hub, "sql", cache=cache)
        assert new is not None and new.path != got.path
        handed.record("sql", new.path)
        table["sql"] = SimpleNamespace(lora_path=str(new.path))
        assert "sql" in table

        monkeypatch.setattr(vllm, "RECHECK_S", 3600.0)  # within the window the last answer stands
        hub.tag_adapter("sql", ["private"])  # turned private after it was served
        assert "sql" in table
        monkeypatch.setattr(vllm, "RECHECK_S", 0.0)
        assert "sql" not in table
        assert "static" in table and len(table) == 1
