"""The e-mail channel as the config and ``check`` see it: ``email:``, read and checked once.

:class:`EmailSettings` is the one record of an SMTP submission account and its recipients.
Building the channel (:func:`gpuwatch.notify.email.build`) only resolves the password from the
environment and checks the CA file can be read. The password is a secret: never in a repr, a log
line or an error.
"""

from __future__ import annotations

import email.utils
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config.values import ConfigError, check_keys, choice, expand_path, from_env, integer, mapping, string
from ..text import quote
from .masking import present
from .spec import ChannelSpec, Limits, env_secret, require_positive, settings_of

TLS_MODES = ("starttls", "tls", "none")
KEYS = ("to", "from", "smtp_host", "smtp_port", "username", "password", "password_env", "tls", "ca_file")
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def _is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def address(text: str, key: str) -> str:
    """The bare address (``a@b``) of ``text`` (``a@b`` or ``Name <a@b>``); ValueError naming ``key``."""
    if "\r" in text or "\n" in text:
        raise ValueError(f"{key}: an address must be on one line, got {text!r}")
    _, addr = email.utils.parseaddr(text)
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain or any(c.isspace() for c in addr):
        raise ValueError(f"{key}: expected an e-mail address such as ops@example.com, got {text!r}")
    return addr


@dataclass(frozen=True)
class EmailSettings:
    """One SMTP submission account and its recipients. ``password`` never shows in the repr.

    With ``password_env``, the password is read from the environment by :meth:`resolved`."""

    to: tuple[str, ...]
    sender: str  # config key `from`; "ops@example.com" or "GPU watch <ops@example.com>"
    smtp_host: str
    smtp_port: int = 587
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # resolved from password_env by the caller
    tls: str = "starttls"  # starttls | tls (implicit, port 465) | none (a relay on localhost only)
    ca_file: str | None = None  # extra CA bundle (private CA); verification is always on
    timeout_seconds: float = 20.0  # the most one reply may take to start arriving (a socket timeout)
    deadline_seconds: float = 60.0  # the most one attempt may take: connect to QUIT, however slow the server
    subject_prefix: str = "[gpuwatch]"
    max_attempts: int = 3
    password_env: str | None = None  # the variable holding the password (read when the channel is built)

    def __post_init__(self) -> None:
        to = (self.to,) if isinstance(self.to, str) else tuple(self.to)
        object.__setattr__(self, "to", to)
        if not to:
            raise ValueError("email.to: at least one recipient is needed")
        for index, recipient in enumerate(to):
            address(recipient, f"email.to[{index}]")
        address(self.sender, "email.from")
        if not self.smtp_host.strip():
            raise ValueError("email.smtp_host: must not be empty")
        if not 0 < self.smtp_port < 65536:
            raise ValueError(f"email.smtp_port: expected 1-65535, got {self.smtp_port}")
        if self.tls not in TLS_MODES:
            raise ValueError(f"email.tls: expected one of {', '.join(TLS_MODES)}, got {self.tls!r}")
        if (self.password is not None or self.password_env) and not self.username:
            raise ValueError("email.username: a password is set but no username to log in with")
        if self.username and not self.password and not self.password_env:
            raise ValueError(
                "email.password_env: email.username is set but no password was given "
                "(set the environment variable that email.password_env names)"
            )
        if self.tls == "none":
            if self.password or self.password_env:
                raise ValueError(
                    "email.tls: 'none' would send the password in plain text; "
                    "use starttls (port 587) or tls (port 465), or a local relay without a login"
                )
            if not _is_loopback(self.smtp_host):
                raise ValueError(
                    f"email.tls: 'none' is only allowed for a relay on this machine (localhost), "
                    f"not {self.smtp_host!r}; use starttls (port 587) or tls (port 465)"
                )
        if "\r" in self.subject_prefix or "\n" in self.subject_prefix:
            raise ValueError("email.subject_prefix: must be on one line")
        require_positive(self, ("timeout_seconds", "deadline_seconds", "max_attempts"), "email")

    def resolve_password(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The password: from ``password_env`` when it is set in the environment, else ``password``."""
        return from_env(self.password_env, self.password, environ)

    def resolved(self, environ: Mapping[str, str] | None = None) -> EmailSettings:
        """These settings with the password read from the environment (ConfigError when unset)."""
        password = env_secret(self.resolve_password(environ), self.password_env, "email.password_env")
        return settings_of(lambda: replace(self, password=password))


def parse(raw: object, base: Path) -> EmailSettings:
    """``email:`` -> :class:`EmailSettings` (ConfigError naming the key path)."""
    section = mapping(raw, "email")
    check_keys(section, KEYS, "email")
    for required in ("to", "from", "smtp_host"):
        if required not in section:
            raise ConfigError(f"email: needs '{required}'")
    to = section["to"]
    to_list = [to] if isinstance(to, str) else to
    if not isinstance(to_list, list) or not to_list:
        raise ConfigError("email.to: expected a list of addresses")
    addresses = tuple(string(a, f"email.to[{i}]") for i, a in enumerate(to_list))
    for i, recipient in enumerate(addresses):
        if "@" not in recipient:
            raise ConfigError(f"email.to[{i}]: {quote(recipient)} is not an e-mail address")
    tls = choice(section.get("tls", "starttls"), "email.tls", TLS_MODES)
    port_default = 465 if tls == "tls" else 587
    values: dict[str, Any] = {
        "to": addresses,
        "sender": string(section["from"], "email.from"),
        "smtp_host": string(section["smtp_host"], "email.smtp_host"),
        "smtp_port": integer(section.get("smtp_port", port_default), "email.smtp_port", 1, 65535),
        "tls": tls,
    }
    for key in ("username", "password", "password_env"):
        if section.get(key) is not None:
            values[key] = string(section[key], f"email.{key}")
    if section.get("ca_file") is not None:
        values["ca_file"] = expand_path(string(section["ca_file"], "email.ca_file"), base)
    if tls == "none" and (values.get("password") or values.get("password_env")):
        raise ConfigError("email.tls: 'none' would send the SMTP password in clear text; use starttls or tls")
    return settings_of(lambda: EmailSettings(**values))


def secrets(settings: EmailSettings) -> list[str]:
    """The secret values in use (the password), to mask in logs."""
    return present(settings.resolve_password())


def describe(settings: EmailSettings) -> str:
    """What ``check`` says of the account: how many recipients, through which server."""
    count = len(settings.to)
    return (
        f"{count} recipient{'s' if count != 1 else ''} through {settings.smtp_host}:{settings.smtp_port} "
        f"({settings.tls})"
    )


SPEC = ChannelSpec(
    name="email",
    parse=parse,
    sender="gpuwatch.notify.email",
    secrets=secrets,
    inline_secrets=("password",),
    describe=describe,
    carries_reports=False,  # an inbox gets the alerts routed to it, not an overview every hour
    limits=Limits(),
)
