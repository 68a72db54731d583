"""`AdapterHubCallback` with a real TRL `SFTTrainer` + PEFT run on a tiny model: the adapter is cataloged
(at each checkpoint and at the end) with its lineage, and computes what the trained PeftModel computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.trainkit import jsonl, text_rows, tiny_base

from adapterhub import AdapterExistsError, Hub
from adapterhub.integrations.transformers import AdapterHubCallback


def test_sft_trainer_run_is_cataloged_with_lineage(tmp_path: Path) -> None:
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub = Hub(tmp_path / "home")
    folder = tiny_base(tmp_path / "tiny")
    hub.add_base(folder, name="tiny")
    rows = text_rows(8)
    data = jsonl(tmp_path / "t.jsonl", rows)
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    tok = AutoTokenizer.from_pretrained(str(folder))
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        report_to=[],
        use_cpu=True,
        dataset_text_field="text",
        max_length=64,
        seed=5,
        disable_tqdm=True,
        bf16=False,
    )
    cb = AdapterHubCallback(hub, name="sft", base="tiny", data=data, every_checkpoint=True, tags=["trl"])
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(rows[:2]),
        processing_class=tok,
        callbacks=[cb],
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    trainer.train()
    names = {a.name for a in hub.list_adapters()}
    assert {"sft", "sft-step-2", "sft-step-4"} <= names
    info = hub.adapter_info("sft")
    (parent,) = info.parents
    assert parent.name == "tiny" and parent.method == "train" and info.tags == ("trl",)
    p = parent.params
    assert p["steps"] == 4 and len(p["losses"]) == 4 and p["eval_loss"] is not None
    assert p["trainer"] == "trl.SFTTrainer" and p["hyperparameters"]["learning_rate"] == 1e-2
    assert p["data_sha256"] and p["base_fingerprint"] == hub.base_info("tiny").fingerprint
    assert hub.validate("sft", base="tiny").ok
    x = torch.tensor([[1, 5, 9, 2, 33, 7]])
    trained = trainer.model.eval()
    with torch.no_grad():
        want = trained(input_ids=x).logits
        fresh, _ = hub.load_base("tiny", device="cpu")
        rt = hub.attach(fresh)
        rt.load("sft")
        rt.activate("sft")
        assert torch.allclose(fresh(input_ids=x).logits, want, atol=1e-5)
    with pytest.raises(AdapterExistsError):
        AdapterHubCallback(hub, name="sft")
    hub.close()
