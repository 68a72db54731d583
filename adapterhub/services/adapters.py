"""Adding adapters to a Library and exporting them out of it."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .. import faults
from ..errors import (
    AdapterExistsError,
    AdapterHubError,
    AdapterNotFoundError,
    BaseModelError,
    InvalidAdapterError,
    InvalidOptionError,
    OutputExistsError,
)
from ..names import check_name, check_tags, name_from_path
from ..store import Progress, scratch_prefix
from .maintenance import journal

if TYPE_CHECKING:
    from ..catalog.library import BaseLayoutRow, Library
    from ..formats import AdapterFiles
    from ..lora import LoraWeights
    from ..records import AdapterInfo

#: what an exported PEFT folder holds; `export --overwrite` replaces only a folder holding nothing else
EXPORT_FILES = frozenset(
    {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md", "adapterhub.json"}
)


def check_refs(lib: Library, refs: Sequence[str | os.PathLike[str]]) -> None:
    """Fail early, before a base is loaded, on a reference that is neither a cataloged adapter nor a path."""
    for ref in refs:
        if not lib.exists(str(ref)) and not Path(ref).exists():
            raise unknown_ref(lib, str(ref))


def unknown_ref(lib: Library, ref: str) -> AdapterHubError:
    """The error for ``ref``, neither a cataloged adapter nor a path: a ``NAME:WEIGHT`` whose weight is not a
    number (when NAME is an adapter) says so; anything else is not found, in the catalog or on disk."""
    head, sep, tail = ref.rpartition(":")
    if sep and head and (lib.exists(head) or Path(head).exists()):
        return InvalidOptionError(
            f"{ref}: the weight {tail!r} is not a number (give NAME:WEIGHT, as {head}:0.5)"
        )
    return AdapterNotFoundError(ref, path_too=True)


def add_adapter(
    lib: Library,
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    base: str | None = None,
    tags: Sequence[str] = (),
    description: str | None = None,
    allow_pickle: bool = False,
    source: str | None = None,
    progress: Progress | None = None,
) -> AdapterInfo:
    """Check an adapter, copy its files into the store and catalog it, all or nothing."""
    from ..formats import AdapterFiles, check_finite, convert_pickle, detect, read_adapter

    src = Path(path)
    _check_source(src)
    files = detect(src, allow_pickle=allow_pickle)
    name = check_name(name if name is not None else name_from_path(src))
    tag_list = check_tags(tags)
    if lib.exists(name):
        raise AdapterExistsError(name)
    from .maintenance import sweep

    sweep(lib, "add")
    tmpdir: str | None = None
    try:
        if files.pickle:
            lib.store.tmp.mkdir(parents=True, exist_ok=True)
            tmpdir = tempfile.mkdtemp(dir=lib.store.tmp, prefix=scratch_prefix("pickle"))
            converted = convert_pickle(files.weights, Path(tmpdir) / "adapter_model.safetensors")
            files = AdapterFiles("peft", converted, files.config)
        weights = read_adapter(files)
        check_finite(files)  # NaN/Inf factors: refused now, not at the first merge
        return lib.ingest(
            name,
            files,
            weights,
            base=base,
            tags=tag_list,
            description=description,
            source=source or str(src.resolve()),
            progress=progress,
        )
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _check_source(src: Path) -> None:
    """A clear line for what is not a readable folder or regular file (a symlink loop, a FIFO, a device)."""
    try:
        st = os.stat(src)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidAdapterError(
                f"{src} is a symbolic link that loops back on itself", path=str(src)
            ) from None
        raise InvalidAdapterError(f"cannot read {src}: {exc.strerror}", path=str(src)) from None
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise InvalidAdapterError(
            f"{src} is not a regular file or folder (a pipe or a device); give an adapter folder or a "
            ".safetensors file",
            path=str(src),
        )


def load_adapter(lib: Library, name: str) -> LoraWeights:
    """A cataloged adapter with its tensors loaded."""
    from ..formats import read_adapter

    return read_adapter(lib.files(name), load=True)


def export_adapter(
    lib: Library,
    name: str,
    dest: str | os.PathLike[str],
    *,
    format: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write a cataloged adapter out: a PEFT folder, a kohya or diffusers ``.safetensors`` file, or a
    llama.cpp / ollama GGUF LoRA (``.gguf``; needs the adapter's base registered, for its head counts).
    A kohya UNet LoRA converts to diffusers with its registered base's (the UNet's) key list.

    In its own format the stored files are copied byte for byte (but for a PEFT config naming a registered
    base by its local name: it names the base's real id, as conversions do); otherwise it is converted. With
    ``overwrite`` an earlier export is replaced once the new one is complete; anything else (the current
    folder, the home, a folder holding other files) is refused.
    """
    from ..formats import FORMATS

    info = lib.info(name)
    fmt = format or info.format
    if fmt not in FORMATS:
        raise InvalidAdapterError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    files = lib.files(name)
    out = Path(dest)
    as_folder = str(dest).endswith(("/", os.sep)) or out.is_dir()
    if fmt != "peft" and as_folder:
        out = out / (Path(name).name + SINGLE_FILE_SUFFIX[fmt])
    base = _export_base(lib, info, fmt) if fmt != info.format else None
    _check_destination(lib, out, fmt=fmt, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with journal(lib, out, kind="export"):
        return _write_export(lib, info, files, out, fmt, progress, base)


#: the file name ending of each single-file export format
SINGLE_FILE_SUFFIX = {"kohya": ".safetensors", "diffusers": ".safetensors", "gguf": ".gguf"}


def _export_base(lib: Library, info: AdapterInfo, fmt: str) -> BaseLayoutRow | None:
    """The registered base a GGUF or diffusers export needs (head counts; the UNet's key list)."""
    if fmt not in ("gguf", "diffusers") or (fmt == "diffusers" and info.format != "kohya"):
        return None
    declared = info.base_model
    found = lib.base_layout(declared) if declared else None
    if found is None and declared:  # a base whose config's _name_or_path is the declared name
        fingerprint = lib.fingerprint_of(declared)
        name = next((b.name for b in lib.bases() if fingerprint and b.fingerprint == fingerprint), None)
        found = lib.base_layout(name) if name else None
    if found is None:
        need = "its config (model type, attention heads)" if fmt == "gguf" else "the UNet's tensor names"
        raise BaseModelError(
            f"{info.name}: a {fmt} export needs {need} from a registered base, and the adapter's base "
            f"{declared!r} is not registered; `adapterhub base add FOLDER --name NAME` registers it, then add "
            "the adapter with --base NAME"
        )
    return found


def _write_export(
    lib: Library,
    info: AdapterInfo,
    files: AdapterFiles,
    out: Path,
    fmt: str,
    progress: Progress | None,
    base: BaseLayoutRow | None = None,
) -> Path:
    from ..formats import read_adapter, write_adapter

    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    old: Path | None = None
    try:
        if fmt == info.format:
            for f in info.files or ():
                lib.store.copy_out(
                    f.sha256, tmp / f.filename, progress=progress if f.role == "weights" else None
                )
                if f.role == "config" and fmt == "peft":
                    _name_the_base(lib, tmp / f.filename)
            weights_name = next(f.filename for f in info.files or () if f.role == "weights")
            produced = tmp if fmt == "peft" else tmp / weights_name
        else:
            weights = read_adapter(files, load=True)
            # the catalog's word (add --base), by the base's real id when it is a registered one's name
            weights.base_model = public_base_id(lib, info.base_model or weights.base_model)
            target = tmp if fmt == "peft" else tmp / out.name
            base_config = None
            if base is not None and fmt == "gguf":
                base_config = {"model_type": base.model_type, **dict(base.config or {})}
            if fmt == "diffusers":  # a kohya UNet LoRA, its stems mapped with the UNet's keys
                from ..formats.diffusers import write_diffusers
                from ..ops.diffusers_keys import kohya_to_diffusers

                if base is None:
                    raise InvalidAdapterError(f"a {info.format} adapter does not convert to diffusers")
                produced = write_diffusers(kohya_to_diffusers(weights, base.shapes), target)
            else:
                produced = write_adapter(weights, target, format=fmt, base_config=base_config)
        _apply_umask(produced)
        faults.point("export.writing")
        if out.is_dir():  # an earlier export, checked above: set it aside, then swap the new one in
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
        try:
            os.replace(produced, out)  # a file replaces a file atomically
        except BaseException:
            if old is not None:
                os.replace(old, out)
                old = None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def public_base_id(lib: Library, declared: str | None) -> str | None:
    """What an adapter should name as its base outside this home: for the local name of a registered base
    whose real id is known (`BaseInfo.hub_id`), that id; anything else as it is."""
    found = lib.bases(declared) if declared else []
    return found[0].public_id if found else declared


def _name_the_base(lib: Library, config: Path) -> None:
    renamed = config_naming_public_base(lib, config.read_bytes())
    if renamed is not None:
        config.write_bytes(renamed)


def config_naming_public_base(lib: Library, config: bytes) -> bytes | None:
    """An adapter_config.json whose base_model_name_or_path is a registered base's local name, rewritten
    to name the base's real id (PEFT and the Hub cannot resolve a local name); None when it needs no change."""
    import json

    try:
        doc = json.loads(config)
    except ValueError:
        return None
    declared = doc.get("base_model_name_or_path") if isinstance(doc, dict) else None
    public = public_base_id(lib, declared) if isinstance(declared, str) else None
    if public is None or public == declared:
        return None
    doc["base_model_name_or_path"] = public
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def _check_destination(lib: Library, out: Path, *, fmt: str, overwrite: bool) -> None:
    """Refuse a destination whose replacement could lose anything but an earlier export."""
    resolved = out.resolve()
    home = lib.home.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputExistsError(f"{out} is the current folder (or holds it); export into a new folder")
    if resolved == home or resolved in home.parents or home in resolved.parents:
        raise OutputExistsError(
            f"{out} is or is inside the adapterhub home {lib.home}; export somewhere else"
        )
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not out.is_symlink():
        entries = list(out.iterdir())
        if not entries:
            return
        if not overwrite:
            raise OutputExistsError(f"{out} already exists; choose another destination or pass --overwrite")
        if fmt != "peft":
            raise OutputExistsError(
                f"{out} is a folder; a {fmt} export is one {SINGLE_FILE_SUFFIX[fmt]} file"
            )
        names = {e.name for e in entries}
        foreign = sorted(n for n in names if n not in EXPORT_FILES or (out / n).is_dir())
        if foreign or not names & {"adapter_config.json", "adapter_model.safetensors"}:
            shown = ", ".join(foreign[:3]) or "no adapter files"
            raise OutputExistsError(
                f"{out} is not an earlier adapter export (it holds {shown}); --overwrite replaces only an "
                "exported adapter folder"
            )
        return
    if not overwrite:
        raise OutputExistsError(f"{out} already exists; choose another destination or pass --overwrite")
    if fmt == "peft" or out.is_symlink() or not out.is_file() or out.suffix != SINGLE_FILE_SUFFIX[fmt]:
        raise OutputExistsError(
            f"{out} is not an earlier adapter export; --overwrite replaces only an exported adapter"
        )


def _apply_umask(path: Path) -> None:
    """Temporary folders are made 0700; the export gets the modes the user's umask gives new files."""
    mask = os.umask(0)
    os.umask(mask)
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for f in path.iterdir():
            os.chmod(f, 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)
