"""Hostile training data (issue 23) and the rough edges of issue 28 around `train` and `load_base`.

Every hostile file is one line naming the file (and the line), bounded in memory and time, with nothing
cataloged; the cases run against a tiny random Llama with a real tiny tokenizer (tests/helpers/trainkit.py).
"""

from __future__ import annotations

import os
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers.cli import Cli
from helpers.trainkit import jsonl, text_rows, tiny_base

from adapterhub import BaseModelError, Hub, InvalidOptionError
from adapterhub.services.train_data import batches, read_rows


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    root = tmp_path_factory.mktemp("traindata")
    h = Hub(root / "home")
    h.add_base(tiny_base(root / "tiny"), name="tiny")
    h.add_base(tiny_base(root / "notok", tokenizer=False), name="notok")
    yield h
    h.close()


def _refused(hub: Hub, capsys: pytest.CaptureFixture[str], data: Path | str, message: str) -> None:
    with pytest.raises(InvalidOptionError, match=message):
        hub.train("tiny", data, name="x", steps=1)
    cli = Cli(hub.home, capsys)
    cli("train", "tiny", "--data", str(data), "--name", "x", code=1)
    assert cli.err.startswith("error: ") and cli.err.count("\n") == 1, cli.err
    assert str(data) in cli.err
    assert not hub.library.exists("x") and not (hub.home / "training" / "x").exists()


