"""The fast path of adapted ``nn.Linear`` modules: the low-rank term first, the base GEMM onto it.

A forward hook sees the base output only after it is written, so adding ``delta`` there reads and
writes the whole output a second time. For a plain ``nn.Linear`` the runtime instead replaces the
module's ``forward`` (an instance attribute, removed again on detach) with `fused_linear`:

    delta = (x @ A_cat.T [* mask]) @ Bs_cat        # writes the output once (a rank-K*r GEMM)
    delta.addmm_(x, W.T)                          # the base GEMM, reading delta in its epilogue

so the output is written once by the small GEMM and once by the base GEMM, whose read of ``delta``
overlaps its own compute. ``x @ A_cat.T`` is shared by the siblings that see the same input (q, k and
v; gate and up): a `Family` computes it once, for all of them, as one GEMM over their concatenated A
factors, and each member takes its columns. A member that turns out to see another input (cross
attention) leaves its family for good.

Anything this path does not cover (DoRA, ``lora_bias``, replacements, gradients through the base, a
selection of none) runs the module's own forward and then the general hook math of `Layer`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._layers import LONG_ROWS, Layer

if TYPE_CHECKING:
    from ._select import Selection

#: False: every layer applies through a forward hook (what the fused path is measured against)
FUSED = True


def install(layer: Layer) -> None:
    """Give ``layer`` its fused forward when it is a plain ``nn.Linear``, else its forward hook."""
    module = layer.module
    plain = (
        FUSED
        and layer.kind == "linear"
        and isinstance(module, nn.Linear)
        and type(module).forward is nn.Linear.forward
        and "forward" not in module.__dict__
        and not module._forward_pre_hooks
        and module.weight.device.type != "meta"
    )
    if not plain:
        layer.hook()
        return
    layer.forward = functools.partial(fused_linear, layer, module.forward)
    module.forward = layer.forward
    parent = layer.name.rsplit(".", 1)[0] if "." in layer.name else ""
    key = (parent, layer.in_f, str(layer.dtype), str(layer.device))
    layer.family = layer.state.families.setdefault(key, Family())
    layer.family.join(layer)


class Family:
    """Adapted sibling linears with the same input width: one GEMM over their A factors."""

    def __init__(self) -> None:
        self.members: list[Layer] = []
        self._x: torch.Tensor | None = None  # the input the pending ``h`` was computed from
        self._x_version = -1
        self._h: torch.Tensor | None = None
        self._offsets: dict[int, int] = {}  # id(layer) -> first column of its slice in ``h``
        self._left: set[int] = set()  # members that have not taken their slice of ``h`` yet
        self._cache: tuple[Any, ...] | None = None

    def join(self, layer: Layer) -> None:
        self.members.append(layer)
        self.reset()

    def leave(self, layer: Layer) -> None:
        if layer in self.members:
            self.members.remove(layer)
        layer.family = None
        self.reset()

    def reset(self) -> None:
        self._x = self._h = None
        self._cache = None
        self._left = set()

    def _factors(self, sel: Selection, n: int, per_row: bool) -> tuple[torch.Tensor, dict[int, int]]:
        """The members' first factors concatenated along the rank (masked rows: with their masks)."""
        live = [m for m in self.members if m.first is not None]
        key = (sel, sel.version, n, per_row, tuple((id(m), m.version) for m in live))
        c = self._cache
        if c is not None and c[0] == key:
            return c[1], c[2]
        offsets: dict[int, int] = {}
        parts = []
        col = 0
        for m in live:
            if per_row:
                first = m._row_factors(sel, n, False)[0]  # (n, M*r, in)
                offsets[id(m)] = col
                col += int(first.shape[1])
            else:
                first = m._gathered(sel, False)[0]  # (K*r, in)
                assert first is not None
                offsets[id(m)] = col
                col += int(first.shape[0])
            parts.append(first)
        cat = torch.cat(parts, dim=1 if per_row else 0) if len(parts) > 1 else parts[0]
        self._cache = (key, cat, offsets)
        return cat, offsets

    def h(
        self, layer: Layer, sel: Selection, x: torch.Tensor, xin: torch.Tensor, n: int, per_row: bool
    ) -> torch.Tensor | None:
        """``x @ A.T`` of ``layer`` (masked per row where the selection is), shared with its siblings;
        None when ``layer`` has just left the family (it saw another input than its siblings)."""
        lid = id(layer)
        if self._h is not None and lid in self._left:
            if self._x is not x or x._version != self._x_version:
                self.leave(layer)
                return None
            self._left.discard(lid)
            h = self._h
            if not self._left:
                self._x = self._h = None  # every member took its part: hold no activation
            return _columns(h, self._offsets[lid], layer, sel, per_row)
        first, offsets = self._factors(sel, n, per_row)
        if per_row:
            h = torch.bmm(xin.view(n, -1, layer.in_f), first.transpose(1, 2))
        else:
            h = xin @ first.T
            if sel.rows is not None:
                h = _masked(h, n, self._mask(sel, n, h.dtype))
        self._left = {k for k in offsets if k != lid}
        self._x, self._x_version, self._h, self._offsets = x, x._version, h, offsets
        if not self._left:
            self._x = self._h = None
        return _columns(h, offsets[lid], layer, sel, per_row)

    def _mask(self, sel: Selection, n: int, dtype: torch.dtype) -> torch.Tensor:
        key = ("mask", n, dtype, tuple((id(m), m.rank) for m in self.members if m.first is not None))
        hit = sel._expanded.get(key)
        if hit is None:
            masks = [sel.mask_for(n, m.rank, dtype) for m in self.members if m.first is not None]
            hit = torch.cat(masks, dim=1) if len(masks) > 1 else masks[0]
            sel._expanded[key] = hit
        return hit  # type: ignore[return-value]


