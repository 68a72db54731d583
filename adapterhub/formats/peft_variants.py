"""PEFT LoRA variants stored as lora_A / lora_B with a twist: block-diagonal LoRA and KaSA.

- Block-diagonal LoRA (``use_bdlora``): for modules whose name contains a ``target_modules_bd_a``
  pattern, ``lora_A`` is stored compact as ``(r, in / n)``: its ``n`` row chunks are the blocks of a
  ``(r, in)`` block-diagonal matrix (``torch.block_diag``); likewise ``lora_B`` ``(out, r / n)`` for
  ``target_modules_bd_b``. Expanded with their zeros they are ordinary factors: the update is exactly
  PEFT's ``scale * B @ A``.
- KaSA (``kasa_config``): ``lora_diag`` ``(r,)`` sits between the factors, ``scale * B @ diag(d) @ A``,
  read as ``B * d``; and PEFT removes the base weight's ``r`` smallest singular components when it
  loads the adapter, which depends on the base: the module says so (``base_svd_drop``) and
  `adapterhub.lora.resolve_kasa` computes it where the base weight is known.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["bd_side", "expand_blocks", "kasa_problem"]


def bd_side(config: dict[str, Any], module: str, kind: str, use_dora: bool) -> tuple[str | None, int] | str:
    """Which factor of ``module`` PEFT makes block-diagonal (``"A"``, ``"B"`` or None) and the block
    count, or why PEFT could not load it."""
    bd = config.get("use_bdlora")
    if not bd:
        return None, 1
    if not isinstance(bd, dict):
        return "use_bdlora must be an object (target_modules_bd_a, target_modules_bd_b, nblocks)"
    n = bd.get("nblocks", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return f"use_bdlora.nblocks is {n!r}; it must be a positive integer"
    in_a = any(str(p) in module for p in bd.get("target_modules_bd_a") or [])
    in_b = any(str(p) in module for p in bd.get("target_modules_bd_b") or [])
    if in_a and in_b:
        return "matches both target_modules_bd_a and target_modules_bd_b, which PEFT refuses"
    strict = bd.get("match_strict", True)
    if kind != "linear" or use_dora:
        what = "DoRA" if use_dora else f"a {kind} layer"
        return f"block-diagonal LoRA on {what} is a combination PEFT does not load"
    if not (in_a or in_b):
        if strict:
            return "matches neither target_modules_bd_a nor target_modules_bd_b with match_strict, which PEFT refuses"
        return None, 1
    return ("A" if in_a else "B"), n


def expand_blocks(t: torch.Tensor, n: int) -> torch.Tensor:
    """PEFT's ``weight_as_blockdiagonal_matrix``: the ``n`` row chunks of ``t`` on a block diagonal."""
    import torch

    return torch.block_diag(*torch.chunk(t, n, dim=0))


def kasa_problem(
    config: dict[str, Any], kind: str, rank: int, diag: Any, use_dora: bool, bias: bool
) -> str | None:
    """Why a module of a KaSA config is not one PEFT loads (or adapterhub computes), or None."""
    if kind != "linear":
        return f"KaSA works on linear layers only; PEFT refuses it on a {kind} layer"
    if use_dora:
        return "KaSA with DoRA is a combination PEFT does not load"
    if config.get("fan_in_fan_out"):
        return "KaSA does not support fan_in_fan_out (GPT-2 Conv1D) layers; PEFT refuses them"
    if bias:
        return (
            "KaSA with lora_bias is not supported by adapterhub yet; it refuses the adapter rather than guess"
        )
    if diag is None:
        return "kasa_config is set but there is no lora_diag for it"
    if tuple(diag.shape) != (rank,):
        return f"lora_diag has shape {list(diag.shape)}, expected [{rank}]"
    return None
