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

DTYPES = {"auto": None, "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "float32": "float32", "fp32": "float32"}  # fmt: skip


def pick_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def is_causal_lm(folder: Path) -> bool:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise BaseModelError(
            f"{folder} has no readable config.json; is it a transformers checkpoint?"
        ) from None
    return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in cfg.get("architectures") or [])


def load_base(
    lib: Library, base: str | os.PathLike[str], *, device: str | None = None, dtype: str = "auto"
) -> tuple[Any, Any]:
    """(model, tokenizer) for a registered base or a checkpoint folder: a causal LM when its config says
    so, else an encoder (an embedding model such as MiniLM). ``dtype`` ``auto`` keeps the checkpoint's."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if dtype not in DTYPES:
        raise InvalidOptionError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    folder = base_dir(lib, base)
    cls = AutoModelForCausalLM if is_causal_lm(folder) else AutoModel
    wanted = DTYPES[dtype]
    torch_dtype: Any = getattr(torch, wanted) if wanted else "auto"
    try:
        model: Any = cls.from_pretrained(str(folder), dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"transformers cannot load {folder}: {str(exc).splitlines()[0]}") from None
    model.to(pick_device(device)).eval()
    return model, tokenizer


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
                name, files, read_adapter(files), base=info.name if info else None, tags=tags,
                description=description, source="trained",
                parents=[{"parent_name": parent, "weight": 1.0, "method": "train", "params": params}],
            )  # fmt: skip
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
) -> Generation:
    """Answer ``prompt`` with the base's chat template, with ``adapters`` (an exact combination when
    several) active."""
    from ..runtime.generate import chat_ids, generate

    check_refs(lib, [n for n, _ in adapters])
    folder = base_dir(lib, base)
    if not is_causal_lm(folder):
        raise BaseModelError(f"{base} is an encoder, not a causal LM; use --embed to get its embeddings")
    model, tokenizer = load_base(lib, base, device=device)
    rt = _activate(lib, model, adapters)
    try:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        return generate(
            model, tokenizer, chat_ids(tokenizer, messages), max_tokens=max_tokens, temperature=temperature,
            seed=seed, on_text=on_text,
        )  # fmt: skip
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
    model, tokenizer = load_base(lib, base, device=device)
    rt = _activate(lib, model, adapters)
    try:
        return embed(model, tokenizer, texts)[0]
    finally:
        if rt is not None:
            rt.detach()
