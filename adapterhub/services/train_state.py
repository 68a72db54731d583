"""Checkpoints of a training run under ``HOME/training/<quoted name>/``, written atomically.

``run.json`` holds the options that define the run (a ``--resume`` must give the same ones); each
checkpoint is a folder ``step-00000040/`` written under a scratch name and renamed into place, so a
folder with a step name is always whole: the factors and the optimizer's tensors as safetensors, the
rest (optimizer scalars, the schedule, the random state, the losses so far) as JSON. Nothing is ever
unpickled. After a new checkpoint lands the older ones are removed; a kill -9 in between leaves two, and
resuming takes the newest.

The folder is named ``urllib.parse.quote(name, safe="")`` (reversible, so two adapter names never share
a folder). The live run owns it through ``owner.lock`` (pid, host and the pid's start time), created
with O_EXCL: a second run of the same adapter while the owner lives is refused, and only a folder this
run created, or whose owner is provably dead (same host, pid gone or reused), is ever cleared.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ..errors import InvalidOptionError
from ..store import pid_alive

if TYPE_CHECKING:
    from ..catalog.library import Library

__all__ = ["RunFolder", "keep_eval_loss"]

_TENSOR = "__tensor__"
_LOCK = "owner.lock"


def _pack(obj: Any, tensors: dict[str, Any], at: str) -> Any:
    """``obj`` as JSON, its tensors moved into ``tensors`` (named by their path)."""
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[at] = obj.detach().cpu().contiguous()
        return {_TENSOR: at}
    if isinstance(obj, dict):
        return {"__items__": [[k, _pack(v, tensors, f"{at}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_pack(v, tensors, f"{at}/{i}") for i, v in enumerate(obj)]
    return obj


def _unpack(obj: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        return {k: _unpack(v, tensors) for k, v in obj["__items__"]}
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    return obj


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _owner_alive(owner: dict[str, Any]) -> bool:
    """Whether the run that wrote lock ``owner`` may still live (True unless provably dead)."""
    pid, host = owner.get("pid"), owner.get("host")
    if not isinstance(pid, int) or host != socket.gethostname():
        return True  # another host (or an unreadable lock): its owner cannot be proved dead
    if not pid_alive(pid):
        return False
    started = owner.get("started")
    return started is None or _started(pid) in (None, started)


class RunFolder:
    """The checkpoint folder of the run that trains adapter ``name``."""

    def __init__(self, home: Path, name: str) -> None:
        self.name = name
        self.path = home / "training" / quote(name, safe="")
        self._owned = False

    def _lock(self) -> None:
        """Take ``owner.lock``, or refuse while another live run holds it."""
        lock = self.path / _LOCK
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _started(os.getpid())}
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = json.loads(lock.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    owner = {}
                if not isinstance(owner, dict) or _owner_alive(owner):
                    who = (
                        f"process {owner.get('pid')} on {owner.get('host')}"
                        if isinstance(owner, dict) and owner
                        else f"the run holding {lock}"
                    )
                    raise InvalidOptionError(
                        f"adapter {self.name!r} is being trained by {who}; wait for it or stop it"
                    ) from None
                lock.unlink(missing_ok=True)  # its owner is provably dead
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self._owned = True
            return
        raise InvalidOptionError(f"adapter {self.name!r} is being trained by another process")

    def release(self) -> None:
        """Give up ownership (the folder and its checkpoints stay, for a ``--resume``)."""
        if self._owned:
            (self.path / _LOCK).unlink(missing_ok=True)
            self._owned = False

    def options(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads((self.path / "run.json").read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return None

    def latest(self) -> Path | None:
        if not self.path.is_dir():
            return None
        steps = sorted(p for p in self.path.iterdir() if p.name.startswith("step-") and p.is_dir())
        return steps[-1] if steps else None

    def start(self, options: dict[str, Any], *, resume: bool) -> Path | None:
        """Check ``options`` against a run left here; the checkpoint to resume from (``resume``), or None
        for a fresh run (which clears what a dead run without a checkpoint left). Takes ownership of the
        folder first: refused while another live run owns it."""
        self.path.mkdir(parents=True, exist_ok=True)
        took = not self._owned
        if took:
            self._lock()
        try:
            return self._start(options, resume=resume)
        except BaseException:
            if took:
                self.release()
            raise

    def _start(self, options: dict[str, Any], *, resume: bool) -> Path | None:
        self._clear_dead_scratch()
        old, last = self.options(), self.latest()
        if resume:
            if last is None or old is None:
                raise InvalidOptionError(
                    f"no checkpoint of this run to resume under {self.path}; run without --resume"
                )
            changed = sorted(k for k in set(old) | set(options) if old.get(k) != options.get(k))
            if changed:
                raise InvalidOptionError(
                    f"--resume needs the same command line; changed since the checkpoint: {', '.join(changed)}"
                )
            return last
        if last is not None:
            raise InvalidOptionError(
                f"a stopped run of this adapter left a checkpoint ({last.name}) under {self.path}; "
                "add --resume to continue it, or remove that folder to start over"
            )
        # we own the folder, so a run.json here is a dead run's, killed before its first checkpoint
        (self.path / "run.json").unlink(missing_ok=True)
        tmp = self.path / f".run.json.{os.getpid()}"
        _fsync_write(tmp, json.dumps(options, indent=1, sort_keys=True).encode())
        os.replace(tmp, self.path / "run.json")
        return None

    def _clear_dead_scratch(self) -> None:
        """Remove the scratch of checkpoints whose writer died mid-write (``.step-N.PID``, ``.run.json.PID``)."""
        if not self.path.is_dir():
            return
        for p in self.path.iterdir():
            pid = p.name.rsplit(".", 1)[-1]
            if p.name.startswith(".") and pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def save(
        self, step: int, factors: dict[str, Any], optimizer: dict[str, Any], state: dict[str, Any]
    ) -> Path:
        from safetensors.torch import save_file

        tensors: dict[str, Any] = {}
        packed = _pack(optimizer, tensors, "opt")
        rng = _pack(state.pop("rng"), tensors, "rng")
        tmp = self.path / f".step-{step:08d}.{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in factors.items()}, str(tmp / "adapter.safetensors")
        )
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        _fsync_write(tmp / "state.json", json.dumps({**state, "optimizer": packed, "rng": rng}).encode())
        dest = self.path / f"step-{step:08d}"
        os.replace(tmp, dest)
        for old in self.path.iterdir():
            if old.name.startswith("step-") and old != dest:
                shutil.rmtree(old, ignore_errors=True)
        return dest

    @staticmethod
    def load(where: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(factors, optimizer state dict, state) of a checkpoint folder."""
        from safetensors.torch import load_file

        try:
            factors = load_file(str(where / "adapter.safetensors"))
            tensors = load_file(str(where / "optimizer.safetensors"))
            state = json.loads((where / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidOptionError(
                f"the checkpoint {where} cannot be read ({exc}); remove it to start over"
            ) from None
        state["rng"] = _unpack(state["rng"], tensors)
        return factors, _unpack(state.pop("optimizer"), tensors), state

    def remove(self) -> None:
        """Delete the folder after a successful run; only the owner does (its lock proves the folder is
        this run's)."""
        if self._owned:
            shutil.rmtree(self.path, ignore_errors=True)
            self._owned = False


def keep_eval_loss(
    lib: Library,
    name: str,
    base: str,
    data: str,
    sha256: str,
    last: tuple[int, float],
    *,
    rows: int,
    seed: int,
    eval_fraction: float | None,
) -> None:
    """Keep the final eval loss of ``train --eval-data`` (``data``: that file) or ``--eval-fraction``
    (``data``: the training file's name) as an evaluation record of the cataloged adapter ``name``
    (source "train"), beside those ``adapterhub eval`` writes."""
    from .evaluation import record_evaluation

    stem = Path(data).name
    stem = stem.removesuffix(".jsonl").removesuffix(".json") or stem
    step, loss = last
    record_evaluation(
        lib,
        name,
        base=base,
        dataset=stem if eval_fraction is None else f"{stem}:eval-{eval_fraction}",
        dataset_sha256=sha256,
        values={"loss": loss},
        rows=rows,
        seed=seed,
        source="train",
        params={"step": step, "eval_fraction": eval_fraction},
    )
