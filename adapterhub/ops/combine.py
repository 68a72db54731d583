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
The method registry and the methods themselves live in `methods`, `AdapterExpr` in `expr`;
this module re-exports them all, so everything stays importable from here.

Torch is imported only when a function runs; nothing here needs more than torch.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from ..errors import IncompatibleAdapterError, InvalidAdapterError, InvalidOptionError
from ..formats.values import non_finite
from ..lora import LoraModule, LoraWeights
from .expr import AdapterExpr as AdapterExpr
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
from .methods import COMBINE_METHODS as COMBINE_METHODS
from .methods import CombineMethod as CombineMethod
from .methods import CombineOptions as CombineOptions
from .methods import CombineTerm as CombineTerm
from .methods import LinearMethod as LinearMethod
from .methods import MajoritySign as MajoritySign
from .methods import PruneMethod as PruneMethod
from .methods import RankSpec as RankSpec
from .methods import _Context as _Context
from .methods import combine_methods as combine_methods
from .prune import _magnitude_prune as _magnitude_prune
from .prune import _majority_sign_mask as _majority_sign_mask
from .prune import _random_prune as _random_prune
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
            if m.needs_base:
                raise IncompatibleAdapterError(
                    f"adapter #{i + 1}, module {key}: KaSA removes the base weight's smallest singular "
                    "components, so its update depends on the base; resolve it against the base first "
                    "(adapterhub.ops.resolve_with_base) or merge it"
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
