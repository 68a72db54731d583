"""Tiny random models and PEFT adapters for merge tests, built from configs (no downloads).

Importable by any test: ``from helpers.models import tiny_llama, save_model, make_adapter, ...``
(or ``from _models import ...`` with tests/ on the path).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

EXTRA_FILES = {
    "tokenizer.json": '{"version": "1.0", "model": {"type": "WordLevel"}}\n',
    "README.md": "# tiny\n",
}


def tiny_llama(
    seed: int = 0,
    *,
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
    spread: bool = True,
    **overrides: Any,
) -> Any:
    """The one tiny random Llama of the tests: 2 layers, hidden 32 unless ``overrides`` say otherwise.
    ``spread`` widens the random init so that merged and unmerged outputs differ clearly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kw: dict[str, Any] = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    kw.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kw))
    if spread:
        _spread(model)
    return model.to(dtype).eval()


def tiny_gpt2(seed: int = 0) -> Any:
    """GPT-2: Conv1D layers (weights stored (in, out)), square c_proj, biases, tied lm_head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(cfg)
    _spread(model)
    return model.eval()


def tiny_bert(seed: int = 0) -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=3,
    )
    model = BertForSequenceClassification(cfg)
    _spread(model)
    return model.eval()


class TinyConvNet(torch.nn.Module):
    """A conv model (3x3 and 1x1 convs) for conv LoRA; saved as a plain safetensors folder."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.mid = torch.nn.Conv2d(8, 8, 1)
        self.conv_out = torch.nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(torch.relu(self.mid(torch.relu(self.conv_in(x)))))


def tiny_convnet(seed: int = 0) -> TinyConvNet:
    torch.manual_seed(seed)
    return TinyConvNet().eval()


def _spread(model: torch.nn.Module) -> None:
    """Give weights a realistic spread (the default init of tiny models is near zero)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)


def save_model(model: Any, dest: Path, *, shard_size: str | None = None, extras: bool = True) -> Path:
    """``save_pretrained`` (safetensors; sharded when ``shard_size``), plus a few non-weight files."""
    dest = Path(dest)
    if isinstance(model, TinyConvNet):
        from safetensors.torch import save_file

        dest.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            str(dest / "model.safetensors"),
            metadata={"format": "pt"},
        )
        (dest / "config.json").write_text(json.dumps({"model_type": "tinyconv"}) + "\n")
    else:
        kw = {"max_shard_size": shard_size} if shard_size else {}
        model.save_pretrained(dest, safe_serialization=True, **kw)
    if extras:
        for name, text in EXTRA_FILES.items():
            (dest / name).write_text(text)
    return dest


def randomize_adapter(peft_model: Any, seed: int, *, std: float = 0.2) -> None:
    """PEFT starts B (or the embedding A) at zero; fill every LoRA factor (and modules_to_save copy) so the
    adapter changes something; DoRA magnitudes are perturbed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g).to(p.dtype))
            elif "lora_" in name or "modules_to_save" in name:
                p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))


def make_adapter(
    model: Any,
    dest: Path,
    *,
    seed: int = 1,
    r: int = 4,
    lora_alpha: float = 8,
    target_modules: Sequence[str] | str = ("q_proj", "v_proj"),
    **lora_kwargs: Any,
) -> Path:
    """Make a PEFT LoRA adapter for ``model`` (a deep copy is wrapped), randomize it, save it to ``dest``."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
        **lora_kwargs,
    )
    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(model), cfg)
    randomize_adapter(pm, seed)
    pm.save_pretrained(dest)
    return Path(dest)


def peft_model(model_dir: Path, adapters: Iterable[tuple[Path, float]], *, loader: Any = None) -> Any:
    """Base from ``model_dir`` with the adapters loaded (unmerged), each scaled by its weight."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if loader is None:
        from transformers import AutoModelForCausalLM as loader
    base = loader.from_pretrained(model_dir).eval()
    items = list(adapters)
    names = [f"a{i}" for i in range(len(items))]
    pm = PeftModel.from_pretrained(base, items[0][0], adapter_name=names[0])
    for name, (path, _) in zip(names[1:], items[1:], strict=True):
        pm.load_adapter(path, adapter_name=name)
    for module in pm.modules():
        if isinstance(module, LoraLayer):
            for name, (_, w) in zip(names, items, strict=True):
                if name in module.scaling:
                    module.scaling[name] *= w
    pm.base_model.set_adapter(names) if len(names) > 1 else pm.set_adapter(names[0])
    return pm.eval()


def peft_merged_state(model_dir: Path, adapters: Iterable[tuple[Path, float]], *, loader: Any = None) -> dict:
    """PEFT's ``merge_and_unload`` of the adapters (in order), as a state dict."""
    pm = peft_model(model_dir, adapters, loader=loader)
    names = list(pm.peft_config)
    merged = pm.merge_and_unload(adapter_names=names)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def load_folder(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (all shards)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
