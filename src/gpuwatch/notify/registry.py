"""The channels gpuwatch can send to: the list of their specs, the one place that names them.

A channel is one module, ``notify/<name>.py``: its section's settings (read and checked once when
the config is read), its sender, its limits, how its secrets are masked and how ``check``
describes it, ending in its ``SPEC``. The config parser, the CLI and the daemon's routing find
channels here; adding one is that module and one entry in :data:`CHANNELS` (and its README and
example lines). Every channel goes through the same outbox, retries, routes, silences,
``test-notify`` and ``--dry-run``.
"""

from __future__ import annotations

from . import alertmanager, dingtalk, email, feishu, slack, webhook, wecom
from .spec import ChannelSpec, Limits

__all__ = ["CHANNELS", "CHANNEL_NAMES", "ChannelSpec", "Limits", "channel_spec", "names_in_words"]

CHANNELS: tuple[ChannelSpec, ...] = (
    feishu.SPEC,
    dingtalk.SPEC,
    wecom.SPEC,
    slack.SPEC,
    webhook.SPEC,
    email.SPEC,
    alertmanager.SPEC,
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
