"""Config: the public key names, the predecessor's flat file, and one clear message per mistake."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from builders import switched_on
from gpuwatch.cli import main
from gpuwatch.config import ConfigError, find_config_path, parse_duration
from gpuwatch.config.load import accepted_keys, load_config, parse_config
from gpuwatch.text import format_duration


def write(tmp_path: Path, text: str, name: str = "config.yaml", mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def test_documented_example_parses(tmp_path: Path) -> None:
    text = """
hosts:
  - gpu-a
  - name: gpu-b
    address: 10.0.0.12
    port: 2222
    user: bob
  - localhost
ssh:
  user: monitor
  port: 22
  key_file: ~/.ssh/id_ed25519
  password_env: GPUWATCH_SSH_PASSWORD
  known_hosts: ~/.ssh/known_hosts
  host_key_policy: accept-new
  connect_timeout: 10s
  command_timeout: 30s
state_dir: ./logs
"""
    config = load_config(write(tmp_path, text))
    a, b, local = config.hosts
    assert (a.name, a.address, a.ssh.user, a.ssh.port, a.local) == ("gpu-a", None, "monitor", 22, False)
    assert (b.name, b.address, b.ssh.user, b.ssh.port) == ("gpu-b", "10.0.0.12", "bob", 2222)
    assert {"port", "user"} <= b.explicit
    assert local.local and local.display_address == "local"
    assert a.ssh.key_file == os.path.expanduser("~/.ssh/id_ed25519")
    assert a.ssh.connect_timeout == 10 and a.ssh.command_timeout == 30
    assert config.state_dir == tmp_path / "logs"


def test_shipped_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "config.example.yaml"
    config = load_config(example)
    assert config.hosts and config.feishu is not None
    assert config.schedule.reports


def test_predecessor_flat_config_keeps_working(tmp_path: Path) -> None:
    text = """
ip_list:
  - 192.168.1.10
  - 192.168.1.11
