"""Adapters whose update depends on the base weight's values (KaSA), made base-independent.

KaSA removes the ``r`` smallest singular components of each adapted base weight when PEFT loads it, so
its update is only known once the base is. `resolve_with_base` reads those base tensors from a
checkpoint folder and returns ordinary LoRA factors for the whole update (`adapterhub.lora.resolve_kasa`:
rank ``2r``, exact), which combine, resize, export and any runtime can then use as they use LoRA.
"""

from __future__ import annotations

import os
from dataclasses import replace

from ..errors import IncompatibleAdapterError
from ..formats.checkpoint import read_checkpoint
from ..lora import LoraWeights, resolve_kasa
from .keymap import describe_problems, map_keys

__all__ = ["resolve_with_base"]


def resolve_with_base(weights: LoraWeights, base: str | os.PathLike[str]) -> LoraWeights:
    """``weights`` with every base-dependent (KaSA) module resolved against the checkpoint folder
    ``base``; the same object when no module needs the base. Tensors must be loaded."""
    if not weights.needs_base:
        return weights
    from safetensors import safe_open

    ckpt = read_checkpoint(base)
    todo = [m for m in weights.modules.values() if m.needs_base]
    match = map_keys([m.key for m in todo], ckpt.tensors)
    if not match.ok:
        raise IncompatibleAdapterError(
            f"cannot resolve KaSA modules against {ckpt.path}: {describe_problems(match)}"
        )
    modules = dict(weights.modules)
    for m in todo:
        name = match.mapping[m.key]
        shard, info = ckpt.tensors[name]
        if tuple(info.shape) != tuple(m.delta_shape):
            raise IncompatibleAdapterError(
                f"{m.module}: the KaSA update has shape {list(m.delta_shape)} but {name} is {list(info.shape)}"
            )
        with safe_open(str(ckpt.path / shard), framework="pt") as f:
            modules[m.key] = resolve_kasa(m, f.get_tensor(name))
    return replace(weights, modules=modules)
