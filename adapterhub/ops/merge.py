"""Fold LoRA adapters into a base checkpoint, streaming, on the CPU or a GPU.

For every targeted tensor the result is ``W0 + sum_i w_i * s_i * B_i @ A_i``, accumulated in fp32 and
rounded once to the output dtype. DoRA, ``lora_bias``, embedding, GPT-2 ``Conv1D`` and conv LoRAs,
``modules_to_save`` replacements and tied embeddings are handled; see `merge_checkpoint`.

This module checks every adapter against the base and plans what each output tensor gets (`_plan`,
tied heads, `_build_shards`), and writes config.json, the index and the base folder's other files.
The tensors themselves are streamed into the output shards by `_stream._write_shards`, whose module
docstring explains how.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import IncompatibleAdapterError, InvalidOptionError, OutputExistsError
from ..formats.checkpoint import CONFIG_NAME, INDEX_NAME, CheckpointInfo, read_checkpoint
from ..formats.values import non_finite
from ..lora import LoraWeights, flat_conv_fits, resolve_kasa
from ._stream import _Entry, _ShardPlan, _write_shards
from ._targets import _Lora, _Target
from .keymap import describe_problems, map_keys, needs_transpose

__all__ = ["merge_checkpoint", "MergeResult", "OutputExistsError", "DTYPES"]

logger = logging.getLogger(__name__)

#: output dtype choices: "keep" leaves every tensor in its own dtype
DTYPES = ("keep", "float32", "bfloat16", "float16")
_DTYPE_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_FLOAT_CODES = frozenset({"F16", "BF16", "F32", "F64"})
#: weight files of other formats that would be stale beside merged safetensors: not copied
_STALE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".onnx_data")
_STALE_NAMES = ("pytorch_model.bin.index.json", "tf_model.h5.index.json", "flax_model.msgpack.index.json")
#: names of input embeddings, most specific first, for finding what a missing lm_head is tied to
_INPUT_EMBEDDINGS = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "tok_embeddings.weight",
    "embed_in.weight",
    "shared.weight",
)
#: architectures with an output head that transformers ties to the input embeddings
_LM_HEADS = (
    "ForCausalLM",
    "LMHeadModel",
    "ForConditionalGeneration",
    "ForMaskedLM",
    "WithLMHead",
    "ForPreTraining",
)


@dataclass(frozen=True)
class MergeResult:
    """What `merge_checkpoint` wrote."""

    out: Path
    tensors_changed: int
    bytes_written: int
    seconds: float
    device: str
    #: tensors written to break a tie with a changed embedding (``lm_head.weight``)
    untied: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- planning


def _resolve_dtype(dtype: str) -> str | None:
    if dtype not in DTYPES:
        raise InvalidOptionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return _DTYPE_CODES.get(dtype)


def _find_tied(ckpt: CheckpointInfo) -> tuple[str, str] | None:
    """``(output name, input embedding name)`` when the output head is tied and absent from the files."""
    if not ckpt.tie_word_embeddings or not any(a.endswith(_LM_HEADS) for a in ckpt.architectures):
        return None
    out_name = "lm_head.weight"
    if any(n.startswith("cls.predictions.") for n in ckpt.tensors):
        out_name = "cls.predictions.decoder.weight"
    if out_name in ckpt.tensors:
        return None
    for suffix in _INPUT_EMBEDDINGS:
        hits = [n for n, (_, t) in ckpt.tensors.items() if n.endswith(suffix) and len(t.shape) == 2]
        if len(hits) == 1:
            return out_name, hits[0]
        if hits:
            return None
    return None


def _base_tensor(ckpt: CheckpointInfo, name: str) -> Any:
    """One tensor of the base checkpoint (for updates that depend on the base's values: KaSA)."""
    from safetensors import safe_open

    shard, _ = ckpt.tensors[name]
    with safe_open(str(ckpt.path / shard), framework="pt") as f:
        return f.get_tensor(name)


def _plan(
    ckpt: CheckpointInfo,
    adapters: Sequence[tuple[LoraWeights, float]],
    *,
    unmerge: bool,
    tied: tuple[str, str] | None,
    notes: list[str],
) -> dict[str, _Target]:
    """Check every adapter against the base and build the targets; raise before anything is written."""
    import torch

    base_shapes: dict[str, tuple[int, ...]] = {n: t.shape for n, (_, t) in ckpt.tensors.items()}
    base_dtypes: dict[str, str] = {n: t.dtype for n, (_, t) in ckpt.tensors.items()}
    if tied is not None:
        base_shapes[tied[0]] = base_shapes[tied[1]]
        base_dtypes[tied[0]] = base_dtypes[tied[1]]
    problems: list[str] = []
    targets: dict[str, _Target] = {}
    replaced_by: dict[str, int] = {}

    def target(name: str) -> _Target:
        if name not in targets:
            shape = base_shapes[name]
            rows = int(shape[0]) if shape else 1
            targets[name] = _Target(
                name=name,
                src=tied[1] if tied is not None and name == tied[0] else name,
                rows=rows,
                cols=math.prod(shape) // rows if rows else 0,
            )
        return targets[name]

    for idx, (weights, w) in enumerate(adapters):
        label = f"adapter {idx + 1}" + (f" ({weights.base_model})" if weights.base_model else "")
        keys = list(weights.modules) + list(weights.replacement_shapes)
        match = map_keys(keys, base_shapes)
        if not match.ok:
            problems.append(f"{label}: {describe_problems(match)}")
            continue
        clashes = (
            [
                f"{a} and {b} both match {match.mapping[a]}"
                for group in (list(weights.modules), list(weights.replacement_shapes))
                for i, a in enumerate(group)
                for b in group[i + 1 :]
                if match.mapping[a] == match.mapping[b]
            ]
            if len(match.mapping) != len(set(match.mapping.values()))
            else []
        )
        if clashes:
            problems.append(f"{label}: {'; '.join(clashes[:5])}")
            continue
        bad = non_finite(weights)
        if bad:
            more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
            problems.append(f"{label}: {bad[0].describe()}{more}; a merge with it would not be finite")
            continue
        sign = -1.0 if unmerge else 1.0
        fan_in_fan_out = bool(weights.config.get("fan_in_fan_out")) if weights.config else None
        lora_terms: list[tuple[str, _Lora]] = []
        for key, m in weights.modules.items():
            name = match.mapping[key]
            bshape = base_shapes[name]
            if m.A is None or m.B is None:
                problems.append(f"{label}: {m.module}: tensors were not loaded (read with load=True)")
                continue
            if base_dtypes[name] not in _FLOAT_CODES:
                problems.append(
                    f"{label}: {m.module}: base tensor {name} is {base_dtypes[name]}, not a float type "
                    "(quantized bases cannot be merged into; dequantize first)"
                )
                continue
            coef = sign * float(w) * float(m.scale)
            if not math.isfinite(coef):
                problems.append(
                    f"{label}: {m.module}: its scale ({m.scale}) times the weight ({w}) is not a finite number"
                )
                continue
            if m.needs_base:
                if unmerge:
                    problems.append(
                        f"{label}: {m.module} is KaSA, which removed singular components of the base "
                        "weight; they cannot be recovered from a merged one, so it cannot be unmerged"
                    )
                    continue
                if tuple(m.delta_shape) != tuple(bshape):
                    problems.append(
                        f"{label}: {name}: the KaSA update has shape {list(m.delta_shape)} but the base "
                        f"tensor is {list(bshape)}"
                    )
                    continue
                m = resolve_kasa(m, _base_tensor(ckpt, tied[1] if tied and name == tied[0] else name))
            assert m.A is not None and m.B is not None
            a = m.A.detach().to("cpu", torch.float32).reshape(m.rank, -1)
            b = m.B.detach().to("cpu", torch.float32).reshape(-1, m.rank)
            transpose = False
            try:
                if m.kind == "linear" and len(bshape) == 2:
                    transpose = needs_transpose(
                        m.key,
                        m.delta_shape,
                        bshape,
                        model_type=ckpt.model_type,
                        fan_in_fan_out=fan_in_fan_out,
                        base_key=name,
                    )
                elif m.kind == "linear" and tuple(bshape) == (*m.delta_shape, *(1,) * (len(bshape) - 2)):
                    pass  # a linear LoRA on a 1x1 conv (kohya does this for proj_in / proj_out)
                elif flat_conv_fits(m, bshape):
                    pass  # LoHa / LoKr store a conv's update as (out, in * kh * kw): the same rows
                elif tuple(m.delta_shape) != tuple(bshape):
                    raise IncompatibleAdapterError(
                        f"{name}: the adapter's {m.kind} update has shape {list(m.delta_shape)} but the base "
                        f"tensor is {list(bshape)}; the adapter was made for a different base model"
                    )
            except IncompatibleAdapterError as exc:
                problems.append(f"{label}: {exc}")
                continue
            term = _Lora(a=a, b=b, coef=coef, transpose=transpose)
            lora_terms.append((name, term))
            if m.is_dora:
                if unmerge:
                    problems.append(
                        f"{label}: {m.module} is DoRA, whose merge rescales rows by norms of the unmerged "
                        "weight, so it cannot be subtracted again; unmerge needs plain LoRA adapters"
                    )
                    continue
                if m.magnitude is None:
                    problems.append(f"{label}: {m.module}: DoRA magnitude was not loaded")
                    continue
                mag = m.magnitude.detach().to("cpu", torch.float32).reshape(-1)
                columns = transpose or m.kind == "embedding"
                want = int(bshape[1]) if columns else int(bshape[0])
                if mag.numel() != want:
                    problems.append(
                        f"{label}: {m.module}: DoRA magnitude has {mag.numel()} entries, the base weight needs {want}"
                    )
                    continue
                t = target(name)
                if t.dora is not None:
                    problems.append(
                        f"{label}: {m.module} already has a DoRA adapter from adapter {min(t.adapters) + 1}; "
                        "merging several DoRA adapters into one module is not supported (merge them one at a time)"
                    )
                    continue
                t.dora, t.magnitude, t.dora_columns = term, mag, columns
            if m.bias is not None:
                bias_name = (name[: -len(".weight")] if name.endswith(".weight") else name) + ".bias"
                if bias_name not in base_shapes:
                    problems.append(
                        f"{label}: {m.module} has a lora_B bias (lora_bias=True) but the base has no {bias_name} "
                        "to add it to; merge it into a base whose layer has a bias"
                    )
                    continue
                bvec = m.bias.detach().to("cpu", torch.float32).reshape(-1)
                if tuple(base_shapes[bias_name]) != (bvec.numel(),):
                    problems.append(
                        f"{label}: {m.module}: lora_B bias has {bvec.numel()} entries but {bias_name} is "
                        f"{list(base_shapes[bias_name])}"
                    )
                    continue
                bt = target(bias_name)
                bt.bias = coef * bvec if bt.bias is None else bt.bias + coef * bvec
                bt.adapters.add(idx)
        for name, term in lora_terms:
            t = target(name)
            t.adapters.add(idx)
            if term is t.dora:
                continue
            (t.post if t.dora is not None else t.pre).append(term)
        names_src: dict[str, str] = weights.source_names
        for key, shape in weights.replacement_shapes.items():
            name = match.mapping[key]
            is_base_layer = ".base_layer." in names_src.get(key, "")
            if unmerge:
                if is_base_layer:
                    notes.append(
                        f"{name}: the adapter's saved base layer was ignored (unmerge subtracts the LoRA)"
                    )
                    continue
                problems.append(
                    f"{label}: {name} is a full replacement (modules_to_save), which cannot be unmerged"
                )
                continue
            if tuple(shape) != tuple(base_shapes[name]):
                problems.append(
                    f"{label}: {name}: the replacement has shape {list(shape)} but the base tensor is "
                    f"{list(base_shapes[name])} (resized vocabulary?); resize the base first"
                )
                continue
            tensor = weights.replacements.get(key)
            if tensor is None:
                problems.append(f"{label}: {name}: replacement tensor was not loaded (read with load=True)")
                continue
            t = target(name)
            flat = tensor.detach().to("cpu", torch.float32).reshape(t.rows, t.cols)
            if t.replacement is not None and not torch.equal(t.replacement, flat):
                problems.append(
                    f"{label}: {name} is replaced by adapter {replaced_by[name] + 1} too, with different "
                    "values; two adapters cannot both replace one tensor (modules_to_save)"
                )
                continue
            t.replacement = flat
            replaced_by.setdefault(name, idx)
            t.adapters.add(idx)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise IncompatibleAdapterError(
            f"cannot merge into {ckpt.path}; nothing was written:\n  {shown}{more}"
        )
    return targets


# ---------------------------------------------------------------------------------------------- output


def _check_out(base: Path, out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out} already exists; choose a new output folder or remove it first")
    b, o = base.resolve(), out.resolve()
    if o == b or b in o.parents:
        raise OutputExistsError(f"{out} is inside the base checkpoint {base}; write the merge elsewhere")


def _stale(name: str) -> bool:
    return name.endswith((".safetensors", *_STALE_SUFFIXES)) or name in _STALE_NAMES


def _copy_extras(ckpt: CheckpointInfo, tmp: Path, notes: list[str], skip: set[str]) -> None:
    """Copy every file of the base folder that is not a weight file we rewrite (config, tokenizer...).

    Weights in other files (``pytorch_model.bin``, ``onnx/model.onnx``, a second ``.safetensors``) would
    be stale after the merge, so they are left out and named in the notes.
    """
    left_out: list[str] = []

    def ignore(folder: str, names: list[str]) -> list[str]:
        bad = [n for n in names if _stale(n) and not os.path.isdir(os.path.join(folder, n))]
        left_out.extend(os.path.relpath(os.path.join(folder, n), ckpt.path) for n in bad)
        return bad

    for entry in sorted(ckpt.path.iterdir()):
        name = entry.name
        if name in skip or name in ckpt.shards or name == INDEX_NAME or name == ".cache":
            continue
        if entry.is_dir():
            shutil.copytree(entry, tmp / name, ignore=ignore)
        elif _stale(name):
            left_out.append(name)
        else:
            shutil.copy2(entry, tmp / name)
    if left_out:
        notes.append(
            f"not copied (weights there would be stale after the merge): {', '.join(sorted(left_out))}"
        )


def _write_config(ckpt: CheckpointInfo, tmp: Path, *, untie: bool, dtype: str | None) -> bool:
    """Write config.json when the merge changes it; return whether it was written."""
    if not (ckpt.path / CONFIG_NAME).is_file() or not (untie or dtype):
        return False
    config = json.loads((ckpt.path / CONFIG_NAME).read_text(encoding="utf-8"))
    if untie:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict) and "tie_word_embeddings" in config["text_config"]:
            config["text_config"]["tie_word_embeddings"] = False
    if dtype:
        name = {v: k for k, v in _DTYPE_CODES.items()}[dtype]
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = name
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return True


