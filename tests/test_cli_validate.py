"""`adapterhub base ...`, `validate` and `list --compatible-with` through the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from test_validate import llama, save_adapter

from adapterhub.cli import main


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-validate")
    llama().save_pretrained(str(root / "llama"))
    big = llama()
    big.resize_token_embeddings(65)
    return {
        "llama": root / "llama",
        "good": save_adapter(llama(), root / "good", r=4, target_modules=["q_proj", "v_proj"]),
        "vocab": save_adapter(big, root / "vocab", r=4, target_modules=["embed_tokens"]),
    }


def run(capsys: pytest.CaptureFixture[str], home: Path, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["--home", str(home), *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_base_commands_and_validate(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    rc, out, _ = run(capsys, home, "--json", "base", "add", str(world["llama"]), "--name", "tiny")
    assert rc == 0 and json.loads(out)[0]["model_type"] == "llama"
    rc, out, _ = run(capsys, home, "base", "list")
    assert rc == 0 and "tiny" in out and "llama" in out
    rc, out, _ = run(capsys, home, "base", "show", "tiny", "--json")
    assert json.loads(out)["num_tensors"] == 21
    for n in ("good", "vocab"):
        assert run(capsys, home, "add", str(world[n]), "--base", "tiny")[0] == 0

    rc, out, _ = run(capsys, home, "validate", "good", "--base", "tiny")
    assert rc == 0 and "all 4 targets fit base tiny" in out
    rc, out, _ = run(capsys, home, "validate", "vocab", "--base", "tiny", "--json")
    doc = json.loads(out)
    assert rc == 1 and doc["ok"] is False and doc["errors"] >= 1
    assert {c["check"] for c in doc["checks"] if c["status"] == "error"} == {"base.vocab"}
    rc, out, _ = run(capsys, home, "validate", "--all", "--base", "tiny")
    assert rc == 1 and "1 of 2 adapters fit tiny" in out and "65 vs 64" in out
    rc, out, _ = run(capsys, home, "--json", "list", "--compatible-with", "tiny")
    assert [r["name"] for r in json.loads(out)] == ["good"]
    assert run(capsys, home, "base", "rm", "tiny")[0] == 0
    rc, _, err = run(capsys, home, "base", "show", "tiny")
    assert rc == 1 and err.startswith("error: no base model named 'tiny'")


def test_validate_errors_and_usage(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    rc, _, err = run(capsys, home, "validate")
    assert rc == 2 and "give an adapter name or path" in err
    rc, _, err = run(capsys, home, "validate", "--all")
    assert rc == 2 and "--all needs --base" in err
    rc, _, err = run(capsys, home, "validate", "no-such-adapter")
    assert rc == 1 and err == (
        "error: no adapter named 'no-such-adapter' in the catalog; `adapterhub list` shows what is there\n"
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"r": 4}')
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 7)
    rc, out, err = run(capsys, home, "validate", str(broken))
    assert rc == 1 and "shorter than the 8-byte header length" in out and "Traceback" not in out + err
    assert torch.load is not None  # torch may be imported by validate (NaN scan)
