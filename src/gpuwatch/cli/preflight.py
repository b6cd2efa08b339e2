"""What ``gpuwatch run`` needs before it starts, checked without sending or writing anything.

``gpuwatch check`` prints every finding; ``run`` refuses to start on a missing key file as on an
unset secret. Each problem names the setting to change (``hosts[1].key_file``, ``ssh.port``,
``feishu.secret_env``, ``HostName in ~/.ssh/config``), never a neighbour of it.
"""

from __future__ import annotations

import errno
import getpass
import os
import pwd
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import paramiko

from ..config import Config, ConfigError, HostConfig, WebConfig
from ..model import HostErrorKind, HostSnapshot
from ..notify.registry import CHANNELS, names_in_words
from ..notify.spec import ChannelSpec
from ..statedir import LOCK_NAME, Holder, StateError
from ..store import DB_NAME, open_db_readonly

#: What ``run`` writes in the state directory (each must be writable where it exists).
STATE_FILES = (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", "gpuwatch.log", LOCK_NAME, "known_hosts")


@dataclass(frozen=True)
class CheckLine:
    """One line of ``check``: what was checked, whether ``run`` can work with it, and why not."""

    subject: str  # "feishu", "state_dir /srv/gpuwatch", "ssh.key_file"
    ok: bool
    detail: str  # what was found, or what is wrong and what to do
    notes: tuple[str, ...] = ()
    problem_text: str | None = None  # what is wrong in a few words, naming the setting (default: the detail)

    def line(self) -> str:
        return f"{self.subject}: {'OK' if self.ok else 'FAILED'}: {self.detail}"

    @property
    def problem(self) -> str:
        return self.problem_text or self.detail


# ---------------------------------------------------------------- channels


def channel_findings(config: Config, channels: tuple[ChannelSpec, ...] = CHANNELS) -> list[CheckLine]:
    """Build every configured channel as ``run`` would (secrets from the environment, URLs,
    files), send nothing, and say what its spec describes; and the web page's settings."""
    findings = []
    stop = threading.Event()
    stop.set()  # nothing built here may wait for anything
    specs = {spec.name: spec for spec in channels}
    for name, settings in config.channels.items():
        spec = specs.get(name)
        if spec is None:
            continue
        try:
            channel = spec.build(settings, lambda seconds: None, stop)
        except ConfigError as exc:
            findings.append(CheckLine(name, False, str(exc)))
            continue
        close = getattr(channel, "close", None)
        if callable(close):
            close()
        untried = f"not tried: a wrong token or address shows only when sending; 'gpuwatch test-notify' sends to {name}"
        findings.append(CheckLine(name, True, spec.describe(settings), notes=(untried,)))
    web = config.web
    if web is not None:
        if web.auth is not None and not web.auth.resolve_password():
            findings.append(
                CheckLine(
                    "web", False, f"web.auth.password_env: ${web.auth.password_env} is not set in the environment"
                )
            )
        else:
            findings.append(web_port_finding(web, _lock_holder(config.state_dir)))
    if not config.channels and web is None:
        findings.append(
            CheckLine(
                "channels",
                False,
                f"no channel configured (none of {names_in_words(channels)}) and no web:, so there is "
                "nowhere to send reports; add one (see config.example.yaml)",
            )
        )
    return findings


def port_problem(host: str, port: int) -> str | None:
    """Why ``run`` could not listen on ``host:port`` (tried: bound for a moment, as the web server
    binds it, then closed), or None. "in use by another process" for a port already taken."""
    if port == 0:
        return None  # any free port
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as exc:
        return f"cannot resolve {host}: {exc}"
    try:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server does
            sock.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return f"port {port} is in use by another process (`ss -ltnp 'sport = :{port}'` names it)"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return f"this user ({getpass.getuser()}) may not listen on port {port} (below 1024 needs root)"
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"{host} is not an address of this machine"
        return exc.strerror or str(exc)
    return None


def web_port_finding(web: WebConfig, holder: Holder | None) -> CheckLine:
    """Whether the page's port can be bound now. A running gpuwatch of this state directory holds
    its own port, so then a port in use is no problem but a note."""
    problem = port_problem(web.host, web.port)
    if problem is None:
        return CheckLine("web", True, f"the page will listen on {web.listen} (the port is free)")
    if holder is not None and "in use" in problem:
        return CheckLine(
            "web",
            True,
            f"the page listens on {web.listen}",
            (f"the port is in use, most likely by the running gpuwatch ({holder.describe()})",),
        )
    return CheckLine(
        "web",
        False,
        f"cannot listen on {web.listen}: {problem}; run would exit 2: stop that process or set web.listen "
        "to a free port",
        problem_text=f"web.listen {web.listen}: {problem}",
    )


# ---------------------------------------------------------------- key files


def setting_name(config: Config, host: HostConfig, key: str) -> str:
    """The key path of an ``ssh:`` setting as it applies to ``host``: its own entry's when set there."""
    if key in host.explicit:
        return f"hosts[{config.host_index(host)}].{key}"
    return f"ssh.{key}"


def key_file_problem(path: str) -> str | None:
    """Why ``path`` cannot serve as a private key for this user, or None."""
    full = os.path.expanduser(path)
    if not os.path.lexists(full):
        return f"{full} does not exist"
    if not os.path.isfile(full):
        return f"{full} is not a file"
    try:
        os.close(os.open(full, os.O_RDONLY))  # tried, not os.access: that ignores capabilities
    except OSError as exc:
        return f"{full} cannot be read by this user ({getpass.getuser()}): {exc.strerror or exc}"
    return None


def key_file_findings(config: Config) -> dict[str, CheckLine]:
    """Hosts whose ``key_file`` cannot be read, by host name: one finding per setting (the fleet-wide
    ``ssh.key_file`` once, however many hosts use it)."""
    by_setting: dict[str, tuple[str, list[str]]] = {}
    for host in config.hosts:
        if host.local or not host.ssh.key_file:
            continue
        problem = key_file_problem(host.ssh.key_file)
        if problem is not None:
            by_setting.setdefault(setting_name(config, host, "key_file"), (problem, []))[1].append(host.name)
    found = {}
    for setting, (problem, hosts) in by_setting.items():
        used = f" (used by {', '.join(hosts)})" if setting.startswith("ssh.") else ""
        finding = CheckLine(setting, False, f"{problem}{used}", problem_text=f"{setting}: {problem}")
        for name in hosts:
            found[name] = finding
    return found


def refuse_unusable_key_files(config: Config) -> None:
    """``run`` does not start with a key file it cannot read (as with an unset secret)."""
    findings = list(dict.fromkeys(key_file_findings(config).values()))
    if findings:
        more = f" (and {len(findings) - 1} more: gpuwatch check lists them)" if len(findings) > 1 else ""
        raise ConfigError(f"{findings[0].problem}; set it to the private key this user logs in with{more}")


# ---------------------------------------------------------------- the state directory


def state_dir_finding(config: Config) -> CheckLine:
    """Whether ``run`` can use the state directory: create it, write its files, take its lock.
    Changes nothing."""
    state_dir = config.state_dir
    subject = f"state_dir {state_dir}"
    user = getpass.getuser()

    def failed(problem: str, fix: str) -> CheckLine:
        return CheckLine(subject, False, f"{problem}; {fix}", problem_text=f"{subject}: {problem}")

    if state_dir.exists() and not state_dir.is_dir():
        return failed("is a file, not a directory", "point state_dir at a directory (it is created if missing)")
    if not state_dir.exists():
        parent = next((p for p in state_dir.parents if p.exists()), Path("/"))
        if _writable(parent):
            return CheckLine(subject, True, "does not exist yet; run creates it (mode 0700)")
        return failed(
            f"does not exist, and this user ({user}) cannot create it in {parent}: {_why_not(parent)}",
            "create it for the user gpuwatch runs as, or point state_dir at a directory that user may write",
        )
    fix = "run check as the user gpuwatch runs as, or point state_dir at a directory this user may write"
    if not _writable(state_dir):
        return failed(
            f"this user ({user}) cannot write it: {_why_not(state_dir)}",
            f"run keeps its outbox, alert state, log and lock there; {fix}",
        )
    for name in STATE_FILES:
        path = state_dir / name
        if path.exists() and not os.access(path, os.W_OK):
            return failed(f"this user ({user}) cannot write {name} there: permission denied", fix)
    notes = home_notes(config)
    holder = _lock_holder(state_dir)
    if holder is not None:
        notes.append(
            f"in use by a running gpuwatch: {holder.describe()}; a second 'run' on it would exit 1 (one sender "
            "at a time)"
        )
    waiting = _waiting(state_dir)
    if waiting:
        notes.append(waiting)
    return CheckLine(subject, True, "writable", tuple(notes))


def home_notes(config: Config) -> list[str]:
    """Key files in this user's home where another user owns the state directory (the service's
    user): ``~/.ssh/id_ed25519`` in the config is expanded to the home of whoever runs the command
    (root's for an admin's ``status``), which the service does not have (nor may see: ProtectHome)."""
    try:
        owner = config.state_dir.stat().st_uid
    except OSError:
        return []
    if owner == os.geteuid():
        return []
    try:
        service = pwd.getpwuid(owner)
    except KeyError:
        return []
    home = os.path.expanduser("~")
    if os.path.realpath(service.pw_dir) == os.path.realpath(home):
        return []
    notes = []
    for setting, path in _key_files(config).items():
        if Path(path).is_relative_to(home):
            notes.append(
                f"{setting} {path} is in the home of this user ({getpass.getuser()}), not of {service.pw_name} "
                f"(the owner of state_dir, home {service.pw_dir}): '~' in the config is the home of whoever runs "
                "gpuwatch; write the absolute path of the service's key"
            )
    return notes


def _key_files(config: Config) -> dict[str, str]:
    """Each ``key_file`` setting in use and its path (the fleet-wide one once)."""
    found: dict[str, str] = {}
    for host in config.hosts:
        if not host.local and host.ssh.key_file:
            found.setdefault(setting_name(config, host, "key_file"), host.ssh.key_file)
    return found


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK) and not _read_only_fs(path)


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _why_not(path: Path) -> str:
    return "read-only file system" if _read_only_fs(path) else "permission denied"


