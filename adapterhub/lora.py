"""The one in-memory model of an adapter: `LoraWeights`, a mapping from base weight key to `LoraModule`.

Every reader produces it and every writer consumes it; validation, merging and combining work on it
alone. Conventions, whatever the file format:

- Keys are the base checkpoint's own weight names (``model.layers.0.self_attn.q_proj.weight``) for
  PEFT adapters. kohya files lose the dots of module paths, so their keys are the kohya stems
  (``lora_unet_down_blocks_0_..._to_q``) until matched against a base's key list.
- ``B @ A`` (conv factors flattened) is the update in the layout of a ``torch.nn`` module weight:
  ``(out, in)`` for Linear, ``(out, in, kh, kw)`` for Conv, and ``(num_embeddings, dim)`` for
  Embedding (PEFT stores embedding factors transposed; readers and writers swap them).
  GPT-2 style Conv1D bases store their weight as ``(in, out)``: whoever applies the delta to such a
  base transposes it (see `adapterhub.ops`).
- ``scale`` is resolved per module (``alpha / r`` or ``alpha / sqrt(r)`` with rslora, after
  ``rank_pattern`` / ``alpha_pattern``), so ``delta = scale * B @ A``.
- Tensors are optional: metadata-only reads fill shapes and leave ``A``/``B`` as ``None``.
- Variants that are not stored as two LoRA factors are held EXACTLY as LoRA factors all the same,
  and say so in ``variant``: LoHa (a Hadamard product of two low-rank products: factors of rank
  ``r1 * r2``), LoKr (a Kronecker product: ``kron(B1, B2) @ kron(A1, A2)``), block-diagonal LoRA (the
  blocks with their zeros), each of them as a dense ``(out, in)`` update times an identity when that is
  smaller (`exact_factors`). KaSA also removes the base weight's ``r`` smallest singular components,
  which depend on the base: ``base_svd_drop`` says how many, and `resolve_kasa` folds them in as
  further exact factors once the base weight is known.

This module does not import torch at import time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

ModuleKind = Literal["linear", "embedding", "conv"]
#: what a module was stored as: plain LoRA, or a variant held as exact LoRA factors
Variant = Literal["lora", "bdlora", "kasa", "loha", "lokr"]
VARIANT_NAMES: dict[str, str] = {
    "lora": "LoRA",
    "bdlora": "block-diagonal LoRA",
    "kasa": "KaSA",
    "loha": "LoHa",
    "lokr": "LoKr",
}

PEFT_PREFIX = "base_model.model."


def lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor PEFT multiplies ``B @ A`` by."""
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's rule: the first pattern key (dict order) whose regex ``(.*\\.)?(KEY)$`` matches the module."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error:
            if module == key or module.endswith("." + key):
                return key
    return None


def short_name(module: str) -> str:
    """The name people use for a target: ``q_proj`` for ``model.layers.0.self_attn.q_proj``.

    For kohya stems (no dots), the tokens after the last layer index: ``attn1_to_q``.
    """
    if "." in module:
        parts = module.split(".")
        # a trailing ModuleList index names the list too: "to_out.0"
        return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
    tokens = module.split("_")
    idx = [i for i, t in enumerate(tokens) if t.isdigit()]
    if idx:
        last = idx[-1]
        if last == len(tokens) - 1 and len(idx) > 1:
            last = idx[-2]
        if last < len(tokens) - 1:
            return "_".join(tokens[last + 1 :])
    return module


