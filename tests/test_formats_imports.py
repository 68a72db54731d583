"""The lower layers point downwards only (DESIGN.md: each imports only the ones listed before it).
Cycles, private names and file sizes are checked for the whole package by tests/test_shape.py."""

from __future__ import annotations

from test_shape import MODULES, _imports

#: what each layer may import from the package
ALLOWED = {
    "adapterhub.lora": ("adapterhub.errors",),
    "adapterhub.formats": (
        "adapterhub.errors",
        "adapterhub.lora",
        "adapterhub.resources",
        "adapterhub.formats",
    ),
    "adapterhub.ops": ("adapterhub.errors", "adapterhub.lora", "adapterhub.formats", "adapterhub.ops"),
}


def test_layers_point_downwards() -> None:
    wrong = []
    for mod, path in MODULES.items():
        layer = next((k for k in ALLOWED if mod == k or mod.startswith(k + ".")), None)
        if layer is None:
            continue
        for target, _ in _imports(mod, path):
            inside = target.startswith("adapterhub") and target != "adapterhub"
            if inside and not any(target == a or target.startswith(a + ".") for a in ALLOWED[layer]):
                wrong.append(f"{mod} imports {target}")
    assert not wrong, "\n".join(wrong)
