"""The server's modules in layers (issue 19): app/'s import graph, read with ast, has no cycle; the
protocol modules never import each other or main.py; nothing needs `noqa: E402`; and `import app.main`
works on its own in a fresh interpreter."""
import ast
import subprocess
import sys
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app"
PROTOCOLS = {"app.native", "app.openai_api", "app.v2", "app.tokenizer_api", "app.generate", "app.openapi"}


def imports():
    """module -> the app modules it imports (anywhere in it, functions included)."""
    graph = {}
    for path in APP.glob("*.py"):
        module = "app" if path.stem == "__init__" else f"app.{path.stem}"
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found |= {f"{node.module}.{alias.name}" for alias in node.names}  # from app import v2
        graph[module] = {name for name in found if name.startswith("app.") and (APP / f"{name[4:]}.py").is_file()}
    return graph


def test_the_import_graph_has_no_cycle():
    graph = imports()
    assert PROTOCOLS | {"app.main", "app.gate", "app.http", "app.answers", "app.middleware"} <= set(graph)
    done, path = set(), []

    def visit(module):
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module):] + [module])}"
        if module in done:
            return
        path.append(module)
        for imported in graph[module]:
            visit(imported)
        path.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_protocols_import_neither_each_other_nor_main():
    graph = imports()
    for protocol in PROTOCOLS:
        assert not graph[protocol] & (PROTOCOLS | {"app.main"} - {protocol}), protocol
    below = set(graph) - PROTOCOLS - {"app.main", "app.__main__"}
    for module in below:  # the shared machinery knows no protocol
        assert not graph[module] & (PROTOCOLS | {"app.main"}), module


def test_no_import_needs_noqa_e402():
    assert [path.name for path in APP.glob("*.py") if "noqa: E402" in path.read_text(encoding="utf-8")] == []


def test_app_main_imports_on_its_own():
    for module in ("app.main", *sorted(PROTOCOLS)):  # each first, in a fresh interpreter
        done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=APP.parent, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, f"import {module}: {done.stderr}"
