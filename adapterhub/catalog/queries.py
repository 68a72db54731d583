"""Catalog reads and writes on a SQLAlchemy connection. Returns records, never rows."""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import (
    Connection,
    Text,
    and_,
    delete,
    exists,
    func,
    insert,
    literal_column,
    or_,
    select,
    type_coerce,
    update,
)

from ..records import AdapterInfo, FileInfo, ModuleInfo, ParentInfo
from .tables import adapter_files, adapter_modules, adapters, lineage, tags

_LIST_FIELDS = (
    "id",
    "name",
    "sha256",
    "format",
    "peft_type",
    "base_model",
    "base_revision",
    "rank",
    "alpha",
    "use_rslora",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
    "task_type",
    "dtype",
    "num_params",
    "size_bytes",
    "num_modules",
    "target_modules",
    "description",
    "source",
    "extra",
    "created_at",
    "updated_at",
)
#: JSON and time columns come back as the stored text and are decoded by `_info` (a fast path that
#: matters when listing 10,000 adapters); drivers that decode them themselves are handled too
_RAW = {"rank_pattern", "alpha_pattern", "target_modules", "extra", "created_at", "updated_at"}
_LIST_COLUMNS = [
    type_coerce(adapters.c[f], Text).label(f) if f in _RAW else adapters.c[f] for f in _LIST_FIELDS
]
_EMPTY_JSON: dict[str, Any] = {"{}": {}, "[]": [], "null": None}
_NO_JSON = frozenset({None, "{}", "null"})  # stored values of an empty mapping column


def _json(value: Any) -> Any:
    if isinstance(value, str):
        return _EMPTY_JSON[value] if value in _EMPTY_JSON else json.loads(value)
    return value


def _mapping(value: Any) -> dict[str, Any]:
    """A JSON mapping column: stored text (SQLite), or already decoded by the driver (PostgreSQL)."""
    if value is None or (isinstance(value, str) and value in _NO_JSON):
        return {}
    return dict(_json(value) or {})


def fetch_all(conn: Connection, stmt: Any) -> list[Any]:
    """All rows of a SELECT as plain tuples. On SQLite the compiled SQL goes straight to the driver's
    cursor: listing 10,000 adapters then skips SQLAlchemy's per-row result processing, which these
    queries do not need (their JSON and time columns are selected as raw text and decoded here)."""
    if conn.dialect.name != "sqlite":
        return [tuple(r) for r in conn.execute(stmt)]
    compiled = stmt.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    params = tuple(compiled.params[k] for k in compiled.positiontup or ())
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        return cursor.execute(str(compiled), params).fetchall()
    finally:
        cursor.close()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, microsecond=0)


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):  # "2026-11-28 21:38:12[.000000]" as SQLite stores it
        return value[:19].replace(" ", "T") + "Z"
    return str(value.replace(microsecond=0).isoformat()) + "Z"


def find_id(conn: Connection, name: str) -> int | None:
    return conn.execute(select(adapters.c.id).where(adapters.c.name == name)).scalar()


def insert_adapter(
    conn: Connection,
    *,
    row: dict[str, Any],
    modules: Sequence[dict[str, Any]],
    files: Sequence[dict[str, Any]],
    tag_names: Iterable[str] = (),
    parents: Sequence[dict[str, Any]] = (),
) -> int:
    now = utcnow()
    adapter_id = conn.execute(
        insert(adapters).values(**row, created_at=now, updated_at=now).returning(adapters.c.id)
    ).scalar_one()
    if modules:
        conn.execute(insert(adapter_modules), [dict(m, adapter_id=adapter_id) for m in modules])
    if files:
        conn.execute(insert(adapter_files), [dict(f, adapter_id=adapter_id) for f in files])
    tag_rows = [{"adapter_id": adapter_id, "tag": t} for t in sorted(set(tag_names))]
    if tag_rows:
        conn.execute(insert(tags), tag_rows)
    for p in parents:
        parent_id = find_id(conn, p["parent_name"])
        conn.execute(insert(lineage).values(child_id=adapter_id, parent_id=parent_id, **p))
    return adapter_id


