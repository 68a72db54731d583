"""The main job: examples/quickstart.py runs end to end on a fresh temporary home."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_runs_end_to_end(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("ADAPTERHUB_HOME", None)
    env.pop("ADAPTERHUB_DB", None)
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "quickstart finished" in out
    assert "exported PEFT weights identical to the original: True" in out
    assert "error: " in out and "(exit code 1)" in out  # the refused broken adapter
    assert "Traceback" not in out + res.stderr
    assert "max |merged - (base + adapter)|" in out and "all 12 targets fit base" in out
    assert "(exit code 1: the adapter was trained on a 512-wide BERT)" in out
    assert "(unchanged, no new commit)" in out and "pulled team/minilm-sql@" in out
    assert (
        "uploaded with huggingface_hub's defaults (Xet on)" in out
        and "downloaded back identical: True" in out
    )
    assert not list(tmp_path.glob("adapterhub-quickstart-*"))  # cleaned up
