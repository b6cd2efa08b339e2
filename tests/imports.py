"""What the modules of src/gpuwatch import, read from their source with ``ast`` (nothing is
imported): the walk tests/test_layers.py checks the layering with, and that other tests reuse.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "gpuwatch"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(path: Path) -> list[str]:
    """The package a module's relative imports start from."""
    package = module_name(path).split(".")
    return package if path.name == "__init__.py" else package[:-1]


def names_imported(node: ast.AST, package: list[str]) -> set[str]:
    """The absolute names an import statement imports (relative imports resolved); none for others."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if isinstance(node, ast.ImportFrom):
        base = package[: len(package) - node.level + 1] if node.level else []
        module = ".".join([*base, node.module] if node.module else base)
        return {module} | {f"{module}.{alias.name}" for alias in node.names}
    return set()


def imports_of(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = package_of(path)
    return {name for node in ast.walk(tree) for name in names_imported(node, package)}


def function_imports(source: str, package: list[str]) -> dict[str, set[str]]:
    """Each function in ``source`` that imports inside its body -> what it imports (absolute names)."""
    found: dict[str, set[str]] = {}
    for func in ast.walk(ast.parse(source)):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            names = {name for node in ast.walk(func) for name in names_imported(node, package)}
            if names:
                found.setdefault(getattr(func, "name", "<lambda>"), set()).update(names)
    return found


MODULES = {module_name(p): imports_of(p) for p in sorted(SRC.rglob("*.py"))}


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``name`` is one of ``prefixes`` or inside one of them (``a.b`` is under ``a``)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)
