"""Evaluation over a Library: `evaluate` (``adapterhub eval``), the records it keeps, and the rankings.

``evaluate(lib, ["sql", "chat"], base="smollm2", data="qa.jsonl", metrics=["loss", "exact"])`` reads and
checks the data before the model loads, loads the base once, makes every adapter resident, and scores the
base alone, each adapter and each requested combination (``combinations=["sql:0.7+chat:0.3"]``) in one
pass of mixed batches (`adapterhub.services.scoring`). Every (subject, metric) becomes one evaluation
record in the catalog, all in one transaction: the adapter by content (sha256), the base by its
fingerprint, the data by name and sha256, the seed and adapterhub's version. Records are never replaced:
a rerun adds rows beside the earlier ones, so runs that disagree stay visible.

`record_evaluation` writes records for results computed elsewhere (``train --eval-data``, ``mix``, a
model card read by ``pull``).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import BaseModelError, InvalidOptionError
from .bases import base_dir, base_layout
from .scoring import (
    BATCH_TOKENS,
    lower_is_better,
    parse_combination,
    parse_metric,
    read_eval_data,
    subject_label,
)

if TYPE_CHECKING:
    from ..catalog.library import Library
    from ..records import AdapterInfo, EvaluationRecord

__all__ = [
    "EvaluationResult",
    "RankedAdapter",
    "SubjectScores",
    "evaluate",
    "evaluations",
    "parse_sort",
    "rank_adapters",
    "ranking",
    "record_evaluation",
]


@dataclass(frozen=True)
class SubjectScores:
    """What one subject (the base, an adapter, a combination) scored on every metric."""

    subject: str
    adapter_sha256: str | None
    combination: dict[str, float] | None
    values: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "adapter_sha256": self.adapter_sha256,
            "combination": self.combination,
            "values": dict(self.values),
        }


@dataclass(frozen=True)
class EvaluationResult:
    """One evaluation run: the base row first, then each adapter and combination in the order given."""

    run: str
    base: str
    base_fingerprint: str | None
    dataset: str
    dataset_sha256: str
    rows: int
    metrics: tuple[str, ...]
    scores: tuple[SubjectScores, ...]
    seconds: float
    records: tuple[EvaluationRecord, ...] = ()
    generations: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def value(self, subject: str, metric: str) -> float:
        return next(s.values[metric] for s in self.scores if s.subject == subject)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "base": self.base,
            "base_fingerprint": self.base_fingerprint,
            "dataset": self.dataset,
            "dataset_sha256": self.dataset_sha256,
            "rows": self.rows,
            "metrics": list(self.metrics),
            "seconds": self.seconds,
            "scores": [s.to_dict() for s in self.scores],
            "records": [r.id for r in self.records],
        }


def _version() -> str:
    from .. import __version__

    return __version__


def evaluate(
    lib: Library,
    adapters: Sequence[str],
    *,
    base: str | os.PathLike[str],
    data: str | os.PathLike[str],
    metrics: Sequence[str] = ("loss",),
    combinations: Sequence[str | Mapping[str, float]] = (),
    max_tokens: int = 64,
    max_length: int = 2048,
    limit: int | None = None,
    dataset: str | None = None,
    seed: int = 0,
    device: str | None = None,
    batch_tokens: int = BATCH_TOKENS,
    record: bool = True,
    source: str = "eval",
) -> EvaluationResult:
    """Score the base, each cataloged adapter in ``adapters`` and each combination on ``data``, in one
    pass, and (with ``record``) keep every (subject, metric) as an evaluation record."""
    import torch

    from .running import attach, is_causal_lm, load_base, pick_device

    metrics = list(dict.fromkeys(parse_metric(m) for m in (metrics or ("loss",))))
    if len(set(adapters)) != len(adapters):
        raise InvalidOptionError("an adapter is given twice")
    infos = {n: lib.info(n) for n in adapters}
    combos = [
        parse_combination(c) if isinstance(c, str) else {str(k): float(v) for k, v in c.items()}
        for c in combinations
    ]
    for c in combos:
        for n in c:
            if n not in infos:
                infos[n] = lib.info(n)
    ev = read_eval_data(data, limit=limit, name=dataset)
    if max_tokens < 1 or max_length < 1:
        raise InvalidOptionError("max tokens and max length must be at least 1")
    folder = base_dir(lib, base)
    if not is_causal_lm(folder):
        raise BaseModelError(f"{base} is not a causal LM; adapterhub eval scores causal LMs")
    layout = base_layout(lib, base)
    from transformers import AutoTokenizer

    from .scoring import score

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise BaseModelError(
            f"transformers cannot load the tokenizer of {folder}: {str(exc).splitlines()[0]}"
        ) from None
    dev = pick_device(device)
    model, _ = load_base(lib, base, device=dev, dtype="auto" if dev.startswith("cuda") else "float32")
    rt = attach(lib, model, dtype=None if dev.startswith("cuda") else torch.float32)
    torch.manual_seed(seed)
    start = time.perf_counter()
    try:
        for n in infos:
            rt.load(n)
        subjects: list[Any] = [None, *adapters, *combos]
        values, details = score(
            model,
            tokenizer,
            rt,
            subjects,
            ev,
            metrics,
            max_tokens=max_tokens,
            max_length=max_length,
            batch_tokens=batch_tokens,
        )
    finally:
        rt.detach()
    seconds = time.perf_counter() - start
    scores = tuple(
        SubjectScores(
            subject=subject_label(s),
            adapter_sha256=infos[s].sha256 if isinstance(s, str) else None,
            combination=dict(s) if isinstance(s, dict) else None,
            values=v,
        )
        for s, v in zip(subjects, values, strict=True)
    )
    run = uuid.uuid4().hex
    name = layout.name or str(base)
    result = EvaluationResult(
        run=run,
        base=name,
        base_fingerprint=layout.fingerprint,
        dataset=ev.name,
        dataset_sha256=ev.sha256,
        rows=len(ev),
        metrics=tuple(metrics),
        scores=scores,
        seconds=seconds,
        generations={
            subject_label(s): g for s, g in zip(subjects, details.get("generations", []), strict=False)
        },
    )
    if not record:
        return result
    params = {
        "max_tokens": max_tokens,
        "device": dev,
        "dtype": str(next(model.parameters()).dtype),
        "seconds": round(seconds, 3),
    }
    rows = [
        {
            "run": run,
            "subject": s.subject,
            "adapter_sha256": s.adapter_sha256,
            "combination": s.combination,
            "base": name,
            "base_fingerprint": layout.fingerprint,
            "dataset": ev.name,
            "dataset_sha256": ev.sha256,
            "metric": m,
            "value": v,
            "rows": len(ev),
            "seed": seed,
            "version": _version(),
            "source": source,
            "params": params,
        }
        for s in scores
        for m, v in s.values.items()
    ]
    from dataclasses import replace

    return replace(result, records=tuple(_insert(lib, rows)))


def _insert(lib: Library, rows: Sequence[Mapping[str, Any]]) -> list[EvaluationRecord]:
    from ..catalog.evaluations import insert_evaluations, select_evaluations

    with lib.catalog.write() as conn:
        ids = set(insert_evaluations(conn, rows))
        runs = {r["run"] for r in rows}
        return [r for run in sorted(runs) for r in select_evaluations(conn, run=run) if r.id in ids]


def record_evaluation(
    lib: Library,
    adapter: str | None,
    *,
    base: str,
    dataset: str,
    dataset_sha256: str,
    values: Mapping[str, float],
    rows: int,
    seed: int | None = None,
    source: str = "train",
    base_fingerprint: str | None = None,
    params: Mapping[str, Any] | None = None,
    combination: Mapping[str, float] | None = None,
) -> list[EvaluationRecord]:
    """Keep results computed elsewhere as evaluation records of one run, one per metric in ``values``:
    ``record_evaluation(lib, "sql", base="smollm2", dataset="qa", dataset_sha256=..., values={"loss":
    1.23}, rows=64, source="train")``. ``adapter`` is a cataloged name (recorded by its sha256), or None
    for the base alone (or for a ``combination``)."""
    for m in values:
        parse_metric(m)
    sha = lib.info(adapter).sha256 if adapter is not None else None
    if base_fingerprint is None:
        try:
            base_fingerprint = base_layout(lib, base).fingerprint
        except BaseModelError:
            base_fingerprint = None
    subject = adapter or (subject_label(dict(combination)) if combination else "base")
    run = uuid.uuid4().hex
    return _insert(
        lib,
        [
            {
                "run": run,
                "subject": subject,
                "adapter_sha256": sha,
                "combination": dict(combination) if combination else None,
                "base": base,
                "base_fingerprint": base_fingerprint,
                "dataset": dataset,
                "dataset_sha256": dataset_sha256,
                "metric": m,
                "value": float(v),
                "rows": rows,
                "seed": seed,
                "version": _version(),
                "source": source,
                "params": dict(params or {}),
            }
            for m, v in values.items()
        ],
    )


def evaluations(
    lib: Library,
    adapter: str | None = None,
    *,
    dataset: str | None = None,
    metric: str | None = None,
    base: str | None = None,
    run: str | None = None,
) -> list[EvaluationRecord]:
    """Evaluation records, oldest first: of one cataloged adapter (by its content), and/or filtered."""
    from ..catalog.evaluations import select_evaluations

    shas = [lib.info(adapter).sha256] if adapter is not None else None
    with lib.catalog.read() as conn:
        return select_evaluations(
            conn, adapter_sha256=shas, dataset=dataset, metric=metric, base=base, run=run
        )


def parse_sort(spec: str) -> tuple[str, str]:
    """``DATASET:METRIC`` -> (dataset, metric)."""
    dataset, sep, metric = spec.partition(":")
    if not sep or not dataset or not metric:
        raise InvalidOptionError(f"--sort {spec!r}: write it as DATASET:METRIC, e.g. qa:loss")
    return dataset, parse_metric(metric)


def ranking(lib: Library, dataset: str, metric: str) -> tuple[dict[str, float], bool]:
    """(adapter sha256 -> latest value of ``metric`` on ``dataset``, lower is better)."""
    from ..catalog.evaluations import latest_values

    with lib.catalog.read() as conn:
        return latest_values(conn, dataset, metric), lower_is_better(metric)


@dataclass(frozen=True)
class RankedAdapter:
    """An adapter with its latest value of one metric on one dataset (None: never evaluated on it)."""

    adapter: AdapterInfo
    dataset: str
    metric: str
    value: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.adapter.to_dict(),
            "evaluation": {"dataset": self.dataset, "metric": self.metric, "value": self.value},
        }


def rank_adapters(lib: Library, adapters: Sequence[AdapterInfo], sort: str) -> list[RankedAdapter]:
    """``adapters`` ordered best first by their latest ``DATASET:METRIC`` record (lower first for loss
    and perplexity, higher first otherwise); those without one last, by name."""
    dataset, metric = parse_sort(sort)
    values, ascending = ranking(lib, dataset, metric)
    scored = [RankedAdapter(a, dataset, metric, values.get(a.sha256)) for a in adapters]

    def key(r: RankedAdapter) -> tuple[int, float, str]:
        if r.value is None:
            return (1, 0.0, r.adapter.name)
        return (0, r.value if ascending else -r.value, r.adapter.name)

    return sorted(scored, key=key)
