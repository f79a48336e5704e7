"""The package's import graph: no circles, and every module imports only downward."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "medseg_jax"


def _graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (lazy imports inside functions count)."""
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
        # A submodule importing its own package's __init__ (for __version__) is no edge.
        graph[name] = {d for d in found if d in files and d != name
                       and not (name.startswith(d + ".") and files[d].name == "__init__.py")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_jobs_import_only_downward():
    """train.py is a job, not a library: only main, the study, the choice between
    configurations and the tools import it;
    the data package, models and the shared modules import no job."""
    graph = _graph()
    jobs = {"medseg_jax.train", "medseg_jax.evaluate", "medseg_jax.predict",
            "medseg_jax.study", "medseg_jax.choose", "medseg_jax.main"}
    importers_of_train = {m for m, deps in graph.items() if "medseg_jax.train" in deps}
    assert {m for m in importers_of_train if not m.startswith("medseg_jax.tools.")} <= {
        "medseg_jax.main", "medseg_jax.study", "medseg_jax.choose"}
    for module, deps in graph.items():
        if module.startswith(("medseg_jax.data", "medseg_jax.models")) or module in {
                "medseg_jax.state", "medseg_jax.inference", "medseg_jax.checkpoint",
                "medseg_jax.postprocess",
                "medseg_jax.workdir", "medseg_jax.report", "medseg_jax.metrics",
                "medseg_jax.fileio", "medseg_jax.losses", "medseg_jax.sharding"}:
            assert not deps & jobs, (module, deps & jobs)
        if module.startswith(("medseg_jax.data", "medseg_jax.models")):
            assert not {d for d in deps if d.startswith("medseg_jax.tools")}, module


def test_no_module_needs_600_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) < 600, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
