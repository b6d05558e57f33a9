"""The house rules of the package, read from its files: no import cycle between files (imports inside functions
included), wings that import downwards only, rooms of a bounded size."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "structprune"
KERNEL_WING = ("structprune.ops", "structprune.backends", "structprune._kernels")
MODEL_WING = ("structprune.model",)
USER_WING = ("structprune.qa", "structprune.strategies", "structprune.latency", "structprune.training",
             "structprune.export", "structprune.serving", "structprune.tools", "structprune.benchmark",
             "structprune.lm", "structprune.cli")
DISPATCHER = ("structprune.ops.dispatch", "structprune.ops.schema", "structprune.ops.registry")


def _module_files() -> dict[str, Path]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        if "templates" in path.parts:  # the modeling file written beside saved models, not a module of ours
            continue
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (ROOT / "kernels").glob("*.py"):
        files[f"structprune._kernels.{path.stem}"] = path
    return files


def _imports(name: str, path: Path, modules=frozenset()) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions, as absolute names."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = {f"{base}.{a.name}" for a in node.names}
            found |= names
            if node.module and not names <= modules:  # `from pkg import mod` uses mod, not pkg's __init__
                found.add(base)
    return found


@pytest.fixture(scope="module")
def graph():
    files = _module_files()
    return {name: {m for m in _imports(name, path, set(files)) if m in files and m != name}
            for name, path in files.items()}


def _in(name: str, wing: tuple) -> bool:
    return any(name == w or name.startswith(w + ".") for w in wing)


def test_no_import_cycle(graph):
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_kernel_wing_imports_only_the_kernel_wing(graph):
    bad = {n: sorted(m for m in graph[n] if not _in(m, KERNEL_WING)) for n in graph if _in(n, KERNEL_WING)}
    assert not {n: m for n, m in bad.items() if m}


def test_model_wing_imports_nothing_of_the_user_wing(graph):
    bad = {n: sorted(m for m in graph[n] if _in(m, USER_WING)) for n in graph if _in(n, MODEL_WING)}
    assert not {n: m for n, m in bad.items() if m}


def test_backends_never_import_the_dispatcher(graph):
    below = [n for n in graph if _in(n, ("structprune.backends", "structprune._kernels"))
             or n in ("structprune.ops.support", "structprune.ops.checks", "structprune.ops.padding",
                      "structprune.ops.reference")]
    for name in below:
        assert not graph[name] & set(DISPATCHER), f"{name} imports {graph[name] & set(DISPATCHER)}"


def test_at_most_twelve_modules_directly_in_the_package():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 12, modules


@pytest.mark.parametrize("folder, limit", [("structprune", 500), ("kernels", 500)])
def test_no_python_file_over_its_limit(folder, limit):
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / folder).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > limit}
    assert not long


def test_no_csrc_file_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu", ".h")
            and (n := len(p.read_text().splitlines())) > 600}
    assert not long


def test_graph_sees_the_known_edges(graph):
    """The parser resolves relative and absolute imports: the edges everyone knows are there."""
    assert "structprune.ops.support" in graph["structprune.backends.cpp.ops"]
    assert "structprune.ops.support" in graph["structprune._kernels.attention"]
    assert "structprune.ops.registry" in graph["structprune.ops.dispatch"]
    assert "structprune.ops.dispatch" in graph["structprune.model.gates"]
    assert "structprune._kernels._common" in graph["structprune._kernels.attention"]


def test_every_structprune_import_names_a_module_that_exists():
    """A module left behind by a move fails here, not only when the line runs (imports inside functions too)."""
    files = _module_files()
    missing = {}
    for name, path in files.items():
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                targets = [base] if base.startswith("structprune") else []
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("structprune")]
            else:
                continue
            for target in targets:
                if target not in files and target not in ("structprune._C", "structprune.csrc"):
                    missing.setdefault(name, []).append(target)
    assert not missing
