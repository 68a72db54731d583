"""Supervised fine-tuning of a new LoRA adapter on a cataloged base: `train` (``adapterhub train``).

Data is JSONL, one example a line, in one of three shapes (the first line decides; every line must match):

- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the base's chat template; the loss
  is on the assistant turns only (their text and the end-of-turn marker the template puts after them);
- ``{"prompt": ..., "completion": ...}``: prompt and completion joined, loss on the completion (and EOS);
- ``{"text": ...}``: loss on every token (and EOS).

Everything is checked before the model is loaded: a malformed line, an empty file, unknown keys, a row
with nothing to learn from or longer than ``max_length`` tokens is one `InvalidOptionError` naming the
line. Training is AdamW on the factors only (constant learning rate, no weight decay), batches shuffled
with the seed; the adapter reaches the catalog only after the last step, through `Library.ingest` with a
lineage row (``method: train``; base fingerprint, data sha256, steps, final loss, seed). An interrupted
run (Ctrl-C) catalogs nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AdapterExistsError, BaseModelError, InvalidOptionError, TrainingDataError
from ..names import check_name, check_tags
from .bases import base_dir

if TYPE_CHECKING:
    from ..catalog.library import Library
    from ..records import AdapterInfo

__all__ = ["TrainResult", "encode_rows", "read_rows", "train"]

SHAPES: dict[str, frozenset[str]] = {
    "messages": frozenset({"messages"}),
    "prompt": frozenset({"prompt", "completion"}),
    "text": frozenset({"text"}),
}
ROLES = frozenset({"system", "user", "assistant", "tool"})

#: on_step(step, total_steps, running_loss)
StepCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class TrainResult:
    """A trained adapter, cataloged, and how its training went."""

    adapter: AdapterInfo
    steps: int
    epochs: float
    first_loss: float
    last_loss: float
    trainable_params: int
    total_params: int
    seconds: float
    tokens: int  # tokens through the model (padding excluded), summed over steps
    examples: int
    data_sha256: str
    device: str
    losses: tuple[float, ...] = field(default=(), repr=False)

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter.to_dict(),
            "steps": self.steps,
            "epochs": self.epochs,
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "trainable_share": self.trainable_share,
            "seconds": self.seconds,
            "tokens": self.tokens,
            "tokens_per_second": self.tokens_per_second,
            "examples": self.examples,
            "data_sha256": self.data_sha256,
            "device": self.device,
            "losses": list(self.losses),
        }


# ------------------------------------------------------------------ data
def _bad(path: Path, line: int, why: str) -> TrainingDataError:
    return TrainingDataError(f"{path}, line {line}: {why}", path=str(path), line=line)


def read_rows(path: str | os.PathLike[str]) -> tuple[list[tuple[int, dict[str, Any]]], str, str]:
    """((line number, row) for every non-blank line, the shape, the file's sha256); checked throughout."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise InvalidOptionError(f"cannot read training data {p}: {exc.strerror or exc}") from None
    rows: list[tuple[int, dict[str, Any]]] = []
    shape: str | None = None
    for n, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _bad(p, n, f"not valid JSON ({exc})") from None
        if not isinstance(row, dict):
            raise _bad(p, n, f"each line must be a JSON object, got {type(row).__name__}")
        keys = frozenset(row)
        kind = next((k for k, ks in SHAPES.items() if keys == ks), None)
        if kind is None:
            unknown = sorted(keys - {k for ks in SHAPES.values() for k in ks})
            what = (
                f"unknown keys {', '.join(unknown)}"
                if unknown
                else f"keys {', '.join(sorted(keys)) or '(none)'}"
            )
            raise _bad(
                p, n, f'{what}; a row is {{"messages": [...]}}, {{"prompt", "completion"}} or {{"text"}}'
            )
        if shape is not None and kind != shape:
            raise _bad(p, n, f"a {kind!r} row in a file of {shape!r} rows; use one shape per file")
        shape = kind
        _check_row(p, n, kind, row)
        rows.append((n, row))
    if not rows or shape is None:
        raise InvalidOptionError(f"{p} holds no training examples (one JSON object per line)")
    return rows, shape, hashlib.sha256(raw).hexdigest()


def _check_row(p: Path, n: int, kind: str, row: dict[str, Any]) -> None:
    if kind == "messages":
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise _bad(p, n, "messages must be a non-empty list of {role, content} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or set(m) - {"role", "content"} or not {"role", "content"} <= set(m):
                raise _bad(p, n, f"message {i} must be an object with exactly role and content")
            if m["role"] not in ROLES or not isinstance(m["content"], str):
                raise _bad(p, n, f"message {i}: role must be one of {', '.join(sorted(ROLES))}, content text")
        if not any(m["role"] == "assistant" for m in msgs):
            raise _bad(p, n, "no assistant message: nothing to learn from")
    else:
        for k, v in row.items():
            if not isinstance(v, str):
                raise _bad(p, n, f"{k} must be text, got {type(v).__name__}")
        if not (row.get("completion") if kind == "prompt" else row.get("text")):
            raise _bad(p, n, "empty completion: nothing to learn from" if kind == "prompt" else "empty text")


def _offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
    return list(enc["input_ids"]), (list(map(tuple, enc["offset_mapping"])) if tokenizer.is_fast else None)


def _encode_spans(tokenizer: Any, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and labels: the id where a token starts inside one of ``spans``, else -100."""
    ids, offsets = _offsets(tokenizer, text)
    if offsets is None:  # a slow tokenizer: tokenize the pieces one after another
        labels: list[int] = []
        ids, at = [], 0
        for a, b in [*spans, (len(text), len(text))]:
            for piece, learn in ((text[at:a], False), (text[a:b], True)):
                if piece:
                    t = tokenizer(piece, add_special_tokens=False)["input_ids"]
                    ids += t
                    labels += t if learn else [-100] * len(t)
            at = b
        return ids, labels
    labels = [
        i if any(a <= s < b for a, b in spans) else -100 for i, (s, _) in zip(ids, offsets, strict=True)
    ]
    return ids, labels


def _encode(tokenizer: Any, kind: str, row: dict[str, Any]) -> tuple[list[int], list[int]]:
    eos = tokenizer.eos_token or ""
    if kind == "messages":
        msgs = row["messages"]
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = (
                tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
                if i
                else ""
            )
            upto = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
            if not full.startswith(upto) or not upto.startswith(before):
                raise InvalidOptionError(
                    "the base's chat template does not render conversations turn by turn; use prompt/completion rows"
                )
            spans.append((len(before), len(upto)))
        return _encode_spans(tokenizer, full, spans)
    if kind == "prompt":
        text = row["prompt"] + row["completion"] + eos
        return _encode_spans(tokenizer, text, [(len(row["prompt"]), len(text))])
    text = row["text"] + eos
    return _encode_spans(tokenizer, text, [(0, len(text))])


def encode_rows(
    tokenizer: Any, rows: Sequence[tuple[int, dict[str, Any]]], kind: str, *, max_length: int, path: Path
) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per row; a row over ``max_length`` tokens or without a label is refused."""
    if getattr(tokenizer, "bos_token_id", None) is not None and kind != "messages":
        bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    else:
        bos = []
    out = []
    for n, row in rows:
        ids, labels = _encode(tokenizer, kind, row)
        ids, labels = bos + ids, [-100] * len(bos) + labels
        if len(ids) > max_length:
            raise _bad(
                path, n, f"{len(ids)} tokens, over --max-length {max_length}; shorten it or raise the limit"
            )
        if sum(1 for x in labels[1:] if x != -100) == 0:
            raise _bad(path, n, "no token to learn from after tokenization")
        out.append((ids, labels))
    return out


def _adds_bos(tokenizer: Any) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(n))
            rng.shuffle(fresh)
            order += fresh
        out.append(order[:batch_size])
        del order[:batch_size]
    return out


# ------------------------------------------------------------------ training
def train(
    lib: Library,
    base: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    name: str,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] | str = ("q_proj", "v_proj"),
    steps: int | None = None,
    epochs: float | None = None,
    lr: float = 2e-4,
    batch_size: int = 4,
    max_length: int = 512,
    init: str = "kaiming",
    seed: int = 0,
    device: str | None = None,
    tags: Sequence[str] = (),
    description: str | None = None,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Train a new adapter ``name`` on ``base`` (a registered base or a checkpoint folder) and catalog it."""
    import torch

    from .running import attach, is_causal_lm, load_base, pick_device, registered_base

    check_name(name)
    tags = check_tags(tags)
    if lib.exists(name):
        raise AdapterExistsError(name)
    if steps is not None and epochs is not None:
        raise InvalidOptionError("give --steps or --epochs, not both")
    for what, v in (("batch size", batch_size), ("max length", max_length), ("steps", steps or 1)):
        if v < 1:
            raise InvalidOptionError(f"{what} must be at least 1, got {v}")
    if epochs is not None and not epochs > 0:
        raise InvalidOptionError(f"epochs must be positive, got {epochs}")
    if not (math.isfinite(lr) and lr > 0):
        raise InvalidOptionError(f"learning rate must be a positive number, got {lr}")
    path = Path(data)
    rows, kind, digest = read_rows(path)
    folder = base_dir(lib, base)
    if not is_causal_lm(folder):
        raise BaseModelError(f"{base} is not a causal LM; adapterhub train fine-tunes causal LMs")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise BaseModelError(
            f"transformers cannot load the tokenizer of {folder}: {str(exc).splitlines()[0]}"
        ) from None
    encoded = encode_rows(
        tokenizer, rows, kind, max_length=max_length, path=path
    )  # all checked before loading
    dev = pick_device(device)
    model, _ = load_base(lib, base, device=dev, dtype="auto" if dev.startswith("cuda") else "float32")
    per_epoch = math.ceil(len(encoded) / batch_size)
    total = steps if steps is not None else max(1, round((epochs or 1.0) * per_epoch))
    info = registered_base(lib, model)
    rt = attach(lib, model, base=info.name if info else None)
    try:
        ad = rt.create(name, rank=rank, alpha=alpha, targets=targets, init=init, seed=seed)
        total_params = sum(p.numel() for p in model.parameters()) + ad.num_params
        opt = torch.optim.AdamW(ad.parameters(), lr=lr, weight_decay=0.0)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        model.train()
        torch.manual_seed(seed)
        losses: list[float] = []
        tokens = 0
        start = time.perf_counter()
        for step, idx in enumerate(_batches(len(encoded), min(batch_size, len(encoded)), total, seed), 1):
            batch = [encoded[i] for i in idx]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (i, lab) in enumerate(batch):
                ids[r, : len(i)] = torch.tensor(i)
                labels[r, : len(lab)] = torch.tensor(lab)
                mask[r, : len(i)] = 1
            out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev))
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = float(out.loss.detach())
            if not math.isfinite(loss):
                raise InvalidOptionError(f"the loss became {loss} at step {step}; lower --lr")
            losses.append(loss)
            tokens += int(mask.sum())
            if on_step is not None:
                on_step(step, total, sum(losses[-10:]) / len(losses[-10:]))
        seconds = time.perf_counter() - start
        model.eval()
        ad.lineage.update(steps=total, loss=losses[-1], first_loss=losses[0], data_sha256=digest,
                          lr=lr, batch_size=batch_size, examples=len(encoded), data=str(path.name))  # fmt: skip
        adapter = rt.save(name, tags=tags, description=description)
        return TrainResult(
            adapter=adapter, steps=total, epochs=total * min(batch_size, len(encoded)) / len(encoded),
            first_loss=losses[0], last_loss=losses[-1], trainable_params=ad.num_params,
            total_params=total_params, seconds=seconds, tokens=tokens, examples=len(encoded),
            data_sha256=digest, device=dev, losses=tuple(losses),
        )  # fmt: skip
    finally:
        rt.detach()
