"""Operations on adapters and checkpoints: pure functions on `LoraWeights` and checkpoint files.

Needs only torch and safetensors (no database, no CLI libraries), and imports torch lazily, when an
operation runs.
"""

from __future__ import annotations

from .keymap import KeyMatch, is_conv1d, map_keys, needs_transpose
from .merge import DTYPES, MergeResult, OutputExistsError, merge_checkpoint

__all__ = [
    "DTYPES",
    "KeyMatch",
    "MergeResult",
    "OutputExistsError",
    "is_conv1d",
    "map_keys",
    "merge_checkpoint",
    "needs_transpose",
]