def _lock_holder(state_dir: Path) -> Holder | None:
    """The gpuwatch that holds the state directory, read from the lock file without taking the
    lock (taking it, even for a moment, could refuse a daemon starting at that moment)."""
    try:
        holder = Holder.parse((state_dir / LOCK_NAME).read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None
    if holder is None or holder.pid is None or (holder.host and holder.host != socket.gethostname()):
        return None
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return None  # killed without releasing (kill -9): the kernel dropped the lock
    except PermissionError:
        pass  # alive, another user's
    return holder


def _waiting(state_dir: Path) -> str | None:
    if not (state_dir / DB_NAME).exists():
        return None
    try:
        db = open_db_readonly(state_dir)
    except StateError as exc:
        return f"cannot read {DB_NAME}: {exc.problem}"
    try:
        rows = db.query("SELECT COUNT(*) FROM outbox WHERE dead = 0")
        dead = db.query("SELECT COUNT(*) FROM outbox WHERE dead = 1")
    except Exception as exc:  # a corrupt file: run moves it aside
        return f"cannot read {DB_NAME}: {exc}"
    finally:
        db.close()
    waiting, refused = int(rows[0][0]), int(dead[0][0])
    parts = []
    if waiting:
        parts.append(f"{waiting} message{'s' if waiting != 1 else ''} waiting in the outbox (sent first by run)")
    if refused:
        parts.append(f"{refused} refused for good (kept for inspection)")
    return "; ".join(parts) or None


# ---------------------------------------------------------------- hints for hosts that failed


def host_hint(config: Config, host: HostConfig, snap: HostSnapshot) -> str:
    """What to change for a host that did not answer, naming the setting that decides it."""
    kind = snap.error_kind
    if kind is None or (host.local and kind in _SSH_KINDS):
        return ""
    found = _ssh_config_entry(host)
    user = _value(config, host, "user", "user", found, getpass.getuser())
    port = _value(config, host, "port", "port", found, 22)
    if host.address:
        address, address_setting = host.address, f"hosts[{config.host_index(host)}].address"
    elif "hostname" in found and found["hostname"] != host.name:
        address, address_setting = str(found["hostname"]), f"HostName in ~/.ssh/config for {host.name}"
    else:
        index = config.host_index(host)
        address = host.name
        address_setting = f"hosts[{index}] (the name {host.name}, resolved by DNS; or set an address)"
    if kind == HostErrorKind.UNREACHABLE:
        return (
            f"check {address_setting} ({address}) and {port[1]} ({port[0]}); "
            f"try it by hand: ssh -p {port[0]} {user[0]}@{address}"
        )
    if kind == HostErrorKind.AUTH_FAILED:
        identity = found.get("identityfile")
        listed = identity if isinstance(identity, list) else [identity] if identity else []
        keys = host.ssh.key_file or ", ".join(str(k) for k in listed) or None
        key_setting = (
            setting_name(config, host, "key_file")
            if host.ssh.key_file or "identityfile" not in found
            else f"IdentityFile in ~/.ssh/config for {host.name}"
        )
        password = (
            f", or set ${host.ssh.password_env} (named by {setting_name(config, host, 'password_env')})"
            if host.ssh.password_env and not host.ssh.resolve_password()
            else ""
        )
        return (
            f"check {user[1]} ({user[0]}) and {key_setting} ({keys or 'not set: ssh-agent and ~/.ssh keys tried'})"
            f"{password}; is that key in ~{user[0]}/.ssh/authorized_keys on {address}?"
        )
    if kind == HostErrorKind.HOST_KEY_UNKNOWN:
        return (
            f"{setting_name(config, host, 'host_key_policy')} is {host.ssh.host_key_policy}: verify the fingerprint "
            "with the host's admin, then run the ssh-keyscan line above"
        )
    if kind == HostErrorKind.HOST_KEY_CHANGED:
        return "ask the host's admin whether it was reinstalled before removing the old key"
    if kind == HostErrorKind.NVIDIA_SMI_NOT_FOUND:
        where = (
            setting_name(config, host, "nvidia_smi")
            if "nvidia_smi" in host.explicit
            else f"hosts[{config.host_index(host)}].nvidia_smi"
        )
        now = host.ssh.nvidia_smi
        return f"install the NVIDIA driver there, or set {where} to the full path of nvidia-smi (now {now})"
    if kind == HostErrorKind.PROBE_TIMEOUT:
        return (
            f"raise {setting_name(config, host, 'command_timeout')} (now {host.ssh.command_timeout:g}s) if the host is "
            "just slow; a hung nvidia-smi needs a reboot"
        )
    return _HOST_SIDE.get(kind, "")


_SSH_KINDS = frozenset(
    {
        HostErrorKind.UNREACHABLE,
        HostErrorKind.AUTH_FAILED,
        HostErrorKind.HOST_KEY_UNKNOWN,
        HostErrorKind.HOST_KEY_CHANGED,
    }
)
# Failures on the host itself: no gpuwatch setting can fix them.
_HOST_SIDE = {
    HostErrorKind.DRIVER_MISMATCH: "the driver was upgraded under a running kernel module: reboot the host",
    HostErrorKind.DRIVER_NOT_LOADED: "check 'lsmod | grep nvidia' and 'dmesg' on the host",
    HostErrorKind.GPU_LOST: "a GPU fell off the bus: reboot the host; if it recurs, check cooling and power",
    HostErrorKind.NO_DEVICES: "no GPU visible to the driver: check 'lspci | grep -i nvidia' and 'dmesg'",
    HostErrorKind.PERMISSION_DENIED: "the login user may not query the GPUs: check /dev/nvidia* permissions",
}


def _ssh_config_entry(host: HostConfig) -> dict[str, object]:
    if host.local or not host.ssh.use_ssh_config:
        return {}
    path = Path(os.path.expanduser("~/.ssh/config"))
    try:
        if not path.is_file():  # raises where this user may not enter the home (HOME kept under another user)
            return {}
        entry: dict[str, object] = dict(paramiko.SSHConfig.from_path(str(path)).lookup(host.name))
    except Exception:  # status says what is wrong with the file; a hint is not the place
        return {}
    if entry.get("hostname") == host.name:
        entry.pop("hostname")
    return entry


def _value(
    config: Config, host: HostConfig, key: str, ssh_key: str, found: dict[str, object], default: object
) -> tuple[object, str]:
    """A setting's value for ``host`` and where it comes from (the order ssh.resolve_target applies)."""
    value = getattr(host.ssh, key)
    if key in host.explicit and value is not None:
        return value, setting_name(config, host, key)
    if ssh_key in found:
        return found[ssh_key], f"{ssh_key.capitalize()} in ~/.ssh/config for {host.name}"
    if value is not None:
        return value, f"ssh.{key}"
    return default, f"ssh.{key} (not set: {default})"