def _build_shards(
    ckpt: CheckpointInfo,
    targets: dict[str, _Target],
    *,
    out_dtype: str | None,
    extra: dict[str, tuple[str, str]],
) -> list[_ShardPlan]:
    """The output files: per shard, its tensors in file order with their output dtype and source."""
    plans = []
    for shard in ckpt.shards:
        header = ckpt.headers[shard]
        entries = []
        names = [t.name for t in header.ordered()] + [n for n, (s, _) in extra.items() if s == shard]
        for name in names:
            src = targets[name].src if name in targets else extra[name][1] if name in extra else name
            info = ckpt.info(src)
            dt = out_dtype if (out_dtype and info.dtype in _FLOAT_CODES) else info.dtype
            entries.append(
                _Entry(
                    name=name,
                    dtype=dt,
                    shape=info.shape,
                    src_dtype=info.dtype,
                    src_offset=header.data_start + info.begin,
                    src_nbytes=info.nbytes,
                    target=targets.get(name),
                )
            )
        plans.append(
            _ShardPlan(name=shard, src=ckpt.path / shard, metadata=dict(header.metadata), entries=entries)
        )
    return plans


# ---------------------------------------------------------------------------------------------- API


def merge_checkpoint(
    base: str | os.PathLike[str],
    adapters: Sequence[tuple[LoraWeights, float] | LoraWeights],
    out: str | os.PathLike[str],
    *,
    dtype: str = "keep",
    device: str = "auto",
    unmerge: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> MergeResult:
    """Merge adapters into the base checkpoint folder ``base`` and write the result to ``out``.

    Every targeted tensor becomes ``W0 + sum_i w_i * s_i * B_i @ A_i`` (``unmerge=True`` subtracts),
    accumulated in fp32 and rounded once to the output dtype. With DoRA (one DoRA adapter per module)
    PEFT's merge is reproduced: ``m / ||W0 + d|| * (W + d)``, the norm per output feature, with adapters
    applied in list order. ``lora_bias`` terms are added into the base's ``<module>.bias``;
    ``modules_to_save`` tensors replace base tensors outright.

    Args:
        base: a checkpoint folder: ``model.safetensors`` or shards with ``model.safetensors.index.json``,
            plus ``config.json`` and any other files (all copied).
        adapters: ``(weights, w)`` pairs, weights read with ``read_adapter(path, load=True)``; a bare
            `LoraWeights` counts as weight 1.0. Weights may be negative.
        out: the folder to create; it must not exist. It appears only once complete (written beside it
            under a temporary name, then renamed); on any error nothing is left behind.
        dtype: ``keep`` (each tensor keeps its dtype), ``float32``, ``bfloat16`` or ``float16`` (all float
            tensors converted, config.json's dtype updated).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        unmerge: subtract the adapters instead (not possible for DoRA or modules_to_save).
        progress: called as ``progress(bytes_done, bytes_total)`` while writing.

    Raises:
        IncompatibleAdapterError: some adapter key matches no base tensor, several, or one of another
            shape; lists every problem, and nothing is written.
        BaseModelError: the base folder cannot be read.
        OutputExistsError: ``out`` exists.
        IncompatibleAdapterError: also when a factor, scale or weight is not finite, or a merged value
            would not be (an overflow of float16, say): every merged chunk is checked before it is
            written, and nothing is left behind.

    When the base ties its output head to the input embeddings (no ``lm_head.weight`` in the files) and
    the merge changes either, the head is written out untied and ``tie_word_embeddings`` is set false;
    `MergeResult.untied` names it.

    With several adapters, ``modules_to_save`` replacements apply first, then the LoRA terms in list
    order. Two adapters may replace one tensor only with equal values. Files written are not fsynced.
    On the CPU the work is spread over one worker thread per torch thread, each running torch
    single-threaded (``torch.set_num_threads(1)`` for the duration of the call, then restored). On a GPU
    the products are fp32 matmuls and follow torch's precision settings: leave TF32 off (the default).
    """
    t0 = time.perf_counter()
    out_dtype = _resolve_dtype(dtype)
    base_path, out_path = Path(base), Path(out)
    ckpt = read_checkpoint(base_path)
    _check_out(base_path, out_path)
    pairs: list[tuple[LoraWeights, float]] = [
        (a, 1.0) if isinstance(a, LoraWeights) else (a[0], float(a[1])) for a in adapters
    ]
    if not pairs:
        raise InvalidOptionError("no adapters given; pass a list of (LoraWeights, weight) pairs")
    for w, _ in pairs:
        if not isinstance(w, LoraWeights):
            raise TypeError(
                f"adapters must be LoraWeights (from read_adapter(..., load=True)), got {type(w).__name__}"
            )
    notes: list[str] = []
    tied = _find_tied(ckpt)
    targets = _plan(ckpt, pairs, unmerge=unmerge, tied=tied, notes=notes)

    untied: list[str] = []
    extra: dict[str, tuple[str, str]] = {}  # new tensor name -> (shard, source tensor)
    if tied is not None and (tied[0] in targets or tied[1] in targets):
        head, emb = tied
        extra[head] = (ckpt.shard_of(emb), emb)
        untied.append(head)
        what = " and ".join(n for n in (emb, head) if n in targets)
        notes.append(
            f"{head} was tied to {emb}; the merge changes {what}, so {head} was written untied and "
            "tie_word_embeddings set false"
        )
    targets = {n: t for n, t in targets.items() if not t.is_identity}

    import torch

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidOptionError(f"device {device!r} was asked for but torch sees no CUDA device")
    plans = _build_shards(ckpt, targets, out_dtype=out_dtype, extra=extra)
    if out_dtype:
        notes.append(f"float tensors converted to {dtype}")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        written = _write_shards(plans, tmp, device=dev, progress=progress)
        index = ckpt.index
        if index is not None:
            new_index = dict(index)
            weight_map = dict(index["weight_map"])
            for name, (shard, _) in extra.items():
                weight_map[name] = shard
            meta = dict(index.get("metadata") or {})
            meta["total_size"] = sum(e.out_nbytes for p in plans for e in p.entries)
            new_index["metadata"], new_index["weight_map"] = meta, weight_map
            (tmp / INDEX_NAME).write_text(json.dumps(new_index, indent=2) + "\n", encoding="utf-8")
        wrote_config = _write_config(ckpt, tmp, untie=bool(untied), dtype=out_dtype)
        _copy_extras(ckpt, tmp, notes, skip={CONFIG_NAME} if wrote_config else set())
        if out_path.exists():  # an empty folder: os.replace needs it gone
            out_path.rmdir()
        os.replace(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    changed = len(set(targets) | set(untied))
    logger.info(
        "merged %d adapter(s) into %s: %d tensors changed, %.1f MB in %.2f s on %s",
        len(pairs),
        out_path,
        changed,
        written / 1e6,
        seconds,
        dev,
    )
    return MergeResult(
        out=out_path,
        tensors_changed=changed,
        bytes_written=written,
        seconds=seconds,
        device=str(dev),
        untied=untied,
        notes=notes,
    )
