"""Counters of the inference server, rendered in the Prometheus text format (``GET /metrics``)."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

#: histogram bucket bounds, seconds
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.total = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.bounds):
            if v <= b:
                self.counts[i] += 1
        self.total += v
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out = [f"# TYPE {name} histogram"]
        for b, c in zip(self.bounds, self.counts, strict=True):
            out.append(f'{name}_bucket{{le="{b:g}"}} {c}')
        out += [
            f'{name}_bucket{{le="+Inf"}} {self.n}',
            f"{name}_sum {self.total:.6f}",
            f"{name}_count {self.n}",
        ]
        return out


class Metrics:
    """What the server counts; written by the scheduler and the routes, read by ``/metrics``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, str]] = Counter()  # (endpoint, status) -> count
        self.tokens_in = 0
        self.tokens_out = 0
        self.finished = 0
        self.cancelled = 0
        self.evictions = 0
        self.queue_length = 0
        self.active = 0
        #: sha256 -> (the entries it was asked by, bytes); `render` shows only what its caller may read
        self.resident: dict[str, tuple[tuple[Any, ...], int]] = {}
        self.batch = _Histogram(_BATCH)
        self.prefill_batch = _Histogram(_BATCH)
        self.ttft = _Histogram(_SECONDS)
        self.load = _Histogram(_SECONDS)
        self.prefill_s = _Histogram(_SECONDS)

    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, str(status))] += 1

    def decode(self, rows: int) -> None:
        self.batch.observe(rows)
        self.active = rows

    def prefill(self, rows: int, tokens: int, seconds: float) -> None:
        self.prefill_batch.observe(rows)
        self.prefill_s.observe(seconds)
        self.tokens_in += tokens

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def adapter_loaded(self, seconds: float) -> None:
        self.load.observe(seconds)

    def render(self, shown: dict[str, str]) -> str:
        """The text format; ``shown`` (sha256 -> name) are the resident adapters the caller may read: no
        other resident content is counted, summed or listed."""
        p = "adapterhub_"
        resident = {s: (shown[s], b) for s, (_, b) in dict(self.resident).items() if s in shown}
        out = [f"# TYPE {p}requests_total counter"]
        with self.lock:
            reqs = sorted(self.requests.items())
        for (endpoint, status), n in reqs:
            out.append(f'{p}requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        for name, kind, value in (
            ("prompt_tokens_total", "counter", self.tokens_in),
            ("generated_tokens_total", "counter", self.tokens_out),
            ("requests_finished_total", "counter", self.finished),
            ("requests_cancelled_total", "counter", self.cancelled),
            ("adapter_evictions_total", "counter", self.evictions),
            ("queue_length", "gauge", self.queue_length),
            ("active_requests", "gauge", self.active),
            ("resident_adapters", "gauge", len(resident)),
            ("resident_adapter_bytes_total", "gauge", sum(b for _, b in resident.values())),
        ):
            out += [f"# TYPE {p}{name} {kind}", f"{p}{name} {value}"]
        out.append(f"# TYPE {p}resident_adapter_bytes gauge")
        for sha, (name, b) in sorted(resident.items(), key=lambda kv: (kv[1][0], kv[0])):
            out.append(f'{p}resident_adapter_bytes{{adapter="{_label(name)}",sha256="{sha[:12]}"}} {b}')
        out += self.batch.lines(f"{p}decode_batch_size")
        out += self.prefill_batch.lines(f"{p}prefill_batch_size")
        out += self.prefill_s.lines(f"{p}prefill_seconds")
        out += self.ttft.lines(f"{p}time_to_first_token_seconds")
        out += self.load.lines(f"{p}adapter_load_seconds")
        return "\n".join(out) + "\n"


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
