"""Adapters for the inference server: names resolved against the catalog on every request, content kept
resident in the runtime under its store sha256, in an LRU under a memory budget.

A request names adapters; each name is looked up in the catalog (one indexed query) for its current
sha256, so a new version pushed under an old name is served from the next request on; the old content
stays resident only while requests that started with it run, then ages out of the LRU. Files are read
(parsed into `LoraWeights`) on a worker thread, so a cold adapter never stalls the decode steps of the
others; the scheduler thread then places the factors with ``rt.load(weights, name=sha256)``.

What is resident, its bytes, the LRU order and the budget are the runtime's own `Residency`
(``rt.residency``): the pool keeps no second copy. A request that starts marks its contents used
(`Residency.touch`), as every selection the runtime makes does; to fit a new content the pool unloads
what `Residency.victims` names, never a content a running request has pinned.

Private adapters: a cataloged adapter tagged ``private`` is listed and served only to a token that may
read it (`adapterhub.server.privacy`, the rule the web pages follow too).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import AdapterHubError, InvalidOptionError
from ..privacy import is_private, may_see
from .metrics import Metrics

if TYPE_CHECKING:
    from ...lora import LoraWeights
    from ...runtime import Residency, Runtime
    from ..records import TokenInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """A cataloged adapter as a request sees it."""

    name: str
    sha256: str
    private: bool
    num_params: int
    rank: int = 0
    alpha: float | None = None
    targets: tuple[str, ...] = ()


def may_use(entry: Entry, token: TokenInfo | None) -> bool:
    """Whether ``token`` may list and use ``entry`` (`adapterhub.server.privacy`)."""
    return may_see(entry.name, entry.private, token)


def entry_of(info: Any) -> Entry:
    return Entry(
        info.name,
        info.sha256,
        is_private(info.tags),
        int(info.num_params or 0),
        int(info.rank or 0),
        info.alpha,
        tuple(info.target_modules or ()),
    )


class AdapterPool:
    """Resolution, fit checks (cached per content), background reads, and eviction from the runtime's
    `Residency` (its LRU order and byte budget; ``budget`` here is ``runtime.residency.budget``)."""

    def __init__(
        self,
        hub: Any,
        runtime: Runtime,
        base: str,
        *,
        budget: int | None,
        metrics: Metrics,
        factor_bytes: int = 4,
    ) -> None:
        self.hub = hub
        self.factor_bytes = factor_bytes
        self.runtime = runtime
        self.base = base
        self.residency: Residency = runtime.residency
        self.residency.budget = budget
        self.metrics = metrics
        self.wake: Any = lambda: None
        self._lock = threading.Lock()
        #: sha256 -> None (fits) or why not, without any name (the next asker may know it by another)
        self._fits: dict[str, str | None] = {}
        #: sha256 -> name -> the entries it was asked by (names to read it by; /metrics filters them)
        self._asked: dict[str, dict[str, Entry]] = {}
        self._reads: dict[str, Future[tuple[LoraWeights, float]]] = {}
        self._read: dict[str, tuple[LoraWeights, float]] = {}  # read, waiting for room
        self._problems: dict[str, AdapterHubError] = {}
        self._pins: Counter[str] = Counter()  # sha256 -> running requests using it (never evicted)
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapterhub-adapter-read")

    @property
    def budget(self) -> int | None:
        """Bytes of adapter memory (None: no limit): the runtime's ``residency.budget``."""
        return self.residency.budget

    def resident(self, sha: str) -> bool:
        """Whether content ``sha`` is resident under its own name (what a request's spec names)."""
        return sha in self.residency.names

    # ------------------------------------------------------------------ request side (any thread)

    def resolve(self, name: str) -> Entry | None:
        """The adapter called ``name`` now (one catalog query), or None."""
        return self.resolve_many([name]).get(name)

    def resolve_many(self, names: Iterable[str]) -> dict[str, Entry]:
        """The adapters called ``names`` now, by name, in one catalog query (absent names are left out)."""
        from ...records import AdapterFilter

        wanted = sorted(set(names))
        if not wanted:
            return {}
        return {a.name: entry_of(a) for a in self.hub.library.select(None, AdapterFilter(), names=wanted)}

    def entries(self) -> list[Entry]:
        """Every cataloged adapter that fits the base, by name."""
        names = self.hub.compatible_names(self.base)
        return [entry_of(a) for a in self.hub.list_adapters() if a.name in names]

    def misfit(self, entry: Entry) -> str | None:
        """None when ``entry`` fits the base, else why not (see `misfits`)."""
        return self.misfits([entry])

    def misfits(self, entries: list[Entry]) -> str | None:
        """None when every entry fits the base (judged from the catalog in one pass for those not seen
        before, cached per content), else why the first that does not, naming it as its asker knows it
        (the cache keeps only the reasons: the same content may be private under one name and public
        under another)."""
        with self._lock:
            new = {e.sha256: e.name for e in entries if e.sha256 not in self._fits}
        if new:
            by_name = {
                r.subject: r
                for r in self.hub.validate_catalog(base=self.base, names=sorted(set(new.values())))
            }
            with self._lock:
                for sha, name in new.items():
                    report = by_name.get(name)
                    errors = report.errors[:5] if report is not None and not report.ok else []
                    self._fits[sha] = "; ".join(c.message for c in errors) or None
        with self._lock:
            why = next(((e, self._fits.get(e.sha256)) for e in entries if self._fits.get(e.sha256)), None)
        if why is None:
            return None
        return f"adapter {why[0].name} does not fit base {self.base}: {why[1]}"

    def request(self, entry: Entry) -> None:
        """Make sure ``entry``'s content is resident or on its way."""
        with self._lock:
            self._asked.setdefault(entry.sha256, {})[entry.name] = entry
            self._problems.pop(entry.sha256, None)
            self._start_read(entry.sha256)

    def _start_read(self, sha: str) -> None:  # under the lock
        if self.resident(sha) or sha in self._reads or sha in self._read:
            return
        name = next(iter(self._asked[sha]))
        fut = self._executor.submit(self._read_files, name, sha)
        self._reads[sha] = fut
        fut.add_done_callback(lambda _f: self.wake())

    def _read_files(self, name: str, sha: str) -> tuple[LoraWeights, float]:
        from ...formats import read_adapter

        started = time.perf_counter()
        weights = read_adapter(
            self.hub.adapter_files(name), load=True, check_values=False
        )  # the runtime checks them on the device
        return weights, time.perf_counter() - started

    # ------------------------------------------------------------------ scheduler side (its thread)

    def problem(self, shas: tuple[str, ...]) -> AdapterHubError | None:
        with self._lock:
            return next((self._problems[s] for s in shas if s in self._problems), None)

    def ready(self, shas: tuple[str, ...]) -> bool:
        with self._lock:
            missing = [s for s in shas if not self.resident(s)]
            for s in missing:
                if s in self._asked:
                    self._start_read(s)
        return not missing

    def pin(self, shas: tuple[str, ...]) -> None:
        """A request starts with ``shas``: never evicted until `unpin`, and marked just used."""
        with self._lock:
            for s in shas:
                self._pins[s] += 1
        self.residency.touch(shas)

    def unpin(self, shas: tuple[str, ...]) -> None:
        with self._lock:
            for s in shas:
                self._pins[s] -= 1
                if self._pins[s] <= 0:
                    del self._pins[s]

    def failed_wait(self, job: Any) -> None:
        """A waiting request went away (nothing was pinned for it)."""

    def install(self, close_rows: Any, active: Any) -> None:
        """Place the adapters whose files are read, evicting unpinned LRU content to stay in budget."""
        with self._lock:
            done = [s for s, f in self._reads.items() if f.done()]
            for s in done:
                fut = self._reads.pop(s)
                try:
                    self._read[s] = fut.result()
                except AdapterHubError as exc:
                    self._problems[s] = exc
                except Exception as exc:  # an unreadable file: refuse the requests that need it
                    self._problems[s] = InvalidOptionError(f"cannot read adapter {_content(s)}: {exc}")
            pending = list(self._read.items())
        for sha, (weights, read_s) in pending:
            need = _estimate(weights, self.factor_bytes)
            if self.budget is not None and need > self.budget:
                self._refuse(
                    sha,
                    InvalidOptionError(
                        f"adapter {_content(sha)} needs {need} bytes of adapter memory, more than the "
                        f"server's budget of {self.budget} (--adapter-memory)"
                    ),
                )
                continue
            if not self._make_room(need, close_rows):
                continue  # everything resident is in use: try again when a request finishes
            close_rows()
            started = time.perf_counter()
            try:
                self.runtime.load(weights, name=sha, sha256=sha)
            except AdapterHubError as exc:
                self._refuse(sha, exc)
                continue
            place_s = time.perf_counter() - started
            with self._lock:
                self._read.pop(sha, None)
            self.metrics.adapter_loaded(read_s + place_s)
            logger.info(
                "adapter %s (%s) resident in %.1f ms",
                ", ".join(self._asked.get(sha, ())),
                sha[:12],
                1e3 * (read_s + place_s),
            )
        self._publish()

    def evict(self, sha: str, close_rows: Any) -> bool:
        """On the scheduler thread: drop ``sha``'s content from memory unless a running request uses it."""
        with self._lock:
            if sha not in self.residency.contents or self._pins.get(sha):
                return False
        close_rows()
        self._unload(sha)
        self._publish()
        return True

    def _refuse(self, sha: str, exc: AdapterHubError) -> None:
        with self._lock:
            self._read.pop(sha, None)
            self._problems[sha] = exc

    def _make_room(self, need: int, close_rows: Any) -> bool:
        """Unload what the residency names (least recently used first, none pinned) so that ``need`` more
        bytes fit its budget; False (nothing unloaded) when they cannot fit while the pins hold."""
        with self._lock:
            pinned = set(self._pins)
        victims = self.residency.victims(need, pinned)
        if victims is None:
            return False
        if victims:
            close_rows()
        for sha in victims:
            self._unload(sha)
        return True

    def _unload(self, sha: str) -> None:
        """Drop content ``sha`` from the runtime (every name bound to it) and count the eviction."""
        for name in self.residency.names_of(sha):
            self.runtime.unload(name)
        self.metrics.evictions += 1

    def _publish(self) -> None:
        contents = self.residency.contents
        resident = {s: contents[s].bytes for s in self.residency.lru()}
        with self._lock:
            self.metrics.resident = {
                s: (tuple(self._asked.get(s, {}).values()), b) for s, b in resident.items()
            }

    def visible_resident(self, token: TokenInfo | None) -> dict[str, str]:
        """sha256 -> the name to show ``token`` for each resident content it may read: one it was asked by
        that is readable to ``token`` both as asked and as cataloged now (one catalog query). Content only
        private names reach is left out, so /metrics shows nobody a private row, its count or its sha."""
        resident = dict(self.metrics.resident)
        now = self.resolve_many(e.name for entries, _ in resident.values() for e in entries)
        shown: dict[str, str] = {}
        for sha, (entries, _) in resident.items():
            names = sorted(
                e.name for e in entries if may_use(e, token) and may_use(now.get(e.name, e), token)
            )
            if names:
                shown[sha] = names[0]
        return shown

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _content(sha: str) -> str:
    """How problems name content: by its hash, never by the name of whoever asked first."""
    return f"sha256:{sha[:12]}"


def _estimate(weights: LoraWeights, size: int) -> int:
    """Bytes the factors will take on the device (the runtime pads ranks per layer; this is a floor)."""
    total = 0
    for m in weights.modules.values():
        for t in (m.A, m.B):
            if t is not None:
                total += t.numel()
    return total * size