@dataclass
class LoraModule:
    """One adapted weight. ``A`` is ``(r, in[, kh, kw])``, ``B`` is ``(out, r[, 1, 1])``."""

    key: str
    kind: ModuleKind
    rank: int
    alpha: float
    scale: float
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    dtype: str = "F32"
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    bias: torch.Tensor | None = None  # lora_B bias (PEFT lora_bias)
    bias_shape: tuple[int, ...] | None = None
    magnitude: torch.Tensor | None = None  # DoRA magnitude vector: (out,), or (dim,) for an Embedding
    magnitude_shape: tuple[int, ...] | None = None
    #: what the file stored; anything but "lora" is held here as exact LoRA factors
    variant: Variant = "lora"
    #: parameters as stored in the file, when that differs from the factors' size (LoHa, LoKr, BD-LoRA)
    stored_params: int | None = None
    #: KaSA: how many of the base weight's smallest singular components the adapter removes (0: none)
    base_svd_drop: int = 0
    #: the reader's own notes on where the stored tensors are (tensor names, block counts)
    recipe: dict[str, Any] = field(default_factory=dict)

    @property
    def module(self) -> str:
        return self.key[: -len(".weight")] if self.key.endswith(".weight") else self.key

    @property
    def short_name(self) -> str:
        return short_name(self.module)

    @property
    def in_features(self) -> int:
        return int(self.a_shape[1])

    @property
    def out_features(self) -> int:
        return int(self.b_shape[0])

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.a_shape[2:])

    @property
    def delta_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, *self.kernel_size)

    @property
    def is_dora(self) -> bool:
        return self.magnitude_shape is not None

    @property
    def needs_base(self) -> bool:
        """True when the update depends on the base weight's values (KaSA), see `resolve_kasa`."""
        return self.base_svd_drop > 0

    @property
    def num_params(self) -> int:
        stored = self.stored_params
        n = stored if stored is not None else math.prod(self.a_shape) + math.prod(self.b_shape)
        if self.bias_shape:
            n += math.prod(self.bias_shape)
        if self.magnitude_shape:
            n += math.prod(self.magnitude_shape)
        return n

    def has_tensors(self) -> bool:
        return self.A is not None and self.B is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The loaded tensors by role: ``A``, ``B``, ``bias``, ``magnitude`` (those that are there)."""
        roles = {"A": self.A, "B": self.B, "bias": self.bias, "magnitude": self.magnitude}
        return {role: t for role, t in roles.items() if t is not None}

    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scale * B @ A`` in module-weight layout (dense; for tests and small modules). For a KaSA
        module not yet resolved against its base this is the adapter's own part only (PEFT's
        ``get_delta_weight``), without the base's removed singular components."""
        if self.A is None or self.B is None:
            raise ValueError(f"{self.key}: tensors were not loaded")
        import torch

        dt = dtype or torch.float32
        a = self.A.to(dt).reshape(self.rank, -1)
        b = self.B.to(dt).reshape(self.B.shape[0], self.rank)
        return (self.scale * (b @ a)).reshape(self.delta_shape)

    def with_tensors(self, **changes: Any) -> LoraModule:
        return replace(self, **changes)


