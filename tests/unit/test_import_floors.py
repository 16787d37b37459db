"""The house's import rules (docs/architecture.md): no import circle, and no room imports one above it.

Every ``import`` of a moesaic module counts, also one inside a function or under ``TYPE_CHECKING``
(a function-local import that breaks a circle at import time is still a circle in the design).
"""

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "moesaic"

# the floors of docs/architecture.md, lowest first; a room may import only rooms on lower floors
# (rooms on one floor do not import each other either)
FLOORS = {
    "_checks": 0, "_config": 0.5,
    "parallel": 1,
    "layer": 2,
    "optim": 3, "checkpoint": 3, "telemetry": 3,
    "engine": 4,
    "deepspeed": 4.5,  # the DeepSpeed bridge: over the engine, under the trainer
    "models": 5, "hf": 5,
    "__init__": 5.5,  # the public names (moesaic.MoE, moesaic.initialize, ...), which the trainer uses
    "train": 6,
    "__main__": 7, "config_reference": 7,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known) -> set:
    """The moesaic modules ``name`` imports (a name imported from a package counts as its submodule if it is one)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "moesaic")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "moesaic":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    out.discard(name)
    return out


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_room_has_a_floor():
    rooms = {_room(m) for m in _modules()}
    assert rooms <= set(FLOORS), f"rooms without a floor in this test and docs/architecture.md: {rooms - set(FLOORS)}"


def test_no_room_imports_a_room_on_its_floor_or_above():
    wrong = sorted(f"{a} -> {b} (floor {FLOORS[_room(a)]} -> {FLOORS[_room(b)]})"
                   for a, targets in _graph().items() for b in targets
                   if _room(a) != _room(b) and FLOORS[_room(b)] >= FLOORS[_room(a)])
    assert not wrong, "imports that do not point down a floor:\n" + "\n".join(wrong)


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
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
                    out.append(sorted(component))
    return out


def test_no_import_circle():
    graph = _graph()
    # a package's __init__ imports its own modules; a module importing its own package back is the circle
    cycles = _cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checks_find_a_circle_and_an_upward_import():
    # the test's own machinery: a made-up graph with a circle, and the floor rule on a made-up edge
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert FLOORS[_room("moesaic.train.loop")] > FLOORS[_room("moesaic.layer.moe")]