def _filters(
    *,
    query: str | None,
    base: str | None,
    rank: int | None,
    min_rank: int | None,
    max_rank: int | None,
    target: str | None,
    tag: str | None,
    format: str | None,
) -> list[Any]:
    conds: list[Any] = []
    if base is not None:
        conds.append(func.lower(adapters.c.base_model) == base.lower())
    if rank is not None:
        conds.append(adapters.c.rank == rank)
    if min_rank is not None:
        conds.append(adapters.c.rank >= min_rank)
    if max_rank is not None:
        conds.append(adapters.c.rank <= max_rank)
    if format is not None:
        conds.append(adapters.c.format == format)
    if target is not None:
        conds.append(
            exists().where(
                and_(
                    adapter_modules.c.adapter_id == adapters.c.id,
                    or_(
                        adapter_modules.c.short_name == target,
                        adapter_modules.c.module == target,
                        adapter_modules.c.module.like("%." + target),
                    ),
                )
            )
        )
    if tag is not None:
        conds.append(exists().where(and_(tags.c.adapter_id == adapters.c.id, tags.c.tag == tag)))
    for term in (query or "").split():
        like = f"%{term.lower()}%"
        conds.append(
            or_(
                func.lower(adapters.c.name).like(like),
                func.lower(func.coalesce(adapters.c.description, "")).like(like),
                func.lower(func.coalesce(adapters.c.base_model, "")).like(like),
                exists().where(and_(tags.c.adapter_id == adapters.c.id, func.lower(tags.c.tag).like(like))),
            )
        )
    return conds


def _conditions(
    *,
    query: str | None = None,
    base: str | None = None,
    rank: int | None = None,
    min_rank: int | None = None,
    max_rank: int | None = None,
    target: str | None = None,
    tag: str | None = None,
    format: str | None = None,
    names: Sequence[str] | None = None,
) -> list[Any]:
    """The WHERE clauses of a listing: `_filters`, plus a list of names."""
    conds = _filters(
        query=query,
        base=base,
        rank=rank,
        min_rank=min_rank,
        max_rank=max_rank,
        target=target,
        tag=tag,
        format=format,
    )
    if names is not None:
        conds.append(adapters.c.name.in_(list(names)))
    return conds


def select_adapters(conn: Connection, **filters: Any) -> list[AdapterInfo]:
    """Adapters by name; ``filters`` are those of `_conditions` (query, base, rank, ..., names)."""
    conds = _conditions(**filters)
    stmt = select(*_LIST_COLUMNS).where(*conds).order_by(adapters.c.name)
    rows = fetch_all(conn, stmt)
    if not rows:
        return []
    ids = [r[0] for r in rows]
    filtered = bool(conds)
    tag_map: dict[int, list[str]] = defaultdict(list)
    tag_stmt = select(tags.c.adapter_id, tags.c.tag).order_by(tags.c.tag)
    if filtered and len(ids) < 500:
        tag_stmt = tag_stmt.where(tags.c.adapter_id.in_(ids))
    for aid, t in fetch_all(conn, tag_stmt):
        tag_map[aid].append(t)
    parent_map: dict[int, list[ParentInfo]] = defaultdict(list)
    lin_stmt = select(
        lineage.c.child_id, lineage.c.parent_name, lineage.c.weight, lineage.c.method, lineage.c.params
    )
    if filtered and len(ids) < 500:
        lin_stmt = lin_stmt.where(lineage.c.child_id.in_(ids))
    for cid, pname, weight, method, params in fetch_all(conn, lin_stmt.order_by(lineage.c.id)):
        parent_map[cid].append(ParentInfo(pname, weight, method, _json(params) or {}))
    targets = _targets_of(rows)
    return [
        _info(r, tag_map.get(r[0], []), parent_map.get(r[0], []), targets=t)
        for r, t in zip(rows, targets, strict=True)
    ]


_TARGETS_AT = _LIST_FIELDS.index("target_modules")


def _targets_of(rows: Sequence[Any]) -> list[tuple[str, ...]]:
    """Every row's target_modules, decoded in one `json.loads` call when they are stored as text."""
    raw = [r[_TARGETS_AT] for r in rows]
    if all(isinstance(t, str) for t in raw):
        return [tuple(t) for t in json.loads("[" + ",".join(raw) + "]")]
    return [tuple(_json(t) or ()) for t in raw]