@dataclass
class LoraWeights(Mapping[str, LoraModule]):
    """An adapter: modules keyed by base weight key, plus what else the format carries."""

    modules: dict[str, LoraModule]
    format: str  # "peft" | "kohya"
    config: dict[str, Any] = field(default_factory=dict)  # adapter_config.json as read (extra keys kept)
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors __metadata__
    #: full weights that replace base weights outright: modules_to_save and saved embedding layers
    replacements: dict[str, Any] = field(default_factory=dict)  # key -> tensor or None (not loaded)
    replacement_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    base_model: str | None = None
    use_rslora: bool = False
    #: replacement key -> the tensor name it was stored under in the file
    source_names: dict[str, str] = field(default_factory=dict)
    #: tensors in the file that the format does not explain (reported by validation)
    unexplained: list[str] = field(default_factory=list)

    def __getitem__(self, key: str) -> LoraModule:
        return self.modules[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def dtype(self) -> str:
        dts = {m.dtype for m in self.modules.values()}
        return dts.pop() if len(dts) == 1 else ("mixed" if dts else "none")

    @property
    def num_params(self) -> int:
        n = sum(m.num_params for m in self.modules.values())
        n += sum(math.prod(s) for s in self.replacement_shapes.values())
        return n

    @property
    def target_modules(self) -> list[str]:
        return sorted({m.short_name for m in self.modules.values()})

    @property
    def has_dora(self) -> bool:
        return any(m.is_dora for m in self.modules.values())

    @property
    def variants(self) -> list[str]:
        """The variants other than plain LoRA that the modules were stored as (sorted)."""
        return sorted({m.variant for m in self.modules.values()} - {"lora"})

    @property
    def needs_base(self) -> bool:
        """True when some module's update depends on the base weight's values (KaSA)."""
        return any(m.needs_base for m in self.modules.values())

    def describe_kind(self) -> str:
        """One line saying what the adapter is, e.g. ``LoHa (held as exact LoRA factors)``."""
        names = [VARIANT_NAMES[v] for v in self.variants]
        if not names:
            return "LoRA"
        plain = any(m.variant == "lora" for m in self.modules.values())
        what = " + ".join((["LoRA"] if plain else []) + names)
        stored = sorted({int(m.recipe["rank"]) for m in self.modules.values() if m.recipe.get("rank")})
        if stored:  # LoHa / LoKr: the rank the file was made with (the factors' rank is `rank`)
            what += f" r={stored[0]}" if len(stored) == 1 else f" r={stored[0]}..{stored[-1]}"
        note = f"held as exact LoRA factors of rank {self.rank}"
        if self.needs_base:
            note += "; it removes the base weight's r smallest singular components, computed from the base"
        return f"{what} ({note})"


# ------------------------------------------------------------------------------ exact factor forms


def flat_conv_fits(m: LoraModule, base_shape: tuple[int, ...]) -> bool:
    """True when ``m`` is a LoHa / LoKr update stored flat, ``(out, in * kh * kw)``, for a conv weight
    ``(out, in, kh, kw)`` (PEFT without ``use_effective_conv2d``, LyCORIS without Tucker): the same
    numbers in the same order, so it applies row for row."""
    return (
        m.variant in ("loha", "lokr")
        and m.kind == "linear"
        and len(base_shape) > 2
        and int(base_shape[0]) == m.out_features
        and math.prod(int(d) for d in base_shape[1:]) == m.in_features
    )


def conv_view(m: LoraModule, base_shape: tuple[int, ...]) -> LoraModule:
    """A flat LoHa / LoKr module (`flat_conv_fits`) as the conv LoRA it equals: the same numbers, A
    viewed as ``(R, in, kh, kw)`` and B as ``(out, R, 1, 1)`` (for a runtime that applies conv LoRA)."""
    if not flat_conv_fits(m, base_shape):
        raise ValueError(f"{m.key}: not a flat update of a conv weight {list(base_shape)}")
    tail = tuple(int(d) for d in base_shape[1:])
    ones = (1,) * (len(tail) - 1)
    return replace(
        m,
        kind="conv",
        A=None if m.A is None else m.A.reshape(m.rank, *tail),
        B=None if m.B is None else m.B.reshape(m.out_features, m.rank, *ones),
        a_shape=(m.rank, *tail),
        b_shape=(m.out_features, m.rank, *ones),
    )


def exact_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors ``(A, B)`` with ``B @ A == delta`` exactly, of rank ``min(out, in * kernel)``.

    ``delta`` is ``(out, in[, kh, kw])``; one factor is the update itself and the other an identity
    (A is ``(R, in[, kh, kw])``, B is ``(out, R[, 1, 1])`` as for a conv LoRA).
    """
    import torch

    out = int(delta.shape[0])
    tail = tuple(int(d) for d in delta.shape[1:])
    cols = math.prod(tail)
    ones = (1,) * (len(tail) - 1)
    if out <= cols:
        eye = torch.eye(out, dtype=delta.dtype, device=delta.device)
        return delta.reshape(out, *tail).contiguous(), eye.reshape(out, out, *ones)
    eye = torch.eye(cols, dtype=delta.dtype, device=delta.device).reshape(cols, *tail)
    return eye, delta.reshape(out, cols, *ones).contiguous()


def exact_rank(out: int, cols: int, rank: int) -> int:
    """The rank of the factors `lowrank_or_exact` gives: ``rank`` when smaller than ``min(out, cols)``."""
    return rank if rank < min(out, cols) else min(out, cols)


def lowrank_or_exact(
    a: torch.Tensor, b: torch.Tensor, tail: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``a`` ``(R, cols)`` and ``b`` ``(out, R)`` in module layout (A ``(R, *tail)``, B ``(out, R,
    1, ...)``), or `exact_factors` of their product when ``R`` is not below ``min(out, cols)``."""
    out, rank = int(b.shape[0]), int(a.shape[0])
    cols = int(a.reshape(rank, -1).shape[1])
    ones = (1,) * (len(tail) - 1)
    if rank < min(out, cols):
        return a.reshape(rank, *tail).contiguous(), b.reshape(out, rank, *ones).contiguous()
    return exact_factors((b.reshape(out, rank) @ a.reshape(rank, cols)).reshape(out, *tail))


def resolve_kasa(m: LoraModule, base_weight: torch.Tensor) -> LoraModule:
    """A KaSA module made base-independent: its update on ``base_weight`` ``(out, in)``, exactly.

    PEFT replaces the base weight ``W0`` by its SVD truncated to the ``k - r`` largest components
    (``k = min(out, in)``, in fp32) and adds ``scale * B @ diag(d) @ A``. Relative to ``W0`` that is
    ``scale * B' @ A - U_r S_r Vh_r`` (the removed components), so the result is an ordinary module of
    rank ``2r``: ``A = [A; Vh_r]``, ``B = [B'; -U_r S_r / scale]``. Modules that need no base come back
    as they are.
    """
    if not m.needs_base:
        return m
    import torch

    if m.A is None or m.B is None:
        raise ValueError(f"{m.key}: tensors were not loaded")
    w = base_weight.detach().to(torch.float32)
    if w.dim() != 2 or tuple(w.shape) != (m.out_features, m.in_features):
        raise ValueError(
            f"{m.key}: KaSA needs the base weight of shape {[m.out_features, m.in_features]}, got {list(w.shape)}"
        )
    r = m.base_svd_drop
    k = min(w.shape)
    if r >= k:
        raise ValueError(f"{m.key}: KaSA removes {r} singular components but the base weight has only {k}")
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    keep = k - r
    dev = m.A.device
    a = torch.cat([m.A.detach().to(torch.float32), vh[keep:, :].to(dev)], dim=0)
    dropped = (u[:, keep:] * s[keep:]).to(dev) / float(m.scale)
    b = torch.cat([m.B.detach().to(torch.float32), -dropped], dim=1)
    rank = int(a.shape[0])
    return replace(
        m,
        A=a,
        B=b,
        rank=rank,
        alpha=m.scale * rank,
        a_shape=tuple(int(d) for d in a.shape),
        b_shape=tuple(int(d) for d in b.shape),
        dtype="F32",
        base_svd_drop=0,
        stored_params=m.stored_params if m.stored_params is not None else m.num_params,
    )
