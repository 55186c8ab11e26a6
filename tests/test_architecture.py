"""The package's layers, read from its source: every import (module level or inside a function) points down.

docs/architecture.md draws these layers; this test keeps the drawing true. It parses the source rather than
importing it, so an import hidden inside a function counts the same as one at the top of a file.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "fastalign"

# Bottom up. A module may import its own layer or any layer below, never one above.
LAYERS = {
    "kernels": 0,
    "_padding": 0,
    "ops": 1,
    "nn": 2,
    "models": 3,
    "data": 3,
    "rollout": 4,
    "rewards": 4,
    "trainers": 5,
    "sampling": 5,
    "integrations": 5,
    "commands": 6,
    "cli_arguments": 6,
    "cli_spec": 6,
    "pipeline": 7,
    "demo": 8,
    "cli": 9,
    "__main__": 9,
}
# Peers that must stay independent of each other (docs/architecture.md says so).
FORBIDDEN_PEERS = {("models", "data"), ("data", "models")}


def _modules() -> dict[str, pathlib.Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["fastalign", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """Module -> the fastalign modules it imports anywhere in its source (its own parent packages excluded)."""
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for candidate in candidates:
                # `from fastalign.ops import policy` names a module; `from fastalign.ops import policy_loss` a
                # function: walk up to the longest prefix that is a module.
                while candidate and candidate not in modules:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name and not name.startswith(candidate + "."):
                    targets.add(candidate)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


GRAPH = _imports(_modules())


def test_the_parser_sees_imports_inside_functions():
    # The present code has such imports (ops import their backends lazily); if the walk missed them, the
    # layer test below would pass vacuously.
    assert "fastalign.kernels.triton.linear_stats" in GRAPH["fastalign.ops._triton_backend"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_every_top_level_module_has_a_layer():
    unplaced = sorted({_layer(m) for m in GRAPH if _layer(m)} - set(LAYERS))
    assert unplaced == [], f"place these in LAYERS (and in docs/architecture.md): {unplaced}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _layer(m) in LAYERS))
def test_imports_point_down(module):
    here = _layer(module)
    upward = sorted(
        target
        for target in GRAPH[module]
        if _layer(target) in LAYERS
        and (LAYERS[_layer(target)] > LAYERS[here] or (here, _layer(target)) in FORBIDDEN_PEERS)
    )
    assert upward == [], f"{module} (layer {here}) imports from above or from a forbidden peer: {upward}"
