"""Channels that print instead of sending: ``--dry-run`` and a plain console channel."""

from __future__ import annotations

import json
import threading
from typing import Any, TextIO

from ..message import Message
from .base import Channel


class ConsoleChannel:
    """Prints each message as plain text (used by --dry-run when no channel is configured)."""

    name = "console"
    dry_run = False  # printing is its way of delivering

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def prepare(self, message: Message) -> list[dict[str, Any]]:
        return [{"title": message.title, "text": message.text}]

    def deliver(self, payload: dict[str, Any]) -> None:
        self.out.write(self.describe(payload) + "\n")

    def describe(self, payload: dict[str, Any]) -> str:
        return str(payload.get("text", ""))


class DryRunChannel:
    """Wraps a real channel: prepares exactly what it would send, prints it, sends nothing."""

    dry_run = True  # what it "delivers" is printed, never sent: the logs must not say "delivered"

    def __init__(self, inner: Channel, out: TextIO, verbose: bool = False) -> None:
        self.inner = inner
        self.name = inner.name
        self.out = out
        self.verbose = verbose
        self._lock = threading.Lock()

    def prepare(self, message: Message) -> list[dict[str, Any]]:
        return self.inner.prepare(message)

    def deliver(self, payload: dict[str, Any]) -> None:
        with self._lock:
            self.out.write(f"----- would send to {self.name} -----\n")
            self.out.write(self.inner.describe(payload).rstrip("\n") + "\n")
            if self.verbose:
                self.out.write(f"----- JSON body for {self.name} -----\n")
                self.out.write(json.dumps(payload, ensure_ascii=False, indent=2) + "\n")
            self.out.flush()

    def describe(self, payload: dict[str, Any]) -> str:
        return self.inner.describe(payload)
