"""Operations on adapters and checkpoints: pure functions on `LoraWeights` and checkpoint files.

Needs only torch and safetensors (no database, no CLI libraries), and imports torch lazily, when an
operation runs.
"""

from __future__ import annotations

from ..errors import OutputExistsError
from .basevalues import resolve_with, resolve_with_base
from .combine import AdapterExpr, CombineResult, combine, combine_methods, extract, resize
from .keymap import KeyMatch, is_conv1d, map_keys, needs_transpose
from .merge import DTYPES, MergeResult, merge_checkpoint
from .validate import BaseLayout, Check, ValidationReport, check_base, check_integrity, check_pair

__all__ = [
    "DTYPES",
    "AdapterExpr",
    "BaseLayout",
    "Check",
    "CombineResult",
    "KeyMatch",
    "MergeResult",
    "OutputExistsError",
    "ValidationReport",
    "check_base",
    "check_integrity",
    "check_pair",
    "combine",
    "combine_methods",
    "extract",
    "is_conv1d",
    "map_keys",
    "merge_checkpoint",
    "needs_transpose",
    "resize",
    "resolve_with",
    "resolve_with_base",
]
