"""The wrapper every probe script runs in on a host: a session of its own, ended when the script
exits or at its deadline."""

from __future__ import annotations

# The wrapper every script runs in on a host. sshd gives each exec a session, but nothing ends
# it: closing the channel signals nobody (without a pty), `timeout` kills only its own process
# group, and a child that ignores SIGTERM or sits in another group keeps running, holding the
# output open. So the script runs in a new session (setsid) that the wrapper ends with SIGKILL
# as soon as the script exits (children it left behind included), and a watchdog, in a session
# of its own, ends it at the deadline whatever happens to the connection. K ends a session:
# pkill -s finds its processes whatever their process group, pass after pass while it finds
# some (one may have been forking during the previous pass); without pkill, kill -<pgid> ends
# the script's own process group. The watchdog is killed by pid, then by process group, so it
# cannot outlive the wrapper. Without setsid (not Linux), the script runs as it is.
# The session's stdout goes through dd, which gathers it (up to 1 MiB) and writes it once the
# session's writers are gone: the probe prints its sections in many small writes, and each would
# be an SSH packet of its own (20 or so per probe), each costing the client a wake of its
# transport thread and of the reader; gathered, a probe's output is one or two packets. The pipe
# to dd is a FIFO next to the script's file (created only if that name is free, removed as soon
# as both ends are open); without dd or mkfifo, stdout goes straight to the channel as before.
_PROBE_END = "__GPUWATCH_PROBE_END__"
_SESSION_SCRIPT = """\
# gpuwatch: the probe runs in a session of its own, ended when it exits or after __LIMIT__ s.
# The probe reaches its shell through a file only the login user can read, never through an argv:
# its section markers carry a per-poll secret that other users on the host must not see. The file
# is removed as soon as it is open (on fd 5): nothing is left if this shell is killed (logind's
# KillUserProcesses, the OOM killer, an admin); the probe's shell reads it as /dev/fd/5.
PATH="$PATH:/usr/bin:/bin"; export PATH
umask 077
if ! f=$(mktemp "${TMPDIR:-/tmp}/gpuwatch-probe.XXXXXXXXXX" 2>/dev/null); then
  f="${TMPDIR:-/tmp}/gpuwatch-probe.$$"  # no mktemp: created exclusively (O_EXCL), mode 0600
  if ! (set -C; : > "$f") 2>/dev/null; then
    echo "gpuwatch: cannot create a private file for the probe in ${TMPDIR:-/tmp}" >&2
    exit 125
  fi
fi
exec 4>"$f" 5<"$f"
if [ -r /dev/fd/5 ]; then rm -f "$f"; p=/dev/fd/5; else p=$f; fi
cat >&4 <<'__PROBE_END__'
exec 5<&-
__SCRIPT__
__PROBE_END__
exec 4>&-
if command -v setsid >/dev/null 2>&1; then
  o=
  if command -v dd >/dev/null 2>&1 && mkfifo "$f.o" 2>/dev/null; then
    dd obs=1048576 <"$f.o" 2>/dev/null 5<&- &
    o=$!
    exec 1>"$f.o"
    rm -f "$f.o"
  fi
  exec 3>&2 2>/dev/null  # the probe's stderr on 3; the shell's own notes ("Killed") to /dev/null
  K='n=0; while [ "$n" -lt 3 ] && pkill -KILL -s "$1"; do n=$((n + 1)); done; kill -KILL -"$1"'
  setsid sh "$p" </dev/null 2>&3 3>&- &
  s=$!
  exec 5<&-
  setsid sh -c 'sleep "$1"; sh -c "$2" end "$3"' gpuwatch-deadline __LIMIT__ "$K" "$s" \\
    </dev/null >/dev/null 2>&1 3>&- &
  w=$!
  wait "$s"
  rc=$?
  kill -KILL "$w"; kill -KILL -"$w"
  sh -c "$K" end "$s" 3>&-
  rm -f "$f"
  if [ -n "$o" ]; then exec 1>&-; wait "$o"; fi
  exit "$rc"
fi
sh "$p" </dev/null
rc=$?
rm -f "$f"
exit "$rc"
"""


def session_script(script: str, limit_seconds: int) -> str:
    """``script`` wrapped so that it runs in a session of its own (POSIX sh), which is ended with
    SIGKILL when the script exits or ``limit_seconds`` after it started; its exit status is the
    script's. Runs as ``sh -s`` input, so it works whatever the login shell is. The script is
    handed over in a private temporary file, removed as soon as it is open (where ``/dev/fd`` is
    there, as on Linux; elsewhere when the script ends), so no argv on the host holds it and no
    file outlives a killed wrapper."""
    if _PROBE_END in script.splitlines():
        raise ValueError("the probe script must not contain its own end marker")
    return (
        _SESSION_SCRIPT.replace("__LIMIT__", str(max(1, int(limit_seconds))))
        .replace("__PROBE_END__", _PROBE_END)
        .replace("__SCRIPT__", script.rstrip("\n"))
    )
