"""Text generation and embeddings on a live model (torch + transformers only): what `adapterhub run` and
the OpenAI-compatible server call, with whatever adapters the runtime has active."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..errors import InvalidOptionError
from ..records import Generation
from .chat import chat_ids as chat_ids  # where it was; it lives in chat (no torch)


def generate(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """Greedy (``temperature`` 0) or sampled generation from ``prompt_ids``; ``on_text`` gets the text
    as it is produced. Stop strings end the text before them."""
    if max_tokens < 1:
        raise InvalidOptionError(f"max_tokens must be at least 1, got {max_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise InvalidOptionError("temperature must be >= 0 and top_p in (0, 1]")
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], device=device)
    kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "pad_token_id": _pad_id(tokenizer)}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if seed is not None:
        torch.manual_seed(seed)
    pieces: list[str] = []
    texts = _stream(model, tokenizer, ids, kwargs)
    produced = 0
    stopped = False
    for piece, n in texts:
        produced = n
        pieces.append(piece)
        text = "".join(pieces)
        cut = _stop_at(text, stop)
        if cut is not None:
            if on_text is not None:
                shown = len(text) - len(piece)
                if cut > shown:
                    on_text(text[shown:cut])
            pieces = [text[:cut]]
            stopped = True
            texts.close()
            break
        if on_text is not None and piece:
            on_text(piece)
    reason = "stop" if stopped or produced < max_tokens else "length"
    return Generation("".join(pieces), reason, len(prompt_ids), produced)


def _pad_id(tokenizer: Any) -> int | None:
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else getattr(tokenizer, "eos_token_id", None)


def _stop_at(text: str, stop: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


class _Streamed:
    """Pieces of text with the count of tokens generated so far, from generate() run in a thread."""

    def __init__(self, model: Any, tokenizer: Any, ids: torch.Tensor, kwargs: dict[str, Any]) -> None:
        from transformers import TextIteratorStreamer

        self._streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._count = _Counter(ids.shape[1])
        self._error: BaseException | None = None
        self._stop = threading.Event()

        def work() -> None:
            try:
                from transformers import StoppingCriteria, StoppingCriteriaList

                stop_event = self._stop

                class _Halt(StoppingCriteria):  # stops generation when the reader has seen a stop string
                    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> Any:
                        return stop_event.is_set()

                model.generate(
                    ids,
                    streamer=self._streamer,
                    logits_processor=[self._count],
                    stopping_criteria=StoppingCriteriaList([_Halt()]),
                    **kwargs,
                )
            except BaseException as exc:  # re-raised in the reader
                self._error = exc
                self._streamer.end()

        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[tuple[str, int]]:
        for piece in self._streamer:
            yield piece, self._count.generated
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield "", self._count.generated

    def close(self) -> None:
        self._stop.set()
        for _ in self._streamer:
            pass
        self._thread.join()


class _Counter:
    """A logits processor that only counts the tokens generated (it is called once per new token)."""

    def __init__(self, prompt_len: int) -> None:
        self.prompt_len = prompt_len
        self.generated = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.generated = int(input_ids.shape[1]) - self.prompt_len + 1
        return scores


def _stream(model: Any, tokenizer: Any, ids: torch.Tensor, kwargs: dict[str, Any]) -> _Streamed:
    return _Streamed(model, tokenizer, ids, kwargs)


@torch.no_grad()
def embed(
    model: Any, tokenizer: Any, texts: Sequence[str], *, normalize: bool = True
) -> tuple[list[list[float]], int]:
    """Mean-pooled (and by default L2-normalized) sentence embeddings from an encoder, as
    sentence-transformers computes them for MiniLM; returns (vectors, tokens in)."""
    device = next(model.parameters()).device
    batch = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(device)
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return pooled.float().cpu().tolist(), int(batch["attention_mask"].sum())
