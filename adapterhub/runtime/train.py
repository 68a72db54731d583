"""Trainable LoRA adapters on a live model: the runtime's ``create`` / ``freeze`` / ``save`` (torch only).

``rt.create(name, rank=8, alpha=16, targets=["q_proj", "v_proj"])`` freezes every base parameter and
puts on each targeted module a forward hook that adds ``s * B A dropout(x)`` with ``A`` and ``B`` as
fp32 ``nn.Parameter`` s, initialised as PEFT does (``init_lora_weights=True``: ``A`` kaiming-uniform with
``a = sqrt(5)``, ``B = 0``; ``"gaussian"``: ``A ~ N(0, (1/r)^2)``; embeddings the other way round,
``A = 0`` and ``B ~ N(0, 1)``), so at step 0 the model computes exactly what the base does. Train them
with any optimizer (``ad.parameters()``); gradient checkpointing works (the input embeddings' output is
made to require grad while it is on, so reentrant checkpoints see a graph).

The low-rank term of a linear layer is one autograd function (`lora_term`): it saves the layer's input
by reference (no fp32 copy of a bf16 activation, as PEFT's ``x.to(lora_A.dtype)`` makes) and the small
``x A^T``, and computes the gradients of ``A``, ``B`` and ``x`` in three GEMMs. The product is computed
in the runtime's dtype (``attach(model, dtype=torch.float32)``: fp32 as PEFT does) or else in the layer's
own dtype, the factors staying fp32 (mixed precision); on an fp32 model both are PEFT's math.

Once trained, ``rt.freeze(name)`` (also done by ``activate`` / ``rows`` / ``merge`` naming it) turns the
factors into an ordinary resident adapter: from then on it is served, combined and merged like a loaded
one. ``rt.save(name, path=...)`` writes a PEFT folder (factors only).

For a wrapper that owns its modules' parameters (FSDP2's ``fully_shard``), ``ad.register()`` makes the
factors parameters of the modules they adapt (``adapterhub_lora_A`` / ``_B``): the wrapper then shards,
gathers and reduces them with the layer, and the hooks read them from the module. ``ad.gather()``
(collective: every rank calls it) brings them back whole before ``save``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidOptionError
from ..lora import LoraModule, LoraWeights, lora_scale
from ._layers import layer_kind, unadaptable_note

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from ._layers import RuntimeState

__all__ = ["INITS", "TrainableAdapter", "Trainer", "adaptable_names", "lora_term", "select_targets"]

logger = logging.getLogger(__name__)

INITS = ("kaiming", "gaussian")


class _LoraTerm(torch.autograd.Function):
    """``scale * (x @ A.T) @ B.T`` over the last dimension, computed in ``dtype``."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        xc = x2 if x2.dtype == dtype else x2.to(dtype)
        ac, bc = a.to(dtype), b.to(dtype)
        h = xc @ ac.T
        y = (h @ bc.T) * scale
        ctx.save_for_backward(x, h, a, b)
        ctx.scale, ctx.dtype = scale, dtype
        return y.reshape(*x.shape[:-1], b.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, h, a, b = ctx.saved_tensors
        dt = ctx.dtype
        g = grad.reshape(-1, grad.shape[-1])
        g = (g if g.dtype == dt else g.to(dt)) * ctx.scale
        grad_b = (g.T @ h).to(b.dtype) if ctx.needs_input_grad[2] else None
        gh = g @ b.to(dt)
        grad_a = None
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            grad_a = (gh.T @ (x2 if x2.dtype == dt else x2.to(dt))).to(a.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (gh @ a.to(dt)).to(x.dtype).reshape(x.shape)
        return grad_x, grad_a, grad_b, None, None


def lora_term(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype
) -> torch.Tensor:
    """``scale * x A^T B^T`` (``a`` ``(r, in)``, ``b`` ``(out, r)``) with a lean backward; see the module."""
    return _LoraTerm.apply(x, a, b, scale, dtype)


@dataclass(eq=False)
class _Target:
    module_name: str
    module: nn.Module
    kind: str  # linear | conv1d | embedding
    a: nn.Parameter  # (r, in); embedding: PEFT's lora_embedding_A (r, num)
    b: nn.Parameter  # (out, r); embedding: PEFT's lora_embedding_B (dim, r)
    handle: RemovableHandle | None = None
    registered: bool = False  # the factors are the module's parameters REGISTERED_A / _B

    def factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        """(A, B) as the forward must use them: the module's own when registered (a wrapper such as
        FSDP2 swaps them for gathered or sharded ones), else the ones made."""
        if not self.registered:
            return self.a, self.b
        return getattr(self.module, REGISTERED + "_A"), getattr(self.module, REGISTERED + "_B")


REGISTERED = "adapterhub_lora"


def _is_sharded(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class TrainableAdapter:
    """A new adapter being trained; made by `Runtime.create`. Its factors are ``parameters()``.

    ``lineage`` is free-form: a training loop records what made the adapter (``steps``, ``loss``,
    ``data_sha256``, ...) and `Runtime.save` writes it into the catalog's lineage row.
    """

    def __init__(
        self, name: str, *, rank: int, alpha: float, rslora: bool, dropout: float, init: str, seed: int | None
    ) -> None:
        self.name = name
        self.rank = rank
        self.alpha = alpha
        self.rslora = rslora
        self.dropout = dropout
        self.init = init
        self.seed = seed
        self.scale = lora_scale(rank, alpha, rslora)
        self.targets: dict[str, _Target] = {}
        self.enabled = True  # False: the hooks add nothing (the base model), as PEFT's disable_adapter
        self.trainable = True  # False once frozen into the resident set
        self.lineage: dict[str, Any] = {}

    def parameters(self) -> list[nn.Parameter]:
        return [p for t in self.targets.values() for p in t.factors()]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters under the names PEFT gives them (``<module>.lora_A.weight``, ...)."""
        for t in self.targets.values():
            a, b = t.factors()
            if t.kind == "embedding":
                yield f"{t.module_name}.lora_embedding_A", a
                yield f"{t.module_name}.lora_embedding_B", b
            else:
                yield f"{t.module_name}.lora_A.weight", a
                yield f"{t.module_name}.lora_B.weight", b

    def register(self) -> None:
        """Make the factors parameters of the modules they adapt (``adapterhub_lora_A`` / ``_B``), so
        that a wrapper owning the modules' parameters (FSDP2's ``fully_shard``) shards, gathers and
        reduces them with their layer. One trainable adapter a module at a time."""
        for t in self.targets.values():
            if t.registered:
                continue
            if hasattr(t.module, REGISTERED + "_A"):
                raise InvalidOptionError(f"{t.module_name} already holds the factors of another adapter")
            t.module.register_parameter(REGISTERED + "_A", t.a)
            t.module.register_parameter(REGISTERED + "_B", t.b)
            t.registered = True

    def gather(self) -> None:
        """Undo `register`: the factors become whole tensors held by the adapter again. Sharded ones
        (DTensors) are all-gathered, so under torch.distributed every rank must call this."""
        for t in self.targets.values():
            if not t.registered:
                continue
            whole = []
            for p in t.factors():
                d: Any = p.detach()
                whole.append(nn.Parameter(d.full_tensor() if _is_sharded(d) else d, p.requires_grad))
            t.a, t.b = whole
            delattr(t.module, REGISTERED + "_A")
            delattr(t.module, REGISTERED + "_B")
            t.registered = False

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def target_names(self) -> list[str]:
        return sorted({t.module_name.rsplit(".", 1)[-1] for t in self.targets.values()})

    def weights(self, *, base_model: str | None = None) -> LoraWeights:
        """The factors as `LoraWeights` (fp32 copies on the CPU), in the layout every writer takes."""
        modules: dict[str, LoraModule] = {}
        for t in self.targets.values():
            fa, fb = t.factors()
            if _is_sharded(fa) or _is_sharded(fb):
                raise InvalidOptionError(
                    f"the factors of {self.name} are sharded; call gather() on every process first"
                )
            a, b = fa.detach().to("cpu", torch.float32).clone(), fb.detach().to("cpu", torch.float32).clone()
            kind: Any = "linear"
            if t.kind == "embedding":  # LoraModule: A (r, dim), B the (num, r) table
                a, b, kind = b.T.contiguous(), a.T.contiguous(), "embedding"
            key = t.module_name + ".weight"
            modules[key] = LoraModule(
                key=key,
                kind=kind,
                rank=self.rank,
                alpha=float(self.alpha),
                scale=float(self.scale),
                a_shape=tuple(a.shape),
                b_shape=tuple(b.shape),
                dtype="F32",
                A=a,
                B=b,
            )
        config = {
            "lora_dropout": float(self.dropout),
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "init_lora_weights": True,
        }
        return LoraWeights(modules=modules, format="peft", config=config, base_model=base_model)

    def __repr__(self) -> str:
        state = "trainable" if self.trainable else "frozen"
        return f"<TrainableAdapter {self.name} r={self.rank} {len(self.targets)} modules, {state}>"


def _matches(module_name: str, targets: Sequence[str]) -> bool:
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def select_targets(model: nn.Module, targets: Sequence[str] | str) -> list[tuple[str, nn.Module, str]]:
    """(name, module, kind) of every module ``targets`` selects: short names (``q_proj``), full module
    names, or ``"all-linear"`` (every Linear / GPT-2 Conv1D but the output layer, as PEFT chooses)."""
    m: Any = model
    out_emb = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    found: list[tuple[str, nn.Module, str]] = []
    names = [targets] if isinstance(targets, str) else list(targets)
    if not names:
        raise InvalidOptionError("give at least one target module (for example q_proj,v_proj, or all-linear)")
    everything = names == ["all-linear"]
    for mname, mod in model.named_modules():
        kind = layer_kind(mod)
        if everything:
            if kind in ("linear", "conv1d") and mod is not out_emb:
                found.append((mname, mod, kind))
            continue
        if not _matches(mname, names):
            continue
        if kind not in ("linear", "conv1d", "embedding"):
            raise InvalidOptionError(
                f"{mname} is a {type(mod).__name__}{unadaptable_note(mod)}; trainable adapters adapt "
                "nn.Linear, GPT-2 Conv1D and nn.Embedding (conv layers are not supported for training)"
            )
        found.append((mname, mod, kind))
    missing = [t for t in names if not everything and not any(_matches(n, [t]) for n, _, _ in found)]
    if not found or missing:
        raise InvalidOptionError(
            f"targets {', '.join(missing or names)} match no module of this model; its adaptable modules are "
            f"{', '.join(adaptable_names(model))} (or all-linear)"
        )
    return found


def adaptable_names(model: nn.Module) -> list[str]:
    """The short names (``q_proj``, ``embed_tokens``, ...) of the modules a trainable adapter can target."""
    return sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, mod in model.named_modules()
            if n and layer_kind(mod) in ("linear", "conv1d", "embedding")
        }
    )


class Trainer:
    """The trainable adapters of one runtime (private to the runtime package: `Runtime` drives it)."""

    def __init__(self, model: nn.Module, state: RuntimeState, dtype: torch.dtype | None) -> None:
        self.model = model
        self.state = state
        self.dtype = dtype
        self.adapters: dict[str, TrainableAdapter] = {}
        # base requires_grad as given, by module and name: no reference that would keep a parameter a
        # wrapper replaced (FSDP2 swaps each for its shard) alive
        self._flags: list[tuple[nn.Module, str, bool]] | None = None
        self._input_hook: RemovableHandle | None = None

    @property
    def current(self) -> TrainableAdapter | None:
        return next((a for a in self.adapters.values() if a.trainable), None)

    def create(
        self,
        name: str,
        *,
        rank: int,
        alpha: float,
        targets: Sequence[str] | str,
        init: str,
        rslora: bool,
        dropout: float,
        seed: int | None,
    ) -> TrainableAdapter:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise InvalidOptionError(f"rank must be a positive integer, got {rank!r}")
        if not math.isfinite(float(alpha)) or float(alpha) <= 0:
            raise InvalidOptionError(f"alpha must be a positive number, got {alpha!r}")
        if init not in INITS:
            raise InvalidOptionError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
        if not 0.0 <= float(dropout) < 1.0:
            raise InvalidOptionError(f"dropout must be in [0, 1), got {dropout!r}")
        if self.current is not None:
            raise InvalidOptionError(
                f"{self.current.name} is being trained; save or freeze it (rt.freeze(name)) before creating another"
            )
        found = select_targets(self.model, targets)
        ad = TrainableAdapter(
            name, rank=rank, alpha=float(alpha), rslora=rslora, dropout=float(dropout), init=init, seed=seed
        )
        gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.initial_seed()) % 2**63)
        for mname, mod, kind in found:
            w: Any = mod.weight
            lin: Any = mod
            shape: tuple[int, ...]
            if kind == "conv1d":
                shape = (int(w.shape[1]), int(w.shape[0]))
            elif kind == "linear":  # bitsandbytes' Linear4bit packs its weight: the features give the shape
                shape = (int(lin.out_features), int(lin.in_features))
            else:
                shape = tuple(int(d) for d in w.shape)
            dev = w.device
            if (
                kind == "embedding"
            ):  # PEFT: lora_embedding_A (r, num) = 0, lora_embedding_B (dim, r) ~ N(0, 1)
                a = torch.zeros(rank, shape[0])
                b = torch.empty(shape[1], rank)
                nn.init.normal_(b, generator=gen)
            else:
                a = torch.empty(rank, shape[1])
                if init == "gaussian":
                    nn.init.normal_(a, std=1 / rank, generator=gen)
                else:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
                b = torch.zeros(shape[0], rank)
            ad.targets[mname] = _Target(mname, mod, kind, nn.Parameter(a.to(dev)), nn.Parameter(b.to(dev)))
        self._freeze_base()
        for t in ad.targets.values():
            t.handle = t.module.register_forward_hook(_Hook(self, ad, t), with_kwargs=True)
        self.adapters[name] = ad
        self._hook_inputs()
        logger.info("trainable: %s (%d modules, %d parameters)", name, len(ad.targets), ad.num_params)
        return ad

    def _freeze_base(self) -> None:
        if self._flags is None:
            self._flags = [
                (m, n, p.requires_grad)
                for m in self.model.modules()
                for n, p in m.named_parameters(recurse=False)
            ]
        for p in self.model.parameters():
            p.requires_grad_(False)

    def _hook_inputs(self) -> None:
        """Under gradient checkpointing, the embeddings' output must require grad (reentrant checkpoints
        otherwise see no graph: "element 0 of tensors does not require grad")."""
        model: Any = self.model
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is None or self._input_hook is not None:
            return
        flag = next(
            (
                f
                for f in ("is_activation_checkpointing", "is_gradient_checkpointing")
                if hasattr(type(model), f)
            ),
            None,
        )

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if (
                flag is not None
                and getattr(model, flag, False)
                and torch.is_grad_enabled()
                and isinstance(output, torch.Tensor)
                and not output.requires_grad
                and output.is_floating_point()
            ):
                return output.requires_grad_(True)
            return None

        self._input_hook = emb.register_forward_hook(hook)

    def release(self, name: str) -> TrainableAdapter:
        """Stop training ``name``: its hooks go, its parameters stop requiring grad."""
        ad = self.adapters[name]
        for t in ad.targets.values():
            if t.handle is not None:
                t.handle.remove()
                t.handle = None
            for p in t.factors():
                p.requires_grad_(False)
        ad.trainable = False
        return ad

    def discard(self, name: str) -> None:
        if name in self.adapters:
            self.release(name)
            del self.adapters[name]

    def close(self) -> None:
        """Remove every hook and give the base parameters their requires_grad flags back."""
        for name in list(self.adapters):
            self.release(name)
        self.adapters.clear()
        if self._input_hook is not None:
            self._input_hook.remove()
            self._input_hook = None
        if self._flags is not None:
            for m, n, flag in self._flags:
                p = getattr(m, n, None)
                if isinstance(p, torch.Tensor):
                    p.requires_grad_(flag)
            self._flags = None


class _Hook:
    """Adds one trainable adapter's term to one module's output."""

    def __init__(self, trainer: Trainer, ad: TrainableAdapter, t: _Target) -> None:
        self.trainer, self.ad, self.t = trainer, ad, t

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        ad, t = self.ad, self.t
        if not ad.enabled or self.trainer.state.passthrough or not isinstance(output, torch.Tensor):
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        a, b = t.factors()
        if t.kind == "embedding":
            h = F.embedding(x, a.T)  # PEFT: embedding of lora_embedding_A.T, then @ lora_embedding_B.T
            y = (h @ b.T) * ad.scale
            scale = getattr(module, "embed_scale", None)
            if scale is not None:
                y = y * (scale.to(y.dtype) if isinstance(scale, torch.Tensor) else scale)
        else:
            if ad.dropout and module.training:
                x = F.dropout(x, ad.dropout, training=True)
            dtype = self.trainer.dtype or output.dtype
            y = lora_term(x, a, b, ad.scale, dtype)
        out = output + y
        return out if out.dtype == output.dtype else out.to(output.dtype)


def save_trained(
    ad: TrainableAdapter,
    model: nn.Module,
    path: str | os.PathLike[str] | None,
    saver: Callable[..., Any] | None,
    tags: Sequence[str],
    description: str | None,
) -> Any:
    """`Runtime.save`: a PEFT folder at ``path``, else what ``saver`` (the catalog's hook) returns."""
    cfg = getattr(model, "config", None)
    weights = ad.weights(base_model=getattr(cfg, "_name_or_path", None) or None)
    lineage = {
        "rank": ad.rank,
        "alpha": ad.alpha,
        "rslora": ad.rslora,
        "targets": ad.target_names,
        "init": ad.init,
        "dropout": ad.dropout,
        "seed": ad.seed,
        **ad.lineage,
    }
    if path is not None:
        from ..formats import write_adapter

        return write_adapter(weights, path)
    if saver is None:
        raise InvalidOptionError("give path= (this runtime has no catalog; hub.attach(model) saves into one)")
    return saver(ad.name, weights, tags=tuple(tags), description=description, lineage=lineage)
