"""Combine LoRA adapters: weighted sums (exact or compressed), TIES / DARE / magnitude pruning, resize, extract.

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

Torch is imported only when a function runs; nothing here needs more than torch.
"""

from __future__ import annotations

import logging
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

from ..errors import BaseModelError, IncompatibleAdapterError, InvalidAdapterError, InvalidOptionError
from ..lora import LoraModule, LoraWeights, ModuleKind
from .registry import Registry

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
Progress = Callable[[int, int], None]
AdapterT = TypeVar("AdapterT")

_DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


# --------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class CombineResult:
    """What `combine`, `resize` and `extract` return.

    ``error`` and ``module_errors`` are relative Frobenius errors ``||result - exact|| / ||exact||``
    against the exact weighted sum of the input deltas (for `extract`: against ``W_ft - W_base``), overall
    and per module key; rounding the factors to the output dtype is not counted.
    """

    weights: LoraWeights
    method: str
    error: float
    module_errors: Mapping[str, float]
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        """The rank of each module of the new adapter."""
        return {k: m.rank for k, m in self.weights.modules.items()}


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
class FactoredDelta:
    """A method's answer for one module: ``B @ A`` (scale 1) and its squared error against the exact sum."""

    B: torch.Tensor  # (out, R)
    A: torch.Tensor  # (R, in*kh*kw)
    error_sq: float
    norm_sq: float  # squared Frobenius norm of the exact weighted sum


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


def _check_rank(rank: object, *, allow_none: bool) -> None:
    if rank is None and allow_none:
        return
    if rank == "auto":
        return
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidOptionError(f"rank must be a positive integer or 'auto', got {rank!r}")


def _check_keep(keep: float) -> None:
    if not (isinstance(keep, numbers.Real) and 0.0 < float(keep) <= 1.0):
        raise InvalidOptionError(f"keep is the share of energy to keep, 0 < keep <= 1; got {keep!r}")


def _pick_rank(energy: torch.Tensor, rank: int | Literal["auto"], keep: float) -> int:
    """How many leading singular values to keep (``energy`` = squared singular values, descending)."""
    n = int(energy.numel())
    if rank != "auto":
        return min(int(rank), n)
    e = energy.double()
    total = float(e.sum())
    if n == 0 or total <= 0.0:
        return 1
    cum = e.cumsum(0)
    need = keep * total * (1.0 - 1e-12)
    return max(1, min(n, int((cum < need).sum()) + 1))


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) Vh_r``: the singular values split evenly between the factors."""
    sq = s[:r].sqrt()
    return u[:, :r] * sq, sq[:, None] * vh[:r]


def _dense_truncate(
    x: torch.Tensor,
    rank: int | Literal["auto"],
    keep: float,
    max_rank: int | None = None,
    *,
    gram: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of a dense 2-D ``x`` as ``(B, A)`` in ``x.dtype``, singular values split evenly.

    On the CPU: ``torch.linalg.svd`` (LAPACK gesdd; what PEFT uses). On a GPU: an eigendecomposition of
    the smaller fp64 Gram matrix, because cuSOLVER's default fp32 SVD (Jacobi) can miss the leading
    subspace by 1e-3 to 1e-2 relative, while this is exact to fp32 and about as fast as gesvda.
    ``gram`` forces one way or the other.
    """
    import torch

    if not (gram if gram is not None else x.device.type != "cpu"):
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        r = _pick_rank(s.double() ** 2, rank, keep)
        if max_rank is not None:
            r = min(r, max_rank)
        return _split(u, s, vh, r)
    xd = x.double()
    tall = x.shape[0] > x.shape[1]
    w, v = torch.linalg.eigh(xd.T @ xd if tall else xd @ xd.T)
    energy = w.flip(0).clamp_min(0.0)
    v = v.flip(1)
    r = _pick_rank(energy, rank, keep)
    if max_rank is not None:
        r = min(r, max_rank)
    s = energy[:r].sqrt()
    # drop directions at the fp64 Gram's noise floor rather than divide by them
    live = s > s[0] * 1e-7
    root = torch.where(live, s.sqrt(), torch.zeros_like(s))
    inv_root = torch.where(live, 1.0 / s.clamp_min(1e-300).sqrt(), torch.zeros_like(s))
    if tall:  # x = U S V^T, V from X^T X: A = sqrt(S) V^T, B = X V S^-1/2
        a = root[:, None] * v[:, :r].T
        b = (xd @ v[:, :r]) * inv_root
    else:  # U from X X^T: B = U sqrt(S), A = S^-1/2 U^T X
        b = v[:, :r] * root
        a = inv_root[:, None] * (v[:, :r].T @ xd)
    return b.to(x.dtype), a.to(x.dtype)


