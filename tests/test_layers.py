"""The layering the house style promises, kept true by walking the imports of src/gpuwatch.

Pure modules (parsing, rules, words, messages, the fleet state) import no I/O: no SSH, no store, no
channel (``gpuwatch.notify`` is I/O), no sqlite3/paramiko/requests. The store keeps rows and never
delivers: it imports no channel either. SSH and polling never import rules, reports, the store or
channels.
Only the daemon and the CLI wire parts together; nothing imports them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "gpuwatch"

PURE = ("model", "text", "message", "parse", "probe", "summary", "render", "report", "fleet", "rules", "timetable")
IO_MODULES = (
    "gpuwatch.ssh",
    "gpuwatch.store",
    "gpuwatch.statedir",
    "gpuwatch.poll",
    "gpuwatch.daemon",
    "gpuwatch.cli",
    "gpuwatch.notify",
)
#: Modules that make or keep messages and must not know how they are delivered.
NO_CHANNELS = ("report", "render", "rules", "store", "message")
IO_LIBRARIES = ("sqlite3", "paramiko", "requests", "smtplib", "socket", "subprocess")
WIRING = ("gpuwatch.daemon", "gpuwatch.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


MODULES = {module_name(p): imports_of(p) for p in sorted(SRC.rglob("*.py"))}


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("module", [m for m in MODULES if _under(m, tuple(f"gpuwatch.{p}" for p in PURE))])
def test_pure_modules_do_no_io(module: str) -> None:
    bad = sorted(i for i in MODULES[module] if _under(i, IO_MODULES) or _under(i, IO_LIBRARIES))
    assert not bad, f"{module} is pure but imports {bad}"


@pytest.mark.parametrize("module", [m for m in MODULES if _under(m, tuple(f"gpuwatch.{p}" for p in NO_CHANNELS))])
def test_messages_and_the_store_know_no_channel(module: str) -> None:
    """Messages are plain records (gpuwatch.message) and the store keeps rows: delivery is notify's."""
    bad = sorted(i for i in MODULES[module] if _under(i, ("gpuwatch.notify",)))
    assert not bad, f"{module} imports {bad}"


def test_the_layers_see_the_split_packages() -> None:
    assert {"gpuwatch.message", "gpuwatch.store.outbox", "gpuwatch.notify.delivery"} <= set(MODULES)
    assert "gpuwatch.message.Message" in MODULES["gpuwatch.report"]


@pytest.mark.parametrize("module", [m for m in MODULES if _under(m, ("gpuwatch.ssh", "gpuwatch.poll"))])
def test_polling_knows_nothing_of_rules_reports_store_or_channels(module: str) -> None:
    forbidden = ("gpuwatch.rules", "gpuwatch.report", "gpuwatch.store", "gpuwatch.notify")
    bad = sorted(i for i in MODULES[module] if _under(i, forbidden))
    assert not bad, f"{module} imports {bad}"


def test_only_the_cli_imports_the_wiring() -> None:
    for module, names in MODULES.items():
        if _under(module, ("gpuwatch.cli",)) or module == "gpuwatch.__main__":
            continue
        own = (module,)
        bad = sorted(i for i in names if _under(i, WIRING) and not _under(i, own))
        assert not bad, f"{module} imports {bad}"


def test_the_walk_sees_the_package() -> None:
    assert {"gpuwatch.parse", "gpuwatch.daemon", "gpuwatch.cli", "gpuwatch.rules"} <= set(MODULES)
    assert "gpuwatch.model" in MODULES["gpuwatch.parse.gpu"]
    assert {"gpuwatch.parse.table", "gpuwatch.probe.gpu", "gpuwatch.ssh.hostkeys"} <= set(MODULES)


@pytest.mark.parametrize("module", ["gpuwatch.web", "gpuwatch.pageview", "gpuwatch.metrics"])
def test_the_page_and_metrics_read_never_act(module: str) -> None:
    """They read the fleet state and the store; they never poll, connect or send."""
    forbidden = ("gpuwatch.ssh", "gpuwatch.poll", "gpuwatch.notify", "gpuwatch.daemon", "paramiko", "requests")
    bad = sorted(i for i in MODULES[module] if _under(i, forbidden))
    assert not bad, f"{module} imports {bad}"
