"""Validation: is this a sound adapter, does it fit this base model, do these adapters fit together.

PEFT never checks that an adapter belongs to the base it is loaded into: a wrong base fails late with
"size mismatch ... copying a param", or loads silently when shapes happen to agree. These checks
answer it up front from metadata alone (file headers, or the catalog's per-module rows); only the
NaN/Inf scan of `check_integrity` reads tensor values, one tensor at a time.

Every check is a `Check` (``ok``, ``warning`` or ``error``, the module it concerns, and a message a
person can act on), gathered in a `ValidationReport`. No database here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import AdapterHubError, IncompatibleAdapterError
from ..formats import AdapterFiles, read_adapter, scan_values
from ..formats.checkpoint import CheckpointInfo
from ..formats.peft import read_config
from ..formats.safetensors_header import read_header
from ..lora import LoraModule, LoraWeights, flat_conv_fits
from .keymap import map_keys, needs_transpose

__all__ = [
    "Check",
    "ValidationReport",
    "BaseLayout",
    "check_integrity",
    "check_base",
    "check_pair",
]

Status = Literal["ok", "warning", "error"]


@dataclass(frozen=True)
class Check:
    status: Status
    check: str  # what was checked: "config", "structure", "values", "base.target", "together.dora", ...
    message: str
    module: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "check": self.check, "module": self.module, "message": self.message}


@dataclass(frozen=True)
class ValidationReport:
    subject: str
    checks: tuple[Check, ...]
    base: str | None = None
    others: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not any(c.status == "error" for c in self.checks)

    @property
    def errors(self) -> list[Check]:
        return [c for c in self.checks if c.status == "error"]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.status == "warning"]

    def summary(self) -> str:
        if self.ok:
            w = f" ({len(self.warnings)} warning{'s' * (len(self.warnings) != 1)})" if self.warnings else ""
            return f"{self.subject}: ok{w}"
        first = self.errors[0]
        more = f" (and {len(self.errors) - 1} more errors)" if len(self.errors) > 1 else ""
        return f"{self.subject}: {first.message}{more}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "base": self.base,
            "with": list(self.others),
            "ok": self.ok,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "checks": [c.to_dict() for c in self.checks],
        }


def _norm_name(name: str | None) -> str:
    return (name or "").strip().lower().rstrip("/")


@dataclass
class BaseLayout:
    """What validation needs of a base model: tensor names and shapes, ``model_type``, config.

    Built from a checkpoint folder's headers (`from_checkpoint`) or from the catalog's rows. Key
    matches are memoised, so checking many adapters against one base matches each module name once.
    """

    name: str
    shapes: Mapping[str, tuple[int, ...]]
    model_type: str | None = None
    fingerprint: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    _memo: dict[str, str | list[str] | None] = field(default_factory=dict, repr=False)

    @classmethod
    def from_checkpoint(cls, ckpt: CheckpointInfo, *, name: str | None = None) -> BaseLayout:
        cfg = dict(ckpt.config)
        alias = cfg.get("_name_or_path")
        return cls(
            name=name or ckpt.path.name,
            shapes={k: info.shape for k, (_, info) in ckpt.tensors.items()},
            model_type=ckpt.model_type,
            fingerprint=ckpt.fingerprint,
            config=cfg,
            aliases=(alias,) if isinstance(alias, str) and alias else (),
        )

    def names(self) -> set[str]:
        return {_norm_name(n) for n in (self.name, *self.aliases) if n}

    def match(self, keys: Iterable[str]) -> tuple[dict[str, str], list[str], dict[str, list[str]]]:
        """(mapping, unmatched, ambiguous) for adapter keys, as `keymap.map_keys` gives them."""
        keys = list(keys)
        todo = [k for k in keys if k not in self._memo]
        if todo:
            m = map_keys(todo, self.shapes.keys())
            for k in todo:
                self._memo[k] = None
            self._memo.update(m.mapping)
            self._memo.update(m.ambiguous)
        mapping: dict[str, str] = {}
        unmatched: list[str] = []
        ambiguous: dict[str, list[str]] = {}
        for k in keys:
            hit = self._memo[k]
            if hit is None:
                unmatched.append(k)
            elif isinstance(hit, list):
                ambiguous[k] = hit
            else:
                mapping[k] = hit
        return mapping, unmatched, ambiguous


# --------------------------------------------------------------------------- integrity


def check_integrity(
    files: AdapterFiles, *, scan_values: bool = True, progress: Callable[[int, int], None] | None = None
) -> tuple[list[Check], LoraWeights | None]:
    """Config against the schema, the header, every module's factors, leftovers, dtypes, NaN/Inf."""
    checks: list[Check] = []
    if files.config is not None:
        try:
            read_config(files.config)
        except AdapterHubError as exc:
            return [Check("error", "config", str(exc))], None
    try:
        if files.format != "gguf":  # a GGUF LoRA's header is read by its reader below
            read_header(files.weights)
    except AdapterHubError as exc:
        return [Check("error", "header", str(exc))], None

    def problem(message: str, module: str | None = None) -> None:
        checks.append(Check("error", "structure", message, module))

    try:
        weights = read_adapter(files, problem=problem)
    except AdapterHubError as exc:
        return [*checks, Check("error", "structure", str(exc))], None
    for name in weights.unexplained:
        checks.append(
            Check(
                "error",
                "structure",
                f"tensor {name} is not part of a LoRA adapter in {files.format} format (no lora_A/lora_B, "
                "embedding, magnitude, bias or modules_to_save key); remove it or check how the file was made",
                name,
            )
        )
    dtypes = sorted({m.dtype for m in weights.modules.values()})
    if len(dtypes) > 1:
        checks.append(
            Check("warning", "dtype", f"factors are stored in several dtypes ({', '.join(dtypes)})")
        )
    if scan_values and not any(c.status == "error" for c in checks):
        checks += _scan_values(files, progress)
    if not any(c.status == "error" for c in checks):
        n = len(weights.modules)
        what = "values finite" if scan_values else "values not scanned"
        checks.append(Check("ok", "integrity", f"{n} module{'s' * (n != 1)}, factors consistent, {what}"))
    return checks, weights


