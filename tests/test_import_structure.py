"""The op stack imports downwards only: backends never import the dispatcher, and no module cycle exists."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DISPATCHER = {"structprune.ops", "structprune._public_ops", "structprune.backends"}
# the op stack: the dispatcher, what it uses, the backends and the gates
STACK = ("ops", "_public_ops", "backends", "_op_support", "_padding", "_input_checks", "reference", "gates", "_extension",
         "_torch_backend", "_triton_backend")


def _module_files() -> dict[str, Path]:
    files = {f"structprune.{m}": ROOT / "structprune" / f"{m}.py" for m in STACK}
    for path in (ROOT / "kernels").glob("*.py"):
        name = f"structprune._kernels.{path.stem}"
        files[name] = path
    return files


def _imports(name: str, path: Path) -> set[str]:
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
            if node.module:  # `from . import ops` imports the module ops, not the package again
                found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


@pytest.fixture(scope="module")
def graph():
    files = _module_files()
    return {name: {m for m in _imports(name, path) if m in files and m != name} for name, path in files.items()}


def test_backends_never_import_the_dispatcher(graph):
    below = [n for n in graph if n.startswith("structprune._kernels") or n in ("structprune._triton_backend",
        "structprune._extension", "structprune._torch_backend", "structprune._op_support", "structprune._padding",
        "structprune._input_checks", "structprune.reference")]
    for name in below:
        assert not graph[name] & (DISPATCHER | {"structprune.gates"}), f"{name} imports {graph[name]}"


def test_ops_does_not_import_gates(graph):
    assert "structprune.gates" not in graph["structprune.ops"]


def test_no_import_cycle(graph):
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_graph_sees_the_known_edges(graph):
    """The parser resolves relative imports: the edges everyone knows are there."""
    assert "structprune._op_support" in graph["structprune._extension"]
    assert "structprune._op_support" in graph["structprune._kernels.attention"]
    assert "structprune.backends" in graph["structprune.ops"]
    assert "structprune.ops" in graph["structprune.gates"]
