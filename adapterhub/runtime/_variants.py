"""What some adapters add to a layer's plain LoRA term: one small strategy object per variant.

A `Layer` holds at most one of each, made when the first resident adapter that needs it is written, and
consults them only when the selection uses a slot that has one (`Layer.plain` is the one test in the hot
path). Each keeps one value per slot, like the LoRA banks, so slots line up everywhere.

- `LoraBias` (PEFT ``lora_bias=True``): ``y += sum_k c_k * s_k * bias_k``.
- `Dora` (PEFT ``use_dora=True``): ``y = G * (base - b) + b + G * delta`` with ``G = 1 + sum_k c_k (g_k - 1)``
  per output feature and ``g = m / ||W0 + s B A||`` (computed once at load, from the unmerged base).
- `ModulesToSave` (PEFT ``modules_to_save``): rows whose slot replaces the module are recomputed with the
  replacement parameters (whole weights, not low-rank terms: one call per replacing slot in the batch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import nn

    from ._select import RuntimeState, Selection


def _grown(t: torch.Tensor, cap: int) -> torch.Tensor:
    out = torch.zeros((cap, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out


class LoraBias:
    """``s * lora_B.bias`` per slot, ``(cap, out)``. Semantics::

    for row, k: y[row] += coef[row, k] * bank[slot_k]
    """

    def __init__(self, cap: int, out_f: int, dtype: torch.dtype, device: torch.device) -> None:
        self.bank = torch.zeros((cap, out_f), dtype=dtype, device=device)

    def write(self, slot: int, bias: torch.Tensor, scale: float) -> None:
        self.bank[slot] = (scale * bias.detach().to(self.bank.device, torch.float32).reshape(-1)).to(
            self.bank.dtype
        )

    def grow(self, cap: int) -> None:
        self.bank = _grown(self.bank, cap)

    def clear(self, slot: int) -> None:
        self.bank[slot].zero_()

    def add(self, delta: torch.Tensor, sel: Selection, coef: torch.Tensor, view: Any) -> torch.Tensor:
        return delta + view(coef @ self.bank.index_select(0, sel.idx))

    def merged_bias(self, base: torch.Tensor, slots: dict[int, float]) -> torch.Tensor:
        """The fp32 bias with ``slots`` folded in."""
        b = base.detach().to(torch.float32)
        for sl, w in slots.items():
            b = b + w * self.bank[sl].to(torch.float32)
        return b

    def used_by(self, slots: list[int]) -> bool:
        return any(bool(self.bank[s].any()) for s in slots)


class Dora:
    """DoRA's magnitudes as ``g - 1`` per slot, ``(cap, out)`` (zero: no rescaling). Semantics::

    G[row] = 1 + sum_k coef[row, k] * bank[slot_k]
    y[row] = G[row] * (base[row] - b) + b + G[row] * delta[row]        # b: the module's own bias
    """

    def __init__(self, cap: int, out_f: int, dtype: torch.dtype, device: torch.device) -> None:
        self.bank = torch.zeros((cap, out_f), dtype=dtype, device=device)

    def write(self, slot: int, gm1: torch.Tensor) -> None:
        self.bank[slot] = gm1.to(self.bank.device, self.bank.dtype)

    def grow(self, cap: int) -> None:
        self.bank = _grown(self.bank, cap)

    def clear(self, slot: int) -> None:
        self.bank[slot].zero_()

    def apply(
        self,
        output: torch.Tensor,
        delta: torch.Tensor,
        sel: Selection,
        coef: torch.Tensor,
        view: Any,
        base_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        g = view(1 + coef @ self.bank.index_select(0, sel.idx)).to(output.dtype)
        if base_bias is not None:
            return g * (output - base_bias) + base_bias + g * delta.to(output.dtype)
        return g * (output + delta.to(output.dtype))

    def g(self, slot: int) -> torch.Tensor:
        """``g`` of ``slot`` in fp32 ``(out,)``."""
        return 1 + self.bank[slot].to(torch.float32)

    @staticmethod
    def gm1(norm: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
        """``m / ||W0 + s B A|| - 1`` from the per-feature norms (PEFT's DoRA forward)."""
        return magnitude.detach().to(norm.device, torch.float32).reshape(-1) / norm - 1


class ModulesToSave:
    """Replacement parameters per slot (``slot -> parameter name -> tensor``). Semantics::

    for slot in the selection's replacing slots:
        y[rows of slot] = module(x[rows of slot]) with the slot's parameters
    """

    def __init__(self) -> None:
        self.params: dict[int, dict[str, torch.Tensor]] = {}

    def __bool__(self) -> bool:
        return bool(self.params)

    def replace(
        self,
        module: nn.Module,
        state: RuntimeState,
        sel: Selection,
        x: torch.Tensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: torch.Tensor,
        n: int,
    ) -> torch.Tensor:
        for slot in sel.replace:
            params = self.params.get(slot)
            if params is None:
                continue
            rows = sel.rows_for(slot, n, x.device) if sel.rows is not None else None
            call_args = args if rows is None else (x.index_select(0, rows), *args[1:])
            state.passthrough = True  # the module's own hook must not fire inside
            try:
                y = torch.func.functional_call(module, params, call_args, kwargs)
            finally:
                state.passthrough = False
            output = y if rows is None else output.index_copy(0, rows, y.to(output.dtype))
        return output
