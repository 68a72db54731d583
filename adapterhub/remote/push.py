"""Push a cataloged adapter to a Hub repo: PEFT files straight from the store, a model card, and the
catalog record as ``adapterhub.json``, in one commit (none when nothing changed)."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from .. import faults
from ..errors import InvalidAdapterError, RemoteError
from ..services.adapters import config_naming_public_base
from ..services.evaluation import evaluations
from .card import model_card
from .client import check_repo_id, hub_client, resolve_endpoint
from .results import PushResult

if TYPE_CHECKING:
    from ..catalog.library import Library
    from ..records import AdapterInfo

log = logging.getLogger(__name__)

RECORD_NAME = "adapterhub.json"
#: parts of `AdapterInfo.to_dict()` that describe the local catalog, left out of ``adapterhub.json``
LOCAL_HISTORY = ("merges", "pushes", "children")


def public_source(source: str | None) -> str | None:
    """The record's source as it may be published: Hub origins (``repo@commit``) and derivations
    (``derived:linear``) are kept; local file system paths are not sent to a server."""
    if not source:
        return None
    if source.startswith("derived:"):
        return ":".join(source.split(":")[:2])
    if "@" in source and not source.startswith(("/", ".", "~")) and ":\\" not in source:
        return source
    return None


def _with_public_base(lib: Library, info: AdapterInfo) -> AdapterInfo:
    """``info`` naming its base by the real id when its declared base is a registered base's local name
    (the card's ``base_model`` must be something the Hub resolves)."""
    import dataclasses

    found = lib.bases(info.base_model) if info.base_model else []
    return dataclasses.replace(info, base_model=found[0].public_id) if found else info


def record_bytes(record: dict[str, Any]) -> bytes:
    import jsonschema

    from ..resources import load_schema

    errors = sorted(
        jsonschema.Draft202012Validator(load_schema("adapter.schema.json")).iter_errors(record), key=str
    )
    if errors:
        raise InvalidAdapterError(
            f"the catalog record does not fit schemas/adapter.schema.json: {errors[0].message}"
        )
    return (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode()


def push_adapter(
    lib: Library,
    name: str,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    progress: bool = False,
) -> PushResult:
    info = lib.info(name)
    files = lib.files(name)
    url = resolve_endpoint(endpoint)
    branch = revision or "main"
    # what the adapter is, not this catalog's history of it (merges, pushes, children change on their own)
    record = {k: v for k, v in info.to_dict().items() if k not in LOCAL_HISTORY}
    record["source"] = public_source(record["source"])
    payload = record_bytes(record)
    with hub_client(url, progress=progress, what=repo_id) as hf:
        from huggingface_hub import CommitOperationAdd, HfApi

        tok = token or hf.get_token()
        if not tok:
            raise RemoteError(
                "pushing needs a write token: pass --token, set HF_TOKEN or run `hf auth login` "
                "(for an adapterhub server: adapterhub token create USER --write)"
            )
        api = HfApi(endpoint=url, token=tok)
        if "/" not in repo_id:
            repo_id = f"{api.whoami()['name']}/{repo_id}"
        check_repo_id(repo_id)
        readme = model_card(_with_public_base(lib, info), repo_id, evaluations(lib, name)).encode()
        ops = []
        by_role = {f.role: f for f in info.files or ()}
        for role, path in (("config", files.config), ("weights", files.weights)):
            if path is None:
                continue
            f = by_role[role]
            renamed = config_naming_public_base(lib, path.read_bytes()) if role == "config" else None
            if renamed is not None:  # it names the base by its real id, as an export does
                ops.append(CommitOperationAdd(path_in_repo=f.filename, path_or_fileobj=renamed))
                continue
            op = CommitOperationAdd(path_in_repo=f.filename, path_or_fileobj=str(path))
            op.upload_info.sha256 = bytes.fromhex(f.sha256)  # known from the store: no second hashing pass
            ops.append(op)
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme))
        ops.append(CommitOperationAdd(path_in_repo=RECORD_NAME, path_or_fileobj=payload))
        _ensure_repo(api, repo_id, private=private)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        hf_log = logging.getLogger("huggingface_hub.hf_api")
        level = hf_log.level
        if not log.isEnabledFor(logging.DEBUG):
            hf_log.setLevel(logging.ERROR)  # its "No files have been modified" warning: we report `changed`
        faults.point("push.uploading")
        try:
            commit = api.create_commit(
                repo_id,
                ops,
                commit_message=message or f"Upload adapter {name} with adapterhub",
                revision=branch,
            )
        finally:
            hf_log.setLevel(level)
        changed = any(op._remote_oid is None or op._remote_oid != op._local_oid for op in ops)
        is_private = bool(api.model_info(repo_id, revision=commit.oid).private) if not private else True
    result = PushResult(
        name=name,
        repo_id=repo_id,
        endpoint=url,
        revision=branch,
        commit=commit.oid,
        commit_url=commit.commit_url,
        changed=changed,
        private=is_private,
    )
    lib.record_push(
        name,
        endpoint=url,
        repo_id=repo_id,
        revision=branch,
        commit=commit.oid,
        commit_url=commit.commit_url,
    )
    log.info("pushed %s to %s@%s (%s)", name, repo_id, commit.oid, "new commit" if changed else "unchanged")
    return result


def _ensure_repo(api: Any, repo_id: str, *, private: bool) -> None:
    """Create ``repo_id`` unless it exists. (``create_repo(exist_ok=True)`` turns a server's 403 into an
    "Invalid HF URI" error for any endpoint but huggingface.co, so a 409 is handled here instead.)"""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_repo(repo_id, private=private, exist_ok=False)
    except HfHubHTTPError as exc:
        if exc.response is None or exc.response.status_code != 409:
            raise
