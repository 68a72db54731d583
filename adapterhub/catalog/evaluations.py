"""Catalog reads and writes of evaluation records: one row per subject and metric of a run, only ever
inserted (a rerun adds rows beside the earlier ones), and the adapter rankings ``list --sort`` uses."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, func, insert, select

from ..records import EvaluationRecord
from .queries import _iso, _json, utcnow
from .tables import evaluations

__all__ = ["insert_evaluations", "latest_values", "select_evaluations"]

FIELDS = (
    "run",
    "subject",
    "adapter_sha256",
    "combination",
    "base",
    "base_fingerprint",
    "dataset",
    "dataset_sha256",
    "metric",
    "value",
    "rows",
    "seed",
    "version",
    "source",
    "params",
)


def insert_evaluations(conn: Connection, rows: Iterable[Mapping[str, Any]]) -> list[int]:
    """Insert records (each a mapping of `FIELDS`); returns their ids in order."""
    now = utcnow()
    ids = []
    for row in rows:
        values = {k: row.get(k) for k in FIELDS}
        values["params"] = dict(values["params"] or {})
        ids.append(
            conn.execute(
                insert(evaluations).values(**values, created_at=now).returning(evaluations.c.id)
            ).scalar_one()
        )
    return ids


def _record(r: Any) -> EvaluationRecord:
    combo = _json(r.combination)
    return EvaluationRecord(
        id=r.id,
        run=r.run,
        subject=r.subject,
        adapter_sha256=r.adapter_sha256,
        combination=dict(combo) if combo else None,
        base=r.base,
        base_fingerprint=r.base_fingerprint,
        dataset=r.dataset,
        dataset_sha256=r.dataset_sha256,
        metric=r.metric,
        value=None if r.value is None else float(r.value),
        rows=r.rows,
        seed=r.seed,
        version=r.version,
        source=r.source,
        created_at=_iso(r.created_at) or "",
        params=dict(_json(r.params) or {}),
    )


def select_evaluations(
    conn: Connection,
    *,
    adapter_sha256: Sequence[str] | None = None,
    dataset: str | None = None,
    metric: str | None = None,
    base: str | None = None,
    run: str | None = None,
    limit: int | None = None,
) -> list[EvaluationRecord]:
    """Records matching every given filter, oldest first."""
    stmt = select(evaluations)
    if adapter_sha256 is not None:
        stmt = stmt.where(evaluations.c.adapter_sha256.in_(list(adapter_sha256)))
    for col, value in (("dataset", dataset), ("metric", metric), ("base", base), ("run", run)):
        if value is not None:
            stmt = stmt.where(evaluations.c[col] == value)
    stmt = stmt.order_by(evaluations.c.id)
    if limit is not None:
        stmt = stmt.order_by(None).order_by(evaluations.c.id.desc()).limit(limit)
        return [_record(r) for r in reversed(conn.execute(stmt).all())]
    return [_record(r) for r in conn.execute(stmt)]


def latest_values(conn: Connection, dataset: str, metric: str) -> dict[str, float]:
    """adapter sha256 -> the value of its latest record of ``metric`` on ``dataset``."""
    last = (
        select(func.max(evaluations.c.id))
        .where(
            evaluations.c.dataset == dataset,
            evaluations.c.metric == metric,
            evaluations.c.adapter_sha256.is_not(None),
        )
        .group_by(evaluations.c.adapter_sha256)
    )
    rows = conn.execute(
        select(evaluations.c.adapter_sha256, evaluations.c.value).where(evaluations.c.id.in_(last))
    ).all()
    return {sha: float(v) for sha, v in rows if v is not None}
