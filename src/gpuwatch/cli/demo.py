"""``gpuwatch demo``: the daemon with its page on a replayed fleet; messages printed, not sent.

Needs no config file, no SSH and no root: the hosts run the real probe script through ``sh``
with ``nvidia-smi``/``ps`` stand-ins replaying bundled real captures (``gpuwatch.demo``).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import threading
from pathlib import Path
from typing import TextIO

import yaml

from ..config import Config, ConfigError, parse_duration
from ..daemon import Daemon
from ..demo import DemoFleet, Toggler, demo_config, demo_hosts
from ..logsetup import setup_logging
from ..notify.base import Channel
from ..notify.console import ConsoleChannel, DryRunChannel
from ..poll import Poller
from ..store import AlertStore, Outbox, open_db
from ..text import format_duration
from .common import UsageError, program_words
from .wiring import attach_web


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    demo = sub.add_parser(
        "demo", help="the daemon and its web page on a replayed fleet (real captures; no servers, no SSH, no config)"
    )
    demo.add_argument("--listen", default="127.0.0.1:8787", help="where the page listens (default 127.0.0.1:8787)")
    demo.add_argument("--poll-every", default="5s", help="poll interval (default 5s)")
    demo.add_argument("--for", dest="duration", help="stop after this long, e.g. 2m (default: until Ctrl-C)")
    demo.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log more to stderr")
    demo.set_defaults(handler=None, standalone=cmd_demo)


def _with_config_file(config: Config, path: Path) -> Config:
    """The demo's config with a file of its own (its hosts and state directory, 0600), named in
    the ack lines it prints: so they run as printed, from another shell, while the demo runs."""
    doc = {"hosts": [h.name for h in config.hosts], "state_dir": str(config.state_dir)}
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    path.chmod(0o600)
    return dataclasses.replace(config, path=path)


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    try:
        poll_every = parse_duration(args.poll_every, "demo --poll-every")
        stop_after = parse_duration(args.duration, "demo --for") if args.duration else None
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    with tempfile.TemporaryDirectory(prefix="gpuwatch-demo-") as tmp:
        root = Path(tmp)
        try:
            config = demo_config(root / "state", args.listen, max(1.0, poll_every))
        except ConfigError as exc:
            raise UsageError(f"demo --listen: {exc}") from None
        config = _with_config_file(config, root / "config.yaml")
        setup_logging(
            config.state_dir,
            level="DEBUG" if args.verbose else "INFO",
            stderr_level="INFO" if args.verbose else "WARNING",
        )
        fleet = DemoFleet(root / "fleet")
        poller = Poller(config.hosts, fleet.runner_factory(), max_parallel=config.max_parallel)
        outbox = Outbox(open_db(config.state_dir))
        channels: dict[str, Channel] = {"console": DryRunChannel(ConsoleChannel(out), out)}
        daemon = Daemon(config, poller, outbox, channels, alert_store=AlertStore(outbox.db), program=program_words())
        try:
            server = attach_web(config, daemon)
            assert server is not None
            daemon.services.append(Toggler(fleet))
            if stop_after is not None:
                timer = threading.Timer(stop_after, daemon.stop.set)
                timer.daemon = True
                timer.start()
            out.write(
                f"gpuwatch demo: {len(demo_hosts())} hosts replayed from real nvidia-smi captures "
                f"(owners and commands invented), polled every {format_duration(config.schedule.poll_every)}.\n"
                f"Open {server.url()}  (JSON: {server.url()}api/v1/snapshot, metrics: {server.url()}metrics)\n"
                "Messages are printed here instead of sent. Ctrl-C stops.\n"
            )
            out.flush()
            return daemon.run_forever()
        finally:
            poller.close()
            outbox.db.close()
