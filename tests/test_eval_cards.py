"""Evaluation records through push and pull: the model card carries them in the Hub's ``model-index``
format (checked with huggingface_hub's `ModelCard` / `EvalResult` parser), and pull reads them back into
the catalog, against a real `adapterhub serve` subprocess."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.adapters import make_catalog_adapter
from test_server import Server, online_hf, start_server

from adapterhub import Hub
from adapterhub.services.evaluation import record_evaluation


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from start_server(tmp_path_factory)


def test_results_round_trip_through_push_and_pull(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hf: Any = online_hf(monkeypatch)
    home, other = Hub(tmp_path / "home"), Hub(tmp_path / "other")
    home.add_adapter(make_catalog_adapter(tmp_path / "sql", 4, 8, ["q_proj", "v_proj"], seed=1), name="sql")
    common: dict[str, Any] = {
        "base": "tiny-llama",
        "dataset_sha256": "cd" * 32,
        "rows": 64,
        "seed": 0,
        "source": "eval",
    }
    record_evaluation(home.library, "sql", dataset="qa", values={"loss": 2.0, "exact": 0.25}, **common)
    record_evaluation(
        home.library, "sql", dataset="qa", values={"loss": 1.75}, **common
    )  # a rerun: the card has the latest
    record_evaluation(home.library, "sql", dataset="mc", values={"choice": 0.5}, **{**common, "rows": 10})
    res = home.push_adapter("sql", "alice/sql-eval", endpoint=server.url, token=server.alice)
    readme = hf.hf_hub_download(
        "alice/sql-eval", "README.md", revision=res.commit, endpoint=server.url, cache_dir=tmp_path / "cache"
    )
    card = hf.ModelCard.load(readme)
    got = sorted(
        (e.dataset_name, e.metric_type, e.metric_value, e.dataset_revision, e.task_type)
        for e in card.data.eval_results
    )
    assert got == [
        ("mc", "choice", 0.5, "cd" * 32, "text-generation"),
        ("qa", "exact", 0.25, "cd" * 32, "text-generation"),
        ("qa", "loss", 1.75, "cd" * 32, "text-generation"),
    ]
    assert card.data.model_name == "sql" and all(isinstance(e, hf.EvalResult) for e in card.data.eval_results)
    assert "## Results" in card.text
    pulled = other.pull_adapter("alice/sql-eval", endpoint=server.url)
    back = other.evaluations(pulled.adapter.name)
    assert sorted((r.dataset, r.metric, r.value, r.rows, r.base, r.dataset_sha256) for r in back) == [
        ("mc", "choice", 0.5, 10, "tiny-llama", "cd" * 32),
        ("qa", "exact", 0.25, 64, "tiny-llama", "cd" * 32),
        ("qa", "loss", 1.75, 64, "tiny-llama", "cd" * 32),
    ]
    assert {r.source for r in back} == {pulled.source} and back[0].adapter_sha256 == home.adapter_info(
        "sql"
    ).sha256
    assert other.rank_adapters("qa:loss")[0].value == 1.75
    home.close()
    other.close()
