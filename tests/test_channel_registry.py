"""The channel registry: every place that names channels finds them there, and a channel added the
way the registry asks (one module, notify/<name>.py, ending in its SPEC, and one registry entry)
is read, checked, routed, built, masked and described with nothing else changed.

The counterpart of tests/test_registry.py, which does the same for the alert rules.
"""

from __future__ import annotations

import ast
import logging
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from gpuwatch.cli.preflight import channel_findings
from gpuwatch.cli.wiring import build_channels, secrets
from gpuwatch.config.load import parse_config
from gpuwatch.config.values import ConfigError, check_keys, from_env, mapping, string
from gpuwatch.logsetup import SecretFilter
from gpuwatch.message import Message
from gpuwatch.notify.masking import present
from gpuwatch.notify.registry import CHANNEL_NAMES, CHANNELS, channel_spec, names_in_words
from gpuwatch.notify.spec import ChannelSpec, Limits, Transport, env_secret

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXAMPLE = ROOT / "config.example.yaml"
TOKEN = "pg-0123456789abcdef-token"


# ---------------------------------------------------------------- a channel added the registry's way
# What notify/pager.py would hold: one settings record, its parser, its limits, its sender and its
# build, its secrets and check line, ending in its SPEC.


@dataclass(frozen=True)
class PagerSettings:
    url: str | None = None
    url_env: str | None = None
    team: str = "gpu-admins"
    max_body_bytes: int = 1000

    def resolve_url(self, environ: Mapping[str, str] | None = None) -> str | None:
        return from_env(self.url_env, self.url, environ)

    def resolved(self, environ: Mapping[str, str] | None = None) -> PagerSettings:
        url = env_secret(self.resolve_url(environ), self.url_env, "pager.url_env")
        return replace(self, url=url)


def parse_pager(raw: object, base: Path) -> PagerSettings:
    section = mapping(raw, "pager")
    check_keys(section, ("url", "url_env", "team"), "pager")
    if "url" not in section and "url_env" not in section:
        raise ConfigError("pager: needs 'url' or 'url_env'")
    values = {key: string(section[key], f"pager.{key}") for key in ("url", "url_env", "team") if key in section}
    return PagerSettings(**values)


PAGER_LIMITS = Limits(max_body_bytes=1000, per_minute=10)


class PagerChannel:
    name = "pager"

    def __init__(self, settings: PagerSettings, transport: Transport) -> None:
        self.settings = settings
        self.sent: list[tuple[str | None, dict[str, str]]] = []

    def prepare(self, message: Message) -> list[dict[str, str]]:
        text = message.text.encode()[: self.settings.max_body_bytes].decode(errors="ignore")
        return [{"team": self.settings.team, "text": text}]

    def deliver(self, payload: dict[str, str]) -> None:
        self.sent.append((self.settings.url, payload))

    def describe(self, payload: dict[str, str]) -> str:
        return payload["text"]


def build_pager(settings: PagerSettings, transport: Transport) -> Any:
    return PagerChannel(settings.resolved(transport.environ), transport)


PAGER = ChannelSpec(
    name="pager",
    parse=parse_pager,
    sender=build_pager,
    secrets=lambda settings: present(settings.resolve_url()),
    inline_secrets=("url",),
    describe=lambda settings: f"pages team {settings.team}",
    carries_reports=False,
    limits=PAGER_LIMITS,
)


def test_a_new_channel_is_one_module_and_one_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    registry = (*CHANNELS, PAGER)
    doc: dict[str, Any] = {
        "hosts": ["a"],
        "pager": {"url_env": "PAGER_URL", "team": "night-shift"},
        "alerts": {"host_down": True, "routes": {"host_down": ["pager"], "default": ["pager"]}},
    }
    # Without its registry entry, the section and the route are mistakes that name the key.
    with pytest.raises(ConfigError, match=r"^pager: unknown key"):
        parse_config(doc, tmp_path / "config.yaml")
    config = parse_config(doc, tmp_path / "config.yaml", channels=registry)
    assert config.channels == {"pager": PagerSettings(url_env="PAGER_URL", team="night-shift")}
    assert config.alerts.routes == {"host_down": ("pager",), "default": ("pager",)}

    # Its own section's mistakes name their key path.
    for section, error in (
        ({"team": "x"}, r"^pager: needs 'url'"),
        ({"url": "https://pager.example/x", "taem": "x"}, r"^pager\.taem: unknown key; did you mean 'team'\?"),
        ({"url": ["x"]}, r"^pager\.url: expected a string"),
    ):
        with pytest.raises(ConfigError, match=error):
            parse_config({"hosts": ["a"], "pager": section}, tmp_path / "config.yaml", channels=registry)

    # Built: the secret comes from the environment at build time, never from the config.
    with pytest.raises(ConfigError, match=r"pager\.url_env: \$PAGER_URL is not set"):
        build_channels(config, channels=registry)
    url = f"https://pager.example/hook/{TOKEN}"
    monkeypatch.setenv("PAGER_URL", url)
    channel: Any = build_channels(config, channels=registry)["pager"]
    for payload in channel.prepare(Message(title="host a down", blocks=("a: no answer",), kind="alert")):
        channel.deliver(payload)
    assert channel.sent == [(url, {"team": "night-shift", "text": "host a down\n\na: no answer"})]

    # Masked in logs: the secret values its spec names are masked in every log line.
    masked = secrets(config, channels=registry)
    assert url in masked
    logger = logging.getLogger("gpuwatch.test.pager")
    logger.addFilter(SecretFilter(masked))
    with caplog.at_level(logging.INFO, logger="gpuwatch.test.pager"):
        logger.info("posting to %s", url)
    assert TOKEN not in caplog.text and "posting to ***" in caplog.text

    # Described by check from its spec.
    (line, *_) = channel_findings(config, channels=registry)
    assert (line.subject, line.ok, line.detail) == ("pager", True, "pages team night-shift")
    monkeypatch.delenv("PAGER_URL")
    (line, *_) = channel_findings(config, channels=registry)
    assert not line.ok and "pager.url_env: $PAGER_URL is not set" in line.detail

    # The error texts that list channels take the names from the registry.
    assert names_in_words(registry).endswith("email:, alertmanager: or pager:")


