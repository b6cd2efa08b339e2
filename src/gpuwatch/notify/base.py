"""What every notification channel shares: the :class:`Channel` seam and the delivery error.

The message a channel is given is plain data (:mod:`gpuwatch.message`); how pending messages are
delivered (a worker per channel, retries, doubt) is :mod:`gpuwatch.notify.delivery`.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..message import Message


class DeliveryError(Exception):
    """A payload was not accepted. ``permanent`` errors are not retried: they need a fix.

    ``message_fault``: the payload itself was refused (malformed, too large), so sending it
    again can never work, while later messages still can.

    ``maybe_delivered``: the payload went out in full but no verdict came back (no answer in
    time, the connection cut, a stop before the answer). The destination may have it: sending
    it again at once would likely duplicate it, so a sender waits longer before the next try
    (the channel itself does not retry it) and says that a duplicate is possible.
    """

    def __init__(
        self,
        message: str,
        *,
        permanent: bool,
        code: int | None = None,
        message_fault: bool = False,
        maybe_delivered: bool = False,
    ) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.code = code
        self.message_fault = message_fault
        self.maybe_delivered = maybe_delivered


class Channel(Protocol):
    """One destination (a Feishu bot, a mailbox, the console).

    ``dry_run``: what it delivers is printed, never sent (``--dry-run``, the demo), so the logs
    never say "delivered" for it.
    """

    name: str
    dry_run: bool

    def prepare(self, message: Message) -> list[dict[str, Any]]:
        """Turn a message into payloads that each fit this channel's limits (in order)."""
        ...

    def deliver(self, payload: dict[str, Any]) -> None:
        """Send one payload; return when accepted, raise DeliveryError when not."""
        ...

    def describe(self, payload: dict[str, Any]) -> str:
        """The payload as a person reads it (for --dry-run)."""
        ...
