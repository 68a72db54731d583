"""Find the best mix: learn the weights of an exact combination of adapters on a few rows (``adapterhub mix``).

The combination ``sum_i w_i s_i B_i A_i`` is linear, hence differentiable, in its N scalar weights. With
every factor frozen, `mix` puts one forward hook on each targeted linear layer that adds
``((x A_cat^T) * (w[idx] * s)) B_cat^T`` (the adapters' factors concatenated along the rank, ``idx``
naming each rank column's adapter), and trains ``w`` with Adam on the teacher-forced loss of the rows
(the answer tokens, as ``eval`` scores them). For comparison it runs CMA-ES (the ``cma`` package; LoraHub
searched its weights gradient-free) on the same rows, from the same start, with as many loss evaluations
as the gradient run costs in forward-pass equivalents (a step is counted as three), and reports both.

The gradient-learned combination is cataloged as a new adapter through `combine` (exact, or compressed
to ``rank`` as ``combine --rank`` does), its lineage naming the parents, the learned weights and the data's
sha256, and it is evaluated on the same rows (an evaluation record with source ``mix``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import BaseModelError, IncompatibleAdapterError, InvalidOptionError
from ..names import check_name, check_tags
from .bases import base_dir, base_layout

if TYPE_CHECKING:
    import torch

    from ..lora import LoraWeights
    from .compute import CombineSummary
    from .evaluation import EvaluationResult

__all__ = ["MixResult", "SEARCHES", "mix", "mix_weights"]

SEARCHES = ("cma", "none")


@dataclass(frozen=True)
class MixResult:
    """The learned combination, cataloged, and how the gradient and the gradient-free search did."""

    combined: CombineSummary
    adapters: tuple[str, ...]
    weights: tuple[float, ...]  # learned by gradient (the cataloged ones)
    loss_start: float  # at the starting weights (1/N each)
    loss: float  # at the learned weights, exact combination
    steps: int
    seconds: float
    search: str  # "cma" or "none"
    search_weights: tuple[float, ...] | None
    search_loss: float | None
    search_evaluations: int
    search_seconds: float
    evaluation: EvaluationResult | None
    data_sha256: str
    rows: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.combined.adapter.to_dict(),
            "adapters": list(self.adapters),
            "weights": list(self.weights),
            "loss_start": self.loss_start,
            "loss": self.loss,
            "steps": self.steps,
            "seconds": self.seconds,
            "search": self.search,
            "search_weights": list(self.search_weights) if self.search_weights is not None else None,
            "search_loss": self.search_loss,
            "search_evaluations": self.search_evaluations,
            "search_seconds": self.search_seconds,
            "combine_error": self.combined.error,
            "evaluation": self.evaluation.to_dict() if self.evaluation is not None else None,
            "data_sha256": self.data_sha256,
            "rows": self.rows,
        }


class _Mixer:
    """Forward hooks adding ``sum_i w_i s_i B_i A_i x`` on every targeted linear layer; ``w`` trainable."""

    def __init__(self, model: Any, adapters: Sequence[LoraWeights], names: Sequence[str]) -> None:
        import torch

        first = next(model.parameters())
        self.w = torch.nn.Parameter(torch.full((len(adapters),), 1.0 / len(adapters), device=first.device))
        parts: dict[str, list[tuple[int, Any]]] = {}
        for i, (weights, label) in enumerate(zip(adapters, names, strict=True)):
            for key, m in weights.modules.items():
                if m.kind != "linear" or m.is_dora or m.bias is not None or m.A is None or m.B is None:
                    raise IncompatibleAdapterError(
                        f"{label}: {m.module} is a {'DoRA ' if m.is_dora else ''}{m.kind} module"
                        f"{' with a lora_bias' if m.bias is not None else ''}; mix learns weights of plain "
                        "linear LoRA modules only"
                    )
                parts.setdefault(key, []).append((i, m))
            if getattr(weights, "replacements", None):
                raise IncompatibleAdapterError(
                    f"{label} carries modules_to_save replacements; mix cannot weight them"
                )
        self.handles = []
        for key, mods in parts.items():
            module = model.get_submodule(key.removesuffix(".weight"))
            if not isinstance(module, torch.nn.Linear):
                raise IncompatibleAdapterError(
                    f"{key} is not a torch Linear layer in this model; mix cannot hook it"
                )
            dev = module.weight.device
            a = torch.cat([m.A.to(dev, torch.float32) for _, m in mods])
            b = torch.cat([m.B.to(dev, torch.float32) for _, m in mods], dim=1)
            idx = torch.cat([torch.full((m.rank,), i, dtype=torch.long) for i, m in mods]).to(dev)
            scale = torch.cat([torch.full((m.rank,), float(m.scale)) for _, m in mods]).to(dev)
            self.handles.append(module.register_forward_hook(self._hook(a, b, idx, scale)))

    def _hook(
        self, a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor
    ) -> Callable[..., Any]:
        def hook(module: Any, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            h = (x.to(a.dtype) @ a.T) * (self.w[idx] * scale)
            return out + (h @ b.T).to(out.dtype)

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _loss_fn(model: Any, seqs: Sequence[Any], pad: int, batch_tokens: int) -> Callable[[bool], torch.Tensor]:
    """The token-mean NLL of the answer tokens over every row (with or without a graph)."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda q: -len(seqs[q].ids))
    batches, at = [], 0
    while at < len(order):
        width = len(seqs[order[at]].ids)
        take = max(1, batch_tokens // width)
        chunk = order[at : at + take]
        at += len(chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        target = torch.zeros((len(chunk), width), dtype=torch.bool)
        for r, q in enumerate(chunk):
            s = seqs[q]
            ids[r, : len(s.ids)] = torch.tensor(s.ids)
            mask[r, : len(s.ids)] = 1
            for i in range(max(s.start, 1), len(s.ids)):
                if s.mask is None or s.mask[i]:
                    target[r, i] = True
        batches.append((ids.to(device), mask.to(device), target.to(device)))
    count = sum(int(t.sum()) for _, _, t in batches)

    def loss(grad: bool) -> torch.Tensor:
        total = torch.zeros((), device=device)
        with torch.set_grad_enabled(grad):
            for ids, mask, target in batches:
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                lp = torch.log_softmax(logits, dim=-1).gather(2, ids[:, 1:, None])[..., 0]
                total = total - (lp * target[:, 1:]).sum()
        return total / count

    return loss


def mix_weights(
    model: Any,
    adapters: Sequence[LoraWeights],
    names: Sequence[str],
    seqs: Sequence[Any],
    *,
    pad: int,
    steps: int = 30,
    lr: float = 0.05,
    search: str = "cma",
    seed: int = 0,
    batch_tokens: int = 1024,
) -> dict[str, Any]:
    """Learn the weights on ``seqs`` by gradient, and (``search="cma"``) by CMA-ES for comparison."""
    import torch

    mixer = _Mixer(model, adapters, names)
    loss = _loss_fn(model, seqs, pad, batch_tokens)
    out: dict[str, Any] = {}
    try:
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.no_grad():
            out["loss_start"] = float(loss(False))
        opt = torch.optim.Adam([mixer.w], lr=lr)
        best = (out["loss_start"], mixer.w.detach().clone())
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            value = loss(True)
            value.backward()
            if float(value.detach()) < best[0]:
                best = (float(value.detach()), mixer.w.detach().clone())
            opt.step()
        with torch.no_grad():
            final = float(loss(False))
            if final > best[0]:
                mixer.w.copy_(best[1])
                final = best[0]
        if not math.isfinite(final):
            raise InvalidOptionError(f"the loss became {final}; lower --lr")
        out.update(
            weights=[float(x) for x in mixer.w.detach()], loss=final, seconds=time.perf_counter() - start
        )
        out.update(search_weights=None, search_loss=None, search_evaluations=0, search_seconds=0.0)
        if search == "cma":
            import cma

            budget = max(3 * steps, 2 * len(adapters) + 2)
            start = time.perf_counter()
            es = cma.CMAEvolutionStrategy(
                [1.0 / len(adapters)] * len(adapters),
                0.3,
                {"maxfevals": budget, "seed": seed + 1, "verbose": -9},
            )

            def f(x: Sequence[float]) -> float:
                with torch.no_grad():
                    mixer.w.copy_(torch.tensor(list(x), dtype=mixer.w.dtype))
                    return float(loss(False))

            if len(adapters) == 1:  # CMA-ES needs two dimensions: a plain line search on the one weight
                xs = [1.0 + 0.25 * k for k in range(-4, 5)]
                vals = [f([x]) for x in xs]
                k = min(range(len(xs)), key=vals.__getitem__)
                best_x, best_v, evals = [xs[k]], vals[k], len(xs)
            else:
                es.optimize(f)
                best_x, best_v, evals = (
                    list(es.result.xbest),
                    float(es.result.fbest),
                    int(es.result.evaluations),
                )
            out.update(
                search_weights=[float(x) for x in best_x],
                search_loss=best_v,
                search_evaluations=evals,
                search_seconds=time.perf_counter() - start,
            )
    finally:
        mixer.close()
    return out


def mix(
    lib: Any,
    adapters: Sequence[str],
    *,
    base: str | os.PathLike[str],
    data: str | os.PathLike[str],
    name: str,
    steps: int = 30,
    lr: float = 0.05,
    rank: int | str | None = None,
    search: str = "cma",
    limit: int | None = 32,
    max_length: int = 1024,
    seed: int = 0,
    device: str | None = None,
    tags: Sequence[str] = (),
    description: str | None = None,
) -> MixResult:
    """Learn the weights of an exact combination of cataloged ``adapters`` minimizing the loss on the first
    ``limit`` rows of ``data``, and catalog it as ``name`` (see the module's docstring)."""
    import torch

    from ..formats import read_adapter
    from ..ops.combine import combine as combine_op
    from .compute import _inputs, _jsonable, _preflight, _rank, _refuse_taken, _store_result
    from .evaluation import evaluate
    from .running import is_causal_lm, load_base, pick_device
    from .scoring import loss_sequences, read_eval_data

    check_name(name)
    tags = check_tags(tags)
    _refuse_taken(lib, name)
    if search not in SEARCHES:
        raise InvalidOptionError(f"unknown search {search!r}; choose one of {', '.join(SEARCHES)}")
    if steps < 1 or not (math.isfinite(lr) and lr > 0):
        raise InvalidOptionError("steps must be at least 1 and the learning rate positive")
    _rank(rank)
    ev = read_eval_data(data, limit=limit)
    inputs = _inputs(lib, list(adapters), load=False)
    if any(not i.cataloged for i in inputs):
        raise InvalidOptionError("mix takes cataloged adapters; `adapterhub add` the others first")
    layout = base_layout(lib, base)
    _preflight(lib, inputs, layout, subject=f"mix into {name}")
    folder = base_dir(lib, base)
    if not is_causal_lm(folder):
        raise BaseModelError(f"{base} is not a causal LM; mix learns on a causal LM's loss")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    seqs = loss_sequences(tokenizer, ev, max_length)
    loaded = [read_adapter(lib.files(i.label), load=True) for i in inputs]
    dev = pick_device(device)
    model, _ = load_base(lib, base, device=dev, dtype="float32")
    for p in model.parameters():
        p.requires_grad_(False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    found = mix_weights(
        model, loaded, [i.label for i in inputs], seqs, pad=pad, steps=steps, lr=lr, search=search, seed=seed
    )
    del model
    weights = found["weights"]
    result = combine_op(
        [(w, x) for w, x in zip(loaded, weights, strict=True)], method="linear", rank=_rank(rank)
    )
    params = _jsonable(
        {
            **result.params,
            "data_sha256": ev.sha256,
            "data": ev.name,
            "rows": len(ev),
            "steps": steps,
            "lr": lr,
            "loss": found["loss"],
            "loss_start": found["loss_start"],
            "search": search,
            "search_loss": found["search_loss"],
        }
    )
    parents = [
        {"parent_name": i.label, "weight": w, "method": "mix", "params": params}
        for i, w in zip(inputs, weights, strict=True)
    ]
    summary = _store_result(
        lib, result, name, parents=parents, tags=tags, description=description, source="derived:mix"
    )
    torch.manual_seed(seed)
    evaluation = evaluate(
        lib,
        [name],
        base=base,
        data=data,
        metrics=["loss"],
        limit=limit,
        seed=seed,
        device=device,
        max_length=max_length,
        source="mix",
    )
    return MixResult(
        combined=summary,
        adapters=tuple(i.label for i in inputs),
        weights=tuple(weights),
        loss_start=found["loss_start"],
        loss=found["loss"],
        steps=steps,
        seconds=found["seconds"],
        search=search,
        search_weights=tuple(found["search_weights"]) if found["search_weights"] is not None else None,
        search_loss=found["search_loss"],
        search_evaluations=found["search_evaluations"],
        search_seconds=found["search_seconds"],
        evaluation=evaluation,
        data_sha256=ev.sha256,
        rows=len(ev),
    )
