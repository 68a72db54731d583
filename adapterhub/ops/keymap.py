"""Match adapter keys to a base checkpoint's tensor names, and decide the orientation of Conv1D bases.

Matching, per adapter key, stops at the first rule that finds anything:

1. the exact name;
2. the name with or without a leading ``base_model.model.`` / ``model.`` prefix;
3. a unique dot-boundary suffix match, either way round (the base has an extra prefix such as
   ``bert.``, or the adapter has one that the base lacks);
4. kohya stems (``lora_unet_down_blocks_0_..._to_q``, ``lora_te_...``): base module names with their dots
   turned into underscores, exact and then as a unique ``_``-boundary suffix.

A rule that finds several candidates makes the key ambiguous; none makes it unmatched. Both lists are
returned rather than raised, so that a caller can report every problem at once.

No torch here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import IncompatibleAdapterError
from ..lora import PEFT_PREFIX

__all__ = [
    "KeyMatch",
    "map_keys",
    "CONV1D_MODEL_TYPES",
    "CONV1D_MODULE_NAMES",
    "is_conv1d",
    "needs_transpose",
]

#: model types whose ``c_attn`` / ``c_proj`` / ``c_fc`` / ``q_attn`` layers are GPT-2 style ``Conv1D``
#: (weight stored ``(in, out)``) in transformers
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "decision_transformer", "imagegpt", "clvp"})
#: module names that are ``Conv1D`` in those models (their other layers are ordinary Linear/Embedding)
CONV1D_MODULE_NAMES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})

KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lora_transformer_")
_STRIP_PREFIXES = (PEFT_PREFIX, "model.")


@dataclass(frozen=True)
class KeyMatch:
    """The outcome of matching adapter keys against base tensor names."""

    mapping: dict[str, str] = field(default_factory=dict)  # adapter key -> base tensor name
    unmatched: list[str] = field(default_factory=list)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)  # adapter key -> candidates

    @property
    def ok(self) -> bool:
        return not self.unmatched and not self.ambiguous


def _is_kohya(key: str) -> bool:
    return "." not in key and key.startswith("lora_")


def _core(key: str) -> str:
    """The key without leading ``base_model.model.`` / ``model.`` prefixes (in any order)."""
    core = key
    changed = True
    while changed:
        changed = False
        for p in _STRIP_PREFIXES:
            if core.startswith(p) and len(core) > len(p):
                core = core[len(p) :]
                changed = True
    return core


def _variants(key: str) -> list[str]:
    """The key with and without the prefixes checkpoints and PEFT wrappers commonly add."""
    core = _core(key)
    out = [core, "model." + core]
    if key.startswith(PEFT_PREFIX):
        out.append(key[len(PEFT_PREFIX) :])
    return [v for i, v in enumerate(out) if v != key and v not in out[:i]]


class _SuffixIndex:
    """Dot-boundary suffixes of the base names, for unique suffix matching in both directions."""

    def __init__(self, names: Iterable[str], sep: str = ".", min_tail: int = 2) -> None:
        self.sep = sep
        self.min_tail = min_tail  # parts a base name needs to match as the tail of a longer key
        self.names = set(names)
        self.by_suffix: dict[str, list[str]] = {}
        for name in self.names:
            parts = name.split(sep)
            for i in range(1, len(parts)):
                self.by_suffix.setdefault(sep.join(parts[i:]), []).append(name)

    def candidates(self, key: str) -> list[str]:
        found = set(self.by_suffix.get(key, ()))  # the base name has extra leading parts
        parts = key.split(self.sep)
        for i in range(1, len(parts) - self.min_tail + 1):  # the adapter key has extra leading parts
            tail = self.sep.join(parts[i:])
            if tail in self.names:
                found.add(tail)
                break  # the longest tail that matches is the one meant
        return sorted(found)


def map_keys(adapter_keys: Iterable[str], base_keys: Iterable[str]) -> KeyMatch:
    """Map each adapter key (a base weight name, or a kohya stem) to one base tensor name."""
    base = list(base_keys)
    base_set = set(base)
    suffixes: _SuffixIndex | None = None
    kohya: dict[str, list[str]] | None = None
    kohya_suffixes: _SuffixIndex | None = None
    mapping: dict[str, str] = {}
    unmatched: list[str] = []
    ambiguous: dict[str, list[str]] = {}

    for key in adapter_keys:
        if key in base_set:
            mapping[key] = key
            continue
        if _is_kohya(key):
            if kohya is None:
                kohya = {}
                for name in base:
                    if name.endswith(".weight"):
                        kohya.setdefault(name[: -len(".weight")].replace(".", "_"), []).append(name)
                # underscores also join words inside names ("conv_in"), so a tail needs three parts
                kohya_suffixes = _SuffixIndex(kohya, sep="_", min_tail=3)
            assert kohya_suffixes is not None
            stem = key
            for p in KOHYA_PREFIXES:
                if key.startswith(p):
                    stem = key[len(p) :]
                    break
            hits = list(kohya.get(stem, ()))
            if not hits:
                hits = [n for s in kohya_suffixes.candidates(stem) for n in kohya[s]]
        else:
            hits = [v for v in _variants(key) if v in base_set]
            if not hits:
                if suffixes is None:
                    suffixes = _SuffixIndex(base)
                hits = suffixes.candidates(_core(key))
        if len(hits) == 1:
            mapping[key] = hits[0]
        elif hits:
            ambiguous[key] = sorted(hits)
        else:
            unmatched.append(key)
    return KeyMatch(mapping=mapping, unmatched=unmatched, ambiguous=ambiguous)


def _module_name(base_key: str) -> str:
    module = base_key[: -len(".weight")] if base_key.endswith(".weight") else base_key
    return module.rsplit(".", 1)[-1]


def is_conv1d(base_key: str, model_type: str | None) -> bool | None:
    """Whether ``base_key`` is a GPT-2 style ``Conv1D`` weight: True / False, or None when unknown.

    Known from the ``model_type`` of the base's ``config.json``: Conv1D families name these layers
    ``c_attn``, ``c_proj``, ``c_fc`` and ``q_attn``; every other transformers model uses ``nn.Linear``.
    Unknown when there is no ``model_type``.
    """
    if not model_type:
        return None
    mt = model_type.lower()
    if mt in CONV1D_MODEL_TYPES or "gpt2" in mt.replace("_", "").replace("-", ""):
        return _module_name(base_key) in CONV1D_MODULE_NAMES
    return False


def needs_transpose(
    key: str,
    delta_shape: tuple[int, ...],
    base_shape: tuple[int, ...],
    *,
    model_type: str | None,
    fan_in_fan_out: bool | None = None,
    base_key: str | None = None,
) -> bool:
    """Whether a linear delta ``(out, in)`` must be transposed to add onto the base weight.

    Non-square weights show their orientation by shape. For a square one the base's ``model_type``
    decides (`is_conv1d`); with no ``model_type`` an adapter config that says ``fan_in_fan_out: true``
    decides; otherwise `IncompatibleAdapterError` is raised rather than a guess.
    """
    name = base_key or key
    d = tuple(int(x) for x in delta_shape)
    b = tuple(int(x) for x in base_shape)
    if len(d) != 2 or len(b) != 2:
        raise IncompatibleAdapterError(
            f"{name}: a linear LoRA delta {list(d)} cannot be added to a base weight of shape {list(b)}"
        )
    straight, transposed = d == b, d[::-1] == b
    if not straight and not transposed:
        raise IncompatibleAdapterError(
            f"{name}: the adapter's update has shape {list(d)} but the base weight is {list(b)}; "
            "the adapter was made for a different base model"
        )
    if straight != transposed:
        return transposed
    known = is_conv1d(name, model_type)
    if known is not None:
        return known
    if fan_in_fan_out:
        return True
    raise IncompatibleAdapterError(
        f"{name}: cannot tell whether the square base weight {list(b)} is stored (out, in) as in nn.Linear or "
        "(in, out) as in GPT-2's Conv1D, because the base's config.json has no model_type; add model_type to "
        'config.json (for example "gpt2" or "llama")'
    )


def describe_problems(match: KeyMatch, *, limit: int = 5) -> str:
    """One or two sentences naming the keys that matched nothing or several base tensors."""
    parts: list[str] = []
    if match.unmatched:
        shown = ", ".join(match.unmatched[:limit])
        more = f" and {len(match.unmatched) - limit} more" if len(match.unmatched) > limit else ""
        parts.append(f"{len(match.unmatched)} modules match no base tensor ({shown}{more})")
    if match.ambiguous:
        items = list(match.ambiguous.items())[:limit]
        shown = "; ".join(f"{k} -> {', '.join(v[:3])}" for k, v in items)
        parts.append(f"{len(match.ambiguous)} modules match several base tensors ({shown})")
    return "; ".join(parts)
