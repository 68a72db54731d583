"""FSDP (``--fsdp``): 2 processes over gloo on this CPU, each holding half the base, make the adapter a
single process makes with the same global batch (within 1e-4), and a run killed with SIGKILL resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.cli import Cli
from helpers.trainkit import jsonl, text_rows, tiny_base

from adapterhub import Hub, InvalidOptionError

TESTS = Path(__file__).parent


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    h = Hub(tmp_path / "home")
    h.add_base(tiny_base(tmp_path / "tiny"), name="tiny")
    yield h
    h.close()


def _gap(hub: Hub, a: str, b: str) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(hub.library.files(a).weights)), load_file(str(hub.library.files(b).weights))
    assert sorted(x) == sorted(y)
    return max(float((x[k] - y[k]).abs().max()) for k in x)


@pytest.mark.slow
def test_fsdp_on_two_processes_equals_one_with_the_same_global_batch(hub: Hub, tmp_path: Path) -> None:
    data = jsonl(tmp_path / "t.jsonl", text_rows(13))
    opts: dict[str, Any] = dict(
        steps=4,
        batch_size=5,  # 3 rows on one rank, 2 on the other: FSDP's ranks still run as many forwards
        grad_accum=2,
        lr=1e-2,
        max_grad_norm=0.05,  # clipping acts: the norm of sharded gradients is the whole one
        seed=1,
        targets=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        eval_fraction=0.25,
    )
    one = hub.train("tiny", data, name="one", **opts)
    two = hub.train("tiny", data, name="two", nproc=2, fsdp=True, **opts)
    assert two.processes == 2 and two.adapter.name == "two"
    assert one.weight_bytes / 2 <= two.weight_bytes < one.weight_bytes / 2 * 1.05  # half the weights each
    assert _gap(hub, "one", "two") < 1e-4
    assert two.losses == pytest.approx(one.losses, abs=1e-5)
    assert two.eval_losses[-1][1] == pytest.approx(one.eval_losses[-1][1], abs=1e-5)
    params = hub.adapter_info("two").parents[0].params
    assert params["processes"] == 2 and params["fsdp"] is True
    assert not (hub.home / "training").exists() or not any((hub.home / "training").iterdir())


@pytest.mark.slow
def test_fsdp_run_killed_mid_run_resumes_to_the_single_process_adapter(hub: Hub, tmp_path: Path) -> None:
    data = jsonl(tmp_path / "t.jsonl", text_rows(16))
    opts: dict[str, Any] = dict(
        steps=10, batch_size=4, lr=1e-2, seed=3, targets="all-linear", warmup=2, gradient_checkpointing=True
    )
    hub.train("tiny", data, name="ref", **opts)
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(TESTS)!r}]
        from adapterhub import Hub
        Hub({str(hub.home)!r}).train(
            "tiny", {str(data)!r}, name="cut", nproc=2, fsdp=True, save_every=2, **{opts!r}
        )
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True)
    run = hub.home / "training" / "cut"
    deadline = time.monotonic() + 300
    try:
        while not (run.exists() and any(p.name.startswith("step-") for p in run.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        proc.wait()
    assert not hub.library.exists("cut")
    res = hub.train("tiny", data, name="cut", nproc=2, fsdp=True, save_every=2, resume=True, **opts)
    assert res.resumed_from >= 2 and res.steps == 10
    assert _gap(hub, "ref", "cut") < 1e-4
    assert not run.exists()


def test_fsdp_refusals_are_one_line(hub: Hub, tmp_path: Path) -> None:
    data = jsonl(tmp_path / "t.jsonl", text_rows(4))
    with pytest.raises(InvalidOptionError, match="--fsdp shards the base over processes; give --nproc 2"):
        hub.train("tiny", data, name="x", steps=1, fsdp=True)
    with pytest.raises(InvalidOptionError, match="--fsdp does not shard a bitsandbytes-quantized base"):
        hub.train("tiny", data, name="x", steps=1, nproc=2, fsdp=True, quantize="nf4")
    with pytest.raises(InvalidOptionError, match="give --nproc 2"):
        hub.plan_training("tiny", fsdp=True)
    assert not hub.library.exists("x")


def test_fsdp_dry_run_plan_shows_each_process_share(hub: Hub) -> None:
    whole = hub.plan_training("tiny", nproc=2, targets=["q_proj", "v_proj"])
    half = hub.plan_training("tiny", nproc=2, fsdp=True, targets=["q_proj", "v_proj"])
    assert half.shards == 2 and whole.shards == 1
    assert abs(half.base - whole.base / 2) <= 1
    assert half.gathered > 0 and half.optimizer <= whole.optimizer // 2 + 1
    text = "\n".join(half.lines())
    assert "each process 1/2 (FSDP)" in text and "per process" in text


def test_fsdp_from_the_cli(hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = jsonl(tmp_path / "t.jsonl", text_rows(4))
    cli = Cli(hub.home, capsys)
    args = ["train", "tiny", "--data", str(data), "--name", "x", "--fsdp"]
    out = cli(*args, "--nproc", "2", "--dry-run")
    assert "each process 1/2 (FSDP)" in out and "gathered" in out and "per process" in out
    cli(*args, code=1)
    assert "give --nproc 2 or more" in cli.err and len(cli.err.strip().splitlines()) == 1
    assert not hub.library.exists("x")
