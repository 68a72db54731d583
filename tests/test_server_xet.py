"""Uploads by a default-installed huggingface_hub (hf_xet importable, HF_HUB_DISABLE_XET unset), which
sends every LFS file through the Xet protocol: upload_file, upload_folder, create_commit, the ``hf`` CLI
and PEFT's push_to_hub against a real ``adapterhub serve``, downloads byte-exact; the write checks and the
no-leak rule hold for Xet uploads too (a shard may use only xorbs its sender may use)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_server import Server, ndjson, start_server

from adapterhub.errors import BadRequestError
from adapterhub.server.tokens import create_token, revoke_token
from adapterhub.server.xetformat import (
    SHARD_TAG,
    bg4_regroup,
    hash_hex,
    lz4_frame_decompress,
    parse_shard,
    parse_xorb,
)

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from start_server(tmp_path_factory)


def upload_records(server: Server, repo_id: str, digest: str) -> tuple[bool, set[str]]:
    """Whether the catalog holds the owner's proof of uploading ``digest`` to ``repo_id``, and the xorbs
    recorded for that repo."""
    from sqlalchemy import select

    from adapterhub import Hub
    from adapterhub.catalog.tables import hub_repo_xorbs, hub_repos, hub_upload_proofs

    ns, name = repo_id.split("/")
    with Hub(server.home) as hub, hub.catalog.read() as conn:
        rid = conn.execute(
            select(hub_repos.c.id).where(hub_repos.c.namespace == ns, hub_repos.c.name == name)
        ).scalar()
        proof = conn.execute(
            select(hub_upload_proofs.c.sha256).where(
                hub_upload_proofs.c.repo_id == rid,
                hub_upload_proofs.c.user == "",
                hub_upload_proofs.c.sha256 == digest,
            )
        ).first()
        xorbs = set(
            conn.execute(select(hub_repo_xorbs.c.xorb).where(hub_repo_xorbs.c.repo_id == rid)).scalars()
        )
    return proof is not None, xorbs


@pytest.fixture
def hf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """huggingface_hub as installed: Xet on. Its Xet cache is the test's own."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import disable_progress_bars
    from huggingface_hub.utils._runtime import is_xet_available

    monkeypatch.delenv("HF_HUB_DISABLE_XET", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    disable_progress_bars()
    __import__("hf_xet")
    assert is_xet_available(), "these tests need the default install: hf_xet importable, Xet on"
    return huggingface_hub


def client_env(server: Server, tmp_path: Path, token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET")}
    env.update(HF_ENDPOINT=server.url, HF_TOKEN=token, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="0")
    return env


def weights(seed: int, size: int = 300_000) -> bytes:
    """Bytes that look like a small safetensors file: a header, random values, then zeros (LoRA B)."""
    rnd = hashlib.sha256(str(seed).encode()).digest() * (size // 64)
    header = json.dumps({"w": {"dtype": "F32", "shape": [len(rnd) // 4], "data_offsets": [0, len(rnd)]}})
    return struct.pack("<Q", len(header)) + header.encode() + rnd + bytes(size // 2)


def download(hf: Any, server: Server, repo: str, path: str, tmp_path: Path, token: str) -> bytes:
    got = hf.hf_hub_download(repo, path, endpoint=server.url, token=token, cache_dir=str(tmp_path / "dl"))
    return Path(got).read_bytes()


def test_default_install_uploads_through_xet_and_downloads_byte_exact(
    server: Server, hf: Any, tmp_path: Path
) -> None:
    api = hf.HfApi(endpoint=server.url, token=server.alice)
    api.create_repo("alice/xet-file")
    data = weights(1)
    info = api.upload_file(
        path_or_fileobj=data, path_in_repo="adapter_model.safetensors", repo_id="alice/xet-file"
    )
    assert "/commit/" in info.commit_url
    (tmp_path / "big.bin").write_bytes(weights(2, 2_000_000))
    api.upload_file(
        path_or_fileobj=str(tmp_path / "big.bin"), path_in_repo="big.bin", repo_id="alice/xet-file"
    )
    assert download(hf, server, "alice/xet-file", "adapter_model.safetensors", tmp_path, server.alice) == data
    assert download(hf, server, "alice/xet-file", "big.bin", tmp_path, server.alice) == weights(2, 2_000_000)
    files = {s.rfilename: s for s in api.model_info("alice/xet-file", files_metadata=True).siblings or []}
    assert files["adapter_model.safetensors"].lfs.sha256 == hashlib.sha256(data).hexdigest()
    # downloads stay plain HTTP: resolve names no Xet hash
    status, headers, _ = server.request("HEAD", "/alice/xet-file/resolve/main/big.bin")
    assert status == 200 and "X-Xet-Hash" not in headers


def test_upload_folder_and_create_commit_with_weight_files(server: Server, hf: Any, tmp_path: Path) -> None:
    api = hf.HfApi(endpoint=server.url, token=server.alice)
    api.create_repo("alice/xet-folder")
    folder = tmp_path / "adapter"
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 4}')
    (folder / "adapter_model.safetensors").write_bytes(weights(3))
    (folder / "sub" / "optimizer.pt").write_bytes(weights(4, 500_000))
    (folder / "sub" / "copy.safetensors").write_bytes(weights(3))  # the same content twice
    api.upload_folder(folder_path=str(folder), repo_id="alice/xet-folder")
    ops = [
        hf.CommitOperationAdd("more/a.safetensors", weights(5)),
        hf.CommitOperationAdd("more/b.bin", weights(6, 100_000)),
        hf.CommitOperationDelete("sub/optimizer.pt"),
    ]
    api.create_commit("alice/xet-folder", ops, commit_message="weights")
    snap = Path(
        hf.snapshot_download(
            "alice/xet-folder", endpoint=server.url, token=server.alice, cache_dir=str(tmp_path / "snap")
        )
    )
    got = {p.relative_to(snap).as_posix(): p.read_bytes() for p in snap.rglob("*") if p.is_file()}
    assert got == {
        ".gitattributes": got[".gitattributes"],
        "adapter_config.json": b'{"r": 4}',
        "adapter_model.safetensors": weights(3),
        "sub/copy.safetensors": weights(3),
        "more/a.safetensors": weights(5),
        "more/b.bin": weights(6, 100_000),
    }


def test_the_same_content_again_after_its_first_repo_is_gone(server: Server, hf: Any, tmp_path: Path) -> None:
    """The client's shard cache makes it refer to the xorbs of its earlier upload instead of sending them
    again: that still works from a new repo, once the first one is deleted."""
    api = hf.HfApi(endpoint=server.url, token=server.alice)
    data = weights(9, 400_000)
    api.create_repo("alice/xet-first")
    api.upload_file(path_or_fileobj=data, path_in_repo="w.safetensors", repo_id="alice/xet-first")
    api.delete_repo("alice/xet-first")
    api.create_repo("alice/xet-again", private=True)
    api.upload_file(path_or_fileobj=data, path_in_repo="w.safetensors", repo_id="alice/xet-again")
    digest = hashlib.sha256(data).hexdigest()
    proof, xorbs = upload_records(server, "alice/xet-again", digest)
    assert proof and not xorbs, "the client sent the xorbs again (no deduplication to test)"
    assert download(hf, server, "alice/xet-again", "w.safetensors", tmp_path, server.alice) == data


def test_hf_upload_cli(server: Server, tmp_path: Path) -> None:
    folder = tmp_path / "cli"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(weights(7))
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n# cli\n")
    env = client_env(server, tmp_path, server.alice)
    res = subprocess.run(
        [str(VENV_BIN / "hf"), "upload", "alice/xet-cli", str(folder), "."],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "xet-write-token" not in res.stderr
    status, _, body = server.request("GET", "/alice/xet-cli/resolve/main/adapter_model.safetensors")
    assert status == 200 and body == weights(7)


def test_peft_push_to_hub(server: Server, tmp_path: Path) -> None:
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from helpers.adapters import tiny_llama\n"
        "from huggingface_hub.utils._runtime import is_xet_available\n"
        "from peft import LoraConfig, get_peft_model\n"
        "assert is_xet_available()\n"
        "torch.manual_seed(0)\n"
        "model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=['q_proj', 'v_proj']))\n"
        "for n, p in model.named_parameters():\n"
        "    if 'lora_B' in n: torch.nn.init.normal_(p)\n"
        "model.push_to_hub('alice/xet-peft')\n"
        "model.save_pretrained(sys.argv[2])\n"
        "print('ok')\n"
    )
    env = client_env(server, tmp_path, server.alice)
    res = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(tmp_path / "local")],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
    from safetensors.torch import load, load_file

    status, _, body = server.request("GET", "/alice/xet-peft/resolve/main/adapter_model.safetensors")
    assert status == 200
    want = load_file(tmp_path / "local" / "adapter_model.safetensors")
    got = load(body)
    assert set(got) == set(want) and all(bool((got[k] == want[k]).all()) for k in want)


def test_uploads_are_refused_for_the_wrong_user(server: Server, hf: Any, tmp_path: Path) -> None:
    api = hf.HfApi(endpoint=server.url, token=server.alice)
    api.create_repo("alice/xet-guarded")
    status, headers, body = server.json(
        "GET", "/api/models/alice/xet-guarded/xet-write-token/main", token=server.bob
    )
    assert status == 403 and "alice" in body["error"]
    status, _, _ = server.json(
        "GET", "/api/models/alice/xet-guarded/xet-write-token/main", token=server.alice_read
    )
    assert status == 403
    status, _, _ = server.json("GET", "/api/models/alice/xet-guarded/xet-write-token/main")
    assert status == 401
    bob = hf.HfApi(endpoint=server.url, token=server.bob)
    with pytest.raises(hf.errors.HfHubHTTPError) as err:
        bob.upload_file(path_or_fileobj=weights(8), path_in_repo="w.safetensors", repo_id="alice/xet-guarded")
    assert err.value.response.status_code == 403
    # a forged or foreign access token reaches no CAS endpoint
    real = xet_token(server, server.bob, "bob/elsewhere")
    forged = real[:-1] + ("1" if real.endswith("0") else "0")  # (a token ending in "0" stayed valid: flaky)
    for token in ("nope", "e30.0000", forged):
        status, _, _ = server.request("POST", "/xet-cas/v1/shards", body=b"x", token=token)
        assert status == 401


def xet_token(server: Server, token: str, repo: str) -> str:
    status, headers, body = server.json("GET", f"/api/models/{repo}/xet-write-token/main", token=token)
    if status == 404:
        server.json("POST", "/api/repos/create", {"name": repo}, token=token)
        status, headers, body = server.json("GET", f"/api/models/{repo}/xet-write-token/main", token=token)
    assert status == 200, body
    assert body["casUrl"] == server.url + "/xet-cas" and headers["X-Xet-Access-Token"] == body["accessToken"]
    return str(body["accessToken"])


def raw_hash(hex64: str) -> bytes:
    return b"".join(int(hex64[i : i + 16], 16).to_bytes(8, "little") for i in range(0, 64, 16))


def xorb_of(content: bytes) -> bytes:
    """A xorb of one uncompressed chunk, as the client sends it (no footer)."""
    n = len(content)
    return bytes([0]) + n.to_bytes(3, "little") + bytes([0]) + n.to_bytes(3, "little") + content


def shard_of(xorb: str, size: int, sha256: str | None) -> bytes:
    """A shard naming one file: chunk 0 of ``xorb``, with its sha256 when given."""
    flags = (1 << 30) if sha256 else 0
    out = SHARD_TAG + struct.pack("<QQ", 2, 200)
    out += raw_hash("ab" * 32) + struct.pack("<IIQ", flags, 1, 0)
    out += raw_hash(xorb) + struct.pack("<IIII", 0, size, 0, 1)
    if sha256:
        out += raw_hash(sha256) + bytes(16)
    out += b"\xff" * 32 + bytes(16)
    return out + b"\xff" * 32 + bytes(16)  # the (empty) xorb section


def test_a_xet_upload_cannot_reach_another_users_private_content(
    server: Server, hf: Any, tmp_path: Path
) -> None:
    secret = b"alice's private weights " * 1000
    api = hf.HfApi(endpoint=server.url, token=server.alice)
    api.create_repo("alice/xet-private", private=True)
    api.upload_file(path_or_fileobj=secret, path_in_repo="secret.bin", repo_id="alice/xet-private")
    digest = hashlib.sha256(secret).hexdigest()
    proof, xorbs = upload_records(server, "alice/xet-private", digest)
    assert proof and xorbs, "the upload went through Xet"
    bob = xet_token(server, server.bob, "bob/xet-thief")
    for xorb in xorbs:  # bob knows the xorb hash (and the sha256), not the bytes
        status, _, body = server.request(
            "POST", "/xet-cas/v1/shards", body=shard_of(xorb, len(secret), digest), token=bob
        )
        assert status == 400 and b"was not uploaded by bob" in body
    status, _, _ = server.request(
        "POST",
        "/api/models/bob/xet-thief/commit/main",
        token=server.bob,
        body=ndjson(
            {"key": "header", "value": {"summary": "steal"}},
            {
                "key": "lfsFile",
                "value": {"path": "stolen.bin", "algo": "sha256", "oid": digest, "size": len(secret)},
            },
        ),
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert status == 400
    status, _, _ = server.request("GET", "/bob/xet-thief/resolve/main/stolen.bin")
    assert status == 404
    # the same bytes, sent by bob himself (from a Xet cache of his own), are his to commit
    (tmp_path / "mine.bin").write_bytes(secret)
    res = subprocess.run(
        [str(VENV_BIN / "hf"), "upload", "bob/xet-thief", str(tmp_path / "mine.bin"), "mine.bin"],
        capture_output=True,
        text=True,
        env=client_env(server, tmp_path / "bob", server.bob),
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert download(hf, server, "bob/xet-thief", "mine.bin", tmp_path, server.bob) == secret
    # and alice may use her own xorbs in another of her repos
    alice = xet_token(server, server.alice, "alice/xet-second")
    for xorb in xorbs:
        status, _, body = server.request(
            "POST", "/xet-cas/v1/shards", body=shard_of(xorb, len(secret), digest), token=alice
        )
        assert status == 200, body


def test_the_server_checks_what_it_rebuilds(server: Server) -> None:
    token = xet_token(server, server.alice, "alice/xet-checked")
    content = b"some chunk content"
    xorb = "12" * 32
    status, _, body = server.request(
        "POST", f"/xet-cas/v1/xorbs/default/{xorb}", body=xorb_of(content), token=token
    )
    assert status == 200 and json.loads(body) == {"was_inserted": True}
    wrong = hashlib.sha256(b"other").hexdigest()
    status, _, body = server.request(
        "POST", "/xet-cas/v1/shards", body=shard_of(xorb, len(content), wrong), token=token
    )
    assert status == 400 and b"sha256" in body
    assert not (server.home / "server" / "objects" / wrong[:2] / wrong[2:]).exists()
    status, _, body = server.request(
        "POST", "/xet-cas/v1/shards", body=shard_of(xorb, len(content) + 1, None), token=token
    )
    assert status == 400 and b"holds" in body
    status, _, _ = server.request(
        "POST", f"/xet-cas/v1/xorbs/default/{xorb}", body=b"\x07garbage", token=token
    )
    assert status == 400
    status, _, _ = server.request("POST", "/xet-cas/v1/shards", body=b"not a shard", token=token)
    assert status == 400
    good = hashlib.sha256(content).hexdigest()
    status, _, body = server.request(
        "POST", "/xet-cas/v1/shards", body=shard_of(xorb, len(content), good), token=token
    )
    assert status == 200 and json.loads(body) == {"result": 1}
    # no global deduplication: whether anyone holds a chunk is not answered
    status, _, _ = server.request("GET", f"/xet-cas/v1/chunks/default-merkledb/{xorb}", token=token)
    assert status == 404


def test_formats() -> None:
    assert hash_hex(raw_hash("0123456789abcdef" * 4)) == "0123456789abcdef" * 4
    data = bytes(range(256)) * 3 + b"xyz"
    grouped = b"".join(data[k::4] for k in range(4))
    assert bg4_regroup(grouped) == data
    # an LZ4 frame: one block of 3 literals "abc", then a match of 9 at offset 3 (overlapping), then "!"
    block = bytes([0x35]) + b"abc" + (3).to_bytes(2, "little") + bytes([0x10]) + b"!"
    frame = struct.pack("<I", 0x184D2204) + bytes([0x60, 0x40, 0x82]) + struct.pack("<I", len(block)) + block
    frame += struct.pack("<I", 0)
    assert lz4_frame_decompress(frame, 1000) == b"abc" * 4 + b"!"
    with pytest.raises(BadRequestError):
        lz4_frame_decompress(frame, 5)
    with pytest.raises(BadRequestError):
        lz4_frame_decompress(frame[:-6], 1000)
    chunks = parse_xorb(xorb_of(b"hello") + xorb_of(b"world!"))
    assert [(c.size, c.scheme) for c in chunks] == [(5, 0), (6, 0)]
    (f,) = parse_shard(shard_of("34" * 32, 11, "56" * 32))
    assert f.sha256 == "56" * 32 and f.size == 11 and f.segments[0].xorb == "34" * 32


def test_a_xet_token_dies_with_the_token_it_was_made_from(server: Server) -> None:
    from adapterhub import Hub

    with Hub(server.home) as hub:
        made = create_token(hub, "alice", write=True)
    xet = xet_token(server, made.token, "alice/xet-revoked")
    status, _, _ = server.request("GET", f"/xet-cas/v1/chunks/default-merkledb/{'0' * 64}", token=xet)
    assert status == 404  # accepted (and no global dedup)
    with Hub(server.home) as hub:
        revoke_token(hub, made.token)
    status, _, body = server.request("GET", f"/xet-cas/v1/chunks/default-merkledb/{'0' * 64}", token=xet)
    assert status == 401 and b"xet-write-token" in body
