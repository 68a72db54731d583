"""Pieces of `Runtime`: what it records per resident content and per merge, and how `Runtime.load`
reads what it is given into loaded `LoraWeights` and a name."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidAdapterError, InvalidOptionError
from ..lora import LoraWeights
from .types import ResidentAdapter

if TYPE_CHECKING:
    import torch

    from ._layers import Layer
    from ._plan import LoadPlan


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

    def resident(self, name: str) -> ResidentAdapter:
        """``name`` bound to this content, as `Runtime.resident` shows it."""
        return ResidentAdapter(
            name=name,
            sha256=self.sha256,
            bytes=self.bytes,
            device=self.device,
            modules=self.modules,
            rank=self.rank,
            dora=self.dora,
        )


@dataclass
class Merged:
    spec: dict[str, float]
    key: tuple[tuple[int, float], ...]
    backups: list[tuple[torch.Tensor, torch.Tensor]]  # (live parameter, original copy)

    def restore(self) -> None:
        """Copy the original tensors back, bit for bit."""
        import torch

        with torch.no_grad():
            for live, orig in reversed(self.backups):
                live.copy_(orig)


def read_weights(
    adapter: str | os.PathLike[str] | LoraWeights, name: str | None
) -> tuple[LoraWeights, str, str | None]:
    """(weights with tensors, name, path): a PEFT folder or adapter file read with ``load=True`` (named
    by the folder or file; its values are checked by `upload`), or `LoraWeights` whose tensors are all
    there (``name`` required)."""
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
        return adapter, name, None
    if isinstance(adapter, (str, os.PathLike)):
        from ..formats import read_adapter

        path = Path(adapter)
        weights = read_adapter(path, load=True, check_values=False)
        if not name:
            stem = path.parent if path.is_file() and path.name.startswith("adapter_") else path
            name = stem.name[: -len(".safetensors")] if stem.name.endswith(".safetensors") else stem.name
        return weights, name, str(path)
    raise TypeError(f"load() takes a path or LoraWeights, got {type(adapter).__name__}")


def upload(
    tensors: list[torch.Tensor], device: torch.device, weights: LoraWeights, path: str | None
) -> dict[int, torch.Tensor]:
    """Put ``tensors`` on ``device`` and refuse NaN / Inf values (`InvalidAdapterError`, nothing placed).

    On a GPU the tensors of one dtype travel as one pinned buffer in one copy, and are checked there by
    one kernel (a pageable copy per tensor, and a CPU scan of every value, cost more than reading the
    file). Returns ``id(tensor) -> its copy on the device``; empty on the CPU, where nothing moves.
    """
    import torch

    from ..formats.values import refuse_non_finite

    if device.type != "cuda":
        refuse_non_finite(weights, path=path)
        return {}
    out: dict[int, torch.Tensor] = {}
    flags = []
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        if t.device == device:
            out[id(t)] = t
            if t.is_floating_point():
                flags.append(torch.isfinite(t).all())
        else:
            by_dtype.setdefault(t.dtype, []).append(t)
    for dtype, ts in by_dtype.items():
        sizes = [t.numel() for t in ts]
        buf = torch.empty(sum(sizes), dtype=dtype, pin_memory=True)
        torch.cat([t.detach().reshape(-1) for t in ts], out=buf)
        flat = buf.to(device, non_blocking=True)
        if flat.is_floating_point():
            flags.append(torch.isfinite(flat).all())
        for t, part in zip(ts, flat.split(sizes), strict=True):
            out[id(t)] = part.view(t.shape)
    if flags and not bool(torch.stack(flags).all()):
        refuse_non_finite(weights, path=path)  # names the tensors (slow path, only when refusing)
    return out


def keyed_upload(
    plan: LoadPlan, weights: LoraWeights, path: str | None, device: torch.device, sha256: str | None
) -> tuple[str, dict[int, torch.Tensor]]:
    """(content key, `upload` of the plan's tensors): without a known ``sha256`` the key is hashed on
    other threads while the tensors travel."""
    from concurrent.futures import ThreadPoolExecutor

    from ._plan import content_sha256, plan_tensors

    if sha256 is not None:
        return sha256, upload(plan_tensors(plan), device, weights, path)
    with ThreadPoolExecutor(max_workers=1) as hashing:
        key = hashing.submit(content_sha256, plan)
        on_device = upload(plan_tensors(plan), device, weights, path)
        return key.result(), on_device


def on_device_module(m: Any, on_device: dict[int, torch.Tensor]) -> Any:
    """``m`` (a `LoraModule`) with its tensors swapped for their `upload` copies."""
    return m.with_tensors(**{r: on_device.get(id(t), t) for r, t in m.tensors().items()}) if on_device else m


def resolve_live(model: Any, weights: LoraWeights, *, merged: bool) -> LoraWeights:
    """``weights`` as the live model can apply them: every KaSA module made base-independent from the
    model's own weight (`adapterhub.ops.resolve_with`: its update on that weight, as exact LoRA factors),
    and every LoHa / LoKr update stored flat for a conv weight viewed as the conv LoRA it equals
    (`adapterhub.lora.conv_view`); the same object when neither applies. KaSA needs the base's own
    weights: refused while a merge is in."""
    from dataclasses import replace

    import torch

    from ..errors import IncompatibleAdapterError
    from ..lora import conv_view, flat_conv_fits
    from ..ops import resolve_with
    from ..ops.keymap import map_keys
    from ._layers import layer_kind

    if not weights.needs_base and all(m.variant == "lora" for m in weights.modules.values()):
        return weights  # plain LoRA (the common case): nothing to resolve or view
    params = dict(model.named_parameters())
    match = map_keys(list(weights.modules), params)
    flat = {
        k: conv_view(m, tuple(params[match.mapping[k]].shape))
        for k, m in weights.modules.items()
        if k in match.mapping
        and params[match.mapping[k]].dim() > 2
        and flat_conv_fits(m, tuple(params[match.mapping[k]].shape))
    }
    if flat:
        weights = replace(weights, modules={**weights.modules, **flat})
    if not weights.needs_base:
        return weights
    if merged:
        raise InvalidOptionError("a KaSA adapter is resolved from the base weights: call rt.unmerge() first")
    keys = [k for k, m in weights.modules.items() if m.needs_base]
    missing = next((k for k in keys if k not in match.mapping), None)
    if missing is not None:
        raise IncompatibleAdapterError(f"KaSA module {missing} matches no weight of this model")

    def weight_of(key: str) -> torch.Tensor:
        name = match.mapping[key]
        w = params[name]
        if type(w).__name__ in ("Params4bit", "Int8Params"):
            raise IncompatibleAdapterError(
                f"{key}: KaSA on a quantized (bitsandbytes) layer is not supported; load the base in full "
                "precision"
            )
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        t = w.detach().to(torch.float32)
        return t.T if layer_kind(owner) == "conv1d" else t

    return resolve_with(weights, weight_of)