def _json_or_empty(col: str) -> str:
    return f"json(CASE WHEN {col} IS NULL OR {col} = 'null' THEN '{{}}' ELSE {col} END)"


def _finite(col: str) -> str:
    """A REAL column as JSON: SQLite would write ``Inf`` for an infinite value (not JSON); NaN is NULL."""
    return f"(CASE WHEN abs({col}) <= 1.7976931348623157e308 THEN {col} END)"


def _bool(col: str) -> str:
    return f"json(CASE WHEN {col} THEN 'true' ELSE 'false' END)"


#: `AdapterInfo.to_dict()` of a listed adapter, written by SQLite's JSON functions (a test keeps the two
#: equal): listing 10,000 adapters as JSON then builds no Python object per row
_SQLITE_RECORD = f"""json_object(
 'name', adapters.name, 'sha256', adapters.sha256, 'format', adapters.format,
 'peft_type', adapters.peft_type, 'base_model', adapters.base_model, 'base_revision', adapters.base_revision,
 'rank', adapters.rank, 'alpha', {_finite("adapters.alpha")},
 'use_rslora', {_bool("adapters.use_rslora")}, 'use_dora', {_bool("adapters.use_dora")},
 'rank_pattern', {_json_or_empty("adapters.rank_pattern")}, 'alpha_pattern', {_json_or_empty("adapters.alpha_pattern")},
 'task_type', adapters.task_type, 'target_modules', json(adapters.target_modules),
 'num_modules', adapters.num_modules, 'dtype', adapters.dtype, 'num_params', adapters.num_params,
 'size_bytes', adapters.size_bytes,
 'tags', (SELECT json_group_array(t.tag) FROM (SELECT tag FROM tags WHERE tags.adapter_id = adapters.id
          ORDER BY tag) AS t),
 'description', adapters.description, 'source', adapters.source,
 'created_at', strftime('%Y-%m-%dT%H:%M:%SZ', adapters.created_at),
 'updated_at', strftime('%Y-%m-%dT%H:%M:%SZ', adapters.updated_at),
 'parents', (SELECT json_group_array(json_object('name', l.parent_name, 'weight', {_finite("l.weight")}, 'method', l.method,
             'params', {_json_or_empty("l.params")}))
             FROM (SELECT * FROM lineage WHERE lineage.child_id = adapters.id ORDER BY lineage.id) AS l),
 'metadata', {_json_or_empty("adapters.extra")})"""


def select_adapter_json(conn: Connection, **filters: Any) -> list[str] | None:
    """The records `select_adapters(conn, **filters)` would give, as JSON text, on SQLite; None elsewhere."""
    if conn.dialect.name != "sqlite":
        return None
    conds = _conditions(**filters)
    stmt: Any = (
        select(literal_column(_SQLITE_RECORD)).select_from(adapters).where(*conds).order_by(adapters.c.name)
    )
    return [r[0] for r in fetch_all(conn, stmt)]


def _info(
    r: Any,
    tag_list: list[str],
    parents: list[ParentInfo],
    targets: tuple[str, ...] | None = None,
    **more: Any,
) -> AdapterInfo:
    (
        _id,
        name,
        sha256,
        fmt,
        peft_type,
        base_model,
        base_revision,
        rank,
        alpha,
        use_rslora,
        use_dora,
        rank_pattern,
        alpha_pattern,
        task_type,
        dtype,
        num_params,
        size_bytes,
        num_modules,
        target_modules,
        description,
        source,
        extra,
        created_at,
        updated_at,
    ) = r
    fields = {
        "name": name,
        "sha256": sha256,
        "format": fmt,
        "peft_type": peft_type,
        "base_model": base_model,
        "base_revision": base_revision,
        "rank": rank,
        "alpha": alpha,
        "use_rslora": bool(use_rslora),
        "use_dora": bool(use_dora),
        "rank_pattern": _mapping(rank_pattern),
        "alpha_pattern": _mapping(alpha_pattern),
        "task_type": task_type,
        "target_modules": targets if targets is not None else tuple(_json(target_modules) or ()),
        "num_modules": num_modules,
        "dtype": dtype,
        "num_params": num_params,
        "size_bytes": size_bytes,
        "tags": tuple(tag_list),
        "description": description,
        "source": source,
        "created_at": _iso(created_at) or "",
        "updated_at": _iso(updated_at),
        "parents": tuple(parents),
        "metadata": _mapping(extra),
        "files": None,
        "modules": None,
        "merges": None,
        "children": None,
        "pushes": None,
    }
    fields.update(more)
    return AdapterInfo.from_fields(fields)


