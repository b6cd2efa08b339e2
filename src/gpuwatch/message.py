"""Messages as plain data: what report makes and every channel lays out in its own way.

A report or alert becomes a :class:`Message` (channel-neutral); each channel turns it into
its own payloads (splitting to its own size limit) and delivers one payload at a time.

A message always has plain text blocks (what text channels send). It may also have a
:class:`Body`: the same content as structure (sections with a title and rows of cells, each with
a state that a channel may colour, and a link), for channels that can lay it out: a Feishu card,
Slack blocks, DingTalk and WeCom markdown. Every string in a body is plain words, never markup:
each channel escapes what it shows for its own syntax.

Pure: frozen records, no I/O; report, render, the store and every channel may import it.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The states a body's parts may have; a channel maps each to a colour it has.
STATES = ("ok", "free", "busy", "down", "stale", "warning", "firing", "reminder", "resolved", "notice", "info")


@dataclass(frozen=True)
class Row:
    """One line of a section: its cells (a GPU: index, model, utilization bar, memory bar, users;
    an alert: one line of words), and its state (``free`` GPUs are green, ``down`` hosts red)."""

    cells: tuple[str, ...]
    state: str = "info"


@dataclass(frozen=True)
class Section:
    """One whole unit of a designed message (a host, an alert), never split across parts unless
    it cannot fit one alone. ``title`` is shown bold, ``note`` beside it (a host's GPU count and
    model, a dead host's reason)."""

    title: str
    state: str = "info"
    note: str = ""
    rows: tuple[Row, ...] = ()


@dataclass(frozen=True)
class Body:
    """A message's content as structure. ``summary`` goes in a card's header; ``tags`` are short
    counts shown beside it (``("3 free", "free")``)."""

    summary: str
    state: str
    sections: tuple[Section, ...]
    tags: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class AlertItem:
    """One alert of an alert message as data, for a channel that takes alerts rather than words
    (Alertmanager). The key fields are the alert's identity (``None``: not part of it; ``host``
    None for a fleet-wide alert); ``id`` is gpuwatch's alert id. Times are epoch seconds:
    ``started_at`` when it began firing, ``resolved_at`` when it resolved (None while firing).
    ``summary`` and ``description`` are its words, as the chat message says them."""

    kind: str  # firing | reminder | resolved
    id: str
    rule: str
    host: str | None
    started_at: float
    summary: str
    description: str
    gpu: int | None = None
    user: str | None = None
    pid: int | None = None
    detail: str | None = None
    resolved_at: float | None = None


@dataclass(frozen=True)
class Message:
    """A channel-neutral message.

    ``blocks`` are whole units of plain text (one host's lines, one alert): a channel that
    must split a long message splits between blocks, never inside one.
    """

    title: str
    blocks: tuple[str, ...]
    severity: str = "info"  # info | firing | resolved: colours a card
    mentions: tuple[str, ...] = ()  # Feishu open_ids to @-mention
    kind: str = "report"  # report | alert | test: for logs and the outbox
    body: Body | None = None  # the same content as structure, for channels that lay it out
    link: str | None = None  # the page to open (web.public_url): a card's button
    alerts: tuple[AlertItem, ...] = ()  # an alert message's alerts as data (notices are not among them)

    @property
    def text(self) -> str:
        return "\n\n".join((self.title, *self.blocks)) if self.blocks else self.title
