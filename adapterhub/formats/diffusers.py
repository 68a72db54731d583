"""diffusers LoRA files: one ``.safetensors`` whose keys diffusers' ``load_lora_weights`` takes as they are.

That is the layout diffusers' own ``save_lora_weights`` writes and its converters
(``_convert_non_diffusers_lora_to_diffusers``, then ``convert_unet_state_dict_to_peft``) turn kohya
files into: ``unet.<module path with dots>.lora_A.weight`` ``(r, in[, k, k])`` and ``...lora_B.weight``
``(out, r[, 1, 1])``, ``text_encoder.`` / ``text_encoder_2.`` for the text encoders, no per-module alpha.
Without alphas diffusers builds its ``LoraConfig`` with ``lora_alpha = r`` (scale 1), so the writer folds
each module's scale into ``lora_B``: the update ``scale * B @ A`` is the same under every diffusers
version. A ``lora_adapter_metadata`` header (newer diffusers) with a plain ``lora_alpha`` is honoured.

`LoraWeights` read from such a file keep the component prefix in their keys
(``unet.down_blocks.0.attentions.0.proj_in.weight``); base matching strips it as a unique-suffix match.
kohya stems become these keys only with a base's key list (`adapterhub.ops.diffusers_keys`); the way
back (`to_kohya`) needs none.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import InvalidAdapterError
from ..lora import LoraModule, LoraWeights, lora_scale
from .peft import FLOAT_DTYPES, Problem, _raise
from .safetensors_header import SafetensorsHeader, group_by_suffix

__all__ = [
    "COMPONENTS",
    "is_diffusers_header",
    "load_diffusers_tensors",
    "parse_diffusers",
    "to_kohya",
    "write_diffusers",
]

#: component prefix in a diffusers pipeline -> kohya's prefix for it
COMPONENTS = {
    "unet.": "lora_unet_",
    "transformer.": "lora_transformer_",
    "text_encoder.": "lora_te1_",
    "text_encoder_2.": "lora_te2_",
}
_SUFFIXES = ((".lora_A.weight", "A"), (".lora_B.weight", "B"))
METADATA_KEY = "lora_adapter_metadata"


def _component(key: str) -> str | None:
    return next((c for c in COMPONENTS if key.startswith(c)), None)


def is_diffusers_header(header: SafetensorsHeader) -> bool:
    lora = [n for n in header.tensors if n.endswith((".lora_A.weight", ".lora_B.weight"))]
    return bool(lora) and all(_component(n) is not None for n in lora)


def _alphas(header: SafetensorsHeader) -> dict[str, float]:
    """``component prefix -> lora_alpha`` from a ``lora_adapter_metadata`` header, when it gives one."""
    raw = header.metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        raise InvalidAdapterError(
            f"{header.path}: {METADATA_KEY} is not valid JSON", path=header.path
        ) from None
    out: dict[str, float] = {}
    for comp in COMPONENTS:
        for k in ("rank_pattern", "alpha_pattern", "use_dora", "use_rslora"):
            if meta.get(comp + k):
                raise InvalidAdapterError(
                    f"{header.path}: {METADATA_KEY} sets {comp}{k}, which adapterhub does not read from diffusers "
                    "files yet; convert the adapter with PEFT first",
                    path=header.path,
                )
        alpha = meta.get(comp + "lora_alpha")
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            out[comp] = float(alpha)
    return out


def parse_diffusers(header: SafetensorsHeader, *, problem: Problem | None = None) -> LoraWeights:
    report = problem or _raise(header.path)
    parts, unexplained = group_by_suffix(header, _SUFFIXES)
    alphas = _alphas(header)
    modules: dict[str, LoraModule] = {}
    for module, got in sorted(parts.items()):
        a, b = got.get("A"), got.get("B")
        if a is None or b is None:
            report(f"module {module} has no {'lora_A' if a is None else 'lora_B'} factor", module)
            continue
        if len(a.shape) < 2 or len(b.shape) < 2 or 0 in a.shape or 0 in b.shape or b.shape[1] != a.shape[0]:
            report(
                f"module {module}: factors {list(a.shape)} / {list(b.shape)} do not form a LoRA pair", module
            )
            continue
        if tuple(b.shape[2:]) != (1,) * (len(b.shape) - 2):
            report(f"module {module}: lora_B must be a 1x1 kernel, got {list(b.shape)}", module)
            continue
        if a.dtype not in FLOAT_DTYPES or b.dtype not in FLOAT_DTYPES:
            report(f"module {module}: LoRA factors must be floating point, got {a.dtype}", module)
            continue
        rank = int(a.shape[0])
        alpha = alphas.get(_component(module) or "", float(rank))
        if not math.isfinite(alpha) or alpha <= 0:
            report(f"module {module}: lora_alpha {alpha} is not a positive number", module)
            continue
        modules[module + ".weight"] = LoraModule(
            key=module + ".weight",
            kind="linear" if len(a.shape) == 2 else "conv",
            rank=rank,
            alpha=alpha,
            scale=lora_scale(rank, alpha),
            a_shape=tuple(int(d) for d in a.shape),
            b_shape=tuple(int(d) for d in b.shape),
            dtype=a.dtype,
        )
    if not modules:
        report("holds no LoRA tensors (no unet.*.lora_A / lora_B keys)", None)
    meta = {k: v for k, v in header.metadata.items() if k != METADATA_KEY}
    weights = LoraWeights(modules=modules, format="diffusers", metadata=meta)
    weights.unexplained = unexplained
    return weights


def load_diffusers_tensors(weights: LoraWeights, path: str | os.PathLike[str]) -> LoraWeights:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for m in weights.modules.values():
            m.A = f.get_tensor(m.module + ".lora_A.weight")
            m.B = f.get_tensor(m.module + ".lora_B.weight")
    return weights


def _refuse_unsupported(weights: LoraWeights, what: str) -> None:
    bad = [m.key for m in weights.modules.values() if m.kind == "embedding" or m.is_dora or m.bias_shape]
    if bad or weights.replacement_shapes:
        key = bad[0] if bad else next(iter(weights.replacement_shapes))
        raise InvalidAdapterError(
            f"{key}: {what} holds plain linear/conv LoRA only (no embedding LoRA, DoRA, lora_bias or "
            "modules_to_save); export this adapter in PEFT format instead"
        )


def write_diffusers(weights: LoraWeights, dest: str | os.PathLike[str]) -> Path:
    """Write ``weights`` (keys: diffusers module paths, with or without ``unet.``) as one file diffusers'
    ``load_lora_weights`` loads, each module's scale folded into ``lora_B``."""
    import torch
    from safetensors.torch import save_file

    if weights.format != "diffusers":
        raise InvalidAdapterError(
            f"a {weights.format} adapter is not keyed by diffusers module paths; only a diffusers LoRA, or a "
            "kohya UNet LoRA mapped with the UNet's keys (`export --format diffusers`), writes as diffusers"
        )
    _refuse_unsupported(weights, "a diffusers LoRA file")
    tensors: dict[str, Any] = {}
    for m in weights.modules.values():
        if not m.has_tensors():
            raise InvalidAdapterError(f"{m.key}: tensors were not loaded; cannot write")
        if "." not in m.module:
            raise InvalidAdapterError(
                f"{m.module}: a kohya stem, not a module path; map it against the UNet's keys first"
            )
        stem = m.module if _component(m.module) else "unet." + m.module
        assert m.A is not None and m.B is not None
        b = m.B
        if not math.isclose(m.scale, 1.0, rel_tol=1e-12, abs_tol=0.0):
            b = (m.B.to(torch.float32) * m.scale).to(
                torch.float32 if m.B.dtype != torch.float64 else m.B.dtype
            )
        tensors[stem + ".lora_A.weight"] = m.A.contiguous()
        tensors[stem + ".lora_B.weight"] = b.contiguous()
    if not tensors:
        raise InvalidAdapterError("cannot write an adapter with no LoRA modules")
    out = Path(dest)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out)
    return out


def to_kohya(weights: LoraWeights) -> LoraWeights:
    """The same modules keyed by kohya stems (``unet.down_blocks.0.x`` -> ``lora_unet_down_blocks_0_x``)."""
    from dataclasses import replace

    modules: dict[str, LoraModule] = {}
    for m in weights.modules.values():
        comp = _component(m.module) or "unet."
        path = m.module[len(comp) :] if m.module.startswith(comp) else m.module
        stem = COMPONENTS[comp] + path.replace(".", "_")
        modules[stem] = replace(m, key=stem)
    return LoraWeights(
        modules=modules, format="kohya", metadata=dict(weights.metadata), base_model=weights.base_model
    )
