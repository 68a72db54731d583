"""The catalog through the `Hub` API: real PEFT adapters, a real SQLite file, a real store."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers.adapters import BASE_NAME, make_all, make_kohya

from adapterhub import (
    AdapterExistsError,
    AdapterNotFoundError,
    CatalogVersionError,
    Hub,
    InvalidAdapterError,
    InvalidConfigError,
    OutputExistsError,
    PickleRefusedError,
)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    out = make_all(root)
    out["kohya"] = make_kohya(root / "anime.safetensors")
    return out


def snapshot(hub: Hub) -> tuple[list[str], list[str]]:
    """What a failed operation must leave untouched: the catalog's names and the store's objects."""
    return [a.name for a in hub.list_adapters()], sorted(hub.store)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_add_reads_metadata_from_the_files(hub: Hub, made: dict[str, Path]) -> None:
    info = hub.add_adapter(made["sql-r8"], tags=["sql"], description="SQL generation")
    assert info.name == "sql-r8"
    assert info.format == "peft" and info.peft_type == "LORA"
    assert info.rank == 8 and info.alpha == 16 and not info.use_rslora
    assert info.target_modules == ("q_proj", "v_proj")
    assert info.num_modules == 4  # two layers x two targets
    assert info.base_model == BASE_NAME
    assert info.dtype == "F32"
    assert info.sha256 == sha(made["sql-r8"] / "adapter_model.safetensors")
    files = made["sql-r8"]
    assert info.size_bytes == sum(p.stat().st_size for p in files.iterdir() if p.name.startswith("adapter_"))
    # q: 8*(32+32); v: 8*(32+16) (2 kv heads of 8 dims), two layers
    assert info.num_params == 2 * (8 * (32 + 32) + 8 * (32 + 16))
    assert info.tags == ("sql",) and info.description == "SQL generation"
    assert info.source == str(made["sql-r8"].resolve())
    mods = {m.module: m for m in info.modules or ()}
    v = mods["model.layers.1.self_attn.v_proj"]
    assert (v.kind, v.rank, v.in_features, v.out_features, v.scale) == ("linear", 8, 32, 16, 2.0)


def test_patterns_rslora_dora_and_kohya(hub: Hub, made: dict[str, Path]) -> None:
    chat = hub.add_adapter(made["chat-r4"])
    assert chat.use_rslora and chat.rank == 4
    assert {m.scale for m in chat.modules or ()} == {8 / 2}  # alpha / sqrt(r)
    math_ = hub.add_adapter(made["math-r16"])
    assert math_.rank == 16 and math_.rank_pattern == {"down_proj": 8}
    ranks = {m.short_name: m.rank for m in math_.modules or ()}
    assert ranks == {"gate_proj": 16, "up_proj": 16, "down_proj": 8}
    dora = hub.add_adapter(made["dora-r4"])
    assert dora.use_dora and all(m.dora for m in dora.modules or ())
    k = hub.add_adapter(made["kohya"])
    assert k.name == "anime" and k.format == "kohya" and k.rank == 4 and k.alpha == 2.0
    assert k.dtype == "F16"
    assert k.metadata["ss_output_name"] == "anime-style"
    assert "attn1_to_q" in k.target_modules


def test_list_filters_and_search(hub: Hub, made: dict[str, Path]) -> None:
    for name in ("sql-r8", "chat-r4", "math-r16", "kohya"):
        hub.add_adapter(made[name], tags=["mine"] if name != "kohya" else ["art"])
    hub.tag_adapter("chat-r4", ["chat", "v2"])
    names = lambda infos: [i.name for i in infos]  # noqa: E731
    assert names(hub.list_adapters()) == ["anime", "chat-r4", "math-r16", "sql-r8"]
    assert names(hub.list_adapters(rank=8)) == ["sql-r8"]
    assert names(hub.list_adapters(min_rank=8)) == ["math-r16", "sql-r8"]
    assert names(hub.list_adapters(max_rank=4)) == ["anime", "chat-r4"]
    assert names(hub.list_adapters(target="q_proj")) == ["chat-r4", "sql-r8"]
    assert names(hub.list_adapters(target="down_proj")) == ["math-r16"]
    assert names(hub.list_adapters(tag="chat")) == ["chat-r4"]
    assert names(hub.list_adapters(base=BASE_NAME.upper())) == ["chat-r4", "math-r16", "sql-r8"]
    assert names(hub.list_adapters(format="kohya")) == ["anime"]
    assert names(hub.search_adapters("chat")) == ["chat-r4"]
    assert names(hub.search_adapters("tiny zebra")) == []  # every word must match
    assert names(hub.search_adapters("tiny-llama r16")) == ["math-r16"]
    assert names(hub.search_adapters("art")) == ["anime"]  # tags
    assert names(hub.search_adapters("mine", rank=4)) == ["chat-r4"]


def test_tags_add_and_remove(hub: Hub, made: dict[str, Path]) -> None:
    hub.add_adapter(made["sql-r8"], tags=["a"])
    assert hub.tag_adapter("sql-r8", ["b", "c", "a"]).tags == ("a", "b", "c")
    assert hub.tag_adapter("sql-r8", ["a", "zzz"], remove=True).tags == ("b", "c")
    with pytest.raises(InvalidAdapterError, match="invalid tag"):
        hub.tag_adapter("sql-r8", ["has space"])
    with pytest.raises(AdapterNotFoundError, match="no adapter named 'nope'"):
        hub.tag_adapter("nope", ["x"])


def test_export_copies_stored_files_byte_for_byte(hub: Hub, made: dict[str, Path], tmp_path: Path) -> None:
    hub.add_adapter(made["math-r16"])
    out = hub.export_adapter("math-r16", tmp_path / "out")
    for fn in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / fn).read_bytes() == (made["math-r16"] / fn).read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        hub.export_adapter("math-r16", tmp_path / "out")
    hub.add_adapter(made["kohya"])
    k = hub.export_adapter("anime", tmp_path)
    assert k == tmp_path / "anime.safetensors"
    assert k.read_bytes() == made["kohya"].read_bytes()


def test_export_converts_between_formats(hub: Hub, made: dict[str, Path], tmp_path: Path) -> None:
    from adapterhub.formats import read_adapter

    hub.add_adapter(made["sql-r8"])
    out = hub.export_adapter("sql-r8", tmp_path / "sql.safetensors", format="kohya")
    back = read_adapter(out, load=True)
    orig = read_adapter(made["sql-r8"], load=True)
    assert back.format == "kohya" and len(back) == len(orig)
    for m in orig.values():
        stem = "lora_unet_" + m.module.replace(".", "_")
        assert (back[stem].delta() - m.delta()).abs().max() < 1e-6
    hub.add_adapter(out, name="sql-kohya")
    with pytest.raises(InvalidAdapterError, match="kohya files name modules without dots"):
        hub.export_adapter("sql-kohya", tmp_path / "again", format="peft")
    assert not (tmp_path / "again").exists()
    with pytest.raises(InvalidAdapterError, match="no embedding LoRA, DoRA"):
        hub.add_adapter(made["dora-r4"])
        hub.export_adapter("dora-r4", tmp_path / "dora.safetensors", format="kohya")
    assert not (tmp_path / "dora.safetensors").exists()


def test_remove_keeps_shared_files(hub: Hub, made: dict[str, Path]) -> None:
    hub.add_adapter(made["sql-r8"])
    hub.add_adapter(made["sql-r8"], name="sql-copy")
    assert len(list(hub.store)) == 2  # same content stored once
    hub.remove_adapter("sql-r8")
    assert len(list(hub.store)) == 2
    assert [a.name for a in hub.list_adapters()] == ["sql-copy"]
    hub.remove_adapters(["sql-copy"])
    assert list(hub.store) == [] and hub.list_adapters() == []
    with pytest.raises(AdapterNotFoundError):
        hub.remove_adapters(["nope"])


def test_remove_is_all_or_nothing(hub: Hub, made: dict[str, Path]) -> None:
    hub.add_adapter(made["sql-r8"])
    before = snapshot(hub)
    with pytest.raises(AdapterNotFoundError, match="'missing'"):
        hub.remove_adapters(["sql-r8", "missing"])
    assert snapshot(hub) == before


def test_duplicate_name_refused_without_changes(hub: Hub, made: dict[str, Path]) -> None:
    hub.add_adapter(made["sql-r8"], name="x")
    before = snapshot(hub)
    with pytest.raises(AdapterExistsError, match="'x' is already cataloged"):
        hub.add_adapter(made["chat-r4"], name="x")
    assert snapshot(hub) == before


@pytest.mark.parametrize("bad_name", ["", "-lead", "a b", "../up", "x" * 201])
def test_bad_names_refused(hub: Hub, made: dict[str, Path], bad_name: str) -> None:
    with pytest.raises(InvalidAdapterError, match="invalid adapter name"):
        hub.add_adapter(made["sql-r8"], name=bad_name)


def _copy_adapter(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for f in src.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_bad_inputs_leave_catalog_and_store_unchanged(
    hub: Hub, made: dict[str, Path], tmp_path: Path
) -> None:
    import torch

    hub.add_adapter(made["sql-r8"])
    before = snapshot(hub)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidAdapterError, match="no adapter_config.json"):
        hub.add_adapter(empty)
    trunc = _copy_adapter(made["chat-r4"], tmp_path / "trunc")
    data = (trunc / "adapter_model.safetensors").read_bytes()
    (trunc / "adapter_model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(InvalidAdapterError, match="truncated"):
        hub.add_adapter(trunc)
    badcfg = _copy_adapter(made["chat-r4"], tmp_path / "badcfg")
    cfg = json.loads((badcfg / "adapter_config.json").read_text())
    cfg["r"] = "four"
    (badcfg / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidConfigError, match="r: 'four' is not of type 'integer'"):
        hub.add_adapter(badcfg)
    pick = tmp_path / "pickled"
    pick.mkdir()
    (pick / "adapter_config.json").write_bytes((made["sql-r8"] / "adapter_config.json").read_bytes())
    from safetensors.torch import load_file

    torch.save(load_file(str(made["sql-r8"] / "adapter_model.safetensors")), pick / "adapter_model.bin")
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        hub.add_adapter(pick, name="pickled")
    assert snapshot(hub) == before
    assert not list(hub.store.tmp.iterdir())
    info = hub.add_adapter(pick, name="pickled", allow_pickle=True)
    assert info.num_modules == 4
    converted = load_file(str(hub.adapter_files("pickled").weights))
    original = load_file(str(made["sql-r8"] / "adapter_model.safetensors"))
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[k], original[k]) for k in original)
    assert not list(hub.store.tmp.iterdir())


def test_failure_while_writing_rows_leaves_nothing(
    hub: Hub, made: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapterhub.catalog import queries

    hub.add_adapter(made["sql-r8"])
    before = snapshot(hub)

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk fell off")

    monkeypatch.setattr(queries, "change_tags", boom)
    real_insert = queries.insert_adapter

    def insert_then_fail(conn, **kw):  # type: ignore[no-untyped-def]
        real_insert(conn, **kw)  # rows written inside the transaction ...
        raise OSError("disk fell off")  # ... then the transaction fails

    monkeypatch.setattr(queries, "insert_adapter", insert_then_fail)
    with pytest.raises(OSError, match="disk fell off"):
        hub.add_adapter(made["math-r16"])
    assert snapshot(hub) == before


def test_concurrent_adds_from_several_processes(made: dict[str, Path], tmp_path: Path) -> None:
    home = tmp_path / "shared-home"
    script = textwrap.dedent(
        """
        import sys
        from adapterhub import Hub
        proc, paths = sys.argv[1], sys.argv[2:]
        hub = Hub(sys.argv[0] and {home!r})
        for i, p in enumerate(paths):
            hub.add_adapter(p, name=f"p{{proc}}-{{i}}", tags=[f"proc{{proc}}"])
        hub.close()
        """
    ).format(home=str(home))
    paths = [str(made[n]) for n in ("sql-r8", "chat-r4", "math-r16", "dora-r4")]
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(i), *paths], stderr=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errs
    with Hub(home) as hub:
        infos = hub.list_adapters()
        assert len(infos) == 16
        assert len(list(hub.store)) == 8  # 4 adapters x (config + weights), stored once each
        assert all(hub.store.verify(d) for d in hub.store)


def test_migrations_from_empty_match_the_tables(tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from adapterhub.catalog.tables import metadata

    with Hub(tmp_path) as hub:
        from adapterhub.catalog.db import HEAD

        assert hub.db_revision() == HEAD
        with hub.catalog.engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
        assert diffs == []
        assert hub.upgrade_db() == HEAD


def test_known_revisions_match_the_migration_scripts() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from adapterhub.catalog.db import HEAD, REVISIONS
    from adapterhub.resources import data_dir

    cfg = Config()
    cfg.set_main_option("script_location", str(data_dir("migrations")))
    script = ScriptDirectory.from_config(cfg)
    assert script.get_current_head() == HEAD
    assert [s.revision for s in reversed(list(script.walk_revisions()))] == list(REVISIONS)


def test_catalog_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    import sqlite3

    with Hub(tmp_path):
        pass
    Hub(tmp_path).list_adapters()
    db = sqlite3.connect(tmp_path / "catalog.db")
    db.execute("UPDATE alembic_version SET version_num = '9999'")
    db.commit()
    db.close()
    with pytest.raises(CatalogVersionError, match="newer adapterhub"):
        Hub(tmp_path).list_adapters()


def test_db_url_points_the_catalog_elsewhere(tmp_path: Path, made: dict[str, Path]) -> None:
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    with Hub(tmp_path / "home", db=url) as hub:
        hub.add_adapter(made["sql-r8"])
    assert (tmp_path / "elsewhere.db").exists()
    assert not (tmp_path / "home" / "catalog.db").exists()
    os.environ["ADAPTERHUB_DB"] = url
    try:
        with Hub(tmp_path / "home") as hub:
            assert [a.name for a in hub.list_adapters()] == ["sql-r8"]
    finally:
        del os.environ["ADAPTERHUB_DB"]


def test_load_adapter_gives_tensors(hub: Hub, made: dict[str, Path]) -> None:
    from adapterhub.formats import read_adapter

    hub.add_adapter(made["chat-r4"])
    loaded = hub.load_adapter("chat-r4")
    orig = read_adapter(made["chat-r4"], load=True)
    for key in orig:
        assert (loaded[key].delta() - orig[key].delta()).abs().max() == 0


def _approx_equal(a: object, b: object) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return (
            isinstance(a, (int, float))
            and isinstance(b, (int, float))
            and abs(a - b) <= 1e-12 * max(1.0, abs(b))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_approx_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_approx_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_json_records_written_by_sqlite_equal_to_dict(hub: Hub, made: dict[str, Path]) -> None:
    """`adapter_records_json` (SQLite writes the JSON) must give exactly the records of `to_dict`."""
    hub.add_adapter(made["sql-r8"], tags=["sql", "b-tag"], description='quotes " and \\ and ünïcode')
    hub.add_adapter(made["chat-r4"])
    hub.add_adapter(made["math-r16"], tags=["math"])
    hub.add_adapter(made["kohya"], tags=["art"])
    hub.combine([("sql-r8", 0.7), ("chat-r4", -0.3)], name="mix", tags=["mix"])
    for filters in ({}, {"tag": "mix"}, {"target": "q_proj"}, {"min_rank": 8}, {"query": "sql"}):
        query = filters.pop("query", None)
        fast = [json.loads(r) for r in hub.adapter_records_json(query, **filters)]
        found = hub.search_adapters(query, **filters) if query else hub.list_adapters(**filters)
        slow = [a.to_dict() for a in found]
        assert fast and _approx_equal(fast, slow), (filters, fast, slow)
