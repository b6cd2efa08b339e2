"""The channels gpuwatch can send to: the list of their specs, the one place that names them.

Each channel is declared by the ``SPEC`` that ends its settings module (``notify/<name>_settings.py``:
its section's settings, read and checked once, its limits, its secrets, how ``check`` describes
it) and sent by its sender module (``notify/<name>.py``, which the spec names and
:meth:`~gpuwatch.notify.spec.ChannelSpec.build` loads when the channel is built). The config
parser, the CLI and the daemon's routing find channels here; adding one is those two modules and
one entry in :data:`CHANNELS`. Every channel goes through the same outbox, retries, routes,
silences, ``test-notify`` and ``--dry-run``.

This module and the settings modules import no HTTP or SMTP library: reading a config does not
load a sender.
"""

from __future__ import annotations

from . import dingtalk_settings, email_settings, feishu_settings, slack_settings, webhook_settings, wecom_settings
from .spec import ChannelSpec, Limits

__all__ = ["CHANNELS", "CHANNEL_NAMES", "ChannelSpec", "Limits", "channel_spec", "names_in_words"]

CHANNELS: tuple[ChannelSpec, ...] = (
    feishu_settings.SPEC,
    dingtalk_settings.SPEC,
    wecom_settings.SPEC,
    slack_settings.SPEC,
    webhook_settings.SPEC,
    email_settings.SPEC,
)
CHANNEL_NAMES: tuple[str, ...] = tuple(spec.name for spec in CHANNELS)
_BY_NAME = {spec.name: spec for spec in CHANNELS}


def channel_spec(name: str) -> ChannelSpec | None:
    """The spec of a configured channel; ``None`` for one of gpuwatch's own (the console)."""
    return _BY_NAME.get(name)


def names_in_words(channels: tuple[ChannelSpec, ...] = CHANNELS) -> str:
    """The channels' config sections for a sentence: ``feishu:, dingtalk:, ... or email:``."""
    sections = [f"{spec.name}:" for spec in channels]
    if len(sections) <= 1:
        return "".join(sections)
    return f"{', '.join(sections[:-1])} or {sections[-1]}"
