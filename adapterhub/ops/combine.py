"""Combine LoRA adapters: weighted sums (exact or compressed), TIES / DARE / magnitude pruning, resize.

Every method works module by module on `LoraWeights` (``delta = scale * B @ A`` in module-weight layout,
conv factors flattened to ``(r, in*kh*kw)``) and returns a `CombineResult`: a new adapter with tensors,
plus its relative Frobenius error against the exact weighted sum ``sum_i w_i * s_i * B_i @ A_i``.

Methods live in one registry (`COMBINE_METHODS`); variants are the same class configured differently:

======================  =====================================================================
``linear`` (default)    the exact weighted sum; without ``rank`` kept in factored form (ranks add
                        up), with ``rank=R`` its optimal rank-R truncation, with ``rank="auto"`` the
                        smallest rank per module that keeps ``keep`` of the energy. Computed from the
                        stacked factors (QR of each stack, SVD of the small core), never densely.
``cat`` / ``svd``       PEFT's names: ``linear`` never / always compressed (``svd`` defaults to the
                        largest input rank, as PEFT does).
``ties``                TIES (Yadav et al. 2023): trim each delta to its top-``density`` entries by
                        magnitude, elect a sign per entry, average the weighted agreeing entries.
``dare_linear``         DARE (Yu et al. 2023): drop entries at random (keep ``density``), rescale by
                        ``1/density``, weighted sum.
``dare_ties``           DARE's random drop followed by TIES' sign election and disjoint mean.
``magnitude_prune``     trim to the top-``density`` entries by magnitude, weighted sum.
======================  =====================================================================

The four pruning methods follow PEFT's ``*_svd`` combination types exactly (``peft.utils.merge_utils``:
the pruning sees the scaled delta ``s_i * B_i @ A_i``; weights multiply after pruning; the sign election
uses the unweighted pruned deltas); ``ties_svd`` etc. are accepted as aliases. They need dense
``out x in`` deltas, computed in fp32 on the GPU when there is one, and are factored back to ``rank``
with a truncated SVD. DARE draws its masks module by module in the order the modules first appear in the
inputs, and adapter by adapter in input order, from a generator seeded with ``seed`` (or torch's global
generator when ``seed`` is None), one ``torch.bernoulli`` call per delta, as PEFT does.

The low-rank linear algebra lives in `lowrank`, PEFT's pruning in `prune`, `CombineResult` and the
helpers that build its modules in `result`, and `extract` (a LoRA from a full fine-tune) in `extract`;
this module re-exports them, so everything stays importable from here.

Torch is imported only when a function runs; nothing here needs more than torch.
"""

from __future__ import annotations

import logging
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

from ..errors import IncompatibleAdapterError, InvalidAdapterError, InvalidOptionError
from ..formats.values import non_finite
from ..lora import LoraModule, LoraWeights
from .extract import _EMBEDDING_NAMES as _EMBEDDING_NAMES
from .extract import _factor_dense as _factor_dense
from .extract import _guess_kind as _guess_kind
from .extract import extract as extract
from .lowrank import FactoredDelta as FactoredDelta
from .lowrank import _check_keep as _check_keep
from .lowrank import _check_rank as _check_rank
from .lowrank import _dense_truncate as _dense_truncate
from .lowrank import _orthogonalize as _orthogonalize
from .lowrank import _pad as _pad
from .lowrank import _pick_rank as _pick_rank
from .lowrank import _split as _split
from .lowrank import _truncate_factored as _truncate_factored
from .prune import _magnitude_prune as _magnitude_prune
from .prune import _majority_sign_mask as _majority_sign_mask
from .prune import _random_prune as _random_prune
from .registry import Registry
from .result import _DTYPE_NAMES as _DTYPE_NAMES
from .result import CombineResult as CombineResult
from .result import Progress as Progress
from .result import _build_module as _build_module
from .result import _dtype_name as _dtype_name
from .result import resolve_device as resolve_device

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "COMBINE_METHODS",
    "AdapterExpr",
    "CombineMethod",
    "CombineOptions",
    "CombineResult",
    "CombineTerm",
    "FactoredDelta",
    "combine",
    "combine_methods",
    "extract",
    "resize",
]

