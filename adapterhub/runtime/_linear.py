"""The linear layer kinds, and the fast path of plain ``nn.Linear`` modules (a forward of their own).

`LinearLayer` (``nn.Linear``), `Conv1DLayer` (GPT-2's ``Conv1D``: a linear whose weight is stored
``(in, out)``) and `QuantizedLinearLayer` (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``: a linear whose
weight is packed) add, for the selection's ``K`` slots (``lora_B`` holding ``s_k * B_k.T``)::

    y[t] += sum_k c[row(t), k] * (x[t] @ lora_A[k].T) @ lora_B[k]

through the selection's `_term.LoraTerm`; the variants (`_variants`) follow in `Layer.finish`.

For a plain ``nn.Linear`` the runtime replaces the module's ``forward`` (an instance attribute,
removed again on detach) with `fused_linear`, which runs torch's own forward and adds the low-rank
term into its output in place (``out.addmm_(h, lora_B_cat)``, or ``baddbmm_`` for long rows over several
adapters). That skips the hook machinery of ``nn.Module.__call__`` (a decode step is bound by the
host's Python and kernel launches), and it lets siblings that see the same input (q, k and v; gate and
up) share ``h = x @ lora_A.T``: a `Family` computes it once for all of them, as one GEMM over their
concatenated ``lora_A`` factors (masked per row once), and each member takes its columns. A member that turns
out to see another input (cross attention), or an input changed in place, leaves its family for good.

The first call under a selection (and input shape) goes through every check and leaves a `CallPlan`: the
factors, mask and views it needs; later calls with the same selection, banks and shape (each decode
step) run straight through it, a few attribute reads and the kernels. Plans are keyed by the selection
object and its version, the layer's bank version, the input's shape and dtype, and are never used with
gradients on or under ``torch.compile``.

Measured on an H200 and kept out: writing the low-rank term first and letting the base GEMM accumulate
onto it (``delta.addmm_(x, W.T)``, one pass over the output less) was no faster there (its base GEMMs,
with ``beta=1``, ran 3% slower, which ate the pass saved), and rows without an adapter would no longer
equal the base bit for bit.

Anything this path does not cover (DoRA, ``lora_bias``, replacements, gradients through the base, a
selection of none) runs the module's own forward and then the general math of `Layer`. The term itself
is the selection's `_term.LoraTerm` (``shrink`` / ``expand``) in both.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ._base import FeaturesLastWeight, QuantizedWeight
from ._layers import Layer, LayerKind
from ._select import RuntimeState, Selection
from ._term import LoraTerm, scale_rows


class LinearLayer(Layer):
    """``nn.Linear``: ``y[t] += sum_k c[row, k] * (x[t] @ lora_A[k].T) @ lora_B[k]`` (see the module)."""

    kind: LayerKind = "linear"
    fusable = True
    tabled = True

    def __init__(
        self, name: str, module: nn.Module, state: RuntimeState, *, cap: int, dtype: torch.dtype
    ) -> None:
        super().__init__(name, module, state, cap=cap, dtype=dtype)
        self.family: Family | None = None  # the siblings sharing ``x @ lora_A.T`` (fused forwards)
        self.grouped = False  # whether it was ever put in a family (one that left stays out for good)
        self.plan: CallPlan | None = None  # the fused forward's plan for its last selection and shape

    def engage(self) -> None:
        install(self)  # (a suspended layer keeps its family: every member is suspended with it)

    def _changed(self) -> None:
        super()._changed()
        self.plan = None
        if self.family is not None:
            self.family.reset()

    def remove(self) -> None:
        super().remove()
        self.plan = None
        if self.family is not None:
            self.family.leave(self)

    def lin_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``(tokens, in)`` in the banks' dtype."""
        xin = x.reshape(-1, self.in_f)
        return xin if xin.dtype == self.dtype else xin.to(self.dtype)

    def add_term(self, sel: Selection, x: torch.Tensor, output: torch.Tensor, n: int) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()
        return sel.term.add_lora_linear(self, sel, self.lin_input(x), output, n, compiling)


class Conv1DLayer(LinearLayer):
    """GPT-2's ``Conv1D``: the linear it is, its weight stored ``(in, out)`` (only merging and DoRA's norms
    see the layout: `_base.FeaturesLastWeight`)."""

    kind: LayerKind = "conv1d"
    fusable = False

    def __init__(
        self, name: str, module: nn.Module, state: RuntimeState, *, cap: int, dtype: torch.dtype
    ) -> None:
        super().__init__(name, module, state, cap=cap, dtype=dtype)
        self.base = FeaturesLastWeight(self.weight, self.weight_shape, transposed=True)


class QuantizedLinearLayer(LinearLayer):
    """A bitsandbytes ``Linear4bit`` / ``Linear8bitLt``: the linear term added to the output of the
    module's own (dequantizing) forward. Its shapes come from ``in_features`` / ``out_features`` (the
    weight is packed); it keeps its own forward (a hook adds the term); its factors are fp32 unless the
    runtime's dtype is given, as PEFT keeps them; nothing is merged into it (`_base.QuantizedWeight`)."""

    fusable = False

    def __init__(
        self, name: str, module: nn.Module, state: RuntimeState, *, cap: int, dtype: torch.dtype
    ) -> None:
        super().__init__(name, module, state, cap=cap, dtype=dtype)
        self.kind = "linear4bit" if type(module).__name__ == "Linear4bit" else "linear8bit"
        self.weight_shape = (self.out_f, self.in_f)
        self.base = QuantizedWeight(self.weight, self.weight_shape, getattr(module, "state", None))


