"""The one place that builds the parts from a config: runners, the poller, the channels.

Commands and the daemon's reload get their parts here; nothing else imports the concrete
SSH, channel and poller classes together.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..config import Config, ConfigError, DiscoverySource, HostConfig, WebConfig, from_env
from ..daemon import Daemon
from ..discovery import CommandSource, ConsulSource, Discovery, FileSource, Source, SshConfigSource, merged
from ..logsetup import ANNOUNCE
from ..notify.base import Channel
from ..notify.registry import CHANNELS
from ..notify.spec import ChannelSpec
from ..peers import PeerWatcher, http_fetch
from ..poll import Poller
from ..probe import ProbeSettings
from ..ssh import (
    DEFAULT_MAX_HANDSHAKES,
    HandshakeSlots,
    HostKeyStore,
    LocalRunner,
    Runner,
    SshConnection,
    load_ssh_config,
)
from ..store import StoreReader
from ..web import WebApp, WebServer

log = logging.getLogger(__name__)


def secrets(config: Config, channels: tuple[ChannelSpec, ...] = CHANNELS) -> list[str]:
    """Every secret value in use (passwords, webhook tokens, signing secrets): masked in every log
    line. Each channel's spec (in ``channels``, the registry) says which of its values are secret."""
    values = [config.ssh.resolve_password() or ""]
    values += [h.ssh.resolve_password() or "" for h in config.hosts]
    for pattern in config.host_patterns:  # match: entries give discovered hosts their passwords
        password, env = pattern.overrides.get("password"), pattern.overrides.get("password_env")
        values.append(from_env(str(env) if env else None, str(password) if password else None) or "")
    values += [from_env(s.token_env, None) or "" for s in config.hosts_from if s.token_env]
    specs = {spec.name: spec for spec in channels}
    for name, settings in config.channels.items():
        spec = specs.get(name)
        if spec is not None:
            values += spec.secrets(settings)
    return [v for v in values if v]


def make_runner_factory(
    config: Config, handshakes: threading.Semaphore | HandshakeSlots | None = None
) -> Callable[[HostConfig], Runner]:
    """Runners for each host: one persistent SSH connection, or the local shell. ``handshakes``
    limits SSH handshakes in flight across the fleet (one per process, kept across reloads)."""
    if handshakes is None:
        handshakes = HandshakeSlots(DEFAULT_MAX_HANDSHAKES)
    user_files = tuple(
        dict.fromkeys(Path(os.path.expanduser(h.ssh.known_hosts)) for h in config.hosts if h.ssh.known_hosts)
    )
    store = HostKeyStore(config.state_dir / "known_hosts", user_files)
    ssh_config = load_ssh_config()

    def factory(host: HostConfig) -> Runner:
        if host.local:
            return LocalRunner()
        return SshConnection(host, store, ssh_config, handshakes=handshakes)

    return factory


def via_host(config: Config, name: str) -> HostConfig:
    """The host a ``command`` source runs on: the configured host of that name, else the name
    with the ``ssh:`` defaults (resolved through ~/.ssh/config as any host)."""
    for host in config.hosts:
        if host.name == name and host.source == "hosts":
            return host
    return HostConfig(name=name, address=None, ssh=config.ssh, source="via")


def build_source(spec: DiscoverySource, config: Config, runner_factory: Callable[[HostConfig], Runner]) -> Source:
    """One ``hosts_from:`` entry at work; a ``command`` gets the local runner or its ``via:`` host's."""
    if spec.kind == "ssh_config":
        return SshConfigSource(spec)
    if spec.kind == "file":
        return FileSource(spec)
    if spec.kind == "command":
        runner = runner_factory(via_host(config, spec.via)) if spec.via else LocalRunner()
        return CommandSource(spec, runner)
    return ConsulSource(spec)


def build_discovery(config: Config, handshakes: threading.Semaphore | HandshakeSlots | None = None) -> Discovery | None:
    """The ``hosts_from:`` sources (None: there are none), each asked once already."""
    if not config.hosts_from:
        return None
    factory = make_runner_factory(config, handshakes)
    discovery = Discovery([build_source(spec, config, factory) for spec in config.hosts_from])
    discovery.refresh_all()
    return discovery


def with_discovered(config: Config, discovery: Discovery | None) -> Config:
    """``config`` with the hosts to poll: its own and the sources', cut to its shard
    (:func:`~gpuwatch.discovery.merged`)."""
    if discovery is None:
        return config
    return merged(config, discovery.lists())


def build_poller(config: Config, handshakes: threading.Semaphore | HandshakeSlots | None = None) -> Poller:
    return Poller(
        config.hosts,
        make_runner_factory(config, handshakes),
        max_parallel=config.max_parallel,
        settings=ProbeSettings.of(config),
    )


def build_channels(
    config: Config,
    sleep: Callable[[float], None] = time.sleep,
    stop: threading.Event | None = None,
    channels: tuple[ChannelSpec, ...] = CHANNELS,
) -> dict[str, Channel]:
    """The configured channels, keyed by name (the outbox remembers each message's channel), built
    by their specs (``channels``, the registry notify.registry), which resolve secrets from the environment.

    ``sleep`` paces retries and rate limits; the daemon passes one that a stop request cuts short,
    and ``stop``, which also ends a send in flight within about a second.
    """
    specs = {spec.name: spec for spec in channels}
    built: dict[str, Channel] = {}
    for name, settings in config.channels.items():
        built[name] = specs[name].build(settings, sleep, stop)  # the config only holds channels of the registry
    return built


def peer_watcher(web: WebConfig) -> PeerWatcher | None:
    """``web.peers``: the other shards' pages, asked with this page's own ``web.auth`` (one shared config)."""
    if not web.peers:
        return None
    password = web.auth.resolve_password() if web.auth else None
    auth = (web.auth.user, password) if web.auth and password else None
    return PeerWatcher(web.peers, http_fetch(auth))


def attach_web(config: Config, daemon: Daemon) -> WebServer | None:
    """``web:``: the page, the API and /metrics, served in a thread of the daemon (its run_forever
    starts and stops it). The port is bound here, so a busy port stops the start with a clear error."""
    web = config.web
    if web is None:
        return None
    if not web.loopback and web.auth is None:
        log.warning(
            "web: listening on %s without auth: everyone who can reach this port sees every user's GPU processes "
            "and full command lines; add web.auth (user and password_env) or listen on 127.0.0.1",
            web.listen,
        )
    try:
        app = WebApp(daemon.state, lambda: daemon.config, web, StoreReader(config.state_dir), peers=peer_watcher(web))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        server = WebServer(app, web.host, web.port)
    except OSError as exc:
        why = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            why = f"port {web.port} is in use by another process; stop it or set web.listen to a free port"
        raise ConfigError(f"web.listen: cannot listen on {web.listen}: {why}") from None
    daemon.services.append(server)
    log.info("web page at %s", web.public_url or server.url(), extra=ANNOUNCE)
    return server
