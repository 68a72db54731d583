"""The model card (README.md) pushed with an adapter: Hub metadata in YAML front matter, then a body a
person can read. Deterministic: the same adapter always gives the same bytes, so an unchanged re-push
makes no commit."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ..records import AdapterInfo, EvaluationRecord

REPO_ID_LIKE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")

_AUTO_CLASS = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def card_metadata(info: AdapterInfo) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if info.base_model and REPO_ID_LIKE.match(info.base_model):
        meta["base_model"] = info.base_model
        meta["base_model_relation"] = "adapter"
    meta["library_name"] = "peft" if info.format == "peft" else "diffusers"
    license_ = info.metadata.get("license") or info.metadata.get("modelspec.license")
    if license_:
        meta["license"] = str(license_)
    tags = ["lora", "adapterhub"]
    if info.format == "peft":
        tags.append("peft")
    if info.use_dora:
        tags.append("dora")
    tags += [t for t in info.tags if t not in tags]
    meta["tags"] = tags
    return meta


def card_results(records: Sequence[EvaluationRecord]) -> list[EvaluationRecord]:
    """The latest record per (dataset, data sha256, metric, base), in a stable order."""
    latest: dict[tuple[str, str, str, str], EvaluationRecord] = {}
    for r in sorted(records, key=lambda r: r.id):
        if r.value is not None and r.value == r.value and abs(r.value) != float("inf"):
            latest[(r.dataset, r.dataset_sha256, r.metric, r.base)] = r
    return [latest[k] for k in sorted(latest)]


def model_index(name: str, records: Sequence[EvaluationRecord]) -> list[dict[str, Any]]:
    """The Hub's ``model-index`` for evaluation records (built with huggingface_hub's `EvalResult`):
    the data's sha256 as the dataset revision; rows, base, seed and adapterhub version as metric args."""
    from huggingface_hub import EvalResult
    from huggingface_hub.repocard_data import eval_results_to_model_index

    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=r.dataset,
            dataset_name=r.dataset,
            dataset_revision=r.dataset_sha256,
            metric_type=r.metric,
            metric_name=r.metric,
            metric_value=r.value,
            metric_args={
                "rows": r.rows,
                "base": r.base,
                "base_fingerprint": r.base_fingerprint,
                "seed": r.seed,
                "adapterhub_version": r.version,
            },
        )
        for r in card_results(records)
    ]
    return eval_results_to_model_index(name, results) if results else []


def read_model_index(readme: str) -> list[dict[str, Any]]:
    """Evaluation results of a model card's ``model-index``, parsed by huggingface_hub's `ModelCard`:
    dicts of dataset, dataset_sha256, metric, value, rows, base, base_fingerprint, seed (unknowns None)."""
    from huggingface_hub import ModelCard

    try:
        card = ModelCard(readme, ignore_metadata_errors=True)
    except (ValueError, TypeError):
        return []
    out = []
    for e in getattr(card.data, "eval_results", None) or []:
        if not isinstance(e.metric_value, int | float) or isinstance(e.metric_value, bool):
            continue
        args = e.metric_args if isinstance(e.metric_args, dict) else {}
        rows, seed = args.get("rows"), args.get("seed")
        out.append(
            {
                "dataset": str(e.dataset_name or e.dataset_type),
                "dataset_sha256": str(e.dataset_revision or ""),
                "metric": str(e.metric_type),
                "value": float(e.metric_value),
                "rows": rows if isinstance(rows, int) and not isinstance(rows, bool) else 0,
                "base": str(args.get("base") or ""),
                "base_fingerprint": args.get("base_fingerprint") or None,
                "seed": seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
            }
        )
    return out


def model_card(info: AdapterInfo, repo_id: str, results: Sequence[EvaluationRecord] = ()) -> str:
    import yaml

    meta = card_metadata(info)
    index = model_index(info.name, results)
    if index:
        meta["model-index"] = index
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)
    lines = ["---", front.rstrip("\n"), "---", "", f"# {info.name}", ""]
    if info.description:
        lines += [info.description, ""]
    kind = "DoRA" if info.use_dora else "LoRA"
    base = f"`{info.base_model}`" if info.base_model else "an unrecorded base model"
    lines += [
        f"A {kind} adapter for {base}, shared with [adapterhub](https://pypi.org/project/adapterhub/).",
        "",
    ]
    lines += ["## Adapter", "", "| | |", "|---|---|"]
    rows: list[tuple[str, Any]] = [
        ("format", "PEFT" if info.format == "peft" else "kohya / diffusers single file"),
        ("rank", info.rank),
        ("alpha", f"{info.alpha:g}" if info.alpha is not None else "per module"),
        ("scaling", "rsLoRA (alpha / sqrt(r))" if info.use_rslora else "alpha / r"),
        ("target modules", ", ".join(f"`{t}`" for t in info.target_modules) or "-"),
        ("adapted modules", info.num_modules),
        ("parameters", f"{info.num_params:,}"),
        ("size", _size(info.size_bytes)),
        ("dtype", info.dtype or "-"),
        ("task type", info.task_type or "-"),
        ("weights sha256", f"`{info.sha256}`"),
    ]
    if info.rank_pattern:
        rows.append(("rank pattern", ", ".join(f"`{k}`: {v}" for k, v in info.rank_pattern.items())))
    if info.alpha_pattern:
        rows.append(("alpha pattern", ", ".join(f"`{k}`: {v:g}" for k, v in info.alpha_pattern.items())))
    if info.tags:
        rows.append(("tags", ", ".join(info.tags)))
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines.append("")
    if info.parents:
        lines += ["## Lineage", "", f"`{info.name}` was made from:", ""]
        for p in info.parents:
            w = "" if p.weight is None else f" with weight {p.weight:g}"
            lines.append(f"- `{p.name}`{w} ({p.method})")
        lines.append("")
    shown = card_results(results)
    if shown:
        lines += ["## Results", "", "| dataset | metric | value | rows | base |", "|---|---|---|---|---|"]
        lines += [f"| {r.dataset} | {r.metric} | {r.value:.4g} | {r.rows} | {r.base} |" for r in shown]
        lines += ["", "Measured with `adapterhub eval` (teacher-forced loss on the answer tokens).", ""]
    lines += ["## How to load it", ""]
    if info.format == "peft":
        auto = _AUTO_CLASS.get(
            info.task_type or "", "AutoModel" if info.task_type else "AutoModelForCausalLM"
        )
        base_id = info.base_model or "BASE_MODEL"
        lines += [
            "With PEFT:",
            "",
            "```python",
            f"from transformers import {auto}",
            "from peft import PeftModel",
            "",
            f'base = {auto}.from_pretrained("{base_id}")',
            f'model = PeftModel.from_pretrained(base, "{repo_id}")',
            "```",
            "",
        ]
    else:
        lines += [
            "With diffusers:",
            "",
            "```python",
            f'pipe.load_lora_weights("{repo_id}")',
            "```",
            "",
        ]
    lines += [
        "Into an adapterhub catalog (checks the sha256 of every file against the server's):",
        "",
        "```sh",
        f"adapterhub pull {repo_id}",
        "```",
        "",
        "`adapterhub.json` holds the full catalog record (schema: `schemas/adapter.schema.json` of adapterhub).",
        "",
    ]
    return "\n".join(lines)
