"""The optimizer loop of `training.train`, on one process or as one rank of a data-parallel group.

Written over torch and transformers' pieces rather than around transformers' ``Trainer``: the adapter's
factors live in the runtime's hooks, not in the model's parameters, and a checkpoint here is the
factors and the optimizer's state in safetensors (the ``Trainer`` saves the whole model and pickles its
state). What it uses: torch's ``LambdaLR`` with transformers' schedule formulas (linear / cosine / constant
after a warm-up; not imported from transformers, whose optimization module pulls in PEFT and
bitsandbytes: 10 s of start-up), torch's
``clip_grad_norm_``, bitsandbytes' 8-bit AdamW, ``torch.autocast`` for bf16, and ``torch.distributed``
(gloo on CPU, NCCL on GPUs) for the gradient all-reduce.

Every step's loss is the mean over the label tokens of the whole global batch (``--batch-size`` rows
over ``--grad-accum`` micro-batches and all ranks): each micro-batch's summed loss is divided by that
count (transformers' ``num_items_in_batch``) and the ranks' gradients are summed, so a run on N
processes or with accumulation computes the step a single process computes on the whole batch.

With ``fsdp`` the model is sharded by FSDP2 (`training` calls ``fully_shard``): the factors are DTensor
shards, FSDP's reduce-scatter sums their gradients (divide factor 1) once a step, every rank runs the
same number of forwards (a rank short of rows runs one with weight 0, as FSDP's collectives need), and
checkpoints hold the whole factors and optimizer states (gathered; rank 0 writes; on resume each rank
keeps its shard), so a checkpoint is the same file with or without FSDP.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidOptionError
from .train_data import Example, collate
from .train_state import RunFolder

__all__ = ["Loop", "Progress", "make_optimizer", "schedule"]

OPTIMS = ("adamw", "adamw8bit", "paged_adamw8bit")
SCHEDULES = ("linear", "cosine", "constant")

#: on_step(step, total_steps, mean loss of the last 10 steps)
StepCallback = Callable[[int, int, float], None]
#: on_log(record): one dict every log_every steps (step, loss, lr, eval_loss, tokens_per_second, ...)
LogCallback = Callable[[dict[str, Any]], None]


def schedule(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate factor of step ``s`` (transformers' ``get_scheduler`` formulas: a linear rise over
    ``warmup`` steps, then linear or half-cosine decay to 0 at ``total``, or constant)."""
    if kind not in SCHEDULES:
        raise InvalidOptionError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")

    def factor(s: int) -> float:
        if s < warmup:
            return s / max(1, warmup)
        if kind == "constant":
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


def make_optimizer(name: str, params: Sequence[Any], lr: float) -> Any:
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name not in OPTIMS:
        raise InvalidOptionError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMS)}")
    try:
        import logging
        import warnings

        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        import bitsandbytes as bnb
    except ImportError:
        raise InvalidOptionError(
            f"--optim {name} needs bitsandbytes: pip install 'adapterhub[quant]'"
        ) from None
    cls = bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.PagedAdamW8bit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "paged optimizers are not supported on CPU": it pages nothing there
        return cls(params, lr=lr, weight_decay=0.0)


