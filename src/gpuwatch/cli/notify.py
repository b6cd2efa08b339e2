"""``gpuwatch test-notify``: one test message through each channel, and what to fix if refused."""

from __future__ import annotations

import argparse
import socket
from typing import TextIO

from ..config import Config, ConfigError
from ..message import Message
from ..notify.base import DeliveryError
from ..notify.registry import names_in_words
from .common import EXIT_FAILED, EXIT_OK
from .wiring import build_channels


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    test = sub.add_parser("test-notify", parents=[common], help="send one test message through each channel")
    test.set_defaults(handler=lambda config, args, out: cmd_test_notify(config, out))


def cmd_test_notify(config: Config, out: TextIO) -> int:
    channels = build_channels(config)
    if not channels:
        raise ConfigError(f"no channel configured; add a {names_in_words()} section (see config.example.yaml)")
    message = Message(
        title="gpuwatch test message",
        blocks=(
            f"If you can read this, gpuwatch on {socket.gethostname()} can post to this group.",
            f"config: {config.path}",
        ),
        kind="test",
        link=config.web.public_url if config.web is not None else None,
    )
    failures = 0
    for name, channel in channels.items():
        try:
            payloads = channel.prepare(message)
        except Exception as exc:  # that channel cannot make the message: said, and the others still tried
            failures += 1
            out.write(f"{name}: NOT prepared: {type(exc).__name__}: {exc}\n")
            continue
        try:
            for payload in payloads:
                channel.deliver(payload)
        except DeliveryError as exc:
            failures += 1
            out.write(f"{name}: NOT accepted: {exc}\n")
            continue
        out.write(f"{name}: accepted\n")
    return EXIT_OK if failures == 0 else EXIT_FAILED
