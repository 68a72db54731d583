"""Adapters whose update depends on the base weight's values (KaSA), made base-independent.

KaSA removes the ``r`` smallest singular components of each adapted base weight when PEFT loads it, so
its update is only known once the base is. `resolve_with_base` reads those base tensors from a
checkpoint folder, `resolve_with` takes them from anywhere (a live model's parameters, say), and both
return ordinary LoRA factors for the whole update (`adapterhub.lora.resolve_kasa`: rank ``2r``, exact),
which combine, resize, export and any runtime then use as they use LoRA.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from ..errors import IncompatibleAdapterError
from ..formats.checkpoint import read_checkpoint
from ..lora import LoraWeights, resolve_kasa
from .keymap import describe_problems, map_keys

if TYPE_CHECKING:
    import torch

__all__ = ["resolve_with", "resolve_with_base"]


def resolve_with(weights: LoraWeights, weight_of: Callable[[str], torch.Tensor]) -> LoraWeights:
    """``weights`` with every base-dependent (KaSA) module resolved with ``weight_of(module key)``, the
    base weight in ``(out, in)`` layout; the same object when no module needs the base. Tensors must be
    loaded. Raises `IncompatibleAdapterError` when a base weight does not fit."""
    if not weights.needs_base:
        return weights
    modules = dict(weights.modules)
    for key, m in weights.modules.items():
        if not m.needs_base:
            continue
        w0 = weight_of(key)
        if tuple(w0.shape) != tuple(m.delta_shape):
            raise IncompatibleAdapterError(
                f"{m.module}: the KaSA update has shape {list(m.delta_shape)} but the base weight is "
                f"{list(w0.shape)}"
            )
        try:
            modules[key] = resolve_kasa(m, w0)
        except ValueError as exc:
            raise IncompatibleAdapterError(str(exc)) from None
    return replace(weights, modules=modules)


def resolve_with_base(weights: LoraWeights, base: str | os.PathLike[str]) -> LoraWeights:
    """`resolve_with` the tensors of the checkpoint folder ``base`` (matched as merge matches keys)."""
    if not weights.needs_base:
        return weights
    from safetensors import safe_open

    ckpt = read_checkpoint(base)
    match = map_keys([k for k, m in weights.modules.items() if m.needs_base], ckpt.tensors)
    if not match.ok:
        raise IncompatibleAdapterError(
            f"cannot resolve KaSA modules against {ckpt.path}: {describe_problems(match)}"
        )

    def weight_of(key: str) -> torch.Tensor:
        name = match.mapping[key]
        shard, _ = ckpt.tensors[name]
        with safe_open(str(ckpt.path / shard), framework="pt") as f:
            return f.get_tensor(name)

    return resolve_with(weights, weight_of)
