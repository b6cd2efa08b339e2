"""The e-mail channel: one plain-text UTF-8 mail per message, over SMTP that is encrypted and verified.

It owns everything specific to sending mail:

* turning a :class:`~gpuwatch.notify.base.Message` into one payload (subject with the
  configured prefix, the message text, the recipients), JSON-serialisable for the outbox;
* connecting with STARTTLS (port 587) or implicit TLS (port 465), always verifying the server's
  certificate and host name; a server that does not offer STARTTLS is an error, never a reason
  to fall back to plain text. ``tls = none`` is only for a relay on this machine, and never
  carries a password;
* telling transient failures (network, timeouts, disconnects, 4xx replies) from permanent ones
  (certificate, login, refused addresses, 5xx replies) and retrying the transient ones with
  backoff;
* bounding every attempt: a socket timeout per reply, one total deadline for the whole session
  (however slowly a server trickles its replies), and an end within about a second of a stop
  request (see :mod:`gpuwatch.notify.deadline`);
* telling "the mail went out but the server's verdict never came" (a lost answer after the
  end of DATA) apart from a failure: it may have been delivered, so it is not sent again at
  once. Every payload carries its own Message-ID, so a later resend is recognisably the same
  mail.

The password is a secret: it never appears in a repr, a log line or an error message.

Its config is :class:`EmailSettings` (``email:``: recipients, sender, SMTP server, login, TLS
mode, CA file), read and checked once when the config is read; :func:`build` only resolves the
password from the environment and checks the CA file can be read.
"""

from __future__ import annotations

import base64
import email.policy
import email.utils
import ipaddress
import logging
import random
import re
import smtplib
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeAlias

from gpuwatch.config.values import ConfigError, check_keys, choice, expand_path, from_env, integer, mapping, string
from gpuwatch.message import Message
from gpuwatch.notify.base import DeliveryError
from gpuwatch.notify.deadline import current_attempt, run_guarded, shutdown_socket
from gpuwatch.notify.masking import present
from gpuwatch.notify.spec import ChannelSpec, Limits, Transport, env_secret, require_positive, settings_of
from gpuwatch.text import quote

logger = logging.getLogger(__name__)

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


# ---------------------------------------------------------------- the sender


# Backoff between attempts: base * 2**(attempt-1), capped, with jitter in [50 %, 100 %].
_BACKOFF_BASE_SECONDS = 2.0
_BACKOFF_CAP_SECONDS = 60.0
_MAX_SERVER_TEXT_CHARS = 200
# CRLF line ends, and 7-bit safe: a UTF-8 body goes base64 or quoted-printable (whichever is
# shorter), so a relay without 8BITMIME passes it intact.
_POLICY = email.policy.SMTP.clone(cte_type="7bit")
_MSGID = re.compile(r"<[^<>@\s]+@[^<>@\s]+>")
#: After a stop request, how long a session in flight may still take to finish.
_STOP_GRACE_SECONDS = 1.0
#: How the end of DATA looks on the wire: once it is sent, the mail may be delivered.
_END_OF_DATA = b"\r\n.\r\n"


#: Opens the connection (connected, before EHLO): ``(settings, ssl_context) -> smtplib.SMTP``.
#: The context is None for ``tls = none``.
SmtpFactory: TypeAlias = Callable[[EmailSettings, "ssl.SSLContext | None"], smtplib.SMTP]


def default_smtp_factory(settings: EmailSettings, context: ssl.SSLContext | None) -> smtplib.SMTP:
    """``smtplib.SMTP_SSL`` for implicit TLS, else ``smtplib.SMTP`` (STARTTLS follows later).

    Both guarded (:class:`_GuardedSMTP`): the deadline's watchdog can cut them from the start
    (the server's greeting), and they say when the mail went out in full. A connection from
    another factory is cut from the first command after it is made.
    """
    if settings.tls == "tls":
        return _GuardedSMTPSSL(
            settings.smtp_host, settings.smtp_port, context=context, timeout=settings.timeout_seconds
        )
    return _GuardedSMTP(settings.smtp_host, settings.smtp_port, timeout=settings.timeout_seconds)


def _watch(smtp: smtplib.SMTP) -> None:
    """Let the running attempt's watchdog cut this connection's current socket (it changes at
    STARTTLS); raises, cutting it, if the attempt was already given up."""
    attempt = current_attempt()
    sock = smtp.sock
    if attempt is None or sock is None or getattr(smtp, "_gpuwatch_watched", None) is sock:
        return
    smtp._gpuwatch_watched = sock  # type: ignore[attr-defined]
    attempt.attach(lambda: shutdown_socket(sock))


