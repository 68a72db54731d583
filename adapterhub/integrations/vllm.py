"""adapterhub as a vLLM LoRA resolver: a vLLM server asked for ``model: "NAME"`` or ``"NAME@REVISION"``
that it has not loaded gets the cataloged adapter as a local PEFT folder, with no files copied by hand.

vLLM finds the plugin through the ``vllm.general_plugins`` entry point (`register`), enabled with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`` and ``VLLM_PLUGINS=adapterhub``; it asks each registered resolver
``resolve_lora(base_model_name, lora_name)``. The catalog is the home's (``ADAPTERHUB_HOME``,
``ADAPTERHUB_DB``, ``ADAPTERHUB_STORE`` as for every command).

`resolve_adapter` holds all the logic and needs no vLLM:
- ``NAME`` is the adapter cataloged under that name now; ``NAME@REVISION`` only if REVISION is a prefix
  (8 hex digits or more) of its sha256, so a client pinned to one version never gets another;
- an adapter tagged ``private`` is never handed over (vLLM has no per-client token: every client of the
  fleet would get it), unless the operator sets ``ADAPTERHUB_VLLM_ALLOW_PRIVATE=1``;
- ``owner/repo`` or ``owner/repo@rev`` that the catalog does not hold is pulled only where the operator
  allows it: ``ADAPTERHUB_VLLM_PULL=1`` and ``owner`` in ``ADAPTERHUB_VLLM_NAMESPACES`` (comma-separated);
  from the Hub server of ``$ADAPTERHUB_VLLM_ENDPOINT`` (else ``$HF_ENDPOINT``), with
  ``$ADAPTERHUB_VLLM_TOKEN`` only (never ``$HF_TOKEN``; none: anonymous), at the commit the revision names
  now, and cataloged as ``owner/repo-COMMIT12`` (hashes checked, validated), so a moved branch gives a new
  folder; a repo the server calls private is cataloged tagged ``private``; at most
  ``ADAPTERHUB_VLLM_MAX_PULLS`` (default 64) adapters are pulled per process;
- the folder is content-addressed (``CACHE/ab/<key>/``, CACHE being `default_cache`, the key a sha256 over the adapter's stored files),
  so a name reused for other content gets another folder and a new ``lora_int_id``: never a stale one;
- vLLM answers a name it has loaded without asking a resolver again, so `register` makes its table of
  loaded adapters a `FreshLoras`: a request naming an adapter this resolver handed over checks it
  against the catalog (`HandedOver.is_current`, at most once per `RECHECK_S` = 0.5 s per name) and a
  changed, removed or now private one is resolved again (tested against vLLM 0.32 in
  tests/test_vllm_real.py);
- the folder is written through a scratch folder and renamed into place when complete, with a manifest
  of its files' sha256, checked again each time it is handed over;
- ``validate --for vllm`` runs first: an adapter vLLM would refuse (DoRA, bias, ``modules_to_save``) is
  not handed over (the resolver answers None and vLLM says the model does not exist).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AdapterHubError
from ..names import is_valid_name
from ..server.privacy import PRIVATE_TAG, is_private
from ..store import scratch_prefix, sha256_file

if TYPE_CHECKING:
    from ..hub import Hub

__all__ = [
    "PULLS",
    "RECHECK_S",
    "RESOLVER_NAME",
    "PullBudget",
    "ResolvedAdapter",
    "FreshLoras",
    "HandedOver",
    "default_cache",
    "locate_adapter",
    "parse_model",
    "register",
    "resolve_adapter",
]

log = logging.getLogger(__name__)

#: the name vLLM knows the resolver by (``VLLM_PLUGINS=adapterhub``)
RESOLVER_NAME = "adapterhub"
MANIFEST = ".adapterhub-files.json"
MIN_REVISION = 8
DEFAULT_MAX_PULLS = 64
#: seconds a name vLLM holds is taken as current after the catalog said so (the check costs a catalog read)
RECHECK_S = 0.5
REVISION_RE = re.compile(r"^[A-Za-z0-9._\-/]{1,200}$")  # a branch, tag or commit: nothing to forge a log line


def _on(var: str) -> bool:
    """An operator's opt-in: exactly ``1`` (anything else, "true" included, leaves it off)."""
    return os.environ.get(var, "").strip() == "1"


