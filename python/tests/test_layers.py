"""The package's import graph: every module sits in a layer, imports only from its own layer or
below, and no chain of imports loops back (function-level imports count: a lazy import that
closes a loop is still a loop). ``docs/layers.md`` explains the layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lowbit"

# Lowest first. A pattern ending in ".*" covers a subpackage and its modules.
LAYERS: list[tuple[str, set[str]]] = [
    ("bottom: the extension, argument checks, the array adapter, atomic files",
     {"lowbit._lowbit", "lowbit._validate", "lowbit._array", "lowbit._io"}),
    ("torch tensors through the core, build facts, the synthetic task data",
     {"lowbit._ops", "lowbit._tensor", "lowbit._config", "lowbit.data", "lowbit.data.sentences"}),
    ("areas: affine quantization, BitNet, calibration, NAS cost models, the Rust runtime",
     {"lowbit._quant", "lowbit._gguf", "lowbit.bitnet", "lowbit.calib", "lowbit.ptq", "lowbit._multitask", "lowbit.nas", "lowbit.nas.*",
      "lowbit.runtime"}),
    ("PyTorch integration, the reference models, and the way out (ONNX, GGUF)",
     {"lowbit.torch", "lowbit.models", "lowbit.models.*", "lowbit.crossval", "lowbit.export", "lowbit.export.*"}),
    ("the public face: the package root, the demo, the command line",
     {"lowbit", "lowbit.demo", "lowbit.cli"}),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = p
    mods["lowbit._lowbit"] = PKG / "_lowbit.pyi"
    return mods


MODULES = _modules()


def _layer(mod: str) -> int:
    for i, (_, names) in enumerate(LAYERS):
        for n in names:
            if mod == n or (n.endswith(".*") and mod.startswith(n[:-1])):
                return i
    raise AssertionError(f"{mod} is in no layer: add it to LAYERS in this file and to docs/layers.md")


def _imports(mod: str, path: Path) -> set[str]:
    """The lowbit modules ``mod`` imports anywhere in its body."""
    out: set[str] = set()
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from lowbit import nas` imports the module lowbit.nas; `from lowbit import QuantSpec` the root.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in MODULES:  # `import lowbit.nas.cost` -> lowbit.nas.cost; foreign -> ""
                n = n.rpartition(".")[0]
            if n.startswith("lowbit") and n != mod:
                out.add(n)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items() if m != "lowbit._lowbit"}


def test_every_module_has_a_layer():
    for m in MODULES:
        _layer(m)


@pytest.mark.parametrize("mod", sorted(GRAPH))
def test_no_module_imports_upward(mod):
    up = sorted(t for t in GRAPH[mod] if _layer(t) > _layer(mod))
    assert not up, f"{mod} (layer {_layer(mod)}) imports {up} from above it"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if state.get(t) == 1:
                loop = path[path.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(loop))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_the_checker_sees_a_cycle(tmp_path):
    """The walk above finds loops through lazy imports too (a test that cannot fail proves nothing)."""
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from lowbit import torch\n")
    assert _imports("lowbit._quant", a) == {"lowbit.torch"}
    b = tmp_path / "b.py"
    b.write_text("from . import cost\nfrom .device import _device\nfrom lowbit import QuantSpec\n")
    assert _imports("lowbit.nas.search", b) == {"lowbit.nas.cost", "lowbit.nas.device", "lowbit"}
