"""The fast path of adapted ``nn.Linear`` modules: a forward of their own instead of a forward hook.

For a plain ``nn.Linear`` the runtime replaces the module's ``forward`` (an instance attribute,
removed again on detach) with `fused_linear`, which runs torch's own forward and adds the low-rank
term into its output in place (``out.addmm_(h, Bs_cat)``, or ``baddbmm_`` for long rows over several
adapters). That skips the hook machinery of ``nn.Module.__call__`` (a decode step is bound by the
host's Python and kernel launches), and it lets siblings that see the same input (q, k and v; gate and
up) share ``h = x @ A.T``: a `Family` computes it once for all of them, as one GEMM over their
concatenated A factors (masked per row once), and each member takes its columns. A member that turns
out to see another input (cross attention), or an input changed in place, leaves its family for good.

The first call under a selection (and input shape) goes through every check and leaves a `Plan`: the
factors, mask and views it needs; later calls with the same selection, banks and shape (each decode
step) run straight through it, a few attribute reads and the kernels. Plans are keyed by the selection
object and its version, the layer's bank version, the input's shape and dtype, and are never used with
gradients on or under ``torch.compile``.

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
    layer.state.layout += 1
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
        self.version = 0  # bumped whenever a member's banks change (their factors are re-gathered)
        self._x: torch.Tensor | None = None  # the input the pending slices were computed from
        self._x_version = -1
        #: id(member) -> its slice of the pending ``h``, for the members that have not taken theirs
        self._pending: dict[int, torch.Tensor] | None = None
        self._cache: tuple[Any, ...] | None = None

    def join(self, layer: Layer) -> None:
        self.members.append(layer)
        for m in self.members:  # a member planned alone would go on computing its own ``h``
            m.plan = None
        self.reset()

    def leave(self, layer: Layer) -> None:
        """(The others' plans stay good: they ask the family, which now leaves this one out.)"""
        if layer in self.members:
            self.members.remove(layer)
        layer.family = None
        layer.plan = None
        self.reset()

    def reset(self) -> None:
        self.version += 1
        self._x = self._pending = None
        self._cache = None

    def _factors(
        self, sel: Selection, n: int, per_row: bool, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[int], list[int]]:
        """The members' first factors concatenated along the rank, transposed for the GEMM; the
        per-row column scales (masked rows), each member's width and id."""
        key = (sel, sel.version, n, per_row, self.version, dtype)
        c = self._cache
        if c is not None and c[0] == key:
            return c[1]
        live = [m for m in self.members if m.first is not None]
        dim = 1 if per_row else 0  # (n, M*r, in) per row, else (K*r, in)
        parts: list[torch.Tensor] = []
        for m in live:
            first = m._row_factors(sel, n, False)[0] if per_row else m._gathered(sel, False)[0]
            assert first is not None
            parts.append(first)
        cat = torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]
        mask = None
        if not per_row and sel.rows is not None:
            masks = [sel.mask_for(n, m.rank, dtype) for m in live]
            mask = torch.cat(masks, dim=1) if len(masks) > 1 else masks[0]
        hit = (
            cat.transpose(1, 2) if per_row else cat.T,
            mask,
            [int(p.shape[dim]) for p in parts],
            [id(m) for m in live],
        )
        self._cache = (key, hit)
        return hit

    def h(
        self, layer: Layer, sel: Selection, x: torch.Tensor, xin: torch.Tensor, n: int, per_row: bool
    ) -> torch.Tensor | None:
        """``x @ A.T`` of ``layer`` (masked per row where the selection is), shared with its siblings;
        None when ``layer`` has just left the family (it saw another input than its siblings)."""
        lid = id(layer)
        pending = self._pending
        if pending is not None and lid in pending:
            if self._x is not x or x._version != self._x_version:
                self.leave(layer)
                return None
            mine = pending.pop(lid)
            if not pending:
                self._x = self._pending = None  # every member took its part: hold no activation
            return mine
        first_t, mask, widths, ids = self._factors(sel, n, per_row, xin.dtype)
        h = _first_product(xin, first_t, mask, n, per_row)
        pending = dict(zip(ids, h.split(widths, dim=-1), strict=True))
        mine = pending.pop(lid)
        if pending:
            self._pending, self._x, self._x_version = pending, x, x._version
        else:
            self._x = self._pending = None
        return mine


