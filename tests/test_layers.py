"""The core's architecture is checked, not only described: no import cycle among tokenpress's modules at run
time, and the layers of the import-linter contract in pyproject.toml hold."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tokenpress"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module ``module`` imports when it runs: at module level and inside functions, not under
    ``if TYPE_CHECKING:`` (relative imports resolved)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the tokenpress modules it imports at run time."""
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = _runtime_imports(tree, module, path.name == "__init__.py")
        graph[module] = {name for name in imported if name in paths and name != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strongconnect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                strongconnect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_tokenpress_has_no_import_cycle_at_run_time() -> None:
    """Imports inside functions count (they still make the dependency); type-only imports do not."""
    found = cycles(import_graph())
    assert not found, "import cycles among tokenpress modules: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_import_contracts_hold() -> None:
    """``lint-imports`` (import-linter, the contracts in pyproject.toml) passes."""
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if command is None:
        pytest.skip("import-linter is not installed (it is in the dev extra)")
    result = subprocess.run([command, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@pytest.mark.parametrize(("old", "name", "new"), [
    ("tokenpress.attach", "compress", "tokenpress.runtime.attach"),
    ("tokenpress.flops", "StageShape", "tokenpress.core.flops"),
    ("tokenpress.engine", "CompressedForward", "tokenpress.runtime.interception"),
    ("tokenpress.adapters.base", "ModelAdapter", "tokenpress.runtime.adapter"),
    ("tokenpress.adapters", "LlavaAdapter", "tokenpress.families.llava"),
    ("tokenpress.zoo.card", "random_stack", "tokenpress.tools.zoo_card"),
])
def test_a_moved_module_keeps_its_old_path_for_one_release(old: str, name: str, new: str) -> None:
    """``import tokenpress.attach`` still works, warns once naming the new path, and gives the same objects."""
    import importlib
    import warnings

    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    said = [str(w.message).split(";")[0] for w in caught if w.category is DeprecationWarning]
    assert any(message.startswith(f"{old} moved to ") and new in message for message in said), said
    assert getattr(module, name) is getattr(importlib.import_module(new), name)
    for alias in [name for name in sys.modules if name.startswith("tokenpress.adapters")] + [old]:
        sys.modules.pop(alias, None)
