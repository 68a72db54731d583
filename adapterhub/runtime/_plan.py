"""Check an adapter against a live model and plan where each of its tensors goes; hash its content.

The layout is built from the model itself (parameter names and shapes, GPT-2 ``Conv1D`` weights shown
in ``torch.nn`` orientation since the module class says how they are stored), and the adapter is
checked with `adapterhub.ops.validate.check_base`, then with what only a live model can tell: the
module each key lands on, and whether the runtime can adapt that kind of module.
"""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import IncompatibleAdapterError, InvalidOptionError
from ..lora import LoraModule, LoraWeights
from ..ops.validate import BaseLayout, Check, ValidationReport, check_base
from ._layers import LINEAR_KINDS, LayerKind, layer_kind, logical_shape, unadaptable_note

_KIND_FITS: dict[str, tuple[LayerKind, ...]] = {
    "linear": LINEAR_KINDS,
    "embedding": ("embedding",),
    "conv": ("conv",),
}


@dataclass
class ModulePlan:
    """One LoRA module of an adapter, placed on a module of the model."""

    module_name: str
    module: nn.Module
    kind: LayerKind
    lora: LoraModule


@dataclass
class ReplacementPlan:
    """Full replacement parameters (``modules_to_save``) for one leaf module of the model."""

    module_name: str
    module: nn.Module
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter name -> tensor


@dataclass
class LoadPlan:
    """Where an adapter's tensors go in a live model, and the report of checking it there."""

    report: ValidationReport
    loras: list[ModulePlan]
    replacements: list[ReplacementPlan]


