"""Imports point one way: no cycle among readme_jax's modules (imports inside functions included), no module
imports the facade (``__init__``) of a package that imports it back, ``model/`` never imports ``convert/``,
``parallel/``, ``train/`` or ``serve/``, and tests import their helpers one way (``tests.x``)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "readme_jax"
FORBIDDEN_FOR_MODEL = ("readme_jax.convert", "readme_jax.parallel", "readme_jax.train", "readme_jax.serve")


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    me = module_name(path)
    return imports_in(path.read_text(), me, me if path.name == "__init__.py" else me.rpartition(".")[0], modules)


def imports_in(source: str, me: str, package: str, modules: set[str]) -> set[str]:
    """Every readme_jax module ``source`` (module ``me`` in ``package``) imports, at module level or inside a
    function (``from a import b`` counts as a.b when that is a module, else a; relative imports resolved)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {n for n in names if n.startswith("readme_jax")}
    return {n for n in found if n in modules and n != me}


def facades_in(source: str, package: str, packages: set[str]) -> set[str]:
    """The package facades ``source`` imports by name, at module level or inside a function: ``from P import x``
    or ``import P`` for a package P (its ``__init__`` is what runs and what the names come from)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
    return {f for f in found if f in packages}


def graph() -> dict[str, set[str]]:
    files = [p for p in PKG.rglob("*.py")]
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def test_model_never_imports_convert_parallel_train_or_serve():
    bad = {m: sorted(d for d in deps if d.startswith(FORBIDDEN_FOR_MODEL))
           for m, deps in graph().items() if m.startswith("readme_jax.model")}
    assert not {m: d for m, d in bad.items() if d}


def test_no_import_cycles():
    g = graph()
    # a package's __init__ re-exporting its submodules is not a cycle with them: drop package -> child edges
    for m, deps in g.items():
        g[m] = {d for d in deps if not d.startswith(m + ".")}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def closure(g: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for d in g.get(todo.pop(), ()):
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def facade_cycles(g: dict[str, set[str]], sources: dict[str, tuple[str, str]], packages: set[str]) -> list[str]:
    """``module -> facade`` where the facade (a package's ``__init__``) imports the module back, directly or
    through others: a function-level import of it re-enters a half-initialised package."""
    return sorted(f"{m} -> {f}" for m, (src, pkg) in sources.items() for f in facades_in(src, pkg, packages)
                  if m != f and m in closure(g, f))


def _sources() -> tuple[dict[str, tuple[str, str]], set[str]]:
    files = list(PKG.rglob("*.py"))
    packages = {module_name(p) for p in files if p.name == "__init__.py"}
    out = {}
    for p in files:
        me = module_name(p)
        out[me] = (p.read_text(), me if p.name == "__init__.py" else me.rpartition(".")[0])
    return out, packages


def test_no_module_imports_a_facade_that_imports_it():
    sources, packages = _sources()
    assert not facade_cycles(graph(), sources, packages)


def test_the_facade_check_sees_a_function_level_facade_import():
    """science/layerwise.py once did ``from readme_jax.science import plots`` inside a function while
    science/__init__.py imports layerwise: that must fail."""
    sources, packages = _sources()
    bad = dict(sources)
    me = "readme_jax.science.layerwise"
    bad[me] = ("def f():\n    from readme_jax.science import plots\n", "readme_jax.science")
    assert facade_cycles(graph(), bad, packages) == [f"{me} -> readme_jax.science"]
    bad[me] = ("def f():\n    from . import plots\n", "readme_jax.science")          # relative: the same
    assert facade_cycles(graph(), bad, packages) == [f"{me} -> readme_jax.science"]


def test_tests_import_their_helpers_as_one_module():
    """tests/x.py helpers are imported as ``tests.x`` only: a bare ``import x`` (sys.path has tests/ too)
    would be a second module object with its own state."""
    tests = Path(__file__).resolve().parent
    helpers = {p.stem for p in tests.glob("*.py")}
    bare = []
    for p in tests.glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bare += [f"{p.name}: {n}" for n in names if n and n.split(".")[0] in helpers]
    assert not bare, bare


def test_the_walk_sees_function_level_and_relative_imports():
    modules = {module_name(q) for q in PKG.rglob("*.py")}
    src = "import os\ndef f():\n    from readme_jax.convert import load\n    from ..train import steps\n"
    assert imports_in(src, "readme_jax.model.x", "readme_jax.model", modules) == {
        "readme_jax.convert.load", "readme_jax.train.steps"}