def adapter_detail(conn: Connection, name: str) -> AdapterInfo | None:
    r = conn.execute(select(*_LIST_COLUMNS).where(adapters.c.name == name)).first()
    if r is None:
        return None
    tag_list = list(
        conn.execute(select(tags.c.tag).where(tags.c.adapter_id == r[0]).order_by(tags.c.tag)).scalars()
    )
    parents = [
        ParentInfo(p.parent_name, p.weight, p.method, p.params or {})
        for p in conn.execute(select(lineage).where(lineage.c.child_id == r[0]).order_by(lineage.c.id))
    ]
    files = tuple(
        FileInfo(f.filename, f.role, f.sha256, f.size_bytes)
        for f in conn.execute(
            select(adapter_files).where(adapter_files.c.adapter_id == r[0]).order_by(adapter_files.c.filename)
        )
    )
    modules = tuple(
        ModuleInfo(
            m.module,
            m.short_name,
            m.kind,
            m.rank,
            m.alpha,
            m.scale,
            m.in_features,
            m.out_features,
            bool(m.dora),
        )
        for m in conn.execute(
            select(adapter_modules)
            .where(adapter_modules.c.adapter_id == r[0])
            .order_by(adapter_modules.c.module)
        )
    )
    return _info(r, tag_list, parents, files=files, modules=modules)


def children_of(conn: Connection, name: str) -> list[str]:
    parent_id = find_id(conn, name)
    if parent_id is None:
        return []
    stmt = (
        select(adapters.c.name)
        .join(lineage, lineage.c.child_id == adapters.c.id)
        .where(lineage.c.parent_id == parent_id)
        .order_by(adapters.c.name)
    )
    return list(conn.execute(stmt).scalars())


def file_digests(conn: Connection, adapter_id: int) -> list[str]:
    return list(
        conn.execute(select(adapter_files.c.sha256).where(adapter_files.c.adapter_id == adapter_id)).scalars()
    )


def delete_adapter(conn: Connection, adapter_id: int) -> None:
    # explicit deletes, so a backend without ON DELETE CASCADE leaves nothing behind either
    conn.execute(update(lineage).where(lineage.c.parent_id == adapter_id).values(parent_id=None))
    for table, col in (
        (adapter_modules, adapter_modules.c.adapter_id),
        (adapter_files, adapter_files.c.adapter_id),
        (tags, tags.c.adapter_id),
        (lineage, lineage.c.child_id),
    ):
        conn.execute(delete(table).where(col == adapter_id))
    conn.execute(delete(adapters).where(adapters.c.id == adapter_id))


def rename_adapter(conn: Connection, adapter_id: int, name: str) -> None:
    conn.execute(update(adapters).where(adapters.c.id == adapter_id).values(name=name))


def referenced_digests(conn: Connection, digests: Iterable[str]) -> set[str]:
    ds = list(set(digests))
    if not ds:
        return set()
    return set(conn.execute(select(adapter_files.c.sha256).where(adapter_files.c.sha256.in_(ds))).scalars())


def change_tags(
    conn: Connection, adapter_id: int, *, add: Iterable[str] = (), remove: Iterable[str] = ()
) -> None:
    have = set(conn.execute(select(tags.c.tag).where(tags.c.adapter_id == adapter_id)).scalars())
    new = sorted(set(add) - have)
    if new:
        conn.execute(insert(tags), [{"adapter_id": adapter_id, "tag": t} for t in new])
    gone = sorted(set(remove) & have)
    if gone:
        conn.execute(delete(tags).where(tags.c.adapter_id == adapter_id, tags.c.tag.in_(gone)))
    conn.execute(update(adapters).where(adapters.c.id == adapter_id).values(updated_at=utcnow()))
