"""Checks of tensor values: an adapter whose factors hold NaN or Infinity is refused wherever it is used.

Headers and configs say nothing about values, so these read tensor data: `scan_file` one tensor at a
time from a safetensors file (memory bounded by the largest tensor), `non_finite` over tensors already
in memory. `check_finite` is the one call for "refuse this adapter file if any value is not finite".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import InvalidAdapterError
from ..lora import LoraWeights


class _HasWeights(Protocol):
    @property
    def weights(self) -> Path: ...


__all__ = ["NonFinite", "check_finite", "non_finite", "scan_file"]


@dataclass(frozen=True)
class NonFinite:
    """A tensor that holds ``bad`` NaN / Inf values out of ``numel``."""

    name: str
    bad: int
    numel: int

    def describe(self) -> str:
        return f"{self.name} holds {self.bad} NaN/Inf value{'s' * (self.bad != 1)} of {self.numel}"


def _count(t: Any) -> int:
    import torch

    if not t.is_floating_point():
        return 0
    return int((~torch.isfinite(t)).sum())


def scan_file(
    path: str | os.PathLike[str], *, progress: Callable[[int, int], None] | None = None
) -> list[NonFinite]:
    """Every floating-point tensor of a safetensors file that holds a NaN or Infinity; ``progress``
    gets (bytes scanned, bytes in all) after each tensor."""
    from safetensors import safe_open

    out: list[NonFinite] = []
    total = os.path.getsize(path)
    done = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            t = f.get_tensor(key)
            bad = _count(t)
            if bad:
                out.append(NonFinite(key, bad, t.numel()))
            if progress is not None:
                done += t.numel() * t.element_size()
                progress(min(done, total), total)
    return out


def _tensors(weights: LoraWeights) -> Iterator[tuple[str, Any]]:
    for m in weights.modules.values():
        for role, t in m.tensors().items():
            yield f"{m.module} ({role})", t
    for key, t in weights.replacements.items():
        if t is not None:
            yield key, t


def non_finite(weights: LoraWeights) -> list[NonFinite]:
    """The loaded tensors of ``weights`` that hold a NaN or Infinity (tensors not loaded are skipped)."""
    out = []
    for name, t in _tensors(weights):
        bad = _count(t)
        if bad:
            out.append(NonFinite(name, bad, t.numel()))
    return out


def refuse_non_finite(weights: LoraWeights, *, path: str | None = None) -> None:
    """Raise `InvalidAdapterError` when a loaded tensor of ``weights`` is not finite."""
    bad = non_finite(weights)
    if bad:
        _refuse(bad, path)


def _refuse(bad: list[NonFinite], path: str | None) -> None:
    more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
    where = f"{path}: " if path else ""
    raise InvalidAdapterError(
        f"{where}{bad[0].describe()}{more}; the training diverged or the file is damaged, so adapterhub "
        "does not use it (retrain or re-export the adapter)",
        path=path,
        module=bad[0].name,
    )


def check_finite(files: _HasWeights) -> None:
    """Refuse an adapter whose weights file holds NaN or Infinity (`InvalidAdapterError`).

    ``files`` is an `AdapterFiles` (anything with a ``weights`` path).

    Reads every tensor once, one at a time; call it where a header-only read (catalog add) should also
    vouch for the values.
    """
    bad = scan_file(files.weights)
    if bad:
        _refuse(bad, str(files.weights))
