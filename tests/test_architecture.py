"""The package's shape: folders that name the floors, and no module imports one that imports it back.

The graph is read from the source (every ``import`` statement, including those inside functions,
since a lazy import that hides a cycle is still a cycle; ``if TYPE_CHECKING:`` blocks are left
out, they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "shirakit"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (n for child in node.orelse for n in _import_nodes_of(child))
            continue
        yield from _import_nodes_of(node)


def _import_nodes_of(node: ast.AST):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    else:
        yield from _import_nodes(node)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            # `from pkg import sub` imports the submodule when there is one, else a name of pkg
            targets = [f"{base_name}.{a.name}" if f"{base_name}.{a.name}" in known else base_name
                       for a in node.names]
        out.update(t for t in targets if t in known and t != name)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (iterative DFS, three colours)."""
    colour = dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done
    for root in sorted(graph):
        if colour[root]:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        colour[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour[child] == 1:
                return path[path.index(child):] + [child]
            elif colour[child] == 0:
                colour[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_is_read():
    """The checker sees real edges (a parser that found none would pass the tests here vacuously)."""
    graph = import_graph()
    assert "shirakit.core.state" in graph["shirakit.model.inject"]
    assert "shirakit.core.adapter" in graph["shirakit.core.layer"]
    assert "shirakit.methods" in graph["shirakit"]
    assert "shirakit.io.checkpoint" in graph["shirakit.serve.engine"]


# Each folder of src/shirakit and the folders it may import (its own included): the floors. A method
# knows the contract and nothing of models or files; model operations know no files; the
# application (training, demo, packaged data) sits above the library; the server and the command
# line are clients on top, and the server does not depend on the demo's packaged data.
# "api" is the package's top-level modules (``shirakit``, the public ``shirakit.data`` path).
LIBRARY = {"core", "methods", "compile", "model", "io"}
MAY_IMPORT = {
    "core": {"core"},
    "methods": {"core", "methods"},
    "compile": {"core", "compile"},
    "model": {"core", "methods", "compile", "model"},
    "io": LIBRARY,
    "integrations": LIBRARY | {"integrations"},
    "app": LIBRARY | {"integrations", "app"},
    "api": LIBRARY | {"integrations", "app", "api"},
    "serve": LIBRARY | {"api", "serve"},
    "cli": LIBRARY | {"integrations", "app", "api", "serve", "cli"},
}


def floor_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (SRC / PACKAGE / parts[1]).is_dir()):
        return parts[1]
    return "api"


def floor_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} ({floor_of(a)}) imports {b} ({floor_of(b)})"
                  for a, targets in graph.items() for b in targets if floor_of(b) not in MAY_IMPORT[floor_of(a)])


def test_every_module_has_a_floor():
    unknown = sorted({floor_of(m) for m in import_graph()} - set(MAY_IMPORT))
    assert not unknown, f"folders missing from MAY_IMPORT: {unknown}"


def test_imports_stay_on_their_floor_or_below():
    assert floor_violations(import_graph()) == []


def test_the_floors_are_a_stack():
    """MAY_IMPORT itself has no cycle: the folders can be stacked, each importing only below it."""
    assert find_cycle({f: allowed - {f} for f, allowed in MAY_IMPORT.items()}) is None


@pytest.mark.parametrize("edge", [
    ("shirakit.methods.shira.adapter", "shirakit.model.metrics"),    # a method reaching for model operations
    ("shirakit.methods.shira.calibration", "shirakit.model.inject"),  # calibration inside a method
    ("shirakit.serve.build", "shirakit.app.data"),                    # the server on the demo's data
])
def test_the_checker_catches_the_old_breaks(edge):
    """The three layer breaks the floors were drawn to end are each reported (so the test above is not
    vacuous for them)."""
    a, b = edge
    assert floor_violations({a: {b}}) == [f"{a} ({floor_of(a)}) imports {b} ({floor_of(b)})"]


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set()}, None),
    ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, None),
])
def test_find_cycle(graph, cycle):
    assert find_cycle(graph) == cycle


def test_state_helpers_live_in_state():
    """Model-state helpers have one home that everything imports, not inject (the orchestrator)."""
    import shirakit.core.state

    for helper in ("adapter_layers", "hosts", "state_of", "check_adapter_names"):
        assert getattr(shirakit.core.state, helper).__module__ == "shirakit.core.state"


def test_toy_method_needs_nothing_in_src():
    """tests/toy_method.py is a method (a row of tests/cases.py, so the whole contract battery and
    save/load run on it) that no file under src/ names: adding a method touches no shared code."""
    from shirakit.core.registry import METHODS
    from tests.toy_method import DiagAdapter

    assert METHODS["TOY_DIAG"] is DiagAdapter
    naming = [p for p in (SRC / PACKAGE).rglob("*.py") if "TOY_DIAG" in p.read_text() or "toy" in p.read_text()]
    assert not naming, naming


# The demo's story is the paper's: SHiRA against the LoRA baseline, each with its own learning rate;
# naming its two methods is its content, not knowledge of them.
METHOD_NAMES_ALLOWED_IN = ("shirakit/methods/", "shirakit/core/registry.py", "shirakit/app/demo.py")


def method_name_literals(path: Path, names: set[str]) -> list[str]:
    """``path:line 'NAME'`` for each string constant that is a method's name (any case), and each
    dict key or comparison operand among them: a peft_type key or an ``if method == "shira"`` chain."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.lower() in names:
            found.append(f"{path.relative_to(SRC)}:{node.lineno} {node.value!r}")
    return found


def test_method_knowledge_lives_on_the_methods():
    """No peft_type keys, method tuples or method-name chains outside methods/ and the registry:
    thresholds, recipes and choices come from the registered classes."""
    import shirakit.methods  # noqa: F401  (registers the methods)
    from shirakit.core.registry import METHODS

    names = {peft_type.lower() for peft_type in METHODS} - {"toy_diag"}
    assert {"shira", "lora", "vera", "miss"} <= names
    found = [hit for p in sorted((SRC / PACKAGE).rglob("*.py"))
             if not any(part in p.as_posix() for part in METHOD_NAMES_ALLOWED_IN)
             for hit in method_name_literals(p, names)]
    assert not found, found


def test_features_check_capabilities_not_the_core():
    """A method offers a feature's capability or not (core/capabilities.py); the core contract keeps
    no stub for it, and a feature refuses a method without it by name."""
    import pytest as _pytest

    import shirakit.methods  # noqa: F401
    from shirakit.core.adapter import Adapter
    from shirakit.core.capabilities import CompactFiles, DeltaFromFile, Fusable, require, supports
    from shirakit.core.registry import METHODS

    for member in ("combine", "compact_tensors", "expand_compact", "file_delta", "file_keys", "has_compact_layout"):
        assert not hasattr(Adapter, member), member
    assert supports(METHODS["SHIRA"], CompactFiles) and not supports(METHODS["LORA"], CompactFiles)
    assert {m for m, cls in METHODS.items() if supports(cls, Fusable)} >= {"SHIRA", "LORA"}
    assert supports(METHODS["LORA"], DeltaFromFile) and not supports(METHODS["VERA"], DeltaFromFile)
    with _pytest.raises(TypeError, match=r"combine_adapters needs a method with Fusable \(missing: combine\); "
                                          r"VeraAdapter does not offer it"):
        require(METHODS["VERA"], Fusable, "combine_adapters")