@dataclass
class Progress:
    """What a run has done so far (saved with each checkpoint)."""

    step: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Loop:
    """One run's loop; ``rank`` / ``world`` > 1 when it is one process of a data-parallel group."""

    model: Any
    params: list[Any]
    encoded: Sequence[Example]  # packed rows carry their position ids (`train_data.pack`)
    eval_encoded: Sequence[Example]
    plan: list[list[int]]  # the global batches, one list of row indices a step
    device: str
    pad: int
    lr: float
    optim: str = "adamw"
    schedule: str = "linear"
    warmup: int = 0
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    bf16: bool = False
    eval_every: int | None = None
    save_every: int | None = None
    log_every: int = 10
    seed: int = 0
    rank: int = 0
    world: int = 1
    folder: RunFolder | None = None
    factor_names: list[str] = field(default_factory=list)
    on_step: StepCallback | None = None
    on_log: LogCallback | None = None
    fsdp: bool = False
    progress: Progress = field(default_factory=Progress)

    def __post_init__(self) -> None:
        from transformers import get_scheduler

        if self.schedule not in SCHEDULES:
            raise InvalidOptionError(
                f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}"
            )
        self.opt = make_optimizer(self.optim, self.params, self.lr)
        kind = "constant_with_warmup" if self.schedule == "constant" else self.schedule
        self.sched = get_scheduler(
            kind, self.opt, num_warmup_steps=self.warmup, num_training_steps=len(self.plan)
        )

    # -------------------------------------------------------------- checkpoints
    def resume(self, where: Any) -> None:
        import torch

        factors, opt_state, state = RunFolder.load(where)
        with torch.no_grad():
            for n, p in zip(self.factor_names, self.params, strict=True):
                p.copy_(_like(factors[n], p))
        self.opt.load_state_dict(opt_state)
        if self.fsdp:  # the optimizer's states were saved whole: keep this rank's shard
            for p in self.params:
                st = self.opt.state.get(p, {})
                for k, v in st.items():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0:
                        st[k] = _like(v, p)
        self.sched.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"]["cuda"], torch.device(self.device))
        self.progress = Progress(
            step=state["step"],
            tokens=state["tokens"],
            losses=state["losses"],
            eval_losses=[tuple(e) for e in state["eval_losses"]],
            seconds=state["seconds"],
        )

    def _checkpoint(self) -> None:
        import torch

        if self.folder is None or (self.rank != 0 and not self.fsdp):
            return
        factors = {n: _whole(t) for n, t in zip(self.factor_names, self.params, strict=True)}
        opt_state = self.opt.state_dict()
        if self.fsdp:  # gather every rank's shard of the optimizer's states (collective)
            for i in sorted(opt_state["state"]):
                st = opt_state["state"][i]
                opt_state["state"][i] = {k: _whole(st[k]) for k in sorted(st)}
            if self.rank != 0:
                return
        p = self.progress
        rng = {"cpu": torch.get_rng_state()}
        if self.device.startswith("cuda"):
            rng["cuda"] = torch.cuda.get_rng_state(torch.device(self.device))
        self.folder.save(
            p.step,
            factors,
            opt_state,
            {
                "step": p.step,
                "tokens": p.tokens,
                "losses": p.losses,
                "eval_losses": p.eval_losses,
                "seconds": p.seconds,
                "schedule": self.sched.state_dict(),
                "rng": rng,
            },
        )

    # -------------------------------------------------------------- steps
    def _tensors(self, rows: Sequence[int], source: Sequence[Example]) -> dict[str, Any]:
        batch = collate([source[i] for i in rows], self.pad)
        return {**{k: v.to(self.device) for k, v in batch.items()}, "use_cache": False}

    @staticmethod
    def _counted(labels: list[int]) -> int:
        return sum(1 for x in labels[1:] if x != -100)

    def _loss_sum(self, rows: Sequence[int], source: Sequence[Example], count: int) -> Any:
        """The model's loss on ``rows`` summed over their tokens and divided by ``count``."""
        import torch

        from ..runtime.loss import causal_lm_loss

        dev = self.device.split(":")[0]
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=self.bf16):
            return causal_lm_loss(self.model, **self._tensors(rows, source), num_items=torch.tensor(count))

    def _all_reduce(self, tensors: list[Any]) -> None:
        if self.world == 1:
            return
        import torch
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        at = 0
        for t in tensors:
            t.copy_(flat[at : at + t.numel()].view_as(t))
            at += t.numel()

    def step(self, rows: list[int]) -> float:
        import torch

        count = sum(self._counted(self.encoded[i][1]) for i in rows)
        total = torch.zeros((), dtype=torch.float64)
        micro = self._micro(rows)
        for i, (part, weight) in enumerate(micro):
            if self.fsdp:  # FSDP reduce-scatters once a step, after the last micro-batch's backward
                self.model.set_requires_gradient_sync(i == len(micro) - 1)
            loss = self._loss_sum(part, self.encoded, count)
            (loss if weight else loss * 0.0).backward()
            total += float(loss.detach()) * weight
        if self.fsdp:  # FSDP's reduce-scatter has summed the gradients into each rank's shard
            self._all_reduce([total.reshape(1)])
        else:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            self._all_reduce([*grads, total.reshape(1)])
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.progress.tokens += sum(len(self.encoded[i][0]) for i in rows)
        return float(total)

    def _micro(self, rows: list[int], size: int | None = None) -> list[tuple[list[int], int]]:
        """This rank's micro-batches of ``rows`` with their weights (1; 0 for the forward a rank short of
        rows runs under FSDP, whose collectives need every rank to run as many)."""
        per = math.ceil(len(rows) / self.world)
        mine = rows[self.rank :: self.world]
        size = size or max(1, math.ceil((per if self.fsdp else len(mine)) / self.grad_accum))
        out = [(mine[at : at + size], 1) for at in range(0, len(mine), size)]
        if self.fsdp:
            out += [([rows[0]], 0)] * (math.ceil(per / size) - len(out))
        return out

    def evaluate(self) -> float:
        import torch

        count = sum(self._counted(lab) for _, lab in self.eval_encoded)
        size = max(1, len(self.plan[0]) // self.world // self.grad_accum)
        total = torch.zeros(1, dtype=torch.float64)
        self.model.eval()
        with torch.no_grad():
            for part, weight in self._micro(list(range(len(self.eval_encoded))), size):
                total += float(self._loss_sum(part, self.eval_encoded, count)) * weight
        self.model.train()
        self._all_reduce([total])
        return float(total)

    def run(self) -> Progress:
        import torch

        p = self.progress
        if p.step == 0:
            torch.manual_seed(self.seed)
        self.model.train()
        start = time.perf_counter() - p.seconds
        last_log = (time.perf_counter(), p.tokens)
        total = len(self.plan)
        for step in range(p.step + 1, total + 1):
            loss = self.step(self.plan[step - 1])
            if not math.isfinite(loss):
                raise InvalidOptionError(f"the loss became {loss} at step {step}; lower --lr")
            p.step, p.seconds = step, time.perf_counter() - start
            p.losses.append(loss)
            record: dict[str, Any] = {}
            if self.eval_encoded and self.eval_every and (step % self.eval_every == 0 or step == total):
                record["eval_loss"] = ev = self.evaluate()
                p.eval_losses.append((step, ev))
            if self.save_every and step % self.save_every == 0 and step < total:
                self._checkpoint()
            recent = p.losses[-10:]
            if self.on_step is not None and self.rank == 0:
                self.on_step(step, total, sum(recent) / len(recent))
            if (
                self.on_log is not None
                and self.rank == 0
                and (step % self.log_every == 0 or step == total or record)
            ):
                now = time.perf_counter()
                record = {
                    "step": step,
                    "steps": total,
                    "loss": loss,
                    "loss_mean10": sum(recent) / len(recent),
                    "lr": float(self.sched.get_last_lr()[0]),
                    "tokens_per_second": (p.tokens - last_log[1]) / max(now - last_log[0], 1e-9),
                    "seconds": round(p.seconds, 3),
                    **record,
                }
                last_log = (now, p.tokens)
                self.on_log(record)
        self.model.eval()
        return p


def _whole(t: Any) -> Any:
    """A tensor whole: a DTensor shard all-gathered (collective), others as they are."""
    import torch

    if not isinstance(t, torch.Tensor):
        return t
    t = t.detach()
    if not torch.distributed.is_available():
        return t
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(full: Any, p: Any) -> Any:
    """The whole tensor ``full`` as ``p`` holds it: on its device and dtype, and sharded as ``p`` is when
    ``p`` is a DTensor."""
    import torch

    if not torch.distributed.is_available():
        return full.to(p.device, p.dtype)
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        return distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements)
    return full.to(p.device, p.dtype)
