"""`eval` and `mix` end to end on the real SmolLM2 (imported once per run) with two adapters trained in
the test (a few steps each): the API, the CLI, the records, and a learned mix that beats its start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.cli import home_args
from helpers.evalkit import write_jsonl

from adapterhub import Hub
from adapterhub.cli import main

pytestmark = pytest.mark.xdist_group("smollm2")

ROWS_A = [{"prompt": f"Q: colour of item {i}? A:", "completion": " blue"} for i in range(6)]
ROWS_B = [{"prompt": f"Q: animal number {i}? A:", "completion": " cat"} for i in range(6)]


def test_eval_and_mix_on_smollm2(
    smollm2_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = write_jsonl(tmp_path / "a.jsonl", ROWS_A), write_jsonl(tmp_path / "b.jsonl", ROWS_B)
    both = write_jsonl(tmp_path / "both.jsonl", ROWS_A[:3] + ROWS_B[:3])
    with Hub(tmp_path / "home") as hub:
        hub.add_base(smollm2_checkpoint, name="smollm2")
        for name, data in (("blue", a), ("cat", b)):
            hub.train("smollm2", data, name=name, rank=4, steps=4, lr=3e-3, batch_size=3, device="cpu")
        r = hub.evaluate(
            ["blue", "cat"],
            base="smollm2",
            data=a,
            metrics=["loss", "contains"],
            max_tokens=3,
            combinations=["blue:0.5+cat:0.5"],
            device="cpu",
        )
        assert [s.subject for s in r.scores] == ["base", "blue", "cat", "blue:0.5+cat:0.5"]
        assert r.value("blue", "loss") < r.value("base", "loss") and r.value("blue", "loss") < r.value(
            "cat", "loss"
        )
        assert hub.rank_adapters("a:loss")[0].adapter.name == "blue"
        m = hub.mix(
            ["blue", "cat"], base="smollm2", data=both, name="blue-cat", steps=4, lr=0.2, device="cpu"
        )
        assert m.loss < m.loss_start and m.search_loss is not None
        assert hub.evaluations("blue-cat")[0].source == "mix"
        capsys.readouterr()
        rc = main(
            [
                *home_args(hub),
                "eval",
                "blue-cat",
                "--base",
                "smollm2",
                "--data",
                str(b),
                "--json",
                "--device",
                "cpu",
            ]
        )
        out = json.loads(capsys.readouterr().out)
        assert rc == 0 and [s["subject"] for s in out["scores"]] == ["base", "blue-cat"]
