"""LoHa and LoKr (LyCORIS) adapters, in PEFT's folders and in LyCORIS / kohya single files.

Both are read into `LoraWeights` as EXACT LoRA factors, so every operation works on them unchanged:

- LoHa: ``delta = scale * (w1a @ w1b) * (w2a @ w2b)`` (a Hadamard product). Column ``(i, j)`` of
  ``B`` is ``w1a[:, i] * w2a[:, j]`` and row ``(i, j)`` of ``A`` is ``w1b[i] * w2b[j]``, so ``B @ A`` is
  the update with rank ``r1 * r2``. The Tucker (CP) form of conv layers (``hada_t1`` / ``hada_t2``)
  factors the same way.
- LoKr: ``delta = scale * kron(W1, W2)`` with each side full or ``a @ b`` (or CP for a conv ``W2``);
  with ``W1 = B1 A1`` and ``W2 = B2 A2``, ``kron(W1, W2) = kron(B1, B2) @ kron(A1, A2)``.

When that rank is not below ``min(out, in)`` the factors are the dense update and an identity
(`adapterhub.lora.exact_factors`). PEFT's ``get_delta_weight`` is the reference for the math; its
scale is ``alpha / r`` from the config (``rank_pattern`` / ``alpha_pattern`` by module). LyCORIS files
(keys ``<stem>.hada_w1_a`` ... / ``<stem>.lokr_w1`` ..., a scalar ``<stem>.alpha``) scale as ComfyUI and
sd-scripts read them: LoHa ``alpha / r``; LoKr ``alpha / r`` of the decomposed ``W2`` (else ``W1``),
and 1 when both are full or there is no alpha.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..lora import LoraModule, exact_rank

if TYPE_CHECKING:
    import torch

    from .safetensors_header import TensorInfo

__all__ = [
    "LOHA_ROLES",
    "LOKR_ROLES",
    "SUFFIXES",
    "lycoris_factors",
    "lycoris_module",
    "lycoris_rank",
]

LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
#: key suffix -> role, for `safetensors_header.group_by_suffix`
SUFFIXES: tuple[tuple[str, str], ...] = tuple((f".{r}", r) for r in (*LOHA_ROLES, *LOKR_ROLES))


def _shape(info: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in info.shape)


def lycoris_rank(variant: str, parts: Mapping[str, Any]) -> int | None:
    """The rank LyCORIS scales by (``alpha / rank``): LoHa ``w1_b``'s rows; LoKr the decomposed ``W2``'s,
    else ``W1``'s; None when LoKr has no decomposed side (scale 1)."""
    if variant == "loha":
        return _shape(parts["hada_w1_b"])[0]
    for role in ("lokr_w2_b", "lokr_w1_b"):
        if role in parts:
            return _shape(parts[role])[0]
    return None


def _loha_shapes(p: Mapping[str, Any]) -> tuple[int, tuple[int, ...], int] | str:
    """(out, tail, factor rank) of a LoHa module from its stored shapes, or why they do not fit."""
    need = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
    missing = [r for r in need if r not in p]
    if missing:
        return f"LoHa tensor {missing[0]} is missing"
    w1a, w1b, w2a, w2b = (_shape(p[r]) for r in need)
    cp = "hada_t1" in p or "hada_t2" in p
    if cp:
        if "hada_t1" not in p or "hada_t2" not in p:
            return "has only one of hada_t1 / hada_t2"
        t1, t2 = _shape(p["hada_t1"]), _shape(p["hada_t2"])
        if len(t1) != 4 or t1 != (w1a[0], w1b[0], *t1[2:]) or len(t2) != 4 or t2[:2] != (w2a[0], w2b[0]):
            return f"LoHa CP tensors do not fit: t1 {list(t1)}, t2 {list(t2)}, w1_a {list(w1a)}, w2_a {list(w2a)}"
        if t1[2:] != t2[2:] or len({len(w1a), len(w1b), len(w2a), len(w2b)}) != 1 or len(w1a) != 2:
            return "LoHa CP tensors have different kernel sizes"
        out, inn = w1a[1], w1b[1]
        if (w2a[1], w2b[1]) != (out, inn):
            return f"LoHa factors do not fit: w1 is {out}x{inn}, w2 is {w2a[1]}x{w2b[1]}"
        return out, (inn, *t1[2:]), w1a[0] * w2a[0]
    if any(len(s) != 2 for s in (w1a, w1b, w2a, w2b)):
        return "LoHa factors must be 2-D"
    if w1a[1] != w1b[0] or w2a[1] != w2b[0]:
        return (
            f"LoHa ranks disagree: w1_a {list(w1a)} / w1_b {list(w1b)}, w2_a {list(w2a)} / w2_b {list(w2b)}"
        )
    if (w1a[0], w1b[1]) != (w2a[0], w2b[1]):
        return f"LoHa factors do not fit: w1 is {w1a[0]}x{w1b[1]}, w2 is {w2a[0]}x{w2b[1]}"
    return w1a[0], (w1b[1],), w1a[1] * w2a[1]


