"""The core's shape: it never imports flwr (shells translate, the core computes), and no lower layer
imports a higher one (each subpackage's docstring states what it may import)."""

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "fedsparse"

# Lowest first. A module may import its own package and any strictly lower layer, never a sibling
# of its layer or anything above it. The base modules sit at the bottom, beside each other.
LAYERS = (
    {"config", "rng", "console", "run_files"},
    {"data", "eval"},
    {"sparse"},
    {"central", "privacy"},
    {"federation"},
    {"experiments"},
    {"cli"},
)
BASE = LAYERS[0]


def imported_modules(path: Path) -> list[str]:
    """Every module name ``path`` imports, at top level or inside a function."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            if node.module == "fedsparse":
                names += [f"fedsparse.{alias.name}" for alias in node.names]
    return names


def package_of(dotted: str) -> str:
    """The top-level part under fedsparse: ``fedsparse.sparse.nmf`` -> ``sparse``."""
    return dotted.split(".")[1]


def layer_of(package: str) -> int:
    return next(index for index, members in enumerate(LAYERS) if package in members)


def core_modules() -> list[tuple[Path, str]]:
    modules = []
    for path in CORE.rglob("*.py"):
        parts = path.relative_to(CORE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) > 1:
            modules.append((path, ".".join(parts)))
    return modules


def test_core_never_imports_flwr():
    offenders = [
        f"{path.name}: {name}" for path, _ in core_modules() for name in imported_modules(path) if name.split(".")[0] == "flwr"
    ]
    assert offenders == []


def test_every_core_module_has_a_layer():
    unplaced = {package_of(dotted) for _, dotted in core_modules()} - set().union(*LAYERS)
    assert unplaced == set(), f"add {sorted(unplaced)} to LAYERS"


def test_no_lower_layer_imports_a_higher_one():
    offenders = []
    for path, dotted in core_modules():
        own = package_of(dotted)
        for name in imported_modules(path):
            if not name.startswith("fedsparse.") or package_of(name) == own:
                continue
            target = package_of(name)
            same_base = own in BASE and target in BASE
            if not same_base and layer_of(target) >= layer_of(own):
                offenders.append(f"{dotted} imports {name}")
    assert offenders == []


def test_the_layer_rule_catches_an_upward_import(tmp_path):
    module = tmp_path / "low.py"
    module.write_text("from fedsparse.federation.engine import run_federation\n")
    upward = [name for name in imported_modules(module) if layer_of(package_of(name)) > layer_of("sparse")]
    assert upward == ["fedsparse.federation.engine"]


def test_every_subpackage_says_what_it_owns_and_may_import():
    for init in CORE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc.lower(), f"{init.parent.name}/__init__.py: the docstring must say what it may import"
