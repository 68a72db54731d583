"""Per-module singular-value spectra of an adapter's delta ``scale * B @ A``, from the factors alone.

For each module: ``B = Qb Rb`` (``out x r``) and ``A^T = Qa Ra`` (``in x r``) by QR, then the SVD of the
small ``r x r`` core ``Rb Ra^T`` gives the singular values of the delta exactly, as combine does, without
forming the ``out x in`` matrix. From them: the energy the first k ranks keep
(``sum_{i<=k} s_i^2 / sum s_i^2``), the ranks that keep 90% and 99% of it, and the effective rank
``exp(H(p))`` with ``p_i = s_i / sum s_i`` (Roy and Vetterli, 2007).

Results are cached as JSON under ``HOME/cache/spectra/<sha256>.json`` (the adapter's content digest), so
a page computes them once per adapter content.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ...hub import Hub


CACHE_VERSION = 1


def cache_path(home: Path, sha256: str) -> Path:
    return home / "cache" / "spectra" / f"{sha256}.json"


def summarize(sigma: list[float]) -> dict[str, Any]:
    """Energy curve, 90%/99% ranks and effective rank of singular values ``sigma`` (descending)."""
    sq = [s * s for s in sigma]
    total = sum(sq)
    energy, run = [], 0.0
    for v in sq:
        run += v
        energy.append(run / total if total > 0 else 0.0)

    def reach(f: float) -> int:
        return next((i + 1 for i, e in enumerate(energy) if e >= f - 1e-12), len(energy)) if total > 0 else 0

    s1 = sum(sigma)
    eff = math.exp(-sum(p * math.log(p) for p in (s / s1 for s in sigma) if p > 0)) if s1 > 0 else 0.0
    return {
        "sigma": sigma,
        "energy": energy,
        "rank90": reach(0.9),
        "rank99": reach(0.99),
        "effective_rank": eff,
    }


def module_sigma(a: Any, b: Any, scale: float) -> list[float]:
    import torch

    a2 = a.detach().to(torch.float64).reshape(a.shape[0], -1)  # r x in
    b2 = b.detach().to(torch.float64).reshape(b.shape[0], -1)  # out x r
    _, rb = torch.linalg.qr(b2, mode="r")  # only the r x r factors are needed, never Q
    _, ra = torch.linalg.qr(a2.T, mode="r")
    s = torch.linalg.svdvals(rb @ ra.T) * abs(scale)
    return [float(v) for v in s]


def compute(hub: Hub, name: str) -> list[dict[str, Any]]:
    weights = hub.load_adapter(name)
    out = []
    for key in sorted(weights.modules):
        m = weights.modules[key]
        if m.A is None or m.B is None:
            continue
        entry = {"module": m.module, "short_name": m.short_name, "rank": m.rank}
        entry.update(summarize(module_sigma(m.A, m.B, m.scale)))
        out.append(entry)
    return out


def spectra(hub: Hub, name: str, sha256: str) -> list[dict[str, Any]]:
    """The spectra of cataloged adapter ``name`` (content ``sha256``), from the cache when it has them."""
    path = cache_path(hub.home, sha256)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("version") == CACHE_VERSION and doc.get("sha256") == sha256:
            modules: list[dict[str, Any]] = doc["modules"]
            return modules
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    modules = compute(hub, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"version": CACHE_VERSION, "sha256": sha256, "modules": modules}, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return modules