def install(layer: LinearLayer) -> None:
    """Give ``layer`` its fused forward when it is a plain ``nn.Linear``, else its forward hook."""
    module = layer.module
    plain = (
        layer.fusable
        and isinstance(module, nn.Linear)
        and type(module).forward is nn.Linear.forward
        and "forward" not in module.__dict__
        and not module._forward_pre_hooks
        and module.weight.device.type != "meta"
    )
    if not plain:
        Layer.engage(layer)  # a forward hook
        return
    layer.forward = functools.partial(fused_linear, layer, module.forward)
    module.forward = layer.forward
    if layer.grouped:
        return
    layer.grouped = True
    parent = layer.name.rsplit(".", 1)[0] if "." in layer.name else ""
    key = (parent, layer.in_f, str(layer.dtype), str(layer.device))
    layer.family = layer.state.families.setdefault(key, Family())
    layer.family.join(layer)


class Family:
    """Adapted sibling linears with the same input width: one GEMM over their A factors."""

    def __init__(self) -> None:
        self.members: list[LinearLayer] = []
        self.version = 0  # bumped whenever a member's banks change (their factors are re-gathered)
        self._x: torch.Tensor | None = None  # the input the pending slices were computed from
        self._x_version = -1
        #: id(member) -> its slice of the pending ``h``, for the members that have not taken theirs
        self._pending: dict[int, torch.Tensor] | None = None
        self._cache: tuple[Any, ...] | None = None

    def join(self, layer: LinearLayer) -> None:
        self.members.append(layer)
        for m in self.members:  # a member planned alone would go on computing its own ``h``
            m.plan = None
        self.reset()

    def leave(self, layer: LinearLayer) -> None:
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
        live = [m for m in self.members if m.lora_A is not None]
        dim = 1 if per_row else 0  # (n, M*r, in) per row, else (K*r, in)
        parts: list[torch.Tensor] = []
        for m in live:
            lora_a = m.row_factors(sel, n, False)[0] if per_row else m.gathered(sel, False)[0]
            assert lora_a is not None
            parts.append(lora_a)
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
        self, layer: LinearLayer, sel: Selection, x: torch.Tensor, xin: torch.Tensor, n: int, per_row: bool
    ) -> torch.Tensor | None:
        """``x @ lora_A.T`` of ``layer`` (masked per row where the selection is), shared with its siblings;
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


class CallPlan:
    """What `fused_linear` does for one layer under one selection and input shape, worked out once
    (every later call with the same selection, banks and shape runs straight through it)."""

    __slots__ = ("sel", "key", "n", "per_row", "lora_a_t", "mask", "lora_b", "family", "flat", "rows_view")

    def __init__(self, layer: LinearLayer, sel: Selection, x: torch.Tensor, n: int, term: LoraTerm) -> None:
        self.sel = sel
        self.key = (sel.version, layer.version, x.shape, x.dtype)
        self.n = n
        self.per_row = per_row = term.per_row
        if per_row:
            lora_a, self.lora_b = layer.row_factors(sel, n, False)
            self.lora_a_t = lora_a.transpose(1, 2)
            self.mask = None
        else:
            lora_a, self.lora_b = layer.gathered(sel, False)  # type: ignore[assignment]
            assert lora_a is not None
            self.lora_a_t = lora_a.T
            self.mask = sel.mask_for(n, layer.rank, layer.dtype) if sel.rows is not None else None
        fam = layer.family
        self.family = fam if fam is not None and len(fam.members) > 1 else None
        self.flat = (-1, layer.in_f)
        self.rows_view = (n, -1, layer.out_f) if per_row else (-1, layer.out_f)


def fused_linear(layer: LinearLayer, original: Any, x: torch.Tensor) -> torch.Tensor:
    """The adapted forward of a plain ``nn.Linear`` (see the module docstring)."""
    state = layer.state
    sel = state.sel
    if sel is None or state.passthrough or layer.lora_A is None:
        return original(x)
    if sel.table:
        return sel.term.add_lora_linear(layer, sel, layer.lin_input(x), original(x), 0, False)
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
        h = _first_product(xin, plan.lora_a_t, plan.mask, n, plan.per_row)
    if plan.per_row:
        out.view(plan.rows_view).baddbmm_(h, plan.lora_b)
    else:
        out.view(plan.rows_view).addmm_(h, plan.lora_b)
    return out


def _first_product(
    xin: torch.Tensor, lora_a_t: torch.Tensor, mask: torch.Tensor | None, n: int, per_row: bool
) -> torch.Tensor:
    """``x @ lora_A.T``: per row (``lora_a_t`` ``(n, in, M*r)``), or over the concatenated factors with each
    row's columns scaled by ``mask`` when rows differ."""
    if per_row:
        return torch.bmm(xin.view(n, -1, lora_a_t.shape[1]), lora_a_t)
    h = torch.mm(xin, lora_a_t)
    return h if mask is None else scale_rows(h, n, mask)


def _general(layer: LinearLayer, original: Any, x: torch.Tensor) -> torch.Tensor:
    """Every case, and the first call under a selection (which leaves a `CallPlan` for the next ones)."""
    sel = layer.state.sel
    assert sel is not None
    module = layer.module
    grad = torch.is_grad_enabled()
    if (
        (sel.replace and layer.save)
        or not layer.plain(sel)
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
    term = sel.term.pick(layer, sel, x, n)
    h = None
    if not compiling:  # (a compiled graph computes each member's own: no Python state to guard on)
        fam = layer.family
        if fam is not None and len(fam.members) > 1:
            h = fam.h(layer, sel, x, xin, n, term.per_row)
        if not grad and x.dtype == layer.dtype:
            layer.plan = CallPlan(layer, sel, x, n, term)
    out = original(x)
    return term.add_lora_linear(layer, sel, xin, out, n, compiling, h)
