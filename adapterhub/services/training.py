"""Supervised fine-tuning of a new LoRA adapter on a cataloged base: `train` (``adapterhub train``).

The data (`train_data`: JSONL of ``messages``, ``prompt``/``completion`` or ``text`` rows) is read and
encoded before the model is loaded: a bad line is one `InvalidOptionError` naming the file and the line,
and nothing is cataloged. `plan` prints what the run will take (`train_plan.MemoryPlan`). The loop
(`train_loop.Loop`) runs AdamW (or bitsandbytes' 8-bit AdamW) on the factors only with a linear / cosine
/ constant schedule after ``warmup`` steps, gradient clipping, accumulation, optional gradient
checkpointing and bf16 autocast, evaluation every ``eval_every`` steps, and a checkpoint under
``HOME/training/<quoted NAME>/`` (owned by the live run: `RunFolder`) every ``save_every`` steps
(``resume=True`` continues a stopped run exactly). The base may be quantized (``quantize="nf4"|
"int8"``: QLoRA). With ``nproc`` > 1 (or under ``torchrun``) the run is data-parallel over
``torch.distributed``; ``batch_size`` stays the global batch. ``fsdp=True`` (``--fsdp``) shards the
base over those processes with FSDP2 (``fully_shard`` per decoder layer, the rest under the root), the
adapter's factors with their layer, so each process holds about 1/N of the weights: for a base too big
for one device. Bitsandbytes-quantized bases are not sharded (``quantize`` with ``fsdp`` is refused).

The adapter reaches the catalog only after the last step, through `Library.ingest` with a lineage row
(``method: train``; base fingerprint, data sha256, steps, losses, eval loss, hyperparameters,
quantization); a run killed at any moment catalogs nothing and keeps its last checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AdapterExistsError, AdapterHubError, BaseModelError, InvalidOptionError
from ..names import check_name, check_tags
from .bases import base_dir
from .train_data import batches, encode_rows, pack, read_rows, split_eval
from .train_dist import free_port, held_bytes, join_group, shard, usable_threads
from .train_loop import OPTIMS, SCHEDULES, LogCallback, Loop, StepCallback
from .train_plan import QUANTIZE, MemoryPlan, memory_plan
from .train_state import RunFolder, keep_eval_loss

if TYPE_CHECKING:
    from ..catalog.library import Library
    from ..records import AdapterInfo

__all__ = ["TrainResult", "encode_rows", "plan", "read_rows", "train", "usable_threads"]

PlanCallback = Callable[[MemoryPlan], None]


@dataclass(frozen=True)
class TrainResult:
    """A trained adapter, cataloged, and how its training went."""

    adapter: AdapterInfo
    steps: int
    epochs: float
    first_loss: float
    last_loss: float
    trainable_params: int
    total_params: int
    seconds: float
    tokens: int  # tokens through the model (padding excluded), summed over steps
    examples: int
    data_sha256: str
    device: str
    losses: tuple[float, ...] = field(default=(), repr=False)
    eval_losses: tuple[tuple[int, float], ...] = ()
    resumed_from: int = 0
    processes: int = 1
    weight_bytes: int = 0  # the model's weights (base and factors) the first process held while training

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        keys = (
            "steps",
            "epochs",
            "first_loss",
            "last_loss",
            "trainable_params",
            "total_params",
            "trainable_share",
            "seconds",
            "tokens",
            "tokens_per_second",
            "examples",
            "data_sha256",
            "device",
            "resumed_from",
            "processes",
            "weight_bytes",
        )
        return {
            "adapter": self.adapter.to_dict(),
            **{k: getattr(self, k) for k in keys},
            "losses": list(self.losses),
            "eval_losses": [list(e) for e in self.eval_losses],
        }


@dataclass(frozen=True)
class _Options:
    """Everything that defines a run (``--resume`` must match it)."""

    rank: int = 8
    alpha: float = 16.0
    targets: Sequence[str] | str = ("q_proj", "v_proj")
    steps: int | None = None
    epochs: float | None = None
    lr: float = 2e-4
    batch_size: int = 4
    max_length: int = 512
    init: str = "kaiming"
    seed: int = 0
    schedule: str = "linear"
    warmup: int = 0
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    optim: str = "adamw"
    bf16: bool | None = None
    eval_data: str | None = None
    eval_fraction: float | None = None
    eval_every: int | None = None
    save_every: int | None = None
    group_by_length: bool = True
    packing: bool = False
    quantize: str | None = None
    fsdp: bool = False

    def check(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise InvalidOptionError("give --steps or --epochs, not both")
        for what, n in (
            ("batch size", self.batch_size),
            ("max length", self.max_length),
            ("steps", self.steps or 1),
            ("grad accum", self.grad_accum),
            ("eval every", self.eval_every or 1),
            ("save every", self.save_every or 1),
        ):
            if n < 1:
                raise InvalidOptionError(f"{what} must be at least 1, got {n}")
        if self.warmup < 0:
            raise InvalidOptionError(f"warmup must be 0 or more steps, got {self.warmup}")
        if self.epochs is not None and not self.epochs > 0:
            raise InvalidOptionError(f"epochs must be positive, got {self.epochs}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InvalidOptionError(f"learning rate must be a positive number, got {self.lr}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise InvalidOptionError(f"max grad norm must be 0 (off) or positive, got {self.max_grad_norm}")
        choices: tuple[tuple[str, str, Sequence[str]], ...] = (
            ("schedule", self.schedule, SCHEDULES),
            ("optimizer", self.optim, OPTIMS),
            ("quantization", self.quantize or QUANTIZE[0], QUANTIZE),
        )
        for what, v, known in choices:
            if v not in known:
                raise InvalidOptionError(f"unknown {what} {v!r}; choose one of {', '.join(known)}")
        if self.eval_data is not None and self.eval_fraction is not None:
            raise InvalidOptionError("give --eval-data or --eval-fraction, not both")
        if self.fsdp and self.quantize is not None:
            raise InvalidOptionError(
                "--fsdp does not shard a bitsandbytes-quantized base; drop --quantize or --fsdp"
            )

    def check_processes(self, processes: int) -> None:
        if self.fsdp and processes < 2:
            raise InvalidOptionError(
                "--fsdp shards the base over processes; give --nproc 2 or more (or run under torchrun)"
            )

    def record(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["targets"] = d["targets"] if isinstance(d["targets"], str) else list(d["targets"])
        return d


@dataclass
class _Data:
    encoded: list[tuple[list[int], list[int]]]
    eval_encoded: list[tuple[list[int], list[int]]]
    digest: str
    eval_digest: str | None
    tokenizer: Any
    name: str = ""  # the training file's name, without .jsonl/.json


def _read(lib: Library, base: str | os.PathLike[str], data: str | os.PathLike[str], o: _Options) -> _Data:
    from .running import is_causal_lm, load_tokenizer

    path = Path(data)
    rows, kind, digest = read_rows(path, max_length=o.max_length)
    eval_rows: list[tuple[int, dict[str, Any]]] = []
    eval_kind, eval_digest, eval_path = kind, None, path
    if o.eval_data is not None:
        eval_path = Path(o.eval_data)
        eval_rows, eval_kind, eval_digest = read_rows(eval_path, max_length=o.max_length)
    elif o.eval_fraction is not None:
        rows, eval_rows = split_eval(rows, o.eval_fraction, o.seed)
    folder = base_dir(lib, base)
    if not is_causal_lm(folder):
        raise BaseModelError(f"{base} is not a causal LM; adapterhub train fine-tunes causal LMs")
    tokenizer = load_tokenizer(folder, needed_for="training")
    encoded = encode_rows(tokenizer, rows, kind, max_length=o.max_length, path=path)
    ev = (
        encode_rows(tokenizer, eval_rows, eval_kind, max_length=o.max_length, path=eval_path)
        if eval_rows
        else []
    )
    stem = path.name.removesuffix(".jsonl").removesuffix(".json") or path.name
    return _Data(encoded, ev, digest, eval_digest, tokenizer, stem)


def _options(**kw: Any) -> _Options:
    unknown = sorted(set(kw) - set(_Options.__dataclass_fields__))
    if unknown:
        raise InvalidOptionError(f"unknown training option {unknown[0]!r}")
    fixed: dict[str, Any] = {
        k: (tuple(v) if k == "targets" and not isinstance(v, str) else v) for k, v in kw.items()
    }
    if fixed.get("eval_data") is not None:
        fixed["eval_data"] = os.fspath(fixed["eval_data"])
    o = _Options(**fixed)
    o.check()
    return o


def _total_steps(o: _Options, examples: int) -> int:
    per_epoch = math.ceil(examples / o.batch_size)
    return o.steps if o.steps is not None else max(1, round((o.epochs or 1.0) * per_epoch))


def plan(
    lib: Library, base: str | os.PathLike[str], *, nproc: int = 1, device: str | None = None, **options: Any
) -> MemoryPlan:
    """The memory plan of a run with these options (nothing is loaded but the base's config)."""
    from transformers import AutoConfig

    from .running import pick_device

    o = _options(**options)
    o.check_processes(nproc)
    folder = base_dir(lib, base)
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise BaseModelError(
            f"transformers cannot read the config of {folder}: {str(exc).splitlines()[0]}"
        ) from None
    dev = pick_device(device)
    micro = max(1, math.ceil(o.batch_size / max(1, nproc) / o.grad_accum))
    return memory_plan(
        config,
        targets=o.targets,
        rank=o.rank,
        quantize=o.quantize,
        micro_batch=micro,
        max_length=o.max_length,
        gradient_checkpointing=o.gradient_checkpointing,
        optim=o.optim,
        device=dev,
        dtype=None if dev.startswith("cuda") else "float32",
        shards=nproc if o.fsdp else 1,
    )


def train(
    lib: Library,
    base: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    name: str,
    device: str | None = None,
    tags: Sequence[str] = (),
    description: str | None = None,
    resume: bool = False,
    nproc: int = 1,
    log_every: int = 10,
    on_step: StepCallback | None = None,
    on_log: LogCallback | None = None,
    on_plan: PlanCallback | None = None,
    **options: Any,
) -> TrainResult:
    """Train a new adapter ``name`` on ``base`` (a registered base or a checkpoint folder) and catalog it.
    ``options``: the fields of `_Options` (rank, alpha, targets, steps, epochs, lr, batch_size, ...)."""
    from .running import pick_device

    check_name(name)
    tags = check_tags(tags)
    o = _options(**options)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if nproc < 1:
        raise InvalidOptionError(f"nproc must be at least 1, got {nproc}")
    if world > 1 and nproc > 1:
        raise InvalidOptionError("give --nproc or run under torchrun, not both")
    o.check_processes(max(nproc, world))
    if lib.exists(name):
        raise AdapterExistsError(name)
    d = _read(lib, base, data, o)
    pick_device(device)  # a device this torch cannot use fails here, before any process starts
    if o.batch_size < max(nproc, world):
        raise InvalidOptionError(
            f"--batch-size {o.batch_size} is smaller than the {max(nproc, world)} processes"
        )
    if on_plan is not None and int(os.environ.get("RANK", "0")) == 0:
        on_plan(plan(lib, base, nproc=max(nproc, world), device=device, **options))
    if nproc > 1:
        return _spawn(
            lib,
            base,
            data,
            name=name,
            nproc=nproc,
            device=device,
            tags=tags,
            description=description,
            resume=resume,
            options=options,
        )
    return _train(
        lib,
        base,
        d,
        o,
        name=name,
        device=device,
        tags=tags,
        description=description,
        resume=resume,
        log_every=log_every,
        on_step=on_step,
        on_log=on_log,
    )


def _train(
    lib: Library,
    base: str | os.PathLike[str],
    d: _Data,
    o: _Options,
    *,
    name: str,
    device: str | None,
    tags: Sequence[str],
    description: str | None,
    resume: bool,
    log_every: int = 10,
    on_step: StepCallback | None = None,
    on_log: LogCallback | None = None,
) -> TrainResult:
    import torch

    from .running import attach, load_base, pick_device, registered_base

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    dev = join_group(pick_device(device), rank, world)
    torch.set_num_threads(usable_threads(world))
    folder = RunFolder(lib.home, name)
    record = {**o.record(), "data_sha256": d.digest, "eval_sha256": d.eval_digest, "processes": world}
    start = folder.start(record, resume=resume) if rank == 0 else None
    if world > 1:
        torch.distributed.barrier()
        start = folder.latest() if resume else None
    try:
        bf16 = o.bf16 if o.bf16 is not None else (dev.startswith("cuda") and torch.cuda.is_bf16_supported())
        model, _ = load_base(
            lib,
            base,
            device="cpu" if o.fsdp else dev,  # fully_shard moves each layer's shard to the device
            dtype="auto" if dev.startswith("cuda") else "float32",
            quantize=o.quantize,
        )
        if o.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.25
                model.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False}
                )
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if o.quantize is not None and o.quantize.startswith("nf4"):
            from .quantized import for_training

            for_training(model)  # an evaluation must not turn the 4-bit layers' backward off
        rows = pack(d.encoded, o.max_length) if o.packing else d.encoded
        total = _total_steps(o, len(rows))
        info = registered_base(lib, model)
        rt = attach(lib, model, base=info.name if info else None)
        try:
            ad = rt.create(name, rank=o.rank, alpha=o.alpha, targets=o.targets, init=o.init, seed=o.seed)
            total_params = sum(p.numel() for p in model.parameters()) + ad.num_params
            if o.fsdp:
                shard(model, ad, dev, world)
            weight_bytes = held_bytes(model, ad)
            tok = d.tokenizer
            names = [n for n, _ in ad.named_parameters()]
            loop = Loop(
                model=model,
                params=[p for _, p in ad.named_parameters()],
                encoded=rows,
                eval_encoded=d.eval_encoded,
                plan=batches([len(r[0]) for r in rows], o.batch_size, total, o.seed, group=o.group_by_length),
                device=dev,
                pad=tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0),
                lr=o.lr,
                optim=o.optim,
                schedule=o.schedule,
                warmup=o.warmup,
                max_grad_norm=o.max_grad_norm,
                grad_accum=o.grad_accum,
                bf16=bf16,
                eval_every=o.eval_every or (total if d.eval_encoded else None),
                save_every=o.save_every,
                log_every=log_every,
                seed=o.seed,
                rank=rank,
                world=world,
                folder=folder,
                factor_names=names,
                on_step=on_step,
                on_log=on_log,
                fsdp=o.fsdp,
            )
            if start is not None:
                loop.resume(start)
            resumed_from = loop.progress.step
            p = loop.run()
            ad.lineage.update(
                steps=total,
                loss=p.losses[-1],
                first_loss=p.losses[0],
                data_sha256=d.digest,
                lr=o.lr,
                batch_size=o.batch_size,
                examples=len(d.encoded),
                schedule=o.schedule,
                warmup=o.warmup,
                max_grad_norm=o.max_grad_norm,
                grad_accum=o.grad_accum,
                optim=o.optim,
                quantize=o.quantize,
                gradient_checkpointing=o.gradient_checkpointing,
                bf16=bf16,
                processes=world,
                fsdp=o.fsdp,
                max_length=o.max_length,
                packing=o.packing,
                eval_loss=p.eval_losses[-1][1] if p.eval_losses else None,
                eval_sha256=d.eval_digest,
            )
            if o.fsdp:
                ad.gather()  # every rank: the whole factors for rank 0 to write
            if rank == 0:
                adapter = rt.save(name, tags=tags, description=description)
                if p.eval_losses:
                    ev = (o.eval_data, d.eval_digest or d.digest) if o.eval_data else (d.name, d.digest)
                    keep_eval_loss(
                        lib,
                        name,
                        info.name if info else os.fspath(base),
                        *ev,
                        p.eval_losses[-1],
                        rows=len(d.eval_encoded),
                        seed=o.seed,
                        eval_fraction=o.eval_fraction,
                    )
                folder.remove()
            if world > 1:
                torch.distributed.barrier()
            if rank != 0:
                adapter = lib.info(name)
            return TrainResult(
                adapter=adapter,
                steps=total,
                epochs=total * min(o.batch_size, len(rows)) / len(rows),
                first_loss=p.losses[0],
                last_loss=p.losses[-1],
                trainable_params=ad.num_params,
                total_params=total_params,
                seconds=p.seconds,
                tokens=p.tokens,
                examples=len(d.encoded),
                data_sha256=d.digest,
                device=dev,
                losses=tuple(p.losses),
                eval_losses=tuple(p.eval_losses),
                resumed_from=resumed_from,
                processes=world,
                weight_bytes=weight_bytes,
            )
        finally:
            rt.detach()
    finally:
        folder.release()  # a failed run keeps its checkpoints for --resume


