"""Base models in a Library, and validation of adapters against them and against each other."""

from __future__ import annotations

import contextlib
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from ..errors import AdapterHubError, AdapterNotFoundError, BaseModelError, InvalidOptionError
from ..names import check_name

if TYPE_CHECKING:
    from ..catalog.library import Library
    from ..formats import AdapterFiles
    from ..lora import LoraWeights
    from ..ops.validate import BaseLayout, Check, ValidationReport
    from ..records import BaseInfo
    from ..store import Progress


#: what ``validate(for_=...)`` checks an adapter for
SERVING_TARGETS = ("vllm",)


def _not_registered(name: str) -> BaseModelError:
    return BaseModelError(f"no base model named {name!r} is registered; `adapterhub base list` shows them")


#: a Hugging Face Hub repo id, ``owner/name``
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def check_hub_id(hub_id: str) -> str:
    if not HUB_ID_RE.match(hub_id) or ".." in hub_id or hub_id.endswith((".", "-")):
        raise InvalidOptionError(
            f"--hub-id {hub_id!r} is not a Hub repo id; give OWNER/NAME, as HuggingFaceTB/SmolLM2-135M"
        )
    return hub_id


def _hub_id_of(config: dict[str, Any]) -> str | None:
    """A folder's own record of where it came from: its config's ``_name_or_path`` when that is a Hub
    repo id (not a local path)."""
    where = config.get("_name_or_path")
    if isinstance(where, str) and HUB_ID_RE.match(where) and not Path(where).exists():
        return where
    return None


def add_base(
    lib: Library, path: str | os.PathLike[str], *, name: str | None = None, hub_id: str | None = None
) -> BaseInfo:
    """Register a base checkpoint folder: tensor names, shapes and dtypes from its headers only.
    ``hub_id`` is its real id (default: the config's ``_name_or_path`` when that is a Hub repo id),
    which exports write as the base of the adapters trained on it."""
    return _register(lib, path, name=name, hub_id=check_hub_id(hub_id) if hub_id is not None else None)


def _register(
    lib: Library, path: str | os.PathLike[str], *, name: str | None, hub_id: str | None
) -> BaseInfo:
    from ..formats.checkpoint import read_checkpoint

    ckpt = read_checkpoint(path)
    base_name = check_name(name if name is not None else Path(path).resolve().name)
    dtypes = Counter(info.dtype for _, info in ckpt.tensors.values())
    row = {
        "name": base_name,
        "path": str(Path(path).resolve()),
        "model_type": ckpt.model_type,
        "architectures": list(ckpt.architectures),
        "num_params": ckpt.num_params,
        "num_tensors": len(ckpt.tensors),
        "size_bytes": ckpt.total_bytes,
        "dtype": dtypes.most_common(1)[0][0] if dtypes else None,
        "fingerprint": ckpt.fingerprint,
        "config": dict(ckpt.config) or None,
        "hub_id": hub_id if hub_id is not None else _hub_id_of(dict(ckpt.config)),
    }
    tensors = [(n, info.shape, info.dtype) for n, (_, info) in sorted(ckpt.tensors.items())]
    if not lib.insert_base(row, tensors):
        raise BaseModelError(
            f"a base model named {base_name!r} is already registered; pick another --name or remove it first"
        )
    return base_info(lib, base_name)


def base_info(lib: Library, name: str) -> BaseInfo:
    found = lib.bases(name)
    if not found:
        raise _not_registered(name)
    return found[0]


def remove_base(lib: Library, name: str) -> None:
    if not lib.delete_base(name):
        raise _not_registered(name)


def base_layout(lib: Library, base: str | os.PathLike[str]) -> BaseLayout:
    """A registered base by name, else a checkpoint folder read from its headers."""
    from ..formats.checkpoint import read_checkpoint
    from ..ops.validate import BaseLayout

    found = lib.base_layout(str(base))
    if found is not None:
        alias = found.config.get("_name_or_path")
        return BaseLayout(
            name=found.name,
            shapes=found.shapes,
            model_type=found.model_type,
            fingerprint=found.fingerprint,
            config=found.config,
            aliases=tuple(a for a in (found.hub_id, alias) if isinstance(a, str) and a),
        )
    if not Path(base).is_dir():
        raise BaseModelError(
            f"{base!s} is neither a registered base model nor a checkpoint folder; "
            "`adapterhub base list` shows the registered ones"
        )
    return BaseLayout.from_checkpoint(read_checkpoint(base))


def base_dir(lib: Library, base: str | os.PathLike[str]) -> Path:
    """A registered base's folder, or the folder given."""
    if Path(base).is_dir():
        return Path(base)
    found = lib.bases(str(base))
    if not found:
        raise BaseModelError(
            f"{base!s} is neither a registered base model nor a checkpoint folder; "
            "`adapterhub base list` shows the registered ones"
        )
    path = found[0].path
    if not path or not Path(path).is_dir():
        raise BaseModelError(f"base {base!s} was registered from {path}, which is no longer there")
    return Path(path)


