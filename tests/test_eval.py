"""Evaluation core (`adapterhub.services.scoring`): every subject's rows in one mixed pass, checked
against PEFT + transformers on a tiny random Llama with a character-level tokenizer (no downloads)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.evalkit import (
    CHOICE_ROWS,
    MESSAGE_ROWS,
    PROMPT_ROWS,
    TEXT_ROWS,
    adapters_for,
    tiny_checkpoint,
    write_jsonl,
)
from helpers.models import peft_model

from adapterhub import InvalidOptionError
from adapterhub.runtime import attach
from adapterhub.services.scoring import encode_choice, parse_combination, parse_metric, read_eval_data, score
from adapterhub.services.training import encode_rows


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("evalkit")
    base = tiny_checkpoint(root / "base")
    ads = adapters_for(base, root, 3, target_modules=["q_proj", "v_proj", "down_proj"])
    return {"root": root, "base": base, "adapters": ads}


def _model(base: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(base).eval(), AutoTokenizer.from_pretrained(base)


def _ours(kit: dict[str, Any], data: Any, metrics: list[str], subjects: list[Any], **kw: Any) -> Any:
    model, tok = _model(kit["base"])
    rt = attach(model, dtype=torch.float32)
    for i, p in enumerate(kit["adapters"]):
        rt.load(p, name=f"a{i}")
    try:
        return score(model, tok, rt, subjects, data, metrics, **kw)
    finally:
        rt.detach()


def _reference_loss(base: Path, adapters: list[tuple[Path, float]], data: Any) -> float:
    """transformers' own loss (labels=) per row with PEFT applying the adapters, token-weighted."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = peft_model(base, adapters) if adapters else AutoModelForCausalLM.from_pretrained(base).eval()
    enc = encode_rows(tok, list(data.rows), data.kind, max_length=512, path=data.path)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in enc:
            n = sum(1 for x in labels[1:] if x != -100)
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            total += float(out.loss) * n
            count += n
    return total / count


@pytest.mark.parametrize("rows", [PROMPT_ROWS, MESSAGE_ROWS, TEXT_ROWS], ids=["prompt", "messages", "text"])
def test_loss_equals_peft(kit: dict[str, Any], tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    data = read_eval_data(write_jsonl(tmp_path / "d.jsonl", rows))
    combo = {"a0": 0.7, "a1": 0.3}
    subjects: list[Any] = [None, "a0", "a1", "a2", combo]
    results, _ = _ours(kit, data, ["loss", "perplexity"], subjects, batch_tokens=64)
    a = kit["adapters"]
    refs = [[], [(a[0], 1.0)], [(a[1], 1.0)], [(a[2], 1.0)], [(a[0], 0.7), (a[1], 0.3)]]
    for got, ref in zip(results, refs, strict=True):
        want = _reference_loss(kit["base"], ref, data)
        assert got["loss"] == pytest.approx(want, abs=1e-4)
        assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-12)
    assert len({round(r["loss"], 6) for r in results}) == len(results)  # the adapters change something


def test_greedy_generations_equal_peft(kit: dict[str, Any], tmp_path: Path) -> None:
    data = read_eval_data(write_jsonl(tmp_path / "d.jsonl", PROMPT_ROWS))
    subjects: list[Any] = [None, "a0", {"a1": 0.5, "a2": -0.5}]
    results, details = _ours(kit, data, ["exact", "contains", "regex:[aeiou]"], subjects, max_tokens=6)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(kit["base"])
    a = kit["adapters"]
    for s, ref in enumerate([[], [(a[0], 1.0)], [(a[1], 0.5), (a[2], -0.5)]]):
        from transformers import AutoModelForCausalLM

        model = (
            peft_model(kit["base"], ref) if ref else AutoModelForCausalLM.from_pretrained(kit["base"]).eval()
        )
        for q, row in enumerate(PROMPT_ROWS):
            ids = tok(row["prompt"], return_tensors="pt")["input_ids"]
            out = model.generate(
                input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=2, pad_token_id=3
            )
            new = out[0, ids.shape[1] :].tolist()
            new = new[: new.index(2)] if 2 in new else new
            assert details["generations"][s][q] == tok.decode(new, skip_special_tokens=True)
        gens = details["generations"][s]
        assert results[s]["regex:[aeiou]"] == sum(any(c in g for c in "aeiou") for g in gens) / len(gens)
    assert len({tuple(g) for g in details["generations"]}) > 1


def test_exact_and_contains_normalize(kit: dict[str, Any], tmp_path: Path) -> None:
    from adapterhub.services.scoring import normalize

    assert normalize("  Two\n words ") == "two words"
    data = read_eval_data(write_jsonl(tmp_path / "d.jsonl", TEXT_ROWS))
    with pytest.raises(InvalidOptionError, match="no reference answer"):
        _ours(kit, data, ["exact"], [None])


def test_choice_rows_and_errors(kit: dict[str, Any], tmp_path: Path) -> None:
    data = read_eval_data(write_jsonl(tmp_path / "mc.jsonl", CHOICE_ROWS))
    assert data.kind == "choice" and data.rows[1][1]["answer"] == 0
    results, details = _ours(kit, data, ["choice", "loss"], [None, "a0"])
    assert 0 <= results[0]["choice"] <= 1 and len(details["picks"][0]) == len(CHOICE_ROWS)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(kit["base"])
    ctx, cont = encode_choice(tok, "q: 2+2= ", "4")
    assert cont == tok(" 4", add_special_tokens=False)["input_ids"] and ctx[0] == tok.bos_token_id
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "choices": ["a", "b"], "answer": 2}])
    with pytest.raises(InvalidOptionError, match="line 1: answer must be"):
        read_eval_data(bad)
    prompt = read_eval_data(write_jsonl(tmp_path / "p.jsonl", PROMPT_ROWS))
    with pytest.raises(InvalidOptionError, match="multiple-choice rows"):
        _ours(kit, prompt, ["choice"], [None])
    with pytest.raises(InvalidOptionError, match="unknown metric"):
        parse_metric("bleu")
    with pytest.raises(InvalidOptionError, match="regular expression"):
        parse_metric("regex:(")
    assert parse_combination("a:0.7+b:-0.3") == {"a": 0.7, "b": -0.3}
    with pytest.raises(InvalidOptionError, match="NAME:WEIGHT"):
        parse_combination("a+b")
