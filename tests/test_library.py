"""The Library's guarantees: removal never takes what an unfinished add needs, and export --overwrite
replaces only an earlier export (regression tests of issue 15's data-loss defects 1 and 2)."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.adapters import make_all

from adapterhub import Hub, OutputExistsError
from adapterhub.store import Store


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_all(tmp_path_factory.mktemp("adapters"))


def _stored_files_intact(hub: Hub, name: str) -> bool:
    info = hub.adapter_info(name)
    return all(hub.store.verify(f.sha256) for f in info.files or ())


# ---------------------------------------------------------------------- rm racing add
def test_rm_between_put_and_commit_of_an_add_of_the_same_content(
    hub: Hub, made: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`add -n x1` finds the objects of x0 already stored; `rm x0` commits before x1's rows do. x1 must
    keep its files: the add re-checks its objects inside its own write transaction."""
    hub.add_adapter(made["sql-r8"], name="x0")
    real_put = Store.put_file
    removed = []

    def put_then_remove(self: Store, src, **kw):  # type: ignore[no-untyped-def]
        stored = real_put(self, src, **kw)
        if not removed and not stored.created and Path(src).name == "adapter_model.safetensors":
            removed.append(hub.remove_adapters(["x0"]))  # the race, made certain
        return stored

    monkeypatch.setattr(Store, "put_file", put_then_remove)
    info = hub.add_adapter(made["sql-r8"], name="x1")
    monkeypatch.undo()
    assert removed == [["x0"]]
    assert [a.name for a in hub.list_adapters()] == ["x1"]
    assert _stored_files_intact(hub, "x1")
    assert hub.load_adapter("x1").rank == info.rank
    assert not list((hub.store.root / "trash").iterdir())


def test_rm_then_failed_add_restores_nothing_it_should_not(hub: Hub, made: dict[str, Path]) -> None:
    hub.add_adapter(made["sql-r8"], name="a")
    hub.add_adapter(made["sql-r8"], name="b")  # same content, shared objects
    hub.remove_adapter("a")
    assert _stored_files_intact(hub, "b")
    hub.remove_adapter("b")
    assert sorted(hub.store) == []


RACER = """
import sys
from adapterhub import Hub
home, src, name, db = sys.argv[1:5]
with Hub(home, db=db or None) as hub:
    hub.add_adapter(src, name=name)
"""


def test_rm_racing_add_in_other_processes(hub: Hub, made: dict[str, Path], tmp_path: Path) -> None:
    """The race of the issue with real processes: add x1 in the background while x0 is removed."""
    big = tmp_path / "big"
    big.mkdir()
    (big / "adapter_config.json").write_bytes((made["math-r16"] / "adapter_config.json").read_bytes())
    (big / "adapter_model.safetensors").write_bytes(
        (made["math-r16"] / "adapter_model.safetensors").read_bytes()
    )
    for i in range(3):
        hub.add_adapter(big, name=f"x{i}-0")
        proc = subprocess.Popen(
            [sys.executable, "-c", RACER, str(hub.home), str(big), f"x{i}-1", hub.db_url or ""]
        )
        hub.remove_adapter(f"x{i}-0")
        assert proc.wait(timeout=120) == 0
        assert [a.name for a in hub.list_adapters()] == [f"x{i}-1"]
        assert _stored_files_intact(hub, f"x{i}-1")
        hub.remove_adapter(f"x{i}-1")


