"""Merging resident adapters into the live weights, and the DoRA factors a load computes.

Everything is computed in fp32 from the resident factors and rounded once to each parameter's dtype;
the original tensors are copied first, so unmerging copies them back bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._layers import Layer


def dora_gm1(layer: Layer, w0: torch.Tensor, m: Any) -> torch.Tensor:
    """``m / ||W0 + s B A|| - 1`` per output feature, in fp32 (PEFT's DoRA forward)."""
    w0 = w0.detach().to(torch.float32)
    a = m.A.detach().to(w0.device, torch.float32).reshape(m.rank, -1)
    b = m.B.detach().to(w0.device, torch.float32).reshape(-1, m.rank)
    mag = m.magnitude.detach().to(w0.device, torch.float32).reshape(-1)
    delta = float(m.scale) * (b @ a)
    if layer.kind == "conv1d":
        norm = torch.linalg.norm(w0.T + delta, dim=1)
    elif layer.kind == "embedding":
        norm = torch.linalg.norm(w0 + delta, dim=0)
    elif layer.kind == "conv":
        norm = torch.linalg.norm((w0 + delta.reshape(w0.shape)).reshape(w0.shape[0], -1), dim=1)
    else:
        norm = torch.linalg.norm(w0 + delta, dim=1)
    return mag / norm - 1


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
        for leaf, t in layer.replacements.get(s, {}).items():
            new[leaf] = t.to(torch.float32)
    lora = [sl for sl in slots if sl in layer.lora_slots]
    if lora:
        w = new.get("weight", layer.weight.detach().to(torch.float32))
        for sl in lora:
            w = w + slots[sl] * layer.lora_delta(sl)
            if layer.gm1 is not None:
                g = 1 + layer.gm1[sl].to(torch.float32)
                if layer.kind in ("conv1d", "embedding"):
                    w = w * g[None, :]
                else:
                    w = w * g.view(-1, *(1,) * (w.dim() - 1))
        new["weight"] = w
        if layer.bias is not None and "bias" in written(layer, slots):
            bias: Any = mod.bias
            b = new.get("bias", bias.detach().to(torch.float32))
            for sl in lora:
                b = b + slots[sl] * layer.bias[sl].to(torch.float32)
            new["bias"] = b
    for leaf, value in new.items():
        live = getattr(mod, leaf)
        backups.append((live, live.detach().clone()))
        live.copy_(value.to(live.dtype))


def written(layer: Layer, slots: dict[int, float]) -> set[str]:
    """Parameter names of ``layer.module`` that merging ``slots`` writes."""
    out = {leaf for s in slots for leaf in layer.replacements.get(s, {})}
    lora = [s for s in slots if s in layer.lora_slots]
    if lora:
        out.add("weight")
        if layer.bias is not None and any(bool(layer.bias[s].any()) for s in lora):
            out.add("bias")
    return out
