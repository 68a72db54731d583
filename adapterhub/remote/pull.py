"""Pull an adapter from a Hub repo into the catalog: only the files an adapter needs, each checked against
the server's sha256 (LFS oid) or git blob id, validated like `add`, and cataloged with its source
``repo@commit``. Nothing reaches the catalog or the store unless every check passed."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import faults
from ..errors import AdapterExistsError, AdapterHubError, InvalidAdapterError, PickleRefusedError, RemoteError
from ..names import check_name, check_tags, is_valid_name
from ..store import scratch_prefix
from .client import check_repo_id, download, hub_client, resolve_endpoint
from .push import RECORD_NAME
from .results import PullResult

if TYPE_CHECKING:
    from ..catalog.library import Library
    from ..records import AdapterInfo

log = logging.getLogger(__name__)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"
RECORD_LIMIT = 16 * 1024 * 1024
CARD_NAME = "README.md"


def parse_spec(spec: str) -> tuple[str, str | None]:
    repo_id, sep, revision = spec.partition("@")
    if sep and not revision:
        raise RemoteError(f"{spec!r}: give a revision after '@' (a branch or a commit id), or leave '@' out")
    return check_repo_id(repo_id), revision or None


def is_traversal(path: str) -> bool:
    return (
        not path
        or path.startswith(("/", "~"))
        or "\\" in path
        or "\x00" in path
        or ":" in path.split("/")[0]
        or any(seg in ("", ".", "..") for seg in path.split("/"))
    )


def pull_adapter(
    lib: Library,
    spec: str,
    *,
    name: str | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,  # False: no token at all, not even HF_TOKEN
    allow_pickle: bool = False,
    progress: bool = False,
    tags: Sequence[str] = (),
) -> PullResult:
    repo_id, revision = parse_spec(spec)
    extra_tags = check_tags(tags)
    url = resolve_endpoint(endpoint)
    if name is not None:
        check_name(name)
    with hub_client(url, progress=progress, what=spec) as _hf:
        from huggingface_hub import HfApi, hf_hub_url
        from huggingface_hub.hf_api import RepoFile

        api = HfApi(endpoint=url, token=token)
        commit = api.model_info(repo_id, revision=revision).sha
        if not isinstance(commit, str) or len(commit) != 40:
            raise RemoteError(f"{spec} at {url}: the server gave no commit id for this revision")
        source = f"{repo_id}@{commit}"
        already = lib.names_by_source(source)
        if already and (name is None or name in already):
            info = lib.info(name or already[0])
            return PullResult(info, repo_id, url, commit, changed=False)
        entries = {
            f.path: f
            for f in api.list_repo_tree(repo_id, revision=commit, recursive=True)
            if isinstance(f, RepoFile)
        }
        bad = sorted(p for p in entries if is_traversal(p))
        if bad:
            raise InvalidAdapterError(
                f"{source} lists a file named {bad[0]!r}, which points outside the repository; refusing to pull "
                "from it (nothing was downloaded)"
            )
        wanted = _choose_files(source, entries, allow_pickle=allow_pickle)
        with_record = RECORD_NAME in entries and entries[RECORD_NAME].size <= RECORD_LIMIT
        from ..services.maintenance import sweep

        sweep(lib, "pull")
        with_card = CARD_NAME in entries and entries[CARD_NAME].size <= RECORD_LIMIT
        lib.store.tmp.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=lib.store.tmp, prefix=scratch_prefix("pull")))
        try:
            digests: dict[str, tuple[str, int]] = {}
            for path in [
                *wanted,
                *([RECORD_NAME] if with_record else []),
                *([CARD_NAME] if with_card else []),
            ]:
                e = entries[path]
                digests[path] = download(
                    hf_hub_url(repo_id, path, revision=commit, endpoint=url),
                    tmp / path,
                    token=token,
                    expected_size=e.size,
                    sha256=e.lfs.sha256 if e.lfs is not None else None,
                    blob_oid=None if e.lfs is not None else e.blob_id,
                    label=f"{repo_id}/{path}",
                    progress=progress and e.size > 1_000_000,
                )
            faults.point("pull.downloaded")
            record = _read_record(tmp / RECORD_NAME, source) if with_record else None
            if record is not None:
                (tmp / RECORD_NAME).unlink()
            if name is None:
                name = _default_name(record, repo_id)
            check_name(name)
            if lib.exists(name):
                raise AdapterExistsError(name)
            results = _card_results(tmp / CARD_NAME) if with_card else []
            if with_card:
                (tmp / CARD_NAME).unlink()
            info = _catalog(
                lib, tmp, name, source, record, digests, allow_pickle=allow_pickle, tags=extra_tags
            )
            _record_results(lib, info, source, results)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("pulled %s as %s", source, info.name)
    return PullResult(info, repo_id, url, commit, changed=True, files=tuple(wanted))


def _card_results(path: Path) -> list[dict[str, Any]]:
    from .card import read_model_index

    try:
        return read_model_index(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return []


def _record_results(lib: Library, info: AdapterInfo, source: str, results: list[dict[str, Any]]) -> None:
    """The card's evaluation results as evaluation records of the pulled adapter (source: repo@commit)."""
    if not results:
        return
    from ..services.evaluation import record_evaluation

    for r in results:
        try:
            record_evaluation(
                lib,
                info.name,
                base=r["base"] or (info.base_model or ""),
                dataset=r["dataset"],
                dataset_sha256=r["dataset_sha256"],
                values={r["metric"]: r["value"]},
                rows=r["rows"],
                seed=r["seed"],
                source=source,
                base_fingerprint=r["base_fingerprint"],
            )
        except AdapterHubError as exc:  # a metric this version does not know, say: the adapter stays
            log.warning("%s: skipping the card's result %s/%s (%s)", source, r["dataset"], r["metric"], exc)


