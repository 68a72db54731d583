"""Data-parallel training: 2 processes over gloo on this CPU make the adapter a single process makes
with the same global batch (within 1e-4)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.trainkit import jsonl, text_rows, tiny_base

from adapterhub import Hub


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    hub = Hub(tmp_path / "home")
    hub.add_base(tiny_base(tmp_path / "tiny"), name="tiny")
    data = jsonl(tmp_path / "t.jsonl", text_rows(12))
    opts = dict(
        steps=4, batch_size=4, lr=1e-2, seed=1, targets=["q_proj", "v_proj", "down_proj"], eval_fraction=0.25
    )
    one = hub.train("tiny", data, name="one", **opts)
    two = hub.train("tiny", data, name="two", nproc=2, **opts)
    assert two.processes == 2 and two.adapter.name == "two"
    a, b = load_file(str(hub.library.files("one").weights)), load_file(str(hub.library.files("two").weights))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert two.losses == pytest.approx(one.losses, abs=1e-5)
    assert two.eval_losses[-1][1] == pytest.approx(one.eval_losses[-1][1], abs=1e-5)
    assert hub.adapter_info("two").parents[0].params["processes"] == 2
    assert not (hub.home / "training").exists() or not any((hub.home / "training").iterdir())
    hub.close()