def test_a_200_mb_line_is_refused_before_tokenizing_in_bounded_memory(
    hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "huge.jsonl"
    with open(data, "wb") as f:
        f.write(b'{"text": "ok"}\n{"text": "')
        f.truncate(200 << 20)  # a 200 MB second line (sparse: no 200 MB written to disk)
    tracemalloc.start()
    with pytest.raises(InvalidOptionError, match=r"huge.jsonl, line 2: longer than 1024 KiB"):
        read_rows(data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20, peak
    _refused(hub, capsys, data, "line 2: longer than")


def test_dev_zero_is_refused_by_name(hub: Hub, capsys: pytest.CaptureFixture[str]) -> None:
    _refused(hub, capsys, "/dev/zero", r"/dev/zero is a character device, not a file")


def test_a_fifo_is_refused_without_blocking(
    hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)

    def unblock() -> None:  # the old code blocked in open(): a writer lets it go on (and fail the match)
        threading.Event().wait(10)
        try:
            with open(fifo, "wb"):
                pass
        except OSError:
            pass

    threading.Thread(target=unblock, daemon=True).start()
    _refused(hub, capsys, fifo, r"pipe.jsonl is a FIFO, not a file")


def test_deep_json_names_its_line(hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = jsonl(
        tmp_path / "deep.jsonl", [{"text": "fine"}, '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"]
    )
    _refused(hub, capsys, data, r"deep.jsonl, line 2: JSON nested too deeply")


_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
_ASK = {"role": "user", "content": "hi"}


def _call(function: object) -> dict[str, object]:
    return {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": function}]}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"tools": [_TOOL], "messages": [_ASK, {"role": "assistant", "tool_calls": {"function": {}}}]},
         "message 1: tool_calls must be a non-empty list"),
        ({"tools": [_TOOL], "messages": [_ASK, _call({"arguments": "{}"})]}, "message 1, call 0: no function name"),
        ({"tools": [_TOOL], "messages": [_ASK, _call({"name": "f", "arguments": "{nope"})]},
         "message 1, call 0: arguments are not valid JSON"),
        ({"tools": [_TOOL], "messages": [_ASK, _call({"name": "f", "arguments": "[1]"})]},
         "message 1, call 0: arguments must be a JSON object"),
        ({"tools": {"f": _TOOL}, "messages": [_ASK, {"role": "assistant", "content": "x"}]},
         "tools must be a non-empty list"),
        ({"tools": [{"name": "f"}], "messages": [_ASK, {"role": "assistant", "content": "x"}]},
         "tool 0 must be"),
        ({"tools": [_TOOL], "messages": [_ASK, {"role": "tool", "content": "1"}, {"role": "assistant", "content": "x"}]},
         "message 1: a tool result with no tool call before it"),
        ({"messages": [_ASK, _call({"name": "f", "arguments": "{}"})]}, 'message 1 has tool_calls but the row has no "tools"'),
        ({"tools": [_TOOL], "messages": [_ASK, {**_call({"name": "f", "arguments": {}}), "tool_call_id": "a"}]},
         "message 1: a message of role assistant has no tool_call_id"),
        ({"tools": [_TOOL], "messages": [_ASK, _call({"name": "f", "arguments": {}}),
                                         {"role": "tool", "tool_call_id": "zz", "content": "1"}]},
         "message 2: tool_call_id 'zz' names no call"),
    ],
)  # fmt: skip
def test_malformed_tool_rows_name_their_line(
    hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str], row: dict[str, object], message: str
) -> None:
    good = {"tools": [_TOOL], "messages": [_ASK, _call({"name": "f", "arguments": '{"a": 1}'}),
                                           {"role": "tool", "content": "2"}, {"role": "assistant", "content": "ok"}]}  # fmt: skip
    read_rows(jsonl(tmp_path / "good.jsonl", [good]))
    data = jsonl(tmp_path / "tools.jsonl", [good, row])
    _refused(hub, capsys, data, "tools.jsonl, line 2: " + message)


def test_a_folder_is_refused(hub: Hub, tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="is a folder, not a file"):
        hub.train("tiny", tmp_path, name="x", steps=1)


def test_length_grouped_batches_pad_less_and_are_deterministic() -> None:
    lengths = [(i * 37) % 100 + 1 for i in range(64)]
    grouped = batches(lengths, 4, 16, seed=3)
    plain = batches(lengths, 4, 16, seed=3, group=False)
    assert grouped == batches(lengths, 4, 16, seed=3)
    assert sorted(i for b in grouped for i in b) == list(range(64))  # one epoch: every row once

    def padding(bs: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    assert padding(grouped) < padding(plain) / 3


# ------------------------------------------------------------------ issue 28, items 2 and 8
def test_load_base_without_tokenizer_files_gives_none_and_train_and_run_say_so(
    hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, tok = hub.load_base("notok", device="cpu")
    assert tok is None and model.config.vocab_size > 0
    data = jsonl(tmp_path / "t.jsonl", text_rows(2))
    with pytest.raises(BaseModelError, match="has no tokenizer files .*training needs one"):
        hub.train("notok", data, name="x", steps=1)
    cli = Cli(hub.home, capsys)
    cli("run", "notok", "hi", "--device", "cpu", code=1)
    assert "has no tokenizer files" in cli.err and "generating text needs one" in cli.err
    assert cli.err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_device_cuda_on_cpu_torch_is_one_line(
    hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = jsonl(tmp_path / "t.jsonl", text_rows(2))
    cli = Cli(hub.home, capsys)
    cli("train", "tiny", "--data", str(data), "--name", "x", "--device", "cuda", code=1)
    assert cli.err.startswith("error: --device cuda: this torch") and "use --device cpu" in cli.err
    assert cli.err.count("\n") == 1 and "AssertionError" not in cli.err


def test_unknown_targets_list_the_module_names(hub: Hub, tmp_path: Path) -> None:
    data = jsonl(tmp_path / "t.jsonl", text_rows(2))
    with pytest.raises(
        InvalidOptionError,
        match=r"nosuch_proj match no module.*are down_proj, embed_tokens, "
        r"gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj",
    ):
        hub.train("tiny", data, name="x", steps=1, targets=["nosuch_proj"])


def test_progress_lines_label_their_losses(
    hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = jsonl(tmp_path / "t.jsonl", text_rows(8))
    cli = Cli(hub.home, capsys)
    out = cli("train", "tiny", "--data", str(data), "--name", "labels", "--steps", "4", "--log-every", "2")
    lines = [x for x in cli.err.splitlines() if x.startswith("step ")]
    assert [x.split()[1] for x in lines] == ["2/4", "4/4"]  # one line per 2 steps when stderr is no terminal
    assert all("loss (mean of last 10)" in x for x in lines)
    assert "loss (first step -> last step)" in out
    import json

    cli(
        "train",
        "tiny",
        "--data",
        str(data),
        "--name",
        "labels2",
        "--steps",
        "4",
        "--log-every",
        "2",
        "--json",
    )
    records = [json.loads(x) for x in cli.err.splitlines() if x.startswith("{")]
    assert [r["step"] for r in records if "step" in r] == [2, 4] and "plan" in records[0]


def test_threads_follow_the_usable_cores_and_the_load(monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterhub.services.training import usable_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert usable_threads() == 4 and usable_threads(2) == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 0.0, 0.0))  # three cores busy with other work
    assert usable_threads() == 1 and usable_threads(2) == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (40.0, 0.0, 0.0))
    assert usable_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's word wins
    assert usable_threads() == 3