# ---------------------------------------------------------------------- export --overwrite
def test_export_overwrite_refuses_the_current_folder(
    hub: Hub, made: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_adapter(made["sql-r8"], name="a")
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    with pytest.raises(OutputExistsError, match="current folder"):
        hub.export_adapter("a", ".", overwrite=True)
    with pytest.raises(OutputExistsError, match="current folder"):
        hub.export_adapter("a", tmp_path, overwrite=True)  # holds the current folder
    assert (work / "notes.txt").read_text() == "mine"


def test_export_overwrite_refuses_the_home(hub: Hub, made: dict[str, Path]) -> None:
    hub.add_adapter(made["sql-r8"], name="a")
    before = sorted(p.name for p in hub.home.iterdir())
    with pytest.raises(OutputExistsError, match="adapterhub home"):
        hub.export_adapter("a", hub.home, overwrite=True)
    with pytest.raises(OutputExistsError, match="adapterhub home"):
        hub.export_adapter("a", hub.home / "store", overwrite=True)
    assert sorted(p.name for p in hub.home.iterdir()) == before
    assert _stored_files_intact(hub, "a")


def test_export_overwrite_refuses_a_folder_that_is_not_an_export(
    hub: Hub, made: dict[str, Path], tmp_path: Path
) -> None:
    hub.add_adapter(made["sql-r8"], name="a")
    dest = tmp_path / "project"
    dest.mkdir()
    (dest / "adapter_config.json").write_text("{}")
    (dest / "train.py").write_text("print('mine')")
    with pytest.raises(OutputExistsError, match="not an earlier adapter export"):
        hub.export_adapter("a", dest, overwrite=True)
    assert sorted(p.name for p in dest.iterdir()) == ["adapter_config.json", "train.py"]
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    with pytest.raises(OutputExistsError, match="not an earlier adapter export"):
        hub.export_adapter("a", other, overwrite=True, format="kohya")
    assert other.read_text() == "mine"


def test_export_overwrite_replaces_an_earlier_export(hub: Hub, made: dict[str, Path], tmp_path: Path) -> None:
    hub.add_adapter(made["sql-r8"], name="a")
    hub.add_adapter(made["chat-r4"], name="b")
    out = hub.export_adapter("a", tmp_path / "out")
    with pytest.raises(OutputExistsError, match="already exists"):
        hub.export_adapter("b", out)
    hub.export_adapter("b", out, overwrite=True)
    digest = hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert digest == hub.adapter_info("b").sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "out"]  # no temporary or old folder left
    k = hub.export_adapter("a", tmp_path / "a.safetensors", format="kohya")
    hub.export_adapter("b", k, overwrite=True, format="kohya")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "home", "out"]


def test_export_kohya_into_a_new_folder_given_with_a_slash(
    hub: Hub, made: dict[str, Path], tmp_path: Path
) -> None:
    hub.add_adapter(made["sql-r8"], name="a")
    out = hub.export_adapter("a", f"{tmp_path / 'newdir'}/", format="kohya")
    assert out == tmp_path / "newdir" / "a.safetensors" and out.is_file()


def test_export_follows_the_umask(hub: Hub, made: dict[str, Path], tmp_path: Path) -> None:
    hub.add_adapter(made["sql-r8"], name="a")
    old = os.umask(0o022)
    try:
        out = hub.export_adapter("a", tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "adapter_model.safetensors").stat().st_mode) == 0o644


WRITER = """
import sys
from adapterhub import Hub
home, db, proc, *paths = sys.argv[1:]
with Hub(home, db=db or None) as hub:
    for round in range(2):
        for i, p in enumerate(paths):
            hub.add_adapter(p, name=f"p{proc}-{round}-{i}", tags=[f"proc{proc}"])
        if round == 0:
            hub.remove_adapters([f"p{proc}-0-{i}" for i in range(len(paths))])
"""


def test_eight_concurrent_writers_lose_nothing(hub: Hub, made: dict[str, Path]) -> None:
    """8 processes add and remove adapters of the same content at once, on SQLite and PostgreSQL."""
    paths = [str(made[n]) for n in ("sql-r8", "chat-r4", "math-r16")]
    hub.add_adapter(made["sql-r8"], name="keep")  # shares its objects with every writer's first adapter
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(hub.home), hub.db_url or "", str(i), *paths],
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(8)
    ]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, errs
    names = sorted(a.name for a in hub.list_adapters())
    assert names == sorted(["keep", *(f"p{p}-1-{i}" for p in range(8) for i in range(3))])
    assert all(_stored_files_intact(hub, n) for n in names)
    assert len(list(hub.store)) == 6  # 3 adapters x (config + weights), each stored once


def test_migrations_match_the_tables_on_every_backend(hub: Hub) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from adapterhub.catalog.db import HEAD
    from adapterhub.catalog.tables import metadata

    assert hub.db_revision() == HEAD
    with hub.catalog.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    assert diffs == []