def _lokr_shapes(p: Mapping[str, Any]) -> tuple[int, tuple[int, ...], int] | str:
    """(out, tail, factor rank) of a LoKr module from its stored shapes, or why they do not fit."""
    if "lokr_w1" in p:
        w1 = _shape(p["lokr_w1"])
        if len(w1) != 2:
            return f"lokr_w1 must be 2-D, got {list(w1)}"
        a, c, r1 = w1[0], w1[1], min(w1)
    elif "lokr_w1_a" in p and "lokr_w1_b" in p:
        w1a, w1b = _shape(p["lokr_w1_a"]), _shape(p["lokr_w1_b"])
        if len(w1a) != 2 or len(w1b) != 2 or w1a[1] != w1b[0]:
            return f"lokr_w1_a {list(w1a)} and lokr_w1_b {list(w1b)} do not fit"
        a, c, r1 = w1a[0], w1b[1], w1a[1]
    else:
        return "LoKr needs lokr_w1, or lokr_w1_a and lokr_w1_b"
    if "lokr_w2" in p:
        w2 = _shape(p["lokr_w2"])
        if len(w2) < 2:
            return f"lokr_w2 must be at least 2-D, got {list(w2)}"
        b, d, kernel = w2[0], w2[1], w2[2:]
        r2 = min(b, d * math.prod(kernel))
    elif "lokr_w2_a" in p and "lokr_w2_b" in p:
        w2a, w2b = _shape(p["lokr_w2_a"]), _shape(p["lokr_w2_b"])
        if "lokr_t2" in p:
            t2 = _shape(p["lokr_t2"])
            if len(t2) != 4 or len(w2a) != 2 or len(w2b) != 2 or t2[:2] != (w2a[0], w2b[0]):
                return f"LoKr CP tensors do not fit: t2 {list(t2)}, w2_a {list(w2a)}, w2_b {list(w2b)}"
            b, d, kernel, r2 = w2a[1], w2b[1], t2[2:], w2a[0]
        else:
            if len(w2a) != 2 or len(w2b) != 2 or w2a[1] != w2b[0]:
                return f"lokr_w2_a {list(w2a)} and lokr_w2_b {list(w2b)} do not fit"
            b, d, kernel, r2 = w2a[0], w2b[1], (), w2a[1]
    else:
        return "LoKr needs lokr_w2, or lokr_w2_a and lokr_w2_b"
    return a * b, (c * d, *kernel), r1 * r2


def lycoris_module(
    key: str,
    variant: str,
    parts: Mapping[str, TensorInfo],
    *,
    scale: float,
    alpha: float,
    rank: int | None = None,
) -> LoraModule | str:
    """A metadata-only `LoraModule` for a LoHa / LoKr module whose stored tensors are ``parts`` (role ->
    header entry), or a one-line reason it cannot be one; ``rank`` is the r it was made with."""
    got = _loha_shapes(parts) if variant == "loha" else _lokr_shapes(parts)
    if isinstance(got, str):
        return got
    out, tail, factor_rank = got
    if 0 in (out, factor_rank, *tail):
        return "has an empty tensor"
    cols = math.prod(tail)
    stored_rank = rank
    rank = exact_rank(out, cols, factor_rank)
    ones = (1,) * (len(tail) - 1)
    dtypes = {info.dtype for info in parts.values()}
    return LoraModule(
        key=key,
        kind="linear" if len(tail) == 1 else "conv",
        rank=rank,
        alpha=scale * rank,
        scale=scale,
        a_shape=(rank, *tail),
        b_shape=(out, rank, *ones),
        dtype=dtypes.pop() if len(dtypes) == 1 else "F32",
        variant=variant,  # type: ignore[arg-type]
        stored_params=sum(math.prod(info.shape) for info in parts.values()),
        recipe={
            "tensors": {role: info.name for role, info in parts.items()},
            "alpha": alpha,
            "rank": stored_rank,
        },
    )


