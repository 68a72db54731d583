"""`AdapterExpr`: a weighted sum of adapters written as arithmetic (``0.7 * X(a) + 0.3 * X(b)``)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import PurePath
from typing import Generic, TypeVar

__all__ = ["AdapterExpr"]

AdapterT = TypeVar("AdapterT")


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