def _subject(
    lib: Library, target: str | os.PathLike[str]
) -> tuple[str, AdapterFiles | None, list[Check], str | None]:
    """(label, files, checks so far, declared base name) for a cataloged name or a path."""
    from ..formats import detect
    from ..ops.validate import Check

    name = str(target)
    if lib.exists(name):
        info = lib.info(name)
        checks: list[Check] = []
        for f in info.files or ():
            if not lib.store.verify(f.sha256):
                checks.append(
                    Check(
                        "error", "store", f"stored file {f.filename} is missing or does not match its sha256"
                    )
                )
        if checks:
            return name, None, checks, info.base_model
        return (
            name,
            lib.files(name),
            [Check("ok", "store", "stored files match their sha256")],
            info.base_model,
        )
    try:
        files = detect(target)
    except AdapterHubError as exc:
        if not Path(target).exists():
            raise AdapterNotFoundError(name) from None
        return name, None, [Check("error", "files", str(exc))], None
    return name, files, [], None


def validate(
    lib: Library,
    target: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    with_: Sequence[str | os.PathLike[str]] = (),
    scan_values: bool = True,
    for_: str | None = None,
    max_lora_rank: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ValidationReport:
    """Check an adapter (cataloged name or path): integrity, fit to ``base``, fit with ``with_``, and
    with ``for_="vllm"`` what vLLM's loader would refuse (``max_lora_rank``: the server's
    ``--max-lora-rank``)."""
    from ..formats import read_adapter
    from ..ops.validate import Check, ValidationReport, check_base, check_integrity, check_pair

    if for_ is not None and for_ not in SERVING_TARGETS:
        raise InvalidOptionError(
            f"unknown serving target {for_!r}; choose one of {', '.join(SERVING_TARGETS)}"
        )
    if max_lora_rank is not None and for_ != "vllm":
        raise InvalidOptionError("max_lora_rank applies to for_='vllm' (--for vllm) only")
    label, files, checks, declared = _subject(lib, target)
    weights: LoraWeights | None = None
    if files is not None:
        more, weights = check_integrity(files, scan_values=scan_values, progress=progress)
        checks += more
    base_label = None
    layout: BaseLayout | None = None
    if base is not None:
        layout = base_layout(lib, base)
        base_label = layout.name
        if weights is not None:
            checks += check_base(weights, layout, declared=declared)
    if for_ == "vllm" and weights is not None:
        from ..ops.targets_vllm import check_vllm

        checks += check_vllm(weights, max_lora_rank=max_lora_rank, base=layout)
    for other in with_:
        olabel, ofiles, ochecks, odeclared = _subject(lib, other)
        bad = [c for c in ochecks if c.status == "error"]
        if ofiles is None or bad:
            checks += [Check(c.status, c.check, f"{olabel}: {c.message}", c.module) for c in bad]
            continue
        try:
            oweights = read_adapter(ofiles)
        except AdapterHubError as exc:
            checks.append(Check("error", "together.read", f"{olabel}: {exc}"))
            continue
        if weights is not None:
            checks += check_pair(
                label,
                weights,
                olabel,
                oweights,
                a_base=lib.fingerprint_of(declared or weights.base_model),
                b_base=lib.fingerprint_of(odeclared or oweights.base_model),
            )
    return ValidationReport(
        subject=label, checks=tuple(checks), base=base_label, others=tuple(str(o) for o in with_)
    )


def validate_catalog(
    lib: Library, *, base: str | os.PathLike[str], names: Sequence[str] | None = None
) -> list[ValidationReport]:
    """Check cataloged adapters against a base from the catalog's module rows alone (no file is opened)."""
    from ..ops.validate import ValidationReport, check_base, weights_from_modules

    layout = base_layout(lib, base)
    facts = lib.adapter_facts(names)
    if names is not None:
        missing = sorted(set(names) - {f["name"] for f in facts})
        if missing:
            raise AdapterNotFoundError(missing[0])
    reports = []
    done: dict[Any, tuple[Check, ...]] = {}  # adapters with identical layouts are checked once
    for f in facts:
        fan = bool(f["config"].get("fan_in_fan_out"))
        repl = tuple(sorted((k, tuple(v)) for k, v in f["replacements"].items()))
        key = (f["format"], f["base_model"], fan, repl, f["modules"])
        if key not in done:
            w = weights_from_modules(
                f["modules"],
                fmt=f["format"],
                config=f["config"],
                replacements=f["replacements"],
                base_model=f["base_model"],
            )
            done[key] = tuple(check_base(w, layout))
        reports.append(ValidationReport(subject=f["name"], checks=done[key], base=layout.name))
    return reports


def compatible_names(lib: Library, base: str | os.PathLike[str]) -> set[str]:
    return {r.subject for r in validate_catalog(lib, base=base) if r.ok}


def gguf_hub_id(gguf: str | os.PathLike[str]) -> str | None:
    """A GGUF model's own record of what it is: its Hub source repo (``general.source.huggingface
    .repository``, or a ``general.source.url`` on huggingface.co), else its ``general.name``."""
    try:
        from gguf import GGUFReader

        fields = GGUFReader(str(gguf)).fields
    except (ImportError, OSError, ValueError, KeyError, IndexError):
        return None

    def text(key: str) -> str | None:
        f = fields.get(key)
        try:
            value = f.contents() if f is not None else None
        except (ValueError, IndexError, UnicodeDecodeError):
            return None
        return value.strip() if isinstance(value, str) and value.strip() else None

    repo = text("general.source.huggingface.repository")
    if repo and HUB_ID_RE.match(repo):
        return repo
    url = re.match(r"^https://huggingface\.co/([^/?#]+/[^/?#]+)/?$", text("general.source.url") or "")
    if url and HUB_ID_RE.match(url.group(1)):
        return url.group(1)
    return text("general.name")


class GgufOptions(TypedDict, total=False):
    """The options of `import_gguf` beside the file and the name."""

    dtype: str
    hub_id: str | None
    progress: Progress | None


def import_gguf(
    lib: Library,
    gguf: str | os.PathLike[str],
    *,
    name: str,
    dtype: str = "bfloat16",
    hub_id: str | None = None,
    progress: Progress | None = None,
) -> BaseInfo:
    """Dequantize a GGUF checkpoint (llama.cpp's format) with transformers, save it as a safetensors
    checkpoint with its tokenizer under ``HOME/bases/``, and register it as base ``name``; its real id
    is ``hub_id``, else what the GGUF says it is (`gguf_hub_id`). ``progress(done, total)`` follows the
    whole import in steps: one per tensor dequantized, then the tokenizer, the save and the registration
    (the first report comes once transformers has read the GGUF's metadata and starts on the tensors)."""
    import shutil
    import tempfile

    from ..store import scratch_prefix

    src = Path(gguf)
    check_name(name)
    if hub_id is not None:
        check_hub_id(hub_id)
    if lib.bases(name):
        raise BaseModelError(
            f"a base model named {name!r} is already registered; pick another --name or remove it first"
        )
    if not src.is_file():
        raise BaseModelError(f"{src} is not a file; give the path of a .gguf checkpoint", path=str(src))
    with open(src, "rb") as f:
        if f.read(4) != b"GGUF":
            raise BaseModelError(f"{src} is not a GGUF file (it does not start with 'GGUF')", path=str(src))
    dest = lib.home / "bases" / name.replace("/", "--")
    if dest.exists():
        raise BaseModelError(f"{dest} already exists; remove it or pick another --name", path=str(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=scratch_prefix(".import")))
    steps = _Steps(progress)
    try:
        _convert_gguf(src, tmp, dtype=dtype, steps=steps)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        info = _register(lib, dest, name=name, hub_id=hub_id or gguf_hub_id(src))
        steps.step()
        return info
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


class _Steps:
    """The import's progress: ``tensors`` steps of dequantization (known once they start), then
    `AFTER_TENSORS` more (tokenizer, save, registration)."""

    AFTER_TENSORS = 3

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.tensors = 0
        self.done = 0

    def tensor(self, done: int, total: int) -> None:
        self.tensors, self.done = total, done
        self._report()

    def step(self) -> None:
        self.done += 1
        self._report()

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.done, self.tensors + self.AFTER_TENSORS)


