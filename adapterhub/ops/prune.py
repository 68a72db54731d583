"""PEFT's elementwise pruning of dense deltas (``peft.utils.merge_utils``), for the TIES / DARE methods.

Torch is imported only when a function runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """PEFT's ``magnitude_based_pruning``: keep the ``int(density * numel)`` largest ``|t|``."""
    import torch

    if density >= 1.0:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    k = int(density * t.numel())
    top = torch.topk(t.abs().reshape(-1), k=k, largest=True)
    mask[top[1]] = 1
    return t * mask.reshape(t.shape)


def _random_prune(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """PEFT's ``random_pruning`` with ``rescale=True``: a Bernoulli(density) mask, divided by density."""
    import torch

    if density >= 1.0:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def _majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    majority = (magnitude >= 0).to(sign.dtype) * 2 - 1
    return sign == majority
