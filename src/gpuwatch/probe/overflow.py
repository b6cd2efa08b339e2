"""The probe's bound in memory on the host: ``grab`` and ``took``, which the steps capture a
command's output with, and the ``overflow`` section they print when one printed too much.

A shell variable holds whatever the command printed (``out=$(nvidia-smi ...)``): a streaming
nvidia-smi once grew the probe's shell to 4 GiB. ``grab`` cuts every captured output after
:data:`~gpuwatch.probe.step.MAX_CAPTURE_BYTES` (the client's cap on the whole output, so such a
poll fails either way) and a line, carrying the command's exit status in the same stream after
it, since POSIX sh has no pipefail. An output cut there ends the probe with an ``overflow``
section: the host's snapshot is then the same failure as an output past the client's cap.

This step runs nothing: its shell defines the two functions, after the host step (which needs
neither) and before every step that captures; its reader comes before the GPU step's, so a cut
output fails the snapshot while the host's context is kept.
"""

from __future__ import annotations

from collections.abc import Mapping

from gpuwatch import parse
from gpuwatch.model import HostErrorKind

from .state import HostProbe
from .step import MAX_CAPTURE_BYTES, Draft, Step, first_line

_OVERFLOW = r"""# grab CMD...: CMD's output (stderr merged), then its exit status after "\n@rc ", the whole cut
# after $C bytes and a line: the shell never holds more of any output. took WHAT [SECTION] reads
# $got into $out and $rc; an output that was cut ends the probe with the overflow section
# (closing SECTION first: the command was stopped by SIGPIPE, hence 141).
C=__CAP__
NL='
'
grab() { { "$@" 2>&1; printf '\n@rc %s' "$?"; } | head -c $((C + 16)); }
took() {
  case "$got" in *"$NL@rc "[0-9] | *"$NL@rc "[0-9][0-9] | *"$NL@rc "[0-9][0-9][0-9])
    rc=${got##*"$NL@rc "}; out=${got%"$NL@rc "*}
    if [ "${#out}" -le "$C" ]; then got=; return 0; fi ;;
  esac
  out=
  if [ -n "${2:-}" ]; then printf '\n@@end %s__K__ 141\n' "$2"; fi
  echo "@@begin overflow__K__"
  printf '%s\n%.200s' "$1" "$got"
  printf '\n@@end overflow__K__ 0\n'
  exit 0
}
"""


def _fill(probe: HostProbe | None) -> Mapping[str, str]:
    return {"__CAP__": str(MAX_CAPTURE_BYTES)}


def _read(draft: Draft) -> None:
    """An ``overflow`` section fails the snapshot: what printed too much, and how it begins."""
    section = draft.sections.get("overflow")
    if section is None:
        return
    what, _, begins = section.text.partition("\n")
    draft.fail(
        HostErrorKind.UNPARSEABLE,
        f"{parse.excerpt(what, 60)} printed more than {MAX_CAPTURE_BYTES // (1024 * 1024)} MiB on the host "
        f"(it begins {first_line(begins)!r}); the probe stopped it there and ended. Something on the host "
        "writes endless output: check the nvidia-smi on the login user's PATH",
    )


STEP = Step("overflow", _OVERFLOW, ("overflow",), _fill, _read)
