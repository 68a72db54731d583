"""Extract a LoRA from a full fine-tune: per 2-D weight, the truncated SVD of ``W_ft - W_base``.

`extract` returns a `CombineResult` (a PEFT-format adapter of scale 1 per module, and its relative
Frobenius error against ``W_ft - W_base``); the SVD is exact (`_dense_truncate`) or randomized
(``torch.svd_lowrank``).

Torch is imported only when a function runs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from ..errors import BaseModelError, InvalidOptionError
from ..lora import LoraModule, LoraWeights, ModuleKind
from .lowrank import _check_keep, _check_rank, _dense_truncate, _pad, _split
from .result import CombineResult, Progress, _build_module, resolve_device

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = ["extract"]

_EMBEDDING_NAMES = ("wte", "wpe", "shared")


def _guess_kind(key: str) -> ModuleKind:
    name = key.removesuffix(".weight").rsplit(".", 1)[-1]
    return "embedding" if "embed" in name or name in _EMBEDDING_NAMES else "linear"


def extract(
    base_tensors: Mapping[str, torch.Tensor],
    finetuned_tensors: Mapping[str, torch.Tensor],
    *,
    rank: int | Literal["auto"],
    keep: float = 0.99,
    max_rank: int | None = None,
    svd: Literal["auto", "exact", "randomized"] = "auto",
    niter: int = 4,
    keys: Iterable[str] | None = None,
    kinds: Mapping[str, ModuleKind] | None = None,
    base_model: str | None = None,
    device: str | torch.device = "auto",
    progress: Progress | None = None,
) -> CombineResult:
    """A LoRA that approximates a full fine-tune: per 2-D ``*.weight`` tensor, the truncated SVD of
    ``W_ft - W_base`` (fp32, on the GPU when there is one).

    Args:
        base_tensors, finetuned_tensors: tensors by checkpoint key (any mapping, e.g. a lazy one over
            ``safe_open``); tensors are fetched one key at a time.
        rank: an integer, or ``"auto"``: per module the smallest rank keeping ``keep`` of the energy
            (``||W_ft - W_base||_F^2``), at most ``max_rank``.
        svd: ``"exact"`` (``torch.linalg.svd``; on a GPU an fp64 Gram eigendecomposition), ``"randomized"`` (``torch.svd_lowrank`` with
            ``niter`` power iterations and 10 extra columns), or ``"auto"``: randomized when the target
            rank is known and small against the matrix, exact otherwise.
        keys: restrict to these keys (default: every key in both mappings).
        kinds: the module kind per key; by default a key whose module name holds ``embed`` (or is
            ``wte`` / ``wpe`` / ``shared``) is an embedding, the rest linear.
        base_model: recorded as ``base_model_name_or_path``.

    Unchanged tensors and tensors that are not 2-D floating ``*.weight`` are skipped (listed in
    ``params["skipped"]``). Raises `BaseModelError` when a key's shapes differ between the two.
    """
    import torch

    _check_rank(rank, allow_none=False)
    _check_keep(keep)
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 1):
        raise InvalidOptionError(f"max_rank must be a positive integer, got {max_rank!r}")
    if svd not in ("auto", "exact", "randomized"):
        raise InvalidOptionError(f"svd must be 'auto', 'exact' or 'randomized', got {svd!r}")
    dev = resolve_device(device)
    wanted = list(keys) if keys is not None else [k for k in finetuned_tensors if k in base_tensors]
    modules: dict[str, LoraModule] = {}
    errors: dict[str, float] = {}
    skipped: list[str] = []
    dtypes: set[torch.dtype] = set()
    err_total = norm_total = 0.0
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, ModuleKind]] = {}
    with torch.no_grad():
        for done, key in enumerate(wanted, start=1):
            if key not in base_tensors or key not in finetuned_tensors:
                raise BaseModelError(
                    f"{key}: not in both checkpoints; pass keys present in base and fine-tune"
                )
            w0, w1 = base_tensors[key], finetuned_tensors[key]
            if tuple(w0.shape) != tuple(w1.shape):
                raise BaseModelError(
                    f"{key}: shape {list(w1.shape)} in the fine-tune but {list(w0.shape)} in the base; "
                    "extract needs the fine-tune of this very base"
                )
            diff = None
            if w1.dim() == 2 and key.endswith(".weight") and w1.is_floating_point():
                diff = w1.to(dev, torch.float32) - w0.to(dev, torch.float32)
            norm_sq = float(diff.double().pow(2).sum()) if diff is not None else 0.0
            if diff is None or norm_sq == 0.0:
                skipped.append(key)
            else:
                dtypes.add(w1.dtype)
                b, a = _factor_dense(diff, rank, keep, max_rank, svd, niter)
                err_sq = float(torch.addmm(diff, b, a, alpha=-1.0).double().pow(2).sum())
                factors[key] = (b.cpu(), a.cpu(), (kinds or {}).get(key) or _guess_kind(key))
                errors[key] = math.sqrt(err_sq / norm_sq)
                err_total += err_sq
                norm_total += norm_sq
            del w0, w1, diff
            if progress is not None:
                progress(done, len(wanted))
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    for key, (b, a, kind) in factors.items():
        r = int(a.shape[0])
        template = LoraModule(key, kind, r, float(r), 1.0, (r, int(a.shape[1])), (int(b.shape[0]), r))
        modules[key] = _build_module(key, template, kind, b, a, dtype)
    if not modules:
        raise BaseModelError(
            "the fine-tune does not differ from the base in any 2-D weight; nothing to extract"
        )
    config: dict[str, Any] = {"peft_type": "LORA", "base_model_name_or_path": base_model, "use_rslora": False}
    weights = LoraWeights(modules=modules, format="peft", config=config, base_model=base_model)
    from ..formats.peft import derive_config

    weights.config = derive_config(weights, config)
    if skipped:
        logger.info("extract: skipped %d tensors (unchanged, or not 2-D weights)", len(skipped))
    return CombineResult(
        weights=weights,
        method="extract",
        error=math.sqrt(err_total / norm_total) if norm_total > 0 else 0.0,
        module_errors=errors,
        params={
            "rank": rank,
            "keep": keep,
            "max_rank": max_rank,
            "svd": svd,
            "device": str(dev),
            "skipped": skipped,
        },
    )


def _factor_dense(
    d: torch.Tensor,
    rank: int | Literal["auto"],
    keep: float,
    max_rank: int | None,
    svd: str,
    niter: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of a dense matrix, singular values split evenly: ``(B, A)``."""
    import torch

    n = min(d.shape)
    target = rank if rank != "auto" else max_rank
    q = None if target is None else min(int(target) + 10, n)
    randomized = svd == "randomized" or (svd == "auto" and q is not None and q * 4 <= n)
    if not randomized or q is None:
        b, a = _dense_truncate(d, rank, keep, max_rank if rank == "auto" else None)
    else:
        u, s, v = torch.svd_lowrank(d, q=q, niter=niter)
        energy = s.double() ** 2
        if rank == "auto":
            # the share is of the whole energy, which the Frobenius norm gives exactly
            total = float(d.double().pow(2).sum())
            r = int((energy.cumsum(0) < keep * total * (1.0 - 1e-12)).sum()) + 1
            r = max(1, min(r, int(q)))
            if max_rank is not None:
                r = min(r, max_rank)
        else:
            r = min(int(rank), int(energy.numel()))
        b, a = _split(u, s, v.T, r)
    if rank != "auto":
        b, a = _pad(b, a, int(rank))
    return b, a
