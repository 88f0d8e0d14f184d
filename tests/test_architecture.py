"""The shape of the codebase (issue 14): imports go one way, functions stay short, the API is public."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "flowprune"
MAX_LINES = 80


def _modules() -> dict[str, Path]:
    mods = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the flowprune modules it imports, function-local imports included.

    ``from flowprune import x`` counts as importing ``flowprune.x`` (not the package root, whose
    ``__init__`` re-exports the public names and so sits above everything).
    """
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            for n in names:
                r = resolve(n) if n.startswith("flowprune") else None
                if r and r not in (m, "flowprune"):
                    graph[m].add(r)
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


def long_functions() -> list[str]:
    out = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    out.append(f"{path.relative_to(SRC.parent)}:{node.lineno} {node.name} ({n} lines)")
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
