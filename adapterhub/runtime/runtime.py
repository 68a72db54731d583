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
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InvalidOptionError, NotResidentError
from ..lora import LoraWeights
from ._applied import Applied
from ._kinds import Layers
from ._merge import merge_into
from ._parts import Content, Merged, keyed_upload, read_weights, resolve_live
from ._plan import LoadPlan, check_plan, model_layout, plan_adapter
from ._residency import Residency
from ._select import RuntimeState
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
        first = next(iter(model.parameters()), None)
        self._device = first.device if first is not None else torch.device("cpu")
        self._applied = Applied(self._residency, self._state, self._device)
        self._layout = model_layout(model)
        self._detached = False
        self._trainer = Trainer(model, self._state, dtype)

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
        return [self._contents[sha].resident(name) for name, sha in self._names.items()]

    @property
    def active(self) -> dict[str, float] | None:
        """The combination every forward applies outside `rows` (None: the base model)."""
        active = self._applied.active
        return dict(active) if active is not None else None

    @property
    def merged(self) -> dict[str, float] | None:
        """The combination folded into the weights by `merge`, if any."""
        merged = self._applied.merged
        return dict(merged.spec) if merged is not None else None

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
        resolve = self._resolve if isinstance(adapter, str) else None
        found = resolve(str(adapter)) if resolve is not None else None
        if found is not None:
            name = name or str(adapter)
            adapter, sha256 = found[0], sha256 or found[1]
        weights, name, path = read_weights(adapter, name)
        weights = resolve_live(self._model, weights, merged=self._applied.merged is not None)  # KaSA
        if self.training is not None and self.training.name == name:
            raise InvalidOptionError(f"{name} is being trained; freeze it first or load another name")
        plan = plan_adapter(self._model, self._layout, weights, name)
        check_plan(plan, name, device, self._device)
        key, on_device = keyed_upload(plan, weights, path, self._device, sha256)
        old = self._names.get(name)
        merged = self._applied.merged
        if merged is not None and name in merged.spec and old != key:
            raise InvalidOptionError(f"{name} is merged into the weights; call rt.unmerge() before reloading")
        if key not in self._contents:
            self._residency.add(self._place(plan, key, on_device))
        self._residency.bind(name, key)
        if old is not None and old != key:
            self._release(old)
            self._applied.reselect()  # selections naming it now serve the new content
        logger.info("resident: %s (%s)", name, key[:12])
        return next(r for r in self.resident if r.name == name)

    def _place(self, plan: LoadPlan, key: str, on_device: dict[int, torch.Tensor]) -> Content:
        slot = self._residency.take_slot()
        backups = self._applied.merged.backups if self._applied.merged is not None else []
        try:  # (DoRA's norms are of the unmerged weights)
            return self._layers.place(plan, key, slot, self._residency.cap, on_device, backups, self._device)
        except BaseException:
            self._residency.give_slot(slot)
            raise

    def unload(self, name: str) -> None:
        """Drop ``name``; its content leaves the device when no other name shares it.

        Raises:
            AdapterNotFoundError: no such resident name.
            InvalidOptionError: the name is active, used by an open `rows` block, or merged.
        """
        self._check_live()
        if name not in self._names:
            raise _not_resident(name, list(self._names))
        why = self._applied.in_use(name)
        if why:
            raise InvalidOptionError(why)
        self._release(self._residency.unbind(name))

    def _release(self, sha: str) -> None:
        """Drop content ``sha`` from the layers once no name is bound to it."""
        c = self._residency.release(sha)
        if c is not None:
            self._layers.clear_slot(c.slot, c.layers)

    # ------------------------------------------------------------------------------------ selection

    def _normalize(self, spec: AdapterSpec) -> dict[str, float] | None:
        return self._residency.normalize(spec, self._trainer.adapters, self.freeze)

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
        self._applied.activate(self._normalize(spec))

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
        self._applied.refuse_merged("before using per-row adapters")
        with self._applied.rows([self._normalize(s) for s in specs], lambda: not self._detached):
            yield

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
        applied = self._applied
        norm = applied.active if spec is ... else self._normalize(spec)
        if not norm:
            raise InvalidOptionError("nothing to merge: give a resident name or a combination")
        if applied.rows_stack:
            raise InvalidOptionError("cannot merge inside an open rt.rows() block")
        slots = self._residency.slots(norm)
        key = tuple(sorted(slots.items()))
        if applied.merged is not None:
            if applied.merged.key == key:
                return
            raise InvalidOptionError(f"{applied.merged.spec} is merged already; call rt.unmerge() first")
        touched = [layer for layer in self._layers.values() if layer.users & set(slots)]
        applied.merged = Merged(spec=norm, key=key, backups=merge_into(self._model, touched, slots))
        applied.active = norm
        self._state.sel = None
        self._layers.suspend()  # everything is in the weights: the base's own forwards, at its speed

    def unmerge(self) -> None:
        """Copy the original tensors back (bit for bit); the merged spec stays active through the hooks."""
        self._check_live()
        if self._applied.merged is None:
            return
        self._applied.merged.restore()
        self._applied.merged = None
        self._layers.engage()
        self._applied.reselect()

    # ------------------------------------------------------------------------------------ training

    def create(
        self,
        name: str,
        *,
        rank: int = 8,
        alpha: float = 16.0,
        targets: Sequence[str] | str = ("q_proj", "v_proj"),
        init: str = "kaiming",
        rslora: bool = False,
        dropout: float = 0.0,
        seed: int | None = None,
    ) -> TrainableAdapter:
        """A new trainable adapter on ``targets`` (short names, module names or ``"all-linear"``): A as PEFT
        initialises it, B = 0, the base frozen; it applies to every forward until frozen. See `.train`."""
        self._check_live()
        if name in self._names or name in self._trainer.adapters:
            raise InvalidOptionError(f"{name} is in use in this runtime; pick another name or unload it")
        self._applied.refuse_merged("before training")
        opts = dict(rank=rank, alpha=alpha, init=init, rslora=rslora, dropout=dropout, seed=seed)
        return self._trainer.create(name, targets=targets, **opts)  # type: ignore[arg-type]

    def freeze(self, name: str) -> ResidentAdapter:
        """End training of ``name``: its factors become a resident adapter like a loaded one."""
        ad = self._trainer.adapters.get(name)
        if ad is None or not ad.trainable:  # made and frozen already: resident unless unloaded since
            found = [r for r in self.resident if r.name == name]
            return found[0] if found else _unknown(name, list(self._trainer.adapters))
        self._trainer.release(name)
        try:
            return self.load(ad.weights(), name=name)
        except BaseException:
            self._trainer.discard(name)
            raise

    def save(
        self,
        name: str,
        *,
        path: str | os.PathLike[str] | None = None,
        tags: Sequence[str] = (),
        description: str | None = None,
    ) -> Any:
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
        self._applied.active = None
        self._detached = True
        _ATTACHED.pop(self._model, None)

    def _check_live(self) -> None:
        if self._detached:
            raise InvalidOptionError("this runtime was detached; attach() the model again")

    def __repr__(self) -> str:
        return f"<Runtime {len(self._names)} resident, active={self.active}, merged={self.merged}>"
