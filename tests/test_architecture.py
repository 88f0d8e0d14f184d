"""The shape of the codebase (issue 14): imports go one way, functions stay short, the API is public."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "flowprune"
MAX_LINES = 80


def _modules(src: Path = SRC) -> dict[str, Path]:
    mods = {}
    for p in src.rglob("*.py"):
        parts = list(p.relative_to(src.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _imported(node: ast.AST, pkg: str) -> list[tuple[str, str | None]]:
    """``(module, name or None)`` pairs an import statement names, relative imports resolved."""
    if isinstance(node, ast.Import):
        return [(a.name, None) for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
            base = ".".join(up + ([base] if base else []))
        return [(base, a.name) for a in node.names]
    return []


def _submodules(mods: dict[str, Path], package: str) -> set[str]:
    """The public direct submodules of ``package`` (what ``import_submodules``/``iter_modules`` import)."""
    return {m for m in mods if m.rpartition(".")[0] == package and not m.rpartition(".")[2].startswith("_")}


def _dynamic_imports(node: ast.AST, m: str, mods: dict[str, Path]) -> set[str]:
    """Imports a call makes at run time: ``import_submodules(__name__, __path__)`` (a registry package
    imports every file in its folder) and ``importlib.import_module("flowprune.x")`` or
    ``import_module(f"flowprune.pkg.{name}")`` (every public module of that package)."""
    if not isinstance(node, ast.Call):
        return set()
    fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
    if fn == "import_submodules":
        skip = {"base"}
        return {s for s in _submodules(mods, m) if s.rpartition(".")[2] not in skip}
    if fn == "import_module" and node.args:
        arg = node.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return {arg.value}
        if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
            prefix = str(arg.values[0].value)
            if prefix.endswith("."):
                return _submodules(mods, prefix[:-1])
    return set()


def _root_exports(mods: dict[str, Path]) -> dict[str, str]:
    """Name -> the module that defines it, for every name the package root re-exports
    (``from flowprune.pruning.structural import prune`` in ``flowprune/__init__.py``)."""
    root = mods.get("flowprune")
    out: dict[str, str] = {}
    if root is None:
        return out
    for node in ast.parse(root.read_text()).body:
        for mod, name in _imported(node, "flowprune"):
            if name is not None:
                full = f"{mod}.{name}"
                out[(node.names[[a.name for a in node.names].index(name)].asname or name)] = \
                    full if full in mods else mod
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name):  # hyperflows = hyperflows_prune
            for t in node.targets:
                if isinstance(t, ast.Name) and node.value.id in out:
                    out[t.id] = out[node.value.id]
    return out


def _root_aliases(tree: ast.AST) -> set[str]:
    """Local names bound to the package root: ``import flowprune`` / ``import flowprune as fp``."""
    return {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
            for a in n.names if a.name == "flowprune"}


def _attribute_path(node: ast.Attribute) -> list[str]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else []


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the flowprune modules it imports, function-local imports included.

    Followed through the package root: ``from flowprune import prune`` and ``import flowprune as fp``
    + ``fp.prune`` count as importing the module that defines ``prune`` (the root's ``__init__``
    re-exports the public names and so sits above everything; an edge to the root itself is not
    kept). Registry packages' ``import_submodules(__name__, __path__)`` and
    ``importlib.import_module("flowprune....")`` calls count as imports of the modules they load.
    """
    mods = _modules(src)
    if len(mods) < 10 or "flowprune" not in mods:
        raise AssertionError(f"the import graph read {len(mods)} modules under {src}: the source tree is missing")
    exports = _root_exports(mods)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    def target(mod: str, name: str | None) -> str | None:
        if not mod.startswith("flowprune"):
            return None
        if mod == "flowprune" and name is not None:
            return exports.get(name) or resolve(f"flowprune.{name}")
        return resolve(f"{mod}.{name}" if name else mod)

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.name == "__init__.py" else m.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        aliases = _root_aliases(tree)
        for node in ast.walk(tree):
            found = {target(mod, name) for mod, name in _imported(node, pkg)}
            found |= {resolve(d) for d in _dynamic_imports(node, m, mods) if d.startswith("flowprune")}
            if isinstance(node, ast.Attribute) and not isinstance(getattr(node, "ctx", None), ast.Store):
                path_ = _attribute_path(node)
                if len(path_) >= 2 and path_[0] in aliases:
                    found.add(target("flowprune", path_[1]))
            graph[m] |= {r for r in found if r and r not in (m, "flowprune")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle_by_hand():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        f = root / "flowprune" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    for i in range(10):  # a real-sized tree: the builder refuses one of under 10 modules
        (root / "flowprune" / f"filler{i}.py").write_text("")
    return root / "flowprune"


def test_import_graph_follows_root_exports_attributes_and_registries(tmp_path):
    src = _write(tmp_path, {
        "__init__.py": "from flowprune.pruning.structural import prune\nfrom flowprune.plan import plan_cuts as pc\n"
                       "from flowprune import errors\nalias = prune\n",
        "pruning/__init__.py": "", "pruning/structural.py": "def prune(): pass\n",
        "plan.py": "def plan_cuts(): pass\n", "errors.py": "",
        "a.py": "def f():\n    from flowprune import prune, pc, errors\n",
        "b.py": "import flowprune as fp\n\ndef g():\n    return fp.alias(), fp.errors\n",
        "c.py": "import flowprune\nx = flowprune.pc\n",
        "reg/__init__.py": "from flowprune.registry import import_submodules\nimport_submodules(__name__, __path__)\n",
        "reg/base.py": "", "reg/one.py": "", "reg/_private.py": "", "registry.py": "",
        "cli.py": "import importlib\nmods = [importlib.import_module(f'flowprune.reg.{n}') for n in 'x']\n"
                  "importlib.import_module('flowprune.plan')\n",
    })
    g = import_graph(src)
    assert g["flowprune.a"] == {"flowprune.pruning.structural", "flowprune.plan", "flowprune.errors"}
    assert g["flowprune.b"] == {"flowprune.pruning.structural", "flowprune.errors"}
    assert g["flowprune.c"] == {"flowprune.plan"}
    assert g["flowprune.reg"] == {"flowprune.registry", "flowprune.reg.one"}  # base and _private are skipped
    assert g["flowprune.cli"] == {"flowprune.reg.base", "flowprune.reg.one", "flowprune.plan"}
    # a cycle through a root re-export is found
    (src / "plan.py").write_text("from flowprune import a\n")
    assert cycles(import_graph(src)) == [["flowprune.a", "flowprune.plan"]]


def test_checks_fail_when_they_read_no_source(tmp_path):
    with pytest.raises(AssertionError, match="source tree is missing"):
        import_graph(tmp_path / "src" / "flowprune")
    with pytest.raises(AssertionError, match="source tree is missing"):
        long_functions(tmp_path / "src" / "flowprune")


def test_the_real_graph_is_the_whole_package():
    g = import_graph()
    assert len(g) >= 60 and {"flowprune.cli", "flowprune.plan", "flowprune.scores.agf"} <= set(g)
    assert "flowprune.scores.agf" in g["flowprune.scores"]  # the registry's dynamic import is an edge
    assert "flowprune.commands.prune" in g["flowprune.cli"]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"import cycles (a module below imports one above): {found}"


def test_layers_point_down():
    g = import_graph()
    # the planner and the cut know nothing of the procedures built on them
    for low in ("flowprune.plan", "flowprune.cut", "flowprune.units", "flowprune.step", "flowprune.scores.base"):
        up = {m for m in g[low] if m.startswith(("flowprune.pruning", "flowprune.compare", "flowprune.commands",
                                                 "flowprune.cli", "flowprune.procedures"))}
        assert not up, f"{low} imports {up}"


def long_functions(src: Path = SRC) -> list[str]:
    out = []
    files = sorted(src.rglob("*.py"))
    if len(files) < 10:
        raise AssertionError(f"read {len(files)} source files under {src}: the source tree is missing")
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    out.append(f"{path.relative_to(src.parent)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_over_80_lines():
    assert not long_functions()


PUBLIC = ["prune", "PruneConfig", "PruneResult", "idap", "IdapConfig", "IdapResult", "hyperflows", "hyperflows_prune",
          "HyperflowsConfig", "HyperflowsResult", "route_experts", "RouteConfig", "RouteResult", "compare", "CompareConfig", "train_model", "TrainConfig", "fit", "find_units",
          "get_score", "list_scores", "register_score", "plan_cuts", "apply_cuts", "cut_heads", "plan_and_cut",
          "get_procedure", "list_procedures", "register_procedure", "register_router", "get_router",
          "list_routers", "load_plugins", "load", "save", "export", "build_model", "load_dataset", "__version__"]


@pytest.mark.parametrize("name", PUBLIC)
def test_documented_names_are_importable_from_flowprune(name):
    fp = importlib.import_module("flowprune")
    assert hasattr(fp, name) and name in fp.__all__


def test_version_has_one_source():
    from flowprune import __version__
    from flowprune._version import __version__ as v

    assert __version__ == v and v.count(".") == 2


PROCEDURES = {"prune": "PruneConfig", "idap": "IdapConfig", "hyperflows_prune": "HyperflowsConfig",
              "route_experts": "RouteConfig", "compare": "CompareConfig", "train_model": "TrainConfig"}


@pytest.mark.parametrize("name", sorted(PROCEDURES))
def test_every_procedure_has_one_shape(name):
    """``fn(model, data, config=None, **overrides)`` with a validated config that rejects unknown names."""
    import inspect

    fp = importlib.import_module("flowprune")
    fn, cfg_cls = getattr(fp, name), getattr(fp, PROCEDURES[name])
    params = inspect.signature(fn).parameters
    assert "config" in params and params["config"].default is None
    assert "data" in params and list(params).index("data") < list(params).index("config")
    assert any(p.kind is p.VAR_KEYWORD for p in params.values())
    assert issubclass(cfg_cls, fp.ProcedureConfig)
    with pytest.raises(fp.FlowpruneError, match="unknown option 'no_such_field'"):
        cfg_cls.resolve(None, {"no_such_field": 1})


def test_benchmarks_import_only_names_that_exist():
    """``make bench`` runs the benchmarks; a name one imports from another (or from flowprune) must exist,
    function-local imports included (a renamed helper broke bench_hyperflows once)."""
    import sys

    root = SRC.parents[1]
    sys.path.insert(0, str(root))
    try:
        missing = []
        for path in sorted((root / "benchmarks").glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                        and node.module.split(".")[0] in ("benchmarks", "flowprune"):
                    mod = importlib.import_module(node.module)
                    missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                                if not hasattr(mod, a.name) and not _is_submodule(node.module, a.name)]
        assert not missing
    finally:
        sys.path.remove(str(root))


def _is_submodule(package: str, name: str) -> bool:
    try:
        importlib.import_module(f"{package}.{name}")
        return True
    except ImportError:
        return False
