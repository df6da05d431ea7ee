"""The package's layers, read from the code: imports only point down, and no module import circle.

Layers, lowest first (a module may import its own layer and the ones below):
  core      config, formats, atomic, errors, security, models, lineage, tracking: no ML stage logic
  serving   generate (inference on any model form), serve and the pyfunc every registered version carries
  stages    validate, split, train, evaluate, benchmark, quantize, merge, review, distill, prune
  registry  the gate, register, promote (MLflow registry); the run summary; the whole pipeline through DVC
  faces     cli (parse -> call -> print) and airflow (DAG glue); nothing imports a face but ftlib.__main__

Every import counts, including the ones inside functions (that is where circles hide).
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ftlib"
ORDER = ["core", "serving", "stages", "registry", "faces"]
LAYER_OF_PACKAGE = {"core": "core", "serving": "serving", "stages": "stages", "registry": "registry", "cli": "faces",
                    "airflow": "faces"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the ftlib modules it imports (package imports resolved to the module when it is one)."""
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "ftlib":
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == "ftlib"}
        graph[name] = {d for d in deps if d != name}
    return graph


def layer(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # ftlib itself (__version__) and ftlib.__main__
    return LAYER_OF_PACKAGE.get(parts[1])


def test_every_module_belongs_to_a_layer():
    stray = [m for m in imports() if layer(m) is None and m not in ("ftlib", "ftlib.__main__")]
    assert not stray, f"modules outside the layered packages: {stray}"


def test_imports_only_point_down():
    upward = []
    for module, deps in imports().items():
        mine = layer(module)
        for dep in deps:
            theirs = layer(dep)
            if mine is not None and theirs is not None and ORDER.index(theirs) > ORDER.index(mine):
                upward.append(f"{module} ({mine}) imports {dep} ({theirs})")
            if theirs == "faces" and mine == "faces" and dep.split(".")[1] != module.split(".")[1]:
                upward.append(f"{module} imports another face, {dep}")
    assert not upward, "\n".join(sorted(upward))


def test_no_import_circle():
    graph = imports()
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                circles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d in graph and d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not circles, "\n".join(circles)


def test_the_graph_test_sees_imports_inside_functions(tmp_path):
    """The checks above read imports anywhere in a module, not just at the top."""
    tree = ast.parse("def f():\n    from ftlib.registry.register import client\n")
    found = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert found == ["ftlib.registry.register"]
