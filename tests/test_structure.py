"""The package's shape, read from its source with `ast` (nothing is imported):

- no private name (`_name`) crosses a module boundary: neither `from .layers import _norm` nor `layers._norm` after
  `from . import layers`;
- imports run one way: the graph of gpt2fn's modules has no cycle, counting every import wherever it is written
  (module level, inside functions, under `if TYPE_CHECKING`), and counting the package `__init__` that importing a
  module of another subpackage runs first (`gpt2fn.generate` importing `gpt2fn.study.run` runs `gpt2fn/study/__init__`).
  The root `gpt2fn/__init__.py` is the public facade over every module, so it is the one package whose implicit
  run is not an edge (otherwise every module would sit in one cycle with it); its explicit imports are edges.
- the public list `gpt2fn.__all__` names exactly what `gpt2fn/__init__.py` binds publicly, each once.

No allow-list: a violation is fixed in the tree, not recorded here.
"""

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "gpt2fn"
PACKAGE = "gpt2fn"


def _module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
TREES: dict[str, ast.Module] = {name: ast.parse(p.read_text(encoding="utf-8"), filename=str(p))
                                for name, p in MODULES.items()}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an `ImportFrom` reads from."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> Iterator[tuple[ast.AST, str, str | None]]:
    """`(node, target module, imported name or None)` for every import of a gpt2fn module in `module`'s source.
    `from pkg import sub` where `sub` is a module yields the submodule as the target."""
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield node, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (node, sub, None) if sub in MODULES else (node, target, alias.name)


def _where(module: str, node: ast.AST) -> str:
    return f"{MODULES[module].relative_to(ROOT.parent)}:{getattr(node, 'lineno', '?')}"


def test_every_module_parses_and_every_gpt2fn_import_names_a_module():
    missing = [f"{_where(m, node)} imports {target}" for m in MODULES for node, target, _ in _imports(m)
               if target not in MODULES]
    assert not missing, "imports of gpt2fn modules that do not exist:\n" + "\n".join(missing)


def test_no_private_name_is_imported_across_modules():
    found = []
    for module in MODULES:
        aliases: dict[str, str] = {}  # local name -> gpt2fn module it is bound to
        for node, target, name in _imports(module):
            if name is not None and _private(name) and target != module:
                found.append(f"{_where(module, node)}: from {target} import {name}")
            if isinstance(node, ast.ImportFrom) and name is None:
                for alias in node.names:
                    if f"{_resolve(module, node)}.{alias.name}" == target:
                        aliases[alias.asname or alias.name] = target
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        aliases[alias.asname] = alias.name
                    else:
                        aliases[alias.name.split(".")[0]] = alias.name.split(".")[0]
            if _private(target.split(".")[-1]):
                found.append(f"{_where(module, node)}: imports the private module {target}")
        for node in ast.walk(TREES[module]):  # layers._norm after `from . import layers`, gpt2fn.x._y after import
            if isinstance(node, ast.Attribute) and _private(node.attr):
                base = _dotted(node.value)
                if base is None:
                    continue
                head, *rest = base.split(".")
                if head in aliases:
                    owner = ".".join([aliases[head], *rest])
                    if owner in MODULES and owner != module:
                        found.append(f"{_where(module, node)}: {base}.{node.attr} (private name of {owner})")
    assert not found, "private names used outside their module (make them public or move them):\n" + "\n".join(found)


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def import_graph() -> dict[str, set[str]]:
    """Module -> the gpt2fn modules its source imports (anywhere), with the subpackage `__init__`s those imports
    run first (not the root's, and not those of a package the importer itself lies in)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        own = module.split(".")
        for _, target, _ in _imports(module):
            if target not in MODULES or target == module:
                continue
            graph[module].add(target)
            parts = target.split(".")
            for depth in range(2, len(parts)):
                package = ".".join(parts[:depth])
                if own[:depth] != parts[:depth] and package != module:
                    graph[module].add(package)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_imports_have_no_cycle_lazy_ones_included():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_lazy_cycle():
    # the checker itself: a function-level import back is a cycle, a one-way chain is not
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    lazy = ast.parse("def f():\n    from .a import x\n")
    assert [n for n in ast.walk(lazy) if isinstance(n, ast.ImportFrom)], "ast.walk sees function-level imports"


def test_public_list_names_every_public_binding_of_the_package_once():
    tree = TREES[PACKAGE]
    listed = None
    bound: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            listed = ast.literal_eval(node.value)
        elif isinstance(node, ast.ImportFrom):
            bound |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Assign):
            bound |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
    assert listed is not None, "gpt2fn/__init__.py has no __all__"
    assert len(listed) == len(set(listed)), f"names listed twice: {sorted({n for n in listed if listed.count(n) > 1})}"
    public = {n for n in bound if not n.startswith("_")}
    assert set(listed) == public, (f"bound but not in __all__: {sorted(public - set(listed))}; "
                                   f"in __all__ but not bound: {sorted(set(listed) - public)}")


@pytest.mark.parametrize("name", ["encode", "decode"])
def test_text_helpers_the_errors_cite_exist_at_the_top_level(name):
    import gpt2fn
    from gpt2fn import tokenizer

    assert getattr(gpt2fn, name) is getattr(tokenizer, name)
    assert name in gpt2fn.__all__
