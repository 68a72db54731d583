"""The blob store in S3-compatible object storage (issue 25), against a real SeaweedFS on 127.0.0.1:
add, export, merge, push/pull through a server whose blobs are in the bucket too, `db check` / `db gc` over
the bucket (orphans, trashed objects, unfinished uploads), two writers of one object, sha256 checked on
the way in and out, wrong credentials in one line, and header reads that read only the header."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.adapters import make_catalog_adapter, tiny_llama
from helpers.s3 import SeaweedServer

from adapterhub import Hub
from adapterhub.errors import StoreError
from adapterhub.store import open_store
from adapterhub.store.s3 import S3Store


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("s3world")
    tiny_llama().save_pretrained(str(root / "base"))
    return {
        "base": root / "base",
        "a": make_catalog_adapter(root / "a", 4, 8, ["q_proj", "v_proj"], seed=1),
        "b": make_catalog_adapter(root / "b", 2, 4, ["q_proj"], seed=2),
    }


def _store(s3: SeaweedServer, env: dict[str, str], root: Path, name: str = "store") -> S3Store:
    store = open_store(root, name=name, url=env["ADAPTERHUB_STORE"])
    assert isinstance(store, S3Store)
    return store


def test_add_export_merge_check_gc_in_the_bucket(
    s3_server: SeaweedServer,
    s3_env: dict[str, str],
    world: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    db_url: str | None,
) -> None:
    """On SQLite and on PostgreSQL (the ``db_url`` fixture)."""
    bucket, prefix = s3_server.bucket, s3_env["ADAPTERHUB_STORE"].split("/")[3]
    with Hub(tmp_path / "home", db=db_url) as hub:
        info = hub.add_adapter(world["a"], name="a")
        keys = s3_server.keys(f"{prefix}/store/objects/")
        assert sorted(k.rsplit("/", 2)[-2] + k.rsplit("/", 1)[-1] for k in keys) == sorted(
            f.sha256 for f in info.files or ()
        )
        assert not (tmp_path / "home" / "store" / "objects").exists()  # nothing stored locally
        out = hub.export_adapter("a", tmp_path / "exported")
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            assert (out / f).read_bytes() == (world["a"] / f).read_bytes()
        hub.add_base(world["base"], name="tiny")
        merged = hub.merge("tiny", ["a"], out=tmp_path / "merged")
        assert hub.check_db().ok
    # the same merge with the blobs in a folder gives the same bytes
    monkeypatch.delenv("ADAPTERHUB_STORE")
    with Hub(tmp_path / "local-home") as local:
        local.add_adapter(world["a"], name="a")
        local.add_base(world["base"], name="tiny")
        local.merge("tiny", ["a"], out=tmp_path / "merged-local")
    for f in sorted(p.name for p in Path(merged.out).glob("*.safetensors")):
        assert (tmp_path / "merged" / f).read_bytes() == (tmp_path / "merged-local" / f).read_bytes()
    monkeypatch.setenv("ADAPTERHUB_STORE", s3_env["ADAPTERHUB_STORE"])

    with Hub(tmp_path / "home", db=db_url) as hub:
        store = hub.store
        assert isinstance(store, S3Store)
        stray = store.put_bytes(b"nobody references this")
        weights = next(f.sha256 for f in info.files or () if f.role == "weights")
        # a removal killed before it committed: the object sits in the trash under a dead pid
        from adapterhub.store.base import host_tag

        trash_key = f"{store.base}trash/{weights}.999999999.{host_tag()}.abc"
        client = s3_server.client()
        client.copy_object(
            Bucket=bucket, Key=trash_key, CopySource={"Bucket": bucket, "Key": store.key(weights)}
        )
        client.delete_object(Bucket=bucket, Key=store.key(weights))
        report = hub.check_db()
        kinds = sorted((p.kind, p.subject.startswith("s3://")) for p in report.problems)
        assert kinds == [("orphan", True), ("trashed", True)], report.problems
        assert hub.gc(dry_run=True).items and store.has(stray.sha256)
        done = hub.gc(dry_run=False)
        assert sorted(p.kind for p in done.items) == ["orphan", "trashed"]
        assert not store.has(stray.sha256) and store.has(weights)
        assert s3_server.keys(f"{store.base}trash/") == []
        assert store.path(weights).read_bytes() == (world["a"] / "adapter_model.safetensors").read_bytes()
        assert hub.check_db().ok  # a cached copy of a referenced object is no problem
        hub.remove_adapter("a")
        assert s3_server.keys(f"{store.base}objects/") == []
        assert hub.check_db().ok
        assert not list(store.cached())  # the removal dropped the cached copy too


def test_unfinished_uploads_are_leftovers(
    s3_server: SeaweedServer, s3_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket, prefix = s3_server.bucket, s3_env["ADAPTERHUB_STORE"].split("/")[3]
    with Hub(tmp_path / "home") as hub:
        store = hub.store
        assert isinstance(store, S3Store)
        s3_server.client().create_multipart_upload(Bucket=bucket, Key=store.key("ab" * 32))
        assert hub.check_db().ok  # a young upload may still be going on
        monkeypatch.setattr("adapterhub.store.s3.STALE_AFTER", -1)
        (found,) = hub.check_db().problems
        assert found.kind == "leftover" and "upload" in found.subject
        hub.gc(dry_run=False)
        assert not s3_server.uploads(prefix)


def test_two_writers_of_one_object_never_clobber(
    s3_server: SeaweedServer, s3_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("adapterhub.store.s3.MULTIPART_AT", 5 * 1024 * 1024)
    monkeypatch.setattr("adapterhub.store.s3.PART", 5 * 1024 * 1024)
    small = os.urandom(1000)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * 1024 * 1024))  # three parts
    for put in (lambda s: s.put_bytes(small), lambda s: s.put_file(big)):
        writers = [_store(s3_server, s3_env, tmp_path / f"w{i}") for i in range(4)]
        for w in writers:
            w._client = None  # a client (and connections) of its own
        results: list[Any] = []
        barrier = threading.Barrier(len(writers))

        def go(w: S3Store, put: Any = put, barrier: Any = barrier, results: Any = results) -> None:
            barrier.wait()
            results.append(put(w))

        threads = [threading.Thread(target=go, args=(w,)) for w in writers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 4 and len({r.sha256 for r in results}) == 1
        assert writers[0].verify(results[0].sha256)  # whoever won, the object is whole and right
        assert not put(writers[1]).created
    # once it is there, a conditional write (a PUT, a multipart completion) is refused with 412 and the
    # writer keeps the stored object
    w = writers[1]
    assert w._put_once(hashlib.sha256(small).hexdigest(), small) is False
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    assert w._upload(big, digest, None).created is False and w.verify(digest)
    assert not s3_server.uploads(s3_env["ADAPTERHUB_STORE"].split("/")[3])


def test_sha256_is_checked_on_the_way_in_and_out(
    s3_server: SeaweedServer, s3_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(s3_server, s3_env, tmp_path / "s")
    store.tmp.mkdir(parents=True)
    for size in (100, 6 * 1024 * 1024):
        monkeypatch.setattr("adapterhub.store.s3.MULTIPART_AT", 5 * 1024 * 1024)
        monkeypatch.setattr("adapterhub.store.s3.PART", 5 * 1024 * 1024)
        tmp = store.tmp / f"in-{size}"
        tmp.write_bytes(os.urandom(size))
        claimed = hashlib.sha256(b"something else").hexdigest()
        with pytest.raises(StoreError, match="does not have sha256"):
            store.commit(str(tmp), claimed, size)
        assert not tmp.exists() and not store.has(claimed)
    assert not s3_server.uploads(s3_env["ADAPTERHUB_STORE"].split("/")[3])
    # an object changed in the bucket by hand is refused on the way out, and never cached
    good = store.put_bytes(b"the real content")
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=store.key(good.sha256), Body=b"tampered")
    with pytest.raises(StoreError, match="does not match its sha256"):
        store.path(good.sha256)
    assert not list(store.cached()) and not store.verify(good.sha256)
    with pytest.raises(StoreError, match="does not match its sha256"):
        store.copy_out(good.sha256, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_header_reads_read_only_the_header(
    s3_server: SeaweedServer, s3_env: dict[str, str], world: dict[str, Path], tmp_path: Path
) -> None:
    from adapterhub.formats.safetensors_header import read_header

    with Hub(tmp_path / "home") as hub:
        info = hub.add_adapter(world["a"], name="a")
    weights = next(f for f in info.files or () if f.role == "weights")
    store = _store(s3_server, s3_env, tmp_path / "fresh")  # no cache
    got: list[int] = []
    store.client.meta.events.register(
        "after-call.s3.GetObject", lambda parsed, **_: got.append(int(parsed["ContentLength"]))
    )
    header = store.safetensors_header(weights.sha256)
    expected = read_header(world["a"] / "adapter_model.safetensors")
    assert header.tensors == expected.tensors
    raw_len = int.from_bytes((world["a"] / "adapter_model.safetensors").read_bytes()[:8], "little")
    assert got == [8, raw_len] and sum(got) < weights.size_bytes
    assert not list(store.cached())


def test_wrong_credentials_are_one_line(
    s3_server: SeaweedServer, s3_env: dict[str, str], world: dict[str, Path], tmp_path: Path
) -> None:
    env = {**os.environ, **s3_env, "AWS_SECRET_ACCESS_KEY": "wrong"}
    res = subprocess.run(
        [sys.executable, "-m", "adapterhub", "--home", str(tmp_path / "home"), "add", str(world["a"])],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "access denied" in lines[0] and "AWS_SECRET_ACCESS_KEY" in lines[0], res.stderr
    assert "Traceback" not in res.stderr


@pytest.fixture
def s3_server_proc(s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from test_server import start_server

    yield from start_server(tmp_path_factory)  # its blobs in the bucket too (ADAPTERHUB_STORE is set)


def test_push_and_pull_through_a_server_on_the_bucket(
    s3_server: SeaweedServer,
    s3_env: dict[str, str],
    s3_server_proc: Any,
    world: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from test_server import online_hf

    from adapterhub.formats.safetensors_header import read_header

    online_hf(monkeypatch)
    bucket, prefix = s3_server.bucket, s3_env["ADAPTERHUB_STORE"].split("/")[3]
    srv = s3_server_proc
    with Hub(tmp_path / "home") as hub:
        hub.add_adapter(world["b"], name="b")
        hub.push_adapter("b", "alice/b-lora", endpoint=srv.url, token=srv.alice)
    assert s3_server.keys(f"{prefix}/server/objects/")  # the server kept the files in the bucket
    # a safetensors header through the server: a range read of the bucket, no local copy made
    hf = online_hf(monkeypatch)
    meta = hf.HfApi(endpoint=srv.url).parse_safetensors_file_metadata(
        "alice/b-lora", "adapter_model.safetensors"
    )
    assert set(meta.tensors) == set(read_header(world["b"] / "adapter_model.safetensors").tensors)
    weights = hashlib.sha256((world["b"] / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert not (srv.home / "server" / "cache" / weights[:2] / weights[2:]).exists()
    # a second home with a prefix of its own (a prefix belongs to one catalog)
    monkeypatch.setenv("ADAPTERHUB_STORE", f"s3://{bucket}/{prefix}-other")
    with Hub(tmp_path / "other") as other:
        pulled = other.pull_adapter("alice/b-lora", endpoint=srv.url)
        out = other.export_adapter(pulled.adapter.name, tmp_path / "b-out")
        assert (out / "adapter_model.safetensors").read_bytes() == (
            world["b"] / "adapter_model.safetensors"
        ).read_bytes()
        assert other.check_db().ok
    assert s3_server.keys(f"{prefix}-other/store/objects/")
