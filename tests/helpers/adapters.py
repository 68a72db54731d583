"""Real adapters for catalog and CLI tests: made by PEFT on a tiny Llama built from a config (no downloads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

#: name -> (rank, alpha, targets, extra LoraConfig kwargs)
SPECS: dict[str, tuple[int, int, list[str], dict]] = {
    "sql-r8": (8, 16, ["q_proj", "v_proj"], {}),
    "chat-r4": (4, 8, ["q_proj", "k_proj", "v_proj", "o_proj"], {"use_rslora": True}),
    "math-r16": (16, 32, ["gate_proj", "up_proj", "down_proj"], {"rank_pattern": {"down_proj": 8}}),
    "dora-r4": (4, 4, ["v_proj"], {"use_dora": True}),
}

BASE_NAME = "tiny-llama"


def tiny_llama(seed: int = 0):  # type: ignore[no-untyped-def]
    """`_models.tiny_llama` with the catalog tests' shape (vocab 96, intermediate 64)."""
    from helpers.models import tiny_llama as build

    return build(seed, spread=False, vocab_size=96, intermediate_size=64)


def make_catalog_adapter(
    dest: Path, rank: int, alpha: int, targets: list[str], seed: int = 0, **extra: object
) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, **extra)  # type: ignore[arg-type]
    peft_model = get_peft_model(model, cfg)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(str(dest))
    cfg_path = dest / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = BASE_NAME
    cfg_path.write_text(json.dumps(data, indent=2))
    return dest


def make_all(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (name, (r, a, targets, extra)) in enumerate(SPECS.items()):
        out[name] = make_catalog_adapter(root / name, r, a, targets, seed=i, **extra)
    return out


def make_kohya(dest: Path, *, rank: int = 4, alpha: float = 2.0) -> Path:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(3)
    tensors = {}
    for stem, (out_f, in_f) in {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k": (32, 32),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (16, 16),
    }.items():
        tensors[f"{stem}.lora_down.weight"] = torch.randn(rank, in_f, dtype=torch.float16)
        tensors[f"{stem}.lora_up.weight"] = torch.randn(out_f, rank, dtype=torch.float16)
        tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    meta = {
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sd_v1",
        "ss_output_name": "anime-style",
        "modelspec.title": "Anime style",
    }
    save_file(tensors, str(dest), metadata=meta)
    return dest