# ------------------------------------------------------------------------------------------- tensors


def _side(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of a full matrix ``w`` (rows, cols...) with ``B @ A.flat == w.flat``, the smaller identity."""
    import torch

    rows, cols = int(w.shape[0]), math.prod(int(d) for d in w.shape[1:])
    if rows <= cols:
        return torch.eye(rows, dtype=w.dtype), w.reshape(rows, *w.shape[1:])
    return w.reshape(rows, cols), torch.eye(cols, dtype=w.dtype).reshape(cols, *w.shape[1:])


def _cp_core(t: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """``einsum('i j k l, j r -> i r k l')``: the CP core applied to the input factor."""
    import torch

    return torch.einsum("ijkl,jr->irkl", t, wb)


def _loha(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B ``(out, r1 r2)``, A ``(r1 r2, in[, k, k])``, the dense update as PEFT computes it, or an empty
    tensor for the CP form, whose dense update is ``B @ A``)."""
    import torch

    if "hada_t1" in t:
        c1, c2 = _cp_core(t["hada_t1"], t["hada_w1_b"]), _cp_core(t["hada_t2"], t["hada_w2_b"])
        b = (t["hada_w1_a"].T[:, :, None] * t["hada_w2_a"].T[:, None, :]).reshape(t["hada_w1_a"].shape[1], -1)
        a = (c1[:, None] * c2[None, :]).reshape(-1, *c1.shape[1:])
        return b, a, torch.empty(0)
    w1a, w1b, w2a, w2b = t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"]
    b = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], -1)
    a = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, w1b.shape[1])
    return b, a, (w1a @ w1b) * (w2a @ w2b)


