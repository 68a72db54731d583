"""PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

Reading fills `LoraWeights` from the config and the safetensors header; tensor data is read only when
asked for. Writing produces a folder that ``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InvalidAdapterError, InvalidConfigError
from ..lora import PEFT_PREFIX, LoraModule, LoraWeights, lora_scale, pattern_key
from .lycoris import lycoris_factors
from .peft_config import read_config, target_selects, validate_config
from .peft_variants import bd_side, expand_blocks, kasa_problem
from .safetensors_header import SafetensorsHeader, read_header

__all__ = [
    "CONFIG_NAME",
    "PICKLE_NAME",
    "WEIGHTS_NAME",
    "derive_config",
    "load_peft_tensors",
    "parse_peft",
    "peft_state_dict",
    "read_config",
    "read_peft",
    "split_key",
    "validate_config",
    "write_peft",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

#: key suffixes of the tensors PEFT saves for a LoRA module, and the role each plays
_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_B.bias", "bias"),
    (".lora_embedding_A", "emb_A"),
    (".lora_embedding_B", "emb_B"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
    (".base_layer.weight", "base_layer"),
    (".lora_diag", "diag"),
)

Problem = Callable[[str, "str | None"], None]


def _raise(path: str) -> Problem:
    def report(message: str, module: str | None = None) -> None:
        raise InvalidAdapterError(f"{path}: {message}", path=path, module=module)

    return report


def split_key(name: str) -> tuple[str, str] | None:
    """``base_model.model.x.q_proj.lora_A.weight`` -> (``x.q_proj``, ``A``)."""
    stem = name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name
    for suffix, role in _SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)], role
    return None


#: PEFT's default rank when a config has no ``r``
PEFT_DEFAULT_R = 8
#: dtypes LoRA tensors may have (PEFT's layers are float; integers would be cast or refused)
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


def _not_loaded_by_peft(
    config: dict[str, Any], module: str, kind: str, has_magnitude: bool, has_bias: bool
) -> str | None:
    """Why PEFT would load this module's tensors differently from what they say, or None."""
    selected = target_selects(config, module, kind=kind)
    if selected is False:

        def shown(key: str) -> str:
            text = repr(config.get(key))
            return f"{key}={text if len(text) <= 120 else text[:117] + '...'}"

        return (
            f"the weights adapt it but the config's {shown('target_modules')}"
            + (f" / {shown('exclude_modules')}" if config.get("exclude_modules") else "")
            + (f" / {shown('layers_to_transform')}" if config.get("layers_to_transform") is not None else "")
            + " does not select it, so PEFT would load the adapter without it; fix target_modules in "
            "adapter_config.json"
        )
    use_dora = bool(config.get("use_dora"))
    if use_dora and not has_magnitude:
        return (
            "use_dora is true but there is no lora_magnitude_vector for it; PEFT would apply DoRA with a "
            "magnitude taken from the base weight, which is not this adapter's update"
        )
    if has_magnitude and not use_dora:
        return (
            "has a DoRA magnitude (lora_magnitude_vector) but use_dora is false, so PEFT would ignore it; set "
            "use_dora to true if the adapter was trained with DoRA"
        )
    if has_bias and not config.get("lora_bias"):
        return (
            "has a lora_B bias but lora_bias is false, so PEFT would ignore it; set lora_bias to true if the "
            "adapter was trained with it"
        )
    return None


def _matches_modules_to_save(module: str, modules_to_save: list[str]) -> bool:
    return any(module == m or module.endswith("." + m) for m in modules_to_save)