def test_the_registry_names_each_channel_once_in_order() -> None:
    assert CHANNEL_NAMES == ("feishu", "dingtalk", "wecom", "slack", "webhook", "email", "alertmanager")
    assert len(set(CHANNEL_NAMES)) == len(CHANNEL_NAMES)
    for spec in CHANNELS:
        assert channel_spec(spec.name) is spec
        assert spec.sender.__module__ == f"gpuwatch.notify.{spec.name}"
    assert names_in_words() == "feishu:, dingtalk:, wecom:, slack:, webhook:, email: or alertmanager:"


def test_check_describes_every_channel_from_its_spec(tmp_path: Path) -> None:
    doc = {
        "hosts": ["a"],
        "feishu": {"url": "https://open.feishu.cn/open-apis/bot/v2/hook/feishu0123456789", "keyword": "GPU"},
        "dingtalk": {"url": "https://oapi.dingtalk.com/robot/send?access_token=ding0123456789", "secret": "SECabc0123"},
        "wecom": {"url": "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=wecom-0123456789", "format": "text"},
        "slack": {"url": "https://hooks.slack.com/services/T000/B000/abcdefabcdef", "mentions": {"alice": "U0123ABCD"}},
        "webhook": {"url": "https://chat.lab.example/hooks/xxxx0123", "headers": {"X-Source": "gpuwatch"}},
        "email": {"to": ["ops@example.com"], "from": "gpuwatch@example.com", "smtp_host": "smtp.example.com"},
        "alertmanager": {"urls": ["http://am1.lab.example:9093", "http://am2.lab.example:9093"]},
    }
    config = parse_config(doc, tmp_path / "config.yaml")
    assert tuple(config.channels) == CHANNEL_NAMES
    lines = channel_findings(config)
    assert [line.subject for line in lines] == list(CHANNEL_NAMES)
    for line, spec in zip(lines, CHANNELS):
        assert line.ok, line.detail
        assert line.detail == spec.describe(config.channels[spec.name])
    described = {line.subject: line.detail for line in lines}
    assert described["feishu"] == "not signed, keyword 'GPU', format post"
    assert described["dingtalk"].startswith("signed, no keyword")
    assert described["email"] == "1 recipient through smtp.example.com:587 (starttls)"
    assert described["alertmanager"] == (
        "2 Alertmanagers (http://am1.lab.example:9093, http://am2.lab.example:9093), no auth; alerts only "
        "(reports and notices are not sent there); firing alerts re-posted every 1m, each good for 4m"
    )


def test_the_readme_and_the_example_mention_every_channel_of_the_registry() -> None:
    readme = README.read_text(encoding="utf-8")
    example = EXAMPLE.read_text(encoding="utf-8")
    for name in CHANNEL_NAMES:
        assert re.search(rf"`{name}`|^{name}:", readme, re.M), f"README.md does not mention the {name}: section"
        assert re.search(rf"^(# )?{name}:", example, re.M), f"config.example.yaml has no {name}: section"


def test_each_channel_is_one_module_ending_in_its_spec() -> None:
    """notify/<name>.py holds the whole channel and ends in its SPEC; the registry imports each
    channel module at the top and lists its SPEC; no settings module is left beside it."""
    notify = ROOT / "src" / "gpuwatch" / "notify"
    assert not sorted(notify.glob("*_settings.py"))
    registry = ast.parse((notify / "registry.py").read_text(encoding="utf-8"))
    imported = {a.name for n in registry.body if isinstance(n, ast.ImportFrom) and n.level == 1 for a in n.names}
    for spec in CHANNELS:
        assert spec.name in imported, f"registry.py does not import notify/{spec.name}.py"
        module = sys.modules[f"gpuwatch.notify.{spec.name}"]
        assert module.SPEC is spec
        for part in (spec.parse, spec.sender, spec.describe):
            assert getattr(part, "__module__", None) in (module.__name__, "gpuwatch.notify.spec"), (spec.name, part)
        tree = ast.parse(Path(str(module.__file__)).read_text(encoding="utf-8"))
        last = tree.body[-1]
        assert isinstance(last, ast.Assign) and ast.unparse(last.targets[0]) == "SPEC", f"{spec.name}.py ends in SPEC"