class Plan:
    """What `fused_linear` does for one layer under one selection and input shape, worked out once
    (every later call with the same selection, banks and shape runs straight through it)."""

    __slots__ = ("sel", "key", "n", "per_row", "first_t", "mask", "second", "family", "flat", "rows_view")

    def __init__(self, layer: Layer, sel: Selection, x: torch.Tensor, n: int, per_row: bool) -> None:
        self.sel = sel
        self.key = (sel.version, layer.version, x.shape, x.dtype)
        self.n = n
        self.per_row = per_row
        if per_row:
            first, self.second = layer._row_factors(sel, n, False)
            self.first_t = first.transpose(1, 2)
            self.mask = None
        else:
            first, self.second = layer._gathered(sel, False)  # type: ignore[assignment]
            assert first is not None
            self.first_t = first.T
            self.mask = sel.mask_for(n, layer.rank, layer.dtype) if sel.rows is not None else None
        fam = layer.family
        self.family = fam if fam is not None and len(fam.members) > 1 else None
        self.flat = (-1, layer.in_f)
        self.rows_view = (n, -1, layer.out_f) if per_row else (-1, layer.out_f)


def fused_linear(layer: Layer, original: Any, x: torch.Tensor) -> torch.Tensor:
    """The adapted forward of a plain ``nn.Linear`` (see the module docstring)."""
    state = layer.state
    sel = state.sel
    if sel is None or state.passthrough or layer.first is None:
        return original(x)
    if sel.table:
        return layer.table_term(sel, x, original(x))
    if torch.compiler.is_compiling():  # first: a compiled graph must not guard on the plan
        return _general(layer, original, x)
    plan = layer.plan
    if (
        plan is None
        or plan.sel is not sel
        or torch.is_grad_enabled()
        or plan.key != (sel.version, layer.version, x.shape, x.dtype)
    ):
        return _general(layer, original, x)
    n = plan.n
    xin = x.reshape(plan.flat)
    h = None
    if plan.family is not None:
        h = plan.family.h(layer, sel, x, xin, n, plan.per_row)
    out = original(x)
    if h is None:
        h = _first_product(xin, plan.first_t, plan.mask, n, plan.per_row)
    if plan.per_row:
        out.view(plan.rows_view).baddbmm_(h, plan.second)
    else:
        out.view(plan.rows_view).addmm_(h, plan.second)
    return out


def _first_product(
    xin: torch.Tensor, first_t: torch.Tensor, mask: torch.Tensor | None, n: int, per_row: bool
) -> torch.Tensor:
    """``x @ A.T``: per row (``first_t`` ``(n, in, M*r)``), or over the concatenated factors with each
    row's columns scaled by ``mask`` when rows differ."""
    if per_row:
        return torch.bmm(xin.view(n, -1, first_t.shape[1]), first_t)
    h = torch.mm(xin, first_t)
    return h if mask is None else scale_rows(h, n, mask)


def _general(layer: Layer, original: Any, x: torch.Tensor) -> torch.Tensor:
    """Every case, and the first call under a selection (which leaves a `Plan` for the next ones)."""
    sel = layer.state.sel
    assert sel is not None
    module = layer.module
    grad = torch.is_grad_enabled()
    if (
        (sel.replace and layer.replacements)
        or layer.bias is not None
        or (sel.dora and layer.gm1 is not None)
        or x.dim() < 2
        or (grad and (x.requires_grad or module.weight.requires_grad))
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
        if not grad and x.dtype == layer.dtype:
            layer.plan = Plan(layer, sel, x, n, per_row)
    out = original(x)
    if per_row:
        return layer.per_row(sel, x, out, n, compiling, h)
    return layer.concat(sel, xin, out, n, compiling, h)
