"""OpenAI-compatible inference beside the Hub API: one base model, every cataloged adapter that fits it.

``mount_inference(app, hub, model=BASE)`` loads the base, attaches a runtime and adds

- ``GET /v1/models``: the base under its name, and each cataloged adapter that fits it with
  ``parent`` = the base (vLLM's shape); private adapters only to tokens that may read them;
- ``POST /v1/chat/completions`` and ``POST /v1/completions``: ``max_tokens``, ``n``, ``temperature``,
  ``top_p``, ``top_k``, ``min_p``, presence/frequency/repetition penalties, ``logit_bias``, ``seed``,
  ``stop``, ``logprobs`` (+ ``top_logprobs`` in chat, + ``echo`` in completions: the prompt's too),
  ``stream`` (SSE chunks, then ``data: [DONE]``), ``stream_options.include_usage``; a list of prompts
  (strings or token ids) in completions; ``response_format`` ``json_object`` / ``json_schema`` and
  ``tools`` with a forced ``tool_choice`` by constrained decoding (`grammar`, llguidance); ``usage`` in
  every answer;
- ``POST /v1/embeddings`` for encoder bases (floats, or base64 little-endian float32);
- ``GET /metrics`` in the Prometheus text format (a token with ``require_token``; resident private
  adapters only to who may read them);
- vLLM's ``GET /health``, ``/version``, ``/tokenizer_info``, ``POST /tokenize``, ``/detokenize``,
  ``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter`` (`companion`).

Request bodies are typed (`requests`): every OpenAI field honoured or refused with a 400 naming it.

``model`` is the base's name, an adapter's name, or an exact combination ``a:0.7+b:0.3`` (see
`service`). Requests for any mix of adapters share the forward steps of one scheduler thread
(continuous batching, `engine`); adapters are loaded on demand and kept resident in an LRU under a
memory budget, keyed by content (`pool`). Private adapters are those tagged ``private`` (`pool`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .service import MAX_REQUEST_BYTES, Inference, parse_size

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["Inference", "mount_inference", "parse_size"]


def mount_inference(
    app: FastAPI,
    hub: Any,
    *,
    model: str,
    device: str | None = None,
    dtype: str = "auto",
    max_batch: int = 32,
    adapter_memory: int | str | None = None,
    require_token: bool = False,
    max_queue: int = 512,
    factor_dtype: str = "float32",
    graphs: bool | None = None,
    max_request_bytes: int | str | None = None,
    batch_invariant: bool | None = None,
    quantize: str | None = None,
    lora_dirs: Sequence[str | os.PathLike[str]] = (),
) -> Inference:
    """Serve ``model`` (a registered base name or a checkpoint folder) and the cataloged adapters that fit
    it from ``app`` (made by `adapterhub.server.create_app`); ``hub`` is the home's `adapterhub.Hub`.

    Args:
        device, dtype: where and in what dtype the base runs (as `Hub.load_base`).
        max_batch: most requests decoded together.
        adapter_memory: budget for resident adapter factors (bytes, or ``"2GB"``); None: unbounded.
        require_token: refuse requests without one of this server's tokens (401).
        max_queue: most requests waiting to start; more are answered 429 with Retry-After.
        factor_dtype: ``float32`` keeps adapter factors in fp32 (as PEFT and ``adapterhub run`` compute, so
            answers equal theirs); ``model`` keeps them in the model's dtype (faster on a bf16 GPU).
        graphs: decode steps over static buffers, captured in CUDA graphs (`graphs`); None: on a GPU
            where the model is covered, False: never (a growing cache, eager), True: also off a GPU
            (static buffers, eager).
        max_request_bytes: largest request body (bytes, or ``"4MB"``); larger ones are a 413 unread.
        batch_invariant: a greedy request's tokens never depend on what else shares the batch (other
            adapters, lengths, padding), in any dtype (`invariant`: each prefill alone, batched decode
            steps whose numbers for a row do not depend on the others); None: on unless the decode
            steps are CUDA graphs (a GPU, or ``graphs=True``), which are not invariant; False: the
            batching without that guarantee (`bench/serve.py --batch-invariant` measures both).
        quantize: ``nf4`` or ``int8``: the base's linear layers through bitsandbytes (as `Hub.load_base`;
            ``nf4-all``: the embeddings and output layer too);
            adapters attach to them (factors in fp32); nothing can be merged into such a base.
        lora_dirs: folders from which ``POST /v1/load_lora_adapter`` may add local adapters (a path must
            stay inside one after resolving symlinks); none: only public Hub repos.

    The scheduler thread starts with the app's lifespan, or with the first request when the server runs
    without lifespan events, and stops at shutdown.
    """
    import torch

    from ...errors import InvalidOptionError

    if factor_dtype not in ("float32", "model"):
        raise InvalidOptionError(f"factor_dtype is 'float32' or 'model', not {factor_dtype!r}")
    if max_batch < 1:
        raise InvalidOptionError(f"--max-batch must be at least 1, got {max_batch}")
    budget = parse_size(adapter_memory)
    dirs = tuple(os.path.realpath(d) for d in lora_dirs)
    missing = next((str(d) for d, real in zip(lora_dirs, dirs, strict=True) if not os.path.isdir(real)), None)
    if missing is not None:
        raise InvalidOptionError(f"--lora-dir {missing}: not a folder")
    body_cap = parse_size(max_request_bytes, "--max-request-bytes") or MAX_REQUEST_BYTES
    live, tokenizer = hub.load_base(model, device=device, dtype=dtype, quantize=quantize)
    if tokenizer is None:
        raise InvalidOptionError(
            f"{model} has no tokenizer files; serving text needs one (save the tokenizer into the "
            "checkpoint folder, or register the base with its tokenizer)"
        )
    rt = hub.attach(live, dtype=torch.float32 if factor_dtype == "float32" else None)
    registered = {b.name for b in hub.list_bases()}
    name = model if model in registered else Path(model).name
    first = next(iter(live.parameters()))
    svc = Inference(
        hub,
        live,
        tokenizer,
        rt,
        name=name,
        base_ref=str(model),
        max_batch=max_batch,
        max_queue=max_queue,
        adapter_memory=budget,
        require_token=require_token,
        graphs=graphs,
        factor_bytes=4 if factor_dtype == "float32" else first.element_size(),
        max_request_bytes=body_cap,
        batch_invariant=batch_invariant,
        lora_dirs=dirs,
    )
    app.state.inference = svc
    _include_first(app)
    previous = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        svc.start()
        try:
            async with previous(a) as state:
                yield state
        finally:
            svc.stop()

    app.router.lifespan_context = lifespan
    return svc


def _include_first(app: FastAPI) -> None:
    """Add the routes before the app's own (and so before any final catch-all)."""
    from .companion import router as companion
    from .routes import router

    before = list(app.router.routes)
    app.include_router(router)
    app.include_router(companion)  # its /v1 catch-all last
    added = app.router.routes[len(before) :]
    app.router.routes[:] = added + before