@contextlib.contextmanager
def _tensor_progress(report: Callable[[int, int], None]) -> Iterator[None]:
    """Count the tensors transformers dequantizes while loading a GGUF: its loop runs over
    ``tqdm(reader.tensors)`` in `transformers.modeling_gguf_pytorch_utils`, which this swaps for a counter
    for the duration (and so for the one bar of the import rather than a tqdm bar of its own)."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:  # a transformers that loads GGUF tensors otherwise: no per-tensor steps
        yield
        return

    def counted(items: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        items = list(items)
        for i, item in enumerate(items):
            report(i, len(items))
            yield item
        report(len(items), len(items))

    gguf_utils.tqdm = counted
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _convert_gguf(src: Path, out: Path, *, dtype: str, steps: _Steps) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as exc:  # transformers itself, or gguf / accelerate that it needs for GGUF
        raise BaseModelError(f"importing a GGUF needs transformers, gguf and accelerate: {exc}") from None
    torch_dtype = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
    }.get(dtype)
    if torch_dtype is None:
        raise BaseModelError(f"unknown dtype {dtype!r}; choose bfloat16, float16 or float32")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        with _tensor_progress(steps.tensor):
            model = AutoModelForCausalLM.from_pretrained(
                str(src.parent),
                gguf_file=src.name,
                quantization_config=GgufConfig(dequantize=True),
                dtype=torch_dtype,
            )
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        steps.step()
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        raise BaseModelError(
            f"transformers cannot read {src} as a GGUF model: {str(exc).splitlines()[0]}"
        ) from None
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    steps.step()