def parse_peft(
    config: dict[str, Any],
    header: SafetensorsHeader,
    *,
    problem: Problem | None = None,
    config_path: str | None = None,
) -> LoraWeights:
    """Build metadata-only `LoraWeights` from a validated config and a checked header.

    Beyond the factors' shapes, the weights are checked against what PEFT would do with the config:
    every module must be one PEFT adapts (``target_modules`` / ``exclude_modules`` /
    ``layers_to_transform``), DoRA magnitudes and ``lora_B`` biases must agree with ``use_dora`` and
    ``lora_bias``, and factors must be floating point; otherwise PEFT would load a different adapter.
    """
    report = problem or _raise(header.path)
    r_default = int(config.get("r", PEFT_DEFAULT_R))
    alpha_default = float(config.get("lora_alpha", 8))
    use_rslora = bool(config.get("use_rslora", False))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules_to_save = list(config.get("modules_to_save") or [])

    parts: dict[str, dict[str, Any]] = {}
    replacement_shapes: dict[str, tuple[int, ...]] = {}
    replacement_names: dict[str, str] = {}
    unexplained: list[str] = []
    for name, info in header.tensors.items():
        split = split_key(name)
        if split is None:
            stem = name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name
            module = stem.rsplit(".", 1)[0]
            if modules_to_save and _matches_modules_to_save(module, modules_to_save):
                replacement_shapes[stem] = info.shape
                replacement_names[stem] = name
            else:
                unexplained.append(name)
            continue
        module, role = split
        if role == "base_layer":
            replacement_shapes[module + ".weight"] = info.shape
            replacement_names[module + ".weight"] = name
            continue
        parts.setdefault(module, {})[role] = info

    modules: dict[str, LoraModule] = {}
    for module, got in sorted(parts.items()):
        if "emb_A" in got or "emb_B" in got:
            ea, eb = got.get("emb_A"), got.get("emb_B")
            if ea is None or eb is None:
                report(f"module {module} has only one of lora_embedding_A / lora_embedding_B", module)
                continue
            a_shape, b_shape = tuple(reversed(eb.shape)), tuple(reversed(ea.shape))  # stored transposed
            kind = "embedding"
            dtype = ea.dtype
            fa, fb = ea, eb
        else:
            a, b = got.get("A"), got.get("B")
            if a is None or b is None:
                missing = "lora_A" if a is None else "lora_B"
                if a is None and b is None:
                    report(f"module {module} has a magnitude or bias but no LoRA factors", module)
                else:
                    report(f"module {module} has no {missing} factor", module)
                continue
            a_shape, b_shape, dtype = a.shape, b.shape, a.dtype
            fa, fb = a, b
            kind = "linear" if len(a_shape) == 2 else "conv"
        if len(a_shape) < 2 or len(b_shape) < 2:
            report(
                f"module {module}: factors must be at least 2-D, got A {list(a_shape)} and B {list(b_shape)}"
                " (an empty or 1-D tensor often comes from an unsharded ZeRO-3 save)",
                module,
            )
            continue
        if 0 in a_shape or 0 in b_shape:
            report(
                f"module {module}: empty factor A {list(a_shape)} / B {list(b_shape)}"
                " (unsharded ZeRO-3 saves write torch.Size([0]); gather the weights before saving)",
                module,
            )
            continue
        side = bd_side(config, module, kind, "magnitude" in got)
        if isinstance(side, str):
            report(f"module {module}: {side}", module)
            continue
        bd, nblocks = side
        stored_params = math.prod(a_shape) + math.prod(b_shape) if bd else None
        if bd is not None:
            rows = int(a_shape[0]) if bd == "A" else int(b_shape[0])
            if rows % nblocks:
                report(f"module {module}: {rows} rows do not split into {nblocks} blocks", module)
                continue
            if bd == "A":
                a_shape = (int(a_shape[0]), int(a_shape[1]) * nblocks)
            else:
                b_shape = (int(b_shape[0]), int(b_shape[1]) * nblocks)
        rank = int(a_shape[0])
        if int(b_shape[1]) != rank:
            report(f"module {module}: A has rank {rank} but B has rank {b_shape[1]}", module)
            continue
        if kind == "conv" and tuple(b_shape[2:]) != (1,) * (len(b_shape) - 2):
            report(f"module {module}: conv lora_B must be a 1x1 kernel, got {list(b_shape)}", module)
            continue
        rkey = pattern_key(rank_pattern, module)
        akey = pattern_key(alpha_pattern, module)
        cfg_rank = int(rank_pattern[rkey]) if rkey is not None else r_default
        alpha = float(alpha_pattern[akey]) if akey is not None else alpha_default
        if cfg_rank != rank and rkey is None and "r" not in config:
            cpath = config_path or CONFIG_NAME
            message = (
                f"(top level): 'r' is a required property here: without it PEFT uses r={PEFT_DEFAULT_R}, but "
                f"module {module} has rank {rank}; set r in adapter_config.json (the LoRA config schema is "
                "schemas/lora_config.schema.json)"
            )
            if problem is None:
                raise InvalidConfigError(f"{cpath}: {message}", path=cpath, key="r")
            report(message, module)
            continue
        if cfg_rank != rank:
            report(
                f"module {module}: the config says r={cfg_rank} but the tensors have rank {rank}"
                " (fix r / rank_pattern in adapter_config.json)",
                module,
            )
            continue
        bias = got.get("bias")
        mag = got.get("magnitude")
        odd = next(
            (
                (what, t.dtype)
                for what, t in (("A", fa), ("B", fb), ("bias", bias), ("magnitude", mag))
                if t is not None and t.dtype not in FLOAT_DTYPES
            ),
            None,
        )
        if odd is not None:
            report(
                f"module {module}: the {odd[0]} tensor is stored as {odd[1]}; LoRA tensors must be floating "
                f"point ({', '.join(sorted(FLOAT_DTYPES))})",
                module,
            )
            continue
        # PEFT's magnitude is (out,) for Linear, (1, out, 1, 1) for Conv2d, and (dim,) for Embedding
        # (one per column of the (num_embeddings, dim) weight)
        mag_len = int(a_shape[1]) if kind == "embedding" else int(b_shape[0])
        if mag is not None and (math.prod(mag.shape) != mag_len or max(mag.shape, default=1) != mag_len):
            what = "embedding dims" if kind == "embedding" else "outputs"
            report(
                f"module {module}: DoRA magnitude {list(mag.shape)} does not match {mag_len} {what}", module
            )
            continue
        why = _not_loaded_by_peft(config, module, kind, mag is not None, bias is not None)
        diag = got.get("diag")
        kasa = bool(config.get("kasa_config"))
        if why is None and kasa:
            why = kasa_problem(config, kind, rank, diag, mag is not None, bias is not None)
        elif why is None and diag is not None:
            why = "has a lora_diag (KaSA) but the config has no kasa_config, so PEFT would ignore it"
        if why:
            report(f"module {module}: {why}", module)
            continue
        if kasa:
            stored_params = math.prod(a_shape) + math.prod(b_shape) + rank
        modules[module + ".weight"] = LoraModule(
            key=module + ".weight",
            kind=kind,  # type: ignore[arg-type]
            rank=rank,
            alpha=alpha,
            scale=lora_scale(rank, alpha, use_rslora),
            a_shape=tuple(int(d) for d in a_shape),
            b_shape=tuple(int(d) for d in b_shape),
            dtype=dtype,
            bias_shape=tuple(bias.shape) if bias is not None else None,
            magnitude_shape=tuple(mag.shape) if mag is not None else None,
            variant="kasa" if kasa else ("bdlora" if bd else "lora"),
            stored_params=stored_params,
            base_svd_drop=rank if kasa else 0,
            recipe={"blocks": bd, "nblocks": nblocks} if bd else {},
        )
    bias_mode = config.get("bias", "none")
    trained_biases = [n for n in unexplained if n.endswith(".bias")]
    if bias_mode in ("all", "lora_only") and trained_biases:
        report(
            f"bias is {bias_mode!r} and the file holds trained base biases ({trained_biases[0]}"
            + (f" and {len(trained_biases) - 1} more" if len(trained_biases) > 1 else "")
            + "), which PEFT loads into the base model; adapterhub cannot apply them yet, so it refuses "
            "the adapter rather than drop them",
            None,
        )
    if not modules and not replacement_shapes:
        report("holds no LoRA tensors (no lora_A/lora_B or lora_embedding_A/B keys)", None)
    weights = LoraWeights(
        modules=modules,
        format="peft",
        config=config,
        metadata=dict(header.metadata),
        replacement_shapes=replacement_shapes,
        base_model=config.get("base_model_name_or_path"),
        use_rslora=use_rslora,
    )
    weights.source_names = replacement_names
    weights.unexplained = unexplained
    return weights