# ------------------------------------------------------------------ many processes
def _worker(rank: int, job: dict[str, Any]) -> None:
    from ..catalog.library import Library

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(job["nproc"]),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(job["port"]),
    )
    lib = Library(Path(job["home"]), db=job["db"])
    try:
        o = _options(**job["options"])
        result = _train(
            lib,
            job["base"],
            _read(lib, job["base"], job["data"], o),
            o,
            name=job["name"],
            device=job["device"],
            tags=job["tags"],
            description=job["description"],
            resume=job["resume"],
        )
        if rank == 0:
            Path(job["out"]).write_text(
                json.dumps({k: v for k, v in result.to_dict().items() if k != "adapter"})
            )
    except AdapterHubError as exc:
        Path(f"{job['out']}.error{rank}").write_text(str(exc))
        raise SystemExit(1) from None
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(
    lib: Library,
    base: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    name: str,
    nproc: int,
    device: str | None,
    tags: Sequence[str],
    description: str | None,
    resume: bool,
    options: dict[str, Any],
) -> TrainResult:
    import torch.multiprocessing as mp

    lib.store.tmp.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.store.tmp, prefix=f"train-{os.getpid()}-") as tmp:
        out = Path(tmp) / "result.json"
        job = {
            "home": str(lib.home),
            "db": lib.db_url,
            "base": str(base),
            "data": str(data),
            "name": name,
            "nproc": nproc,
            "port": free_port(),
            "device": device,
            "tags": list(tags),
            "description": description,
            "resume": resume,
            "out": str(out),
            "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()},
        }
        try:
            mp.start_processes(_worker, args=(job,), nprocs=nproc, start_method="spawn")
        except mp.ProcessRaisedException as exc:
            raise InvalidOptionError(
                f"a training process failed: {str(exc).strip().splitlines()[-1]}"
            ) from None
        except mp.ProcessExitedException:
            errors = sorted(Path(tmp).glob("result.json.error*"))
            why = errors[0].read_text() if errors else "a training process died"
            raise InvalidOptionError(why) from None
        doc = json.loads(out.read_text())
    doc["losses"] = tuple(doc["losses"])
    doc["eval_losses"] = tuple(tuple(e) for e in doc["eval_losses"])
    for k in ("trainable_share", "tokens_per_second"):
        doc.pop(k)
    return TrainResult(adapter=lib.info(name), **doc)
