"""The fast path of adapted ``nn.Linear`` modules: a forward of their own instead of a forward hook.

For a plain ``nn.Linear`` the runtime replaces the module's ``forward`` (an instance attribute,
removed again on detach) with `fused_linear`, which runs torch's own forward and adds the low-rank
term into its output in place (``out.addmm_(h, Bs_cat)``, or ``baddbmm_`` for long rows over several
adapters). That skips the hook machinery of ``nn.Module.__call__`` (a decode step is bound by the
host's Python and kernel launches), and it lets siblings that see the same input (q, k and v; gate and
up) share ``h = x @ A.T``: a `Family` computes it once for all of them, as one GEMM over their
concatenated A factors (masked per row once), and each member takes its columns. A member that turns
out to see another input (cross attention), or an input changed in place, leaves its family for good.

Measured on an H200 and kept out: writing the low-rank term first and letting the base GEMM accumulate
onto it (``delta.addmm_(x, W.T)``, one pass over the output less) was no faster there (its base GEMMs,
with ``beta=1``, ran 3% slower, which ate the pass saved), and rows without an adapter would no longer
equal the base bit for bit.

Anything this path does not cover (DoRA, ``lora_bias``, replacements, gradients through the base, a
selection of none) runs the module's own forward and then the general hook math of `Layer`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._layers import Layer, scale_rows

if TYPE_CHECKING:
    from ._select import Selection


def install(layer: Layer) -> None:
    """Give ``layer`` its fused forward when it is a plain ``nn.Linear``, else its forward hook."""
    module = layer.module
    plain = (
        layer.kind == "linear"
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
        dim = 1 if per_row else 0  # (n, M*r, in) per row, else (K*r, in)
        for m in live:
            first = m._row_factors(sel, n, False)[0] if per_row else m._gathered(sel, False)[0]
            assert first is not None
            offsets[id(m)] = col
            col += int(first.shape[dim])
            parts.append(first)
        cat = torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]
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
            h = torch.mm(xin, first.T)
            if sel.rows is not None:
                h = scale_rows(h, n, self._mask(sel, n, h.dtype))
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


def fused_linear(layer: Layer, original: Any, x: torch.Tensor) -> torch.Tensor:
    """The adapted forward of a plain ``nn.Linear`` (see the module docstring)."""
    state = layer.state
    sel = state.sel
    module = layer.module
    if sel is None or state.passthrough or layer.first is None:
        return original(x)
    if (
        (sel.replace and layer.replacements)
        or layer.bias is not None
        or (sel.dora and layer.gm1 is not None)
        or x.dim() < 2
        or (torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad))
    ):
        out = original(x)
        res = layer(module, (x,), {}, out)
        return out if res is None else res
    compiling = torch.compiler.is_compiling()
    n = int(x.shape[0])
    if sel.same_rows is not None:
        sel.check_rows(n)
    xin = layer.lin_input(x)
    per_row = layer.per_row_wanted(sel, x, n)
    h = None
    if not compiling:  # (a compiled graph computes each member's own: no Python state to guard on)
        fam = layer.family
        if fam is not None and len(fam.members) > 1:
            h = fam.h(layer, sel, x, xin, n, per_row)
    out = original(x)
    if per_row:
        return layer.per_row(sel, x, out, n, compiling, h)
    return layer.concat(sel, xin, out, n, compiling, h)