def model_layout(model: nn.Module) -> BaseLayout:
    """A `BaseLayout` of the live model: every parameter (tied names too) in ``torch.nn`` orientation."""
    modules = dict(model.named_modules(remove_duplicate=False))
    shapes: dict[str, tuple[int, ...]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owner, _, leaf = pname.rpartition(".")
        mod = modules.get(owner)
        shapes[pname] = (
            logical_shape(mod, p) if mod is not None and leaf == "weight" else tuple(int(d) for d in p.shape)
        )
    cfg = getattr(model, "config", None)
    config: dict[str, Any] = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else {}
    name = str(config.get("_name_or_path") or type(model).__name__)
    # orientation is known from the module classes, so a neutral model_type: never a guess from names
    return BaseLayout(
        name=name,
        shapes=shapes,
        model_type="torch.nn",
        config=config,
        aliases=(type(model).__name__,),
    )


def plan_adapter(model: nn.Module, layout: BaseLayout, weights: LoraWeights, subject: str) -> LoadPlan:
    """Check ``weights`` against the live model; the report says what is wrong if anything is."""
    checks = list(check_base(weights, layout))
    mapping, _, _ = layout.match(list(weights.modules) + list(weights.replacement_shapes))
    modules = dict(model.named_modules(remove_duplicate=False))
    params = dict(model.named_parameters(remove_duplicate=False))
    loras: list[ModulePlan] = []
    replacements: dict[str, ReplacementPlan] = {}

    def error(check: str, message: str, module: str | None = None) -> None:
        checks.append(Check("error", check, message, module))

    if not weights.modules and not weights.replacement_shapes:
        error(
            "runtime.targets",
            f"{subject} holds no LoRA modules and no replacement weights: it would change nothing",
        )
    targeted: dict[str, str] = {}
    for key, m in weights.modules.items():
        bkey = mapping.get(key)
        if bkey is None:
            continue
        owner, _, leaf = bkey.rpartition(".")
        mod = modules.get(owner)
        if mod is None or leaf != "weight":
            error(
                "runtime.module", f"{m.module}: {bkey} is not the weight of a module of this model", m.module
            )
            continue
        kind = layer_kind(mod)
        if kind is None or kind not in _KIND_FITS[m.kind]:
            what = type(mod).__name__
            error(
                "runtime.module",
                f"{m.module}: a {m.kind} LoRA cannot be applied to {owner} ({what}){unadaptable_note(mod)}; "
                "the runtime adapts "
                "nn.Linear, GPT-2 Conv1D, bitsandbytes Linear4bit/Linear8bitLt, nn.Embedding and nn.Conv1d/2d/3d",
                m.module,
            )
            continue
        if m.A is None or m.B is None:
            error(
                "runtime.tensors",
                f"{m.module}: tensors were not loaded (read the adapter with load=True)",
                m.module,
            )
            continue
        if kind == "conv":
            conv: Any = mod
            if conv.groups != 1 or conv.padding_mode != "zeros":
                error(
                    "runtime.module",
                    f"{m.module}: conv LoRA needs groups=1 and zero padding (the layer has groups={conv.groups}, "
                    f"padding_mode={conv.padding_mode!r})",
                    m.module,
                )
                continue
        if m.is_dora and m.magnitude is None:
            error("runtime.tensors", f"{m.module}: DoRA magnitude was not loaded", m.module)
            continue
        if owner in targeted:
            error("runtime.module", f"{m.module} and {targeted[owner]} both land on {owner}", m.module)
            continue
        targeted[owner] = m.module
        loras.append(ModulePlan(module_name=owner, module=mod, kind=kind, lora=m))
    for key in weights.replacement_shapes:
        bkey = mapping.get(key)
        if bkey is None:
            continue
        tensor = weights.replacements.get(key)
        if tensor is None:
            error("runtime.tensors", f"{key}: replacement tensor was not loaded (read with load=True)", key)
            continue
        owner, _, leaf = bkey.rpartition(".")
        mod = modules.get(owner)
        base = params.get(bkey)
        if mod is None or base is None:
            error("runtime.module", f"{key}: {bkey} is not a parameter of this model", key)
            continue
        if owner in targeted and any(p.module_name == owner and p.lora.is_dora for p in loras):
            error(
                "runtime.module",
                f"{owner}: DoRA and a replaced base weight on one module is not supported",
                owner,
            )
            continue
        rp = replacements.setdefault(owner, ReplacementPlan(module_name=owner, module=mod))
        t = tensor.detach()
        if layer_kind(mod) == "conv1d" and leaf == "weight" and tuple(t.shape) != tuple(base.shape):
            t = t.T  # saved in the module's own (in, out) layout normally; accept the nn layout too
        if tuple(t.shape) != tuple(base.shape):
            error("runtime.shape", f"{key}: replacement {list(t.shape)} for {bkey} {list(base.shape)}", key)
            continue
        rp.params[leaf] = t
    if not any(c.status == "error" for c in checks) and not loras and not replacements:
        error("runtime.targets", f"{subject} targets nothing in this model: loading it would change nothing")
    report = ValidationReport(subject=subject, checks=tuple(checks), base=layout.name)
    return LoadPlan(report=report, loras=loras, replacements=list(replacements.values()))


def check_plan(
    plan: LoadPlan, name: str, device: str | torch.device | None, model_device: torch.device
) -> None:
    """Refuse a plan whose report has errors (`IncompatibleAdapterError`, ``report`` attached), or whose
    layers are not all on ``model_device`` (and ``device``, when given) (`InvalidOptionError`)."""
    if not plan.report.ok:
        errors = plan.report.errors
        shown = "\n  ".join(c.message for c in errors[:10])
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise IncompatibleAdapterError(
            f"{name} does not fit this model; nothing was loaded:\n  {shown}{more}", report=plan.report
        )
    devices = {next(iter(p.module.parameters())).device for p in plan.loras} | {
        next(iter(r.module.parameters())).device for r in plan.replacements
    }
    if device is not None and any(d != torch.device(device) for d in devices):
        raise InvalidOptionError(
            f"device {str(device)!r}: the layers {name} targets are on {', '.join(sorted(map(str, devices)))}; "
            "factors must live where the layers compute (leave device out)"
        )
    if len(devices | {model_device}) > 1:
        raise InvalidOptionError(
            f"{name} targets layers on several devices ({', '.join(sorted(map(str, devices)))}); the runtime "
            "serves a model on one device"
        )


def plan_tensors(plan: LoadPlan) -> list[torch.Tensor]:
    """The factor tensors a plan places (A, B, bias, DoRA magnitude of every target), each once."""
    return list({id(t): t for p in plan.loras for t in p.lora.tensors().values()}.values())


def _digest(t: torch.Tensor | None) -> bytes:
    if t is None:
        return b"-"
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # hashlib lets the GIL go here
    return h.digest()


def content_sha256(plan: LoadPlan) -> str:
    """sha256 of what the adapter does to this model: per target, its kind and scale, and the sha256 of
    each tensor's dtype, shape and bytes (hashed on several threads: a 7B-class adapter is 40+ MB)."""
    entries: list[tuple[bytes, list[torch.Tensor | None]]] = []
    for p in sorted(plan.loras, key=lambda p: p.module_name):
        m = p.lora
        label = f"{p.module_name}|{m.kind}|{m.rank}|{float(m.scale)!r}|".encode()
        entries.append((label, [m.A, m.B, m.bias, m.magnitude]))
    for r in sorted(plan.replacements, key=lambda r: r.module_name):
        entries += [(f"{r.module_name}.{leaf}=".encode(), [r.params[leaf]]) for leaf in sorted(r.params)]
    tensors = [t for _, ts in entries for t in ts]
    if sum(t.numel() * t.element_size() for t in tensors if t is not None) > 4 << 20:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            digests = iter(list(pool.map(_digest, tensors)))
    else:
        digests = iter([_digest(t) for t in tensors])
    h = hashlib.sha256(b"adapterhub.runtime/2\n")
    for label, ts in entries:
        h.update(label)
        for _ in ts:
            h.update(next(digests))
    return h.hexdigest()


def plan_bytes(plan: LoadPlan, dtype_of: Any) -> int:
    """Bytes the adapter occupies once resident (its own factors, without rank padding)."""
    n = 0
    for p in plan.loras:
        m = p.lora
        size = torch.empty((), dtype=dtype_of(p.module)).element_size()
        count = math.prod(m.a_shape) + math.prod(m.b_shape)
        count += sum(t.numel() for t in (m.bias, m.magnitude) if t is not None)
        n += count * size
    for r in plan.replacements:
        for leaf, t in r.params.items():
            n += t.numel() * getattr(r.module, leaf).element_size()
    return n
