"""The package's shape (docs/internals.md): no import cycle between its modules, lazy imports included;
no module imports a private name (`_name`) of another; the engine imports nothing of the package outside
`engine/`, nor Lightning. Read from the source with `ast`, so a change that breaks a rule fails here."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_dissect"


def module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = PACKAGE.parent) -> list[tuple[str, list[str], int]]:
    """Every import in the file, at any depth (functions included): `(module, names, line)`; `root` holds
    the package folder (relative imports are resolved from the file's place under it)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names], node.lineno))
    return found


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def internal_edges() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (`from a import b` where `a.b` is a module: `a.b`)."""
    modules = package_modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, names, _ in imports(path):
            if not target.startswith("lightning_dissect"):
                continue
            submodules = [f"{target}.{item}" for item in names if f"{target}.{item}" in modules]
            for imported in submodules or [target]:
                if imported in modules and imported != name:
                    edges[name].add(imported)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The circles a depth-first walk of `edges` meets (empty: the graph has none)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycle_between_the_package_modules():
    found = cycles(internal_edges())
    assert found == [], "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in found)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]  # the walk sees one


def test_no_module_imports_a_private_name_of_another():
    modules = package_modules()
    offending = []
    for name, path in modules.items():
        for target, names, line in imports(path):
            if target.startswith("lightning_dissect") and target != name:
                offending += [f"{path.relative_to(PACKAGE.parent)}:{line} imports {item} from {target}"
                              for item in names if item.startswith("_") and not item.startswith("__")
                              and f"{target}.{item}" not in modules]
    assert offending == []


def test_the_engine_imports_neither_lightning_nor_the_package_outside_it():
    offending = []
    for name, path in package_modules().items():
        if not name.startswith("lightning_dissect.engine"):
            continue
        for target, _, line in imports(path):
            outside = target.startswith("lightning_dissect") and not target.startswith("lightning_dissect.engine")
            if outside or target.split(".")[0] in ("lightning", "pytorch_lightning"):
                offending.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert offending == []


def test_the_checks_see_imports_at_any_depth(tmp_path):
    """The reader finds a lazy import inside a function and resolves relative imports (the rules above
    would pass vacuously otherwise)."""
    source = tmp_path / "lightning_dissect" / "engine" / "x.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from lightning_dissect.callback import _private\n    from . import capture\n")
    found = imports(source, root=tmp_path)
    assert found == [("lightning_dissect.callback", ["_private"], 2), ("lightning_dissect.engine", ["capture"], 3)]
