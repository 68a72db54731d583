"""Would vLLM serve this adapter? The refusals of vLLM's LoRA loader, checked before deploying.

The rules and messages are vLLM's own (``vllm/lora/peft_helper.py``, ``vllm/lora/lora_model.py``,
``vllm/lora/utils.py``, ``vllm/config/lora.py``; quoted where each check is made), so a user reads here
what the server log would say. A pure function over (metadata-only) `LoraWeights`; no database, no vLLM.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..lora import LoraWeights
from .validate import BaseLayout, Check

__all__ = ["VLLM_DEFAULT_MAX_LORA_RANK", "VLLM_MAX_LORA_RANKS", "check_vllm"]

#: vllm/config/lora.py: ``MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]`` and
#: ``max_lora_rank: MaxLoRARanks = 16``; ``--max-lora-rank`` takes only these values
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16

#: vllm/lora/utils.py ``get_supported_lora_modules``: "In vLLM, all linear layers support LoRA", plus the
#: model's ``embedding_modules``; after unpacking ``packed_modules_mapping`` (qkv_proj, gate_up_proj) a
#: Llama-family model expects these names (``from_local_checkpoint``: "expected target modules in ...")
_DECODER_TARGETS = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"}
)
EXPECTED_TARGETS: Mapping[str, frozenset[str]] = {
    "llama": _DECODER_TARGETS,
    "mistral": _DECODER_TARGETS,
    "qwen2": _DECODER_TARGETS,
    "qwen3": _DECODER_TARGETS,
    "gemma": _DECODER_TARGETS,
    "gemma2": _DECODER_TARGETS,
}


def _last(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _fit_rank(rank: int) -> int | None:
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)


def _rank_checks(weights: LoraWeights, max_lora_rank: int | None) -> list[Check]:
    # peft_helper.py validate_legal: ``max_rank = max([self.r, *self.rank_pattern.values()])`` and
    # "LoRA rank {max_rank} is greater than max_lora_rank {lora_config.max_lora_rank}."
    rank = weights.rank
    fit = _fit_rank(rank)
    if fit is None:
        return [
            Check(
                "error",
                "vllm.rank",
                f"LoRA rank {rank} is greater than any --max-lora-rank vLLM accepts (at most "
                f"{VLLM_MAX_LORA_RANKS[-1]}); reduce it with `adapterhub resize --rank {VLLM_MAX_LORA_RANKS[-1]}`",
            )
        ]
    checks: list[Check] = []
    if max_lora_rank is not None and max_lora_rank not in VLLM_MAX_LORA_RANKS:
        checks.append(
            Check(
                "warning",
                "vllm.rank",
                f"vLLM accepts --max-lora-rank only as one of {', '.join(map(str, VLLM_MAX_LORA_RANKS))}, "
                f"not {max_lora_rank}",
            )
        )
    if max_lora_rank is not None:
        if rank > max_lora_rank:
            checks.append(
                Check(
                    "error",
                    "vllm.rank",
                    f"LoRA rank {rank} is greater than max_lora_rank {max_lora_rank}: start vLLM with "
                    f"--max-lora-rank {fit}, or reduce the adapter with `adapterhub resize --rank {max_lora_rank}`",
                )
            )
        else:
            checks.append(Check("ok", "vllm.rank", f"rank {rank} fits --max-lora-rank {max_lora_rank}"))
    elif rank > VLLM_DEFAULT_MAX_LORA_RANK:
        checks.append(
            Check(
                "warning",
                "vllm.rank",
                f"LoRA rank {rank} is greater than vLLM's default max_lora_rank {VLLM_DEFAULT_MAX_LORA_RANK}: "
                f"start the server with --max-lora-rank {fit}",
            )
        )
    else:
        checks.append(Check("ok", "vllm.rank", f"rank {rank} fits vLLM's default --max-lora-rank 16"))
    return checks


def _feature_checks(weights: LoraWeights) -> list[Check]:
    cfg: Mapping[str, Any] = weights.config or {}
    checks: list[Check] = []
    # peft_helper.py _validate_features: "vLLM only supports modules_to_save being None."
    saved = [k for k in weights.replacement_shapes if k not in weights.modules]
    if cfg.get("modules_to_save") or saved:
        what = ", ".join(cfg.get("modules_to_save") or []) or saved[0]
        checks.append(
            Check(
                "error",
                "vllm.modules_to_save",
                f"vLLM only supports modules_to_save being None; this adapter replaces {what} outright. "
                "Merge it into the base instead (`adapterhub merge`)",
            )
        )
    for key in weights.replacement_shapes:
        if key in weights.modules:
            # utils.py is_base_embedding_weights: ".embed_tokens.base_layer.weight" / ".lm_head.base_layer.weight"
            # are skipped; any other base_layer tensor reaches parse_fine_tuned_lora_name, which raises
            # "{name} is unsupported LoRA weight"
            module = key[: -len(".weight")] if key.endswith(".weight") else key
            if _last(module) in ("embed_tokens", "lm_head"):
                checks.append(
                    Check(
                        "warning",
                        "vllm.saved_layer",
                        f"{module}: vLLM skips the saved copy of the base layer (base_layer.weight) and uses "
                        "the base model's own",
                        module,
                    )
                )
            else:
                checks.append(
                    Check(
                        "error",
                        "vllm.saved_layer",
                        f"{module}.base_layer.weight is unsupported LoRA weight (vLLM loads lora_A / lora_B and "
                        "embedding factors only)",
                        module,
                    )
                )
    # peft_helper.py: "vLLM does not yet support DoRA."; lora_model.py: "DoRA adapter loading is not
    # implemented yet."
    dora = [m.module for m in weights.modules.values() if m.is_dora]
    if dora or cfg.get("use_dora"):
        checks.append(
            Check(
                "error",
                "vllm.dora",
                "vLLM does not yet support DoRA (lora_magnitude_vector); merge the adapter into the base to serve it",
                dora[0] if dora else None,
            )
        )
    # vLLM's LoRA loader reads lora_A / lora_B as stored: LoHa / LoKr tensors are unknown weights to it,
    # compact block-diagonal factors have the wrong shapes, and KaSA's lora_diag and base truncation are
    # ignored (its loader sees plain LoRA). adapterhub holds all of them as exact plain factors.
    variants = [v for v in weights.variants if v in ("loha", "lokr", "bdlora", "kasa")]
    if variants:
        what = weights.describe_kind().split(" (")[0]
        fix = (
            "merge it into its base to serve it"
            if "kasa" in variants
            else "`adapterhub resize` it (rank = its current rank keeps it exact) for plain LoRA factors"
        )
        checks.append(
            Check("error", "vllm.variant", f"vLLM loads plain LoRA only, and this adapter is {what}; {fix}")
        )
    # peft_helper.py validate_legal: ``if self.bias != "none"``: "Adapter bias is not supported."
    bias = cfg.get("bias") or "none"
    if bias != "none":
        checks.append(Check("error", "vllm.bias", f"bias is {bias!r}: Adapter bias is not supported by vLLM"))
    # utils.py parse_fine_tuned_lora_name knows lora_A/lora_B.weight and lora_embedding_A/B only, so
    # lora_B.bias "is unsupported LoRA weight"
    biased = [m.module for m in weights.modules.values() if m.bias_shape is not None]
    if biased:
        checks.append(
            Check(
                "error",
                "vllm.bias",
                f"{biased[0]}.lora_B.bias is unsupported LoRA weight: vLLM has no lora_bias"
                + (f" ({len(biased)} modules have one)" if len(biased) > 1 else ""),
                biased[0],
            )
        )
    return checks


def _target_checks(weights: LoraWeights, base: BaseLayout | None) -> list[Check]:
    checks: list[Check] = []
    model_type = base.model_type if base is not None else None
    expected = EXPECTED_TARGETS.get(model_type or "")
    unexpected = sorted(
        {
            m.module
            for m in weights.modules.values()
            if m.kind == "conv" or (expected is not None and _last(m.module) not in expected)
        }
    )
    if unexpected:
        names = expected or {"linear layers"}
        checks.append(
            Check(
                "error",
                "vllm.target",
                f"expected target modules in {sorted(names)} but received {unexpected[:4]}"
                + (f" and {len(unexpected) - 4} more" if len(unexpected) > 4 else "")
                + ": vLLM adapts linear layers (and embeddings) only",
                unexpected[0],
            )
        )
    vocab = None
    if base is not None:
        v = base.config.get("vocab_size") if base.config else None
        vocab = int(v) if isinstance(v, int) else None
    for m in weights.modules.values():
        if m.kind != "embedding":
            continue
        # lora_model.py from_lora_tensors: "The embedding LoRA size({...}) must be consistent with the base
        # model's vocabulary size({model_vocab_size})." (vLLM dropped lora_extra_vocab_size: no added tokens)
        rows = m.delta_shape[0]
        if vocab is None:
            checks.append(
                Check(
                    "warning",
                    "vllm.embedding",
                    f"{m.module}: vLLM takes an embedding LoRA only if it covers exactly the base vocabulary "
                    f"(this one has {rows} rows) and keeps no extra vocabulary; give --base to check",
                    m.module,
                )
            )
        elif rows != vocab:
            checks.append(
                Check(
                    "error",
                    "vllm.embedding",
                    f"{m.module}: The embedding LoRA size({rows}) must be consistent with the base model's "
                    f"vocabulary size({vocab}); vLLM serves no added tokens",
                    m.module,
                )
            )
    return checks


def check_vllm(
    weights: LoraWeights, *, max_lora_rank: int | None = None, base: BaseLayout | None = None
) -> list[Check]:
    """What vLLM's loader would refuse (errors) or do differently from what one may expect (warnings)."""
    checks: list[Check] = []
    if weights.format in ("kohya", "diffusers"):
        checks.append(
            Check(
                "error",
                "vllm.format",
                f"a {weights.format} LoRA is for image models; vLLM serves PEFT LoRAs of language models",
            )
        )
    elif weights.format != "peft":
        checks.append(
            Check(
                "warning",
                "vllm.format",
                f"vLLM loads PEFT folders (adapter_config.json + adapter_model.safetensors), not {weights.format} "
                "files; `adapterhub export NAME DIR --format peft` writes one",
            )
        )
    checks += _rank_checks(weights, max_lora_rank)
    checks += _feature_checks(weights)
    checks += _target_checks(weights, base)
    if not any(c.status == "error" for c in checks):
        checks.append(Check("ok", "vllm", "vLLM's LoRA loader would accept this adapter"))
    return checks
