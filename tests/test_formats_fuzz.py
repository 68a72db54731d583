"""Property-based tests of the PEFT config reader and the PEFT / kohya parsers (issue 15, "proof"): random
and mutated inputs are accepted with consistent metadata or refused with `AdapterHubError`, never with
another exception."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapterhub.errors import AdapterHubError
from adapterhub.formats.kohya import parse_kohya
from adapterhub.formats.peft import parse_peft
from adapterhub.formats.peft_config import KNOWN_FIELDS, read_config, validate_config
from adapterhub.formats.safetensors_header import SafetensorsHeader, TensorInfo

DATA = Path(__file__).parent / "data" / "wild_configs"
CORPUS = [
    json.loads(p.read_text(encoding="utf-8"))
    for p in sorted(DATA.glob("*.json"))
    if p.name != "cases.json" and p.read_text(encoding="utf-8").lstrip().startswith("{")
]
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["q_proj", "all-linear", ".*", "(", "lora", "pissa", "none", "all", "LORA", "IA3"]),
)
json_value = st.recursive(
    json_leaf,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)
field = st.one_of(st.sampled_from(sorted(KNOWN_FIELDS)), st.text(max_size=10))


def _header(tensors: dict[str, tuple[str, tuple[int, ...]]]) -> SafetensorsHeader:
    infos, pos = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = math.prod(shape) * (2 if dtype in ("F16", "BF16") else 4 if dtype in ("F32", "I32") else 8)
        infos[name] = TensorInfo(name, dtype, shape, pos, pos + n)
        pos += n
    return SafetensorsHeader(path="<fuzz>", header_len=8, file_size=16 + pos, tensors=infos)


PRE = "base_model.model.model.layers.0.self_attn"
HEADER = _header(
    {f"{PRE}.q_proj.lora_A.weight": ("F32", (4, 16)), f"{PRE}.q_proj.lora_B.weight": ("F32", (16, 4))}
)


def _consistent(config: dict[str, Any], header: SafetensorsHeader) -> None:
    try:
        weights = parse_peft(config, header)
    except AdapterHubError:
        return
    for m in weights.values():
        assert m.rank >= 1 and math.isfinite(m.scale) and m.scale > 0, m
        assert m.a_shape[0] == m.rank == m.b_shape[1]


@SETTINGS
@given(json_value)
def test_any_json_value_is_a_config_or_an_adapterhub_error(value: Any) -> None:
    try:
        config = validate_config(value)
    except AdapterHubError:
        return
    assert isinstance(config, dict)
    _consistent(config, HEADER)


@SETTINGS
@given(st.sampled_from(CORPUS), st.lists(st.tuples(field, json_value), min_size=1, max_size=3))
def test_mutated_real_configs(base: dict[str, Any], edits: list[tuple[str, Any]]) -> None:
    config = dict(base)
    for key, value in edits:
        config[key] = value
    try:
        config = validate_config(config)
    except AdapterHubError:
        return
    _consistent(config, HEADER)


@SETTINGS
@given(st.binary(max_size=300))
def test_random_config_bytes(tmp_path_factory: Any, blob: bytes) -> None:
    path = tmp_path_factory.mktemp("cfg") / "adapter_config.json"
    path.write_bytes(blob)
    with contextlib.suppress(AdapterHubError):
        read_config(path)


shapes = st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple)
dtypes = st.sampled_from(["F32", "F16", "BF16", "I64", "I32", "F64"])
suffixes = st.sampled_from(
    [
        ".lora_A.weight",
        ".lora_B.weight",
        ".lora_B.bias",
        ".lora_embedding_A",
        ".lora_embedding_B",
        ".lora_magnitude_vector",
        ".base_layer.weight",
        ".weight",
        ".bias",
    ]
)


@SETTINGS
@given(
    st.dictionaries(
        st.tuples(st.sampled_from(["q_proj", "v_proj", "embed_tokens", "lm_head"]), suffixes),
        st.tuples(dtypes, shapes),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from(CORPUS),
)
def test_random_peft_headers(
    tensors: dict[tuple[str, str], tuple[str, tuple[int, ...]]], base: dict[str, Any]
) -> None:
    header = _header({f"{PRE}.{mod}{suffix}": spec for (mod, suffix), spec in tensors.items()})
    try:
        config = validate_config(dict(base))
    except AdapterHubError:
        return
    _consistent(config, header)


@SETTINGS
@given(
    st.dictionaries(
        st.tuples(
            st.sampled_from(["lora_unet_a_to_q", "lora_te_b_q_proj"]),
            st.sampled_from([".lora_down.weight", ".lora_up.weight", ".dora_scale", ".lora_mid.weight"]),
        ),
        st.tuples(dtypes, shapes),
        min_size=1,
        max_size=5,
    )
)
def test_random_kohya_headers(tensors: dict[tuple[str, str], tuple[str, tuple[int, ...]]]) -> None:
    header = _header({stem + suffix: spec for (stem, suffix), spec in tensors.items()})
    try:
        weights = parse_kohya(header)
    except AdapterHubError:
        return
    for m in weights.values():
        assert m.rank >= 1 and m.scale > 0
