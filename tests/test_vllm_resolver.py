"""The vLLM LoRA resolver plugin (issue 25, "vLLM fleets"), without vLLM: `resolve_adapter` turns
``NAME`` / ``NAME@REVISION`` into a content-addressed, sha256-checked PEFT folder, never a stale one under
a reused name, and hands over nothing vLLM would refuse."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.adapters import make_catalog_adapter

from adapterhub import Hub
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


def test_owner_repo_at_rev_is_pulled_from_a_hub_server(
    server: Any, tmp_path: Path, made: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_server import online_hf

    online_hf(monkeypatch)
    with Hub(tmp_path / "home") as hub:
        hub.add_adapter(made["a"], name="a")
        first = hub.push_adapter("a", "alice/fleet", endpoint=server.url, token=server.alice).commit
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", server.alice)
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