class PullBudget:
    """The adapters this process pulled for vLLM clients, at most ``$ADAPTERHUB_VLLM_MAX_PULLS`` (default
    64): a client naming many repos or commits cannot fill the disk."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: set[str] = set()

    def __len__(self) -> int:
        return len(self._names)

    def take(self, name: str) -> bool:
        """Reserve a pull of ``name``; False when the cap is reached."""
        try:
            cap = int(os.environ.get("ADAPTERHUB_VLLM_MAX_PULLS") or DEFAULT_MAX_PULLS)
        except ValueError:
            cap = DEFAULT_MAX_PULLS
        with self._lock:
            if name in self._names or len(self._names) < cap:
                self._names.add(name)
                return True
            return False

    def give_back(self, name: str) -> None:
        with self._lock:
            self._names.discard(name)


#: this process's pulls
PULLS = PullBudget()


@dataclass(frozen=True)
class ResolvedAdapter:
    """A cataloged adapter as vLLM loads it: a PEFT folder and a stable integer id for its content."""

    name: str
    sha256: str  # the cataloged adapter's sha256 (its weights)
    key: str  # sha256 over all its stored files: the folder's name
    path: Path
    lora_int_id: int


def parse_model(model: str) -> tuple[str, str | None]:
    """``"NAME"`` -> (NAME, None); ``"NAME@REVISION"`` -> (NAME, REVISION)."""
    name, at, rev = model.partition("@")
    return name, (rev.lower() if at else None)


def _key(files: Any) -> str:
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: (f.role, f.filename)):
        h.update(f"{f.role}\0{f.filename}\0{f.sha256}\n".encode())
    return h.hexdigest()


def _manifest_ok(folder: Path) -> bool:
    try:
        want = json.loads((folder / MANIFEST).read_text())
        return bool(want) and all(sha256_file(folder / n) == d for n, d in want.items())
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def default_cache() -> Path:
    """``$ADAPTERHUB_VLLM_CACHE``, else ``adapterhub/vllm`` in the user's cache folder (outside the home:
    the home's own folders are never an export's destination)."""
    env = os.environ.get("ADAPTERHUB_VLLM_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adapterhub" / "vllm"


def locate_adapter(hub: Hub, model: str, *, cache: Path | None = None) -> ResolvedAdapter | None:
    """Where `resolve_adapter` would put ``model`` as the catalog stands now, with nothing written or
    pulled: None when the catalog holds no such adapter for vLLM (not at that revision, or private)."""
    name, rev = parse_model(model)
    if not name or not hub.library.exists(name):
        return None
    return _located(hub, name, rev, cache)


def _located(hub: Hub, name: str, rev: str | None, cache: Path | None) -> ResolvedAdapter | None:
    info = hub.adapter_info(name)
    if is_private(info.tags) and not _on("ADAPTERHUB_VLLM_ALLOW_PRIVATE"):
        log.warning("%s is tagged private and is not handed to vLLM (ADAPTERHUB_VLLM_ALLOW_PRIVATE=1)", name)
        return None
    if rev is not None and (len(rev) < MIN_REVISION or not info.sha256.startswith(rev)):
        return None
    key = _key(info.files or ())
    folder = (cache or default_cache()) / key[:2] / key
    return ResolvedAdapter(name, info.sha256, key, folder, int(key[:7], 16) + 1)


def resolve_adapter(hub: Hub, model: str, *, cache: Path | None = None) -> ResolvedAdapter | None:
    """The PEFT folder for ``model`` (``NAME`` or ``NAME@REVISION``), or None when the catalog has no
    such adapter (or not at that revision, or vLLM would refuse it)."""
    name, rev = parse_model(model)
    if not name:
        return None
    if not hub.library.exists(name):
        if "/" not in name:
            return None
        pulled = _pull(hub, name, rev)  # owner/repo@rev from a Hub server, pinned to its commit
        if pulled is None:
            return None
        name, rev = pulled, None
    resolved = _located(hub, name, rev, cache)
    if resolved is None:
        return None
    folder = resolved.path
    if _manifest_ok(folder):
        return resolved
    report = hub.validate(name, for_="vllm", scan_values=False)
    if not report.ok:
        log.warning("%s is not handed to vLLM: %s", name, report.summary())
        return None
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=folder.parent, prefix=scratch_prefix(".vllm")))
    try:
        out = hub.export_adapter(name, scratch / "peft", format="peft")
        files = sorted(p.name for p in out.iterdir() if p.is_file())
        (out / MANIFEST).write_text(json.dumps({n: sha256_file(out / n) for n in files}))
        if folder.exists():  # a stale or broken copy (a file changed by hand), or another process's
            if _manifest_ok(folder):
                return resolved
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(out, folder)
        except OSError:
            if not _manifest_ok(folder):  # another process put it there meanwhile
                raise
    except AdapterHubError as exc:
        log.warning("%s is not handed to vLLM: %s", name, exc)
        return None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return resolved


def _pull(hub: Hub, repo_id: str, revision: str | None) -> str | None:
    """Catalog ``repo_id`` at ``revision`` (default main) as ``repo_id-COMMIT12`` where the operator allows
    it (see the module docstring); a commit cataloged before is not downloaded again. None when pulling is
    not allowed for this name, there is no server or no such repo, or the cap is reached."""
    owner, _, repo = repo_id.partition("/")
    if not (repo and "/" not in repo and is_valid_name(repo_id)) or (
        revision is not None and not REVISION_RE.match(revision)
    ):
        return None
    if not _on("ADAPTERHUB_VLLM_PULL"):
        return None
    allowed = {n.strip() for n in os.environ.get("ADAPTERHUB_VLLM_NAMESPACES", "").split(",")}
    if owner not in allowed - {""}:
        log.warning("%s is not pulled for vLLM: its namespace is not in ADAPTERHUB_VLLM_NAMESPACES", repo_id)
        return None
    endpoint = os.environ.get("ADAPTERHUB_VLLM_ENDPOINT") or os.environ.get("HF_ENDPOINT")
    if not endpoint:
        return None
    # never the operator's own HF_TOKEN or login: False keeps huggingface_hub from finding them
    token: str | bool = os.environ.get("ADAPTERHUB_VLLM_TOKEN") or False
    try:
        from huggingface_hub import HfApi

        meta = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision)
        commit = meta.sha
        if not isinstance(commit, str) or len(commit) < 12:
            return None
        name = f"{repo_id}-{commit[:12]}"
        # what only a token could read is private, unless the server says otherwise
        private = token is not False and meta.private is not False
        if hub.library.exists(name):
            if private and not is_private(hub.adapter_info(name).tags):
                hub.tag_adapter(name, [PRIVATE_TAG])
            return name
        if not PULLS.take(name):
            log.warning(
                "%s is not pulled for vLLM: this process pulled ADAPTERHUB_VLLM_MAX_PULLS already", name
            )
            return None
        try:
            hub.pull_adapter(
                f"{repo_id}@{commit}",
                name=name,
                endpoint=endpoint,
                token=token,
                tags=[PRIVATE_TAG] if private else [],
            )
        except BaseException:
            PULLS.give_back(name)
            raise
    except Exception as exc:  # no such repo or revision, no access, an unreachable server: vLLM says 404
        log.warning("%s@%s is not handed to vLLM: %s", repo_id, revision or "main", str(exc).splitlines()[0])
        return None
    return name


class HandedOver:
    """The folders the resolver handed to vLLM, by the name vLLM knows each under, and whether each is
    still what the catalog holds under that name (`FreshLoras` asks on every request naming it; the
    catalog is read at most once per `RECHECK_S` per name, so a change is seen by the requests that
    start more than `RECHECK_S` after it)."""

    def __init__(self, hub: Hub, cache: Path | None = None) -> None:
        self.hub, self.cache = hub, cache
        self._handed: dict[str, str] = {}
        self._checked: dict[str, float] = {}  # lora_name -> when the catalog last said it is current

    def record(self, lora_name: str, path: Path) -> None:
        self._handed[lora_name] = str(path)
        self._checked[lora_name] = time.monotonic()

    def is_current(self, lora_name: str, lora_path: str | None) -> bool | None:
        """True while ``lora_path`` is what ``lora_name`` resolves to now; False once the catalog holds other
        content under it, none, or only a private one; None for what was not handed over here, and for a
        pulled ``owner/repo`` (kept at the commit it was pulled at: name ``owner/repo@COMMIT`` to move)."""
        if lora_path is None or self._handed.get(lora_name) != lora_path:
            return None
        if time.monotonic() - self._checked.get(lora_name, -RECHECK_S) < RECHECK_S:
            return True
        name, _ = parse_model(lora_name)
        try:
            if "/" in name and not self.hub.library.exists(name):
                return None
            now = locate_adapter(self.hub, lora_name, cache=self.cache)
        except Exception as exc:  # the catalog cannot say: vLLM asks the resolver again
            log.warning("%s could not be checked against the catalog: %s", lora_name, exc)
            now = None
        if now is None or str(now.path) != lora_path:
            self._handed.pop(lora_name, None)
            return False
        self._checked[lora_name] = time.monotonic()
        return True


class FreshLoras(dict[str, Any]):
    """vLLM's table of loaded adapters by name (``OpenAIServingModels.lora_requests``), made to forget a
    name the resolver handed over once the catalog holds other content (or nothing) under it: vLLM
    answers a name it holds without asking a resolver again, so without this a reused name would be
    served stale. Entries vLLM loaded itself (``--lora-modules``, ``/v1/load_lora_adapter``) are kept."""

    def __init__(self, loaded: dict[str, Any], is_current: Any) -> None:
        super().__init__(loaded)
        self.is_current = is_current  # (lora_name, lora_path) -> True / False / None (not ours)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        entry = dict.get(self, name)
        if entry is None:
            return False
        if self.is_current(name, getattr(entry, "lora_path", None)) is False:
            dict.pop(self, name, None)
            log.info("%s changed in the catalog: vLLM loads it again", name)
            return False
        return True


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the ``adapterhub`` LoRA resolver."""
    import asyncio

    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    from ..hub import Hub

    class AdapterhubResolver(LoRAResolver):
        def __init__(self) -> None:
            self.handed = HandedOver(Hub())

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            found = await asyncio.to_thread(resolve_adapter, self.handed.hub, lora_name)
            if found is None:
                return None
            self.handed.record(lora_name, found.path)
            return LoRARequest(lora_name=lora_name, lora_int_id=found.lora_int_id, lora_path=str(found.path))

    resolver = AdapterhubResolver()
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, resolver)
    _keep_loaded_names_fresh(resolver.handed.is_current)


def _keep_loaded_names_fresh(is_current: Any) -> None:
    """Make each of vLLM's adapter tables a `FreshLoras`: vLLM has no hook for it, so its
    ``OpenAIServingModels`` is wrapped where it has the table this was tested with (vLLM 0.32)."""
    try:
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    except ImportError:
        log.warning("this vLLM has no OpenAIServingModels: a reused adapter name may be served stale")
        return
    init = OpenAIServingModels.__init__
    if getattr(init, "_adapterhub", False):
        return

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        table = getattr(self, "lora_requests", None)
        if isinstance(table, dict):
            self.lora_requests = FreshLoras(table, is_current)
        else:
            log.warning("this vLLM keeps no lora_requests table: a reused adapter name may be served stale")

    __init__._adapterhub = True  # type: ignore[attr-defined]
    OpenAIServingModels.__init__ = __init__
