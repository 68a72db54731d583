"""Pieces of `Runtime`: what it records per resident content and per merge, and how `Runtime.load`
reads what it is given into loaded `LoraWeights` and a name."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InvalidAdapterError, InvalidOptionError
from ..lora import LoraWeights

if TYPE_CHECKING:
    import torch

    from ._layers import Layer


@dataclass
class Content:
    sha256: str
    slot: int
    bytes: int
    device: str
    modules: int
    rank: int
    dora: bool
    replaces: bool
    layers: list[Layer] = field(default_factory=list)


@dataclass
class Merged:
    spec: dict[str, float]
    key: tuple[tuple[int, float], ...]
    backups: list[tuple[torch.Tensor, torch.Tensor]]  # (live parameter, original copy)


def read_weights(adapter: str | os.PathLike[str] | LoraWeights, name: str | None) -> tuple[LoraWeights, str]:
    """(weights with tensors, name): a PEFT folder or adapter file read with ``load=True`` (named by the
    folder or file), or `LoraWeights` whose tensors are all there (``name`` required)."""
    if isinstance(adapter, LoraWeights):
        if not name:
            raise InvalidOptionError("give name= when loading LoraWeights (there is no path to name it by)")
        missing = [m.key for m in adapter.modules.values() if not m.has_tensors()]
        missing += [k for k in adapter.replacement_shapes if adapter.replacements.get(k) is None]
        if missing:
            raise InvalidAdapterError(
                f"{name}: tensors of {missing[0]} were not loaded; read the adapter with "
                "read_adapter(path, load=True)",
                module=missing[0],
            )
        return adapter, name
    if isinstance(adapter, (str, os.PathLike)):
        from ..formats import read_adapter

        path = Path(adapter)
        weights = read_adapter(path, load=True)
        if not name:
            stem = path.parent if path.is_file() and path.name.startswith("adapter_") else path
            name = stem.name[: -len(".safetensors")] if stem.name.endswith(".safetensors") else stem.name
        return weights, name
    raise TypeError(f"load() takes a path or LoraWeights, got {type(adapter).__name__}")
