"""Property-based tests (hypothesis): random and mutated inputs to the PEFT and kohya readers, the recipe
parser and the server's commit parser are either accepted with consistent results or refused with an
`AdapterHubError`, never another exception, and nothing is written."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapterhub.errors import AdapterHubError

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------- PEFT config reader
@pytest.fixture(scope="module")
def peft_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers.adapters import make_catalog_adapter

    return make_catalog_adapter(tmp_path_factory.mktemp("prop") / "sql", 4, 8, ["q_proj", "v_proj"], seed=3)


CONFIG_KEYS = [
    "r",
    "lora_alpha",
    "target_modules",
    "use_rslora",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
    "fan_in_fan_out",
    "peft_type",
    "lora_bias",
    "modules_to_save",
    "base_model_name_or_path",
    "bias",
    "layers_to_transform",
    "init_lora_weights",
    "task_type",
    "exclude_modules",
]


@SETTINGS
@given(key=st.sampled_from(CONFIG_KEYS), value=json_values, drop=st.booleans())
def test_peft_config_mutations(
    peft_folder: Path, tmp_path_factory: pytest.TempPathFactory, key: str, value: Any, drop: bool
) -> None:
    from adapterhub.formats import read_adapter

    folder = tmp_path_factory.mktemp("mut")
    shutil.copytree(peft_folder, folder, dirs_exist_ok=True)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    if drop:
        cfg.pop(key, None)
    else:
        cfg[key] = value
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    before = _snapshot(folder)
    try:
        w = read_adapter(folder)
    except AdapterHubError:
        pass
    else:
        assert len(w) > 0
        for m in w.values():  # what was accepted is consistent
            assert m.rank >= 1 and m.in_features >= 1 and m.out_features >= 1
            assert m.scale == m.scale and abs(m.scale) != float("inf")
    assert _snapshot(folder) == before


@SETTINGS
@given(data=st.binary(max_size=300))
def test_peft_config_random_bytes(
    peft_folder: Path, tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    from adapterhub.formats import read_adapter

    folder = tmp_path_factory.mktemp("bytes")
    shutil.copytree(peft_folder, folder, dirs_exist_ok=True)
    (folder / "adapter_config.json").write_bytes(data)
    with pytest.raises(AdapterHubError):
        read_adapter(folder)


# ---------------------------------------------------------------------- kohya reader
@pytest.fixture(scope="module")
def kohya_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers.adapters import make_kohya

    return make_kohya(tmp_path_factory.mktemp("prop-kohya") / "anime.safetensors")


@SETTINGS
@given(
    meta=st.dictionaries(
        st.sampled_from(
            [
                "ss_network_dim",
                "ss_network_alpha",
                "ss_base_model_version",
                "modelspec.architecture",
                "ss_tag_frequency",
                "x",
            ]
        ),
        st.text(max_size=20),
        max_size=4,
    ),
    rename=st.sampled_from(["", "lora_down", "lora_up", "alpha"]),
    to=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.", max_size=12),
)
def test_kohya_mutations(
    kohya_file: Path, tmp_path_factory: pytest.TempPathFactory, meta: dict[str, str], rename: str, to: str
) -> None:
    from safetensors.torch import load_file, save_file

    from adapterhub.formats import read_adapter

    tensors = load_file(str(kohya_file))
    if rename:
        key = next(k for k in tensors if rename in k)
        tensors[key.replace(rename, to or "x")] = tensors.pop(key)
    path = tmp_path_factory.mktemp("kohya") / "mut.safetensors"
    save_file(tensors, str(path), metadata=meta)
    before = _snapshot(path.parent)
    try:
        w = read_adapter(path)
    except AdapterHubError:
        pass
    else:
        assert all(m.rank >= 1 for m in w.values())
    assert _snapshot(path.parent) == before


# ---------------------------------------------------------------------- recipes
@SETTINGS
@given(doc=json_values)
def test_random_recipes(doc: Any) -> None:
    from adapterhub.compose import load_recipe

    if not isinstance(doc, dict):
        doc = {"steps": doc}
    try:
        plan = load_recipe(doc)
    except AdapterHubError:
        return
    names = [s.name for s in plan.steps]
    assert len(names) == len(set(names)) and all(s.inputs for s in plan.steps)


step = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["a", "b", "mix", ""]),
        "method": st.sampled_from(["linear", "resize", "ties", "x"]),
        "inputs": st.lists(
            st.sampled_from(["x", "y", "a"])
            | st.fixed_dictionaries({"adapter": st.just("x"), "weight": json_scalars}),
            max_size=3,
        ),
    },
    optional={
        "rank": json_scalars,
        "density": json_scalars,
        "keep": json_scalars,
        "seed": json_scalars,
        "tags": json_values,
    },
)


@SETTINGS
@given(steps=st.lists(step, max_size=4))
def test_plausible_recipes(steps: list[dict[str, Any]]) -> None:
    from adapterhub.compose import load_recipe

    try:
        plan = load_recipe({"steps": steps})
    except AdapterHubError:
        return
    assert [s.name for s in plan.steps] == [s["name"] for s in steps]


@SETTINGS
@given(text=st.text(max_size=200))
def test_recipe_text(text: str) -> None:
    from adapterhub.compose import parse_recipe_text

    for path in ("r.yaml", "r.json"):
        try:
            doc = parse_recipe_text(text, path=path)
        except AdapterHubError:
            continue
        assert isinstance(doc, dict)


# ---------------------------------------------------------------------- the server's commit parser
def _line(key: str, value: Any) -> bytes:
    return json.dumps({"key": key, "value": value}).encode()


VALID = [
    _line("header", {"summary": "add files", "description": ""}),
    _line("file", {"path": "README.md", "encoding": "base64", "content": base64.b64encode(b"# hi").decode()}),
    _line("lfsFile", {"path": "adapter_model.safetensors", "algo": "sha256", "oid": "a" * 64, "size": 10}),
    _line("deletedFile", {"path": "old.txt"}),
]


@SETTINGS
@given(body=st.binary(max_size=400))
def test_commit_parser_random_bytes(body: bytes) -> None:
    from adapterhub.server.payload import parse_commit

    with contextlib.suppress(AdapterHubError):
        parse_commit(body)


@SETTINGS
@given(
    index=st.integers(0, len(VALID) - 1),
    field=st.sampled_from(
        ["summary", "path", "content", "oid", "size", "key", "value", "encoding", "parentCommit"]
    ),
    value=json_values,
)
def test_commit_parser_mutations(index: int, field: str, value: Any) -> None:
    from adapterhub.server.payload import parse_commit

    lines = [json.loads(x) for x in VALID]
    target = lines[index]
    if field in ("key", "value"):
        target[field] = value
    elif isinstance(target.get("value"), dict):
        target["value"][field] = value
    body = b"\n".join(json.dumps(x).encode() for x in lines)
    try:
        title, _, _, ops = parse_commit(body)
    except AdapterHubError:
        return
    assert isinstance(title, str) and title.strip()
    for op in ops:
        assert not op.path.startswith("/") and ".." not in op.path.split("/")