def _columns(h: torch.Tensor, off: int, layer: Layer, sel: Selection, per_row: bool) -> torch.Tensor:
    m = int(sel.row_slots.shape[1]) if per_row and sel.row_slots is not None else sel.k
    return h[..., off : off + m * layer.rank]


def _masked(h: torch.Tensor, n: int, mask: torch.Tensor) -> torch.Tensor:
    """``h`` (n * tokens, C) times the per-row column scales ``mask`` (n, C), in place."""
    if h.shape[0] == n:
        return h.mul_(mask)
    return h.view(n, -1, h.shape[-1]).mul_(mask.unsqueeze(1)).view(h.shape)


BASE_FIRST = True


def fused_linear(layer: Layer, original: Any, x: torch.Tensor) -> torch.Tensor:
    """The adapted forward of a plain ``nn.Linear`` (see the module docstring)."""
    state = layer.state
    sel = state.sel
    module = layer.module
    if sel is None or state.passthrough or layer.first is None:
        return original(x)
    w = module.weight
    if (
        (sel.replace and layer.replacements)
        or layer.bias is not None
        or (sel.dora and layer.gm1 is not None)
        or x.dim() < 2
        or x.dtype != w.dtype
        or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    ):
        out = original(x)
        res = layer(module, (x,), {}, out)
        return out if res is None else res
    compiling = torch.compiler.is_compiling()
    n = int(x.shape[0])
    if sel.same_rows is not None:
        sel.check_rows(n)
    x2d = x.reshape(-1, layer.in_f)
    xin = x2d if x2d.dtype == layer.dtype else x2d.to(layer.dtype)
    masked = sel.rows is not None
    per_row = bool(
        masked
        and sel.row_slots is not None
        and sel.k > sel.row_slots.shape[1]
        and x2d.shape[0] >= LONG_ROWS * n
    )
    h = None
    if not compiling:  # (a compiled graph computes each member's own: no Python state to guard on)
        fam = layer.family
        if fam is not None and len(fam.members) > 1:
            h = fam.h(layer, sel, x, xin, n, per_row)
    bias = module.bias
    if per_row:
        first, second = layer._row_factors(sel, n, compiling)
        if h is None:
            h = torch.bmm(xin.view(n, -1, layer.in_f), first.transpose(1, 2))
        if BASE_FIRST:
            out = original(x)
            if second.dtype == out.dtype and out.is_contiguous():
                out.view(n, -1, layer.out_f).baddbmm_(h, second)
                return out
            return out + torch.bmm(h, second).to(out.dtype).view(out.shape)
        delta = torch.bmm(h, second).view(-1, layer.out_f)
    else:
        first, second = layer._gathered(sel, compiling)
        assert first is not None
        if h is None:
            h = xin @ first.T
            if masked and compiling:
                mask = sel.coef_for(n).repeat_interleave(layer.rank, dim=1).to(h.dtype)
                h = (h.view(n, -1, h.shape[-1]) * mask.unsqueeze(1)).view(h.shape)
            elif masked:
                h = _masked(h, n, sel.mask_for(n, layer.rank, h.dtype))
        if BASE_FIRST:
            out = original(x)
            o2 = out.view(-1, layer.out_f)
            if second.dtype == out.dtype and out.is_contiguous():
                o2.addmm_(h, second)
                return out
            return out + (h @ second).to(out.dtype).view(out.shape)
        if bias is not None and bias.dtype == second.dtype:
            delta = torch.addmm(bias, h, second)
            bias = None
        else:
            delta = h @ second
    if delta.dtype != x.dtype:
        delta = delta.to(x.dtype)
    delta.addmm_(x2d, w.T)
    if bias is not None:
        delta.add_(bias)
    return delta.view(*x.shape[:-1], layer.out_f)
