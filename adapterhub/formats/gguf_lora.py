"""GGUF LoRA adapters, the file llama.cpp (``--lora``) and ollama (``ADAPTER``) load.

What llama.cpp's loader (``src/llama-adapter.cpp``, ``llama_adapter_lora_init_impl``) requires, and what
its own converter (``convert_lora_to_gguf.py``) writes:

- ``general.type = "adapter"``, ``adapter.type = "lora"`` (both checked, refused otherwise),
  ``general.architecture`` equal to the base model's (``"model arch and LoRA arch mismatch"``), and
  ``adapter.lora.alpha`` (float32; missing or 0 means scale 1). The scale of each tensor pair is
  ``alpha / rank`` with the rank read from the pair: one alpha for the whole file.
- Tensors ``<base tensor>.lora_a`` / ``.lora_b`` named as the base GGUF names its tensors
  (``blk.N.attn_q.weight.lora_a``); every other name is refused ("has unexpected suffix") except
  ``*_norm.weight``, which is ignored. In numpy order ``lora_a`` is PEFT's ``lora_A`` ``(r, in)`` and
  ``lora_b`` is ``lora_B`` ``(out, r)`` (the loader checks ``a.ne[0] == W.ne[0]``, ``b.ne[1] == W.ne[1]``,
  ``a.ne[1] == b.ne[0]``); for ``token_embd`` it takes ``lora_a = lora_embedding_A.T`` ``(vocab, r)`` and
  ``lora_b = lora_embedding_B`` ``(dim, r)``.
- The converter reuses ``convert_hf_to_gguf``'s ``LlamaModel.modify_tensors``, which permutes the rows
  of ``q_proj`` / ``k_proj`` for llama.cpp's rotary layout (``LlamaModel.permute``); on a LoRA pair that
  permutes ``lora_B``'s rows only. The base GGUF is permuted the same way, so the adapter must be too.

adapterhub writes the head counts it permuted with (``llama.attention.head_count`` / ``_kv``) into the
file so that it can undo the permutation when reading it back; a GGUF LoRA without them (written by
llama.cpp's converter) is refused if it adapts ``attn_q`` / ``attn_k``. Different alphas per module are
folded into ``lora_b`` (the update ``scale * B @ A`` is unchanged). No database here; ``gguf`` (which
brings numpy) and torch are imported only when a file is read or written.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import InvalidAdapterError
from ..lora import LoraModule, LoraWeights, lora_scale

__all__ = [
    "GGUF_ARCHITECTURES",
    "gguf_name",
    "hf_name",
    "is_gguf",
    "load_gguf_tensors",
    "read_gguf_lora",
    "write_gguf_lora",
]

#: transformers ``model_type`` -> the GGUF architecture llama.cpp's converter gives it (``LlamaModel``:
#: LlamaForCausalLM, MistralForCausalLM; both permute q/k)
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama"}

_LAYER_NAMES = {  # gguf-py's TensorNameMap for MODEL_ARCH.LLAMA (tests check it against gguf-py)
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "lm_head": "output"}
_LAYER_BACK = {v: k for k, v in _LAYER_NAMES.items()}
_GLOBAL_BACK = {v: k for k, v in _GLOBAL_NAMES.items()}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")

KEY_TYPE = "general.type"
KEY_ARCH = "general.architecture"
KEY_ADAPTER_TYPE = "adapter.type"
KEY_ALPHA = "adapter.lora.alpha"
KEY_BASE = "general.base_model.0.name"


def is_gguf(path: str | os.PathLike[str]) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def gguf_name(module: str) -> str | None:
    """``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q.weight`` (None for what llama has no name for)."""
    if module in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[module] + ".weight"
    m = _HF_LAYER.match(module)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


def hf_name(tensor: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj``."""
    stem = tensor[: -len(".weight")] if tensor.endswith(".weight") else None
    if stem in _GLOBAL_BACK:
        return _GLOBAL_BACK[stem]
    m = _GGUF_LAYER.match(tensor)
    if m and m.group(2) in _LAYER_BACK:
        return f"model.layers.{m.group(1)}.{_LAYER_BACK[m.group(2)]}"
    return None


