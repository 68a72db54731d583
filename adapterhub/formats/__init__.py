"""Adapter file formats: detection, readers into `LoraWeights`, writers back out.

No database here, and no torch until tensors are actually loaded or written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidAdapterError, OutputExistsError, PickleRefusedError
from ..lora import LoraWeights
from .peft import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME, Problem, parse_peft, read_config
from .safetensors_header import SafetensorsHeader, read_header
from .values import NonFinite, non_finite, refuse_non_finite
from .values import check_finite as _check_safetensors_finite

__all__ = [
    "AdapterFiles",
    "NonFinite",
    "check_finite",
    "convert_pickle",
    "detect",
    "load_tensors",
    "non_finite",
    "read_adapter",
    "scan_values",
    "write_adapter",
]

#: what `write_adapter` writes; `detect` / `read_adapter` also read diffusers files
WRITE_FORMATS = ("peft", "kohya", "gguf")
FORMATS = (*WRITE_FORMATS, "diffusers")


@dataclass(frozen=True)
class AdapterFiles:
    """Where an adapter's files are and which format they are in."""

    format: str  # "peft" | "kohya" | "gguf" | "diffusers"
    weights: Path
    config: Path | None = None
    pickle: bool = False  # weights are adapter_model.bin (a pickle)

    @property
    def files(self) -> list[Path]:
        return [p for p in (self.config, self.weights) if p is not None]


def _pickle_message(path: Path) -> str:
    return (
        f"{path}: weights are a pickle (adapter_model.bin), which can run arbitrary code when loaded, so "
        "adapterhub does not open it. Convert it with `adapterhub add --allow-pickle` (loads it with "
        "torch.load(weights_only=True) and stores safetensors) or re-save it with PEFT's "
        "save_pretrained(safe_serialization=True)."
    )