def _choose_files(source: str, entries: dict[str, Any], *, allow_pickle: bool) -> list[str]:
    if CONFIG in entries:
        if WEIGHTS in entries:
            return [CONFIG, WEIGHTS]
        if PICKLE in entries:
            if not allow_pickle:
                raise PickleRefusedError(
                    f"{source} holds only pickle weights ({PICKLE}), which can run arbitrary code when loaded; "
                    "nothing was downloaded. Pass --allow-pickle to convert them with "
                    "torch.load(weights_only=True), or ask the owner for adapter_model.safetensors",
                    path=source,
                )
            return [CONFIG, PICKLE]
        raise InvalidAdapterError(
            f"{source} has {CONFIG} but no {WEIGHTS}; it holds no adapter to pull", path=source
        )
    singles = [p for p in entries if p.endswith(".safetensors") and "/" not in p]
    if len(singles) == 1:
        return singles
    raise InvalidAdapterError(
        f"{source} holds no adapter: no {CONFIG} with {WEIGHTS} (a PEFT adapter), and not exactly one "
        ".safetensors file (a kohya LoRA) at its root",
        path=source,
    )


def _read_record(path: Path, source: str) -> dict[str, Any] | None:
    import jsonschema

    from ..resources import load_schema

    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        jsonschema.Draft202012Validator(load_schema("adapter.schema.json")).validate(record)
    except (ValueError, jsonschema.ValidationError) as exc:
        log.warning(
            "%s: ignoring %s, which does not fit the adapter schema (%s)",
            source,
            RECORD_NAME,
            str(exc).splitlines()[0],
        )
        return None
    return record if isinstance(record, dict) else None


def _default_name(record: dict[str, Any] | None, repo_id: str) -> str:
    if record and isinstance(record.get("name"), str) and is_valid_name(record["name"]):
        return str(record["name"])
    return repo_id.split("/")[-1]


def _catalog(
    lib: Library,
    folder: Path,
    name: str,
    source: str,
    record: dict[str, Any] | None,
    digests: dict[str, tuple[str, int]],
    *,
    allow_pickle: bool,
    tags: Sequence[str] = (),
) -> AdapterInfo:
    """Validate the downloaded folder like `add`, then ingest it with the digests already verified."""
    from ..catalog.library import Verified
    from ..formats import AdapterFiles, check_finite, convert_pickle, detect, read_adapter
    from ..store import sha256_file

    files = detect(folder, allow_pickle=allow_pickle)
    if files.pickle:
        converted = convert_pickle(files.weights, folder / WEIGHTS)
        files.weights.unlink()
        files = AdapterFiles("peft", converted, files.config)
        digests[WEIGHTS] = (sha256_file(converted), converted.stat().st_size)
    weights = read_adapter(files)
    check_finite(files)
    record = record or {}
    own = check_tags([t for t in record.get("tags") or [] if isinstance(t, str)])
    tags = [
        *own,
        *(t for t in tags if t not in own),
    ]  # the caller's tags (`private`) whatever the record says
    parents = [
        {
            "parent_name": p["name"],
            "weight": p.get("weight"),
            "method": p["method"],
            "params": p.get("params") or {},
        }
        for p in record.get("parents") or []
    ]
    verified = {
        path: Verified(*digests[path.name]) for path in (files.config, files.weights) if path is not None
    }
    return lib.ingest(
        name,
        files,
        weights,
        base=record.get("base_model") or None,
        tags=tags,
        description=record.get("description"),
        source=source,
        parents=parents,
        verified=verified,
    )
