"""`Runtime`: adapters on a live torch / transformers model.

``rt = attach(model)`` hooks nothing yet; ``rt.load(path_or_weights, name=...)`` checks the adapter
against the model, keeps its factors resident (on the layers' device) and hooks each module it targets
once. Then ``rt.activate(name | None | {name: weight})`` switches what every forward applies, and
``with rt.rows([...]):`` gives each row of a batch its own adapter or combination. ``rt.merge`` folds a
spec into the weights (fp32, rounded once); ``rt.unmerge`` copies the original tensors back bit for bit.
``rt.detach()`` leaves the model exactly as given.

Resident adapters are keyed by content: the sha256 of what they do to this model (targets, scales and
tensor bytes; `content_sha256`). Loading the same content under a second name shares it; loading new
content under a name in use rebinds the name, and every selection that named it follows at once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import IncompatibleAdapterError, InvalidOptionError, NotResidentError
from ..lora import LoraWeights
from ._kinds import Layers
from ._merge import merge_layer, merge_problems, merge_refusal
from ._parts import Content, Merged, keyed_upload, read_weights
from ._plan import LoadPlan, model_layout, plan_adapter, plan_bytes
from ._residency import Residency
from ._select import RuntimeState, Selection, build_selection
from ._term import term_for
from .train import TrainableAdapter, Trainer, save_trained
from .types import AdapterSpec, ResidentAdapter

__all__ = ["Runtime", "ResidentAdapter", "AdapterSpec", "attach"]

logger = logging.getLogger(__name__)


_INITIAL_SLOTS = 8
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, Runtime] = weakref.WeakKeyDictionary()


#: name -> (loaded weights, content sha256), or None: how a runtime finds adapters beyond paths
Resolver = Callable[[str], "tuple[LoraWeights, str] | None"]
#: (name, weights, tags=, description=, lineage=) -> a record: `Runtime.save` into a catalog (`Hub.attach`)
Saver = Callable[..., Any]


def attach(
    model: nn.Module,
    *,
    dtype: torch.dtype | None = None,
    resolve: Resolver | None = None,
    save: Saver | None = None,
) -> Runtime:
    """Attach a runtime to ``model`` (a plain torch / transformers model); nothing changes until a load.

    Args:
        model: the live model. Its modules stay where they are: the runtime gives each plain
            ``nn.Linear`` an adapter targets a forward of its own (an instance attribute) and every
            other targeted module a forward hook; `Runtime.detach` removes both again.
        dtype: dtype of the resident factors. None (default) keeps each layer's own weight dtype, the
            fast choice on a bf16 / fp16 GPU model; ``torch.float32`` keeps factors in fp32 as PEFT does
            (the input is then cast to fp32 for the low-rank product).
        resolve: tried first when `Runtime.load` gets a string (`Hub.attach` resolves catalog names).
        save: where `Runtime.save` without a path sends a trained adapter (`Hub.attach`: the catalog).

    Raises:
        InvalidOptionError: a runtime is already attached to this model.
    """
    if model in _ATTACHED:
        raise InvalidOptionError(
            "a runtime is already attached to this model; use it, or call its detach() before attaching again"
        )
    rt = Runtime(model, dtype=dtype, resolve=resolve, save=save)
    _ATTACHED[model] = rt
    return rt


def _not_resident(name: str, known: Sequence[str]) -> NotResidentError:
    return NotResidentError(name, tuple(known))


def _unknown(name: str, known: Sequence[str]) -> Any:
    raise _not_resident(name, known)


class Runtime:
    """Adapters on one live model. Make it with `attach`."""

    def __init__(
        self,
        model: nn.Module,
        *,
        dtype: torch.dtype | None = None,
        resolve: Resolver | None = None,
        save: Saver | None = None,
    ) -> None:
        self._model = model
        self._resolve = resolve
        self._save = save
        self._dtype = dtype
        self._state = RuntimeState()
        self._layers = Layers(self._state, dtype)
        self._residency = Residency(_INITIAL_SLOTS, self._layers.grow)
        self._contents = self._residency.contents  # sha256 -> content
        self._names = self._residency.names  # name -> sha256, in load order
        self._active: dict[str, float] | None = None
        self._rows_stack: list[list[dict[str, float] | None]] = []
        self._merged: Merged | None = None
        self._layout = model_layout(model)
        self._detached = False
        self._trainer = Trainer(model, self._state, dtype)
        first = next(iter(model.parameters()), None)
        self._device = first.device if first is not None else torch.device("cpu")

    # ------------------------------------------------------------------------------------ properties

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def residency(self) -> Residency:
        """The resident set's bookkeeping: slots, contents by key, names, LRU order and a byte budget
        (``residency.budget``; `Residency.victims` says what to unload to fit more)."""
        return self._residency

    @property
    def resident(self) -> list[ResidentAdapter]:
        """Every resident name, in load order."""
        out = []
        for name, sha in self._names.items():
            c = self._contents[sha]
            out.append(
                ResidentAdapter(
                    name=name,
                    sha256=sha,
                    bytes=c.bytes,
                    device=c.device,
                    modules=c.modules,
                    rank=c.rank,
                    dora=c.dora,
                )
            )
        return out

    @property
    def active(self) -> dict[str, float] | None:
        """The combination every forward applies outside `rows` (None: the base model)."""
        return dict(self._active) if self._active is not None else None

    @property
    def merged(self) -> dict[str, float] | None:
        """The combination folded into the weights by `merge`, if any."""
        return dict(self._merged.spec) if self._merged is not None else None

    # ------------------------------------------------------------------------------------ load

    def load(
        self,
        adapter: str | os.PathLike[str] | LoraWeights,
        *,
        name: str | None = None,
        device: str | torch.device | None = None,
        sha256: str | None = None,
    ) -> ResidentAdapter:
        """Check an adapter against the model and keep it resident under ``name``.

        Args:
            adapter: a PEFT folder or adapter file (read with ``read_adapter(path, load=True)``), or
                loaded `LoraWeights`.
            name: the name to activate it by; defaults to the folder or file name for a path (required
                for `LoraWeights`). A name in use is rebound to the new content.
            device: where the factors live; they must live where the targeted layers compute, so this
                only checks (None: the layers' device).
            sha256: the content key when the caller knows one already (the store's sha256); computed from
                the tensors otherwise.

        Raises:
            IncompatibleAdapterError: the adapter does not fit this model (``report`` holds the
                `ValidationReport`), or targets nothing in it; nothing was loaded.
            InvalidAdapterError: the path is not an adapter, or tensors were not loaded.
            InvalidOptionError: no name for `LoraWeights`, a device the layers are not on, or the name is
                merged into the weights right now.
        """
        self._check_live()
        found = (
            self._resolve(str(adapter)) if self._resolve is not None and isinstance(adapter, str) else None
        )
        if found is not None:
            name = name or str(adapter)
            adapter, sha256 = found[0], sha256 or found[1]
        weights, name, path = read_weights(adapter, name)
        if self.training is not None and self.training.name == name:
            raise InvalidOptionError(f"{name} is being trained; freeze it first or load another name")
        plan = plan_adapter(self._model, self._layout, weights, name)
        if not plan.report.ok:
            errors = plan.report.errors
            shown = "\n  ".join(c.message for c in errors[:10])
            more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
            raise IncompatibleAdapterError(
                f"{name} does not fit this model; nothing was loaded:\n  {shown}{more}", report=plan.report
            )
        devices = {next(iter(p.module.parameters())).device for p in plan.loras} | {
            next(iter(r.module.parameters())).device for r in plan.replacements
        }
        if device is not None and any(d != torch.device(device) for d in devices):
            raise InvalidOptionError(
                f"device {str(device)!r}: the layers {name} targets are on {', '.join(sorted(map(str, devices)))}; "
                "factors must live where the layers compute (leave device out)"
            )
        if len(devices | {self._device}) > 1:
            raise InvalidOptionError(
                f"{name} targets layers on several devices ({', '.join(sorted(map(str, devices)))}); the runtime "
                "serves a model on one device"
            )
        key, on_device = keyed_upload(plan, weights, path, self._device, sha256)
        old = self._names.get(name)
        if self._merged is not None and name in self._merged.spec and old != key:
            raise InvalidOptionError(
                f"{name} is merged into the weights; call rt.unmerge() before reloading it"
            )
        if key not in self._contents:
            self._residency.add(self._place(plan, key, on_device))
        self._residency.bind(name, key)
        if old is not None and old != key:
            self._release(old)
            self._reselect()  # selections naming it now serve the new content
        logger.info("resident: %s (%s)", name, key[:12])
        return next(r for r in self.resident if r.name == name)

    def _place(self, plan: LoadPlan, key: str, on_device: dict[int, torch.Tensor]) -> Content:
        slot = self._residency.take_slot()

        def original(t: torch.Tensor) -> torch.Tensor:  # the unmerged copy of a live tensor
            backups = self._merged.backups if self._merged is not None else []
            return next((orig for live, orig in backups if live is t), t)

        try:
            layers = self._layers.place(plan, slot, self._residency.cap, on_device, original)
        except BaseException:
            self._residency.give_slot(slot)
            raise
        ranks = [p.lora.rank for p in plan.loras]
        dtypes = {id(layer.module): layer.dtype for layer in layers}  # the banks' (quantized layers: fp32)
        return Content(
            sha256=key,
            slot=slot,
            bytes=plan_bytes(plan, lambda mod: dtypes[id(mod)]),
            device=str(self._device),
            modules=len({p.module_name for p in plan.loras} | {r.module_name for r in plan.replacements}),
            rank=max(ranks, default=0),
            dora=any(p.lora.is_dora for p in plan.loras),
            replaces=bool(plan.replacements),
            layers=layers,
        )

    def unload(self, name: str) -> None:
        """Drop ``name``; its content leaves the device when no other name shares it.

        Raises:
            AdapterNotFoundError: no such resident name.
            InvalidOptionError: the name is active, used by an open `rows` block, or merged.
        """
        self._check_live()
        if name not in self._names:
            raise _not_resident(name, list(self._names))
        if self._merged is not None and name in self._merged.spec:
            raise InvalidOptionError(f"{name} is merged into the weights; call rt.unmerge() first")
        if self._active is not None and name in self._active:
            raise InvalidOptionError(f"{name} is active; call rt.activate() with something else first")
        if any(spec and name in spec for specs in self._rows_stack for spec in specs):
            raise InvalidOptionError(f"{name} is used by an open rt.rows() block; leave it first")
        self._release(self._residency.unbind(name))

    def _release(self, sha: str) -> None:
        """Drop content ``sha`` from the layers once no name is bound to it."""
        c = self._residency.release(sha)
        if c is not None:
            self._layers.clear_slot(c.slot, c.layers)

    # ------------------------------------------------------------------------------------ selection

    def _normalize(self, spec: AdapterSpec) -> dict[str, float] | None:
        if spec is None:
            return None
        if isinstance(spec, str):
            spec = {spec: 1.0}
        if not isinstance(spec, Mapping):
            raise TypeError(
                f"an adapter spec is a name, None or a {{name: weight}} mapping, got {type(spec).__name__}"
            )
        out: dict[str, float] = {}
        for n, w in spec.items():
            if n not in self._names and n in self._trainer.adapters:
                self.freeze(str(n))  # using a trained adapter ends its training
            if n not in self._names:
                raise _not_resident(str(n), list(self._names))
            wf = float(w)
            if not math.isfinite(wf):
                raise InvalidOptionError(f"weight of {n} must be a finite number, got {w!r}")
            out[n] = out.get(n, 0.0) + wf
        return out or None

    def _slots(self, spec: dict[str, float] | None) -> dict[int, float]:
        """slot -> weight; checks what can be combined."""
        if not spec:
            return {}
        slots: dict[int, float] = {}
        for n, w in spec.items():
            c = self._contents[self._names[n]]
            slots[c.slot] = slots.get(c.slot, 0.0) + w
        for n in spec:
            c = self._contents[self._names[n]]
            if (c.dora or c.replaces) and (len(slots) > 1 or slots[c.slot] != 1.0):
                what = "DoRA magnitudes" if c.dora else "full replacement weights (modules_to_save)"
                raise IncompatibleAdapterError(
                    f"{n} carries {what}, which have no exact linear combination; use it alone with weight 1"
                )
        return {s: w for s, w in slots.items() if w != 0.0}

    def _selection(self, row_specs: Sequence[dict[str, float] | None] | None) -> Selection | None:
        if row_specs is None:
            per_row = [self._slots(self._active)]
            rows = None
        else:
            per_row = [self._slots(s) for s in row_specs]
            rows = len(per_row)
        by_slot = self._residency.by_slot()
        sel = build_selection(
            per_row,
            rows,
            dora={s for s, c in by_slot.items() if c.dora},
            replaces={s for s, c in by_slot.items() if c.replaces},
            device=self._device,
        )
        if sel is not None:
            sel.term = term_for(sel)  # how linear layers compute its term, chosen once
            self._residency.touch(by_slot[s].sha256 for s in sel.slots)
        return sel

    def _reselect(self) -> None:
        """Make the current selection follow the active spec or the innermost open rows() block."""
        if self._merged is not None:
            self._state.sel = None
            return
        sel = self._selection(self._rows_stack[-1] if self._rows_stack else None)
        cur = self._state.sel
        if sel is not None and cur is not None and cur.same_structure(sel):
            cur.refill(sel)  # in place, so a compiled graph keeps running unchanged
        else:
            self._state.sel = sel

    def activate(self, spec: AdapterSpec) -> None:
        """What every forward applies from now on: a resident name, None (the base model), or an exact
        linear combination ``{"a": 0.7, "b": -0.3}``, i.e. ``sum_i w_i s_i B_i A_i x``.

        Switching among resident adapters changes only small index and weight tensors (in place when the
        number of adapters stays the same), so it costs microseconds whatever is resident.

        Raises:
            AdapterNotFoundError: a name is not resident.
            IncompatibleAdapterError: a DoRA or modules_to_save adapter inside a combination.
            InvalidOptionError: something else is merged into the weights (unmerge first).
        """
        self._check_live()
        norm = self._normalize(spec)
        self._slots(norm)  # check combinability before changing anything
        if self._merged is not None:
            if norm != self._merged.spec:
                raise InvalidOptionError(
                    f"{self._merged.spec} is merged into the weights; call rt.unmerge() before activating "
                    "something else"
                )
            self._active = norm
            return
        self._active = norm
        if not self._rows_stack:
            self._reselect()

    @contextlib.contextmanager
    def rows(self, specs: Sequence[AdapterSpec]) -> Iterator[None]:
        """Give each row of the batch its own adapter, combination or None, inside a ``with`` block::

            with rt.rows(["a", "b", None, {"a": 0.5, "b": 0.5}]):
                logits = model(input_ids).logits   # row i equals row i run alone with specs[i]
                out = model.generate(input_ids, max_new_tokens=8)

        Layers must see the batch in dimension 0 (every dense transformers layer does). A batch whose
        size is a multiple of ``len(specs)`` (``generate`` with beams or ``num_return_sequences``)
        repeats each spec for its copies of the row.
        """
        self._check_live()
        if self._merged is not None:
            raise InvalidOptionError(
                f"{self._merged.spec} is merged into the weights; call rt.unmerge() before using per-row adapters"
            )
        normalized = [self._normalize(s) for s in specs]
        if not normalized:
            raise InvalidOptionError("rows() needs one spec per row of the batch; got none")
        sel = self._selection(normalized)
        self._rows_stack.append(normalized)
        prev = self._state.sel
        self._state.sel = sel
        try:
            yield
        finally:
            self._rows_stack.pop()
            self._state.sel = prev
            if not self._detached:
                self._reselect()

    # ------------------------------------------------------------------------------------ merge

    def merge(self, spec: AdapterSpec = ...) -> None:  # type: ignore[assignment]
        """Fold ``spec`` (default: the active one) into the live weights: ``W0 + sum_i w_i s_i B_i A_i``
        computed in fp32 and rounded once to the weight dtype (DoRA: ``g * (W0 + dW)``;
        ``modules_to_save``: the replacement; ``lora_bias``: added into the layer's bias).

        While merged, the hooks add nothing (the merge is never applied twice), and the same spec stays
        the active one; `unmerge` restores the original tensors bit for bit and leaves the spec active
        through the hooks.

        Raises:
            InvalidOptionError: something is merged already, a rows() block is open, or spec is the base.
            IncompatibleAdapterError: a targeted weight is tied to another module (merging would change
                both), or a lora_bias needs a bias the layer lacks; nothing was changed.
        """
        self._check_live()
        norm = self._active if spec is ... else self._normalize(spec)
        if not norm:
            raise InvalidOptionError("nothing to merge: give a resident name or a combination")
        if self._rows_stack:
            raise InvalidOptionError("cannot merge inside an open rt.rows() block")
        slots = self._slots(norm)
        key = tuple(sorted(slots.items()))
        if self._merged is not None:
            if self._merged.key == key:
                return
            raise InvalidOptionError(f"{self._merged.spec} is merged already; call rt.unmerge() first")
        touched = [layer for layer in self._layers.values() if layer.users & set(slots)]
        refusal = merge_refusal(touched)
        if refusal:
            raise IncompatibleAdapterError(refusal)
        problems = merge_problems(self._model, touched, slots)
        if problems:
            raise IncompatibleAdapterError(
                "cannot merge; nothing was changed:\n  " + "\n  ".join(sorted(set(problems)))
            )
        backups: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            try:
                for layer in touched:
                    merge_layer(layer, slots, backups)
            except BaseException:  # out of memory, say: put back what was written
                for live, orig in reversed(backups):
                    live.copy_(orig)
                raise
        self._merged = Merged(spec=norm, key=key, backups=backups)
        self._active = norm
        self._state.sel = None
        self._layers.suspend()  # everything is in the weights: the base's own forwards, at its speed

    def unmerge(self) -> None:
        """Copy the original tensors back (bit for bit); the merged spec stays active through the hooks."""
        self._check_live()
        if self._merged is None:
            return
        with torch.no_grad():
            for live, orig in reversed(self._merged.backups):
                live.copy_(orig)
        self._merged = None
        self._layers.engage()
        self._reselect()

    # ------------------------------------------------------------------------------------ training

    def create(
        self, name: str, *, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] | str = ("q_proj", "v_proj"),
        init: str = "kaiming", rslora: bool = False, dropout: float = 0.0, seed: int | None = None,
    ) -> TrainableAdapter:  # fmt: skip
        """A new trainable adapter on ``targets`` (short names, module names or ``"all-linear"``): A as PEFT
        initialises it, B = 0, the base frozen; it applies to every forward until frozen. See `.train`."""
        self._check_live()
        if name in self._names or name in self._trainer.adapters:
            raise InvalidOptionError(f"{name} is in use in this runtime; pick another name or unload it")
        if self._merged is not None:
            raise InvalidOptionError(f"{self._merged.spec} is merged; call rt.unmerge() before training")
        return self._trainer.create(
            name, rank=rank, alpha=alpha, targets=targets, init=init, rslora=rslora, dropout=dropout, seed=seed,
        )  # fmt: skip

    def freeze(self, name: str) -> ResidentAdapter:
        """End training of ``name``: its factors become a resident adapter like a loaded one."""
        ad = self._trainer.adapters.get(name)
        if ad is None or not ad.trainable:  # made and frozen already: resident unless unloaded since
            return next((r for r in self.resident if r.name == name), None) or _unknown(
                name, list(self._trainer.adapters)
            )
        self._trainer.release(name)
        try:
            return self.load(ad.weights(), name=name)
        except BaseException:
            self._trainer.discard(name)
            raise

    def save(
        self, name: str, *, path: str | os.PathLike[str] | None = None, tags: Sequence[str] = (),
        description: str | None = None,
    ) -> Any:  # fmt: skip
        """Write an adapter ``create`` made as a PEFT folder (factors only) at ``path`` and return the path,
        or else through the ``save`` hook of `attach` (`Hub.attach`: the catalog, with lineage)."""
        self._check_live()
        ad = self._trainer.adapters.get(name) or _unknown(name, list(self._trainer.adapters))
        return save_trained(ad, self._model, path, self._save, tags, description)

    @property
    def training(self) -> TrainableAdapter | None:
        """The adapter being trained, if any."""
        return self._trainer.current

    # ------------------------------------------------------------------------------------ detach

    def detach(self) -> None:
        """Unmerge, remove every hook and drop every resident adapter: the model is as it was given."""
        if self._detached:
            return
        self.unmerge()
        self._trainer.close()
        self._state.sel = None
        self._layers.remove_all()
        self._residency.clear()
        self._active = None
        self._detached = True
        _ATTACHED.pop(self._model, None)

    def _check_live(self) -> None:
        if self._detached:
            raise InvalidOptionError("this runtime was detached; attach() the model again")

    def __repr__(self) -> str:
        return f"<Runtime {len(self._names)} resident, active={self._active}, merged={self.merged}>"
