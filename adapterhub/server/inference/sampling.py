"""What a request asks of generation (`Sampling`) and how the scheduler turns a step's logits into each
row's next token: ``logit_bias``, ``repetition_penalty`` (over prompt and output, as vLLM and
transformers), ``presence_penalty`` / ``frequency_penalty`` (over the output, as OpenAI), then greedy
(temperature below `GREEDY_BELOW`) or ``temperature``, ``top_k``, ``min_p``, ``top_p`` and a seeded draw.

Log-probabilities reported to clients are ``log_softmax`` of the model's raw logits in fp32 (before any
of the above), as vLLM reports them by default: ``(token, logprob, [(token, logprob), ...top n])``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: a temperature below this is greedy decoding (as vLLM: dividing by it would overflow)
GREEDY_BELOW = 1e-5

#: one token's log-probability and the top alternatives at its position
Logprob = tuple[int, float, list[tuple[int, float]]]


@dataclass(frozen=True)
class Sampling:
    """What a request asks of generation."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: None: no log-probabilities; n: each generated token's, with its top n alternatives
    logprobs: int | None = None
    #: the prompt's log-probabilities too (completions' ``echo`` with ``logprobs``)
    prompt_logprobs: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def shaped(self) -> bool:
        """Whether the logits change before the pick (penalties or bias)."""
        return bool(
            self.logit_bias or self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
        )


def shape(row: torch.Tensor, s: Sampling, prompt: Sequence[int], generated: Sequence[int]) -> torch.Tensor:
    """``row`` (fp32 logits of one position) after ``s``'s bias and penalties."""
    row = row.clone()
    if s.logit_bias:
        ids = torch.tensor([i for i, _ in s.logit_bias], device=row.device)
        row[ids] += torch.tensor([b for _, b in s.logit_bias], device=row.device, dtype=row.dtype)
    if s.repetition_penalty != 1 and (prompt or generated):
        seen = torch.tensor(sorted(set(prompt) | set(generated)), device=row.device)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / s.repetition_penalty, vals * s.repetition_penalty)
    if (s.presence_penalty or s.frequency_penalty) and generated:
        ids, counts = torch.tensor(list(generated), device=row.device).unique(return_counts=True)
        row[ids] -= s.frequency_penalty * counts.to(row.dtype) + s.presence_penalty
    return row


def draw(row: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> int:
    """One token from shaped logits ``row`` under ``s`` (greedy, or temperature/top_k/min_p/top_p)."""
    if s.greedy:
        return int(row.argmax())
    row = row / s.temperature
    if s.top_k > 0 and s.top_k < row.numel():
        kth = torch.topk(row, s.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if s.min_p > 0:
        probs = row.softmax(-1)
        row = row.masked_fill(probs < s.min_p * probs.max(), float("-inf"))
    if s.top_p < 1.0:
        order = torch.sort(row, descending=False)
        cum = order.values.softmax(-1).cumsum(-1)
        drop = cum <= 1 - s.top_p
        drop[-1] = False
        row = row.clone()
        row[order.indices[drop]] = float("-inf")
    probs = row.softmax(-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return int(row.argmax())  # nothing finite left to draw from
    return int(torch.multinomial(probs, 1, generator=gen)[0])


def pick(logits: torch.Tensor, jobs: Sequence[Any]) -> tuple[torch.Tensor, list[Logprob | None]]:
    """Each row's next token (``logits`` (B, V) fp32, one row per job), and each job's `Logprob` record
    when it asked for log-probabilities."""
    nxt = logits.argmax(-1)
    records: list[Logprob | None] = [None] * len(jobs)
    want = [i for i, j in enumerate(jobs) if j.sampling.logprobs is not None]
    lps = torch.log_softmax(logits[want], -1) if want else None
    for i, j in enumerate(jobs):
        s: Sampling = j.sampling
        matcher = getattr(j, "matcher", None)
        if s.greedy and not s.shaped and matcher is None:
            continue
        row = logits[i]
        if matcher is not None:
            from .grammar import mask

            row = mask(row, matcher)
        row = shape(row, s, j.prompt, j.generated) if s.shaped else row
        nxt[i] = draw(row, s, j.gen)
        if matcher is not None:
            from .grammar import advance

            j.grammar_done = advance(matcher, int(nxt[i]))
    if lps is not None:
        chosen = nxt.tolist()
        for k, i in enumerate(want):
            records[i] = record(lps[k], chosen[i], jobs[i].sampling.logprobs)
    return nxt, records


def record(lp: torch.Tensor, token: int, top: int) -> Logprob:
    """``token``'s log-probability in ``lp`` (one position's log_softmax) and the ``top`` best."""
    alts: list[tuple[int, float]] = []
    if top > 0:
        vals, ids = torch.topk(lp, min(top, lp.numel()))
        alts = list(zip(ids.tolist(), vals.tolist(), strict=True))
    return token, float(lp[token]), alts


def stop_prefix(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def stop_at(text: str, stop: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """What ``generate`` stops at: the generation config's end tokens, else the tokenizer's."""
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            return {value}
        if isinstance(value, (list, tuple)) and value:
            return {int(v) for v in value}
    return set()
