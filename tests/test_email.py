"""The e-mail channel against a real SMTP server on 127.0.0.1 (tests/smtpserver.py, aiosmtpd).

No mocking of smtplib: every delivery is a real SMTP session with real TLS, using a private CA
made at test time. Only the waits between attempts are faked (a recording sleep).
"""

from __future__ import annotations

import base64
import json
import logging
import smtplib
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from gpuwatch.message import Message
from gpuwatch.notify.base import DeliveryError
from gpuwatch.notify.email import EmailChannel, EmailSettings, default_smtp_factory

if TYPE_CHECKING:
    from smtpserver import Certificates, LocalSMTPServer

# The SMTP fixtures (smtp_server, smtps_server, make_smtp_server, smtp_certs, refused_smtp_port,
# silent_smtp_port) live in tests/smtpserver.py. Loaded as a plugin, not imported here: an import
# before pytest loads it would keep pytest from rewriting its asserts (and pytest says so).
pytest_plugins = ("smtpserver",)

RECIPIENTS = ("ops@example.com", "张伟 <zhang.wei@example.cn>")  # smtpserver.RECIPIENTS: server.settings()'s "to"

REPORT = Message(
    title="GPU 日报 gpu-a: 3/4 空闲",
    blocks=(
        "gpu-a  GPU0 H100 100% 19818/81559 MiB 59C 张伟(2566M) alice(1542M)",
        "节点 gpu-b：无法连接（connection refused by 10.0.0.14:22）",
    ),
)
WRONG_PASSWORD = "wrong-Pa55-Qv8u"
SLOW_DEADLINE = 1.0  # email deadline_seconds in the slow-server tests: the most one attempt may take


