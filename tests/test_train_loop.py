"""The training loop: accumulation equals one big batch, checkpoints are atomic, a run killed with
SIGKILL resumes to the adapter an uninterrupted seeded run makes, schedules and 8-bit optimizers run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.trainkit import jsonl, text_rows, tiny_base

from adapterhub import Hub, InvalidOptionError

TESTS = Path(__file__).parent
OPTS: dict[str, Any] = dict(
    steps=8, batch_size=4, lr=1e-2, seed=3, targets="all-linear", warmup=2, schedule="cosine"
)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    h = Hub(tmp_path / "home")
    h.add_base(tiny_base(tmp_path / "tiny"), name="tiny")
    yield h
    h.close()


def _factors(hub: Hub, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(hub.library.files(name).weights))


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_grad_accum_computes_the_big_batch_step(hub: Hub, tmp_path: Path) -> None:
    data = jsonl(tmp_path / "t.jsonl", text_rows(16))
    hub.train("tiny", data, name="one", **OPTS)
    hub.train("tiny", data, name="acc", grad_accum=4, **OPTS)
    assert _close(_factors(hub, "one"), _factors(hub, "acc"), 1e-5) < 1e-5


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(hub: Hub, tmp_path: Path) -> None:
    data = jsonl(tmp_path / "t.jsonl", text_rows(16))
    hub.train("tiny", data, name="ref", **OPTS)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:0] = [{str(TESTS)!r}]
        from adapterhub import Hub
        def kill(step, total, loss):
            if step == 5:
                os.kill(os.getpid(), signal.SIGKILL)
        Hub({str(hub.home)!r}).train("tiny", {str(data)!r}, name="cut", save_every=2, on_step=kill, **{OPTS!r})
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not hub.library.exists("cut")  # nothing cataloged, half or whole
    run = hub.home / "training" / "cut"
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == [
        "owner.lock",  # the killed run's: its pid is gone, so the next run takes the folder over
        "run.json",
        "step-00000004",
    ]
    with pytest.raises(InvalidOptionError, match="add --resume to continue it"):
        hub.train("tiny", data, name="cut", save_every=2, **OPTS)
    with pytest.raises(InvalidOptionError, match="changed since the checkpoint: lr"):
        hub.train("tiny", data, name="cut", save_every=2, resume=True, **{**OPTS, "lr": 1e-3})
    res = hub.train("tiny", data, name="cut", save_every=2, resume=True, **OPTS)
    assert res.resumed_from == 4 and res.steps == 8 and len(res.losses) == 8
    assert _close(_factors(hub, "ref"), _factors(hub, "cut"), 1e-5) < 1e-5
    assert not run.exists()  # the checkpoints go once the adapter is cataloged


def test_resume_without_a_checkpoint_says_so(hub: Hub, tmp_path: Path) -> None:
    data = jsonl(tmp_path / "t.jsonl", text_rows(4))
    with pytest.raises(InvalidOptionError, match="no checkpoint of this run to resume"):
        hub.train("tiny", data, name="x", steps=2, resume=True)


def test_a_checkpoint_is_written_whole_or_not_at_all(hub: Hub, tmp_path: Path) -> None:
    """A scratch folder of a checkpoint killed mid-write is never taken for a checkpoint."""
    from adapterhub.services.train_state import RunFolder

    folder = RunFolder(hub.home, "x")
    folder.start({"a": 1}, resume=False)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    scratch = folder.path / f".step-00000006.{int(dead.stdout)}"  # what a kill -9 during a write leaves
    scratch.mkdir()
    assert folder.latest() is None
    with pytest.raises(InvalidOptionError, match="no checkpoint"):
        folder.start({"a": 1}, resume=True)
    assert not scratch.exists()  # its writer is dead: cleared
    folder.save(
        2,
        {"w": torch.ones(2)},
        {"state": {0: {"step": torch.tensor(2.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        {"step": 2, "rng": {"cpu": torch.get_rng_state()}},
    )
    folder.save(
        4,
        {"w": torch.full((2,), 2.0)},
        {"state": {}, "param_groups": []},
        {"step": 4, "rng": {"cpu": torch.get_rng_state()}},
    )
    last = folder.latest()
    assert last is not None and last.name == "step-00000004"
    factors, opt, state = RunFolder.load(last)
    assert torch.equal(factors["w"], torch.full((2,), 2.0)) and state["step"] == 4
    assert [p.name for p in folder.path.iterdir() if p.name.startswith("step-")] == ["step-00000004"]


@pytest.mark.parametrize("optim", ["adamw8bit", "paged_adamw8bit"])
def test_8bit_optimizers_train_and_resume(hub: Hub, tmp_path: Path, optim: str) -> None:
    pytest.importorskip("bitsandbytes")
    data = jsonl(tmp_path / "t.jsonl", text_rows(8))
    opts = {**OPTS, "optim": optim, "steps": 4, "targets": ["q_proj", "v_proj"]}
    ref = hub.train("tiny", data, name="ref", **opts)
    assert ref.last_loss < ref.first_loss

    def stop(step: int, total: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hub.train("tiny", data, name="cut", save_every=2, on_step=stop, **opts)
    hub.train("tiny", data, name="cut", save_every=2, resume=True, **opts)
    assert _close(_factors(hub, "ref"), _factors(hub, "cut"), 1e-5) < 1e-5


def test_schedule_warmup_and_clipping_reach_the_optimizer(hub: Hub, tmp_path: Path) -> None:
    data = jsonl(tmp_path / "t.jsonl", text_rows(8))
    logs: list[dict[str, Any]] = []
    hub.train(
        "tiny",
        data,
        name="s",
        steps=6,
        warmup=2,
        lr=1e-2,
        schedule="linear",
        log_every=1,
        on_log=logs.append,
        max_grad_norm=0.5,
        gradient_checkpointing=True,
    )
    lrs = [r["lr"] for r in logs]
    assert lrs[0] == pytest.approx(5e-3) and lrs[1] == pytest.approx(1e-2)  # warm-up, then linear decay
    assert lrs[2:] == pytest.approx([1e-2 * (6 - s) / 4 for s in range(3, 7)])
    params = hub.adapter_info("s").parents[0].params
    assert (
        params["max_grad_norm"] == 0.5 and params["warmup"] == 2 and params["gradient_checkpointing"] is True
    )


@pytest.mark.parametrize(
    ("kind", "hf"), [("linear", "linear"), ("cosine", "cosine"), ("constant", "constant_with_warmup")]
)
def test_schedules_are_transformers_own(kind: str, hf: str) -> None:
    from transformers import get_scheduler

    from adapterhub.services.train_loop import schedule

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    ref = get_scheduler(hf, opt, num_warmup_steps=3, num_training_steps=11)
    factor = schedule(kind, 3, 11)
    for s in range(11):
        assert factor(s) == pytest.approx(ref.get_last_lr()[0], abs=1e-12)
        opt.step()
        ref.step()


def test_eval_data_every_n_steps_reaches_the_lineage(hub: Hub, tmp_path: Path) -> None:
    data = jsonl(tmp_path / "t.jsonl", text_rows(8))
    held = jsonl(tmp_path / "e.jsonl", text_rows(3))
    res = hub.train("tiny", data, name="e", steps=4, lr=1e-2, eval_data=held, eval_every=2)
    assert [s for s, _ in res.eval_losses] == [2, 4] and res.eval_losses[1][1] < res.eval_losses[0][1]
    params = hub.adapter_info("e").parents[0].params
    assert params["eval_loss"] == res.eval_losses[-1][1] and params["eval_sha256"]
    with pytest.raises(InvalidOptionError, match="not both"):
        hub.train("tiny", data, name="f", steps=1, eval_data=held, eval_fraction=0.5)
