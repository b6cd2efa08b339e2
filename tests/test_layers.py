"""The layering the house style promises, kept true by walking the imports of src/gpuwatch.

Pure modules (parsing, rules, words, messages, the fleet state) import no I/O: no SSH, no store, no
channel (``gpuwatch.notify`` is I/O), no sqlite3/paramiko/requests. The store keeps rows and never
delivers: it imports no channel either. SSH and polling never import rules, reports, the store or
channels.
The config's values, its YAML loader and its records sit below everything: they import no
registry and no I/O (values nothing of gpuwatch but ``text``); only ``config.load`` reads the
registries. Only the daemon and the CLI wire parts together; nothing imports them. Nothing imports
inside a function (a hidden cycle or a hidden dependency), but for the few listed and justified
in :data:`FUNCTION_IMPORTS`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from imports import MODULES, SRC, function_imports, module_name, names_imported, package_of
from imports import under as _under

TESTS = Path(__file__).resolve().parent
PURE = (
    "model",
    "text",
    "message",
    "parse",
    "probe",
    "summary",
    "render",
    "report",
    "fleet",
    "rules",
    "timetable",
    "wishes",
    "siteview",
    "reservation",  # GPU bookings: read, overlaps, in force (store/reservations.py keeps the rows)
    "usage",
    "usagereport",
    "historyview",
)
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
#: The config below the registries: these read values, YAML and records, nothing that sends or polls.
CONFIG_BELOW = ("gpuwatch.config.values", "gpuwatch.config.yaml", "gpuwatch.config.records")
REGISTRIES = ("gpuwatch.rules", "gpuwatch.notify")

#: The imports inside a function allowed, (module, function) -> what it imports, each justified.
FUNCTION_IMPORTS = {
    # `gpuwatch completion` prints a script made from the whole parser, and the parser lists this
    # command (cli/__init__.py imports cli/completion.py to register it): the parser is looked up
    # when the command runs. Known debt: main() could hand the parser to standalone commands.
    ("gpuwatch.cli.completion", "cmd_completion"): {"gpuwatch.cli", "gpuwatch.cli.build_parser"},
}


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


@pytest.mark.parametrize(
    "module", ["gpuwatch.web", "gpuwatch.pageview", "gpuwatch.metrics", "gpuwatch.pagehistory", "gpuwatch.historyview"]
)
def test_the_page_and_metrics_read_never_act(module: str) -> None:
    """They read the fleet state and the store; they never poll, connect or send."""
    forbidden = ("gpuwatch.ssh", "gpuwatch.poll", "gpuwatch.notify", "gpuwatch.daemon", "paramiko", "requests")
    bad = sorted(i for i in MODULES[module] if _under(i, forbidden))
    assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("module", [m for m in MODULES if _under(m, CONFIG_BELOW)])
def test_the_config_values_yaml_and_records_sit_below_the_registries(module: str) -> None:
    """The rules and the channels import these to read their sections: they import neither back
    (no cycle), nor anything that polls, stores or sends."""
    bad = sorted(
        i for i in MODULES[module] if _under(i, (*REGISTRIES, *IO_MODULES, *IO_LIBRARIES, "gpuwatch.config.load"))
    )
    assert not bad, f"{module} imports {bad}"


def test_the_config_values_import_nothing_of_gpuwatch_but_text() -> None:
    ours = {i for i in MODULES["gpuwatch.config.values"] if _under(i, ("gpuwatch",))}
    assert ours and all(_under(i, ("gpuwatch.text",)) or i == "gpuwatch" for i in ours), ours
    assert "gpuwatch.text" in ours


def test_only_config_load_reads_the_registries() -> None:
    """The config package's namespace (records and values) imports no registry: rules and channels
    import it; the whole Config is assembled above them, in config.load."""
    for module in (m for m in MODULES if _under(m, ("gpuwatch.config",))):
        bad = sorted(i for i in MODULES[module] if _under(i, REGISTRIES))
        if module == "gpuwatch.config.load":
            assert bad, "config.load reads the rule and channel registries"
        else:
            assert not bad, f"{module} imports {bad}"


def test_nothing_imports_inside_a_function() -> None:
    """An import inside a function hides a cycle or a dependency from the layer checks above; only
    the ones in FUNCTION_IMPORTS, each with its reason, are allowed, and each still exists."""
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        for function, names in function_imports(path.read_text(encoding="utf-8"), package_of(path)).items():
            found[(module_name(path), function)] = names
    unexpected = {key: sorted(names) for key, names in found.items() if FUNCTION_IMPORTS.get(key) != names}
    assert not unexpected, f"imports inside a function: {unexpected}"
    assert set(FUNCTION_IMPORTS) <= set(found), "an allowed function import is gone: drop it from FUNCTION_IMPORTS"


def test_the_function_import_check_sees_one() -> None:
    source = "import os\n\n\ndef f():\n    import json\n    from . import sibling\n\n\ng = lambda: None\n"
    found = function_imports(source, ["gpuwatch", "notify"])
    assert found == {"f": {"json", "gpuwatch.notify", "gpuwatch.notify.sibling"}}


def test_no_test_module_imports_another() -> None:
    """Test modules share builders through the helper modules (tests/builders.py, tests/imports.py,
    fixtures in tests/conftest.py), never by importing another test module: an import drags that
    module's fixtures into the importer (a test function imported runs twice) and ties the files."""
    tests = {path.stem for path in TESTS.glob("test_*.py")}
    assert "test_layers" in tests
    bad = {}
    for path in sorted(TESTS.glob("test_*.py")):
        names = {
            name for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) for name in names_imported(node, [])
        }
        imported = sorted(name for name in names if name.split(".")[0] in tests)
        if imported:
            bad[path.name] = imported
    assert not bad, f"test modules importing other test modules: {bad}"
