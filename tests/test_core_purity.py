"""The core package must never import flwr: shells translate, the core computes."""

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "fedsparse"


def test_core_never_imports_flwr():
    offenders = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] == "flwr"]
    assert offenders == []