RankSpec = int | Literal["auto"] | None
MajoritySign = Literal["total", "frequency"]
AdapterT = TypeVar("AdapterT")


# --------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class CombineOptions:
    """The options a method sees, after it resolved its defaults."""

    rank: RankSpec = None
    keep: float = 0.99
    density: float | None = None
    majority_sign: MajoritySign = "total"
    seed: int | None = None


@dataclass(frozen=True)
class CombineTerm:
    """One adapter's module in a combination: contributes ``weight * module.scale * B @ A``."""

    module: LoraModule
    weight: float
    source: int  # position of the adapter in the input list

    @property
    def coef(self) -> float:
        return self.weight * self.module.scale

    def factors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` as 2-D ``(out, r)`` and ``(r, in*kh*kw)`` tensors, unscaled."""
        m = self.module
        assert m.A is not None and m.B is not None
        b = m.B.to(device=device, dtype=dtype).reshape(m.B.shape[0], -1)
        a = m.A.to(device=device, dtype=dtype).reshape(m.A.shape[0], -1)
        return b, a


@dataclass(frozen=True)
class _Context:
    device: torch.device
    generator: torch.Generator | None


# ----------------------------------------------------------------------------------------------- sugar


def _same(a: object, b: object) -> bool:
    return a is b or (isinstance(a, (str, PurePath)) and type(a) is type(b) and a == b)


def _label(adapter: object) -> str:
    if isinstance(adapter, (str, PurePath)):
        return str(adapter)
    name = getattr(adapter, "name", None)
    return str(name) if isinstance(name, str) else f"<{type(adapter).__name__}>"


@dataclass(frozen=True, eq=False)
class AdapterExpr(Generic[AdapterT]):
    """A weighted sum of adapters written as arithmetic: ``0.7 * X(a) + 0.3 * X(b)``, ``X(a) - X(b)``.

    ``X = AdapterExpr.of``; an adapter can be any object (`LoraWeights`, a catalog name, ...). The same
    adapter (``is``, or an equal name or path) appearing twice has its weights added. ``pairs()`` gives
    the ``[(adapter, weight), ...]`` list that `combine` takes (it also takes the expression itself).
    """

    terms: tuple[tuple[AdapterT, float], ...] = ()

    @classmethod
    def of(cls, adapter: AdapterT, weight: float = 1.0) -> AdapterExpr[AdapterT]:
        return cls(((adapter, float(weight)),))

    def pairs(self) -> list[tuple[AdapterT, float]]:
        return list(self.terms)

    def _plus(self, other: AdapterExpr[AdapterT]) -> AdapterExpr[AdapterT]:
        out = list(self.terms)
        for adapter, w in other.terms:
            for i, (a, v) in enumerate(out):
                if _same(a, adapter):
                    out[i] = (a, v + w)
                    break
            else:
                out.append((adapter, w))
        return AdapterExpr(tuple(out))

    def __add__(self, other: object) -> AdapterExpr[AdapterT]:
        if isinstance(other, AdapterExpr):
            return self._plus(other)
        if isinstance(other, numbers.Real) and other == 0:  # sum() starts from 0
            return self
        return NotImplemented

    __radd__ = __add__

    def __sub__(self, other: object) -> AdapterExpr[AdapterT]:
        if isinstance(other, AdapterExpr):
            return self._plus(-other)
        return NotImplemented

    def __neg__(self) -> AdapterExpr[AdapterT]:
        return self * -1.0

    def __pos__(self) -> AdapterExpr[AdapterT]:
        return self

    def __mul__(self, k: object) -> AdapterExpr[AdapterT]:
        if isinstance(k, numbers.Real) and not isinstance(k, bool):
            return AdapterExpr(tuple((a, w * float(k)) for a, w in self.terms))
        return NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, k: object) -> AdapterExpr[AdapterT]:
        if isinstance(k, numbers.Real) and not isinstance(k, bool):
            return self * (1.0 / float(k))
        return NotImplemented

    def __repr__(self) -> str:
        body = " + ".join(f"{w:g} * {_label(a)}" for a, w in self.terms) or "0"
        return f"AdapterExpr({body})"


# -------------------------------------------------------------------------------------------- registry


class CombineMethod(ABC):
    """The interface of a combine method: resolve options once, then combine one module at a time."""

    #: whether the method needs each module's dense ``out x in`` delta
    dense: ClassVar[bool] = False

    def __init__(self, name: str) -> None:
        self.name = name

    def resolve(self, options: CombineOptions, *, max_rank: int) -> CombineOptions:
        """Check the options and fill this method's defaults (``max_rank``: the largest input rank)."""
        return options

    @abstractmethod
    def combine_module(
        self, terms: Sequence[CombineTerm], options: CombineOptions, ctx: _Context
    ) -> FactoredDelta:
        """Combine one module's terms (each adapter that has the module, in input order)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


COMBINE_METHODS: Registry[CombineMethod] = Registry("combine method")


def combine_methods() -> list[str]:
    """Names of the registered combine methods."""
    return COMBINE_METHODS.names()


@COMBINE_METHODS.register("linear")
@COMBINE_METHODS.register("cat", compress=False)
@COMBINE_METHODS.register("svd", compress=True)
class LinearMethod(CombineMethod):
    """The exact weighted sum, held in factored form or optimally compressed.

    ``compress``: None compresses when ``rank`` is given (``linear``), False never (``cat``), True always
    (``svd``, whose rank defaults to the largest input rank).
    """

    def __init__(self, name: str, *, compress: bool | None = None) -> None:
        super().__init__(name)
        self.compress = compress

    def resolve(self, options: CombineOptions, *, max_rank: int) -> CombineOptions:
        if self.compress is False and options.rank is not None:
            raise InvalidOptionError(
                f"method {self.name!r} keeps every input rank exactly; leave rank unset, or use "
                "method='linear' with a rank to compress"
            )
        if self.compress and options.rank is None:
            options = replace(options, rank=max_rank)
        _check_rank(options.rank, allow_none=True)
        _check_keep(options.keep)
        return options

    def combine_module(
        self, terms: Sequence[CombineTerm], options: CombineOptions, ctx: _Context
    ) -> FactoredDelta:
        import torch

        bs, as_ = [], []
        for t in terms:
            b, a = t.factors(ctx.device, torch.float64)
            bs.append(b * t.coef)
            as_.append(a)
        b, a = torch.cat(bs, dim=1), torch.cat(as_, dim=0)
        if options.rank is None:
            # ||B A||^2 = trace(B^T B A A^T), from two K x K Gram matrices
            norm_sq = float(((b.T @ b) * (a @ a.T)).sum())
            return FactoredDelta(b, a, 0.0, max(norm_sq, 0.0))
        return _truncate_factored(b, a, options.rank, options.keep)


@COMBINE_METHODS.register("ties", prune="magnitude", elect_sign=True)
@COMBINE_METHODS.register("ties_svd", prune="magnitude", elect_sign=True)
@COMBINE_METHODS.register("dare_linear", prune="random", elect_sign=False)
@COMBINE_METHODS.register("dare_linear_svd", prune="random", elect_sign=False)
@COMBINE_METHODS.register("dare_ties", prune="random", elect_sign=True)
@COMBINE_METHODS.register("dare_ties_svd", prune="random", elect_sign=True)
@COMBINE_METHODS.register("magnitude_prune", prune="magnitude", elect_sign=False)
@COMBINE_METHODS.register("magnitude_prune_svd", prune="magnitude", elect_sign=False)
class PruneMethod(CombineMethod):
    """Elementwise task-vector merging on dense deltas (TIES / DARE / magnitude pruning), then an SVD."""

    dense = True

    def __init__(self, name: str, *, prune: Literal["magnitude", "random"], elect_sign: bool) -> None:
        super().__init__(name)
        self.prune = prune
        self.elect_sign = elect_sign

    def resolve(self, options: CombineOptions, *, max_rank: int) -> CombineOptions:
        if options.rank is None:
            raise InvalidOptionError(
                f"method {self.name!r} works on dense deltas and needs rank= (an integer, or 'auto' with "
                "keep=) to factor the result back into a LoRA"
            )
        _check_rank(options.rank, allow_none=False)
        _check_keep(options.keep)
        d = options.density
        if d is None or not isinstance(d, numbers.Real) or not (0.0 < float(d) <= 1.0):
            raise InvalidOptionError(
                f"method {self.name!r} needs density=, the share of each delta's entries to keep "
                f"(0 < density <= 1, e.g. 0.5); got {d!r}"
            )
        if options.majority_sign not in ("total", "frequency"):
            raise InvalidOptionError(
                f"majority_sign must be 'total' or 'frequency', got {options.majority_sign!r}"
            )
        return options

    def merge_dense(
        self, deltas: Sequence[torch.Tensor], weights: torch.Tensor, options: CombineOptions, ctx: _Context
    ) -> torch.Tensor:
        """The elementwise merge of scaled deltas (PEFT's ``ties`` / ``dare_*`` / ``magnitude_prune``)."""
        import torch

        density = float(options.density)  # type: ignore[arg-type]
        if self.prune == "magnitude":
            pruned = [_magnitude_prune(d, density) for d in deltas]
        else:
            pruned = [_random_prune(d, density, ctx.generator) for d in deltas]
        stacked = torch.stack(pruned, dim=0)
        weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
        if not self.elect_sign:
            return weighted.sum(dim=0)
        mask = _majority_sign_mask(stacked, options.majority_sign)
        return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)

    def combine_module(
        self, terms: Sequence[CombineTerm], options: CombineOptions, ctx: _Context
    ) -> FactoredDelta:
        import torch

        deltas = []
        for t in terms:
            b, a = t.factors(ctx.device, torch.float32)
            deltas.append((b @ a) * t.module.scale)  # the same arithmetic as PEFT's get_delta_weight
        weights = torch.tensor([t.weight for t in terms], dtype=torch.float32, device=ctx.device)
        exact = sum((w * d for w, d in zip(weights, deltas, strict=True)), torch.zeros_like(deltas[0]))
        merged = self.merge_dense(deltas, weights, options, ctx)
        del deltas
        b, a = _dense_truncate(merged, options.rank, options.keep)  # type: ignore[arg-type]
        del merged
        diff = torch.addmm(exact, b, a, alpha=-1.0)
        error_sq = float(diff.double().pow(2).sum())
        norm_sq = float(exact.double().pow(2).sum())
        if options.rank != "auto":
            b, a = _pad(b, a, int(options.rank))  # type: ignore[arg-type]
        return FactoredDelta(b, a, error_sq, norm_sq)


# ---------------------------------------------------------------------------------------------- combine


def _as_pairs(adapters: object) -> list[tuple[LoraWeights, float]]:
    items = adapters.pairs() if isinstance(adapters, AdapterExpr) else adapters
    if not isinstance(items, Iterable):
        raise TypeError("adapters must be a list of (LoraWeights, weight) pairs or an AdapterExpr")
    pairs: list[tuple[LoraWeights, float]] = []
    for i, item in enumerate(items):
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(f"adapters[{i}] must be a (LoraWeights, weight) pair, got {type(item).__name__}")
        w, weight = item
        if not isinstance(w, LoraWeights):
            raise TypeError(
                f"adapters[{i}] holds a {type(w).__name__}, not LoraWeights; read it with read_adapter"
            )
        if (
            not isinstance(weight, numbers.Real)
            or isinstance(weight, bool)
            or not math.isfinite(float(weight))
        ):
            raise InvalidOptionError(f"adapters[{i}]: the weight must be a finite number, got {weight!r}")
        pairs.append((w, float(weight)))
    if not pairs:
        raise InvalidOptionError("combine needs at least one (adapter, weight) pair")
    return pairs


@dataclass
class _Plan:
    modules: dict[str, list[CombineTerm]]
    replacements: dict[str, Any]
    replacement_sources: dict[str, int]
    format: str
    dtype: torch.dtype


def _plan(pairs: Sequence[tuple[LoraWeights, float]]) -> _Plan:
    """Group modules by key and check everything before any arithmetic."""
    import torch

    formats = {w.format for w, _ in pairs}
    if len(formats) > 1:
        raise IncompatibleAdapterError(
            "cannot combine kohya and PEFT adapters: kohya keys are not base weight keys; convert the kohya "
            "adapter to PEFT against its base model first"
        )
    modules: dict[str, list[CombineTerm]] = {}
    dtypes: set[torch.dtype] = set()
    for i, (w, weight) in enumerate(pairs):
        bad = non_finite(w)
        if bad:
            raise InvalidAdapterError(
                f"adapter #{i + 1}: {bad[0].describe()}; a combination with it would not be finite",
                module=bad[0].name,
            )
        for key, m in w.modules.items():
            if not m.has_tensors():
                raise InvalidAdapterError(
                    f"adapter #{i + 1}, module {key}: tensors were not loaded; read it with read_adapter(path, load=True)",
                    module=key,
                )
            assert m.A is not None
            dtypes.add(m.A.dtype)
            modules.setdefault(key, []).append(CombineTerm(m, weight, i))
    for key, terms in modules.items():
        first = terms[0]
        for t in terms[1:]:
            if t.module.kind != first.module.kind or t.module.delta_shape != first.module.delta_shape:
                raise IncompatibleAdapterError(
                    f"module {key}: adapter #{first.source + 1} has a {first.module.kind} delta of shape "
                    f"{list(first.module.delta_shape)} but adapter #{t.source + 1} has a {t.module.kind} delta "
                    f"of shape {list(t.module.delta_shape)}; adapters made for different base models cannot "
                    "be combined"
                )
        dora = [t.source + 1 for t in terms if t.module.is_dora]
        if len(dora) > 1:
            raise IncompatibleAdapterError(
                f"module {key}: DoRA in adapters #{', #'.join(map(str, dora))}; a combination of DoRA "
                "magnitudes is not defined, so combine at most one DoRA adapter per module"
            )
        if dora and len(terms) > 1:
            logger.warning("module %s: keeping the DoRA magnitude of adapter #%d", key, dora[0])
    replacements: dict[str, Any] = {}
    sources: dict[str, int] = {}
    for i, (w, _) in enumerate(pairs):
        for key in set(w.replacement_shapes) | set(w.replacements):
            if key in sources:
                raise IncompatibleAdapterError(
                    f"module {key}: adapters #{sources[key] + 1} and #{i + 1} both replace it outright "
                    "(modules_to_save); those weights cannot be combined, so keep it in one adapter only"
                )
            tensor = w.replacements.get(key)
            if tensor is None:
                raise InvalidAdapterError(
                    f"adapter #{i + 1}, {key}: tensors were not loaded; read it with read_adapter(path, load=True)",
                    module=key,
                )
            sources[key] = i
            replacements[key] = tensor
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    return _Plan(modules, replacements, sources, formats.pop(), dtype)


def _common(values: Iterable[Any]) -> Any:
    vals = list(values)
    if vals and all(v == vals[0] for v in vals):
        return vals[0]
    return None


def _extras(
    terms: Sequence[CombineTerm], dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The combined lora_B bias (``sum_i w_i s_i b_i``, linear in every method) and a DoRA magnitude."""
    import torch

    biased = [t for t in terms if t.module.bias is not None]
    bias = None
    if biased:
        bias = sum(
            (t.module.bias.to("cpu", torch.float64) * t.coef for t in biased),  # type: ignore[union-attr]
            torch.zeros(biased[0].module.bias.shape, dtype=torch.float64),  # type: ignore[union-attr]
        ).to(dtype)
    mags = [t.module.magnitude for t in terms if t.module.magnitude is not None]
    return bias, (mags[0].clone() if mags else None)


def _result_weights(
    pairs: Sequence[tuple[LoraWeights, float]],
    modules: dict[str, LoraModule],
    plan: _Plan,
) -> LoraWeights:
    inputs = [w for w, _ in pairs]
    base = _common(w.base_model for w in inputs)
    config: dict[str, Any] = {}
    if plan.format == "peft":
        config = {"peft_type": "LORA", "base_model_name_or_path": base, "use_rslora": False}
        for k in ("task_type", "fan_in_fan_out", "revision"):
            v = _common(w.config.get(k) for w in inputs)
            if v is not None:
                config[k] = v
        if plan.replacements:
            saved: list[str] = []
            for i in sorted(set(plan.replacement_sources.values())):
                for name in inputs[i].config.get("modules_to_save") or []:
                    if name not in saved:
                        saved.append(name)
            config["modules_to_save"] = saved or None
    weights = LoraWeights(
        modules=modules,
        format=plan.format,
        config=config,
        replacements=dict(plan.replacements),
        replacement_shapes={k: tuple(v.shape) for k, v in plan.replacements.items()},
        base_model=base,
        use_rslora=False,
    )
    if plan.format == "peft" and modules:
        from ..formats.peft import derive_config

        weights.config = derive_config(weights, config)
    return weights


def combine(
    adapters: Sequence[tuple[LoraWeights, float]] | AdapterExpr[LoraWeights],
    *,
    method: str = "linear",
    rank: RankSpec = None,
    keep: float = 0.99,
    density: float | None = None,
    majority_sign: MajoritySign = "total",
    seed: int | None = None,
    device: str | torch.device = "auto",
    progress: Progress | None = None,
) -> CombineResult:
    """Combine adapters into one: per module, ``sum_i w_i * s_i * B_i @ A_i`` or a pruned variant of it.

    Args:
        adapters: ``[(weights, w), ...]`` with tensors loaded (``read_adapter(path, load=True)``), or an
            `AdapterExpr`. Weights may be negative; a module missing from an adapter counts as zero.
        method: a name in `COMBINE_METHODS` (`combine_methods()` lists them); see the module docstring.
        rank: None (``linear``: exact, ranks add up), an integer (every module gets that rank), or
            ``"auto"`` (per module the smallest rank keeping ``keep`` of the squared Frobenius norm).
            Required for the pruning methods.
        keep: the share of energy ``rank="auto"`` keeps, ``0 < keep <= 1``.
        density: the share of each delta's entries the pruning methods keep, ``0 < density <= 1``.
        majority_sign: how ``ties`` / ``dare_ties`` elect signs: ``"total"`` (sign of the sum) or
            ``"frequency"`` (sign of the majority).
        seed: seeds DARE's random masks (None: torch's global generator on the compute device).
        device: where dense work runs: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda:1"``, ...
        progress: called as ``progress(done, total)`` after each module.

    Returns:
        A `CombineResult` whose ``weights`` is a PEFT-format adapter (kohya when every input is kohya)
        with scale 1 per module (``alpha = rank``), the inputs' dtype (fp32 when they differ),
        ``use_rslora`` False and the inputs' ``base_model_name_or_path`` when they agree.

    Raises:
        UnknownMethodError: ``method`` is not registered.
        IncompatibleAdapterError: a module's delta shape differs between adapters, or DoRA modules or
            ``modules_to_save`` replacements of the same key appear in more than one adapter.
        InvalidAdapterError: an adapter's tensors were not loaded.
        ValueError: an option is out of range or missing for the method.
    """
    pairs = _as_pairs(adapters)
    impl = COMBINE_METHODS.get(method)
    options = impl.resolve(
        CombineOptions(rank=rank, keep=keep, density=density, majority_sign=majority_sign, seed=seed),
        max_rank=max((w.rank for w, _ in pairs), default=1) or 1,
    )
    plan = _plan(pairs)
    if not plan.modules and not plan.replacements:
        raise IncompatibleAdapterError("the adapters hold no LoRA modules to combine")
    import torch

    dev = resolve_device(device)
    generator = None
    if options.seed is not None:
        generator = torch.Generator(device=dev)
        generator.manual_seed(int(options.seed))
    ctx = _Context(dev, generator)
    logger.info(
        "combining %d adapters (%d modules) with %s on %s", len(pairs), len(plan.modules), impl.name, dev
    )
    modules: dict[str, LoraModule] = {}
    errors: dict[str, float] = {}
    err_total = norm_total = 0.0
    with torch.no_grad():
        for done, (key, terms) in enumerate(plan.modules.items(), start=1):
            out = impl.combine_module(terms, options, ctx)
            bias, magnitude = _extras(terms, plan.dtype)
            modules[key] = _build_module(
                key,
                terms[0].module,
                terms[0].module.kind,
                out.B,
                out.A,
                plan.dtype,
                bias=bias,
                magnitude=magnitude,
            )
            errors[key] = math.sqrt(out.error_sq / out.norm_sq) if out.norm_sq > 0 else 0.0
            err_total += out.error_sq
            norm_total += out.norm_sq
            logger.debug("%s: rank %d, relative error %.3g", key, modules[key].rank, errors[key])
            if progress is not None:
                progress(done, len(plan.modules))
    params: dict[str, Any] = {
        "weights": [w for _, w in pairs],
        "rank": options.rank,
        "device": str(dev),
    }
    if options.rank == "auto":
        params["keep"] = options.keep
    if impl.dense:
        params.update(density=options.density, seed=options.seed)
        if getattr(impl, "elect_sign", False):
            params["majority_sign"] = options.majority_sign
    result_weights = _result_weights(pairs, modules, plan)
    bad = non_finite(result_weights)
    if bad:
        raise IncompatibleAdapterError(
            f"the combination is not finite: {bad[0].describe()} (the {_dtype_name(plan.dtype)} factors "
            "overflow; combine float32 copies of the adapters)",
        )
    return CombineResult(
        weights=result_weights,
        method=impl.name,
        error=math.sqrt(err_total / norm_total) if norm_total > 0 else 0.0,
        module_errors=errors,
        params=params,
    )


def resize(
    weights: LoraWeights,
    *,
    rank: int | Literal["auto"],
    keep: float = 0.99,
    device: str | torch.device = "auto",
    progress: Progress | None = None,
) -> CombineResult:
    """The optimal rank reduction of one adapter: per module the truncated SVD of ``scale * B @ A``.

    ``rank`` is an integer (every module gets it; modules of lower rank are padded with zeros) or
    ``"auto"`` (per module the smallest rank keeping ``keep`` of the energy). Computed from the factors
    (QR + SVD of an ``r x r`` core), never densely. DoRA magnitudes, lora_B biases and ``modules_to_save``
    are carried over unchanged.
    """
    if rank is None:
        raise InvalidOptionError("resize needs rank= (an integer, or 'auto' with keep=)")
    result = combine(
        [(weights, 1.0)], method="linear", rank=rank, keep=keep, device=device, progress=progress
    )
    return replace(result, method="resize")
