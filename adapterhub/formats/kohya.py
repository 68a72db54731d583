"""kohya / diffusers single-file LoRAs (Stable Diffusion style).

Keys are ``<stem>.lora_down.weight`` ``(r, in[, k, k])``, ``<stem>.lora_up.weight`` ``(out, r[, 1, 1])``
and a scalar ``<stem>.alpha`` (scale ``alpha / r``; without it the scale is 1), optionally
``<stem>.dora_scale``. Stems are module paths with dots turned into underscores behind a
``lora_unet_`` / ``lora_te[12]_`` prefix, so they stay stems until matched against a base's keys.
The safetensors ``__metadata__`` (``ss_*``, ``modelspec.*``) is kept as the adapter's metadata.

LyCORIS files (sd-scripts with ``--network_module lycoris.kohya``) use the same stems with LoHa
(``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``, ``hada_t1``, ``hada_t2``) or LoKr
(``lokr_w1[_a|_b]``, ``lokr_w2[_a|_b]``, ``lokr_t2``) tensors; they are read as exact LoRA factors
(`adapterhub.formats.lycoris`).
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import Any

from ..errors import InvalidAdapterError
from ..lora import LoraModule, LoraWeights, lora_scale
from .lycoris import SUFFIXES as LYCORIS_SUFFIXES
from .lycoris import kohya_lycoris_module, lycoris_factors
from .peft import FLOAT_DTYPES, Problem, _raise
from .peft_config import MAX_BASE_NAME_CHARS
from .safetensors_header import SafetensorsHeader, TensorInfo, group_by_suffix, read_header

_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_down.weight", "A"),
    (".lora_up.weight", "B"),
    (".alpha", "alpha"),
    (".dora_scale", "magnitude"),
    *LYCORIS_SUFFIXES,
)

_SCALAR_FORMATS = {"F32": "<f", "F64": "<d", "F16": "<e", "I64": "<q", "I32": "<i"}


_LYCORIS_MARKS = (".hada_w1_a", ".lokr_w1", ".lokr_w1_a")


def is_kohya_header(header: SafetensorsHeader) -> bool:
    return any(
        name.endswith((".lora_down.weight", ".lora_up.weight", *_LYCORIS_MARKS)) for name in header.tensors
    )


def is_lycoris_header(header: SafetensorsHeader) -> bool:
    """Whether the file holds LoHa / LoKr tensors (in PEFT's or LyCORIS's layout)."""
    return any(name.endswith(_LYCORIS_MARKS) for name in header.tensors)


def _lycoris(
    stem: str, got: dict[str, TensorInfo], header: SafetensorsHeader, report: Problem
) -> LoraModule | None:
    """A LoHa / LoKr module of a LyCORIS file, or None (reported)."""
    odd = next((t for r, t in got.items() if r != "alpha" and t.dtype not in FLOAT_DTYPES), None)
    if odd is not None:
        report(f"module {stem}: {odd.name} is stored as {odd.dtype}, not floating point", stem)
        return None
    if "magnitude" in got:
        report(
            f"module {stem}: LyCORIS weight decomposition (dora_scale) on LoHa / LoKr is not supported; "
            "adapterhub refuses the adapter rather than drop it",
            stem,
        )
        return None
    alpha = _read_scalar(header.path, header, got["alpha"]) if "alpha" in got else None
    if alpha is not None and (not math.isfinite(alpha) or alpha < 0):
        report(f"module {stem}: alpha is {alpha}; it must be a positive number", stem)
        return None
    parts = {role: t for role, t in got.items() if role != "alpha"}
    # LyCORIS reads an alpha of 0 (or none) as "alpha = rank": scale 1
    m = kohya_lycoris_module(stem, parts, alpha or None)
    if isinstance(m, str):
        report(f"module {stem}: {m}", stem)
        return None
    return m


def _read_scalar(path: str, header: SafetensorsHeader, info: TensorInfo) -> float:
    """Read a one-element tensor (kohya's alpha) straight from the file, without torch."""
    if info.numel != 1:
        raise InvalidAdapterError(f"{path}: {info.name} should hold one number, has shape {list(info.shape)}")
    with open(path, "rb") as f:
        f.seek(header.data_start + info.begin)
        raw = f.read(info.nbytes)
    if info.dtype == "BF16":
        return float(struct.unpack("<f", b"\x00\x00" + raw)[0])
    fmt = _SCALAR_FORMATS.get(info.dtype)
    if fmt is None:
        raise InvalidAdapterError(f"{path}: {info.name} has dtype {info.dtype}, not a number type")
    return float(struct.unpack(fmt, raw)[0])


def parse_kohya(header: SafetensorsHeader, *, problem: Problem | None = None) -> LoraWeights:
    report = problem or _raise(header.path)
    parts, unexplained = group_by_suffix(header, _SUFFIXES)
    modules: dict[str, LoraModule] = {}
    for stem, got in sorted(parts.items()):
        if any(role.startswith(("hada_", "lokr_")) for role in got):
            extra = sorted(n for n in unexplained if n.startswith(stem + "."))
            if "A" in got or "B" in got or extra:
                what = extra[0] if extra else "lora_down / lora_up"
                report(f"module {stem}: {what} beside LoHa / LoKr tensors; adapterhub cannot use it", stem)
                continue
            lm = _lycoris(stem, got, header, report)
            if lm is not None:
                modules[stem] = lm
            continue
        a, b = got.get("A"), got.get("B")
        if a is None or b is None:
            report(f"module {stem} has no {'lora_down' if a is None else 'lora_up'} factor", stem)
            continue
        if len(a.shape) < 2 or len(b.shape) < 2 or 0 in a.shape or 0 in b.shape:
            report(
                f"module {stem}: factors must be non-empty and at least 2-D, got {list(a.shape)} / {list(b.shape)}",
                stem,
            )
            continue
        rank = a.shape[0]
        if b.shape[1] != rank:
            report(f"module {stem}: lora_down has rank {rank} but lora_up has rank {b.shape[1]}", stem)
            continue
        if tuple(b.shape[2:]) != (1,) * (len(b.shape) - 2):
            report(f"module {stem}: lora_up must be a 1x1 kernel, got {list(b.shape)}", stem)
            continue
        odd = next(
            (t for t in (a, b, got.get("magnitude")) if t is not None and t.dtype not in FLOAT_DTYPES), None
        )
        if odd is not None:
            report(
                f"module {stem}: {odd.name} is stored as {odd.dtype}; LoRA tensors must be floating point "
                f"({', '.join(sorted(FLOAT_DTYPES))})",
                stem,
            )
            continue
        alpha = _read_scalar(header.path, header, got["alpha"]) if "alpha" in got else float(rank)
        if not math.isfinite(alpha):
            report(f"module {stem}: alpha is {alpha}, not a finite number", stem)
            continue
        if alpha < 0:
            report(f"module {stem}: alpha is {alpha}; it must be positive (the scale is alpha / rank)", stem)
            continue
        if alpha == 0:  # sd-scripts (kohya) reads an alpha of 0 as "alpha = rank": scale 1
            alpha = float(rank)
        extra = sorted(n for n in unexplained if n.startswith(stem + "."))
        if extra:  # e.g. lora_mid (LoCon's Tucker core): dropping it would silently change the update
            report(
                f"module {stem}: tensor {extra[0]} is not a plain LoRA factor; adapterhub cannot use it", stem
            )
            continue
        mag = got.get("magnitude")
        modules[stem] = LoraModule(
            key=stem,
            kind="linear" if len(a.shape) == 2 else "conv",
            rank=rank,
            alpha=alpha,
            scale=lora_scale(rank, alpha),
            a_shape=a.shape,
            b_shape=b.shape,
            dtype=a.dtype,
            magnitude_shape=mag.shape if mag is not None else None,
        )
    if not modules:
        report("holds no LoRA tensors (no lora_down/lora_up, LoHa or LoKr keys)", None)
    meta = dict(header.metadata)
    base = (
        meta.get("ss_sd_model_name")
        or meta.get("modelspec.architecture")
        or meta.get("ss_base_model_version")
    )
    if base is not None and len(base) > MAX_BASE_NAME_CHARS:
        report(
            f"the base model name in the file's metadata is {len(base)} characters long, over the "
            f"{MAX_BASE_NAME_CHARS}-character limit; fix ss_sd_model_name / modelspec.architecture",
            None,
        )
        base = None
    weights = LoraWeights(modules=modules, format="kohya", config={}, metadata=meta, base_model=base)
    weights.unexplained = unexplained
    return weights


def load_kohya_tensors(weights: LoraWeights, path: str | os.PathLike[str]) -> LoraWeights:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for stem, m in weights.modules.items():
            if m.variant in ("loha", "lokr"):
                m.A, m.B = lycoris_factors(m, f.get_tensor)
                continue
            m.A = f.get_tensor(stem + ".lora_down.weight")
            m.B = f.get_tensor(stem + ".lora_up.weight")
            if m.magnitude_shape is not None:
                m.magnitude = f.get_tensor(stem + ".dora_scale")
    return weights


def read_kohya(
    path: str | os.PathLike[str], *, load_tensors: bool = False, problem: Problem | None = None
) -> LoraWeights:
    header = read_header(path)
    weights = parse_kohya(header, problem=problem)
    if load_tensors:
        load_kohya_tensors(weights, path)
    return weights


def kohya_stem(module: str, prefix: str = "lora_unet_") -> str:
    """``down_blocks.0.attentions.0.proj_in`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    if "." not in module and module.startswith("lora_"):
        return module  # already a kohya stem
    return prefix + module.replace(".", "_")


def write_kohya(
    weights: LoraWeights,
    dest: str | os.PathLike[str],
    *,
    prefix: str = "lora_unet_",
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write one kohya-style ``.safetensors`` file (alpha chosen so that ``alpha / r`` is the scale)."""
    import torch
    from safetensors.torch import save_file

    bad = [
        m.key for m in weights.modules.values() if m.kind == "embedding" or m.is_dora or m.bias is not None
    ]
    if bad or weights.replacement_shapes:
        what = bad[0] if bad else next(iter(weights.replacement_shapes))
        raise InvalidAdapterError(
            f"{what}: kohya files hold plain linear/conv LoRA only (no embedding LoRA, DoRA, lora_bias or "
            "modules_to_save); export this adapter in PEFT format instead"
        )
    kasa = next((m.key for m in weights.modules.values() if m.needs_base), None)
    if kasa is not None:
        raise InvalidAdapterError(
            f"{kasa}: KaSA removes singular components of the base weight, which a kohya file cannot say; "
            "export it in PEFT format (or merge it into its base)"
        )
    tensors: dict[str, Any] = {}
    for m in weights.modules.values():
        if not m.has_tensors():
            raise InvalidAdapterError(f"{m.key}: tensors were not loaded; cannot write")
        stem = kohya_stem(m.module, prefix)
        tensors[stem + ".lora_down.weight"] = m.A.contiguous()  # type: ignore[union-attr]
        tensors[stem + ".lora_up.weight"] = m.B.contiguous()  # type: ignore[union-attr]
        tensors[stem + ".alpha"] = torch.tensor(m.scale * m.rank, dtype=torch.float32)
    meta = dict(weights.metadata if weights.format == "kohya" else {})
    meta.update(metadata or {})
    if weights.variants:  # LoHa / LoKr read from a LyCORIS file are written as the plain LoRA they equal
        meta["ss_network_module"] = "networks.lora"
        meta.pop("ss_network_args", None)
        meta.pop("ss_network_dim", None)
        meta.pop("ss_network_alpha", None)
    meta.setdefault("ss_network_module", "networks.lora")
    ranks = {m.rank for m in weights.modules.values()}
    if len(ranks) == 1:
        meta.setdefault("ss_network_dim", str(ranks.pop()))
    out = Path(dest)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out)
    return out
