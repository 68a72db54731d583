"""`Hub.evaluate` / `adapterhub eval`, the evaluation records (SQLite and PostgreSQL), `show`,
`list --sort`, `record_evaluation` and `mix` on a tiny random Llama with a character-level tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers.cli import home_args
from helpers.evalkit import CHOICE_ROWS, PROMPT_ROWS, adapters_for, tiny_checkpoint, write_jsonl

from adapterhub import AdapterExistsError, Hub, InvalidOptionError
from adapterhub.cli import main
from adapterhub.services.evaluation import record_evaluation


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("evalhub")
    base = tiny_checkpoint(root / "base")
    ads = adapters_for(base, root, 3, target_modules=["q_proj", "v_proj"])
    return {
        "base": base,
        "adapters": ads,
        "qa": write_jsonl(root / "qa.jsonl", PROMPT_ROWS),
        "mc": write_jsonl(root / "mc.jsonl", CHOICE_ROWS),
    }


def _setup(hub: Hub, files: dict[str, Any]) -> None:
    hub.add_base(files["base"], name="tiny")
    for i, p in enumerate(files["adapters"]):
        hub.add_adapter(p, name=f"a{i}", base="tiny")


def test_evaluate_records_and_ranking(hub: Hub, files: dict[str, Any]) -> None:
    _setup(hub, files)
    r = hub.evaluate(
        ["a0", "a1"],
        base="tiny",
        data=files["qa"],
        metrics=["loss", "perplexity", "exact"],
        combinations=["a0:0.5+a1:0.5"],
        max_tokens=4,
    )
    assert [s.subject for s in r.scores] == ["base", "a0", "a1", "a0:0.5+a1:0.5"]
    assert r.scores[0].adapter_sha256 is None and r.scores[1].adapter_sha256 == hub.adapter_info("a0").sha256
    assert len(r.records) == 4 * 3 and {x.run for x in r.records} == {r.run}
    rec = hub.evaluations("a0")
    assert {x.metric for x in rec} == {"loss", "perplexity", "exact"}
    first = next(x for x in rec if x.metric == "loss")
    assert (
        first.dataset == "qa" and first.dataset_sha256 == r.dataset_sha256 and first.rows == len(PROMPT_ROWS)
    )
    assert first.base == "tiny" and first.base_fingerprint and first.version and first.source == "eval"
    assert first.value == pytest.approx(r.value("a0", "loss"))
    # a rerun adds records, never replaces
    r2 = hub.evaluate(["a0"], base="tiny", data=files["qa"], metrics=["loss"], seed=3)
    losses = [x for x in hub.evaluations("a0", metric="loss")]
    assert len(losses) == 2 and losses[1].run == r2.run and losses[1].seed == 3
    assert losses[0].value == pytest.approx(losses[1].value, abs=1e-6)
    combo = [x for x in hub.evaluations(dataset="qa") if x.combination]
    assert combo and combo[0].combination == {"a0": 0.5, "a1": 0.5}
    ranked = hub.rank_adapters("qa:loss")
    vals = {x.adapter.name: x.value for x in ranked}
    assert vals["a2"] is None and [x.adapter.name for x in ranked][-1] == "a2"
    expect = sorted(["a0", "a1"], key=lambda n: vals[n])  # latest a0 record is r2's
    assert [x.adapter.name for x in ranked][:2] == expect
    with pytest.raises(InvalidOptionError, match="DATASET:METRIC"):
        hub.rank_adapters("qa")


def test_eval_refuses_bad_input_and_writes_nothing(hub: Hub, files: dict[str, Any], tmp_path: Path) -> None:
    _setup(hub, files)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "completion": "y"}\nnot json\n')
    with pytest.raises(InvalidOptionError, match="line 2: not valid JSON"):
        hub.evaluate(["a0"], base="tiny", data=bad)
    with pytest.raises(InvalidOptionError, match="unknown metric"):
        hub.evaluate(["a0"], base="tiny", data=files["qa"], metrics=["bleu"])
    with pytest.raises(LookupError):
        hub.evaluate(["nope"], base="tiny", data=files["qa"])
    with pytest.raises(InvalidOptionError, match="multiple-choice"):
        hub.evaluate(["a0"], base="tiny", data=files["qa"], metrics=["choice"])
    assert hub.evaluations() == []


def test_record_evaluation_for_training(hub: Hub, files: dict[str, Any]) -> None:
    _setup(hub, files)
    recs = record_evaluation(
        hub.library,
        "a1",
        base="tiny",
        dataset="held-out",
        dataset_sha256="0" * 64,
        values={"loss": 1.5, "perplexity": 4.48},
        rows=7,
        seed=0,
        source="train",
    )
    assert [(r.metric, r.value, r.source) for r in recs] == [
        ("loss", 1.5, "train"),
        ("perplexity", 4.48, "train"),
    ]
    assert recs[0].adapter_sha256 == hub.adapter_info("a1").sha256 and recs[0].base_fingerprint
    assert hub.rank_adapters("held-out:loss")[0].adapter.name == "a1"


def test_cli_eval_show_list(hub: Hub, files: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    _setup(hub, files)
    args = home_args(hub)

    def run(*a: str, code: int = 0) -> str:
        capsys.readouterr()
        rc = main([*args, *a])
        out, err = capsys.readouterr()
        assert rc == code, err
        return out if code == 0 else err

    doc = json.loads(
        run(
            "eval",
            "a0",
            "a1",
            "--base",
            "tiny",
            "--data",
            str(files["mc"]),
            "--metric",
            "choice",
            "--metric",
            "loss",
            "--json",
        )
    )
    assert [s["subject"] for s in doc["scores"]] == ["base", "a0", "a1"] and doc["dataset"] == "mc"
    table = run("eval", "a2", "--base", "tiny", "--data", str(files["mc"]), "--metric", "choice")
    assert "a2" in table and "base" in table
    shown = json.loads(run("show", "a0", "--json"))
    assert {e["metric"] for e in shown["evaluations"]} == {"choice", "loss"}
    assert "evaluation" in run("show", "a0")
    listed = json.loads(run("list", "--sort", "mc:loss", "--json"))
    assert [x["evaluation"]["metric"] for x in listed] == ["loss"] * 3
    assert listed[-1]["name"] == "a2" and listed[-1]["evaluation"]["value"] is None
    assert run("list", "--sort", "mc:choice", "--csv").startswith("name,score,")
    assert "unknown metric" in run(
        "eval", "a0", "--base", "tiny", "--data", str(files["mc"]), "--metric", "x", code=1
    )
    assert "DATASET:METRIC" in run("list", "--sort", "mc", code=1)
    mixed = json.loads(
        run(
            "mix",
            "a0",
            "a1",
            "--base",
            "tiny",
            "--data",
            str(files["mc"]),
            "--name",
            "m",
            "--steps",
            "2",
            "--search",
            "none",
            "--json",
        )
    )
    assert mixed["adapter"]["name"] == "m" and len(mixed["weights"]) == 2 and mixed["search_loss"] is None
    assert "mixed m" in run(
        "mix", "a0", "a2", "--base", "tiny", "--data", str(files["mc"]), "--name", "m2", "--steps", "1"
    )
    assert "already cataloged" in run(
        "mix", "a0", "--base", "tiny", "--data", str(files["mc"]), "--name", "m", code=1
    )


def test_mix_learns_weights_and_catalogs(hub: Hub, files: dict[str, Any], tmp_path: Path) -> None:
    _setup(hub, files)
    # rows the a1 adapter itself "answers": its greedy continuations; the mix must lean on a1
    r = hub.mix(["a0", "a1"], base="tiny", data=files["qa"], name="mixed", steps=15, lr=0.1, limit=5)
    assert r.loss < r.loss_start and r.search_loss is not None and r.search_evaluations > 0
    info = hub.adapter_info("mixed")
    assert [(p.name, p.weight) for p in info.parents] == [
        ("a0", pytest.approx(r.weights[0])),
        ("a1", pytest.approx(r.weights[1])),
    ]
    assert {p.method for p in info.parents} == {"mix"}
    params = info.parents[0].params
    assert params["data_sha256"] == r.data_sha256 and params["steps"] == 15
    assert r.evaluation is not None and r.evaluation.value("mixed", "loss") == pytest.approx(r.loss, abs=1e-4)
    rec = hub.evaluations("mixed")
    assert rec and rec[0].source == "mix"
    # the cataloged exact combination scores what the learned weights scored
    again = hub.evaluate(
        [],
        base="tiny",
        data=files["qa"],
        combinations=[{"a0": r.weights[0], "a1": r.weights[1]}],
        record=False,
    )
    assert again.scores[1].values["loss"] == pytest.approx(r.loss, abs=1e-4)
    low = hub.mix(
        ["a0", "a1"], base="tiny", data=files["qa"], name="mixed-r2", steps=2, rank=2, search="none"
    )
    assert hub.adapter_info("mixed-r2").rank == 2 and low.search_loss is None
    with pytest.raises(AdapterExistsError, match="already cataloged"):
        hub.mix(["a0", "a1"], base="tiny", data=files["qa"], name="mixed", steps=1)
