"""The torch.distributed side of `training.train`: a rank joins its process group (gloo on CPU, NCCL on
GPUs, one GPU a rank), its share of the CPU's threads, and FSDP2's sharding of the model (``--fsdp``)."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["free_port", "held_bytes", "join_group", "shard", "usable_threads"]


def usable_threads(nproc: int = 1) -> int:
    """Torch threads for one of ``nproc`` training processes: the cores this process may run on
    (``os.sched_getaffinity``) less those other work keeps busy (the 1-minute load average), shared out;
    at least one. ``OMP_NUM_THREADS`` given by the user wins."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:
        busy = 0
    return max(1, (cores - min(busy, cores - 1)) // max(1, nproc))


def join_group(dev: str, rank: int, world: int) -> str:
    """Join the process group of ``world`` ranks (nothing for one); the device this rank computes on."""
    if world <= 1:
        return dev
    import torch
    import torch.distributed as dist

    if dev.startswith("cuda"):
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.cuda.set_device(torch.device(dev))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
    return dev


def shard(model: Any, ad: Any, dev: str, world: int) -> None:
    """FSDP2 over the ``world`` ranks: ``fully_shard`` on each decoder layer (the classes transformers
    names in ``_no_split_modules``), then on the model for what is left (embeddings, norm, output
    layer). The adapter's factors are registered on their modules first, so they shard with their layer.
    Gradients are summed (divide factor 1): the loss is already divided by the global token count."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    ad.register()
    mesh = init_device_mesh(dev.split(":")[0], (world,))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    done: list[str] = []
    for mname, mod in model.named_modules():
        if type(mod).__name__ in blocks and mname and not any(mname.startswith(d + ".") for d in done):
            fully_shard(mod, mesh=mesh)
            done.append(mname)
    fully_shard(model, mesh=mesh)
    for mod in model.modules():
        if isinstance(mod, FSDPModule):
            mod.set_gradient_divide_factor(1.0)
            mod.set_force_sum_reduction_for_comms(True)  # plain sums: gloo has no PREMUL_SUM


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def held_bytes(model: Any, ad: Any) -> int:
    """Bytes of the weights (base and the adapter's factors) this process holds: under FSDP its shards."""
    import torch

    seen = {id(p) for p in model.parameters()}
    tensors = [*model.parameters(), *(p for p in ad.parameters() if id(p) not in seen)]
    total = 0
    for p in tensors:
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size() if isinstance(local, torch.Tensor) else 0
    return total
