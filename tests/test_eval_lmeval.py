"""`choice` agrees with lm-evaluation-harness 0.4.13: its ``hf`` model (HFLM) scores a multiple-choice
task defined here (a YAML over a local JSONL file: no download), in-process, on the base and on PEFT's
merge of each adapter; our one mixed pass must give the same log-likelihoods and accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.evalkit import CHOICE_ROWS, adapters_for, tiny_checkpoint, write_jsonl
from helpers.models import peft_model

from adapterhub.runtime import attach
from adapterhub.services.scoring import read_eval_data, score

lm_eval = pytest.importorskip("lm_eval")


def _lm_eval(model: Any, tok: Any, tasks: Any) -> tuple[float, dict[int, list[float]]]:
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu")
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["adapterhub_mc"],
        task_manager=tasks,
        log_samples=True,
        num_fewshot=0,
    )
    lls = {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in out["samples"]["adapterhub_mc"]}
    return float(out["results"]["adapterhub_mc"]["acc,none"]), lls


def test_choice_agrees_with_lm_eval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_checkpoint(tmp_path / "base")
    ads = adapters_for(base, tmp_path, 2, target_modules=["q_proj", "v_proj", "up_proj"])
    rows = [
        dict(r, answer=r["choices"].index(r["answer"]) if isinstance(r["answer"], str) else r["answer"])
        for r in CHOICE_ROWS
    ]
    data_file = write_jsonl(tmp_path / "mc.jsonl", rows)
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "mc.yaml").write_text(
        "task: adapterhub_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data_file}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{prompt}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n"
    )
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    rt = attach(model, dtype=torch.float32)
    rt.load(ads[0], name="a0")
    rt.load(ads[1], name="a1")
    subjects: list[Any] = [None, "a0", {"a0": 0.6, "a1": 0.4}]
    results, details = score(model, tok, rt, subjects, read_eval_data(data_file), ["choice"])
    rt.detach()
    refs = [[], [(ads[0], 1.0)], [(ads[0], 0.6), (ads[1], 0.4)]]
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(tmp_path / "task"), include_defaults=False)  # our task alone
    accs = []
    for s, ref in enumerate(refs):
        m = (
            peft_model(base, ref).merge_and_unload()
            if ref
            else AutoModelForCausalLM.from_pretrained(base).eval()
        )
        acc, lls = _lm_eval(m, tok, tasks)
        flat = [x for d in sorted(lls) for x in lls[d]]
        assert details["choice_logprobs"][s] == pytest.approx(flat, abs=1e-4)
        assert results[s]["choice"] == pytest.approx(acc)
        accs.append(acc)
    assert len({tuple(p) for p in details["picks"]}) > 1 or len(set(accs)) > 1  # the adapters matter
