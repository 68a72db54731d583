"""Webhooks: a user asks to be told (an HTTP POST to a URL of theirs) when something happens to the repos
they watch: a repo by id, or every repo of a namespace. Domains: ``repo`` (a new commit) and
``discussion`` (a thread opened, commented, closed, merged). Events of a private repo go only to
webhooks of its owner. Webhooks are rows of the catalog (`adapterhub.catalog.hubsocial`).

Delivery is fire-and-forget from a background thread (a timeout of a few seconds, no retries), with the
webhook's secret in ``X-Webhook-Secret`` as on the Hub.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import urllib.request
from typing import Any

from ..catalog.hubsocial import WebhookRows
from ..errors import BadRequestError
from .records import Repo

log = logging.getLogger(__name__)
DOMAINS = ("repo", "discussion")
WATCH_TYPES = ("user", "org", "model", "dataset", "space")
PER_USER = 100
DELIVERY_TIMEOUT = 5


def _check(body: dict[str, Any], *, partial: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "url" in body or not partial:
        url = body.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > 2000:
            raise BadRequestError(
                "url must be an http(s) URL (job webhooks are not supported by this server)"
            )
        out["url"] = url
    watched = body.get("watched", [])
    if not isinstance(watched, list) or len(watched) > 100:
        raise BadRequestError("watched must be a list of at most 100 {type, name}")
    for w in watched:
        if not isinstance(w, dict) or w.get("type") not in WATCH_TYPES or not isinstance(w.get("name"), str):
            raise BadRequestError(f"each watched item needs a type ({', '.join(WATCH_TYPES)}) and a name")
    out["watched"] = [{"type": w["type"], "name": w["name"]} for w in watched]
    if "domains" in body or not partial:
        domains = body.get("domains", list(DOMAINS))
        if not isinstance(domains, list) or not domains or any(d not in DOMAINS for d in domains):
            raise BadRequestError(f"domains must be a list of {', '.join(DOMAINS)}")
        out["domains"] = list(dict.fromkeys(domains))
    if "secret" in body:
        secret = body["secret"]
        if secret is not None and (not isinstance(secret, str) or len(secret) > 500):
            raise BadRequestError("secret must be a string")
        out["secret"] = secret
    return out


class Webhooks:
    def __init__(self, rows: WebhookRows) -> None:
        self.rows = rows

    def of_user(self, user: str) -> list[dict[str, Any]]:
        return self.rows.of_user(user)

    def get(self, user: str, hook_id: str) -> dict[str, Any]:
        return self.rows.get(user, hook_id)

    def create(self, user: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise BadRequestError("give {url, watched, domains, secret}")
        return self.rows.insert(user, secrets.token_hex(12), _check(body, partial=False), limit=PER_USER)

    def update(self, user: str, hook_id: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise BadRequestError("give {url, watched, domains, secret}")
        return self.rows.change(user, hook_id, _check(body, partial=True))

    def set_disabled(self, user: str, hook_id: str, disabled: bool) -> dict[str, Any]:
        return self.rows.change(user, hook_id, {"disabled": disabled})

    def delete(self, user: str, hook_id: str) -> None:
        self.rows.delete(user, hook_id)

    # ------------------------------------------------------------------ delivery
    def targets(self, repo: Repo, domain: str) -> list[dict[str, Any]]:
        """The enabled webhooks that watch ``repo`` (or its namespace) for ``domain`` and may see it."""
        out = []
        for hook in self.rows.watching(repo):
            watches = any(
                (w["type"] == "model" and w["name"].lower() == repo.repo_id.lower())
                or (w["type"] in ("user", "org") and w["name"].lower() == repo.namespace.lower())
                for w in hook["watched"]
            )
            if watches and domain in hook["domains"]:
                out.append(hook)
        return out

    def notify(self, repo: Repo, domain: str, payload: dict[str, Any]) -> int:
        """POST ``payload`` to every webhook that watches ``repo`` for ``domain``, in the background;
        returns how many were started."""
        hooks = self.targets(repo, domain)
        body = json.dumps(payload).encode()
        for hook in hooks:
            threading.Thread(
                target=_deliver, args=(hook["url"], hook.get("secret"), body), daemon=True
            ).start()
        return len(hooks)


def _deliver(url: str, secret: str | None, body: bytes) -> None:
    headers = {"Content-Type": "application/json", "User-Agent": "adapterhub-webhooks"}
    if secret:
        headers["X-Webhook-Secret"] = secret
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=DELIVERY_TIMEOUT) as resp:
            resp.read(1024)
    except (OSError, ValueError) as exc:
        log.info("webhook %s failed: %s", url, exc)


def repo_payload(repo: Repo, base_url: str, action: str, scope: str, **extra: Any) -> dict[str, Any]:
    """What a webhook receives (the Hub's shape, less what this server does not have)."""
    return {
        "event": {"action": action, "scope": scope},
        "repo": {
            "type": "model",
            "name": repo.repo_id,
            "id": f"{repo.id:024x}",
            "private": repo.private,
            "url": {"web": f"{base_url}/{repo.repo_id}", "api": f"{base_url}/api/models/{repo.repo_id}"},
        },
        **extra,
    }
