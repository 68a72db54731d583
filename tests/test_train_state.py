"""Who owns a training run's checkpoint folder: names that never share one, a live run's folder never
cleared by another run, and the eval loss of ``train --eval-data`` kept as an evaluation record."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers.trainkit import jsonl, text_rows, tiny_base

from adapterhub import Hub, InvalidOptionError
from adapterhub.services.train_state import RunFolder


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    h = Hub(tmp_path / "home")
    h.add_base(tiny_base(tmp_path / "tiny"), name="tiny")
    yield h
    h.close()


def _checkpoint(folder: RunFolder, step: int = 2) -> Path:
    return folder.save(
        step,
        {"w": torch.ones(2)},
        {"state": {}, "param_groups": []},
        {"step": step, "rng": {"cpu": torch.get_rng_state()}},
    )


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def test_names_that_differ_never_share_a_folder(hub: Hub, tmp_path: Path) -> None:
    names = ["team/sql", "team--sql", "team%2Fsql", "team_sql"]
    assert len({RunFolder(hub.home, n).path for n in names}) == len(names)
    a = RunFolder(hub.home, "team/sql")  # run A, stopped with a checkpoint
    a.start({"a": 1}, resume=False)
    ckpt = _checkpoint(a)
    a.release()
    data = jsonl(tmp_path / "t.jsonl", text_rows(4))
    hub.train("tiny", data, name="team--sql", steps=1, batch_size=2)  # run B ends well
    assert ckpt.is_dir() and a.latest() == ckpt  # B's cleanup left A's checkpoint alone


def test_a_second_run_while_the_owner_lives_is_refused(hub: Hub, tmp_path: Path) -> None:
    data = jsonl(tmp_path / "t.jsonl", text_rows(4))
    live = RunFolder(hub.home, "x")  # a live run that has not reached its first checkpoint
    live.start({"a": 1}, resume=False)
    with pytest.raises(InvalidOptionError, match=r"'x' is being trained by process \d+ on "):
        hub.train("tiny", data, name="x", steps=1, batch_size=2)
    assert (live.path / "run.json").is_file()  # its folder kept
    other = RunFolder(hub.home, "x")
    other.remove()  # not the owner: deletes nothing
    assert live.path.is_dir()
    live.release()
    hub.train("tiny", data, name="x", steps=1, batch_size=2)
    assert not live.path.exists()  # the run that owned it removed it when done


def test_a_live_owner_in_another_process_keeps_its_folder(hub: Hub, tmp_path: Path) -> None:
    data = jsonl(tmp_path / "t.jsonl", text_rows(4))
    script = (
        "import sys; from pathlib import Path; from adapterhub.services.train_state import RunFolder\n"
        f"RunFolder(Path({str(hub.home)!r}), 'y').start({{'a': 1}}, resume=False)\n"
        "print('ready', flush=True); sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with pytest.raises(InvalidOptionError, match=f"being trained by process {proc.pid} "):
            hub.train("tiny", data, name="y", steps=1, batch_size=2)
        assert (RunFolder(hub.home, "y").path / "run.json").is_file()
    finally:
        proc.kill()
        proc.wait()
    hub.train("tiny", data, name="y", steps=1, batch_size=2)  # its owner is provably dead now


def test_only_a_provably_dead_owner_loses_its_folder(hub: Hub) -> None:
    folder = RunFolder(hub.home, "z")
    folder.path.mkdir(parents=True)
    (folder.path / "run.json").write_text("{}")
    lock = folder.path / "owner.lock"
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": None}))
    assert folder.start({"a": 1}, resume=False) is None  # dead owner: taken over
    assert json.loads((folder.path / "run.json").read_text()) == {"a": 1}
    folder.release()
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": None}))
    with pytest.raises(InvalidOptionError, match="being trained by process 1 on elsewhere.example"):
        RunFolder(hub.home, "z").start({"a": 2}, resume=False)  # another host: cannot prove it dead
    assert json.loads((folder.path / "run.json").read_text()) == {"a": 1}


def test_eval_data_loss_becomes_an_evaluation_record(hub: Hub, tmp_path: Path) -> None:
    data = jsonl(tmp_path / "t.jsonl", text_rows(8))
    held = jsonl(tmp_path / "held.jsonl", text_rows(3))
    res = hub.train("tiny", data, name="e", steps=2, batch_size=2, seed=5, eval_data=held)
    [rec] = hub.evaluations("e")
    assert (rec.dataset, rec.metric, rec.source, rec.rows, rec.seed) == ("held", "loss", "train", 3, 5)
    assert rec.value == pytest.approx(res.eval_losses[-1][1])
    assert rec.dataset_sha256 == hashlib.sha256(held.read_bytes()).hexdigest()
    assert rec.base == "tiny" and rec.adapter_sha256 == hub.adapter_info("e").sha256
    res = hub.train("tiny", data, name="f", steps=2, batch_size=2, eval_fraction=0.25)
    [rec] = hub.evaluations("f")
    assert rec.metric == "loss" and rec.rows == 2 and rec.value == pytest.approx(res.eval_losses[-1][1])
    assert rec.dataset_sha256 == hashlib.sha256(data.read_bytes()).hexdigest()
