"""What a probe shows beyond the GPUs, and what one host's probes learn across polls."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from gpuwatch.attribution import ContainerInfo
from gpuwatch.config import AttributionConfig, Config, HostContextConfig


@dataclass(frozen=True)
class ProbeSettings:
    """What a probe shows beyond the GPUs (``host_context:`` and ``attribution:`` in the config)."""

    host_context: HostContextConfig = dataclasses.field(default_factory=HostContextConfig)
    attribution: AttributionConfig = dataclasses.field(default_factory=AttributionConfig)

    @classmethod
    def of(cls, config: Config) -> ProbeSettings:
        return cls(config.host_context, config.attribution)


class HostProbe:
    """One host's probe across polls: its settings and what its probes learned.

    What is learned: the health fields the host's nvidia-smi supports and its CUDA version (asked
    once, again after the driver changes or refuses a field), and the containers and uids already
    looked up (kept while they are seen, so each is asked of the runtime once). A host has at most
    one probe in flight (``poll.HostProber``), so one script and one reading alternate; a lock
    keeps a late reading from mixing with the next script anyway.
    """

    def __init__(self, settings: ProbeSettings | None = None) -> None:
        self.settings = settings or ProbeSettings()
        self.health_fields: tuple[str, ...] | None = None  # None: not learned yet
        self.cuda_version: str | None = None
        self.driver_version: str | None = None
        self.containers: dict[str, ContainerInfo | None] = {}
        self.users: dict[int, str] = {}
        self._lock = threading.Lock()

    def forget_learned(self) -> None:
        """Ask the driver again on the next poll (it changed, or refused a field)."""
        with self._lock:
            self.health_fields = None
            self.cuda_version = None

    def learn(self, health_fields: tuple[str, ...], cuda_version: str | None) -> None:
        """Keep what the learning step read from the driver: its health fields and CUDA version."""
        with self._lock:
            self.health_fields = health_fields
            self.cuda_version = cuda_version

    def remember(self, containers: dict[str, ContainerInfo | None], users: Mapping[int, str]) -> None:
        """Keep the containers still seen (replacing the old set) and every uid looked up."""
        with self._lock:
            self.containers = containers
            self.users.update(users)

    def known(self) -> str:
        """The ids and uids looked up already, as the cgroup step's awk reads them."""
        with self._lock:
            words = [f"d{i}" for i in self.containers] + [f"c{i}" for i in self.containers]
            words += [f"u{u}" for u in self.users]
        return " " + " ".join(words) + " "
