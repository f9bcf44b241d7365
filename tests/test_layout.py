"""The library's layout (DESIGN.md section 5): core, parallel and store import no Ray; no
import circle between twa_ray's modules; no module longer than ``MAX_LINES`` but the few
listed, each with who shortens it."""
import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "twa_ray"
MAX_LINES = 500
# modules (a package: each of its modules) allowed over MAX_LINES until their split lands; the
# config package, core.projection and store.candidate_store, split in issue 24, no longer need a line here
LONG_MODULES = ()
# imports that close a circle, left for now: (importer: a module or package, each of whose modules
# counts, imported module); whoever owns the importer removes its line
CIRCLE_EDGES = (
    # TYPE_CHECKING imports of Projection for annotations, while core.projection imports the kernels:
    # the kernel registry's (issue 24) engineer removes this line
    ("twa_ray.core.kernels", "twa_ray.core.projection"),
)


def _modules() -> dict[str, Path]:
    """{dotted module name: file} of every module of twa_ray (a package by its __init__.py)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """What an import statement of ``module`` names, as absolute dotted names: ``from X import
    a`` gives X.a (a module or an attribute of X); a relative import is resolved from ``module``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    target = node.module or ""
    if node.level:
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    return [f"{target}.{alias.name}" for alias in node.names]


def _imported(module: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> list[str]:
    """The twa_ray modules an import statement of ``module`` imports (an attribute: its module)."""
    found = []
    for name in _targets(module, path, node):
        while name not in modules and "." in name:
            name = name.rpartition(".")[0]
        if name in modules and name != module:
            found.append(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """{module: the twa_ray modules it imports}, from every import statement of its source:
    at the top, inside functions (lazy imports) and under ``TYPE_CHECKING`` alike."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[module] = {dep for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                         for dep in _imported(module, path, node, modules)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_core_parallel_store_and_tasks_import_without_ray():
    code = ("import importlib, pkgutil, sys\n"
            "for name in ('twa_ray.core', 'twa_ray.parallel', 'twa_ray.store', 'twa_ray.tasks'):\n"
            "    package = importlib.import_module(name)\n"
            "    for module in pkgutil.walk_packages(package.__path__, name + '.'):\n"
            "        importlib.import_module(module.name)\n"
            "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.split('.')[0] == 'ray')[:5]\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_no_import_circle_between_twa_ray_modules():
    graph = import_graph()
    assert "twa_ray.runtime.base_loop" in graph and "twa_ray.parallel.sharding.fsdp" in graph  # the walk sees them
    assert "twa_ray.parallel.sharding.fsdp" in graph["twa_ray.parallel.sharding"]
    for importer, imported in CIRCLE_EDGES:
        by = [m for m in graph if (m == importer or m.startswith(importer + ".")) and imported in graph[m]]
        assert by, f"no module of {importer} imports {imported} any more: remove the line from CIRCLE_EDGES"
        for module in by:
            graph[module].discard(imported)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_is_longer_than_the_limit_but_the_listed_ones():
    lengths = {module: len(path.read_text().splitlines()) for module, path in _modules().items()}

    def listed(module: str) -> bool:
        return any(module == name or module.startswith(name + ".") for name in LONG_MODULES)

    long = {module: n for module, n in lengths.items() if n > MAX_LINES and not listed(module)}
    assert not long, f"over {MAX_LINES} lines: {long}"
    short = [name for name in LONG_MODULES if all(n <= MAX_LINES for module, n in lengths.items() if listed(module))]
    assert not short, f"no longer over {MAX_LINES} lines: remove them from LONG_MODULES: {short}"


def test_the_distributed_package_is_gone_no_shim_left():
    assert not list((PACKAGE / "distributed").rglob("*.py"))  # split into parallel/ and runtime/
    stale = [(module, name) for module, path in _modules().items()
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, (ast.Import, ast.ImportFrom))
             for name in _targets(module, path, node) if name.startswith("twa_ray.distributed")]
    assert not stale