def _scan_values(files: AdapterFiles, progress: Callable[[int, int], None] | None = None) -> list[Check]:
    return [
        Check("error", "values", bad.describe(), bad.name) for bad in scan_values(files, progress=progress)
    ]


# --------------------------------------------------------------------------- against a base


def check_base(weights: LoraWeights, base: BaseLayout, *, declared: str | None = None) -> list[Check]:
    """Does every target of ``weights`` map to exactly one base tensor with a fitting shape?"""
    checks: list[Check] = []
    keys = list(weights.modules) + [k for k in weights.replacement_shapes if k not in weights.modules]
    mapping, unmatched, ambiguous = base.match(keys)
    for key in unmatched:
        checks.append(
            Check(
                "error",
                "base.target",
                f"{_strip(key)} matches no tensor of base {base.name}; the adapter was made for another "
                "architecture or a differently named checkpoint",
                _strip(key),
            )
        )
    for key, hits in ambiguous.items():
        shown = ", ".join(hits[:3]) + (f" and {len(hits) - 3} more" if len(hits) > 3 else "")
        checks.append(
            Check(
                "error", "base.target", f"{_strip(key)} matches several base tensors ({shown})", _strip(key)
            )
        )
    fan_in_fan_out = bool(weights.config.get("fan_in_fan_out")) if weights.config else None
    vocab = base.config.get("vocab_size") if base.config else None
    for key, m in weights.modules.items():
        bkey = mapping.get(key)
        if bkey is None:
            continue
        bshape = tuple(base.shapes[bkey])
        delta = m.delta_shape
        if m.kind == "embedding":
            if bshape != delta:
                checks.append(_embedding_mismatch(m.module, delta, bshape, vocab))
        elif m.kind == "conv":
            if bshape != delta:
                checks.append(
                    Check(
                        "error",
                        "base.shape",
                        f"{m.module}: the conv update has shape {list(delta)} but the base weight {bkey} is "
                        f"{list(bshape)}; the adapter was made for a different base model",
                        m.module,
                    )
                )
        elif flat_conv_fits(m, bshape):
            pass  # LoHa / LoKr store a conv's update as (out, in * kh * kw)
        else:
            try:
                needs_transpose(
                    key,
                    delta,
                    bshape,
                    model_type=base.model_type,
                    fan_in_fan_out=fan_in_fan_out,
                    base_key=bkey,
                )
            except IncompatibleAdapterError as exc:
                checks.append(Check("error", "base.shape", str(exc), m.module))
        if m.needs_base:
            kasa = _kasa_check(m, bshape, base)
            if kasa is not None:
                checks.append(kasa)
        if (
            m.bias_shape is not None
            and bkey.endswith(".weight")
            and bkey[: -len("weight")] + "bias" not in base.shapes
        ):
            checks.append(
                Check(
                    "warning",
                    "base.bias",
                    f"{m.module}: the adapter trains a bias (lora_bias) but the base layer has none; merging it "
                    "needs a bias tensor the base does not have",
                    m.module,
                )
            )
    for key, shape in weights.replacement_shapes.items():
        bkey = mapping.get(key)
        if bkey is None:
            continue
        bshape = tuple(base.shapes[bkey])
        if tuple(shape) != bshape:
            module = _strip(key)
            if len(shape) == 2 and len(bshape) == 2 and shape[1] == bshape[1] and shape[0] != bshape[0]:
                checks.append(_vocab_message(module, "modules_to_save weight", shape[0], bshape[0], vocab))
            else:
                checks.append(
                    Check(
                        "error",
                        "base.shape",
                        f"{module}: the adapter's full replacement weight (modules_to_save) has shape "
                        f"{list(shape)} but the base tensor {bkey} is {list(bshape)}",
                        module,
                    )
                )
    claimed = declared if declared is not None else weights.base_model
    if claimed and _norm_name(claimed) not in base.names():
        checks.append(
            Check(
                "warning",
                "base.name",
                f"the adapter says it was trained on {claimed!r}, but it is being checked against {base.name!r}",
            )
        )
    if not any(c.status == "error" for c in checks):
        n = len(keys)
        checks.append(Check("ok", "base", f"all {n} target{'s' * (n != 1)} fit base {base.name}"))
    return checks


