"""Merging resident adapters into the live weights, and the DoRA factors a load computes.

Everything is computed in fp32 from the resident factors and rounded once to each parameter's dtype;
the original tensors are copied first, so unmerging copies them back bit for bit. The layout of each
kind's weight (GPT-2 ``Conv1D`` stored ``(in, out)``, an embedding's ``(num, dim)``) is its layer's
business (`Layer.lora_delta` and the layer's `_base` strategy).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import IncompatibleAdapterError
from ._layers import Layer
from ._variants import Dora


def merge_into(
    model: nn.Module, layers: list[Layer], slots: dict[int, float]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fold ``slots`` into ``layers``' parameters after checking everything (`IncompatibleAdapterError`,
    nothing written): the ``(live tensor, original copy)`` backups `Runtime.unmerge` copies back."""
    refusal = merge_refusal(layers)
    if refusal:
        raise IncompatibleAdapterError(refusal)
    problems = merge_problems(model, layers, slots)
    if problems:
        raise IncompatibleAdapterError(
            "cannot merge; nothing was changed:\n  " + "\n  ".join(sorted(set(problems)))
        )
    backups: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        try:
            for layer in layers:
                merge_layer(layer, slots, backups)
        except BaseException:  # out of memory, say: put back what was written
            for live, orig in reversed(backups):
                live.copy_(orig)
            raise
    return backups


def dora_gm1(layer: Layer, w0: torch.Tensor, m: Any) -> torch.Tensor:
    """``m / ||W0 + s B A|| - 1`` per output feature, in fp32 (PEFT's DoRA forward); ``w0`` the fp32 base
    weight in the module's layout, ``m`` the `LoraModule`."""
    a = m.A.detach().to(w0.device, torch.float32).reshape(m.rank, -1)
    b = m.B.detach().to(w0.device, torch.float32).reshape(-1, m.rank)
    delta = layer.base.from_flat(float(m.scale) * (b @ a))
    return Dora.gm1(layer.base.norms(w0 + delta), m.magnitude)


def merge_refusal(layers: list[Layer]) -> str | None:
    """One line saying why these layers cannot take a merge at all (a quantized base), or None."""
    refused = [layer for layer in layers if layer.base.unmergeable]
    if not refused:
        return None
    first = refused[0]
    more = f" (and {len(refused) - 1} more layers)" if len(refused) > 1 else ""
    return f"cannot merge: {first.name}{more} {first.base.unmergeable}"


def merge_problems(model: nn.Module, layers: list[Layer], slots: dict[int, float]) -> list[str]:
    """Why merging ``slots`` into ``layers`` would be wrong (checked before anything is written)."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    problems: list[str] = []
    for layer in layers:
        for leaf in written(layer, slots):
            t = getattr(layer.module, leaf, None)
            names = owners.get(id(t), []) if isinstance(t, torch.Tensor) else []
            if len(names) > 1:
                problems.append(
                    f"{names[0]} is tied to {', '.join(names[1:])}; merging into it would change those too "
                    "(activate it instead, or untie the weights)"
                )
            if leaf == "bias" and not isinstance(t, torch.Tensor):
                problems.append(f"{layer.name} has a lora_bias but the layer has no bias to merge it into")
    return problems


def merge_layer(
    layer: Layer, slots: dict[int, float], backups: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Write the fp32 fold of ``slots`` into the layer's parameters (rounded once), backing each up first."""
    mod = layer.module
    new: dict[str, torch.Tensor] = {}
    for s in slots:
        for leaf, t in layer.save.params.get(s, {}).items():
            new[leaf] = t.to(torch.float32)
    lora = [sl for sl in slots if sl in layer.lora_slots]
    if lora:
        w = new.get("weight", layer.weight.detach().to(torch.float32))
        for sl in lora:
            w = w + slots[sl] * layer.lora_delta(sl)
            if layer.dora is not None:
                w = layer.base.scale(w, layer.dora.g(sl))
        new["weight"] = w
        if layer.bias is not None and "bias" in written(layer, slots):
            bias: Any = mod.bias
            new["bias"] = layer.bias.merged_bias(new.get("bias", bias), {sl: slots[sl] for sl in lora})
    for leaf, value in new.items():
        live = getattr(mod, leaf)
        backups.append((live, live.detach().clone()))
        live.copy_(value.to(live.dtype))


def written(layer: Layer, slots: dict[int, float]) -> set[str]:
    """Parameter names of ``layer.module`` that merging ``slots`` writes."""
    out = {leaf for s in slots for leaf in layer.save.params.get(s, {})}
    lora = [s for s in slots if s in layer.lora_slots]
    if lora:
        out.add("weight")
        if layer.bias is not None and layer.bias.used_by(lora):
            out.add("bias")
    return out
