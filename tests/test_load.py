"""A bounded load test of `adapterhub serve` (bench/server_load.py for a few seconds): concurrent
commits, downloads and listings by several users through the real client; no errors, nothing lost."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_concurrent_clients_lose_nothing(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import server_load
    finally:
        sys.path.pop(0)
    out = server_load.run(4.0, 6, tmp_path)
    assert out["errors"] == 0, out["error_samples"]
    assert out["lost"] == []
    assert out["commit"]["n"] >= 6 and out["files_committed"] >= 12
