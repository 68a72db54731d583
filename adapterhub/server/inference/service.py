"""The inference service of one app: the live base model, its runtime, the adapter pool, the scheduler,
and the rules that turn a request's ``model`` field and token into what the scheduler runs.

The ``model`` field is one of

- the base's name (as registered, or the checkpoint folder's name): the base alone;
- a cataloged adapter's name: that adapter, weight 1;
- an exact weighted combination, ``NAME:WEIGHT+NAME:WEIGHT...`` (``sql:0.7+chat:0.3``; a term without
  ``:WEIGHT`` has weight 1; weights may be negative): ``sum_i w_i s_i B_i A_i x`` at run time.
  Adapter names cannot contain ``:`` or ``+``, so the spelling is never ambiguous.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .engine import Engine
from .metrics import Metrics
from .pool import AdapterPool, Entry, may_use
from .refusal import Refusal

if TYPE_CHECKING:
    from ..records import TokenInfo

#: most terms in a combination ``a:w+b:w...``, and the largest weight (a factor in fp32 stays finite)
MAX_TERMS = 64
MAX_WEIGHT = 1000.0
#: the default cap on a request body (--max-request-bytes), and the seconds a body may take to arrive
MAX_REQUEST_BYTES = 4 << 20
BODY_TIMEOUT = 60.0
#: a text over (context + 1) * this many characters has more tokens than the context (refused untokenized)
CHARS_PER_TOKEN = 64

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(value: str | int | None, option: str = "--adapter-memory") -> int | None:
    """``2GB``, ``512MiB``, ``1.5g``, ``1000000`` -> bytes (powers of 1024 for every unit); None stays None."""
    if value is None or isinstance(value, int):
        return value
    m = _SIZE.match(value)
    if m is None:
        from ...errors import InvalidOptionError

        raise InvalidOptionError(f"{option} {value!r}: give a size such as 2GB, 512MB or 1000000 (bytes)")
    unit = 1024 ** "_kmgt".index(m.group(2).lower() or "_")
    return int(float(m.group(1)) * unit)


@dataclass(frozen=True)
class Target:
    """What a request runs on: the spec for the runtime (content sha256 -> weight) and its adapters."""

    spec: dict[str, float] | None
    entries: tuple[Entry, ...]


class Inference:
    """Everything `mount_inference` sets up for one app."""

    def __init__(
        self,
        hub: Any,
        model: Any,
        tokenizer: Any,
        runtime: Any,
        *,
        name: str,
        base_ref: str,
        max_batch: int,
        max_queue: int,
        adapter_memory: int | None,
        require_token: bool,
        factor_bytes: int,
        graphs: bool | None = None,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        body_timeout: float = BODY_TIMEOUT,
        batch_invariant: bool | None = None,
        lora_dirs: tuple[str, ...] = (),
    ) -> None:
        self.hub = hub
        #: folders (real paths) whose adapters ``load_lora_adapter`` may read; none: no local path at all
        self.lora_dirs = lora_dirs
        self.max_request_bytes = max_request_bytes
        self.body_timeout = body_timeout
        self.model = model
        self.tokenizer = tokenizer
        self.runtime = runtime
        self.name = name
        self.base_ref = base_ref
        self.require_token = require_token
        self.created = int(time.time())
        self.causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
        self.metrics = Metrics()
        self.pool = AdapterPool(
            hub, runtime, base_ref, budget=adapter_memory, metrics=self.metrics, factor_bytes=factor_bytes
        )
        self.engine = Engine(
            model,
            tokenizer,
            self.pool,
            self.metrics,
            max_batch=max_batch,
            max_queue=max_queue,
            graphs=graphs,
            batch_invariant=batch_invariant,
        )
        #: longest text tokenized at all: any longer one is over the context whatever its tokens
        self.max_chars = (self.engine.max_context + 1) * CHARS_PER_TOKEN
        #: rows of the input embedding: a token id must be below it
        self.vocab = int(model.get_input_embeddings().num_embeddings)
        self._token_texts: dict[int, str] = {}
        from .grammar import Grammars

        self.grammars = Grammars(tokenizer, self.vocab, eos=sorted(self.engine.eos))

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()
        self.pool.close()

    # ------------------------------------------------------------------ requests

    def target(self, model: Any, token: TokenInfo | None) -> Target | Refusal:
        """Resolve a request's ``model`` (see the module docstring) for ``token``; runs catalog queries."""
        if not isinstance(model, str) or not model:
            return Refusal(
                400, "model is required: the base's name, an adapter's name or NAME:W+NAME:W", param="model"
            )
        if model == self.name:
            return Target(None, ())
        terms = _terms(model)
        if isinstance(terms, Refusal):
            return terms
        found = self.pool.resolve_many(name for name, _ in terms)  # one catalog query for every term
        spec: dict[str, float] = {}
        entries: list[Entry] = []
        for name, weight in terms:
            entry = found.get(name)
            if entry is None or not may_use(entry, token):
                return _unknown(model if len(terms) == 1 else name)
            spec[entry.sha256] = spec.get(entry.sha256, 0.0) + weight
            if entry not in entries:
                entries.append(entry)
        why = self.pool.misfits(entries)
        if why is not None:
            return Refusal(400, why, param="model", code="adapter_incompatible")
        if any(abs(w) > MAX_WEIGHT for w in spec.values()):
            return Refusal(400, f"a combination's weights are at most {MAX_WEIGHT:g} in size", param="model")
        return Target(spec, tuple(entries))

    def token_text(self, token: int) -> str:
        """One token as text (log-probability entries name tokens so)."""
        text = self._token_texts.get(token)
        if text is None:
            text = str(self.tokenizer.decode([token]))
            if len(self._token_texts) < 1 << 18:
                self._token_texts[token] = text
        return text

    def listing(self, token: TokenInfo | None) -> list[dict[str, Any]]:
        """``/v1/models``: the base, then each adapter that fits it, in vLLM's shape (``parent`` the base,
        ``max_model_len``); an adapter's rank, alpha, targets and content hash under the extra key
        ``adapterhub``."""
        rows = [self._base_row()]
        for e in sorted(self.pool.entries(), key=lambda e: e.name):
            if may_use(e, token):
                rows.append(self._row(e.name, f"sha256:{e.sha256}", [e]))
        return rows

    def model_row(self, model: str, token: TokenInfo | None) -> dict[str, Any] | Refusal:
        """``/v1/models/{model}`` for any servable ``model``: the base, an adapter or a combination."""
        if model == self.name:
            return self._base_row()
        target = self.target(model, token)
        if isinstance(target, Refusal):
            return target
        root = f"sha256:{target.entries[0].sha256}" if len(target.entries) == 1 else model
        return self._row(model, root, list(target.entries), target.spec)

    def _base_row(self) -> dict[str, Any]:
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "adapterhub",
            "root": self.base_ref,
            "parent": None,
            "max_model_len": self.engine.max_context,
        }

    def _row(
        self, model: str, root: str, entries: list[Entry], spec: dict[str, float] | None = None
    ) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "adapters": [
                {
                    "name": e.name,
                    "sha256": e.sha256,
                    "rank": e.rank,
                    "alpha": e.alpha,
                    "targets": list(e.targets),
                    "num_params": e.num_params,
                }
                for e in entries
            ],
        }
        if spec is not None and (len(entries) > 1 or any(w != 1 for w in spec.values())):
            extra["weights"] = dict(spec)
        return {
            "id": model,
            "object": "model",
            "created": self.created,
            "owned_by": "adapterhub",
            "root": root,
            "parent": self.name,
            "max_model_len": self.engine.max_context,
            "adapterhub": extra,
        }


def _unknown(model: str) -> Refusal:
    return Refusal(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def _terms(model: str) -> list[tuple[str, float]] | Refusal:
    if model.count("+") >= MAX_TERMS:
        return Refusal(400, f"a combination has at most {MAX_TERMS} terms", param="model")
    out: list[tuple[str, float]] = []
    for raw in model.split("+"):
        name, sep, w = raw.strip().partition(":")
        weight = 1.0
        if sep:
            try:
                weight = float(w)
            except ValueError:
                return Refusal(
                    400, f"weight {w!r} of {name} in model {model!r} is not a number", param="model"
                )
            if not math.isfinite(weight):
                return Refusal(400, f"weight of {name} in model {model!r} must be finite", param="model")
        if not name:
            return _unknown(model)
        out.append((name, weight))
    return out
