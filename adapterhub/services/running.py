"""Putting cataloged adapters to work: load a base as a live transformers model, attach a runtime that
resolves catalog names (by the store's sha256), and generate or embed with adapters active."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BaseModelError, InvalidOptionError
from .adapters import check_refs
from .bases import base_dir

if TYPE_CHECKING:
    from ..catalog.library import Library
    from ..lora import LoraWeights
    from ..records import AdapterInfo, BaseInfo, Generation
    from ..runtime import Runtime

DTYPES = {
    "auto": None,
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "float32": "float32",
    "fp32": "float32",
}


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "merges.txt",
)
QUANTIZE = ("nf4", "nf4-all", "int8")


def pick_device(device: str | None) -> str:
    """``device`` checked against this torch (``None`` / ``auto``: CUDA when there is one)."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "no usable GPU here"
        raise InvalidOptionError(
            f"--device {device}: this torch ({torch.__version__}) has {build}; use --device cpu"
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise InvalidOptionError(f"--device {device}: MPS is not available here; use --device cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise InvalidOptionError(f"unknown device {device!r}; give cpu, cuda, cuda:1, ...") from None
    return device


def load_tokenizer(folder: Path, *, needed_for: str | None = None) -> Any:
    """The tokenizer of a checkpoint folder; ``None`` when the folder has no tokenizer files (a model is
    still a model), unless ``needed_for`` names what needs one (then a one-line `BaseModelError`)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as exc:
        if any((folder / f).is_file() for f in TOKENIZER_FILES):
            raise BaseModelError(
                f"transformers cannot load the tokenizer of {folder}: {str(exc).splitlines()[0]}"
            ) from None
    if needed_for is not None:
        raise BaseModelError(require_tokenizer_message(folder, needed_for))
    return None


def require_tokenizer_message(folder: Path | str, needed_for: str) -> str:
    """The one line that says a base without tokenizer files cannot be used for ``needed_for``."""
    return (
        f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); {needed_for} needs one: "
        "copy the tokenizer of the model it was made from into that folder"
    )


def _quantization(quantize: str, device: str) -> dict[str, Any]:
    import torch

    if quantize not in QUANTIZE:
        raise InvalidOptionError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZE)}")
    import logging

    # its CPU backend logs that it could not fetch optional kernels from the Hub (offline): not our user's news
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise InvalidOptionError(
            f"--quantize {quantize} needs bitsandbytes: pip install 'adapterhub[quant]'"
        ) from None
    if quantize in ("nf4", "nf4-all"):
        cfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    else:
        cfg = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": cfg, "device_map": device}


def is_causal_lm(folder: Path) -> bool:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise BaseModelError(
            f"{folder} has no readable config.json; is it a transformers checkpoint?"
        ) from None
    return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in cfg.get("architectures") or [])


def load_base(
    lib: Library,
    base: str | os.PathLike[str],
    *,
    device: str | None = None,
    dtype: str = "auto",
    quantize: str | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) for a registered base or a checkpoint folder: a causal LM when its config says
    so, else an encoder (an embedding model such as MiniLM). ``dtype`` ``auto`` keeps the checkpoint's.
    ``quantize`` ``nf4`` (4-bit NormalFloat, double quantization, bf16 compute: QLoRA's) or ``int8``
    loads the linear layers through bitsandbytes (the rest in bf16); ``nf4-all`` also the input embedding
    and the output layer (`quantized.quantize_embeddings`). The tokenizer is ``None`` when the folder has
    none."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if dtype not in DTYPES:
        raise InvalidOptionError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    folder = base_dir(lib, base)
    cls = AutoModelForCausalLM if is_causal_lm(folder) else AutoModel
    wanted = DTYPES[dtype]
    torch_dtype: Any = getattr(torch, wanted) if wanted else "auto"
    dev = pick_device(device)
    extra: dict[str, Any] = {}
    if quantize is not None:
        extra = _quantization(quantize, dev)
        if wanted is None or wanted == "float32":
            torch_dtype = torch.bfloat16
    try:
        model: Any = cls.from_pretrained(str(folder), dtype=torch_dtype, **extra)
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"transformers cannot load {folder}: {str(exc).splitlines()[0]}") from None
    if quantize is None:
        model.to(dev)
    elif quantize == "nf4-all":
        from .quantized import quantize_embeddings

        quantize_embeddings(model)
    model.eval()
    return model, load_tokenizer(folder)


def resolver(lib: Library) -> Callable[[str], tuple[LoraWeights, str] | None]:
    """Catalog names for `runtime.attach`: name -> (loaded weights, the weights file's sha256)."""
    from ..formats import read_adapter

    def resolve(name: str) -> tuple[LoraWeights, str] | None:
        if not lib.exists(name):
            return None
        info = lib.info(name)
        # values are checked by the runtime where the tensors land (on a GPU: one kernel)
        return read_adapter(lib.files(name), load=True, check_values=False), info.sha256

    return resolve


def attach(lib: Library, model: Any, *, dtype: Any = None, base: str | None = None) -> Runtime:
    """A runtime whose ``load`` takes catalog names and whose ``save`` catalogs trained adapters."""
    from ..runtime import attach as attach_runtime

    return attach_runtime(model, dtype=dtype, resolve=resolver(lib), save=saver(lib, model, base=base))


def registered_base(lib: Library, model: Any) -> BaseInfo | None:
    """The registered base a live model was loaded from (by its folder), if any."""
    cfg = getattr(model, "config", None)
    where = getattr(cfg, "_name_or_path", None)
    if not where or not Path(where).is_dir():
        return None
    here = Path(where).resolve()
    return next((b for b in lib.bases() if b.path and Path(b.path).resolve() == here), None)


def saver(lib: Library, model: Any, *, base: str | None = None) -> Callable[..., AdapterInfo]:
    """`Runtime.save` into the catalog: PEFT files through `Library.ingest`, one lineage row from the base
    (method ``train``, params: the base fingerprint plus what the runtime and the training loop recorded)."""

    def save(
        name: str,
        weights: LoraWeights,
        *,
        tags: Sequence[str] = (),
        description: str | None = None,
        lineage: dict[str, Any] | None = None,
    ) -> AdapterInfo:
        import shutil
        import tempfile

        from ..errors import AdapterExistsError
        from ..formats import AdapterFiles, read_adapter, write_adapter
        from ..names import check_name, check_tags
        from ..store import scratch_prefix

        check_name(name)
        tags = check_tags(tags)
        if lib.exists(name):
            raise AdapterExistsError(name)
        info = lib.bases(base)[0] if base and lib.bases(base) else registered_base(lib, model)
        params = {"base_fingerprint": info.fingerprint if info else None, **(lineage or {})}
        parent = info.name if info else (weights.base_model or "unknown")
        if info is not None:  # its real id: what PEFT and the Hub resolve (the catalog links the local name)
            weights.base_model = weights.config["base_model_name_or_path"] = info.public_id
        lib.store.tmp.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=lib.store.tmp, prefix=scratch_prefix("trained")))
        try:
            write_adapter(weights, tmp)
            files = AdapterFiles("peft", tmp / "adapter_model.safetensors", tmp / "adapter_config.json")
            return lib.ingest(
                name,
                files,
                read_adapter(files),
                base=info.name if info else None,
                tags=tags,
                description=description,
                source="trained",
                parents=[{"parent_name": parent, "weight": 1.0, "method": "train", "params": params}],
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return save


def _activate(lib: Library, model: Any, adapters: Sequence[tuple[str, float]]) -> Runtime | None:
    if not adapters:
        return None
    import torch

    rt = attach(lib, model, dtype=torch.float32)  # the low-rank term in fp32, as PEFT computes it
    names = [n for n, _ in adapters]
    if len(set(names)) != len(names):
        raise InvalidOptionError("an adapter is given twice; give it once with the summed weight")
    for n in names:
        rt.load(n)
    if len(adapters) == 1 and adapters[0][1] == 1.0:
        rt.activate(adapters[0][0])
    else:
        rt.activate(dict(adapters))
    return rt


def generate_text(
    lib: Library,
    base: str | os.PathLike[str],
    prompt: str,
    *,
    adapters: Sequence[tuple[str, float]] = (),
    system: str | None = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    seed: int | None = None,
    device: str | None = None,
    on_text: Callable[[str], None] | None = None,
    quantize: str | None = None,
) -> Generation:
    """Answer ``prompt`` with the base's chat template, with ``adapters`` (an exact combination when
    several) active."""
    from ..runtime.generate import chat_ids, generate

    check_refs(lib, [n for n, _ in adapters])
    folder = base_dir(lib, base)
    if not is_causal_lm(folder):
        raise BaseModelError(f"{base} is an encoder, not a causal LM; use --embed to get its embeddings")
    load_tokenizer(folder, needed_for="generating text")  # before the model loads
    model, tokenizer = load_base(lib, base, device=device, quantize=quantize)
    rt = _activate(lib, model, adapters)
    try:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        return generate(
            model,
            tokenizer,
            chat_ids(tokenizer, messages),
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            on_text=on_text,
        )
    finally:
        if rt is not None:
            rt.detach()


def embed_texts(
    lib: Library,
    base: str | os.PathLike[str],
    texts: Sequence[str],
    *,
    adapters: Sequence[tuple[str, float]] = (),
    device: str | None = None,
) -> list[list[float]]:
    """Sentence embeddings (mean-pooled, normalized) of ``texts`` from an encoder base."""
    from ..runtime.generate import embed

    check_refs(lib, [n for n, _ in adapters])
    load_tokenizer(base_dir(lib, base), needed_for="embedding text")
    model, tokenizer = load_base(lib, base, device=device)
    rt = _activate(lib, model, adapters)
    try:
        return embed(model, tokenizer, texts)[0]
    finally:
        if rt is not None:
            rt.detach()