class _GuardedSMTP(smtplib.SMTP):
    """smtplib's client, cooperating with :func:`~gpuwatch.notify.deadline.run_guarded`."""

    def connect(self, host: str = "localhost", port: int = 0, source_address: Any = None) -> tuple[int, bytes]:
        attempt = current_attempt()
        if attempt is not None:
            attempt.check()  # given up while waiting (e.g. for DNS): open nothing
        return super().connect(host, port, source_address)

    def getreply(self) -> tuple[int, bytes]:
        _watch(self)  # before the first read, the greeting, too
        return super().getreply()

    def send(self, s: Any) -> None:  # bytes or str (typeshed: ReadableBuffer | str)
        _watch(self)
        super().send(s)
        if isinstance(s, bytes) and s.endswith(_END_OF_DATA):
            attempt = current_attempt()
            if attempt is not None:
                attempt.mark_sent()  # the whole mail is out: from now on it may be delivered


class _GuardedSMTPSSL(_GuardedSMTP, smtplib.SMTP_SSL):
    """:class:`_GuardedSMTP` over implicit TLS."""


class _Transient(Exception):
    """One attempt failed in a way a later attempt may not."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class EmailChannel:
    """Sends each message as one e-mail through an SMTP submission server.

    Implements :class:`gpuwatch.notify.base.Channel`. The connection comes from
    ``smtp_factory`` and waits between attempts go through ``sleep``, so tests can count and
    skip them; ``stop`` (SIGTERM) ends a send early. Every attempt opens its own connection
    (reports are rare; a kept-open connection would mostly be a dead one) and must end within
    ``deadline_seconds``.

    Delivery is at-least-once, with the doubt made explicit: when the connection is lost (or
    the deadline or a stop comes) after the end of the mail's DATA went out and before the
    server's verdict, ``deliver`` raises at once with ``DeliveryError.maybe_delivered`` set
    instead of sending again. A later resend carries the same Message-ID (it is in the payload),
    so mail clients that de-duplicate by Message-ID show it once.
    """

    name = "email"
    dry_run = False

    def __init__(
        self,
        settings: EmailSettings,
        *,
        smtp_factory: SmtpFactory | None = None,
        sleep: Callable[[float], None] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        """``sleep`` defaults to ``stop.wait`` when ``stop`` is given (a stop cuts backoff
        short), else ``time.sleep``."""
        self._settings = settings
        self._factory = smtp_factory if smtp_factory is not None else default_smtp_factory
        self._stop = stop
        if sleep is None:
            sleep = _waiter(stop) if stop is not None else time.sleep
        self._sleep = sleep
        self._where = f"email via {settings.smtp_host}:{settings.smtp_port}"
        self._secrets = _secret_forms(settings.username, settings.password)

    def __repr__(self) -> str:
        s = self._settings
        return f"EmailChannel({s.smtp_host}:{s.smtp_port}, tls={s.tls!r}, to={list(s.to)!r})"

    # ------------------------------------------------------------------ prepare / describe

    def prepare(self, message: Message) -> list[dict[str, Any]]:
        """One payload: ``{"subject", "text", "to", "message_id"}``. Mail has no size limit worth
        splitting for. The Message-ID is made here, once, so every resend of this payload (from
        the outbox, after a restart) is the same mail to a mail client."""
        title = " ".join(message.title.split())  # a header is one line
        prefix = self._settings.subject_prefix.strip()
        subject = f"{prefix} {title}" if prefix else title
        return [{"subject": subject, "text": message.text, "to": list(self._settings.to), "message_id": self._msgid()}]

    def _msgid(self) -> str:
        domain = address(self._settings.sender, "email.from").rpartition("@")[2]
        return email.utils.make_msgid(idstring="gpuwatch", domain=domain)

    def describe(self, payload: dict[str, Any]) -> str:
        """The mail as a person reads it: a few headers, a blank line, the body."""
        to = ", ".join(str(t) for t in payload.get("to", ()))
        return f"To: {to}\nSubject: {payload.get('subject', '')}\n\n{payload.get('text', '')}"

    # ------------------------------------------------------------------ deliver

    def deliver(self, payload: dict[str, Any]) -> None:
        """Send one payload; retry transient failures; raise DeliveryError when not accepted.

        A mail that may have been delivered is never retried here (``maybe_delivered``), and
        nothing is sent once ``stop`` is set.
        """
        mail, recipients = self._build(payload)
        sender = address(self._settings.sender, "email.from")
        attempts = self._settings.max_attempts
        last = _Transient("no attempt made")
        for attempt in range(1, attempts + 1):
            if self._stop is not None and self._stop.is_set():
                tried = f" after {attempt - 1} failed attempts" if attempt > 1 else ""
                raise DeliveryError(f"{self._where}: not sent{tried}: gpuwatch is stopping", permanent=False)
            try:
                self._guarded_attempt(mail, sender, recipients)
            except _Transient as failure:
                last = failure
            else:
                logger.debug("%s: %r accepted for %s (attempt %d)", self._where, mail["Subject"], recipients, attempt)
                return
            if attempt == attempts:
                break
            delay = _backoff(attempt)
            logger.warning(
                "%s: attempt %d/%d failed (%s); retrying in %.1f s", self._where, attempt, attempts, last.reason, delay
            )
            self._sleep(delay)
        raise DeliveryError(
            f"{self._where}: not accepted after {attempts} attempts; last: {last.reason}",
            permanent=False,
            code=last.code,
        )

    def _build(self, payload: dict[str, Any]) -> tuple[EmailMessage, list[str]]:
        """The mail (UTF-8, Date, Message-ID) and the envelope recipients; permanent error if malformed."""
        try:
            subject = str(payload["subject"])
            text = str(payload["text"])
            to = payload["to"]
            if isinstance(to, str) or not isinstance(to, Sequence) or not to:
                raise ValueError("'to' must be a non-empty list of addresses")
            recipients = [address(str(t), "payload to") for t in to]
            mail = EmailMessage(policy=_POLICY)
            mail["From"] = self._settings.sender
            mail["To"] = ", ".join(str(t) for t in to)
            mail["Subject"] = " ".join(subject.split())
            mail["Date"] = email.utils.formatdate(localtime=True)
            msgid = payload.get("message_id")
            if not isinstance(msgid, str) or not _MSGID.fullmatch(msgid):
                msgid = self._msgid()  # a payload queued before the outbox kept one
            mail["Message-ID"] = msgid
            mail.set_content(text, charset="utf-8")
        except (KeyError, TypeError, ValueError) as exc:
            raise DeliveryError(
                f"{self._where}: payload cannot be made into a mail: {type(exc).__name__}: {exc}",
                permanent=True,
                message_fault=True,
            ) from None
        return mail, recipients

    def _context(self) -> ssl.SSLContext | None:
        """A verifying client context (host name checked) plus the extra CAs of ``ca_file``."""
        if self._settings.tls == "none":
            return None
        context = ssl.create_default_context()
        if self._settings.ca_file:
            try:
                context.load_verify_locations(cafile=self._settings.ca_file)
            except (OSError, ValueError) as exc:
                raise DeliveryError(
                    f"{self._where}: email.ca_file {self._settings.ca_file!r} cannot be read as a PEM "
                    f"CA bundle ({type(exc).__name__}: {exc})",
                    permanent=True,
                ) from None
        return context

    def _guarded_attempt(self, mail: EmailMessage, sender: str, recipients: list[str]) -> None:
        """One attempt within ``deadline_seconds`` and the stop. Returns when accepted; raises
        _Transient, DeliveryError(permanent) or DeliveryError(maybe_delivered)."""
        deadline = self._settings.deadline_seconds
        outcome = run_guarded(
            lambda: self._attempt(mail, sender, recipients),
            deadline_seconds=deadline,
            stop=self._stop,
            stop_grace_seconds=_STOP_GRACE_SECONDS,
            name="smtp-send",
        )
        if outcome.abandoned is not None:
            if outcome.sent:
                raise self._maybe_delivered(
                    "gpuwatch is stopping and the server had not confirmed the mail yet"
                    if outcome.abandoned == "stopped"
                    else f"the server did not confirm the mail within {deadline:g} s"
                )
            if outcome.abandoned == "stopped":
                raise DeliveryError(f"{self._where}: not sent: gpuwatch is stopping", permanent=False)
            raise _Transient(f"the SMTP session took longer than {deadline:g} s (email.deadline_seconds)")
        if outcome.error is not None:
            raise outcome.error

    def _maybe_delivered(self, why: str) -> DeliveryError:
        return DeliveryError(
            f"{self._where}: {why}; the mail may have been delivered, so it is not sent again now "
            "(a duplicate is possible when it is; it keeps its Message-ID)",
            permanent=False,
            maybe_delivered=True,
        )

    def _attempt(self, mail: EmailMessage, sender: str, recipients: list[str]) -> None:
        """One connection. Returns when accepted; raises _Transient or DeliveryError(permanent).

        Runs in a :func:`run_guarded` worker.
        """
        s = self._settings
        context = self._context()
        smtp: smtplib.SMTP | None = None
        try:
            smtp = self._factory(s, context)
            if s.tls == "starttls":
                smtp.ehlo()
                if not smtp.has_extn("starttls"):
                    raise DeliveryError(
                        f"{self._where}: the server does not offer STARTTLS, so the mail would go in "
                        "plain text (not sent); use a server or port with STARTTLS, or email.tls: tls "
                        "for implicit TLS (usually port 465)",
                        permanent=True,
                    )
                smtp.starttls(context=context)
                smtp.ehlo()
            else:
                smtp.ehlo_or_helo_if_needed()
            if s.username and s.password:
                smtp.login(s.username, s.password)
            refused = smtp.send_message(mail, from_addr=sender, to_addrs=recipients)
        except DeliveryError:
            _close(smtp)
            raise
        except (smtplib.SMTPException, OSError) as exc:
            _close(smtp)
            attempt = current_attempt()
            failure = self._classify(exc, sender)
            if attempt is not None and attempt.sent and not isinstance(exc, smtplib.SMTPResponseException):
                # The whole mail went out and then the connection failed, not the server's
                # verdict: it may well have been queued.
                reason = failure.reason if isinstance(failure, _Transient) else self._scrub(str(exc))
                why = f"no confirmation from the server after the mail went out ({reason})"
                raise self._maybe_delivered(why) from None
            raise failure from None
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):  # the mail is already accepted
            _close(smtp)
        if refused:
            # Some recipients accepted it: sending again would duplicate it for them.
            logger.warning(
                "%s: mail accepted, but these recipients were refused: %s",
                self._where,
                self._scrub(_refusals(refused)),
            )

    def _classify(self, exc: BaseException, sender: str) -> _Transient | DeliveryError:
        """What one failed attempt means: _Transient (retry) or a permanent DeliveryError."""
        s = self._settings
        where = self._where
        if isinstance(exc, ssl.SSLCertVerificationError):
            detail = exc.verify_message or str(exc)
            return DeliveryError(
                f"{where}: the SMTP server's certificate could not be verified ({self._scrub(detail)}); "
                "set email.ca_file if it uses a private CA",
                permanent=True,
            )
        if isinstance(exc, smtplib.SMTPAuthenticationError):
            server = self._server_text(exc.smtp_error)
            if 400 <= exc.smtp_code < 500:
                return _Transient(f"temporary login failure ({exc.smtp_code} {server})", exc.smtp_code)
            return DeliveryError(
                f"{where}: the server refused the login of {s.username!r} ({exc.smtp_code} {server}); "
                "check email.username and the password variable",
                permanent=True,
                code=exc.smtp_code,
            )
        if isinstance(exc, smtplib.SMTPRecipientsRefused):
            codes = [code for code, _ in exc.recipients.values()]
            detail = self._scrub(_refusals(exc.recipients))
            if codes and all(400 <= code < 500 for code in codes):
                return _Transient(f"recipients temporarily refused: {detail}", codes[0])
            return DeliveryError(
                f"{where}: the server refused every recipient ({detail}); check email.to",
                permanent=True,
                code=codes[0] if codes else None,
                message_fault=False,  # the addresses are at fault, not this message
            )
        if isinstance(exc, smtplib.SMTPSenderRefused):
            server = self._server_text(exc.smtp_error)
            if 400 <= exc.smtp_code < 500:
                return _Transient(f"sender temporarily refused ({exc.smtp_code} {server})", exc.smtp_code)
            return DeliveryError(
                f"{where}: the server refused the sender {sender!r} ({exc.smtp_code} {server}); check "
                "email.from (the login may not be allowed to send as that address) and email.username",
                permanent=True,
                code=exc.smtp_code,
                message_fault=False,
            )
        if isinstance(exc, smtplib.SMTPServerDisconnected):
            if isinstance(exc.__context__, TimeoutError):  # smtplib turns a read timeout into this
                return _Transient(f"no answer within {s.timeout_seconds:g} s")
            return _Transient(f"the server closed the connection ({self._scrub(str(exc))})")
        if isinstance(exc, smtplib.SMTPResponseException):
            code = exc.smtp_code
            server = self._server_text(exc.smtp_error)
            if 400 <= code < 500:
                return _Transient(f"temporary failure ({code} {server})", code)
            what = "refused the mail" if isinstance(exc, smtplib.SMTPDataError) else "answered"
            return DeliveryError(
                f"{where}: the server {what} ({code} {server})",
                permanent=True,
                code=code,
                message_fault=isinstance(exc, smtplib.SMTPDataError),
            )
        if isinstance(exc, smtplib.SMTPNotSupportedError) and "AUTH" in str(exc):
            return DeliveryError(
                f"{where}: the server does not offer a login (AUTH); remove email.username, "
                "or check email.smtp_host and email.smtp_port",
                permanent=True,
            )
        if isinstance(exc, smtplib.SMTPException):
            # "No suitable authentication method found", SMTPUTF8 needed but not offered, ...
            return DeliveryError(f"{where}: {self._scrub(str(exc))}", permanent=True)
        if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            return _Transient(f"the TLS connection was cut ({self._scrub(str(exc))})")
        if isinstance(exc, ssl.SSLError):
            return DeliveryError(
                f"{where}: the TLS handshake failed ({self._scrub(str(exc))}); check email.tls and "
                "email.smtp_port (tls = implicit TLS, usually port 465; starttls, usually port 587)",
                permanent=True,
            )
        if isinstance(exc, ConnectionRefusedError):
            return _Transient("connection refused (is the SMTP server up, and is email.smtp_port right?)")
        if isinstance(exc, TimeoutError):
            return _Transient(f"no answer within {s.timeout_seconds:g} s")
        return _Transient(f"network error: {type(exc).__name__}: {self._scrub(str(exc))}")

    def _server_text(self, raw: bytes | str) -> str:
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        return self._scrub(" ".join(text.split()))[:_MAX_SERVER_TEXT_CHARS]

    def _scrub(self, text: str) -> str:
        """Mask the password (and its base64 forms, as sent in AUTH) wherever a server echoed it."""
        for secret in self._secrets:
            text = text.replace(secret, "…(masked)")
        return text


# ---------------------------------------------------------------------- helpers


def _secret_forms(username: str | None, password: str | None) -> tuple[str, ...]:
    if not password:
        return ()
    forms = {password, base64.b64encode(password.encode()).decode("ascii")}
    if username:
        forms.add(base64.b64encode(f"\0{username}\0{password}".encode()).decode("ascii"))
    return tuple(sorted(forms, key=len, reverse=True))


def _refusals(refused: dict[str, tuple[int, bytes]]) -> str:
    return "; ".join(
        f"{addr}: {code} {' '.join(text.decode('utf-8', 'replace').split())[:_MAX_SERVER_TEXT_CHARS]}"
        for addr, (code, text) in refused.items()
    )


def _close(smtp: smtplib.SMTP | None) -> None:
    """Drop the connection without QUIT: after a failure the peer may not be listening for it."""
    if smtp is not None:
        try:
            smtp.close()
        except OSError:  # pragma: no cover - closing a socket that is already gone
            pass


def _waiter(stop: threading.Event) -> Callable[[float], None]:
    """A sleep that a stop request cuts short."""

    def sleep(seconds: float) -> None:
        stop.wait(seconds)

    return sleep


def _backoff(attempt: int) -> float:
    """Exponential backoff with jitter: 50-100 % of base * 2**(attempt-1), capped."""
    ceiling = min(_BACKOFF_CAP_SECONDS, _BACKOFF_BASE_SECONDS * 2.0 ** (attempt - 1))
    return ceiling * (0.5 + random.random() / 2)


def build(settings: EmailSettings, transport: Transport) -> EmailChannel:
    """The channel for ``email:``: the password resolved from the environment now, and the CA file
    read now (otherwise it is read at the first send: say it now, not when an alert is due)."""
    resolved = settings.resolved(transport.environ)
    if resolved.ca_file:
        try:
            ssl.create_default_context().load_verify_locations(cafile=resolved.ca_file)
        except (OSError, ssl.SSLError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a PEM file of certificates"
            raise ConfigError(f"email.ca_file: {resolved.ca_file} cannot be read: {why}") from None
    return EmailChannel(resolved, sleep=transport.sleep, stop=transport.stop)


SPEC = ChannelSpec(
    name="email",
    parse=parse,
    sender=build,
    secrets=secrets,
    inline_secrets=("password",),
    describe=describe,
    carries_reports=False,  # an inbox gets the alerts routed to it, not an overview every hour
    limits=Limits(),
)