def _heads_for(module: str, n_head: int, n_head_kv: int) -> int | None:
    """How many row groups llama.cpp's ``LlamaModel.permute`` uses for this module (None: not permuted)."""
    if module.endswith("self_attn.q_proj"):
        return n_head
    if module.endswith("self_attn.k_proj"):
        return n_head_kv
    return None


def _permute(b: Any, heads: int) -> Any:
    """llama.cpp's ``LlamaModel.permute`` on the output rows (``lora_B``)."""
    return b.reshape(heads, 2, b.shape[0] // heads // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def _unpermute(b: Any, heads: int) -> Any:
    """The inverse (transformers' ``LlamaTensorProcessor._reverse_permute_weights``)."""
    return b.reshape(heads, b.shape[0] // heads // 2, 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


# --------------------------------------------------------------------------- writing


def _refusal(weights: LoraWeights, model_type: str | None, config: Mapping[str, Any]) -> str | None:
    if model_type not in GGUF_ARCHITECTURES:
        return (
            f"GGUF export supports Llama-family bases (model_type {', '.join(sorted(GGUF_ARCHITECTURES))}); "
            f"this adapter's base is model_type {model_type!r}"
        )
    # a saved copy of a targeted layer (PEFT's base_layer.weight) is skipped, as the converter does
    replaced = [k for k in weights.replacement_shapes if k not in weights.modules]
    if replaced:
        key = replaced[0]
        return (
            f"{key}: llama.cpp LoRA files hold lora_a/lora_b pairs only, not full replacement weights "
            "(modules_to_save / saved embedding layers); export in PEFT format instead"
        )
    for m in weights.modules.values():
        if m.is_dora:
            return f"{m.module}: llama.cpp has no DoRA (a magnitude vector); merge the adapter instead"
        if m.bias_shape is not None:
            return f"{m.module}: llama.cpp LoRA has no lora_B bias (lora_bias); export in PEFT format instead"
        if m.kind == "conv":
            return f"{m.module}: llama.cpp LoRA has no conv layers"
        if m.needs_base:
            return (
                f"{m.module}: KaSA removes singular components of the base weight, which a llama.cpp LoRA "
                "cannot say; export in PEFT format (or merge it into its base)"
            )
        if gguf_name(m.module) is None:
            return (
                f"{m.module}: llama.cpp's llama architecture has no tensor for this module (it adapts "
                f"{', '.join(sorted(_LAYER_NAMES))} and embed_tokens / lm_head)"
            )
        if m.module == "lm_head" and config.get("tie_word_embeddings"):
            return (
                "lm_head: the base ties lm_head to embed_tokens, and llama.cpp's converter refuses an "
                "lm_head LoRA on such a base ('lm_head is present in adapter, but is ignored in base model')"
            )
    return None


def _head_counts(config: Mapping[str, Any], weights: LoraWeights) -> tuple[int, int]:
    n_head = config.get("num_attention_heads")
    n_kv = config.get("num_key_value_heads") or n_head
    needs = [m.module for m in weights.modules.values() if _heads_for(m.module, 1, 1)]
    if needs and not (isinstance(n_head, int) and isinstance(n_kv, int) and n_head > 0 and n_kv > 0):
        raise InvalidAdapterError(
            f"{needs[0]}: llama.cpp permutes q_proj / k_proj rows by attention head, and the base config has "
            "no num_attention_heads / num_key_value_heads to do it with; register the base with its config.json"
        )
    return int(n_head or 0), int(n_kv or 0)


def write_gguf_lora(
    weights: LoraWeights, dest: str | os.PathLike[str], *, base_config: Mapping[str, Any]
) -> Path:
    """Write loaded ``weights`` as one llama.cpp LoRA ``.gguf`` file for a base with ``base_config``
    (its ``config.json``: ``model_type``, head counts, ``tie_word_embeddings``). Checks everything first."""
    model_type = base_config.get("model_type")
    why = _refusal(weights, model_type if isinstance(model_type, str) else None, base_config)
    if why:
        raise InvalidAdapterError(why)
    if not weights.modules:
        raise InvalidAdapterError("cannot write an adapter with no LoRA modules")
    for m in weights.modules.values():
        if not m.has_tensors():
            raise InvalidAdapterError(f"{m.key}: tensors were not loaded; cannot write")
    n_head, n_kv = _head_counts(base_config, weights)
    import gguf
    import torch

    # one alpha for the file: the most common scale * rank; other modules fold their ratio into lora_b
    # (positive: a combination with a negative weight keeps its sign in lora_b)
    alphas = Counter(m.scale * m.rank for m in weights.modules.values() if m.scale > 0)
    alpha = alphas.most_common(1)[0][0] if alphas else 1.0
    arrays: list[tuple[str, Any]] = []
    for m in weights.modules.values():
        assert m.A is not None and m.B is not None
        keep16 = m.A.dtype == torch.float16 and m.B.dtype == torch.float16
        ratio = m.scale * m.rank / alpha
        a = m.A.to(torch.float32).reshape(m.rank, -1)
        b = m.B.to(torch.float32).reshape(m.B.shape[0], m.rank)
        if not math.isclose(ratio, 1.0, rel_tol=1e-12, abs_tol=0.0):
            b = b * ratio
            keep16 = False  # do not round the folded factor to half precision
        name = gguf_name(m.module)
        assert name is not None
        if m.kind == "embedding":  # the converter: lora_a = lora_embedding_A.T, lora_b = lora_embedding_B
            lora_a, lora_b = b, a.T
        else:
            heads = _heads_for(m.module, n_head, n_kv)
            lora_a, lora_b = a, (_permute(b, heads) if heads else b)
        dt = torch.float16 if keep16 else torch.float32
        arrays.append((name + ".lora_a", lora_a.to(dt).contiguous().numpy()))
        arrays.append((name + ".lora_b", lora_b.to(dt).contiguous().numpy()))
    out = Path(dest)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=GGUF_ARCHITECTURES[str(model_type)])
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        if n_head:
            writer.add_head_count(n_head)
            writer.add_head_count_kv(n_kv)
        if weights.base_model:
            writer.add_base_model_count(1)
            writer.add_base_model_name(0, weights.base_model)
        for name, arr in arrays:
            writer.add_tensor(name, arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------- reading


def _open(path: str) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises ValueError / struct / numpy errors on a damaged file
        raise InvalidAdapterError(f"{path}: not a readable GGUF file ({exc})", path=path) from None


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # noqa: BLE001 - an odd value type: treat as absent
        return None


def read_gguf_lora(path: str | os.PathLike[str], *, load_tensors: bool = False) -> LoraWeights:
    """Read a llama.cpp LoRA file into `LoraWeights` keyed by the Hugging Face weight names."""
    p = str(path)
    reader = _open(p)
    gtype = _field(reader, KEY_TYPE)
    if gtype != "adapter":
        raise InvalidAdapterError(
            f"{p}: a GGUF file with general.type {gtype!r}, not a LoRA adapter; a GGUF model checkpoint is "
            "a base: `adapterhub base import-gguf` registers it",
            path=p,
        )
    atype = _field(reader, KEY_ADAPTER_TYPE)
    if atype != "lora":
        raise InvalidAdapterError(
            f"{p}: GGUF adapter.type is {atype!r}; adapterhub reads LoRA adapters", path=p
        )
    arch = _field(reader, KEY_ARCH)
    if arch != "llama":
        raise InvalidAdapterError(
            f"{p}: a GGUF LoRA for architecture {arch!r}; adapterhub reads llama-architecture GGUF LoRAs only",
            path=p,
        )
    alpha_field = _field(reader, KEY_ALPHA)
    file_alpha = float(alpha_field) if isinstance(alpha_field, (int, float)) else 0.0
    if not math.isfinite(file_alpha) or file_alpha < 0:
        raise InvalidAdapterError(f"{p}: adapter.lora.alpha is {file_alpha}, not a positive number", path=p)
    n_head = _field(reader, "llama.attention.head_count")
    n_kv = _field(reader, "llama.attention.head_count_kv") or n_head
    pairs: dict[str, dict[str, Any]] = {}
    for t in reader.tensors:
        name = str(t.name)
        if name.endswith("_norm.weight"):
            continue  # llama.cpp ignores these too
        for suffix in (".lora_a", ".lora_b"):
            if name.endswith(suffix):
                pairs.setdefault(name[: -len(suffix)], {})[suffix[-1]] = t
                break
        else:
            raise InvalidAdapterError(f"{p}: tensor {name} is not a lora_a / lora_b factor", path=p)
    modules: dict[str, LoraModule] = {}
    for base_tensor, got in sorted(pairs.items()):
        if "a" not in got or "b" not in got:
            raise InvalidAdapterError(f"{p}: {base_tensor} has only one of lora_a / lora_b", path=p)
        module = hf_name(base_tensor)
        if module is None:
            raise InvalidAdapterError(
                f"{p}: {base_tensor} is not a llama tensor adapterhub can name (it knows "
                f"{', '.join(sorted(_LAYER_BACK))}, token_embd and output)",
                path=p,
            )
        sa = tuple(int(d) for d in reversed(got["a"].shape))  # numpy order
        sb = tuple(int(d) for d in reversed(got["b"].shape))
        if len(sa) != 2 or len(sb) != 2 or 0 in sa or 0 in sb:
            raise InvalidAdapterError(
                f"{p}: {base_tensor}: factors must be 2-D, got {list(sa)} / {list(sb)}", path=p
            )
        embedding = module == "model.embed_tokens"
        # token_embd: lora_a (vocab, r) is our B, lora_b (dim, r) is our A transposed
        a_shape, b_shape = ((sb[1], sb[0]), sa) if embedding else (sa, sb)
        rank = sb[1]
        if a_shape[0] != rank or b_shape[1] != rank:
            raise InvalidAdapterError(
                f"{p}: {base_tensor}: lora_a {list(sa)} and lora_b {list(sb)} do not share a rank", path=p
            )
        if _heads_for(module, 1, 1) and not n_head:
            raise InvalidAdapterError(
                f"{p}: {base_tensor}: llama.cpp stores attn_q / attn_k rows permuted by head, and the file has "
                "no llama.attention.head_count to undo it with; convert the PEFT adapter with adapterhub instead",
                path=p,
            )
        alpha = file_alpha or float(rank)
        modules[module + ".weight"] = LoraModule(
            key=module + ".weight",
            kind="embedding" if embedding else "linear",
            rank=rank,
            alpha=alpha,
            scale=lora_scale(rank, alpha),
            a_shape=a_shape,
            b_shape=b_shape,
            dtype=got["a"].tensor_type.name,
        )
    if not modules:
        raise InvalidAdapterError(f"{p}: holds no LoRA tensors (no .lora_a / .lora_b pairs)", path=p)
    base = _field(reader, KEY_BASE)
    meta = {KEY_ARCH: str(arch), KEY_ALPHA: f"{file_alpha:g}"}
    if n_head:
        meta["llama.attention.head_count"] = str(n_head)
        meta["llama.attention.head_count_kv"] = str(n_kv)
    weights = LoraWeights(
        modules=modules,
        format="gguf",
        metadata=meta,
        base_model=base if isinstance(base, str) and base else None,
    )
    if load_tensors:
        _fill(weights, reader, int(n_head or 0), int(n_kv or 0), p)
    return weights


def load_gguf_tensors(weights: LoraWeights, path: str | os.PathLike[str]) -> LoraWeights:
    """Fill the tensors of metadata-only ``weights`` read from ``path``."""
    reader = _open(str(path))
    n_head = int(weights.metadata.get("llama.attention.head_count", 0) or 0)
    n_kv = int(weights.metadata.get("llama.attention.head_count_kv", 0) or 0)
    return _fill(weights, reader, n_head, n_kv, str(path))


def _fill(weights: LoraWeights, reader: Any, n_head: int, n_kv: int, path: str) -> LoraWeights:
    import gguf
    import numpy as np
    import torch

    by_name = {str(t.name): t for t in reader.tensors}

    def get(name: str) -> Any:
        t = by_name.get(name)
        if t is None:
            raise InvalidAdapterError(f"{path}: tensor {name} is missing", path=path)
        shape = tuple(int(d) for d in reversed(t.shape))
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            arr = np.array(t.data, copy=True).reshape(shape)
        else:  # BF16 / Q8_0 and friends: gguf-py dequantizes to float32
            arr = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        return torch.from_numpy(arr)

    for m in weights.modules.values():
        name = gguf_name(m.module)
        assert name is not None
        la, lb = get(name + ".lora_a"), get(name + ".lora_b")
        if m.kind == "embedding":
            m.A, m.B = lb.T.contiguous(), la
        else:
            heads = _heads_for(m.module, n_head, n_kv)
            m.A, m.B = la, (_unpermute(lb, heads).contiguous() if heads else lb)
    return weights