def load_peft_tensors(weights: LoraWeights, weights_path: str | os.PathLike[str]) -> LoraWeights:
    """Fill the tensors of metadata-only `LoraWeights` read from ``weights_path``."""
    from safetensors import safe_open

    with safe_open(str(weights_path), framework="pt") as f:
        keys = set(f.keys())

        def get(name: str) -> Any:
            for candidate in (PEFT_PREFIX + name, name):
                if candidate in keys:
                    return f.get_tensor(candidate)
            return None

        for m in weights.modules.values():
            module = m.module
            if m.kind == "embedding":
                m.A = get(module + ".lora_embedding_B").T.contiguous()
                m.B = get(module + ".lora_embedding_A").T.contiguous()
            elif m.variant in ("loha", "lokr"):
                m.A, m.B = lycoris_factors(m, lambda name: f.get_tensor(name))
            else:
                m.A = get(module + ".lora_A.weight")
                m.B = get(module + ".lora_B.weight")
                if m.recipe.get("blocks") == "A":
                    m.A = expand_blocks(m.A, m.recipe["nblocks"])
                elif m.recipe.get("blocks") == "B":
                    m.B = expand_blocks(m.B, m.recipe["nblocks"])
                if m.variant == "kasa":  # scale * B @ diag(d) @ A, in fp32 as PEFT computes it
                    m.A = m.A.float()
                    m.B = m.B.float() * get(module + ".lora_diag").float()
            if m.bias_shape is not None:
                m.bias = get(module + ".lora_B.bias")
            if m.magnitude_shape is not None:
                mag = get(module + ".lora_magnitude_vector")
                if mag is None:
                    mag = get(module + ".lora_magnitude_vector.weight")
                m.magnitude = mag.reshape(-1)
        names = weights.source_names
        for key in weights.replacement_shapes:
            weights.replacements[key] = f.get_tensor(names[key]) if key in names else get(key)
    return weights


