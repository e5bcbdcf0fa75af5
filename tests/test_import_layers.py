"""The package layers of metric/ (docs/ARCHITECTURE.md): each imports only from the layers below
it, and no module imports itself back through others. Imports inside functions count too, so a
cycle cannot hide behind a lazy import."""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "metric")

# Layer -> the layers (besides itself) it may import from.
ALLOWED = {
    "utils": set(),
    "config": {"utils"},
    "modeling": {"utils", "config"},
    "datasets": {"utils", "config"},
    "checkpoint": {"utils", "config", "modeling"},
    "retrieval": {"utils"},
    "engine": {"utils", "config", "modeling", "datasets", "checkpoint", "retrieval"},
    "export": {"utils", "config", "modeling", "datasets", "checkpoint", "retrieval", "engine"},
    "sweep": {"utils", "config", "modeling", "datasets", "checkpoint", "retrieval", "engine"},
}


def _modules():
    """{module name: file path} of every module under metric/."""
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def import_graph():
    """{module: {imported metric modules}} read from the source with ast."""
    modules = _modules()
    graph = {}
    for mod, path in modules.items():
        package = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == "metric"}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "metric":
                    continue
                deps.add(target)  # `from pkg import x` runs pkg/__init__ first, whatever x is
                for alias in node.names:  # ... and `from pkg import submodule` imports the submodule
                    sub = f"{target}.{alias.name}"
                    if sub in modules:
                        deps.add(sub)
        graph[mod] = {d for d in deps if d in modules and d != mod}
    return graph


def _layer(mod):
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_imports(graph):
    bad = []
    for mod, deps in graph.items():
        layer = _layer(mod)
        if layer is None:  # metric/__init__: the notebook API, on top of everything
            continue
        assert layer in ALLOWED, f"metric/{layer}/ is not a known layer: add it to ALLOWED and docs/ARCHITECTURE.md"
        for dep in deps:
            other = _layer(dep)
            if other is None or (other != layer and other not in ALLOWED[layer]):
                bad.append(f"{mod} imports {dep}")
    return sorted(bad)


def find_cycle(graph):
    """One import cycle as a list of modules, or None. A package's ``__init__`` importing its own
    submodules is not a cycle by itself; a submodule importing its package's ``__init__`` back
    would make one and is reported."""
    state = {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state:
                found = visit(dep, stack)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_no_upward_imports():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_checker_catches_violations():
    """The checks can fail: an upward import and a cycle are both found."""
    graph = {"metric.utils.a": {"metric.engine.b"}, "metric.engine.b": {"metric.utils.a"}}
    assert upward_imports(graph) == ["metric.utils.a imports metric.engine.b"]
    assert find_cycle(graph) == ["metric.engine.b", "metric.utils.a", "metric.engine.b"]


def private_uses(source, filename="<source>"):
    """``"file:line name"`` of every private name (``_x``, not ``__x__``) that ``source`` takes from
    another metric module: ``from metric.a import _x`` or ``metric_module._x`` after an import of it."""
    tree = ast.parse(source)
    modules, found = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "metric" and not node.level:
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append((node.lineno, f"{filename}:{node.lineno} {node.module}.{alias.name}"))
                else:
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "metric":
                    modules[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            value = node.value
            while isinstance(value, ast.Attribute):
                value = value.value
            if isinstance(value, ast.Name) and value.id in modules:
                found.append((node.lineno, f"{filename}:{node.lineno} {ast.unparse(node)}"))
    return [text for _, text in sorted(found)]


def test_no_private_names_across_modules():
    """A name another module needs is public and documented: no module of metric/ or tools/
    imports or reaches into another module's private (underscore) names. (Tests may.)"""
    repo = os.path.dirname(ROOT)
    bad = []
    for folder in ("metric", "tools"):
        for dirpath, _, files in os.walk(os.path.join(repo, folder)):
            for f in sorted(files):
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    with open(path, encoding="utf-8") as fh:
                        bad += private_uses(fh.read(), os.path.relpath(path, repo))
    assert bad == []


def test_private_use_checker_catches_violations():
    source = (
        "from metric.a import _x, y\nimport metric.b as b\nfrom metric import c\nb._z()\nc._w\nself._ok\nc.__doc__\n"
    )
    assert private_uses(source) == ["<source>:1 metric.a._x", "<source>:4 b._z", "<source>:5 c._w"]
