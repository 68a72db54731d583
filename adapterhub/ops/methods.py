"""The combine methods: one registry (`COMBINE_METHODS`), a small interface, and the configured variants.

`combine` (in `combine`) groups each module's terms and hands them to a method's `combine_module`; see
that module's docstring for what every method computes.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar, Literal

from ..errors import InvalidOptionError
from ..lora import LoraModule
from .lowrank import FactoredDelta, _check_keep, _check_rank, _dense_truncate, _pad, _truncate_factored
from .prune import _magnitude_prune, _majority_sign_mask, _random_prune
from .registry import Registry

if TYPE_CHECKING:
    import torch

__all__ = [
    "COMBINE_METHODS",
    "CombineMethod",
    "CombineOptions",
    "CombineTerm",
    "LinearMethod",
    "MajoritySign",
    "PruneMethod",
    "RankSpec",
    "combine_methods",
]

RankSpec = int | Literal["auto"] | None
MajoritySign = Literal["total", "frequency"]


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
                f"method {self.name!r} works on dense deltas and needs rank= (--rank N, or --rank auto with "
                "--keep, on the command line) to factor the result back into a LoRA"
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