def detect(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> AdapterFiles:
    """Find an adapter's files at ``path`` (a PEFT folder or a single ``.safetensors`` file)."""
    p = Path(path)
    if not p.exists():
        raise InvalidAdapterError(f"{p}: no such file or folder", path=str(p))
    if p.is_dir():
        cfg = p / CONFIG_NAME
        st = p / WEIGHTS_NAME
        if not cfg.is_file():
            singles = sorted(p.glob("*.safetensors"))
            if len(singles) == 1:
                return detect(singles[0], allow_pickle=allow_pickle)
            raise InvalidAdapterError(
                f"{p}: no {CONFIG_NAME} here; a PEFT adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}",
                path=str(p),
            )
        if st.is_file():
            return AdapterFiles("peft", st, cfg)
        if (p / PICKLE_NAME).is_file():
            if not allow_pickle:
                raise PickleRefusedError(_pickle_message(p / PICKLE_NAME), path=str(p))
            return AdapterFiles("peft", p / PICKLE_NAME, cfg, pickle=True)
        read_config(cfg)  # a config of another tool says so, which explains the missing weights best
        raise InvalidAdapterError(f"{p}: has {CONFIG_NAME} but no {WEIGHTS_NAME}", path=str(p))
    if p.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        if not allow_pickle:
            raise PickleRefusedError(_pickle_message(p), path=str(p))
        cfg = p.parent / CONFIG_NAME
        if not cfg.is_file():
            raise InvalidAdapterError(
                f"{p}: a pickled PEFT adapter needs {CONFIG_NAME} beside it", path=str(p)
            )
        return AdapterFiles("peft", p, cfg, pickle=True)
    if p.name == CONFIG_NAME:
        return detect(p.parent, allow_pickle=allow_pickle)
    if p.suffix == ".gguf":
        from .gguf_lora import is_gguf

        if not is_gguf(p):
            raise InvalidAdapterError(f"{p}: not a GGUF file (it does not start with 'GGUF')", path=str(p))
        return AdapterFiles("gguf", p)
    if p.suffix != ".safetensors":
        raise InvalidAdapterError(
            f"{p}: not an adapter; give a PEFT folder or a .safetensors file (or a llama.cpp .gguf LoRA)",
            path=str(p),
        )
    header = read_header(p)
    from .diffusers import is_diffusers_header
    from .kohya import is_kohya_header, is_lycoris_header

    cfg = p.parent / CONFIG_NAME
    if is_lycoris_header(header) and any(k.startswith("base_model.") for k in header.tensors):
        if cfg.is_file():
            return AdapterFiles("peft", p, cfg)  # PEFT's LoHa / LoKr weights file
        raise InvalidAdapterError(
            f"{p}: PEFT-style LoHa / LoKr weights, but no {CONFIG_NAME} beside them to give r and alpha",
            path=str(p),
        )
    if is_kohya_header(header):
        return AdapterFiles("kohya", p)
    if is_diffusers_header(header) and not (p.parent / CONFIG_NAME).is_file():
        return AdapterFiles("diffusers", p)
    cfg = p.parent / CONFIG_NAME
    if any(".lora_A." in k or ".lora_embedding_A" in k for k in header.tensors):
        if cfg.is_file():
            return AdapterFiles("peft", p, cfg)
        raise InvalidAdapterError(
            f"{p}: PEFT-style LoRA weights, but no {CONFIG_NAME} beside them to give rank and alpha",
            path=str(p),
        )
    raise InvalidAdapterError(
        f"{p}: no LoRA tensors found (expected lora_A/lora_B or lora_down/lora_up keys){_what_else(p, header)}",
        path=str(p),
    )


def _what_else(path: Path, header: SafetensorsHeader) -> str:
    """A hint at what a .safetensors file without LoRA tensors is instead."""
    names = list(header.tensors)
    if any(n.endswith((".hada_w1_a", ".lokr_w1", ".lokr_w1_a", ".lokr_w2")) for n in names):
        return "; it has LoHa / LoKr tensors, but no module with its first factor (hada_w1_a, lokr_w1 or lokr_w1_a)"
    if any(n.endswith((".lora_a", ".lora_b")) for n in names):
        return "; its lora_a / lora_b keys are MLX-LM's: convert the adapter to PEFT format first"
    if (path.parent / "config.json").is_file() and not (path.parent / CONFIG_NAME).is_file():
        return "; with config.json beside it this looks like a model checkpoint: register it as a base model"
    return ""


def _parse(files: AdapterFiles, header: SafetensorsHeader, problem: Problem | None) -> LoraWeights:
    if files.format == "kohya":
        from .kohya import parse_kohya

        return parse_kohya(header, problem=problem)
    if files.format == "diffusers":
        from .diffusers import parse_diffusers

        return parse_diffusers(header, problem=problem)
    assert files.config is not None
    config = read_config(files.config)
    if str(config.get("peft_type", "LORA")).upper() in ("LOHA", "LOKR"):
        from .lycoris import parse_peft_lycoris
        from .peft import _raise

        return parse_peft_lycoris(config, header, report=problem or _raise(header.path))
    return parse_peft(config, header, problem=problem, config_path=str(files.config))


def read_adapter(
    path: str | os.PathLike[str] | AdapterFiles,
    *,
    load: bool = False,
    problem: Problem | None = None,
    check_values: bool = True,
) -> LoraWeights:
    """Read an adapter into `LoraWeights` (metadata only unless ``load``).

    With ``load`` the tensors are read too, and an adapter whose values are not all finite is refused
    (``check_values=False`` leaves that to the caller: the runtime checks on the device, where it costs
    one kernel, before anything is attached).
    """
    files = path if isinstance(path, AdapterFiles) else detect(path)
    if files.pickle:
        raise PickleRefusedError(_pickle_message(files.weights), path=str(files.weights))
    if files.format == "gguf":
        from .gguf_lora import read_gguf_lora

        weights = read_gguf_lora(files.weights)
        return load_tensors(weights, files, check_values=check_values) if load else weights
    header = read_header(files.weights)
    weights = _parse(files, header, problem)
    if load:
        load_tensors(weights, files, check_values=check_values)
    return weights


def load_tensors(weights: LoraWeights, files: AdapterFiles, *, check_values: bool = True) -> LoraWeights:
    """Fill the tensors of metadata-only ``weights``; refuse NaN / Inf values (`InvalidAdapterError`)
    unless ``check_values`` is False."""
    if files.format == "kohya":
        from .kohya import load_kohya_tensors

        load_kohya_tensors(weights, files.weights)
    elif files.format == "gguf":
        from .gguf_lora import load_gguf_tensors

        load_gguf_tensors(weights, files.weights)
    elif files.format == "diffusers":
        from .diffusers import load_diffusers_tensors

        load_diffusers_tensors(weights, files.weights)
    else:
        from .peft import load_peft_tensors

        load_peft_tensors(weights, files.weights)
    if check_values:
        refuse_non_finite(weights, path=str(files.weights))
    return weights


def check_finite(files: AdapterFiles) -> None:
    """Refuse an adapter whose weights hold NaN or Infinity (`InvalidAdapterError`), reading every tensor."""
    if files.format == "gguf":
        from .gguf_lora import read_gguf_lora

        refuse_non_finite(read_gguf_lora(files.weights, load_tensors=True), path=str(files.weights))
        return
    _check_safetensors_finite(files)


def scan_values(
    files: AdapterFiles, *, progress: Callable[[int, int], None] | None = None
) -> list[NonFinite]:
    """Every tensor of an adapter's weights file that holds NaN or Infinity, whatever its format."""
    if files.format == "gguf":
        from .gguf_lora import read_gguf_lora

        return non_finite(read_gguf_lora(files.weights, load_tensors=True))
    from .values import scan_file

    return scan_file(files.weights, progress=progress)


def convert_pickle(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Load a pickled state dict with ``torch.load(weights_only=True)`` and save it as safetensors."""
    import torch
    from safetensors.torch import save_file

    try:
        state = torch.load(str(src), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        # torch's message advises retrying with weights_only=False: keep only what it found in the file
        text = str(exc)
        found = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
        if found:
            detail = found.group(1).split(". ")[0]
        else:
            skip = ("Weights only load failed", "Please file an issue", "Check the documentation")
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            detail = next(
                (ln for ln in lines if not ln.startswith(skip) and "weights_only" not in ln),
                exc.__class__.__name__,
            )
        raise InvalidAdapterError(
            f"{src}: could not be loaded safely with torch.load(weights_only=True), which accepts only tensors "
            f"and plain containers ({detail}); re-save the adapter from a trusted copy with PEFT's "
            "save_pretrained(safe_serialization=True)",
            path=str(src),
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise InvalidAdapterError(
            f"{src}: the pickle does not hold a flat dict of tensors keyed by name", path=str(src)
        )
    out = Path(dest)
    tmp = out.with_name(out.name + ".tmp")
    # clone: tensors of a pickle may share storage (tied or sliced), which safetensors refuses to save
    save_file(
        {k: v.detach().clone().contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"}
    )
    os.replace(tmp, out)
    return out


def write_adapter(
    weights: LoraWeights,
    dest: str | os.PathLike[str],
    *,
    format: str = "peft",
    base_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write loaded `LoraWeights` as a PEFT folder, a kohya file or a llama.cpp GGUF LoRA (needs the
    base's ``base_config``: model type and head counts). diffusers files need a UNet's key list first:
    `formats.diffusers.write_diffusers` after `ops.diffusers_keys.kohya_to_diffusers`. An existing file,
    or a folder that is not empty, is refused (`OutputExistsError`) unless ``overwrite``."""
    out = Path(dest)
    if not overwrite and (out.is_file() or out.is_symlink() or (out.is_dir() and any(out.iterdir()))):
        raise OutputExistsError(f"{out} already exists; choose another destination or pass overwrite=True")
    if format == "gguf":
        from .gguf_lora import write_gguf_lora

        if base_config is None:
            raise InvalidAdapterError("a GGUF export needs the base model's config (model type, head counts)")
        return write_gguf_lora(weights, dest, base_config=base_config)
    if weights.format == "diffusers":
        if format == "kohya":
            from .diffusers import to_kohya
            from .kohya import write_kohya

            return write_kohya(to_kohya(weights), dest)
        raise InvalidAdapterError("a diffusers LoRA exports as diffusers or kohya, not as a PEFT folder")
    if format == "peft":
        if weights.format == "kohya":
            raise InvalidAdapterError(
                "kohya files name modules without dots, so they cannot be written as PEFT without a base "
                "model's key list; export them in kohya format"
            )
        from .peft import write_peft

        return write_peft(weights, dest)
    if format == "kohya":
        from .kohya import write_kohya

        return write_kohya(weights, dest)
    raise InvalidAdapterError(f"unknown format {format!r}; choose one of {', '.join(WRITE_FORMATS)}")
