"""The layer kinds: one `Layer` subclass per kind of module, each with the math it adds written once.

``K`` slots are selected, slot ``k`` with coefficient ``c[row, k]`` (``lora_B`` holds ``s_k * B_k.T``):

- the linear kinds (`_linear`: ``nn.Linear``, GPT-2's ``Conv1D``, bitsandbytes ``Linear4bit`` /
  ``Linear8bitLt``)::

      y[t] += sum_k c[row, k] * (x[t] @ lora_A[k].T) @ lora_B[k]

  computed by the selection's `_term.LoraTerm`.
- `EmbeddingLayer`::

      y[t] += sum_k c[row, k] * lora_A[k][ids[t]] @ lora_B[k]          # lora_A: the (num, r) table

  (times the module's ``embed_scale`` where it has one, as PEFT's ``TrainableTokens`` do).
- `ConvLayer` (``nn.Conv1d/2d/3d``, groups 1, zero padding)::

      y += conv1x1(convNd(x, lora_A_cat) * mask, lora_B_cat)           # the base's stride, padding, dilation

- `ReplacedModule`: any module only ``modules_to_save`` replaces (no term).

Then the variants (`_variants`) in `Layer.finish`. `make_layer` picks the class from `layer_kind`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._base import FeaturesLastWeight
from ._layers import Layer, LayerKind, quantized_kind
from ._linear import Conv1DLayer, LinearLayer, QuantizedLinearLayer
from ._merge import dora_gm1
from ._parts import Content, on_device_module
from ._plan import LoadPlan, plan_bytes
from ._select import RuntimeState, Selection


class EmbeddingLayer(Layer):
    """``nn.Embedding``: ``y[t] += sum_k c[row, k] * lora_A[k][ids[t]] @ lora_B[k]`` (see the module)."""

    kind: LayerKind = "embedding"

    def __init__(
        self, name: str, module: nn.Module, state: RuntimeState, *, cap: int, dtype: torch.dtype
    ) -> None:
        super().__init__(name, module, state, cap=cap, dtype=dtype)
        self.base = FeaturesLastWeight(self.weight, self.weight_shape, transposed=False)

    def features(self) -> tuple[int, int]:
        return int(self.weight.shape[0]), int(self.weight.shape[1])  # num_embeddings, dim

    def bank_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (self.in_f, rank), (rank, self.out_f)

    def bank_sources(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return b, a  # the (num, r) table is looked up first, then times s * (r, dim)

    def gather_a(self, idx: torch.Tensor, k: int) -> torch.Tensor | None:
        return None  # the table is indexed by slot and id together (`add_term`)

    def add_term(self, sel: Selection, x: torch.Tensor, output: torch.Tensor, n: int) -> torch.Tensor:
        if sel.table or self.lora_A is None:
            return output  # `RowTable.set` refuses adapters with factors here: no row has a term
        lora_b = self.gathered(sel, torch.compiler.is_compiling())[1]
        k, r = sel.k, self.rank
        h = self.lora_A[sel.idx.view(*(1,) * x.dim(), k), x.unsqueeze(-1)]  # (..., K, r)
        if sel.rows is not None:
            coef = sel.coef_for(n).to(h.dtype)
            h = h * coef.view(coef.shape[0], *(1,) * (x.dim() - 1), k, 1)
        delta = h.reshape(*x.shape, k * r) @ lora_b
        scale = getattr(self.module, "embed_scale", None)
        if scale is not None:
            delta = delta * scale.to(delta.dtype) if isinstance(scale, torch.Tensor) else delta * scale
        return self.finish(sel, output, delta, n)

    def lora_delta(self, slot: int) -> torch.Tensor:
        assert self.lora_A is not None and self.lora_B is not None
        return self.lora_A[slot].to(torch.float32) @ self.lora_B[slot].to(
            torch.float32
        )  # (num, r) @ (r, dim)

    def base_bias(self, output: torch.Tensor) -> torch.Tensor | None:
        return None


class ConvLayer(Layer):
    """``nn.Conv1d/2d/3d``: ``y += conv1x1(convNd(x, lora_A_cat) * mask, lora_B_cat)`` (see the module)."""

    kind: LayerKind = "conv"

    def __init__(
        self, name: str, module: nn.Module, state: RuntimeState, *, cap: int, dtype: torch.dtype
    ) -> None:
        super().__init__(name, module, state, cap=cap, dtype=dtype)
        self.kernel = tuple(int(d) for d in self.weight.shape[2:])
        self.conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.kernel) - 1]

    def shape_b(self, lora_b: torch.Tensor, k: int) -> torch.Tensor:
        return lora_b.T.reshape(self.out_f, k * self.rank, *(1,) * len(self.kernel)).contiguous()

    def add_term(self, sel: Selection, x: torch.Tensor, output: torch.Tensor, n: int) -> torch.Tensor:
        if sel.table:
            return output  # `RowTable.set` refuses adapters with factors here: no row has a term
        compiling = torch.compiler.is_compiling()
        lora_a, lora_b = self.gathered(sel, compiling)
        assert lora_a is not None
        k, r = sel.k, self.rank
        m: Any = self.module
        xin = x if x.dtype == lora_a.dtype else x.to(lora_a.dtype)
        h = self.conv(xin, lora_a, None, m.stride, m.padding, m.dilation)
        if sel.rows is not None:
            mask = (
                sel.mask_for(n, r, h.dtype)
                if not compiling
                else sel.coef_for(n).repeat_interleave(r, dim=1).to(h.dtype)
            )
            h = h * mask.view(mask.shape[0], k * r, *(1,) * len(self.kernel))
        return self.finish(sel, output, self.conv(h, lora_b), n)

    def out_view(self, v: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return v.view(v.shape[0], self.out_f, *(1,) * (output.dim() - 2))

    def base_bias(self, output: torch.Tensor) -> torch.Tensor | None:
        b = getattr(self.module, "bias", None)
        return b.view(self.out_f, *(1,) * (output.dim() - 2)) if isinstance(b, torch.Tensor) else None


class ReplacedModule(Layer):
    """A module only ``modules_to_save`` replaces: no banks, no term (`Layer.__call__` recomputes the
    replacing rows)."""

    def features(self) -> tuple[int, int]:
        return 0, 0


_CLASSES: dict[str, type[Layer]] = {
    "linear": LinearLayer,
    "conv1d": Conv1DLayer,
    "linear4bit": QuantizedLinearLayer,
    "linear8bit": QuantizedLinearLayer,
    "embedding": EmbeddingLayer,
    "conv": ConvLayer,
    "replace": ReplacedModule,
}


def make_layer(
    name: str, module: nn.Module, kind: str, state: RuntimeState, *, cap: int, dtype: torch.dtype | None
) -> Layer:
    """The layer of ``kind`` for ``module`` (``dtype`` None: the kind's own choice for its banks)."""
    cls = _CLASSES[quantized_kind(module) or kind]
    bank_dtype = dtype or bank_dtype_of(cls, module)
    return cls(name, module, state, cap=cap, dtype=bank_dtype)


def bank_dtype_of(cls: type[Layer], module: nn.Module) -> torch.dtype:
    """The banks' dtype when the runtime's is not given: the module's weight dtype (fp32 for a quantized
    one, as PEFT keeps its factors)."""
    if cls is QuantizedLinearLayer:
        return torch.float32
    return next(iter(module.parameters())).dtype


class Layers(dict[str, Layer]):
    """The adapted layers of one runtime, by module name: made when an adapter first targets a module,
    removed when the last one leaves, in or out of the modules' forwards together (`suspend` while a
    merge has folded everything into the weights)."""

    def __init__(self, state: RuntimeState, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.state = state
        self.dtype = dtype
        self.engaged = True

    def get_or_make(self, name: str, module: nn.Module, kind: str, cap: int) -> Layer:
        layer = self.get(name)
        if layer is None:
            layer = make_layer(name, module, kind, self.state, cap=cap, dtype=self.dtype)
            self.state.layout += 1  # a captured step knows nothing of this layer
            if self.engaged:
                layer.engage()
            self[name] = layer
        return layer

    def place(
        self,
        plan: LoadPlan,
        key: str,
        slot: int,
        cap: int,
        on_device: dict[int, torch.Tensor],
        backups: list[tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
    ) -> Content:
        """Write a planned adapter into ``slot`` of its layers (all or nothing): its `Content` (``backups``:
        the originals of merged tensors, which DoRA's norms are taken of)."""

        def original(t: torch.Tensor) -> torch.Tensor:
            return next((orig for live, orig in backups if live is t), t)

        layers: list[Layer] = []
        try:
            with torch.no_grad():
                for p in plan.loras:
                    layer = self.get_or_make(p.module_name, p.module, p.kind, cap)
                    m = on_device_module(p.lora, on_device)
                    assert m.A is not None and m.B is not None
                    gm1 = dora_gm1(layer, layer.base.dense(original), m) if m.is_dora else None
                    layer.write(slot, a=m.A, b=m.B, scale=float(m.scale), bias=m.bias, gm1=gm1)
                    layers.append(layer)
                for r in plan.replacements:
                    layer = self.get_or_make(r.module_name, r.module, "replace", cap)
                    params = {
                        leaf: t.to(getattr(r.module, leaf).device, getattr(r.module, leaf).dtype).clone()
                        for leaf, t in r.params.items()
                    }
                    layer.write_replacement(slot, params)
                    layers.append(layer)
        except BaseException:
            self.clear_slot(slot, layers)
            raise
        dtypes = {id(layer.module): layer.dtype for layer in layers}  # the banks' (quantized layers: fp32)
        return Content(
            sha256=key,
            slot=slot,
            bytes=plan_bytes(plan, lambda mod: dtypes[id(mod)]),
            device=str(device),
            modules=len({p.module_name for p in plan.loras} | {r.module_name for r in plan.replacements}),
            rank=max((p.lora.rank for p in plan.loras), default=0),
            dora=any(p.lora.is_dora for p in plan.loras),
            replaces=bool(plan.replacements),
            layers=list(dict.fromkeys(layers)),
        )

    def clear_slot(self, slot: int, layers: list[Layer]) -> None:
        """Zero ``slot`` in ``layers`` and remove the layers no slot uses any more."""
        for layer in layers:
            layer.clear(slot)
        for name in [n for n, layer in self.items() if not layer.users]:
            self.pop(name).remove()

    def grow(self, cap: int) -> None:
        for layer in self.values():
            layer.grow(cap)

    def suspend(self) -> None:
        """Take every layer out of its module's forward (banks kept)."""
        self.engaged = False
        for layer in self.values():
            layer.suspend()

    def engage(self) -> None:
        self.engaged = True
        for layer in self.values():
            if layer.handle is None and layer.forward is None:
                layer.engage()

    def remove_all(self) -> None:
        for layer in self.values():
            layer.remove()
        self.clear()
