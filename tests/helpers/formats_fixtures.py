"""Builders for the formats tests: tiny models, PEFT adapters made by PEFT itself, raw safetensors bytes.

Plain functions (not pytest fixtures) so that any test module can import them without a conftest.
"""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

VOCAB = 64


def safetensors_bytes(header: dict[str, Any] | bytes, data: bytes = b"") -> bytes:
    """A safetensors file from a header (a dict, or raw header bytes) and a data section, unchecked."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def write_bytes(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def tiny_llama() -> nn.Module:
    """`_models.tiny_llama` with the format tests' shape (hidden 16)."""
    from helpers.models import tiny_llama as build

    return build(
        0,
        spread=False,
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg).eval()


class ConvNet(nn.Module):
    """A small module with a 3x3 Conv2d, a Linear, and a nested Linear of the same short name."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.lin = nn.Linear(6, 5)
        self.block = nn.Sequential()
        self.block.lin = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean((2, 3))
        return self.block.lin(self.lin(h))


def token_input() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 6), generator=g)


def image_input() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 5, 5, generator=g)


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def make_peft(base: nn.Module, dest: Path, **lora_kwargs: Any) -> Any:
    """Wrap a copy of ``base`` with PEFT (random A and B, so the adapter changes outputs) and save it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(123)
    lora_kwargs.setdefault("init_lora_weights", False)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**lora_kwargs)).eval()
    model.save_pretrained(str(dest))
    return model


def load_peft(base: nn.Module, path: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


def lora_layers(peft_model: Any) -> dict[str, Any]:
    """PEFT's LoRA layers by module name relative to the base model (``model.layers.0.self_attn.q_proj``)."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {
        name[len(prefix) :]: mod
        for name, mod in peft_model.named_modules()
        if isinstance(mod, LoraLayer) and name.startswith(prefix)
    }


def write_config(folder: Path, config: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def save_peft_tensors(folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """A hand-made PEFT folder (for broken adapters PEFT itself would never save)."""
    from safetensors.torch import save_file

    write_config(folder, config)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def peft_linear_tensors(
    module: str = "model.layers.0.self_attn.q_proj", r: int = 4, d_in: int = 16, d_out: int = 16
) -> dict[str, torch.Tensor]:
    pre = f"base_model.model.{module}"
    g = torch.Generator().manual_seed(0)
    return {
        f"{pre}.lora_A.weight": torch.randn(r, d_in, generator=g),
        f"{pre}.lora_B.weight": torch.randn(d_out, r, generator=g),
    }


def kohya_file(
    path: Path,
    *,
    stems: dict[str, tuple[int, int, int]] | None = None,
    alpha: float | None = 2.0,
    conv: bool = False,
    metadata: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """A kohya-style LoRA file. ``stems`` maps a stem to (rank, in, out)."""
    from safetensors.torch import save_file

    stems = stems or {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (4, 32, 32),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (4, 16, 16),
    }
    g = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for stem, (r, d_in, d_out) in stems.items():
        if conv:
            tensors[f"{stem}.lora_down.weight"] = torch.randn(r, d_in, 3, 3, generator=g)
            tensors[f"{stem}.lora_up.weight"] = torch.randn(d_out, r, 1, 1, generator=g)
        else:
            tensors[f"{stem}.lora_down.weight"] = torch.randn(r, d_in, generator=g)
            tensors[f"{stem}.lora_up.weight"] = torch.randn(d_out, r, generator=g)
        if alpha is not None:
            tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sd_v1",
        "ss_output_name": "tiny",
    }
    meta.update(metadata or {})
    save_file(tensors, str(path), metadata=meta)
    return tensors