port: 2200
user: root
password: hunter2hunter2
feishu_url: https://open.feishu.cn/open-apis/bot/v2/hook/abcdef123456
feishu_keyword: GPU
"""
    config = load_config(write(tmp_path, text))
    assert [h.name for h in config.hosts] == ["192.168.1.10", "192.168.1.11"]
    assert config.hosts[0].ssh.port == 2200 and config.hosts[0].ssh.user == "root"
    assert config.hosts[0].ssh.resolve_password({}) == "hunter2hunter2"
    assert config.feishu is not None and config.feishu.keyword == "GPU"
    assert config.feishu.resolve_url({}) == "https://open.feishu.cn/open-apis/bot/v2/hook/abcdef123456"
    assert "hunter2hunter2" not in repr(config)
    assert "abcdef123456" not in repr(config)


def test_plaintext_password_in_world_readable_file_warns(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "hosts: [a]\nssh: {password: s3cretpw}\n", mode=0o644))
    assert config.warnings and "chmod 600" in config.warnings[0] and "ssh.password" in config.warnings[0]
    assert "s3cretpw" not in config.warnings[0]
    private = load_config(write(tmp_path, "hosts: [a]\nssh: {password: s3cretpw}\n", name="p.yaml", mode=0o600))
    assert private.warnings == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hosts: [a]\nssh: {prot: 22}\n", "ssh.prot: unknown key; did you mean 'port'?"),
        ("hosts:\n  - name: a\n    adress: x\n", "hosts[0].adress: unknown key; did you mean 'address'?"),
        ("host: [a]\n", "host: unknown key; did you mean 'hosts'?"),
        ("hosts: [a]\nssh: {port: twenty}\n", "ssh.port: expected a whole number, got 'twenty'"),
        ("hosts: [a]\nssh: {port: 70000}\n", "ssh.port: 70000 is out of range"),
        ("hosts: [a]\nssh: {connect_timeout: soon}\n", "ssh.connect_timeout: 'soon' is not a duration"),
        ("hosts: [a]\nssh: {host_key_policy: yes-please}\n", "ssh.host_key_policy: 'yes-please' is not one of"),
        ("hosts: a\n", "hosts: expected a list of hosts, got a string"),
        ("hosts: []\n", "hosts: the list is empty"),
        ("ssh: {user: x}\n", "hosts: missing"),
        ("hosts: [a, a]\n", "hosts[1]: the name 'a' is already used by hosts[0]"),
        ("hosts: [a]\nfeishu: {keyword: GPU}\n", "feishu: needs 'url'"),
        ("hosts: [a]\nfeishu: {url: x, format: html}\n", "feishu.format: 'html' is not one of text, post, card"),
        (
            "hosts: [a]\nschedule: {reports: [{report: overveiw, every: 1h}]}\n",
            "schedule.reports[0].report: 'overveiw' is not one of",
        ),
        ("hosts: [a]\nschedule: {reports: [{report: user, every: 1h}]}\n", "needs 'user: <name>'"),
        ("hosts: [a]\nschedule: {reports: [{report: free, at: '25:00'}]}\n", "is not a time of day"),
        (
            "hosts: [a]\nschedule: {reports: [{report: usage, at: '09:00', day: mondy}]}\n",
            "schedule.reports[0].day: 'mondy' is not a day of the week (monday, tuesday,",
        ),
        ("hosts: [a]\nschedule: {reports: [{report: usage, every: 7d, day: monday}]}\n", "goes with 'at'"),
        ("ip_list: [a]\nhosts: [b]\n", "ip_list and hosts"),
        ("- a\n- b\n", "top level: expected a mapping"),
    ],
)
def test_mistakes_name_the_key_path(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_invalid_yaml_gives_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "hosts:\n  - a\n  - b\nssh:\n  user: x\n    port: 22\n")
    with pytest.raises(ConfigError, match=r"line 6, column 9: invalid YAML"):
        load_config(path)


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no such file; copy config\.example\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "hosts: [a]\nssh: {prot: 22}\n")
    assert main(["status", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'port'" in err
    assert "Traceback" not in err
    assert main(["status", "-c", str(tmp_path / "missing.yaml")]) == 2


def test_config_path_precedence(tmp_path: Path) -> None:
    assert find_config_path("x.yaml", {"GPUWATCH_CONFIG": "y.yaml"}) == Path("x.yaml")
    assert find_config_path(None, {"GPUWATCH_CONFIG": "y.yaml"}) == Path("y.yaml")
    assert find_config_path(None, {}) == Path("config.yaml")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("30s", 30), ("5m", 300), ("1h", 3600), ("2d", 172800), (45, 45), ("90", 90), ("1h30m", 5400), (0.5, 0.5)],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "5 minutes", "-3", True, "1x", None])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ConfigError):
        parse_duration(value, "schedule.poll_every")


def test_format_duration_reads_naturally() -> None:
    assert [format_duration(s) for s in (5, 90, 3600, 93784)] == ["5s", "1m30s", "1h", "1d2h"]


def test_schedule_defaults_and_empty_list() -> None:
    config = parse_config({"hosts": ["a"]})
    assert [(r.report, r.every) for r in config.schedule.reports] == [("overview", 3600.0)]
    assert parse_config({"hosts": ["a"], "schedule": {"reports": []}}).schedule.reports == ()


def test_a_weekly_report_names_its_day_in_full_short_or_any_case() -> None:
    for day in ("monday", "Mon", "MONDAY"):
        doc = {"hosts": ["a"], "schedule": {"reports": [{"report": "usage", "at": "09:00", "day": day}]}}
        (spec,) = parse_config(doc).schedule.reports
        assert (spec.on, spec.at, spec.describe()) == (0, "09:00", "usage weekly on Monday at 09:00")


def test_password_env_is_read_when_used() -> None:
    config = parse_config({"hosts": ["a"], "ssh": {"password_env": "PW_FOR_TEST"}})
    assert config.hosts[0].ssh.resolve_password({"PW_FOR_TEST": "abc"}) == "abc"
    assert config.hosts[0].ssh.resolve_password({}) is None


# ---------------------------------------------------------------------- values no config means


NOT_FINITE = [".inf", "-.inf", ".nan", ".NaN", "1.0e+400", "-1.0e+400"]


@pytest.mark.parametrize("value", NOT_FINITE)
@pytest.mark.parametrize(
    ("template", "key"),
    [
        ("schedule: {{poll_every: {v}}}", "schedule.poll_every"),
        ("schedule: {{reports: [{{report: free, every: {v}}}]}}", "schedule.reports[0].every"),
        ("ssh: {{connect_timeout: {v}}}", "ssh.connect_timeout"),
        ("ssh: {{command_timeout: {v}}}", "ssh.command_timeout"),
        ("ssh: {{keepalive: {v}}}", "ssh.keepalive"),
        ("alerts: {{for: {v}}}", "alerts.for"),
        ("alerts: {{repeat_every: {v}}}", "alerts.repeat_every"),
        ("alerts: {{max_runtime: {v}}}", "alerts.max_runtime"),
        ("alerts: {{idle_gpu: {{after: {v}}}}}", "alerts.idle_gpu.after"),
        ("max_parallel: {v}", "max_parallel"),
        ("ssh: {{port: {v}}}", "ssh.port"),
        ("free_gpu: {{memory_below_mib: {v}}}", "free_gpu.memory_below_mib"),
        ("alerts: {{temperature_above: {v}}}", "alerts.temperature_above"),
    ],
)
def test_infinite_and_nan_values_are_errors_naming_the_key(tmp_path: Path, template: str, key: str, value: str) -> None:
    path = write(tmp_path, "hosts: [a]\n" + template.format(v=value) + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}: {key}: " in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("9" * 400 + "s", "is not a duration"),  # 1e400 seconds: no float holds it
        ("1.0e+300", "is too long; at most 36500d (100 years)"),  # a timer would overflow
        ("36501d", "is too long"),
    ],
)
def test_durations_past_any_timer_are_errors(tmp_path: Path, value: str, expected: str) -> None:
    path = write(tmp_path, f"hosts: [a]\nschedule: {{poll_every: {value}}}\n")
    with pytest.raises(ConfigError, match=r"schedule\.poll_every: ") as info:
        load_config(path)
    assert expected in str(info.value)


def test_the_longest_duration_is_accepted() -> None:
    assert parse_duration("36500d") == 36500 * 86400


# ---------------------------------------------------------------------- bad values quoted short


def _quoted(message: str, before: str, after: str) -> str:
    return message.split(before, 1)[1].split(after, 1)[0]


def test_a_long_bad_value_is_quoted_by_its_first_80_characters(tmp_path: Path) -> None:
    path = write(tmp_path, "hosts: [a]\nssh: {host_key_policy: " + "x" * 100_000 + "}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    shown = _quoted(str(info.value), "ssh.host_key_policy: ", " is not one of")
    assert shown == "'" + "x" * 78 + "…" and len(shown) == 80


def test_a_huge_number_is_not_printed_whole(tmp_path: Path) -> None:
    path = write(tmp_path, "hosts: [a]\nmax_parallel: " + "9" * 4000 + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: max_parallel: <a number of 4000 digits> is out of range; it must be between 1 and 1024"
    )


def test_a_value_aliases_made_large_is_quoted_short(tmp_path: Path) -> None:
    """Under the alias limit, still 60,000 values: the message shows 80 characters of them."""
    lines = ["hosts: [a]", "max_parallel:", "  - &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for prev, name in zip("abcd", "bcde"):
        lines.append(f"  - &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    path = write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    shown = _quoted(str(info.value), "max_parallel: expected a whole number, got ", "\0")
    assert shown.startswith("[['lol', 'lol', 'lol', 'lol', ...], [['lol', ") and len(shown) <= 80


BILLION_LAUGHS = "hosts: [a]\nmax_parallel:\n  - &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n" + "".join(
    f"  - &{name} [{','.join([f'*{prev}'] * 9)}]\n" for prev, name in zip("abcdefg", "bcdefgh")
)


def test_billion_laughs_is_refused_at_once(tmp_path: Path) -> None:
    """322 bytes whose aliases stand for 43 million values: refused while reading, with the line.
    Run apart, with 1 GB of address space: formatting the expanded value used to take far more."""
    assert len(BILLION_LAUGHS.encode()) == 322
    write(tmp_path, BILLION_LAUGHS)
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))"
    result = subprocess.run(
        [sys.executable, "-c", f"{limit}\nimport sys\nfrom gpuwatch.cli import main\nsys.exit(main())", "check"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "gpuwatch: config error: config.yaml line 8: too many YAML aliases "
        "(they expand the document past 100000 nodes)\n"
    )


def test_aliases_a_config_really_uses_still_work(tmp_path: Path) -> None:
    """A shared block merged into every host of a large fleet stays well under the limit."""
    path = write(
        tmp_path,
        "hosts:\n  - &lab {name: gpu0, user: monitor, port: 2222, connect_timeout: 5s}\n"
        + "".join(f"  - {{<<: *lab, name: gpu{i}}}\n" for i in range(1, 300)),
    )
    config = load_config(path)
    assert len(config.hosts) == 300
    assert {(h.ssh.user, h.ssh.port, h.ssh.connect_timeout) for h in config.hosts} == {("monitor", 2222, 5.0)}
    assert [h.name for h in config.hosts[:3]] == ["gpu0", "gpu1", "gpu2"]


# ---------------------------------------------------------------------- files that are no config


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hosts: [a]\nmax_parallel: &a [*a]\n", "config.yaml line 2: the alias *a is inside its own anchor (a loop)"),
        ("hosts: " + "[" * 3000 + "]" * 3000 + "\n", "config.yaml line 1: nested more than 64 levels deep"),
        (
            "hosts: [a]\nmax_parallel: " + "7" * 5000 + "\n",
            "config.yaml line 2, column 15: invalid YAML: cannot read this value (a number with too many digits)",
        ),
        (
            "hosts: [a]\nschedule: {reports: [{report: free, at: 2024-13-45}]}\n",
            "config.yaml line 2, column 41: invalid YAML: cannot read this value (month must be in 1..12)",
        ),
        ("hosts: [a]\nmax_parallel: '²'\n", "config.yaml: max_parallel: expected a whole number, got '²'"),
        ("hosts: [a]\nlog_level: [debug]\n", "config.yaml: log_level: expected a string, got a list"),
        ("hosts: [a]\x00\n", "config.yaml: invalid YAML: unacceptable character #x0000"),
    ],
)
def test_yaml_that_python_cannot_hold_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, text: str, expected: str
) -> None:
    write(tmp_path, text)
    monkeypatch.chdir(tmp_path)
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gpuwatch: config error: {expected}") and err.count("\n") == 1, err


def test_files_that_are_no_config_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    big = tmp_path / "big.yaml"
    with big.open("wb") as fh:  # a 100 MB YAML file: one comment that never ends
        fh.write(b"hosts: [a]\n#")
        fh.write(b" " * (100 << 20))
    garbage = tmp_path / "garbage.yaml"
    garbage.write_bytes(random.Random(5).randbytes(4096))
    expected = {
        big: "larger than 1 MB, so not a gpuwatch config (one is a few KB); check the path",
        tmp_path: f"is a directory, not a config file; pass the file, e.g. -c {tmp_path / 'config.yaml'}",
        garbage: "not a text file (byte 3 is not UTF-8); check the path, or save the file as UTF-8",
    }
    for path, message in expected.items():
        assert main(["check", "-c", str(path)]) == 2
        assert capsys.readouterr().err == f"gpuwatch: config error: {path}: {message}\n"


# ---------------------------------------------------------------- config.example.yaml documents every key

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.yaml"
# Sections whose keys are documented elsewhere too: any key of ssh: can be set on a host, and
# alerts.routes takes the rule names listed under alerts:.
DOCUMENTED_BY = {"hosts[]": "ssh", "alerts.routes": "alerts"}


def documented_keys(doc: object, path: str = "") -> dict[str, set[str]]:
    """Key path (list items as ``[]``) -> the keys the example sets there."""
    found: dict[str, set[str]] = {}
    if isinstance(doc, dict):
        found.setdefault(path, set()).update(doc)
        for key, value in doc.items():
            for sub, keys in documented_keys(value, f"{path}.{key}" if path else key).items():
                found.setdefault(sub, set()).update(keys)
    elif isinstance(doc, list):
        for item in doc:
            for sub, keys in documented_keys(item, f"{path}[]").items():
                found.setdefault(sub, set()).update(keys)
    return found


def test_the_example_config_documents_every_key_the_parser_accepts() -> None:
    """Every key the parser accepts appears in config.example.yaml, set or commented out, in its
    section: a new key without a line in the example fails here."""
    doc = yaml.safe_load(switched_on(EXAMPLE.read_text(encoding="utf-8")))
    accepted: dict[str, set[str]] = {}
    for path, keys in accepted_keys(doc).items():
        accepted.setdefault(re.sub(r"\[\d+\]", "[]", path), set()).update(keys)
    documented = documented_keys(doc)
    assert {"", "ssh", "hosts[]", "feishu", "email", "alerts", "alerts.idle_gpu", "web", "web.auth"} <= set(accepted)
    missing = {}
    for path, keys in sorted(accepted.items()):
        known = documented.get(path, set()) | documented.get(DOCUMENTED_BY.get(path, ""), set())
        if keys - known:
            missing[path or "(top level)"] = sorted(keys - known)
    assert not missing, f"config.example.yaml does not document these keys: {missing}"
    # and the example as shipped (its settings commented out stay out) is a config that loads
    assert parse_config(yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))).hosts