def _pinned(
    pattern: dict[str, Any], mods: list[LoraModule], value: Callable[[LoraModule], Any]
) -> dict[str, Any]:
    """PEFT matches a pattern key against every module whose name ends in ``.KEY``: a key ``lin`` also hits
    ``block.lin``. Give every module such a key would hit its own entry, and put longer (more specific)
    keys first, since PEFT takes the first key that matches."""
    pattern = dict(pattern)
    for m in mods:
        if m.module not in pattern and pattern_key(pattern, m.module) is not None:
            pattern[m.module] = value(m)
    return dict(sorted(pattern.items(), key=lambda kv: (-len(kv[0]), kv[0])))


def derive_config(weights: LoraWeights, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A config whose r / lora_alpha / patterns give every module its rank and scale (rslora folded in)."""
    from collections import Counter

    config: dict[str, Any] = dict(base or {})
    mods = list(weights.modules.values())
    if not mods:
        raise InvalidAdapterError("cannot write an adapter with no LoRA modules")
    r = Counter(m.rank for m in mods).most_common(1)[0][0]
    s0 = Counter(m.scale for m in mods if m.rank == r).most_common(1)[0][0]
    lora_alpha = s0 * r
    rank_pattern = _pinned({m.module: m.rank for m in mods if m.rank != r}, mods, lambda m: m.rank)
    alpha_pattern = _pinned(
        {
            m.module: m.scale * m.rank
            for m in mods
            if not math.isclose(lora_alpha / m.rank, m.scale, rel_tol=1e-12, abs_tol=0.0)
        },
        mods,
        lambda m: m.scale * m.rank,
    )
    targets = sorted({m.short_name for m in mods})
    config.update(
        {
            "peft_type": "LORA",
            "r": int(r),
            "lora_alpha": float(lora_alpha),
            "use_rslora": False,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "target_modules": targets,
            "use_dora": weights.has_dora,
            "lora_bias": any(m.bias_shape is not None for m in mods),
            "fan_in_fan_out": bool(config.get("fan_in_fan_out", False)),
        }
    )
    config.setdefault("base_model_name_or_path", weights.base_model)
    config.setdefault("task_type", None)
    config.setdefault("bias", "none")
    config.setdefault("modules_to_save", None)
    config.setdefault("inference_mode", True)
    # block-diagonal factors are written expanded (their zeros included): plain LoRA of the same rank
    config.pop("use_bdlora", None)
    kasa = [m for m in mods if m.needs_base]
    if kasa:
        odd = next((m for m in mods if not m.needs_base or m.base_svd_drop != m.rank), None)
        if odd is not None:
            raise InvalidAdapterError(
                f"{odd.key}: a KaSA adapter is written as PEFT KaSA, where every module removes as many "
                "singular components of its base as its rank; this one does not (merge it instead)"
            )
        given = (base or {}).get("kasa_config")
        config["kasa_config"] = given if isinstance(given, dict) else {"beta": 1e-4, "gamma": 1e-3}
    else:
        config.pop("kasa_config", None)
    # PEFT adds LoRA layers to every module the short target names match; a derived adapter may cover
    # fewer. With the default init those extra layers start as exact no-ops (B = 0), whatever the
    # source config said (PiSSA / OLoRA inits would change the base weights on load).
    config["init_lora_weights"] = True
    return config


def peft_state_dict(weights: LoraWeights) -> dict[str, Any]:
    """Tensors under the names PEFT saves them."""
    out: dict[str, Any] = {}
    for m in weights.modules.values():
        if not m.has_tensors():
            raise InvalidAdapterError(f"{m.key}: tensors were not loaded; cannot write")
        pre = PEFT_PREFIX + m.module
        if m.kind == "embedding":
            assert m.A is not None and m.B is not None
            out[pre + ".lora_embedding_A"] = m.B.T.contiguous()
            out[pre + ".lora_embedding_B"] = m.A.T.contiguous()
        else:
            out[pre + ".lora_A.weight"] = m.A.contiguous()  # type: ignore[union-attr]
            out[pre + ".lora_B.weight"] = m.B.contiguous()  # type: ignore[union-attr]
        if m.needs_base:  # KaSA: diag(d) was folded into lora_B when read
            import torch

            out[pre + ".lora_diag"] = torch.ones(m.rank, dtype=m.B.dtype)  # type: ignore[union-attr]
        if m.bias is not None:
            out[pre + ".lora_B.bias"] = m.bias.contiguous()
        if m.magnitude is not None:
            # the shape PEFT's DoRA layer holds: (1, out, 1, 1) for a conv, flat otherwise
            mag_shape = (1, -1, *(1,) * len(m.kernel_size)) if m.kind == "conv" else (-1,)
            out[pre + ".lora_magnitude_vector"] = m.magnitude.reshape(mag_shape).contiguous()
    targeted = {m.module for m in weights.modules.values()}
    for key, tensor in weights.replacements.items():
        if tensor is None:
            raise InvalidAdapterError(f"{key}: tensors were not loaded; cannot write")
        module = key.rsplit(".", 1)[0]
        if module in targeted and key.endswith(".weight"):
            out[PEFT_PREFIX + module + ".base_layer.weight"] = tensor.contiguous()
        else:
            out[PEFT_PREFIX + key] = tensor.contiguous()
    return out


def write_peft(
    weights: LoraWeights, dest: str | os.PathLike[str], *, config: dict[str, Any] | None = None
) -> Path:
    """Write a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) into ``dest``.

    ``config`` is written as given; without it one is derived so PEFT computes each module's scale.
    """
    from safetensors.torch import save_file

    lora_config = weights.format == "peft" and str(weights.config.get("peft_type", "LORA")).upper() == "LORA"
    cfg = config if config is not None else derive_config(weights, weights.config if lora_config else None)
    tensors = peft_state_dict(weights)  # checks every module before anything is written
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS_NAME + ".tmp")
    metadata = {"format": "pt"}
    converted = [v for v in weights.variants if v != "kasa" or not weights.needs_base]
    if converted:  # say what the plain LoRA factors were read from
        metadata["adapterhub.converted_from"] = ", ".join(converted)
        logger.info(
            "%s: %s written as PEFT LoRA with the exact factors of the same update (rank %d)",
            out,
            weights.describe_kind().split(" (")[0],
            weights.rank,
        )
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, out / WEIGHTS_NAME)
    tmpc = out / (CONFIG_NAME + ".tmp")
    tmpc.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmpc, out / CONFIG_NAME)
    return out


def read_peft(
    config_path: str | os.PathLike[str],
    weights_path: str | os.PathLike[str],
    *,
    load_tensors: bool = False,
    problem: Problem | None = None,
) -> LoraWeights:
    config = read_config(config_path)
    header = read_header(weights_path)
    weights = parse_peft(config, header, problem=problem, config_path=str(config_path))
    if load_tensors:
        load_peft_tensors(weights, weights_path)
    return weights
