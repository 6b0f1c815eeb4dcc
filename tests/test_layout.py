"""The package's shape stays readable: short functions, and the command line as the top layer only."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "dermray"
MAX_FUNCTION_LINES = 60


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_no_function_is_longer_than_the_limit():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these by step: " + "; ".join(long)


def test_only_the_command_line_imports_the_command_line():
    # The CLI wires commands to library code; library code importing it back made the old cli <-> tune cycle.
    offenders = []
    for path in _modules():
        if "cli" in path.relative_to(PACKAGE).parts or path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(n == "dermray.cli" or n.startswith("dermray.cli.") for n in names):
                offenders.append(str(path.relative_to(PACKAGE.parent)))
    assert not offenders, offenders


def test_every_subpackage_says_what_it_holds():
    for init in PACKAGE.glob("*/__init__.py"):
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no docstring"
