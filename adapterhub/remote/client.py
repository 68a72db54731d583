"""The huggingface_hub glue: which endpoint, Xet off for servers that are not huggingface.co, progress bars,
the token, and huggingface_hub's errors turned into one-line `RemoteError`s (never showing the token).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import AdapterHubError, RemoteError

DEFAULT_ENDPOINT = "https://huggingface.co"
HF_HOSTS = ("huggingface.co", "hf.co", "hub-ci.huggingface.co")
REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
DOWNLOAD_CHUNK = 4 * 1024 * 1024


def resolve_endpoint(endpoint: str | None) -> str:
    url = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RemoteError(
            f"endpoint {url!r} is not an http(s) URL; give e.g. --endpoint http://127.0.0.1:8000"
        )
    return url


def is_hf_endpoint(endpoint: str) -> bool:
    host = urlsplit(endpoint).hostname or ""
    return host in HF_HOSTS or host.endswith(".huggingface.co")


def check_repo_id(repo_id: str) -> str:
    if not REPO_ID_RE.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise RemoteError(
            f"invalid repo id {repo_id!r}: use NAMESPACE/NAME with letters, digits, '-', '_' and '.'"
        )
    return repo_id


@contextlib.contextmanager
def hub_client(endpoint: str, *, progress: bool = False, what: str = "") -> Iterator[Any]:
    """Set huggingface_hub up for ``endpoint`` (Xet off unless it is huggingface.co, progress bars as asked)
    and translate its errors; yields the `huggingface_hub` module."""
    try:
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.utils import (
            are_progress_bars_disabled,
            disable_progress_bars,
            enable_progress_bars,
        )
    except ImportError:  # pragma: no cover - a dependency
        raise RemoteError("push and pull need huggingface_hub: pip install huggingface_hub") from None
    if constants.HF_HUB_OFFLINE:
        raise RemoteError(
            "HF_HUB_OFFLINE is set, so huggingface_hub makes no requests; unset it to push or pull"
        )
    old_xet = constants.HF_HUB_DISABLE_XET
    bars_were_off = are_progress_bars_disabled()
    if not is_hf_endpoint(endpoint):
        constants.HF_HUB_DISABLE_XET = True
    if not progress:
        disable_progress_bars()
    try:
        with translate_errors(endpoint, what):
            yield huggingface_hub
    finally:
        constants.HF_HUB_DISABLE_XET = old_xet
        if not progress and not bars_were_off:
            enable_progress_bars()


def _server_message(exc: Any) -> str:
    resp = getattr(exc, "response", None)
    msg = None
    if resp is not None:
        msg = resp.headers.get("X-Error-Message")
        if not msg:
            try:
                body = resp.json()
                msg = body.get("error") if isinstance(body, dict) else None
                if isinstance(msg, list):
                    msg = "; ".join(str(m) for m in msg)
            except Exception:
                msg = None
    text = str(msg or getattr(exc, "server_message", None) or exc)
    return " ".join(text.split())[:500]


@contextlib.contextmanager
def translate_errors(endpoint: str, what: str = "") -> Iterator[None]:
    from huggingface_hub import errors as hf

    where = f"{what} at {endpoint}" if what else endpoint
    try:
        yield
    except AdapterHubError:
        raise
    except hf.RepositoryNotFoundError:
        raise RemoteError(
            f"{where}: repository not found (it does not exist, or it is private and the token given by --token, "
            "HF_TOKEN or `hf auth login` is not its owner's)"
        ) from None
    except hf.RevisionNotFoundError:
        raise RemoteError(f"{where}: no such revision (branch or commit)") from None
    except hf.RemoteEntryNotFoundError:
        raise RemoteError(f"{where}: file not found in the repository") from None
    except hf.GatedRepoError:
        raise RemoteError(f"{where}: the repository is gated; request access on the Hub first") from None
    except hf.OfflineModeIsEnabled:
        raise RemoteError("HF_HUB_OFFLINE is set, so huggingface_hub makes no requests; unset it") from None
    except hf.LocalTokenNotFoundError:
        raise RemoteError(f"{where}: no token; pass --token, set HF_TOKEN or run `hf auth login`") from None
    except hf.HfHubHTTPError as exc:
        status = exc.response.status_code if getattr(exc, "response", None) is not None else None
        msg = _server_message(exc)
        if status == 401:
            raise RemoteError(
                f"{where}: the server refused the credentials (401: {msg}); pass a valid token with --token or HF_TOKEN"
            ) from None
        if status == 403:
            raise RemoteError(f"{where}: not allowed (403: {msg})") from None
        raise RemoteError(f"{where}: the server answered {status}: {msg}") from None
    except ValueError as exc:
        if exc.__class__.__module__.startswith("huggingface_hub") or "metadata" in str(exc).lower():
            raise RemoteError(f"{where}: {' '.join(str(exc).split())}") from None
        raise
    except OSError as exc:
        raise RemoteError(f"cannot reach {endpoint}: {exc.strerror or exc}") from None
    except Exception as exc:
        mod = exc.__class__.__module__
        if mod.startswith(("httpx", "httpcore", "h11")):
            raise RemoteError(
                f"cannot talk to {endpoint}: {exc.__class__.__name__}: {' '.join(str(exc).split())}"
            ) from None
        raise


def git_blob_oid_of(size: int) -> Any:
    h = hashlib.sha1()
    h.update(b"blob %d\0" % size)
    return h


def download(
    url: str,
    dest: Path,
    *,
    token: str | bool | None,
    expected_size: int | None,
    sha256: str | None,
    blob_oid: str | None,
    label: str,
    progress: bool = False,
) -> tuple[str, int]:
    """GET ``url`` into ``dest``, hashing on the way; checks the size and the sha256 (LFS files) or the git
    blob id (regular files). Returns (sha256, size). Raises RemoteError on a mismatch (and removes ``dest``)."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = build_hf_headers(token=token)
    headers["Accept-Encoding"] = "identity"
    h256 = hashlib.sha256()
    h1 = git_blob_oid_of(expected_size) if blob_oid is not None and expected_size is not None else None
    size = 0
    bar = None
    try:
        with get_session().stream("GET", url, headers=headers, follow_redirects=True) as resp:
            hf_raise_for_status(resp)
            if progress:
                from huggingface_hub.utils import tqdm

                bar = tqdm(total=expected_size, unit="B", unit_scale=True, desc=label)
            with open(dest, "wb") as f:
                for chunk in resp.iter_bytes(DOWNLOAD_CHUNK):
                    size += len(chunk)
                    if expected_size is not None and size > expected_size:
                        raise RemoteError(
                            f"{label}: the server sent more than the {expected_size} bytes it announced"
                        )
                    h256.update(chunk)
                    if h1 is not None:
                        h1.update(chunk)
                    f.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
        if expected_size is not None and size != expected_size:
            raise RemoteError(f"{label}: got {size} bytes, the server's listing says {expected_size}")
        digest = h256.hexdigest()
        if sha256 is not None and digest != sha256:
            raise RemoteError(
                f"{label}: sha256 {digest} does not match the server's LFS oid {sha256}; nothing was cataloged"
            )
        if h1 is not None and h1.hexdigest() != blob_oid:
            raise RemoteError(
                f"{label}: content does not match the server's git blob id {blob_oid}; nothing was cataloged"
            )
        return digest, size
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        raise
    finally:
        if bar is not None:
            bar.close()