def _lokr(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import torch

    if "lokr_w1" in t:
        b1, a1 = _side(t["lokr_w1"])
        w1 = t["lokr_w1"]
    else:
        b1, a1 = t["lokr_w1_a"], t["lokr_w1_b"]
        w1 = b1 @ a1
    if "lokr_w2" in t:
        b2, a2 = _side(t["lokr_w2"])
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        b2, a2 = t["lokr_w2_a"].T, _cp_core(t["lokr_t2"], t["lokr_w2_b"])
        w2 = torch.einsum("ip,irkl->prkl", t["lokr_w2_a"], a2)
    else:
        b2, a2 = t["lokr_w2_a"], t["lokr_w2_b"]
        w2 = b2 @ a2
    r1, c = int(a1.shape[0]), int(a1.shape[1])
    r2, d = int(a2.shape[0]), int(a2.shape[1])
    kernel = tuple(int(k) for k in a2.shape[2:])
    a2f = a2.reshape(r2, d, -1)
    a = (a1[:, None, :, None, None] * a2f[None, :, None, :, :]).reshape(r1 * r2, c * d, *kernel)
    b = torch.kron(b1.contiguous(), b2.contiguous())
    w1k = w1.reshape(*w1.shape, *(1,) * len(kernel)) if w2.dim() > 2 else w1
    return b, a, torch.kron(w1k.contiguous(), w2.contiguous())


def lycoris_factors(m: LoraModule, get: Callable[[str], Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of a LoHa / LoKr module in fp32, read with ``get(tensor name)``: exact factors of the
    stored update (see the module docstring)."""
    import torch

    from ..lora import exact_factors

    names: dict[str, str] = m.recipe["tensors"]
    t = {role: get(name).to(torch.float32) for role, name in names.items()}
    b, a, dense = _loha(t) if m.variant == "loha" else _lokr(t)
    out = m.out_features
    tail = (m.in_features, *m.kernel_size)
    ones = (1,) * (len(tail) - 1)
    if int(a.shape[0]) == m.rank:  # the factors themselves: rank below min(out, in)
        return a.reshape(m.rank, *tail).contiguous(), b.reshape(out, m.rank, *ones).contiguous()
    if dense.numel() == 0:  # CP LoHa: the dense update from its factors
        dense = b @ a.reshape(int(a.shape[0]), -1)
    ea, eb = exact_factors(dense.reshape(out, *tail))
    return ea, eb


# --------------------------------------------------------------------------------- PEFT LoHa / LoKr


def parse_peft_lycoris(
    config: dict[str, Any],
    header: Any,
    *,
    report: Callable[[str, str | None], None],
) -> Any:
    """Metadata-only `LoraWeights` of a PEFT LoHa / LoKr folder (``peft_type`` LOHA / LOKR)."""
    from ..lora import PEFT_PREFIX, LoraWeights, pattern_key
    from .peft_config import target_selects
    from .safetensors_header import group_by_suffix

    variant = "loha" if str(config.get("peft_type")).upper() == "LOHA" else "lokr"
    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("alpha", 8))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules_to_save = [str(m) for m in config.get("modules_to_save") or []]
    parts, rest = group_by_suffix(header, SUFFIXES)
    modules: dict[str, LoraModule] = {}
    for stem, got in sorted(parts.items()):
        module = stem[len(PEFT_PREFIX) :] if stem.startswith(PEFT_PREFIX) else stem
        roles = LOHA_ROLES if variant == "loha" else LOKR_ROLES
        foreign = sorted(set(got) - set(roles))
        if foreign:
            report(f"module {module}: {foreign[0]} does not belong in a {variant.upper()} adapter", module)
            continue
        odd = next((i for i in got.values() if i.dtype not in ("F16", "BF16", "F32", "F64")), None)
        if odd is not None:
            report(f"module {module}: {odd.name} is stored as {odd.dtype}, not floating point", module)
            continue
        rkey, akey = pattern_key(rank_pattern, module), pattern_key(alpha_pattern, module)
        r = int(rank_pattern[rkey]) if rkey is not None else r_default
        alpha = float(alpha_pattern[akey]) if akey is not None else alpha_default
        stored = [
            _shape(got[role])[0]
            for role in ("hada_w1_b", "hada_w2_b", "lokr_w1_b", "lokr_w2_b")
            if role in got
        ]
        if any(s != r for s in stored):
            report(
                f"module {module}: the config says r={r} but the tensors have rank {stored[0]}"
                " (fix r / rank_pattern in adapter_config.json)",
                module,
            )
            continue
        if r <= 0:
            report(f"module {module}: r is {r}; it must be positive", module)
            continue
        if target_selects(config, module) is False:
            report(
                f"module {module}: the config's target_modules does not select it, so PEFT would load the "
                "adapter without it; fix target_modules in adapter_config.json",
                module,
            )
            continue
        m = lycoris_module(module + ".weight", variant, got, scale=alpha / r, alpha=alpha, rank=r)
        if isinstance(m, str):
            report(f"module {module}: {m}", module)
            continue
        modules[m.key] = m
    replacement_shapes: dict[str, tuple[int, ...]] = {}
    names: dict[str, str] = {}
    unexplained: list[str] = []
    for name in rest:
        stem = name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name
        owner = stem.rsplit(".", 1)[0]
        if any(owner == s or owner.endswith("." + s) for s in modules_to_save):
            replacement_shapes[stem] = header.tensors[name].shape
            names[stem] = name
        else:
            unexplained.append(name)
    if not modules and not replacement_shapes:
        report(
            f"holds no {variant.upper()} tensors ({'hada_w1_a' if variant == 'loha' else 'lokr_w1'}...)", None
        )
    weights = LoraWeights(
        modules=modules,
        format="peft",
        config=config,
        metadata=dict(header.metadata),
        replacement_shapes=replacement_shapes,
        base_model=config.get("base_model_name_or_path"),
    )
    weights.source_names = names
    weights.unexplained = unexplained
    return weights


def kohya_lycoris_module(stem: str, got: Mapping[str, Any], alpha: float | None) -> LoraModule | str:
    """A LyCORIS / kohya file's LoHa or LoKr module (``got``: role -> header entry, without alpha)."""
    variant = "loha" if any(r.startswith("hada_") for r in got) else "lokr"
    if variant == "loha" and any(r.startswith("lokr_") for r in got):
        return "has both LoHa (hada_*) and LoKr (lokr_*) tensors"
    if variant == "loha" and "hada_w1_b" not in got:
        return "LoHa tensor hada_w1_b is missing"
    rank = lycoris_rank(variant, got)
    scale = 1.0 if alpha is None or rank is None else alpha / rank
    return lycoris_module(
        stem, variant, got, scale=scale, alpha=alpha if alpha is not None else 0.0, rank=rank
    )