def test_json_output_is_standard_even_with_a_non_finite_value_in_an_old_row(
    hub: Hub, made: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Older versions accepted ``lora_alpha: Infinity``; such a row must not make `list --json` invalid."""
    import json

    from helpers.cli import home_args
    from sqlalchemy import update

    from adapterhub.catalog.tables import adapters
    from adapterhub.cli import main

    hub.add_adapter(made["sql-r8"], name="a")
    hub.add_adapter(made["chat-r4"], name="b")
    with hub.catalog.write() as conn:
        conn.execute(update(adapters).where(adapters.c.name == "a").values(alpha=float("inf")))
    for args in (["list", "--json"], ["search", "a", "--json"], ["show", "a", "--json"]):
        capsys.readouterr()
        assert main([*home_args(hub), *args]) == 0
        out = capsys.readouterr().out
        doc = json.loads(out, parse_constant=lambda c, a=args: pytest.fail(f"{a}: non-standard JSON {c}"))
        records = doc if isinstance(doc, list) else [doc]
        assert next(r for r in records if r["name"] == "a")["alpha"] is None


def test_add_tree_catalogs_every_adapter_or_says_why_not(
    hub: Hub, made: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    from helpers.adapters import make_kohya

    root = tmp_path / "runs"
    shutil.copytree(made["sql-r8"], root / "sql" / "final")
    shutil.copytree(made["chat-r4"], root / "chat")
    (root / "images").mkdir(parents=True)
    make_kohya(root / "images" / "anime style.safetensors")
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")
    shutil.copytree(made["sql-r8"], root / ".git" / "hidden")  # never looked into
    (root / "model").mkdir()  # a full checkpoint's weights are not LoRAs
    (root / "model" / "config.json").write_text("{}")
    (root / "model" / "model.safetensors").write_bytes(b"x")
    result = hub.add_tree(root, tags=["bulk"])
    status = {i.name: i.status for i in result.items}
    assert status == {
        "broken": "failed",
        "chat": "added",
        "images/anime-style": "added",
        "sql/final": "added",
    }
    assert "not valid JSON" in next(i.message or "" for i in result.items if i.name == "broken")
    assert sorted(a.name for a in hub.list_adapters(tag="bulk")) == [
        "chat",
        "images/anime-style",
        "sql/final",
    ]
    again = hub.add_tree(root)
    assert again.count("skipped") == 3 and again.count("added") == 0


def test_add_hf_cache_reads_a_real_cache(
    hub: Hub, made: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """A cache laid out by huggingface_hub itself (snapshot_download from a local adapterhub server)."""
    from test_server import Server, online_hf

    hf = online_hf(monkeypatch)
    server = Server(tmp_path / "server-home")
    try:
        api = hf.HfApi(endpoint=server.url, token=server.alice)
        api.create_repo("alice/sql-lora")
        api.upload_folder(repo_id="alice/sql-lora", folder_path=str(made["sql-r8"]))
        cache = tmp_path / "hf-cache"
        snap = hf.snapshot_download(
            "alice/sql-lora", cache_dir=str(cache), endpoint=server.url, token=server.alice
        )
    finally:
        server.stop()
    result = hub.add_hf_cache(cache_dir=cache)
    assert [(i.name, i.status) for i in result.items] == [("alice/sql-lora", "added")]
    info = hub.adapter_info("alice/sql-lora")
    assert info.source == f"alice/sql-lora@{Path(snap).name}"
    assert (
        info.sha256 == hashlib.sha256((made["sql-r8"] / "adapter_model.safetensors").read_bytes()).hexdigest()
    )
    assert hub.add_hf_cache(cache_dir=cache).items[0].status == "skipped"


def test_add_refuses_nan_factors_and_writes_nothing(hub: Hub, made: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from adapterhub import InvalidAdapterError

    bad = tmp_path / "nan"
    shutil.copytree(made["sql-r8"], bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = next(iter(tensors))
    tensors[key][0, 0] = torch.nan
    save_file(tensors, str(bad / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InvalidAdapterError, match="NaN"):
        hub.add_adapter(bad)
    assert hub.list_adapters() == [] and sorted(hub.store) == []
