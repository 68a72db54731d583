"""The server state that versions before the catalog tables kept in files under ``HOME/server`` (gate
markers, access requests, upload proofs and xorb records, ``renames.json``, and the JSON files of likes,
discussions, collections and webhooks), read once into the catalog (`adapterhub.catalog.hublegacy`) when
a server store first opens on that home. The files are left where they are (they are no longer read);
entries of repos that are gone, and files that cannot be read, are skipped with a log line."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

from ..catalog import Catalog
from ..catalog.hublegacy import LegacyState, import_state, imported, repo_keys
from .checks import SHA256_RE, is_name

log = logging.getLogger(__name__)

FOLDERS = ("gated", "uploads", "likes", "discussions", "collections", "webhooks")
GATE_MODES = ("auto", "manual")


def has_files(root: Path) -> bool:
    return (root / "renames.json").is_file() or any((root / d).is_dir() for d in FOLDERS)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("skipping %s: %s", path, exc)
        return None


def _iso(value: Any) -> dt.datetime:
    try:
        return dt.datetime.strptime(str(value), "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def _dicts(data: Any) -> dict[str, Any]:
    return data if isinstance(data, dict) else {}


def read_files(root: Path, keys: dict[str, int]) -> LegacyState:
    """What the files under ``root`` (``HOME/server``) hold, for the repos of ``keys`` (disk name -> id)."""
    s = LegacyState()
    gated = root / "gated"
    for p in sorted(gated.glob("*")) if gated.is_dir() else []:
        if p.name.endswith(".access.json") and p.name[: -len(".access.json")] in keys:
            rid = keys[p.name[: -len(".access.json")]]
            for user, r in _dicts(_json(p)).items():
                if (
                    is_name(user)
                    and isinstance(r, dict)
                    and r.get("status") in ("pending", "accepted", "rejected")
                ):
                    s.access.append(
                        {
                            "repo_id": rid,
                            "user": user,
                            "request_id": str(r.get("request_id", ""))[:32],
                            "status": r["status"],
                            "reason": r.get("reason"),
                            "updated_at": _iso(r.get("timestamp")),
                        }
                    )
        elif p.name in keys and p.is_file() and p.read_text().strip() in GATE_MODES:
            s.gates.append({"repo_id": keys[p.name], "mode": p.read_text().strip()})
    uploads = root / "uploads"
    for d in sorted(uploads.iterdir()) if uploads.is_dir() else []:
        if d.name in keys:
            rid = keys[d.name]
            s.proofs += [
                {"repo_id": rid, "user": "", "sha256": f.name} for f in d.iterdir() if SHA256_RE.match(f.name)
            ]
            for f in d.glob("by/*/*"):
                if SHA256_RE.match(f.name) and is_name(f.parent.name):
                    s.proofs.append({"repo_id": rid, "user": f.parent.name, "sha256": f.name})
            for f in d.glob("xorbs/*"):
                digest = f.read_text().strip()
                if SHA256_RE.match(f.name) and SHA256_RE.match(digest):
                    s.repo_xorbs.append({"repo_id": rid, "xorb": f.name, "sha256": digest})
    for f in sorted(uploads.glob("users/*/xorbs/*")) if uploads.is_dir() else []:
        digest = f.read_text().strip()
        user = f.parent.parent.name
        if is_name(user) and SHA256_RE.match(f.name) and SHA256_RE.match(digest):
            s.user_xorbs.append({"user": user, "xorb": f.name, "sha256": digest})
    for old, key in _dicts(_json(root / "renames.json") if (root / "renames.json").is_file() else {}).items():
        if key in keys:
            s.renames.append({"old_id": str(old).lower()[:201], "repo_id": keys[key]})
    for p in sorted((root / "likes").glob("*.json")):
        if is_name(p.stem):
            s.likes += [
                {"user": p.stem, "repo_id": keys[k], "created_at": _iso(at)}
                for k, at in _dicts(_json(p)).items()
                if k in keys
            ]
    for p in sorted((root / "discussions").glob("*.json")):
        if p.stem in keys:
            items = _dicts(_dicts(_json(p)).get("items"))
            s.threads += [(keys[p.stem], d) for d in items.values() if isinstance(d, dict)]
    for p in sorted((root / "collections").glob("*.json")):
        if is_name(p.stem):
            s.collections += [(p.stem, cid, c) for cid, c in _dicts(_json(p)).items() if isinstance(c, dict)]
    for p in sorted((root / "webhooks").glob("*.json")):
        if is_name(p.stem):
            for h in _dicts(_json(p)).values():
                if isinstance(h, dict) and "id" in h and "url" in h:
                    s.webhooks.append(
                        {
                            "id": h["id"],
                            "user": p.stem,
                            "url": h["url"],
                            "watched": h.get("watched", []),
                            "domains": h.get("domains", ["repo", "discussion"]),
                            "secret": h.get("secret"),
                            "disabled": bool(h.get("disabled")),
                            "created_at": _iso(h.get("createdAt")),
                        }
                    )
    return s


def import_files(catalog: Catalog, root: Path) -> int:
    """Bring the files' state under ``root`` into ``catalog`` once; returns how many entries were read
    (0 when there are no such files or it was done before)."""
    if not has_files(root) or imported(catalog):
        return 0
    state = read_files(root, repo_keys(catalog))
    if not import_state(catalog, state):
        return 0
    log.warning("moved %d entries of server state from files under %s into the catalog", len(state), root)
    return len(state)
