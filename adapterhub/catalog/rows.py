"""Catalog rows made from an adapter read by `adapterhub.formats` (what `Library.ingest` inserts)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..lora import LoraModule, LoraWeights


def adapter_row(weights: LoraWeights, fmt: str, digest: str, size: int) -> dict[str, Any]:
    """The ``adapters`` row of an adapter whose weights file has sha256 ``digest`` (files total ``size``)."""
    cfg = weights.config
    meta = {k: v for k, v in weights.metadata.items() if not (k == "format" and v == "pt")}
    if weights.variants:  # LoHa / LoKr / block-diagonal / KaSA, held as exact LoRA factors
        meta["adapterhub.kind"] = weights.describe_kind()
    alphas = {m.alpha for m in weights.modules.values()}
    alpha = float(cfg["lora_alpha"]) if "lora_alpha" in cfg else (alphas.pop() if len(alphas) == 1 else None)
    if fmt == "kohya" and len(alphas) > 1:
        alpha = None
    return {
        "sha256": digest,
        "format": fmt,
        "peft_type": cfg.get("peft_type", "LORA") if fmt == "peft" else None,
        "base_model": weights.base_model,
        "base_revision": cfg.get("revision"),
        "rank": weights.rank,
        "alpha": alpha,
        "use_rslora": weights.use_rslora,
        "use_dora": weights.has_dora,
        "rank_pattern": cfg.get("rank_pattern") or {},
        "alpha_pattern": cfg.get("alpha_pattern") or {},
        "task_type": cfg.get("task_type"),
        "dtype": weights.dtype,
        "num_params": weights.num_params,
        "size_bytes": size,
        "num_modules": len(weights.modules),
        "target_modules": weights.target_modules,
        "config": cfg or None,
        "extra": meta or None,
        "replacements": {k: list(v) for k, v in weights.replacement_shapes.items()} or None,
    }


def module_row(m: LoraModule) -> dict[str, Any]:
    return {
        "module": m.module,
        "short_name": m.short_name,
        "kind": m.kind,
        "rank": m.rank,
        "alpha": m.alpha,
        "scale": m.scale,
        "in_features": m.in_features,
        "out_features": m.out_features,
        "kernel_size": list(m.kernel_size) or None,
        "dora": m.is_dora,
        "dtype": m.dtype,
        "lora_bias": m.bias_shape is not None,
    }
