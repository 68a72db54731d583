"""Catalog queries for registered base models, merge records, and the per-module facts validation
reads instead of opening adapter files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import groupby
from typing import Any

from sqlalchemy import Connection, Text, delete, func, insert, select, type_coerce

from ..records import BaseInfo, MergeRecord
from .queries import _iso, _json, utcnow
from .tables import adapter_modules, adapters, base_models, base_tensors, merge_adapters, merges

#: the order of the fields in each tuple of `adapter_facts(...)["modules"]` (what
#: `ops.validate.weights_from_modules` unpacks)
MODULE_FIELDS = (
    "module",
    "kind",
    "rank",
    "alpha",
    "scale",
    "in_features",
    "out_features",
    "kernel_size",
    "dora",
    "dtype",
    "lora_bias",
)


def insert_base(
    conn: Connection, row: dict[str, Any], tensors: Sequence[tuple[str, Sequence[int], str]]
) -> int:
    base_id = conn.execute(
        insert(base_models).values(**row, created_at=utcnow()).returning(base_models.c.id)
    ).scalar_one()
    conn.execute(
        insert(base_tensors),
        [{"base_id": base_id, "name": n, "shape": list(s), "dtype": d} for n, s, d in tensors],
    )
    return base_id


def find_base_id(conn: Connection, name: str) -> int | None:
    return conn.execute(select(base_models.c.id).where(base_models.c.name == name)).scalar()


def _linked_counts(conn: Connection) -> dict[str, int]:
    stmt = select(func.lower(adapters.c.base_model), func.count()).group_by(func.lower(adapters.c.base_model))
    return {k: n for k, n in conn.execute(stmt) if k}


def _base_info(r: Any, counts: dict[str, int]) -> BaseInfo:
    aliases = set(_aliases(r.name, r.config, r.hub_id))
    return BaseInfo(
        name=r.name,
        path=r.path,
        model_type=r.model_type,
        architectures=tuple(_json(r.architectures) or ()),
        num_params=r.num_params,
        num_tensors=r.num_tensors,
        size_bytes=r.size_bytes,
        dtype=r.dtype,
        fingerprint=r.fingerprint,
        created_at=_iso(r.created_at) or "",
        num_adapters=sum(counts.get(a, 0) for a in aliases),
        hub_id=r.hub_id,
    )


def _aliases(name: str, config: Any, hub_id: str | None) -> list[str]:
    """The names an adapter may declare a base by: its registered name, its real id, its config's
    ``_name_or_path`` (lower case)."""
    cfg = _json(config) or {}
    found = [name, hub_id, cfg.get("_name_or_path")]
    return [a.strip().lower().rstrip("/") for a in found if isinstance(a, str) and a.strip()]


_BASE_COLUMNS = [
    *(c for c in base_models.c if c.name not in ("config", "architectures", "created_at")),
    type_coerce(base_models.c.config, Text).label("config"),
    type_coerce(base_models.c.architectures, Text).label("architectures"),
    type_coerce(base_models.c.created_at, Text).label("created_at"),
]


def select_bases(conn: Connection, name: str | None = None) -> list[BaseInfo]:
    stmt = select(*_BASE_COLUMNS).order_by(base_models.c.name)
    if name is not None:
        stmt = stmt.where(base_models.c.name == name)
    rows = conn.execute(stmt).all()
    counts = _linked_counts(conn) if rows else {}
    return [_base_info(r, counts) for r in rows]


def base_layout_rows(
    conn: Connection, name: str
) -> tuple[Any, dict[str, tuple[int, ...]], dict[str, Any]] | None:
    """(the base_models row, tensor name -> shape, its decoded config) of a registered base."""
    r = conn.execute(select(*_BASE_COLUMNS).where(base_models.c.name == name)).first()
    if r is None:
        return None
    shapes = {
        n: tuple(json.loads(s) if isinstance(s, str) else s)
        for n, s in conn.execute(
            select(base_tensors.c.name, type_coerce(base_tensors.c.shape, Text)).where(
                base_tensors.c.base_id == r.id
            )
        )
    }
    return r, shapes, _json(r.config) or {}


def base_for_model_name(conn: Connection, model_name: str | None) -> str | None:
    """The registered base a declared model name links to (by name or the base's ``_name_or_path``)."""
    if not model_name:
        return None
    want = model_name.strip().lower().rstrip("/")
    rows = conn.execute(
        select(base_models.c.name, type_coerce(base_models.c.config, Text), base_models.c.hub_id).order_by(
            base_models.c.name
        )
    ).all()
    for aliases_of in (lambda r: [r[0].lower()], lambda r: _aliases(*r)):  # its own name first
        found = next((r[0] for r in rows if want in aliases_of(r)), None)
        if found is not None:
            return str(found)
    return None


def delete_base(conn: Connection, base_id: int) -> None:
    conn.execute(delete(base_tensors).where(base_tensors.c.base_id == base_id))
    conn.execute(delete(base_models).where(base_models.c.id == base_id))


def adapter_facts(conn: Connection, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """For each adapter: name, format, base_model, config, replacements and its module rows as tuples
    (`MODULE_FIELDS`), in two queries: the catalog alone answers validation against a base."""
    stmt = select(
        adapters.c.id,
        adapters.c.name,
        adapters.c.format,
        adapters.c.base_model,
        type_coerce(adapters.c.config, Text),
        type_coerce(adapters.c.replacements, Text),
    ).order_by(adapters.c.name)
    if names is not None:
        stmt = stmt.where(adapters.c.name.in_(list(names)))
    out: dict[int, dict[str, Any]] = {}
    for aid, name, fmt, base, cfg, repl in conn.execute(stmt):
        out[aid] = {
            "name": name,
            "format": fmt,
            "base_model": base,
            "config": _json(cfg) or {},
            "replacements": _json(repl) or {},
            "modules": (),
        }
    if not out:
        return []
    cols = [
        adapter_modules.c.adapter_id,
        *(
            type_coerce(adapter_modules.c[f], Text) if f == "kernel_size" else adapter_modules.c[f]
            for f in MODULE_FIELDS
        ),
    ]
    mstmt = select(*cols).order_by(adapter_modules.c.adapter_id, adapter_modules.c.module)
    if names is not None:
        mstmt = mstmt.where(adapter_modules.c.adapter_id.in_(list(out)))
    for aid, rows in groupby(conn.execute(mstmt), key=lambda r: r[0]):
        if aid in out:
            out[aid]["modules"] = tuple(tuple(r)[1:] for r in rows)
    return list(out.values())


def record_merge(conn: Connection, row: dict[str, Any], adapters_used: Sequence[tuple[str, float]]) -> int:
    merge_id = conn.execute(
        insert(merges).values(**row, created_at=utcnow()).returning(merges.c.id)
    ).scalar_one()
    if adapters_used:
        conn.execute(
            insert(merge_adapters),
            [{"merge_id": merge_id, "adapter_name": n, "weight": w} for n, w in adapters_used],
        )
    return merge_id


def merges_of(conn: Connection, adapter_name: str) -> list[MergeRecord]:
    stmt = (
        select(
            merges.c.base,
            merges.c.out_path,
            merges.c.unmerge,
            merge_adapters.c.weight,
            type_coerce(merges.c.created_at, Text),
        )
        .join(merge_adapters, merge_adapters.c.merge_id == merges.c.id)
        .where(merge_adapters.c.adapter_name == adapter_name)
        .order_by(merges.c.id)
    )
    return [MergeRecord(b, o, bool(u), w, _iso(t)) for b, o, u, w, t in conn.execute(stmt)]