#: the model_type of a live model's layout (`adapterhub.runtime`): orientation comes from module classes
LIVE_MODEL_TYPE = "torch.nn"


def _kasa_check(m: LoraModule, bshape: tuple[int, ...], base: BaseLayout) -> Check | None:
    """KaSA needs an (out, in) base weight with more than r singular components (the runtime resolves it
    from the live weight before it plans, `adapterhub.runtime`'s ``resolve_live``)."""
    if len(bshape) != 2 or bshape != tuple(m.delta_shape):
        return Check(
            "error",
            "base.kasa",
            f"{m.module}: KaSA adapts (out, in) linear weights of shape {list(m.delta_shape)}; the base "
            f"weight is {list(bshape)}",
            m.module,
        )
    if m.base_svd_drop >= min(bshape):
        return Check(
            "error",
            "base.kasa",
            f"{m.module}: KaSA removes {m.base_svd_drop} singular components, but the base weight has only "
            f"{min(bshape)}; PEFT refuses such an adapter",
            m.module,
        )
    return None


def _strip(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(".weight") else key


def _embedding_mismatch(module: str, delta: tuple[int, ...], bshape: tuple[int, ...], vocab: Any) -> Check:
    if len(bshape) == 2 and len(delta) == 2 and bshape[1] == delta[1] and bshape[0] != delta[0]:
        return _vocab_message(module, "embedding LoRA", delta[0], bshape[0], vocab)
    return Check(
        "error",
        "base.shape",
        f"{module}: the embedding update has shape {list(delta)} but the base embedding is {list(bshape)}; "
        "the adapter was made for a different base model",
        module,
    )


def _vocab_message(module: str, what: str, adapter_rows: int, base_rows: int, vocab: Any) -> Check:
    return Check(
        "error",
        "base.vocab",
        f"{module}: the {what} covers {adapter_rows} tokens but the base vocabulary has {base_rows}"
        f"{'' if vocab in (None, base_rows) else f' (config vocab_size {vocab})'}: the classic added-tokens "
        f"mismatch ({adapter_rows} vs {base_rows}); load the tokenizer the adapter was trained with and call "
        f"model.resize_token_embeddings({adapter_rows}) on the base before loading or merging",
        module,
    )


# --------------------------------------------------------------------------- between adapters


def check_pair(
    a_name: str,
    a: LoraWeights,
    b_name: str,
    b: LoraWeights,
    *,
    a_base: str | None = None,
    b_base: str | None = None,
) -> list[Check]:
    """Can ``a`` and ``b`` be merged or combined together? ``a_base``/``b_base``: registered base
    fingerprints when known."""
    checks: list[Check] = []
    label = f"{a_name} + {b_name}"
    shared = sorted(set(a.modules) & set(b.modules))
    if a_base and b_base:
        if a_base != b_base:
            checks.append(
                Check(
                    "error",
                    "together.base",
                    f"{label}: the adapters belong to different registered base models",
                )
            )
        else:
            checks.append(Check("ok", "together.base", f"{label}: same registered base model"))
    elif a.base_model and b.base_model and _norm_name(a.base_model) != _norm_name(b.base_model):
        checks.append(
            Check(
                "warning",
                "together.base",
                f"{label}: declared bases differ ({a.base_model!r} vs {b.base_model!r}); shared modules are "
                "compared by shape below",
            )
        )
    for key in shared:
        ma, mb = a.modules[key], b.modules[key]
        if ma.delta_shape != mb.delta_shape or ma.kind != mb.kind:
            checks.append(
                Check(
                    "error",
                    "together.shape",
                    f"{ma.module}: {a_name} has a {ma.kind} update of shape {list(ma.delta_shape)} but {b_name} a "
                    f"{mb.kind} update of shape {list(mb.delta_shape)}: they were made for different base models",
                    ma.module,
                )
            )
        if ma.is_dora and mb.is_dora:
            checks.append(
                Check(
                    "error",
                    "together.dora",
                    f"{ma.module}: both adapters use DoRA here; merging or combining two DoRA magnitudes on one "
                    "module is ill-defined (merge them one at a time into separate checkpoints instead)",
                    ma.module,
                )
            )
    for key in sorted(set(a.replacement_shapes) & set(b.replacement_shapes)):
        if key in a.modules and key in b.modules:
            # PEFT's save_embedding_layers: a saved copy of the base layer beside an embedding LoRA
            checks.append(
                Check(
                    "warning",
                    "together.saved_base_layer",
                    f"{_strip(key)}: both adapters carry a saved copy of this base weight (PEFT saves targeted "
                    "embedding layers whole); loading either one overwrites the base's copy",
                    _strip(key),
                )
            )
            continue
        checks.append(
            Check(
                "error",
                "together.modules_to_save",
                f"{_strip(key)}: both adapters replace this weight outright (modules_to_save); only one of them "
                "can win, so combining or merging them together is ill-defined",
                _strip(key),
            )
        )
    only_a, only_b = len(set(a.modules) - set(b.modules)), len(set(b.modules) - set(a.modules))
    if not shared:
        checks.append(
            Check(
                "warning",
                "together.overlap",
                f"{label}: no target modules in common; together they act as a union",
            )
        )
    else:
        checks.append(
            Check(
                "ok",
                "together.overlap",
                f"{label}: {len(shared)} modules in common, {only_a} only in {a_name}, {only_b} only in {b_name}",
            )
        )
    if a.rank != b.rank:
        checks.append(
            Check(
                "ok",
                "together.rank",
                f"{label}: ranks differ ({a.rank} vs {b.rank}); fine for merge and combine",
            )
        )
    sa, sb = _typical_scale(a), _typical_scale(b)
    if sa and sb and max(sa, sb) / min(sa, sb) > 10:
        checks.append(
            Check(
                "warning",
                "together.scale",
                f"{label}: scales differ by {max(sa, sb) / min(sa, sb):.0f}x ({sa:g} vs {sb:g}); weights of a "
                "combination apply on top of each adapter's own scale",
            )
        )
    return checks


def _typical_scale(w: LoraWeights) -> float | None:
    scales = sorted(abs(m.scale) for m in w.modules.values() if m.scale)
    return scales[len(scales) // 2] if scales else None


def weights_from_modules(
    rows: Iterable[Sequence[Any]],
    *,
    fmt: str,
    config: Mapping[str, Any] | None = None,
    replacements: Mapping[str, Sequence[int]] | None = None,
    base_model: str | None = None,
) -> LoraWeights:
    """Metadata-only `LoraWeights` from per-module facts (the catalog's rows), without any file.

    Each row: (module, kind, rank, alpha, scale, in_features, out_features, kernel_size (JSON text,
    list or None), dora, dtype, lora_bias).
    """
    import json

    modules: dict[str, LoraModule] = {}
    for module, kind, rank, alpha, scale, in_f, out_f, kernel, dora, dtype, lora_bias in rows:
        if isinstance(kernel, str):
            kernel = json.loads(kernel)
        k = tuple(kernel or ())
        key = module if fmt == "kohya" else module + ".weight"
        modules[key] = LoraModule(
            key=key,
            kind=kind,
            rank=int(rank),
            alpha=float(alpha),
            scale=float(scale),
            a_shape=(int(rank), int(in_f), *k),
            b_shape=(int(out_f), int(rank), *((1,) * len(k))),
            dtype=dtype or "F32",
            bias_shape=(int(out_f),) if lora_bias else None,
            magnitude_shape=(int(out_f),) if dora else None,
        )
    return LoraWeights(
        modules=modules,
        format=fmt,
        config=dict(config or {}),
        replacement_shapes={k: tuple(v) for k, v in (replacements or {}).items()},
        base_model=base_model,
        use_rslora=bool((config or {}).get("use_rslora", False)),
    )
