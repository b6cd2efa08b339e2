"""A real SMTP server on 127.0.0.1 for tests: aiosmtpd in a thread, with TLS and AUTH like a mail provider.

Modes (``LocalSMTPServer(certs, mode=...)``):

==========  ==================================================================================
starttls    plain connect, STARTTLS offered and *required* before MAIL (port-587 style)
tls         implicit TLS: the listening socket itself is TLS (SMTPS, port-465 style)
plain       no TLS offered at all (a local relay; or "the server does not offer STARTTLS")
==========  ==================================================================================

With ``login=(user, password)`` the server offers AUTH PLAIN/LOGIN (only inside TLS for
``starttls``) and refuses MAIL until a client has logged in with exactly that pair.

The certificates come from :func:`make_certificates`: a private CA generated at test time (with
the ``cryptography`` package) and a server certificate it signs for ``DNS:localhost`` and
``IP:127.0.0.1``. A client trusts the server by using ``certs.ca_file`` as its CA bundle
(``email.ca_file``); without it, verification fails as it would for any private CA.

Every accepted mail is recorded as a :class:`Received` (envelope, parsed message, whether the
session was TLS, who logged in): ``server.received``. ``server.connections`` counts the
connections clients made; ``server.failed_logins`` the rejected AUTH attempts.
``server.fail_next(stage, reply)`` scripts one failure at ``"MAIL"``, ``"RCPT"`` or ``"DATA"``:
an SMTP reply such as ``"451 4.3.0 Try again later"``, ``"drop"`` to close the connection
without an answer, or a server that is slow to answer:

==============  ==================================================================================
``"slow:S"``    answers normally after S seconds
``"trickle:S"`` answers with an endless multi-line reply (``250-still working``), one byte every S
                seconds: each byte well within any read timeout, the reply never complete
``"silent"``    never answers (until the client hangs up)
==============  ==================================================================================

At ``DATA`` these three take the mail first (it counts in ``received``: the server queued it)
and then misbehave, like a server that chokes after the mail is safe. ``server.hangups``
counts the clients that hung up on a slow, trickling or silent answer; ``wait_for_mails(n)``
waits for the n-th mail. Faults are used once each, in order.

Usage::

    certs = make_certificates(tmp_path)
    with LocalSMTPServer(certs, mode="starttls", login=("gpuwatch", "pw")) as server:
        channel = EmailChannel(server.settings())        # EmailSettings pointing at the server
        channel.deliver(channel.prepare(message)[0])
        assert server.received[0].tls and server.received[0].rcpt_tos == ["ops@example.com"]

Pytest fixtures (import them into a test module; they are not in conftest.py): ``smtp_certs``
(session-wide certificates), ``make_smtp_server`` (a factory; servers stop after the test),
``smtp_server`` (STARTTLS + AUTH), ``smtps_server`` (implicit TLS + AUTH), ``refused_smtp_port``
(nothing listens: connection refused), ``silent_smtp_port`` (accepts, never answers) and
``trickling_smtp_port`` (greets with an endless ``220-`` reply, one byte every 0.2 s).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

SMTP_USER = "gpuwatch-mailer"
SMTP_PASSWORD = "pw-Zq7!rK2x-smtp-secret"  # distinctive, so a leak is easy to find in logs
SENDER = "GPU watch <gpuwatch@example.com>"
RECIPIENTS = ("ops@example.com", "张伟 <zhang.wei@example.cn>")
MODES = ("starttls", "tls", "plain")
STAGES = ("MAIL", "RCPT", "DATA")
_SLOW_FAULTS = ("slow:", "trickle:")  # followed by seconds


# ---------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Certificates:
    """A private CA and a server certificate it signed (PEM files in ``directory``)."""

    directory: Path
    ca_file: Path  # the CA certificate: give it to clients as their CA bundle (email.ca_file)
    cert_file: Path  # the server certificate followed by the CA certificate (the chain)
    key_file: Path  # the server's private key

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def certificates_unavailable_reason() -> str | None:
    try:
        import cryptography  # noqa: F401
    except ImportError:
        return "the cryptography package is not installed (needed to make test certificates)"
    return None


def make_certificates(
    directory: Path, *, dns_names: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ("127.0.0.1",)
) -> Certificates:
    """Write a fresh CA (ca.pem) and a server certificate/key (server.pem, server.key) into ``directory``.

    A CA plus a leaf rather than one self-signed certificate: that is what ``ca_file`` is for in
    real life (a private CA), and it passes OpenSSL's strict checks (Python 3.13 enables
    VERIFY_X509_STRICT by default), which a self-signed leaf may not.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpuwatch test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0] if dns_names else ips[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca_file.write_bytes(ca_cert.public_bytes(pem))
    cert_file.write_bytes(cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    key_file.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key_file.chmod(0o600)
    return Certificates(directory=directory, ca_file=ca_file, cert_file=cert_file, key_file=key_file)


# ---------------------------------------------------------------------- the server


@dataclass(frozen=True)
class Received:
    """One mail the server accepted."""

    mail_from: str  # envelope sender (MAIL FROM)
    rcpt_tos: list[str]  # envelope recipients (RCPT TO), in order
    message: EmailMessage  # parsed with email.policy.default: message.get_body().get_content()
    raw: bytes  # the DATA as received
    tls: bool  # the session was encrypted (after STARTTLS, or implicit TLS)
    tls_version: str | None  # e.g. "TLSv1.3"
    login: str | None  # the user that logged in (AUTH), if any
    peer: Any  # (address, port) of the client

    @property
    def text(self) -> str:
        """The plain-text body, decoded, with the wire's CRLF line ends made LF."""
        body = self.message.get_body(preferencelist=("plain",))
        assert body is not None, "no text/plain part"
        return str(body.get_content()).replace("\r\n", "\n")


class _Controller(Controller):  # type: ignore[misc]
    """aiosmtpd's Controller on a free port (port 0), counting client connections."""

    def __init__(self, *args: Any, on_connect: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_connect = on_connect

    def factory(self) -> SMTP:
        self._on_connect()
        return super().factory()

    def _trigger_server(self) -> None:
        # Bound to port 0: learn the real port before the start-up probe connects to it.
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class LocalSMTPServer:
    """A real SMTP server on ``host`` (127.0.0.1), a free port, in a thread. See the module docstring."""

    def __init__(
        self,
        certs: Certificates | None,
        *,
        mode: str = "starttls",
        login: tuple[str, str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if mode != "plain" and certs is None:
            raise ValueError(f"mode {mode!r} needs certificates (make_certificates)")
        self.certs = certs
        self.mode = mode
        self.login = login
        self.host = host
        self.port = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._hangups = 0
        self._received: list[Received] = []
        self._faults: collections.deque[tuple[str, str]] = collections.deque()
        self._connections = 0
        self._failed_logins = 0
        self._controller: _Controller | None = None

    # -------------------------------------------------------------- lifecycle

    def start(self) -> LocalSMTPServer:
        kwargs: dict[str, Any] = {"server_hostname": "localhost", "ready_timeout": 5.0}
        if self.mode == "starttls":
            assert self.certs is not None
            kwargs.update(tls_context=self.certs.server_context(), require_starttls=True)
        elif self.mode == "tls":
            assert self.certs is not None
            kwargs["ssl_context"] = self.certs.server_context()
        if self.login is not None:
            # aiosmtpd only sees STARTTLS as TLS; on an implicit-TLS socket AUTH is encrypted anyway.
            # Login before MAIL is enforced in handle_MAIL (aiosmtpd's auth_required warns on every
            # connection when auth_require_tls is off).
            kwargs.update(authenticator=self._authenticate, auth_require_tls=self.mode == "starttls")
        controller = _Controller(
            _Handler(self), hostname=self.host, port=0, on_connect=self._count_connection, **kwargs
        )
        controller.start()
        self._controller = controller
        self.port = controller.port
        with self._lock:
            self._connections = 0  # forget the controller's own start-up probe
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> LocalSMTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------- what tests look at

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    @property
    def hangups(self) -> int:
        """Clients that hung up while a slow, trickling or silent answer was under way."""
        with self._lock:
            return self._hangups

    def wait_for_mails(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until ``count`` mails were received in total; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._received) >= count, timeout)

    def wait_for_hangups(self, count: int, timeout: float = 10.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._hangups >= count, timeout)

    @property
    def failed_logins(self) -> int:
        with self._lock:
            return self._failed_logins

    @property
    def tls_setting(self) -> str:
        """The gpuwatch ``email.tls`` value for this server."""
        return {"starttls": "starttls", "tls": "tls", "plain": "none"}[self.mode]

    def fail_next(self, stage: str, reply: str) -> None:
        """Answer the next ``stage`` command (MAIL, RCPT, DATA) with ``reply`` ("451 ...", "drop")."""
        if stage not in STAGES:
            raise ValueError(f"stage: expected one of {STAGES}, got {stage!r}")
        if _misbehaving(reply) and not (reply == "silent" or _seconds(reply) >= 0):
            raise ValueError(f"reply: bad delay in {reply!r}")
        with self._lock:
            self._faults.append((stage, reply))

    def settings(self, **overrides: Any) -> Any:
        """``EmailSettings`` aimed at this server (CA bundle, login, TLS mode), with overrides."""
        from gpuwatch.notify.email import EmailSettings

        options: dict[str, Any] = {
            "to": RECIPIENTS,
            "sender": SENDER,
            "smtp_host": self.host,
            "smtp_port": self.port,
            "tls": self.tls_setting,
            "ca_file": str(self.certs.ca_file) if self.certs is not None else None,
            "timeout_seconds": 5.0,
        }
        if self.login is not None and self.mode != "plain":
            options["username"], options["password"] = self.login
        options.update(overrides)
        return EmailSettings(**options)

    # -------------------------------------------------------------- server side

    def _count_connection(self) -> None:
        with self._lock:
            self._connections += 1

    def _take_fault(self, stage: str) -> str | None:
        with self._lock:
            for index, (fault_stage, reply) in enumerate(self._faults):
                if fault_stage == stage:
                    del self._faults[index]
                    return reply
        return None

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if isinstance(auth_data, LoginPassword) and self.login is not None:
            user, password = auth_data.login.decode("utf-8", "replace"), auth_data.password.decode("utf-8", "replace")
            if (user, password) == self.login:
                return AuthResult(success=True, auth_data=user)
        with self._lock:
            self._failed_logins += 1
        return AuthResult(success=False, handled=False)  # 535 5.7.8 Authentication credentials invalid

    def _record(self, server: SMTP, session: Session, envelope: Envelope) -> None:
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        ssl_object = server.transport.get_extra_info("ssl_object") if server.transport is not None else None
        message = BytesParser(policy=policy.default).parsebytes(raw)
        assert isinstance(message, EmailMessage)
        received = Received(
            mail_from=str(envelope.mail_from),
            rcpt_tos=list(envelope.rcpt_tos),
            message=message,
            raw=raw,
            tls=ssl_object is not None,
            tls_version=ssl_object.version() if ssl_object is not None else None,
            login=session.auth_data if session.authenticated else None,
            peer=session.peer,
        )
        with self._changed:
            self._received.append(received)
            self._changed.notify_all()

    def _hung_up(self) -> None:
        with self._changed:
            self._hangups += 1
            self._changed.notify_all()

    async def _misbehave(self, server: SMTP, fault: str) -> bool:
        """Play a slow, trickling or silent answer; True when a normal answer should follow."""
        transport = server.transport
        assert transport is not None
        try:
            if fault.startswith("slow:"):
                end = time.monotonic() + _seconds(fault)
                while time.monotonic() < end:
                    if transport.is_closing():
                        self._hung_up()
                        return False
                    await asyncio.sleep(min(0.05, max(end - time.monotonic(), 0)))
                return True
            line = b"250-still working on it\r\n"
            while not transport.is_closing():
                if fault == "silent":
                    await asyncio.sleep(0.05)
                    continue
                for byte in line:
                    transport.write(bytes([byte]))
                    await asyncio.sleep(_seconds(fault))
                    if transport.is_closing():
                        break
            self._hung_up()
            return False
        except asyncio.CancelledError:  # aiosmtpd cancels the handler when the client goes away
            self._hung_up()
            raise


def _misbehaving(reply: str) -> bool:
    return reply == "silent" or reply.startswith(_SLOW_FAULTS)


def _seconds(reply: str) -> float:
    try:
        return float(reply.split(":", 1)[1])
    except (IndexError, ValueError):
        return -1.0


def _fault_reply(server: SMTP, reply: str) -> str:
    if reply == "drop":
        assert server.transport is not None
        server.transport.close()
        return "421 4.4.2 connection dropped"  # goes nowhere: the connection is closed
    return reply


class _Handler:
    """aiosmtpd hooks: scripted faults first, then record what was accepted."""

    def __init__(self, owner: LocalSMTPServer) -> None:
        self._owner = owner

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self._owner.login is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        fault = self._owner._take_fault("MAIL")
        if fault is not None and _misbehaving(fault):
            if not await self._owner._misbehave(server, fault):
                return "421 4.4.2 closing"  # goes nowhere: the client is gone
        elif fault is not None:
            return _fault_reply(server, fault)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        fault = self._owner._take_fault("RCPT")
        if fault is not None and _misbehaving(fault):
            if not await self._owner._misbehave(server, fault):
                return "421 4.4.2 closing"
        elif fault is not None:
            return _fault_reply(server, fault)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        fault = self._owner._take_fault("DATA")
        if fault is not None and _misbehaving(fault):
            self._owner._record(server, session, envelope)  # queued: then the answer chokes
            if not await self._owner._misbehave(server, fault):
                return "421 4.4.2 closing"
            return "250 2.0.0 OK: queued"
        if fault is not None:
            return _fault_reply(server, fault)
        self._owner._record(server, session, envelope)
        return "250 2.0.0 OK: queued"


# ---------------------------------------------------------------------- ports where nothing answers


@pytest.fixture
def refused_smtp_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound (so no one else takes it), not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def silent_smtp_port() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections (the kernel's backlog) and never says a word."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


@pytest.fixture
def trickling_smtp_port() -> Iterator[int]:
    """A port on 127.0.0.1 whose server greets with an endless ``220-`` reply, one byte every 0.2 s:
    every read gets a byte long before any socket timeout, and the greeting never ends."""
    stopping = threading.Event()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.05)

    def trickle(conn: socket.socket) -> None:
        line = b"220-smtp.example.com is getting ready\r\n"
        with conn, contextlib.suppress(OSError):
            while not stopping.is_set():
                for byte in line:
                    conn.sendall(bytes([byte]))
                    if stopping.wait(0.2):
                        return

    def serve() -> None:
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:  # the accept timeout, or the listener closed
                continue
            threading.Thread(target=trickle, args=(conn,), daemon=True).start()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stopping.set()
        server.join(timeout=5)
        listener.close()


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def smtp_certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A private CA and a localhost/127.0.0.1 server certificate, made once per test session."""
    reason = certificates_unavailable_reason()
    if reason:
        pytest.skip(reason)
    return make_certificates(tmp_path_factory.mktemp("smtp-certs"))


@pytest.fixture
def make_smtp_server(smtp_certs: Certificates) -> Iterator[Callable[..., LocalSMTPServer]]:
    """``make_smtp_server(mode="starttls", login=(SMTP_USER, SMTP_PASSWORD), host="127.0.0.1")``:
    a started server, stopped after the test. Pass ``login=None`` for a server without AUTH."""
    servers: list[LocalSMTPServer] = []

    def start(
        mode: str = "starttls", *, login: tuple[str, str] | None = (SMTP_USER, SMTP_PASSWORD), host: str = "127.0.0.1"
    ) -> LocalSMTPServer:
        server = LocalSMTPServer(smtp_certs, mode=mode, login=login, host=host)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def smtp_server(make_smtp_server: Callable[..., LocalSMTPServer]) -> LocalSMTPServer:
    """STARTTLS required, AUTH as SMTP_USER / SMTP_PASSWORD required (a port-587 submission server)."""
    return make_smtp_server("starttls")


@pytest.fixture
def smtps_server(make_smtp_server: Callable[..., LocalSMTPServer]) -> LocalSMTPServer:
    """Implicit TLS, AUTH as SMTP_USER / SMTP_PASSWORD required (a port-465 submission server)."""
    return make_smtp_server("tls")
