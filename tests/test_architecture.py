"""The package's layers: imports point down the stack, never up, and never in a cycle.

A package's ``__init__`` may re-export its own modules (``hrseg.memory`` re-exports
``hrseg.memory.analytic``); every other import is an edge of the graph walked here.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "hrseg"

# Lower layers first; a module may import its own layer and the layers below it.
LAYERS = (
    {"hrseg.atomic", "hrseg.config", "hrseg.schema", "hrseg.metrics", "hrseg.lesions",
     "hrseg.runtime", "hrseg.yamlsafe"},
    {"hrseg.data", "hrseg.parallel"},
    {"hrseg.nn"},
    {"hrseg.train", "hrseg.memory", "hrseg.viz"},
    {"hrseg.workbench.pool"},
    {"hrseg.workbench.verdict"},
    {"hrseg.workbench.results", "hrseg.workbench.pipeline", "hrseg.workbench", "hrseg.commands", "hrseg.cli"},
)


def _modules() -> dict[str, Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        name = ".".join(f.relative_to(ROOT.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    return mods


def _imports(name: str, path: Path, mods: dict) -> set[str]:
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            if t in mods and t != name and not (path.name == "__init__.py" and t.startswith(name + ".")):
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, f, mods) for m, f in mods.items()}


def _layer(module: str) -> int:
    if module == "hrseg":  # the root __init__ imports nothing: `from hrseg import x` names x's layer
        return 0
    for i, layer in enumerate(LAYERS):
        if any(module == top or module.startswith(top + ".") for top in layer):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: place it")


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def dfs(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(g[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (c := dfs(v)):
                return c
        state[u] = 2
        stack.pop()
        return None

    for m in sorted(g):
        if m not in state and (c := dfs(m)):
            return c
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_point_down_the_stack():
    upward = [f"{m} -> {t}" for m, ts in graph().items() for t in ts if _layer(t) > _layer(m)]
    assert not upward, "imports that point up the stack:\n" + "\n".join(sorted(upward))


@pytest.mark.parametrize("pkg", sorted(p.parent.name for p in ROOT.rglob("__init__.py") if p.parent != ROOT))
def test_every_subpackage_says_what_lives_there(pkg):
    init = next(p for p in ROOT.rglob("__init__.py") if p.parent.name == pkg)
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc and len(doc.splitlines()) >= 2, f"{init} needs a docstring naming its modules"
    for module in init.parent.glob("*.py"):
        if module.stem != "__init__" and not module.stem.startswith("_"):
            assert module.stem in doc, f"{init}'s docstring does not mention {module.stem}"


def test_readme_map_names_every_module():
    """The README's map is where a newcomer starts: every module of the package is in it."""
    readme = (ROOT.parent / "README.md").read_text()
    start = readme.index("## Map")
    block = readme[start:readme.index("```", readme.index("```", start) + 3)]
    missing = [str(f.relative_to(ROOT.parent)) for f in sorted(ROOT.rglob("*.py"))
               if f.name != "__init__.py" and f.name not in block]
    assert not missing, f"README.md's map does not name {missing}"
