"""Scoring rows on a live model: evaluation data, metrics, and one pass over every adapter's rows.

Data is JSONL in the shapes `train` reads (``messages``, with ``tools`` and ``tool_calls`` too,
``prompt``/``completion``, ``text``) or multiple-choice rows ``{"prompt": ..., "choices": [...], "answer":
index or choice text}``. A ``messages`` row is prompted as the server prompts that history (with its
tools); its reference answer for the generation metrics is its last assistant turn's text (a row whose
last assistant turn is a tool call has none: score it with ``loss`` or ``perplexity``).

Metrics (`parse_metric`):

- ``loss``: mean negative log-likelihood of the answer tokens (teacher-forced; the tokens `train` learns
  from: the completion and EOS, the assistant turns, every token of a text row, the right choice of a
  multiple-choice row), summed over all rows and divided by their count of answer tokens;
- ``perplexity``: ``exp(loss)``;
- ``exact``, ``contains``: greedy generation (at most ``max_tokens`` new tokens, ending at EOS) compared
  with the reference answer after whitespace and case normalization: equal, or holding it;
- ``regex:PATTERN``: the share of generations in which ``re.search(PATTERN)`` finds a match;
- ``choice``: multiple-choice accuracy by the log-likelihood of each choice given the prompt, as
  lm-evaluation-harness's ``acc`` scores it (the prompt's trailing whitespace moves to the choice, the
  tokenizer's own BOS, the sum of the choice tokens' log-probabilities, the highest wins).

`score` runs every subject (None for the base, a resident name, or a ``{name: weight}`` combination)
over the same rows through the runtime's per-row adapters (``rt.rows``): the rows of all subjects share
each batch, so N adapters cost one pass over N times the rows instead of N passes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidOptionError, TrainingDataError

if TYPE_CHECKING:
    from ..runtime import AdapterSpec, Runtime

__all__ = [
    "EvalData",
    "GENERATION_METRICS",
    "METRICS",
    "encode_choice",
    "loss_sequences",
    "normalize",
    "parse_metric",
    "read_eval_data",
    "score",
]

METRICS = ("loss", "perplexity", "exact", "contains", "regex:PATTERN", "choice")
GENERATION_METRICS = ("exact", "contains")
#: tokens of one forward batch (padding included): bounds the logits (tokens x vocabulary floats)
BATCH_TOKENS = 2048


def parse_metric(metric: str) -> str:
    """The metric's canonical name; ``regex:PATTERN`` is checked to compile."""
    m = metric.strip()
    if m in ("loss", "perplexity", "exact", "contains", "choice"):
        return m
    if m.startswith("regex:"):
        pattern = m[len("regex:") :]
        if not pattern:
            raise InvalidOptionError("regex: needs a pattern, e.g. regex:^\\d+$")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise InvalidOptionError(f"metric {metric!r}: not a valid regular expression ({exc})") from None
        return m
    raise InvalidOptionError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")


def lower_is_better(metric: str) -> bool:
    return metric in ("loss", "perplexity")


def normalize(text: str) -> str:
    """Whitespace collapsed and stripped, lowercased: what ``exact`` and ``contains`` compare."""
    return " ".join(text.split()).lower()


@dataclass(frozen=True)
class EvalData:
    """Rows read from an evaluation file: ``(line, row)`` pairs, their shape, the file's sha256."""

    path: Path
    rows: tuple[tuple[int, dict[str, Any]], ...]
    kind: str  # messages, prompt, text or choice
    sha256: str
    name: str = field(default="")

    def __len__(self) -> int:
        return len(self.rows)


def _bad(path: Path, line: int, why: str) -> TrainingDataError:
    return TrainingDataError(f"{path}, line {line}: {why}", path=str(path), line=line)


