"""Base checkpoints: a folder of safetensors shards read from their headers alone (no torch).

A checkpoint folder holds either ``model.safetensors.index.json`` with a ``weight_map`` from tensor name to
shard file, or one ``*.safetensors`` file (``model.safetensors`` preferred), plus ``config.json``. Every
shard header is checked strictly (`adapterhub.formats.safetensors_header.read_header`) and the index is
checked against the headers, so what `read_checkpoint` returns can be trusted to locate tensor bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AdapterHubError, BaseModelError
from .safetensors_header import SafetensorsHeader, TensorInfo, read_header

__all__ = ["CheckpointInfo", "read_checkpoint", "INDEX_NAME", "SINGLE_NAME", "CONFIG_NAME"]

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a base checkpoint folder holds, read from headers, the index and ``config.json``."""

    path: Path
    #: tensor name -> (shard file name relative to ``path``, its header entry)
    tensors: dict[str, tuple[str, TensorInfo]]
    #: shard file names in the order they appear in the index (or the one file)
    shards: tuple[str, ...]
    #: shard file name -> checked header
    headers: dict[str, SafetensorsHeader]
    config: dict[str, Any] = field(default_factory=dict)
    #: the parsed index file, or None for a single-file checkpoint
    index: dict[str, Any] | None = None
    model_type: str | None = None
    architectures: tuple[str, ...] = ()
    num_params: int = 0
    #: sha256 of the sorted (name, shape, dtype) list: equal for checkpoints with the same layout
    fingerprint: str = ""

    @property
    def sharded(self) -> bool:
        return self.index is not None

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for _, info in self.tensors.values())

    @property
    def dtypes(self) -> dict[str, int]:
        """Number of tensors per dtype."""
        out: dict[str, int] = {}
        for _, info in self.tensors.values():
            out[info.dtype] = out.get(info.dtype, 0) + 1
        return out

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name][1]

    def shard_of(self, name: str) -> str:
        return self.tensors[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1].shape

    @property
    def tie_word_embeddings(self) -> bool:
        """What transformers would do: tie unless config.json says ``tie_word_embeddings: false``."""
        value = self.config.get("tie_word_embeddings")
        if value is None and isinstance(self.config.get("text_config"), dict):
            value = self.config["text_config"].get("tie_word_embeddings")
        return value is not False


def fingerprint_of(tensors: dict[str, tuple[str, TensorInfo]]) -> str:
    """sha256 of the JSON list ``[[name, shape, dtype], ...]`` sorted by name."""
    rows = sorted([name, list(info.shape), info.dtype] for name, (_, info) in tensors.items())
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BaseModelError(f"{path}: {what} is not valid JSON ({exc})", path=str(path)) from None
    except OSError as exc:
        raise BaseModelError(f"{path}: cannot read {what} ({exc.strerror or exc})", path=str(path)) from None
    if not isinstance(doc, dict):
        raise BaseModelError(f"{path}: {what} must be a JSON object", path=str(path))
    return doc


def _header(path: Path) -> SafetensorsHeader:
    try:
        return read_header(path)
    except AdapterHubError as exc:  # the header reader speaks of adapters; this is a base checkpoint
        raise BaseModelError(f"base checkpoint shard {exc}", path=str(path)) from None


def read_checkpoint(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Read a base checkpoint folder from its headers, index and config; no tensor data is read.

    Raises `BaseModelError` when the folder is missing, holds no safetensors weights, or its index and
    shards disagree.
    """
    root = Path(path)
    if root.is_file() and root.suffix == ".safetensors":
        raise BaseModelError(
            f"{root}: give the checkpoint folder (the one with config.json), not a shard file", path=str(root)
        )
    if not root.is_dir():
        raise BaseModelError(f"{root}: no such folder; give a base checkpoint folder", path=str(root))

    config: dict[str, Any] = {}
    cfg_path = root / CONFIG_NAME
    if cfg_path.is_file():
        config = _read_json(cfg_path, CONFIG_NAME)
    else:
        logger.debug("%s: no %s", root, CONFIG_NAME)

    index: dict[str, Any] | None = None
    index_path = root / INDEX_NAME
    if index_path.is_file():
        index = _read_json(index_path, INDEX_NAME)
        weight_map = index.get("weight_map")
        if (
            not isinstance(weight_map, dict)
            or not weight_map
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
        ):
            raise BaseModelError(
                f"{index_path}: weight_map must be a non-empty object from tensor names to shard files",
                path=str(index_path),
            )
        shards: list[str] = []
        for shard in weight_map.values():
            if shard not in shards:
                shards.append(shard)
        for shard in shards:
            if Path(shard).is_absolute() or ".." in Path(shard).parts or os.sep in shard or "/" in shard:
                raise BaseModelError(
                    f"{index_path}: shard name {shard!r} must be a plain file name", path=str(index_path)
                )
            if not (root / shard).is_file():
                raise BaseModelError(
                    f"{index_path}: names shard {shard!r}, which is not in {root} (incomplete download?)",
                    path=str(root / shard),
                )
    else:
        weight_map = None
        if (root / SINGLE_NAME).is_file():
            shards = [SINGLE_NAME]
        else:
            found = sorted(p.name for p in root.glob("*.safetensors"))
            if len(found) != 1:
                what = (
                    "no .safetensors file"
                    if not found
                    else f"{len(found)} .safetensors files but no {INDEX_NAME}"
                )
                raise BaseModelError(
                    f"{root}: {what}; a base checkpoint holds {SINGLE_NAME} or shards listed in {INDEX_NAME}"
                    " (convert .bin checkpoints with save_pretrained(safe_serialization=True))",
                    path=str(root),
                )
            shards = found

    headers: dict[str, SafetensorsHeader] = {}
    tensors: dict[str, tuple[str, TensorInfo]] = {}
    for shard in shards:
        header = _header(root / shard)
        headers[shard] = header
        for name, info in header.tensors.items():
            if name in tensors:
                raise BaseModelError(
                    f"{root}: tensor {name!r} is in both {tensors[name][0]} and {shard}",
                    path=str(root / shard),
                )
            tensors[name] = (shard, info)
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in tensors:
                raise BaseModelError(
                    f"{index_path}: lists {name!r} in {shard}, but no shard holds it", path=str(index_path)
                )
            if tensors[name][0] != shard:
                raise BaseModelError(
                    f"{index_path}: lists {name!r} in {shard}, but it is in {tensors[name][0]}",
                    path=str(index_path),
                )
        extra = sorted(set(tensors) - set(weight_map))
        if extra:
            raise BaseModelError(
                f"{index_path}: shards hold {len(extra)} tensors the index does not list (first: {extra[0]!r})",
                path=str(index_path),
            )
    if not tensors:
        raise BaseModelError(f"{root}: the checkpoint holds no tensors", path=str(root))

    arch = config.get("architectures") or ()
    model_type = config.get("model_type")
    return CheckpointInfo(
        path=root,
        tensors=tensors,
        shards=tuple(shards),
        headers=headers,
        config=config,
        index=index,
        model_type=model_type if isinstance(model_type, str) and model_type else None,
        architectures=tuple(a for a in arch if isinstance(a, str)) if isinstance(arch, list) else (),
        num_params=sum(info.numel for _, info in tensors.values()),
        fingerprint=fingerprint_of(tensors),
    )
