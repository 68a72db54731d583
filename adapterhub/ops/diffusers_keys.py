"""kohya LoRA stems -> diffusers module paths, given the UNet's own tensor names.

kohya (sd-scripts) names a module by its path with every dot turned into an underscore
(``lora_unet_down_blocks_0_attentions_0_proj_in``), and underscores inside names
(``down_blocks``, ``proj_in``) make that irreversible without the model's key list. diffusers'
converter (``_convert_non_diffusers_lora_to_diffusers``) undoes it with hard-coded renames; here the
UNet's checkpoint keys decide, through the same matching validation uses (`keymap.map_keys`), so every
module must match exactly one UNet weight. No database here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from ..errors import InvalidAdapterError
from ..lora import LoraModule, LoraWeights
from .keymap import map_keys

__all__ = ["kohya_to_diffusers"]


def kohya_to_diffusers(weights: LoraWeights, unet_keys: Iterable[str]) -> LoraWeights:
    """The modules of a kohya UNet LoRA keyed ``unet.<module path>.weight``, as diffusers loads them."""
    if weights.format != "kohya":
        raise InvalidAdapterError(f"expected a kohya adapter, got {weights.format!r}")
    other = sorted(k for k in weights.modules if not k.startswith("lora_unet_"))
    if other:
        raise InvalidAdapterError(
            f"{other[0]}: text-encoder (or other non-UNet) modules cannot be mapped with a UNet's key list; "
            "adapterhub converts UNet LoRAs only"
        )
    keys = [k for k in unet_keys if k.endswith(".weight")]
    found = map_keys(list(weights.modules), keys)
    if found.unmatched:
        raise InvalidAdapterError(
            f"{found.unmatched[0]}"
            + (f" (and {len(found.unmatched) - 1} more)" if len(found.unmatched) > 1 else "")
            + " matches no weight of the UNet; check that the base is the UNet this LoRA was trained on"
        )
    if found.ambiguous:
        stem, hits = next(iter(found.ambiguous.items()))
        raise InvalidAdapterError(f"{stem} matches several UNet weights ({', '.join(hits[:3])})")
    modules: dict[str, LoraModule] = {}
    for stem, m in weights.modules.items():
        base_key = found.mapping[stem]
        key = base_key if base_key.startswith("unet.") else "unet." + base_key
        modules[key] = replace(m, key=key)
    return LoraWeights(
        modules=modules, format="diffusers", metadata=dict(weights.metadata), base_model=weights.base_model
    )