def read_eval_data(
    path: str | os.PathLike[str], *, limit: int | None = None, name: str | None = None
) -> EvalData:
    """Read and check an evaluation file; the first ``limit`` rows when given."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise InvalidOptionError(f"cannot read evaluation data {p}: {exc.strerror or exc}") from None
    first = next((ln for ln in raw.split(b"\n") if ln.strip()), b"")
    try:
        head = json.loads(first) if first else None
    except (ValueError, UnicodeDecodeError):
        head = None
    if isinstance(head, dict) and "choices" in head:
        rows, kind = _read_choices(p, raw), "choice"
    else:
        from .train_data import read_rows

        read, kind, _ = read_rows(p)
        rows = list(read)
    if limit is not None:
        if limit < 1:
            raise InvalidOptionError(f"limit must be at least 1, got {limit}")
        rows = rows[:limit]
    digest = hashlib.sha256(raw).hexdigest()
    stem = name or (p.name.removesuffix(".jsonl").removesuffix(".json") or p.name)
    return EvalData(path=p, rows=tuple(rows), kind=kind, sha256=digest, name=stem)


def _read_choices(p: Path, raw: bytes) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for n, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _bad(p, n, f"not valid JSON ({exc})") from None
        if not isinstance(row, dict) or set(row) != {"prompt", "choices", "answer"}:
            raise _bad(p, n, 'a multiple-choice row is {"prompt": ..., "choices": [...], "answer": ...}')
        prompt, choices, answer = row["prompt"], row["choices"], row["answer"]
        if not isinstance(prompt, str) or not prompt:
            raise _bad(p, n, "prompt must be non-empty text")
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise _bad(p, n, "choices must be a list of at least two non-empty texts")
        if isinstance(answer, str):
            if answer not in choices:
                raise _bad(p, n, f"answer {answer!r} is not one of the choices")
            answer = choices.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise _bad(p, n, f"answer must be a choice's index (0 to {len(choices) - 1}) or its text")
        rows.append((n, {"prompt": prompt, "choices": choices, "answer": answer}))
    if not rows:
        raise InvalidOptionError(f"{p} holds no evaluation rows (one JSON object per line)")
    return rows


# ------------------------------------------------------------------ encoding
def encode_choice(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness's HF model encodes a loglikelihood
    request: trailing whitespace of the context moves to the continuation; the pair is encoded whole
    and the context's own encoding is cut off its front; the tokenizer's own special tokens (its BOS)
    unless the text starts with the BOS already."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    bos = getattr(tokenizer, "bos_token", None)
    special = not (bos and context.startswith(bos))
    whole = list(tokenizer(context + continuation, add_special_tokens=special)["input_ids"])
    ctx = list(tokenizer(context, add_special_tokens=special)["input_ids"])
    return ctx, whole[len(ctx) :]


@dataclass
class _Seq:
    """One sequence to score: the sum of log-probabilities of ``ids[i]`` for every i in ``targets``."""

    ids: list[int]
    start: int  # targets are ids[start:]... unless ``mask`` says otherwise
    mask: list[bool] | None = None  # per position of ids: is it a target


def loss_sequences(tokenizer: Any, data: EvalData, max_length: int) -> list[_Seq]:
    """Per row, the sequence whose answer tokens ``loss`` scores (the right choice of a choice row)."""
    if data.kind == "choice":
        out = []
        for _, row in data.rows:
            ctx, cont = encode_choice(tokenizer, row["prompt"], row["choices"][row["answer"]])
            out.append(_Seq(ctx + cont, len(ctx)))
        return out
    from .train_data import encode_rows

    enc = encode_rows(tokenizer, list(data.rows), data.kind, max_length=max_length, path=data.path)
    return [_Seq(ids, 1, [lab != -100 for lab in labels]) for ids, labels in enc]


def _choice_seqs(tokenizer: Any, data: EvalData) -> tuple[list[_Seq], list[tuple[int, int, int]]]:
    """Every (row, choice) pair as a sequence, and per row (first sequence, count, answer)."""
    seqs: list[_Seq] = []
    spans = []
    for _, row in data.rows:
        spans.append((len(seqs), len(row["choices"]), row["answer"]))
        for choice in row["choices"]:
            ctx, cont = encode_choice(tokenizer, row["prompt"], choice)
            if not ctx:
                bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
                ctx = [bos]
            seqs.append(_Seq(ctx + cont, len(ctx)))
    return seqs, spans


def _prompts(tokenizer: Any, data: EvalData) -> list[tuple[list[int], str]]:
    """(prompt ids, reference answer) per row, for the generation metrics."""
    out: list[tuple[list[int], str]] = []
    first = tokenizer("a")["input_ids"]
    bos_id = getattr(tokenizer, "bos_token_id", None)
    bos = [bos_id] if bos_id is not None and first and first[0] == bos_id else []
    for n, row in data.rows:
        if data.kind == "text":
            raise InvalidOptionError(
                f"{data.path}: text rows have no reference answer; use loss or perplexity, or prompt/completion rows"
            )
        if data.kind == "messages":
            from ..runtime.chat import chat_prompt
            from .train_data import chat_row

            msgs, tools = chat_row(row)
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            if msgs[last].get("tool_calls"):
                raise InvalidOptionError(
                    f"{data.path}, line {n}: the answer is a tool call, which has no reference text; use loss or perplexity"
                )
            out.append((chat_prompt(tokenizer, msgs[:last], tools), msgs[last]["content"]))
            continue
        ref = row["completion"] if data.kind == "prompt" else row["choices"][row["answer"]]
        out.append((bos + list(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]), ref))
        continue
    return out


# ------------------------------------------------------------------ the pass
def _logprob_sums(
    model: Any, rt: Runtime, specs: Sequence[AdapterSpec], seqs: Sequence[_Seq], pad: int, batch_tokens: int
) -> list[list[tuple[float, int, bool]]]:
    """Per subject, per sequence: (sum of target log-probs, number of targets, all targets greedy)."""
    import inspect

    import torch

    device = next(model.parameters()).device
    trim = "logits_to_keep" in inspect.signature(model.forward).parameters
    jobs = sorted(
        ((s, q) for s in range(len(specs)) for q in range(len(seqs))), key=lambda j: -len(seqs[j[1]].ids)
    )
    out: list[list[tuple[float, int, bool]]] = [[(0.0, 0, True)] * len(seqs) for _ in specs]
    at = 0
    while at < len(jobs):
        width = len(seqs[jobs[at][1]].ids)
        take = max(1, batch_tokens // max(width, 1))
        batch = jobs[at : at + take]
        at += len(batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        wanted: dict[int, list[int]] = {}
        for r, (_, q) in enumerate(batch):
            seq = seqs[q]
            ids[r, : len(seq.ids)] = torch.tensor(seq.ids)
            mask[r, : len(seq.ids)] = 1
            wanted[q] = [i for i in range(max(seq.start, 1), len(seq.ids)) if seq.mask is None or seq.mask[i]]
        # logits only where a target is predicted (the lm_head over the whole vocabulary is costly)
        keep = sorted({i - 1 for pos in wanted.values() for i in pos})
        column = {p: c for c, p in enumerate(keep)} if trim else {p: p for p in range(width)}
        extra = {"logits_to_keep": torch.tensor(keep, device=device)} if trim and keep else {}
        with torch.no_grad(), rt.rows([specs[s] for s, _ in batch]):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **extra).logits
        for r, (s, q) in enumerate(batch):
            seq, pos = seqs[q], wanted[q]
            if not pos:
                continue
            idx = torch.tensor([column[i - 1] for i in pos], device=logits.device)
            rows = logits[r, idx].float()
            targets = torch.tensor([seq.ids[i] for i in pos], device=logits.device)
            lp = torch.log_softmax(rows, dim=-1).gather(1, targets[:, None])[:, 0]
            greedy = bool((rows.argmax(-1) == targets).all())
            out[s][q] = (float(lp.double().sum()), len(pos), greedy)
        del logits
    return out


def _generate(
    model: Any,
    tokenizer: Any,
    rt: Runtime,
    specs: Sequence[AdapterSpec],
    prompts: Sequence[list[int]],
    max_tokens: int,
    batch_tokens: int,
) -> list[list[str]]:
    """Greedy generations per subject, per prompt. Prompts of one length share a batch (no padding)."""
    import torch

    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    out = [[""] * len(prompts) for _ in specs]
    by_len: dict[int, list[int]] = {}
    for q, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(q)
    for width, qs in sorted(by_len.items()):
        jobs = [(s, q) for q in qs for s in range(len(specs))]
        take = max(1, batch_tokens // (width + max_tokens))
        for at in range(0, len(jobs), take):
            batch = jobs[at : at + take]
            ids = torch.tensor([prompts[q] for _, q in batch], device=device)
            with torch.no_grad(), rt.rows([specs[s] for s, _ in batch]):
                gen = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=pad,
                    eos_token_id=eos or None,
                )
            for r, (s, q) in enumerate(batch):
                new = gen[r, width:].tolist()
                cut = next((i for i, t in enumerate(new) if t in eos), len(new))
                out[s][q] = tokenizer.decode(new[:cut], skip_special_tokens=True)
    return out


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    found: list[int] = []
    cfg = getattr(model, "generation_config", None)
    for v in (getattr(cfg, "eos_token_id", None), tokenizer.eos_token_id):
        for t in v if isinstance(v, list | tuple) else [v]:
            if t is not None and int(t) not in found:
                found.append(int(t))
    return found


def score(
    model: Any,
    tokenizer: Any,
    rt: Runtime,
    subjects: Sequence[AdapterSpec],
    data: EvalData,
    metrics: Sequence[str],
    *,
    max_tokens: int = 64,
    max_length: int = 2048,
    batch_tokens: int = BATCH_TOKENS,
) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """Every metric for every subject on ``data``: ``[{metric: value} per subject]`` and details
    (``generations``: per subject, per row, when a generation metric was asked for)."""
    metrics = [parse_metric(m) for m in metrics]
    if not metrics:
        raise InvalidOptionError("give at least one metric")
    if max_tokens < 1 or batch_tokens < 1:
        raise InvalidOptionError("max tokens and batch tokens must be at least 1")
    if "choice" in metrics and data.kind != "choice":
        raise InvalidOptionError(
            f"the choice metric needs multiple-choice rows (prompt, choices, answer); {data.path} holds {data.kind} rows"
        )
    results: list[dict[str, float]] = [{} for _ in subjects]
    details: dict[str, Any] = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if {"loss", "perplexity"} & set(metrics):
        seqs = loss_sequences(tokenizer, data, max_length)
        sums = _logprob_sums(model, rt, subjects, seqs, pad, batch_tokens)
        for s, per in enumerate(sums):
            total, count = sum(x[0] for x in per), sum(x[1] for x in per)
            loss = -total / count if count else math.nan
            if "loss" in metrics:
                results[s]["loss"] = loss
            if "perplexity" in metrics:
                results[s]["perplexity"] = math.exp(loss) if loss < 700 else math.inf
    if "choice" in metrics:
        seqs, spans = _choice_seqs(tokenizer, data)
        sums = _logprob_sums(model, rt, subjects, seqs, pad, batch_tokens)
        picks: list[list[int]] = []
        for s, per in enumerate(sums):
            got = [_argmax([per[a + c][0] for c in range(n)]) for a, n, _ in spans]
            picks.append(got)
            results[s]["choice"] = sum(g == ans for g, (_, _, ans) in zip(got, spans, strict=True)) / len(
                spans
            )
        details["choice_logprobs"] = [[x[0] for x in per] for per in sums]
        details["picks"] = picks
    gen_metrics = [m for m in metrics if m in GENERATION_METRICS or m.startswith("regex:")]
    if gen_metrics:
        prompts = _prompts(tokenizer, data)
        texts = _generate(model, tokenizer, rt, subjects, [p for p, _ in prompts], max_tokens, batch_tokens)
        details["generations"] = texts
        for s, outs in enumerate(texts):
            for m in gen_metrics:
                hits = [_hit(m, o, ref) for o, (_, ref) in zip(outs, prompts, strict=True)]
                results[s][m] = sum(hits) / len(hits)
    return results, details


def _argmax(values: Sequence[float]) -> int:
    """The first index of the largest value (numpy's argmax, which lm-eval uses)."""
    return max(range(len(values)), key=values.__getitem__)


def _hit(metric: str, output: str, reference: str) -> bool:
    if metric == "exact":
        return normalize(output) == normalize(reference)
    if metric == "contains":
        return normalize(reference) in normalize(output)
    return re.search(metric[len("regex:") :], output) is not None


def subject_label(spec: AdapterSpec) -> str:
    """``base``, a name, or ``a:0.7+b:0.3`` for a combination."""
    if spec is None:
        return "base"
    if isinstance(spec, str):
        return spec
    return "+".join(f"{n}:{w:g}" for n, w in spec.items())


def parse_combination(text: str) -> dict[str, float]:
    """``a:0.7+b:0.3`` -> ``{"a": 0.7, "b": 0.3}``."""
    out: dict[str, float] = {}
    for part in text.split("+"):
        name, sep, w = part.strip().rpartition(":")
        if not sep or not name:
            raise InvalidOptionError(
                f"combination {text!r}: write it as NAME:WEIGHT+NAME:WEIGHT, e.g. a:0.7+b:0.3"
            )
        try:
            weight = float(w)
        except ValueError:
            raise InvalidOptionError(f"combination {text!r}: {w!r} is not a number") from None
        if not math.isfinite(weight):
            raise InvalidOptionError(f"combination {text!r}: weights must be finite")
        if name in out:
            raise InvalidOptionError(f"combination {text!r}: {name} is given twice")
        out[name] = weight
    return out


def combination_of(spec: Mapping[str, float]) -> str:
    return subject_label(dict(spec))
