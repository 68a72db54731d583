"""Reading ``adapter_config.json``: what PEFT accepts, what adapterhub can compute, and what the file is.

`read_config` reads the file under a size cap, says in one line what it is when it is not a PEFT LoRA
config (an MLX-LM or ``adapters``-library config, a transformers ``config.json``, a git-LFS pointer),
refuses values no adapter can hold (NaN / Infinity, alpha <= 0, a huge base name), normalises what PEFT
reads loosely (``null`` booleans read as false, as PEFT does), refuses by name the fields that change the
math in ways adapterhub cannot reproduce yet, and checks the rest against
``schemas/lora_config.schema.json``. Unknown fields (newer PEFT versions) are kept and logged once
(a warning naming them, the first time each is seen in the process).

`target_selects` is PEFT's rule for which modules a config adapts (``check_target_module_exists``):
the readers use it to refuse weights that PEFT would silently not load.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable
from typing import Any, TypeGuard

from ..errors import InvalidAdapterError, InvalidConfigError

__all__ = [
    "MAX_BASE_NAME_CHARS",
    "MAX_CONFIG_BYTES",
    "read_config",
    "target_selects",
    "validate_config",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"

#: the largest adapter_config.json read (real ones are a few kB; the catalog keeps the config in a row)
MAX_CONFIG_BYTES = 1_000_000
#: the longest base_model_name_or_path accepted (Hub ids are at most 96 characters; paths rarely 300)
MAX_BASE_NAME_CHARS = 512

#: PEFT's LoraConfig fields (0.21) and fields older PEFT versions wrote; anything else is logged once
KNOWN_FIELDS = frozenset(
    {
        "task_type",
        "peft_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "r",
        "target_modules",
        "exclude_modules",
        "lora_alpha",
        "lora_dropout",
        "fan_in_fan_out",
        "bias",
        "use_rslora",
        "modules_to_save",
        "init_lora_weights",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "megatron_config",
        "megatron_core",
        "trainable_token_indices",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "use_dora",
        "velora_config",
        "alora_invocation_tokens",
        "use_qalora",
        "qalora_group_size",
        "monteclora_config",
        "layer_replication",
        "runtime_config",
        "lora_bias",
        "target_parameters",
        "use_bdlora",
        "arrow_config",
        "kasa_config",
        "ensure_weight_tying",
        # LoHa / LoKr (peft_type LOHA / LOKR)
        "alpha",
        "rank_dropout",
        "module_dropout",
        "use_effective_conv2d",
        "init_weights",
        "decompose_both",
        "decompose_factor",
        "rank_dropout_scale",
        # older PEFT versions (0.2 - 0.10)
        "enable_lora",
        "merge_weights",
        "layers_to_save",
    }
)

#: booleans PEFT reads with plain truthiness, so ``null`` means false
_LOOSE_BOOLEANS = ("fan_in_fan_out", "use_dora", "use_rslora", "lora_bias", "inference_mode")

#: fields that change what the adapter computes in ways adapterhub cannot reproduce: field -> why
_UNSUPPORTED: dict[str, str] = {
    "alora_invocation_tokens": "activated LoRA (applies only after the invocation tokens, which no merge "
    "can represent)",
    "arrow_config": "Arrow routing between several LoRA experts",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "use_qalora": "QA-LoRA (pooled lora_A for quantized layers)",
    "layer_replication": "layer replication (the base model's layers are duplicated on load)",
    "target_parameters": "LoRA on nn.Parameter tensors (MoE experts)",
    "trainable_token_indices": "trainable token embeddings (extra per-token rows saved beside the LoRA)",
}

#: init_lora_weights values for which PEFT rewrites the base weight when the adapter is loaded
_RESIDUAL_INITS = ("pissa", "corda", "olora", "loftq")

_warned_fields: set[str] = set()


def _find_non_finite(value: Any) -> str | None:
    """The path of the first NaN / Infinity in a parsed JSON value, or None (iterative: any depth)."""
    todo: list[tuple[str, Any]] = [("", value)]
    while todo:
        where, v = todo.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return where or "(top level)"
        if isinstance(v, dict):
            todo.extend((f"{where}.{k}" if where else str(k), x) for k, x in reversed(list(v.items())))
        elif isinstance(v, list):
            todo.extend((f"{where}[{i}]", x) for i, x in reversed(list(enumerate(v))))
    return None


def _foreign(config: dict[str, Any], path: str) -> InvalidConfigError | None:
    """A one-line explanation when the JSON object is some other tool's config, not PEFT's."""
    peftish = {"r", "peft_type", "lora_alpha", "target_modules"} & set(config)
    if "lora_parameters" in config and "peft_type" not in config:
        return InvalidConfigError(
            f"{path}: this is an MLX-LM LoRA config (it has lora_parameters), not a PEFT adapter config; "
            "convert the MLX adapter to PEFT format first (adapterhub reads PEFT and kohya LoRA files)",
            path=path,
        )
    if "config" in config and ("model_class" in config or "version" in config) and not peftish:
        return InvalidConfigError(
            f"{path}: this is an adapter of the `adapters` library (AdapterHub's adapter-transformers, keys "
            "config / model_class / version), not a PEFT LoRA adapter; adapterhub reads PEFT and kohya "
            "LoRA files, so load it with `adapters` or retrain it with PEFT",
            path=path,
        )
    if ("model_type" in config or "architectures" in config) and not peftish:
        return InvalidConfigError(
            f"{path}: this is a transformers model config.json (it has model_type / architectures), not a "
            "PEFT adapter config; add the adapter's own folder, or register the model with "
            "`adapterhub base add`",
            path=path,
        )
    return None


def _refusals(config: dict[str, Any], path: str) -> None:
    for key, what in _UNSUPPORTED.items():
        value = config.get(key)
        if value in (None, False, [], {}, ""):
            continue
        raise InvalidConfigError(
            f"{path}: {key} is set: {what}; adapterhub cannot compute this adapter's update exactly yet, so "
            "it refuses the adapter rather than approximate it",
            path=path,
            key=key,
        )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        raise InvalidConfigError(
            f"{path}: init_lora_weights is {init!r}: PEFT rebuilds a residual base weight from it on load, "
            "so the adapter is not a plain update of the base; convert it to a plain LoRA first (PEFT's "
            "save_pretrained(path_initial_model_for_weight_conversion=...)) and add that",
            path=path,
            key="init_lora_weights",
        )


def validate_config(config: Any, *, path: str = CONFIG_NAME) -> dict[str, Any]:
    """Check a parsed ``adapter_config.json``; return it normalised (``null`` booleans read as false).

    Raises `InvalidConfigError` naming the field when the config is not one adapterhub can use.
    """
    if not isinstance(config, dict):
        raise InvalidConfigError(f"{path}: adapter config must be a JSON object", path=path)
    foreign = _foreign(config, path)
    if foreign is not None:
        raise foreign
    peft_type = config.get("peft_type", "LORA")
    if isinstance(peft_type, str) and peft_type.upper() in ("LOHA", "LOKR"):
        return _lycoris_config(config, path)
    if isinstance(peft_type, str) and peft_type.upper() != "LORA":
        raise InvalidConfigError(
            f"{path}: peft_type is {peft_type!r}; adapterhub handles LoRA adapters only (with LoHa and LoKr)",
            path=path,
            key="peft_type",
        )
    bad = _find_non_finite(config)
    if bad is not None:
        raise InvalidConfigError(
            f"{path}: {bad} is not a finite number (NaN, Infinity or an overflowing literal such as 1e400); "
            "fix it in adapter_config.json",
            path=path,
            key=bad,
        )
    config = dict(config)
    for key in _LOOSE_BOOLEANS:
        if key in config and config[key] is None:
            config[key] = False
    if "bias" in config and config["bias"] is None:
        config["bias"] = "none"
    _check_values(config, path)
    _refusals(config, path)
    unknown = sorted(set(config) - KNOWN_FIELDS - _warned_fields)
    if unknown:
        _warned_fields.update(unknown)
        logger.warning(
            "%s: fields unknown to adapterhub (a newer PEFT?) are kept but not used: %s",
            path,
            ", ".join(unknown),
        )
    return _schema(config, path)


def _lycoris_config(config: dict[str, Any], path: str) -> dict[str, Any]:
    """A PEFT LoHa / LoKr config: the fields its math reads, checked by hand (the schema is LoRA's)."""
    bad = _find_non_finite(config)
    if bad is not None:
        raise InvalidConfigError(f"{path}: {bad} is not a finite number", path=path, key=bad)

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    r = config.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise InvalidConfigError(f"{path}: r is {r!r}; it must be a positive integer", path=path, key="r")
    if not number(config.get("alpha", 8)):
        raise InvalidConfigError(f"{path}: alpha must be a number", path=path, key="alpha")
    for key in ("rank_pattern", "alpha_pattern"):
        v = config.get(key)
        if v is not None and (not isinstance(v, dict) or not all(number(x) for x in v.values())):
            raise InvalidConfigError(f"{path}: {key} must map names to numbers", path=path, key=key)
    config = dict(config)
    _check_values({**config, "lora_alpha": config.get("alpha")}, path)
    return config


def _check_values(config: dict[str, Any], path: str) -> None:
    def number(v: Any) -> TypeGuard[float]:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    alphas = [("lora_alpha", config.get("lora_alpha"))]
    pattern = config.get("alpha_pattern")
    if isinstance(pattern, dict):
        alphas += [(f"alpha_pattern.{k}", v) for k, v in pattern.items()]
    for where, alpha in alphas:
        if number(alpha) and alpha <= 0:
            raise InvalidConfigError(
                f"{path}: {where} is {alpha}; LoRA's scale is alpha / r, so alpha must be positive (an alpha "
                "of 0 makes the adapter do nothing)",
                path=path,
                key=where,
            )
    patterns: list[tuple[str, str]] = []
    for key in ("target_modules", "exclude_modules", "layers_pattern"):
        v = config.get(key)
        if isinstance(v, str) and v.lower() != "all-linear":
            patterns.append((key, v))
        elif key == "layers_pattern" and isinstance(v, list):
            patterns += [(key, x) for x in v if isinstance(x, str)]
    saved = config.get("modules_to_save")
    if isinstance(saved, list):
        patterns += [("modules_to_save", rf"(^|.*\.){m}($|\..*)") for m in saved if isinstance(m, str)]
    for key, pattern in patterns:
        try:
            re.compile(pattern)
        except (re.error, RecursionError, OverflowError) as exc:
            raise InvalidConfigError(
                f"{path}: {key} is not a valid regular expression ({exc}); PEFT could not load this adapter "
                "either, so fix it in adapter_config.json",
                path=path,
                key=key,
            ) from None
    base = config.get("base_model_name_or_path")
    if isinstance(base, str) and len(base) > MAX_BASE_NAME_CHARS:
        raise InvalidConfigError(
            f"{path}: base_model_name_or_path is {len(base)} characters long, over the "
            f"{MAX_BASE_NAME_CHARS}-character limit; set it to the base model's Hub id or path",
            path=path,
            key="base_model_name_or_path",
        )


def _schema(config: dict[str, Any], path: str) -> dict[str, Any]:
    try:
        import jsonschema
    except ImportError:  # a GPU box with only torch + safetensors: check the keys the math needs
        for key, types in (("r", (int,)), ("lora_alpha", (int, float)), ("use_rslora", (bool,))):
            if key in config and (
                not isinstance(config[key], types) or isinstance(config[key], bool) != (types == (bool,))
            ):
                raise InvalidConfigError(
                    f"{path}: {key} has the wrong type ({config[key]!r})", path=path, key=key
                ) from None
        return config
    from ..resources import load_schema

    validator = jsonschema.Draft202012Validator(load_schema("lora_config.schema.json"))
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.path) or "(top level)"
        raise InvalidConfigError(
            f"{path}: {where}: {err.message} (the LoRA config schema is schemas/lora_config.schema.json)",
            path=path,
            key=where,
        )
    return config


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``adapter_config.json`` (see the module docstring)."""
    p = str(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise InvalidAdapterError(f"{p}: no such file", path=p) from None
    except IsADirectoryError:
        raise InvalidAdapterError(f"{p}: is a folder, not a config file", path=p) from None
    except PermissionError:
        raise InvalidAdapterError(f"{p}: permission denied", path=p) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidConfigError(
            f"{p}: is larger than {MAX_CONFIG_BYTES} bytes; a PEFT adapter config is a few kilobytes, so this "
            "is not one (check how the file was made)",
            path=p,
        )
    if raw.startswith(b"version https://git-lfs"):
        raise InvalidConfigError(
            f"{p}: is a git-LFS pointer file, not the config itself; fetch the real file (`git lfs pull` in "
            "the clone, or download the repo with huggingface_hub) and add that",
            path=p,
        )
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidConfigError(f"{p}: not valid JSON ({exc})", path=p) from None
    except RecursionError:
        raise InvalidConfigError(f"{p}: not valid JSON (nested too deeply)", path=p) from None
    return validate_config(config, path=p)


# --------------------------------------------------------------------------------- target selection


def _listish(value: Any) -> list[str] | None:
    if value is None or isinstance(value, str):
        return None
    return [str(v) for v in value] if isinstance(value, Iterable) else None


def _layer_index(key: str, layers_pattern: Any) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def target_selects(config: dict[str, Any], module: str, *, kind: str = "linear") -> bool | None:
    """Whether PEFT adds a LoRA layer to ``module`` under this config (PEFT's own rule).

    None when it cannot be told from the config alone: no ``target_modules`` (PEFT picks defaults for
    the base's model type). ``"all-linear"`` selects every Linear / Conv1D layer but the output head.
    A regex that does not compile also gives None.
    """
    try:
        return _selects(config, module, kind)
    except re.error:  # PEFT would fail on the same pattern when it loads the adapter
        return None


def _selects(config: dict[str, Any], module: str, kind: str) -> bool | None:
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and exclude:
        if re.fullmatch(exclude, module):
            return False
    elif exclude:
        names = _listish(exclude) or []
        if module in names or any(module.endswith("." + e) for e in names):
            return False
    for m in config.get("modules_to_save") or []:
        if re.match(rf"(^|.*\.){m}($|\..*)", module):
            return False
    targets = config.get("target_modules")
    if targets is None:
        return None
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return kind == "linear" and module.rsplit(".", 1)[-1] not in ("lm_head", "embed_out")
        return re.fullmatch(targets, module) is not None
    names = _listish(targets) or []
    if module in names:
        return True
    found = any(module.endswith("." + t) for t in names)
    layers = config.get("layers_to_transform")
    if found and layers is not None and (not isinstance(layers, list) or layers):
        idx = _layer_index(module, config.get("layers_pattern"))
        if idx is None:
            return False
        # JSON Schema's "integer" admits 0.0, so a number may come as a float here
        return idx == int(layers) if isinstance(layers, int | float) else idx in layers
    return found
