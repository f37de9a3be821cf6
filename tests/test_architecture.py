"""The layout holds: import-linter's contracts (pyproject.toml), no import cycle among faceage/
modules (the Serve application in faceage/serving, the web app in faceage/webapp) and the
checkout's app/main.py shim, counting imports inside functions, and no module over 400 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("faceage", "app")  # app/: only the `streamlit run app/main.py` shim
MAX_LINES = 400


def module_files(root: Path = REPO) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported_modules(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The project modules ``module`` imports anywhere in its body, functions included."""
    out: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import a.b.c` of a function's attribute path
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    known = set(files)
    return {mod: imported_modules(ast.parse(path.read_text(), str(path)), mod,
                                  path.name == "__init__.py", known)
            for mod, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles_counting_imports_inside_functions():
    found = cycles(import_graph(module_files()))
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_check_sees_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "faceage").mkdir()
    (tmp_path / "faceage" / "__init__.py").write_text("")
    (tmp_path / "faceage" / "a.py").write_text("from faceage.b import f\n")
    (tmp_path / "faceage" / "b.py").write_text("def f():\n    from faceage import a\n")
    (tmp_path / "faceage" / "c.py").write_text("from . import a\n")
    graph = import_graph(module_files(tmp_path))
    assert graph["faceage.c"] == {"faceage.a"}
    assert cycles(graph) == [["faceage.a", "faceage.b"]]


def test_import_linter_contracts_hold():
    """`uv run lint-imports`: the layers and the serving contracts in pyproject.toml."""
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_every_module_of_faceage_sits_in_a_layer():
    """A new subpackage (as faceage/serving and faceage/webapp were) must be placed in the layers
    contract, or import-linter checks nothing about what it imports or what imports it."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    named = {m.strip() for layer in layers for m in layer.replace("|", ":").split(":")}
    top = {".".join(name.split(".")[:2]) for name in module_files() if name.startswith("faceage.")}
    assert top - named == set(), "add these to a layer in pyproject.toml"


def test_no_module_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in module_files().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these by job (at most {MAX_LINES} lines): {long}"


MAX_FUNCTION_LINES = 60


def test_no_function_over_60_lines():
    """Functions (methods, nested functions) of faceage/ fit on a screen: longer ones are cut
    into steps with names (issue 29)."""
    long = {}
    for name, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    long[f"{name}.{node.name}"] = n
    assert long == {}, f"cut these into named steps (at most {MAX_FUNCTION_LINES} lines): {long}"
