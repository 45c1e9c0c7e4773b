"""The import graph follows the architecture (docs/architecture.rst): layers import only downward.

Every import inside ``src/lime_attr`` is parsed -- module-level and function-local, ``import x`` and
``from x import y``, relative and absolute -- and three properties are asserted:

* there is no import cycle between modules;
* no module imports a private name (``_x``) from another module, and a private module (``rules._grad``)
  is imported only from inside its own package;
* each module imports only from layers below its own (or from its own package); the layer table
  :data:`LAYERS` is the one the architecture page shows.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lime_attr"

#: bottom to top; a unit is a top-level module or package of lime_attr ("__init__" is the package root)
LAYERS: list[tuple[str, ...]] = [
    ("errors", "context", "specs", "installer", "strict_json"),
    ("model_checks", "rules"),
    ("sites", "ops", "interop"),
    ("composites", "canonizers"),
    ("resolution", "forward_state", "module_hooks"),
    ("scope",),
    ("modality",),
    ("attribution",),
    ("metrics", "mitigation"),
    ("evaluation",),
    ("generation", "visualize", "models"),
    ("evaluation.runners",),
    ("__init__",),
    ("demo",),
    ("cli",),
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}

#: modules that belong to another unit than their package: the evaluation runners (the harness, the
#: registrations of the demo-model benchmarks, and the package's re-exports) load the demo models, which
#: themselves build on the benchmark definitions below them
MODULE_UNITS = {
    "lime_attr.evaluation": "evaluation.runners",
    "lime_attr.evaluation.harness": "evaluation.runners",
    "lime_attr.evaluation.standard": "evaluation.runners",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _package(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _unit(module: str) -> str:
    if module in MODULE_UNITS:
        return MODULE_UNITS[module]
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(module: str) -> list[tuple[str, str, int]]:
    """``(imported module, imported name or "", line)`` for every lime_attr import of ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "lime_attr"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package(module).split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "lime_attr":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub, "", node.lineno) if sub in MODULES else (target, alias.name, node.lineno))
    return out


def edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, _, _ in imports(module):
            if target in MODULES and target != module:
                graph[module].add(target)
    return graph


def test_every_unit_has_a_layer():
    missing = sorted({_unit(m) for m in MODULES} - set(LAYER_OF))
    assert not missing, f"place these modules in LAYERS (and on docs/architecture.rst): {missing}"


def test_no_import_cycle():
    graph, state, cycles = edges(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_name_crosses_a_module():
    bad = []
    for module in MODULES:
        for target, name, line in imports(module):
            if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
                bad.append(f"{module}:{line} imports {name} from {target}")
            private = [p for p in target.split(".")[1:] if p.startswith("_") and not p.startswith("__")]
            if private and target in MODULES and _package(target) != _package(module) \
                    and not _package(module).startswith(_package(target) + "."):
                bad.append(f"{module}:{line} imports the private module {target} from outside its package")
    assert not bad, "\n".join(bad)


def test_layers_import_only_downward():
    bad = []
    for module in MODULES:
        here = _unit(module)
        for target, _, line in imports(module):
            there = _unit(target)
            if there == here:
                continue
            if LAYER_OF.get(there, -1) >= LAYER_OF.get(here, -1):
                bad.append(f"{module}:{line} ({here}, layer {LAYER_OF.get(here)}) imports {target} "
                           f"({there}, layer {LAYER_OF.get(there)})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", ["architecture.rst"])
def test_architecture_page_shows_the_same_layers(page):
    text = (SRC.parents[1] / "docs" / page).read_text()
    for i, units in enumerate(LAYERS):
        for unit in units:
            shown = {"__init__": "lime_attr", "evaluation.runners": "evaluation.harness"}.get(unit, unit)
            assert f"``{shown}``" in text, f"docs/{page} does not name layer {i} unit {shown!r}"