def _pad(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero columns / rows so an explicit ``rank`` is met even where the exact sum has lower rank."""
    r = b.shape[1]
    if r >= rank:
        return b, a
    import torch

    b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
    a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], dim=0)
    return b, a


def _orthogonalize(x: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """``x = Q R`` for a tall ``(n, K)`` stack: returns ``(M -> Q @ M, R)`` without necessarily forming Q.

    CholeskyQR2 (two Cholesky factorisations of K x K Gram matrices; as accurate as Householder for
    condition numbers below ~1e7 in fp64, and several times faster on tall-skinny stacks), falling back
    to Householder QR when the stack is rank deficient or ill-conditioned (the same adapter twice, K > n).
    """
    import torch

    n, k = x.shape
    if n >= k:
        l1, info1 = torch.linalg.cholesky_ex(x.T @ x)
        d1 = l1.diagonal()
        if int(info1) == 0 and float(d1.min()) > 1e-7 * float(d1.max()):
            r1 = l1.T
            q1 = torch.linalg.solve_triangular(r1, x, upper=True, left=False)  # x @ inv(r1)
            l2, info2 = torch.linalg.cholesky_ex(q1.T @ q1)
            if int(info2) == 0:
                r2 = l2.T
                return (lambda m: q1 @ torch.linalg.solve_triangular(r2, m, upper=True)), r2 @ r1
    q, r = torch.linalg.qr(x)
    return (lambda m: q @ m), r


def _truncate_factored(b: torch.Tensor, a: torch.Tensor, rank: int | Literal["auto"], keep: float) -> FactoredDelta:
    """Optimal rank reduction of ``b @ a`` (``(out, K) @ (K, in)``) without forming the product.

    ``b = Qb Rb`` and ``a^T = Qa Ra``, so ``b @ a = Qb (Rb Ra^T) Qa^T``; the SVD of the small core
    ``Rb Ra^T = U S V^T`` gives the SVD of the product, ``(Qb U) S (Qa V)^T``.
    """
    import torch

    apply_b, rb = _orthogonalize(b)
    apply_a, ra = _orthogonalize(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    energy = s.double() ** 2
    r = _pick_rank(energy, rank, keep)
    sq = s[:r].sqrt()
    new_b = apply_b(u[:, :r] * sq)
    new_a = apply_a(vh[:r].T * sq).T
    if rank != "auto":
        new_b, new_a = _pad(new_b, new_a, int(rank))
    return FactoredDelta(new_b, new_a, float(energy[r:].sum()), float(energy.sum()))


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


def _magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """PEFT's ``magnitude_based_pruning``: keep the ``int(density * numel)`` largest ``|t|``."""
    import torch

    if density >= 1.0:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    k = int(density * t.numel())
    top = torch.topk(t.abs().reshape(-1), k=k, largest=True)
    mask[top[1]] = 1
    return t * mask.reshape(t.shape)


def _random_prune(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """PEFT's ``random_pruning`` with ``rescale=True``: a Bernoulli(density) mask, divided by density."""
    import torch

    if density >= 1.0:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def _majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    majority = (magnitude >= 0).to(sign.dtype) * 2 - 1
    return sign == majority


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
            raise InvalidOptionError(f"majority_sign must be 'total' or 'frequency', got {options.majority_sign!r}")
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


def resolve_device(device: object = "auto") -> torch.device:
    """``"auto"``: the first CUDA device when there is one, else the CPU."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)  # type: ignore[call-overload]


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
            raise TypeError(f"adapters[{i}] holds a {type(w).__name__}, not LoraWeights; read it with read_adapter")
        if not isinstance(weight, numbers.Real) or isinstance(weight, bool) or not math.isfinite(float(weight)):
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


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(str(dtype).removeprefix("torch."), str(dtype).removeprefix("torch.").upper())


def _build_module(
    key: str,
    template: LoraModule,
    kind: ModuleKind,
    b: torch.Tensor,
    a: torch.Tensor,
    dtype: torch.dtype,
    *,
    bias: torch.Tensor | None = None,
    magnitude: torch.Tensor | None = None,
) -> LoraModule:
    rank = int(a.shape[0])
    kernel = template.kernel_size
    a_out = a.reshape(rank, template.in_features, *kernel).to(device="cpu", dtype=dtype).contiguous()
    b_out = b.reshape(template.out_features, rank, *([1] * len(kernel))).to(device="cpu", dtype=dtype).contiguous()
    return LoraModule(
        key=key,
        kind=kind,
        rank=rank,
        alpha=float(rank),
        scale=1.0,
        a_shape=tuple(a_out.shape),
        b_shape=tuple(b_out.shape),
        dtype=_dtype_name(dtype),
        A=a_out,
        B=b_out,
        bias=bias,
        bias_shape=tuple(bias.shape) if bias is not None else None,
        magnitude=magnitude,
        magnitude_shape=tuple(magnitude.shape) if magnitude is not None else None,
    )


def _extras(terms: Sequence[CombineTerm], dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
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
                key, terms[0].module, terms[0].module.kind, out.B, out.A, plan.dtype, bias=bias, magnitude=magnitude
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
    return CombineResult(
        weights=_result_weights(pairs, modules, plan),
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
    result = combine([(weights, 1.0)], method="linear", rank=rank, keep=keep, device=device, progress=progress)
    return replace(result, method="resize")


# ---------------------------------------------------------------------------------------------- extract

_EMBEDDING_NAMES = ("wte", "wpe", "shared")


def _guess_kind(key: str) -> ModuleKind:
    name = key.removesuffix(".weight").rsplit(".", 1)[-1]
    return "embedding" if "embed" in name or name in _EMBEDDING_NAMES else "linear"


def extract(
    base_tensors: Mapping[str, torch.Tensor],
    finetuned_tensors: Mapping[str, torch.Tensor],
    *,
    rank: int | Literal["auto"],
    keep: float = 0.99,
    max_rank: int | None = None,
    svd: Literal["auto", "exact", "randomized"] = "auto",
    niter: int = 4,
    keys: Iterable[str] | None = None,
    kinds: Mapping[str, ModuleKind] | None = None,
    base_model: str | None = None,
    device: str | torch.device = "auto",
    progress: Progress | None = None,
) -> CombineResult:
    """A LoRA that approximates a full fine-tune: per 2-D ``*.weight`` tensor, the truncated SVD of
    ``W_ft - W_base`` (fp32, on the GPU when there is one).

    Args:
        base_tensors, finetuned_tensors: tensors by checkpoint key (any mapping, e.g. a lazy one over
            ``safe_open``); tensors are fetched one key at a time.
        rank: an integer, or ``"auto"``: per module the smallest rank keeping ``keep`` of the energy
            (``||W_ft - W_base||_F^2``), at most ``max_rank``.
        svd: ``"exact"`` (``torch.linalg.svd``; on a GPU an fp64 Gram eigendecomposition), ``"randomized"`` (``torch.svd_lowrank`` with
            ``niter`` power iterations and 10 extra columns), or ``"auto"``: randomized when the target
            rank is known and small against the matrix, exact otherwise.
        keys: restrict to these keys (default: every key in both mappings).
        kinds: the module kind per key; by default a key whose module name holds ``embed`` (or is
            ``wte`` / ``wpe`` / ``shared``) is an embedding, the rest linear.
        base_model: recorded as ``base_model_name_or_path``.

    Unchanged tensors and tensors that are not 2-D floating ``*.weight`` are skipped (listed in
    ``params["skipped"]``). Raises `BaseModelError` when a key's shapes differ between the two.
    """
    import torch

    _check_rank(rank, allow_none=False)
    _check_keep(keep)
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 1):
        raise InvalidOptionError(f"max_rank must be a positive integer, got {max_rank!r}")
    if svd not in ("auto", "exact", "randomized"):
        raise InvalidOptionError(f"svd must be 'auto', 'exact' or 'randomized', got {svd!r}")
    dev = resolve_device(device)
    wanted = list(keys) if keys is not None else [k for k in finetuned_tensors if k in base_tensors]
    modules: dict[str, LoraModule] = {}
    errors: dict[str, float] = {}
    skipped: list[str] = []
    dtypes: set[torch.dtype] = set()
    err_total = norm_total = 0.0
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, ModuleKind]] = {}
    with torch.no_grad():
        for done, key in enumerate(wanted, start=1):
            if key not in base_tensors or key not in finetuned_tensors:
                raise BaseModelError(f"{key}: not in both checkpoints; pass keys present in base and fine-tune")
            w0, w1 = base_tensors[key], finetuned_tensors[key]
            if tuple(w0.shape) != tuple(w1.shape):
                raise BaseModelError(
                    f"{key}: shape {list(w1.shape)} in the fine-tune but {list(w0.shape)} in the base; "
                    "extract needs the fine-tune of this very base"
                )
            diff = None
            if w1.dim() == 2 and key.endswith(".weight") and w1.is_floating_point():
                diff = w1.to(dev, torch.float32) - w0.to(dev, torch.float32)
            norm_sq = float(diff.double().pow(2).sum()) if diff is not None else 0.0
            if diff is None or norm_sq == 0.0:
                skipped.append(key)
            else:
                dtypes.add(w1.dtype)
                b, a = _factor_dense(diff, rank, keep, max_rank, svd, niter)
                err_sq = float(torch.addmm(diff, b, a, alpha=-1.0).double().pow(2).sum())
                factors[key] = (b.cpu(), a.cpu(), (kinds or {}).get(key) or _guess_kind(key))
                errors[key] = math.sqrt(err_sq / norm_sq)
                err_total += err_sq
                norm_total += norm_sq
            del w0, w1, diff
            if progress is not None:
                progress(done, len(wanted))
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    for key, (b, a, kind) in factors.items():
        r = int(a.shape[0])
        template = LoraModule(key, kind, r, float(r), 1.0, (r, int(a.shape[1])), (int(b.shape[0]), r))
        modules[key] = _build_module(key, template, kind, b, a, dtype)
    if not modules:
        raise BaseModelError("the fine-tune does not differ from the base in any 2-D weight; nothing to extract")
    config: dict[str, Any] = {"peft_type": "LORA", "base_model_name_or_path": base_model, "use_rslora": False}
    weights = LoraWeights(modules=modules, format="peft", config=config, base_model=base_model)
    from ..formats.peft import derive_config

    weights.config = derive_config(weights, config)
    if skipped:
        logger.info("extract: skipped %d tensors (unchanged, or not 2-D weights)", len(skipped))
    return CombineResult(
        weights=weights,
        method="extract",
        error=math.sqrt(err_total / norm_total) if norm_total > 0 else 0.0,
        module_errors=errors,
        params={"rank": rank, "keep": keep, "max_rank": max_rank, "svd": svd, "device": str(dev), "skipped": skipped},
    )


def _factor_dense(
    d: torch.Tensor,
    rank: int | Literal["auto"],
    keep: float,
    max_rank: int | None,
    svd: str,
    niter: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of a dense matrix, singular values split evenly: ``(B, A)``."""
    import torch

    n = min(d.shape)
    target = rank if rank != "auto" else max_rank
    q = None if target is None else min(int(target) + 10, n)
    randomized = svd == "randomized" or (svd == "auto" and q is not None and q * 4 <= n)
    if not randomized or q is None:
        b, a = _dense_truncate(d, rank, keep, max_rank if rank == "auto" else None)
    else:
        u, s, v = torch.svd_lowrank(d, q=q, niter=niter)
        energy = s.double() ** 2
        if rank == "auto":
            # the share is of the whole energy, which the Frobenius norm gives exactly
            total = float(d.double().pow(2).sum())
            r = int((energy.cumsum(0) < keep * total * (1.0 - 1e-12)).sum()) + 1
            r = max(1, min(r, int(q)))
            if max_rank is not None:
                r = min(r, max_rank)
        else:
            r = min(int(rank), int(energy.numel()))
        b, a = _split(u, s, v.T, r)
    if rank != "auto":
        b, a = _pad(b, a, int(rank))
    return b, a