class Sleeps(list[float]):
    """A sleep that records its delays instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def send(channel: EmailChannel, message: Message = REPORT) -> dict[str, Any]:
    (payload,) = channel.prepare(message)
    channel.deliver(payload)
    return payload


def failed(channel: EmailChannel, message: Message = REPORT) -> DeliveryError:
    with pytest.raises(DeliveryError) as info:
        send(channel, message)
    return info.value


# ---------------------------------------------------------------------- delivery


def test_starttls_with_login_delivers_utf8(smtp_server: LocalSMTPServer) -> None:
    sleeps = Sleeps()
    assert smtp_server.settings().to == RECIPIENTS
    send(EmailChannel(smtp_server.settings(), sleep=sleeps))

    (mail,) = smtp_server.received
    assert mail.tls and mail.tls_version in ("TLSv1.2", "TLSv1.3")
    assert mail.login == smtp_server.login[0]
    assert mail.mail_from == "gpuwatch@example.com"
    assert mail.rcpt_tos == ["ops@example.com", "zhang.wei@example.cn"]
    assert mail.message["Subject"] == "[gpuwatch] GPU 日报 gpu-a: 3/4 空闲"
    assert "张伟 <zhang.wei@example.cn>" in str(mail.message["To"])
    assert mail.message["From"] == "GPU watch <gpuwatch@example.com>"
    assert mail.message["Date"] and mail.message["Message-ID"]
    assert mail.message.get_content_type() == "text/plain"
    assert mail.message.get_content_charset() == "utf-8"
    assert mail.text.rstrip("\n") == REPORT.text  # CJK intact, line breaks kept
    assert mail.raw.isascii()  # 7-bit on the wire: passes relays without 8BITMIME
    assert sleeps == [] and smtp_server.connections == 1


def test_implicit_tls_on_its_own_port(smtps_server: LocalSMTPServer, smtp_server: LocalSMTPServer) -> None:
    assert smtps_server.port != smtp_server.port
    send(EmailChannel(smtps_server.settings()))
    (mail,) = smtps_server.received
    assert mail.tls and mail.login == smtps_server.login[0]
    assert "空闲" in mail.text
    assert smtp_server.received == []


def test_local_relay_without_tls(make_smtp_server: Callable[..., LocalSMTPServer]) -> None:
    relay = make_smtp_server("plain", login=None)
    send(EmailChannel(relay.settings(smtp_host="localhost")))
    (mail,) = relay.received
    assert not mail.tls and mail.login is None


def test_a_mail_sent_again_keeps_its_message_id(smtp_server: LocalSMTPServer) -> None:
    """The Message-ID is in the payload (made once, kept in the outbox): a resend after a lost
    confirmation is the same mail to a mail client that de-duplicates."""
    channel = EmailChannel(smtp_server.settings(deadline_seconds=SLOW_DEADLINE), sleep=Sleeps())
    (payload,) = channel.prepare(REPORT)
    smtp_server.fail_next("DATA", "slow:30")  # queued, then no confirmation
    with pytest.raises(DeliveryError) as first:
        channel.deliver(payload)
    assert first.value.maybe_delivered
    channel.deliver(payload)  # what the outbox does later
    ids = [mail.message["Message-ID"] for mail in smtp_server.received]
    assert len(ids) == 2 and ids[0] == ids[1] == payload["message_id"]
    assert channel.prepare(REPORT)[0]["message_id"] != payload["message_id"]  # another message, another id


def test_a_payload_without_a_message_id_still_gets_one(smtp_server: LocalSMTPServer) -> None:
    """Payloads queued by an older gpuwatch have no message_id."""
    channel = EmailChannel(smtp_server.settings())
    (payload,) = channel.prepare(REPORT)
    del payload["message_id"]
    channel.deliver(payload)
    (mail,) = smtp_server.received
    assert str(mail.message["Message-ID"]).endswith("@example.com>")


# ---------------------------------------------------------------------- TLS is never optional


@pytest.mark.parametrize("mode", ["starttls", "tls"])
def test_untrusted_certificate_is_permanent_and_nothing_is_sent(
    make_smtp_server: Callable[..., LocalSMTPServer], mode: str
) -> None:
    server = make_smtp_server(mode)
    sleeps = Sleeps()
    error = failed(EmailChannel(server.settings(ca_file=None), sleep=sleeps))
    assert error.permanent
    assert "the SMTP server's certificate could not be verified (" in str(error)
    assert "set email.ca_file if it uses a private CA" in str(error)
    assert server.received == [] and sleeps == [] and server.connections == 1


def test_certificate_for_another_host_is_refused(make_smtp_server: Callable[..., LocalSMTPServer]) -> None:
    server = make_smtp_server("starttls", host="127.0.0.2")  # the certificate names localhost, 127.0.0.1
    error = failed(EmailChannel(server.settings()))
    assert error.permanent and "certificate could not be verified" in str(error)
    assert "127.0.0.2" in str(error)
    assert server.received == []


def test_server_without_starttls_is_never_sent_plain_text(make_smtp_server: Callable[..., LocalSMTPServer]) -> None:
    server = make_smtp_server("plain", login=None)
    error = failed(EmailChannel(server.settings(tls="starttls")))
    assert error.permanent and "does not offer STARTTLS" in str(error)
    assert server.received == [] and server.connections == 1


def test_implicit_tls_against_a_starttls_port_names_the_setting(smtp_server: LocalSMTPServer) -> None:
    error = failed(EmailChannel(smtp_server.settings(tls="tls")))
    assert error.permanent and "email.tls" in str(error)


def test_unreadable_ca_file_is_permanent(smtp_server: LocalSMTPServer, tmp_path: Path) -> None:
    error = failed(EmailChannel(smtp_server.settings(ca_file=str(tmp_path / "missing.pem"))))
    assert error.permanent and "email.ca_file" in str(error)
    assert smtp_server.connections == 0


def test_ca_file_adds_to_the_system_store(smtp_certs: Certificates) -> None:
    settings = EmailSettings(to=("a@example.com",), sender="b@example.com", smtp_host="localhost", ca_file=None)
    channel = EmailChannel(settings)
    system = channel._context()
    assert system is not None and system.verify_mode == ssl.CERT_REQUIRED and system.check_hostname
    with_ca = EmailChannel(
        EmailSettings(
            to=("a@example.com",), sender="b@example.com", smtp_host="localhost", ca_file=str(smtp_certs.ca_file)
        )
    )._context()
    assert with_ca is not None and with_ca.verify_mode == ssl.CERT_REQUIRED and with_ca.check_hostname
    assert with_ca.cert_store_stats()["x509_ca"] == system.cert_store_stats()["x509_ca"] + 1


# ---------------------------------------------------------------------- login and secrets


def test_wrong_password_is_permanent_and_never_shown(
    smtp_server: LocalSMTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    user, password = smtp_server.login
    settings = smtp_server.settings(password=WRONG_PASSWORD)
    channel = EmailChannel(settings, sleep=Sleeps())
    error = failed(channel)

    assert error.permanent and error.code == 535
    assert "check email.username and the password variable" in str(error)
    assert user in str(error)
    assert smtp_server.failed_logins >= 1 and smtp_server.received == []
    for secret in (WRONG_PASSWORD, password):
        assert secret not in str(error)
        assert secret not in caplog.text
        assert secret not in repr(settings) and secret not in repr(channel)
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("gpuwatch"))
    for encoded in (WRONG_PASSWORD, f"\0{user}\0{WRONG_PASSWORD}"):
        assert base64.b64encode(encoded.encode()).decode() not in ours


def test_server_echoing_the_password_is_masked(smtp_server: LocalSMTPServer) -> None:
    password = smtp_server.login[1]
    smtp_server.fail_next("MAIL", f"553 5.7.1 {password} may not send as this address")
    error = failed(EmailChannel(smtp_server.settings()))
    assert error.permanent and not error.message_fault and error.code == 553
    assert password not in str(error) and "(masked)" in str(error)
    assert "email.from" in str(error)


# ---------------------------------------------------------------------- transient and permanent replies


def test_server_down_is_retried_then_transient(refused_smtp_port: int, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def counting_factory(settings: EmailSettings, context: ssl.SSLContext | None) -> smtplib.SMTP:
        calls.append(settings.smtp_port)
        return default_smtp_factory(settings, context)

    settings = EmailSettings(
        to=RECIPIENTS, sender="gpuwatch@example.com", smtp_host="127.0.0.1", smtp_port=refused_smtp_port
    )
    sleeps = Sleeps()
    error = failed(EmailChannel(settings, smtp_factory=counting_factory, sleep=sleeps))

    assert error.permanent is False and error.code is None
    assert "after 3 attempts" in str(error) and "connection refused" in str(error)
    assert calls == [refused_smtp_port] * 3
    assert len(sleeps) == 2
    assert 1.0 <= sleeps[0] <= 2.0 and 2.0 <= sleeps[1] <= 4.0  # exponential, with jitter
    assert len([r for r in caplog.records if "retrying in" in r.getMessage()]) == 2


def test_silent_server_times_out_as_transient(silent_smtp_port: int) -> None:
    settings = EmailSettings(
        to=RECIPIENTS,
        sender="gpuwatch@example.com",
        smtp_host="127.0.0.1",
        smtp_port=silent_smtp_port,
        timeout_seconds=0.3,
        max_attempts=2,
    )
    sleeps = Sleeps()
    error = failed(EmailChannel(settings, sleep=sleeps))
    assert error.permanent is False and "no answer within 0.3 s" in str(error)
    assert len(sleeps) == 1


@pytest.mark.parametrize(
    ("stage", "reply"),
    [
        ("MAIL", "451 4.3.0 Try again later"),
        ("RCPT", "450 4.2.0 Mailbox busy"),
        ("DATA", "451 4.3.0 Try again later"),
        ("DATA", "421 4.3.2 Shutting down"),  # a verdict (not taken), not a lost one
    ],
)
def test_transient_failure_then_delivered(smtp_server: LocalSMTPServer, stage: str, reply: str) -> None:
    smtp_server.fail_next(stage, reply)
    if stage == "RCPT":
        smtp_server.fail_next(stage, reply)  # both recipients deferred, or one would be accepted
    sleeps = Sleeps()
    send(EmailChannel(smtp_server.settings(), sleep=sleeps))
    assert len(sleeps) == 1
    (mail,) = smtp_server.received
    assert mail.rcpt_tos == ["ops@example.com", "zhang.wei@example.cn"]


def test_transient_failures_exhaust_attempts(smtp_server: LocalSMTPServer) -> None:
    for _ in range(3):
        smtp_server.fail_next("DATA", "452 4.3.1 Insufficient system storage")
    sleeps = Sleeps()
    error = failed(EmailChannel(smtp_server.settings(), sleep=sleeps))
    assert error.permanent is False and error.code == 452 and "452" in str(error)
    assert len(sleeps) == 2 and smtp_server.received == []


@pytest.mark.parametrize(
    ("stage", "replies", "code", "message_fault", "words"),
    [
        ("RCPT", ["550 5.1.1 No such user", "550 5.1.1 No such user"], 550, False, "check email.to"),
        ("MAIL", ["553 5.7.1 Sender not allowed"], 553, False, "check email.from"),
        ("DATA", ["554 5.6.0 Message content rejected"], 554, True, "refused the mail"),
    ],
)
def test_permanent_refusals(
    smtp_server: LocalSMTPServer, stage: str, replies: list[str], code: int, message_fault: bool, words: str
) -> None:
    for reply in replies:
        smtp_server.fail_next(stage, reply)
    sleeps = Sleeps()
    error = failed(EmailChannel(smtp_server.settings(), sleep=sleeps))
    assert error.permanent and error.code == code and error.message_fault is message_fault
    assert words in str(error)
    assert sleeps == [] and smtp_server.received == []


def test_one_refused_recipient_does_not_resend_to_the_others(
    smtp_server: LocalSMTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    smtp_server.fail_next("RCPT", "550 5.1.1 No such user")  # the first recipient only
    sleeps = Sleeps()
    send(EmailChannel(smtp_server.settings(), sleep=sleeps))
    (mail,) = smtp_server.received
    assert mail.rcpt_tos == ["zhang.wei@example.cn"] and sleeps == []
    assert "ops@example.com: 550" in caplog.text


# ---------------------------------------------------------------------- settings, prepare, describe


def test_tls_none_with_a_password_is_refused_before_connecting(refused_smtp_port: int) -> None:
    with pytest.raises(ValueError, match=r"email\.tls: 'none' would send the password in plain text") as info:
        EmailSettings(
            to=RECIPIENTS,
            sender="gpuwatch@example.com",
            smtp_host="127.0.0.1",
            smtp_port=refused_smtp_port,
            tls="none",
            username="gpuwatch-mailer",
            password=WRONG_PASSWORD,
        )
    assert WRONG_PASSWORD not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"tls": "none", "smtp_host": "smtp.example.com"}, r"email\.tls: 'none' is only allowed"),
        ({"tls": "ssl"}, r"email\.tls"),
        ({"to": ()}, r"email\.to"),
        ({"to": ("not-an-address",)}, r"email\.to\[0\]"),
        ({"sender": "gpuwatch"}, r"email\.from"),
        ({"sender": "a@example.com\r\nBcc: x@example.com"}, r"email\.from"),
        ({"username": "u"}, r"email\.password_env"),
        ({"password": "p"}, r"email\.username"),
        ({"smtp_port": 0}, r"email\.smtp_port"),
        ({"max_attempts": 0}, r"email\.max_attempts"),
        ({"timeout_seconds": 0}, r"email\.timeout_seconds"),
        ({"deadline_seconds": 0}, r"email\.deadline_seconds"),
        ({"deadline_seconds": float("inf")}, r"email\.deadline_seconds"),
        ({"timeout_seconds": float("nan")}, r"email\.timeout_seconds"),
    ],
)
def test_settings_are_validated(overrides: dict[str, Any], key: str) -> None:
    options: dict[str, Any] = {"to": ("ops@example.com",), "sender": "gpuwatch@example.com", "smtp_host": "localhost"}
    with pytest.raises(ValueError, match=key):
        EmailSettings(**{**options, **overrides})


def test_settings_accept_one_address_as_a_string() -> None:
    settings = EmailSettings(to="ops@example.com", sender="gpuwatch@example.com", smtp_host="localhost")  # type: ignore[arg-type]
    assert settings.to == ("ops@example.com",)


def test_prepare_makes_one_json_payload_and_describe_reads_it() -> None:
    settings = EmailSettings(to=RECIPIENTS, sender="gpuwatch@example.com", smtp_host="smtp.example.com")
    channel = EmailChannel(settings)
    message = Message(title="GPU 日报\nsecond line", blocks=("节点 a", "节点 b"), kind="report")
    (payload,) = channel.prepare(message)
    assert json.loads(json.dumps(payload, ensure_ascii=False)) == payload
    msgid = payload.pop("message_id")
    assert msgid.startswith("<") and msgid.endswith("@example.com>")
    assert payload == {
        "subject": "[gpuwatch] GPU 日报 second line",
        "text": message.text,
        "to": list(RECIPIENTS),
    }
    text = channel.describe(payload)
    assert text.startswith("To: ops@example.com, 张伟 <zhang.wei@example.cn>\nSubject: [gpuwatch] GPU 日报")
    assert text.endswith(message.text)
    bare = EmailChannel(EmailSettings(to=RECIPIENTS, sender="g@example.com", smtp_host="x", subject_prefix=""))
    assert bare.prepare(Message(title="t", blocks=()))[0]["subject"] == "t"


def test_malformed_payload_is_a_message_fault(smtp_server: LocalSMTPServer) -> None:
    channel = EmailChannel(smtp_server.settings())
    with pytest.raises(DeliveryError) as info:
        channel.deliver({"subject": "s", "text": "t", "to": "ops@example.com"})
    assert info.value.permanent and info.value.message_fault
    assert smtp_server.connections == 0


# ---------------------------------------------------------------------- slow and trickling servers
#
# Bounds on elapsed time are generous (10x the design) so that a loaded machine cannot fail
# them; bench/drill.py measures the real figures.


@pytest.mark.parametrize(
    ("reply", "received", "words"),
    [
        ("slow:30", 1, "the server did not confirm the mail within 1 s"),  # queued, confirms after 30 s
        ("trickle:0.2", 1, "the server did not confirm the mail within 1 s"),  # an endless 250- reply
        ("silent", 1, "the server did not confirm the mail within 1 s"),
        ("drop", 0, "no confirmation from the server after the mail went out"),  # hangs up instead
    ],
)
def test_a_mail_without_a_verdict_is_sent_once_and_reported_as_maybe_delivered(
    smtp_server: LocalSMTPServer, reply: str, received: int, words: str
) -> None:
    smtp_server.fail_next("DATA", reply)
    sleeps = Sleeps()
    started = time.monotonic()
    error = failed(EmailChannel(smtp_server.settings(deadline_seconds=SLOW_DEADLINE), sleep=sleeps))
    elapsed = time.monotonic() - started

    assert error.maybe_delivered is True and error.permanent is False
    assert words in str(error)
    assert "the mail may have been delivered" in str(error) and "a duplicate is possible" in str(error)
    assert len(smtp_server.received) == received  # the inbox has at most one copy
    assert smtp_server.connections == 1 and sleeps == []  # not sent again inside deliver()
    assert elapsed < 10 * SLOW_DEADLINE


@pytest.mark.parametrize(
    ("stage", "reply"),
    [("MAIL", "slow:30"), ("MAIL", "trickle:0.2"), ("RCPT", "silent")],
)
def test_a_server_too_slow_before_the_mail_went_out_is_retried(
    smtp_server: LocalSMTPServer, stage: str, reply: str
) -> None:
    """Nothing can have been delivered yet: the next attempt goes at once (after the backoff)."""
    smtp_server.fail_next(stage, reply)
    sleeps = Sleeps()
    started = time.monotonic()
    send(EmailChannel(smtp_server.settings(deadline_seconds=SLOW_DEADLINE), sleep=sleeps))
    assert time.monotonic() - started < 10 * SLOW_DEADLINE
    assert len(sleeps) == 1 and smtp_server.connections == 2
    (mail,) = smtp_server.received
    assert mail.rcpt_tos == ["ops@example.com", "zhang.wei@example.cn"]
    assert smtp_server.wait_for_hangups(1)  # the first session was cut, not left trickling


def test_a_greeting_that_trickles_for_ever_ends_at_the_deadline(trickling_smtp_port: int) -> None:
    settings = EmailSettings(
        to=RECIPIENTS,
        sender="gpuwatch@example.com",
        smtp_host="127.0.0.1",
        smtp_port=trickling_smtp_port,
        tls="none",
        timeout_seconds=5,  # a byte every 0.2 s never lets this fire
        deadline_seconds=SLOW_DEADLINE,
        max_attempts=2,
    )
    sleeps = Sleeps()
    started = time.monotonic()
    error = failed(EmailChannel(settings, sleep=sleeps))
    assert time.monotonic() - started < 10 * 2 * SLOW_DEADLINE
    assert not error.maybe_delivered and not error.permanent
    assert "the SMTP session took longer than 1 s (email.deadline_seconds)" in str(error)
    assert len(sleeps) == 1


# ---------------------------------------------------------------------- stopping (SIGTERM) during a send


def deliver_in_thread(channel: EmailChannel) -> tuple[threading.Thread, list[DeliveryError]]:
    errors: list[DeliveryError] = []

    def run() -> None:
        try:
            send(channel)
        except DeliveryError as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def test_stop_ends_a_session_waiting_for_the_servers_verdict(smtp_server: LocalSMTPServer) -> None:
    stop = threading.Event()
    smtp_server.fail_next("DATA", "silent")
    thread, errors = deliver_in_thread(EmailChannel(smtp_server.settings(timeout_seconds=60), stop=stop))
    assert smtp_server.wait_for_mails(1)
    stopped_at = time.monotonic()
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive(), "deliver() still running 10 s after the stop"
    assert time.monotonic() - stopped_at < 5  # the design is about 1 s
    (error,) = errors
    assert error.maybe_delivered and "gpuwatch is stopping and the server had not confirmed the mail" in str(error)
    assert smtp_server.wait_for_hangups(1)  # the connection was cut
    assert len(smtp_server.received) == 1 and smtp_server.connections == 1


def test_stop_ends_the_retries_at_once(refused_smtp_port: int) -> None:
    stop = threading.Event()
    tried = threading.Event()

    def factory(settings: EmailSettings, context: ssl.SSLContext | None) -> smtplib.SMTP:
        tried.set()
        return default_smtp_factory(settings, context)

    settings = EmailSettings(
        to=RECIPIENTS,
        sender="gpuwatch@example.com",
        smtp_host="127.0.0.1",
        smtp_port=refused_smtp_port,
        max_attempts=10,
    )
    thread, errors = deliver_in_thread(EmailChannel(settings, smtp_factory=factory, stop=stop))
    assert tried.wait(timeout=10)
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive(), "still retrying 5 s after the stop"
    (error,) = errors
    assert "gpuwatch is stopping" in str(error) and not error.maybe_delivered


def test_nothing_is_sent_once_stopped(smtp_server: LocalSMTPServer) -> None:
    stop = threading.Event()
    stop.set()
    error = failed(EmailChannel(smtp_server.settings(), stop=stop))
    assert "not sent: gpuwatch is stopping" in str(error)
    assert smtp_server.connections == 0
