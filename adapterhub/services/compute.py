"""Operations that compute over a Library: merge, combine, resize, extract.

Each one resolves cataloged names (or paths), checks that the adapters fit before anything is written
(the validation checks of `ops.validate`), runs the pure operation of `adapterhub.ops`, and records the
outcome in the catalog: merges by adapter, derived adapters with their lineage.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from .. import faults
from ..errors import (
    AdapterExistsError,
    BaseModelError,
    IncompatibleAdapterError,
    InvalidOptionError,
)
from ..names import check_name, check_tags
from ..records import AdapterInfo
from ..store import scratch_prefix
from .adapters import unknown_ref
from .bases import base_dir, base_layout

if TYPE_CHECKING:
    import torch

    from ..catalog.library import Library
    from ..lora import LoraWeights
    from ..ops.combine import AdapterExpr, CombineResult
    from ..ops.merge import MergeResult
    from ..ops.validate import BaseLayout, Check, ValidationReport

AdapterRef = str | os.PathLike[str]
Weighted = AdapterRef | tuple[AdapterRef, float]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class CombineSummary:
    """A new cataloged adapter made by combine / resize / extract, and how close it is to the exact result."""

    adapter: AdapterInfo
    method: str
    error: float  # relative Frobenius error against the exact weighted sum (overall)
    module_errors: Mapping[str, float]
    ranks: Mapping[str, int]
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter.to_dict(),
            "method": self.method,
            "error": self.error,
            "params": dict(self.params),
            "modules": [
                {"module": k.removesuffix(".weight"), "rank": self.ranks.get(k), "error": e}
                for k, e in sorted(self.module_errors.items())
            ],
        }


@dataclass
class _Input:
    label: str
    weights: LoraWeights
    declared: str | None
    cataloged: bool
    weight: float = 1.0


# ------------------------------------------------------------------ inputs
def adapter(lib: Library, name: str) -> AdapterExpr[str]:
    """A cataloged adapter as a value for arithmetic: ``0.7 * hub.adapter("sql") + 0.3 * hub.adapter("chat")``."""
    from ..ops.combine import AdapterExpr

    lib.info(name)  # fail early on a wrong name
    return AdapterExpr.of(name)


def _input(lib: Library, ref: AdapterRef, weight: float = 1.0, *, load: bool = True) -> _Input:
    from ..formats import read_adapter

    name = str(ref)
    cataloged = lib.exists(name)
    if cataloged:
        info = lib.info(name)
        files = lib.files(name)
        return _Input(name, read_adapter(files, load=load), info.base_model, True, float(weight))
    if not Path(ref).exists():
        raise unknown_ref(lib, name)
    w = read_adapter(ref, load=load)
    return _Input(name, w, w.base_model, False, float(weight))


def _inputs(
    lib: Library, adapters: Sequence[Weighted] | AdapterExpr[Any], *, load: bool = True
) -> list[_Input]:
    pairs = adapters.pairs() if hasattr(adapters, "pairs") else list(adapters)
    if not pairs:
        raise IncompatibleAdapterError("give at least one adapter")
    out = []
    for p in pairs:
        ref, w = p if isinstance(p, tuple) else (p, 1.0)
        out.append(_input(lib, ref, w, load=load))
    labels = [i.label for i in out]
    dup = next((x for x in labels if labels.count(x) > 1), None)
    if dup is not None:
        raise IncompatibleAdapterError(f"{dup} is given twice; give it once with the summed weight")
    return out


def _preflight(
    lib: Library, inputs: Sequence[_Input], layout: BaseLayout | None, subject: str
) -> ValidationReport:
    """Every adapter against the base, and every pair against each other; raise on any error."""
    from ..ops.validate import ValidationReport, check_base, check_pair

    checks: list[Check] = []
    for i in inputs:
        if layout is not None:
            checks += [_prefixed(c, i.label) for c in check_base(i.weights, layout, declared=i.declared)]
    for n, a in enumerate(inputs):
        for b in inputs[n + 1 :]:
            checks += check_pair(
                a.label,
                a.weights,
                b.label,
                b.weights,
                a_base=lib.fingerprint_of(a.declared),
                b_base=lib.fingerprint_of(b.declared),
            )
    report = ValidationReport(
        subject=subject,
        checks=tuple(checks),
        base=layout.name if layout else None,
        others=tuple(i.label for i in inputs),
    )
    if not report.ok:
        raise IncompatibleAdapterError(report.summary(), report=report)
    return report


# ------------------------------------------------------------------ merge
def merge(
    lib: Library,
    base: str | os.PathLike[str],
    adapters: Sequence[Weighted] | AdapterExpr[Any],
    *,
    out: str | os.PathLike[str],
    dtype: str = "keep",
    device: str = "auto",
    unmerge: bool = False,
    progress: Progress | None = None,
) -> MergeResult:
    """Fold adapters into a base checkpoint (registered name or folder), writing ``out``.

    ``W0 + sum_i w_i * s_i * B_i A_i`` per targeted tensor, in fp32, rounded once. The adapters are
    checked against the base and each other first; on any problem nothing is written. The merge is
    recorded in the catalog, so `adapter_info(...).merges` tells where each adapter went.
    """
    from ..formats.checkpoint import read_checkpoint
    from ..ops.merge import merge_checkpoint
    from ..ops.validate import BaseLayout

    bdir = base_dir(lib, base)
    ckpt = read_checkpoint(bdir)
    layout = BaseLayout.from_checkpoint(ckpt, name=str(base))
    inputs = _inputs(lib, adapters, load=False)
    _preflight(lib, inputs, layout, subject=f"merge into {base}")
    loaded = [_input(lib, i.label, i.weight) for i in inputs]
    from .maintenance import journal, sweep

    sweep(lib, "merge")

    def step(done: int, total: int) -> None:
        faults.point("merge.writing")
        if progress is not None:
            progress(done, total)

    with journal(lib, Path(out), kind="merge"):
        result = merge_checkpoint(
            bdir,
            [(i.weights, i.weight) for i in loaded],
            out,
            dtype=dtype,
            device=device,
            unmerge=unmerge,
            progress=step,
        )
    used = [(i.label, i.weight) for i in loaded if i.cataloged]
    if used:
        row = {
            "base": str(base),
            "out_path": str(Path(result.out).resolve()),
            "unmerge": unmerge,
            "dtype": dtype,
            "device": result.device,
            "tensors_changed": result.tensors_changed,
            "bytes_written": result.bytes_written,
            "seconds": result.seconds,
        }
        lib.record_merge(row, used)
    return result


# ------------------------------------------------------------------ combine, resize, extract
class CombineOptions(TypedDict, total=False):
    """The keywords of `combine` after ``name`` (what `Hub.combine` passes on)."""

    method: str
    rank: int | str | None
    keep: float
    density: float | None
    majority_sign: str
    seed: int | None
    device: str
    tags: Sequence[str]
    description: str | None
    base: str | os.PathLike[str] | None
    progress: Progress | None


class ExtractOptions(TypedDict, total=False):
    """The keywords of `extract_adapter` after ``rank`` and ``name``."""

    keep: float
    max_rank: int | None
    svd: str
    device: str
    tags: Sequence[str]
    description: str | None
    progress: Progress | None


def combine(
    lib: Library,
    adapters: Sequence[Weighted] | AdapterExpr[Any],
    *,
    name: str,
    method: str = "linear",
    rank: int | str | None = None,
    keep: float = 0.99,
    density: float | None = None,
    majority_sign: str = "total",
    seed: int | None = None,
    device: str = "auto",
    tags: Sequence[str] = (),
    description: str | None = None,
    base: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> CombineSummary:
    """Combine adapters into a new cataloged adapter ``name`` (PEFT format) with its lineage.

    ``adapters``: cataloged names or paths with weights, ``[("sql", 0.7), ("chat", 0.3)]``, or an
    expression ``0.7 * hub.adapter("sql") + 0.3 * hub.adapter("chat")``. Methods: see
    `adapterhub.ops.combine`. Inputs that do not fit together (or, with ``base``, do not fit that base
    model) are refused with the validation report, and nothing is written.
    """
    from ..ops.combine import combine as combine_op

    check_name(name)
    check_tags(tags)
    _refuse_taken(lib, name)
    from ..ops.combine import COMBINE_METHODS

    COMBINE_METHODS.get(method)  # an unknown name fails before any file is read
    inputs = _inputs(lib, adapters, load=False)
    layout = base_layout(lib, base) if base is not None else None
    _preflight(lib, inputs, layout, subject=f"combine into {name}")
    from .maintenance import sweep

    sweep(lib, "combine")
    loaded = [_input(lib, i.label, i.weight) for i in inputs]
    result = combine_op(
        [(i.weights, i.weight) for i in loaded],
        method=method,
        rank=_rank(rank),
        keep=keep,
        density=density,
        majority_sign=majority_sign,  # type: ignore[arg-type]
        seed=seed,
        device=device,
        progress=progress,
    )
    parents = [
        {
            "parent_name": i.label,
            "weight": i.weight,
            "method": result.method,
            "params": _jsonable(result.params),
        }
        for i in loaded
    ]
    return _store_result(
        lib,
        result,
        name,
        parents=parents,
        tags=tags,
        description=description,
        source=f"derived:{result.method}",
    )


def resize_adapter(
    lib: Library,
    name: str,
    *,
    rank: int | str,
    new_name: str,
    keep: float = 0.99,
    device: str = "auto",
    tags: Sequence[str] = (),
    description: str | None = None,
) -> CombineSummary:
    """The optimal rank-``rank`` (or ``"auto"`` with ``keep``) reduction of an adapter, cataloged as ``new_name``."""

    from ..ops.combine import resize

    check_name(new_name)
    check_tags(tags)
    _refuse_taken(lib, new_name)
    src = _input(lib, name)
    result = resize(src.weights, rank=_rank(rank), keep=keep, device=device)
    parents = [
        {"parent_name": src.label, "weight": 1.0, "method": "resize", "params": _jsonable(result.params)}
    ]
    return _store_result(
        lib, result, new_name, parents=parents, tags=tags, description=description, source="derived:resize"
    )


def extract_adapter(
    lib: Library,
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    *,
    rank: int | str,
    name: str,
    keep: float = 0.99,
    max_rank: int | None = None,
    svd: str = "auto",
    device: str = "auto",
    tags: Sequence[str] = (),
    description: str | None = None,
    progress: Progress | None = None,
) -> CombineSummary:
    """A LoRA from a full fine-tune: per matching 2-D weight, the truncated SVD of ``W_ft - W_base``,
    streamed tensor by tensor from both checkpoint folders."""
    from ..formats.checkpoint import read_checkpoint
    from ..ops.combine import extract

    check_name(name)
    check_tags(tags)
    _refuse_taken(lib, name)
    bdir, ft_dir = base_dir(lib, base), Path(finetuned)
    b, f = read_checkpoint(bdir), read_checkpoint(ft_dir)
    keys = [k for k in f.tensors if k in b.tensors]
    if not keys:
        raise BaseModelError(f"{finetuned} and {base} share no tensor names; is it a fine-tune of that base?")
    # a registered base is recorded under its real id (else its name); a folder under its checkpoint's own name
    registered = lib.bases(str(base)) if not Path(base).is_dir() else []
    base_model = registered[0].public_id if registered else (b.config.get("_name_or_path") or str(base))
    with _LazyTensors(b) as bt, _LazyTensors(f) as ft:
        result = extract(
            bt,
            ft,
            rank=_rank(rank),
            keep=keep,
            max_rank=max_rank,
            svd=svd,  # type: ignore[arg-type]
            keys=keys,
            base_model=base_model,
            device=device,
            progress=progress,
        )
    parents = [
        {
            "parent_name": str(finetuned),
            "weight": 1.0,
            "method": "extract",
            "params": _jsonable(
                {**result.params, "base": str(base), "skipped": len(result.params.get("skipped", []))}
            ),
        },
    ]
    return _store_result(
        lib,
        result,
        name,
        parents=parents,
        tags=tags,
        description=description,
        source=f"derived:extract:{Path(finetuned).resolve()}",
    )


def _refuse_taken(lib: Library, name: str) -> None:
    if lib.exists(name):
        raise AdapterExistsError(name)


def _store_result(
    lib: Library,
    result: CombineResult,
    name: str,
    *,
    parents: Sequence[dict[str, Any]],
    tags: Sequence[str],
    description: str | None,
    source: str,
) -> CombineSummary:
    """Write the new adapter as PEFT files in the store's scratch space and catalog it with lineage."""
    from ..formats import AdapterFiles, read_adapter, write_adapter

    lib.store.tmp.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=lib.store.tmp, prefix=scratch_prefix("derived")))
    try:
        fmt = "kohya" if result.weights.format == "kohya" else "peft"
        target = tmp / (Path(name).name + ".safetensors") if fmt == "kohya" else tmp
        written = write_adapter(result.weights, target, format=fmt)
        if fmt == "kohya":
            files = AdapterFiles("kohya", written)
        else:
            files = AdapterFiles("peft", tmp / "adapter_model.safetensors", tmp / "adapter_config.json")
        faults.point("combine.written")
        weights = read_adapter(files)  # what was written, read back as any adapter is
        info = lib.ingest(
            name,
            files,
            weights,
            base=None,
            tags=tags,
            description=description,
            source=source,
            parents=parents,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return CombineSummary(
        adapter=info,
        method=result.method,
        error=float(result.error),
        module_errors=dict(result.module_errors),
        ranks=result.ranks,
        params=_jsonable(result.params),
    )


def _prefixed(c: Check, label: str) -> Check:
    from ..ops.validate import Check

    return Check(c.status, c.check, f"{label}: {c.message}", c.module)


def _rank(rank: int | str | None) -> Any:
    """``None``, ``"auto"`` or a positive int (CLI strings are parsed)."""
    if rank is None or rank == "auto":
        return rank
    try:
        value = int(rank)
    except (TypeError, ValueError):
        raise InvalidOptionError(f"rank must be a positive integer or 'auto', got {rank!r}") from None
    if value < 1:
        raise InvalidOptionError(f"rank must be a positive integer or 'auto', got {rank!r}")
    return value


def _jsonable(params: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [x if isinstance(x, (str, int, float, bool)) or x is None else str(x) for x in v]
        else:
            out[k] = str(v)
    return out


class _LazyTensors(Mapping[str, "torch.Tensor"]):
    """A checkpoint's tensors by name, read one at a time from their shard (bounded memory)."""

    def __init__(self, ckpt: Any) -> None:
        self.ckpt = ckpt
        self._open: dict[str, Any] = {}

    def __enter__(self) -> _LazyTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._open.values():
            f.__exit__(None, None, None)
        self._open.clear()

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        shard = self.ckpt.shard_of(key)
        if shard not in self._open:
            handle = safe_open(str(Path(self.ckpt.path) / shard), framework="pt")
            self._open[shard] = handle.__enter__()
        return self._open[shard].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ckpt.tensors)

    def __len__(self) -> int:
        return len(self.ckpt.tensors)
