"""The frozen dataclasses the API returns (never ORM rows or loose dicts)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, TypedDict


def finite(doc: Any) -> Any:
    """``doc`` with every non-finite float as None: JSON output is always standard JSON."""
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: finite(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [finite(v) for v in doc]
    return doc


def human_size(n: int | None) -> str:
    """Bytes for people, in powers of 1000 (``""`` for None): what the CLI and the pages show."""
    if n is None:
        return ""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


@dataclass(frozen=True)
class ModuleInfo:
    module: str
    short_name: str
    kind: str
    rank: int
    alpha: float
    scale: float
    in_features: int
    out_features: int
    dora: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "short_name": self.short_name,
            "kind": self.kind,
            "rank": self.rank,
            "alpha": self.alpha,
            "scale": self.scale,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "dora": self.dora,
        }


@dataclass(frozen=True)
class ParentInfo:
    name: str
    weight: float | None
    method: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weight": self.weight, "method": self.method, "params": self.params}


@dataclass(frozen=True)
class FileInfo:
    filename: str
    role: str
    sha256: str
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "filename": self.filename,
            "role": self.role,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
        }


@dataclass(frozen=True)
class MergeRecord:
    """One merge of a cataloged adapter into a base checkpoint."""

    base: str
    out: str
    unmerge: bool
    weight: float
    at: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "out": self.out,
            "unmerge": self.unmerge,
            "weight": self.weight,
            "at": self.at,
        }


@dataclass(frozen=True)
class PushRecord:
    """Where and at which commit a cataloged adapter was pushed."""

    name: str
    endpoint: str
    repo_id: str
    revision: str
    commit: str
    commit_url: str | None
    pushed_at: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "endpoint": self.endpoint,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "commit_url": self.commit_url,
            "pushed_at": self.pushed_at,
        }


class FilterKeywords(TypedDict, total=False):
    """The filter keywords of `Hub.list_adapters` / `search_adapters` (the fields of `AdapterFilter`)."""

    base: str | None
    rank: int | None
    min_rank: int | None
    max_rank: int | None
    target: str | None
    tag: str | None
    format: str | None


@dataclass(frozen=True)
class AdapterFilter:
    """What `list_adapters` / `search_adapters` keep: every field that is set must hold."""

    base: str | None = None
    rank: int | None = None
    min_rank: int | None = None
    max_rank: int | None = None
    target: str | None = None
    tag: str | None = None
    format: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "rank": self.rank,
            "min_rank": self.min_rank,
            "max_rank": self.max_rank,
            "target": self.target,
            "tag": self.tag,
            "format": self.format,
        }


@dataclass(frozen=True)
class AdapterInfo:
    """A cataloged adapter. `to_dict` gives the record of ``schemas/adapter.schema.json``."""

    name: str
    sha256: str
    format: str
    base_model: str | None
    rank: int
    alpha: float | None
    use_rslora: bool
    target_modules: tuple[str, ...]
    num_modules: int
    dtype: str | None
    num_params: int
    size_bytes: int
    tags: tuple[str, ...]
    description: str | None
    source: str | None
    created_at: str
    parents: tuple[ParentInfo, ...] = ()
    peft_type: str | None = None
    base_revision: str | None = None
    task_type: str | None = None
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    updated_at: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: filled by `Hub.adapter_info` (show), not by list/search
    files: tuple[FileInfo, ...] | None = None
    modules: tuple[ModuleInfo, ...] | None = None
    merges: tuple[MergeRecord, ...] | None = None  # where it was merged: base, out, weight, at
    children: tuple[str, ...] | None = None  # adapters derived from this one
    pushes: tuple[PushRecord, ...] | None = None  # where it was pushed: endpoint, repo_id, commit, ...

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> AdapterInfo:
        """Build from a dict holding every field, skipping the generated ``__init__``: listing
        10,000 adapters creates 10,000 of these, and the frozen ``__init__`` costs a setattr per field."""
        obj = cls.__new__(cls)
        obj.__dict__.update(fields)
        return obj

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "sha256": self.sha256,
            "format": self.format,
            "peft_type": self.peft_type,
            "base_model": self.base_model,
            "base_revision": self.base_revision,
            "rank": self.rank,
            "alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "rank_pattern": self.rank_pattern,
            "alpha_pattern": self.alpha_pattern,
            "task_type": self.task_type,
            "target_modules": list(self.target_modules),
            "num_modules": self.num_modules,
            "dtype": self.dtype,
            "num_params": self.num_params,
            "size_bytes": self.size_bytes,
            "tags": list(self.tags),
            "description": self.description,
            "source": self.source,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "parents": [p.to_dict() for p in self.parents],
            "metadata": self.metadata,
        }
        if self.files is not None:
            d["files"] = [f.to_dict() for f in self.files]
        if self.modules is not None:
            d["modules"] = [m.to_dict() for m in self.modules]
        if self.merges is not None:
            d["merges"] = [m.to_dict() for m in self.merges]
        if self.children is not None:
            d["children"] = list(self.children)
        if self.pushes is not None:
            d["pushes"] = [{k: v for k, v in p.to_dict().items() if k != "name"} for p in self.pushes]
        return d


@dataclass(frozen=True)
class Problem:
    """One finding of `db check`: ``kind`` is missing, corrupt, orphan, leftover, value or database."""

    kind: str
    subject: str  # an adapter name, or a path for orphans and leftovers
    message: str
    size_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "subject": self.subject,
            "message": self.message,
            "size_bytes": self.size_bytes,
        }


@dataclass(frozen=True)
class CheckReport:
    """What `Hub.check_db` found; ``ok`` when nothing."""

    problems: tuple[Problem, ...]
    files_checked: int
    verified: bool

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def reclaimable_bytes(self) -> int:
        return sum(p.size_bytes for p in self.problems if p.kind in ("orphan", "leftover"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "files_checked": self.files_checked,
            "verified": self.verified,
            "reclaimable_bytes": self.reclaimable_bytes,
            "problems": [p.to_dict() for p in self.problems],
        }


@dataclass(frozen=True)
class GcReport:
    """What `Hub.gc` removed (or, in a dry run, would remove)."""

    items: tuple[Problem, ...]
    dry_run: bool

    @property
    def size_bytes(self) -> int:
        return sum(p.size_bytes for p in self.items)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "size_bytes": self.size_bytes,
            "items": [p.to_dict() for p in self.items],
        }


@dataclass(frozen=True)
class BulkItem:
    """One adapter found by a bulk import: ``status`` is added, skipped or failed (with ``message``)."""

    path: str
    name: str
    status: str
    message: str | None = None
    adapter: AdapterInfo | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "name": self.name, "status": self.status, "message": self.message}


@dataclass(frozen=True)
class BulkAddResult:
    """What `Hub.add_tree` / `Hub.add_hf_cache` did, adapter by adapter."""

    items: tuple[BulkItem, ...]

    def count(self, status: str) -> int:
        return sum(1 for i in self.items if i.status == status)

    def to_dict(self) -> dict[str, Any]:
        return {
            "added": self.count("added"),
            "skipped": self.count("skipped"),
            "failed": self.count("failed"),
            "items": [i.to_dict() for i in self.items],
        }


@dataclass(frozen=True)
class BaseInfo:
    """A registered base checkpoint (layout read from its safetensors headers)."""

    name: str
    path: str | None
    model_type: str | None
    architectures: tuple[str, ...]
    num_params: int
    num_tensors: int
    size_bytes: int
    dtype: str | None
    fingerprint: str
    created_at: str
    num_adapters: int = 0  # cataloged adapters whose declared base is this one
    hub_id: str | None = None  # its real id (a Hub repo id, a GGUF's name): what exports name as the base

    @property
    def public_id(self) -> str:
        """What an adapter's ``base_model_name_or_path`` should say: the real id, else the local name."""
        return self.hub_id or self.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "hub_id": self.hub_id,
            "path": self.path,
            "model_type": self.model_type,
            "architectures": list(self.architectures),
            "num_params": self.num_params,
            "num_tensors": self.num_tensors,
            "size_bytes": self.size_bytes,
            "dtype": self.dtype,
            "fingerprint": self.fingerprint,
            "created_at": self.created_at,
            "num_adapters": self.num_adapters,
        }


@dataclass(frozen=True)
class Generation:
    """One completion: the text, why it stopped, and its token counts."""

    text: str
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


@dataclass(frozen=True)
class EvaluationRecord:
    """One metric of one subject (an adapter, a combination, or the base alone) in one evaluation run."""

    id: int
    run: str
    subject: str  # "base", the adapter's name when it was evaluated, or "a:0.7+b:0.3"
    adapter_sha256: str | None  # None for the base and for combinations
    combination: dict[str, float] | None
    base: str
    base_fingerprint: str | None
    dataset: str
    dataset_sha256: str
    metric: str
    value: float | None
    rows: int
    seed: int | None
    version: str
    source: str  # eval, train, mix, or the repo@commit a pull read it from
    created_at: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "run": self.run,
            "subject": self.subject,
            "adapter_sha256": self.adapter_sha256,
            "combination": self.combination,
            "base": self.base,
            "base_fingerprint": self.base_fingerprint,
            "dataset": self.dataset,
            "dataset_sha256": self.dataset_sha256,
            "metric": self.metric,
            "value": self.value,
            "rows": self.rows,
            "seed": self.seed,
            "version": self.version,
            "source": self.source,
            "created_at": self.created_at,
            "params": self.params,
        }
