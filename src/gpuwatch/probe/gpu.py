"""The GPU step: ``nvidia-smi --query-gpu`` with the health fields the host supports (``health``
says which were asked); once per host (and after a driver change) ``learn`` reads them from
``--help-query-gpu`` and the CUDA version from ``--version``, and ``gpuhealth`` asks them.

Its reader holds the failure rules: no GPU list, a list cut short or a hung nvidia-smi make the
whole snapshot a failure (no GPU data is better than a wrong count).
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Mapping, Sequence

from gpuwatch import parse
from gpuwatch.model import Gpu, HostErrorKind, HostIssue

from .state import HostProbe
from .step import TIMEOUT_EXITS, Draft, Step, cut_short, first_line, step_timeout

HEALTH_AWK = r"""BEGIN { n = split(want, w, ",") }
/^"/ { s = $0
  while (match(s, /"[^"]*"/)) { have[substr(s, RSTART + 1, RLENGTH - 2)] = 1; s = substr(s, RSTART + RLENGTH) } }
END { for (i = 1; i <= n; i++) {
    split(w[i], p, "=")
    if ((p[1] in have) && !(p[2] in done)) { done[p[2]] = 1; printf "%s%s", c, p[1]; c = "," } }
  print "" }"""
"""The learning step's awk over ``--help-query-gpu``: the wanted fields (``name=reading``, current
names first) the driver lists, one per reading; :func:`parse.supported_health_fields` in shell."""

_GPU = r"""echo "@@begin gpu__K__"
if ! command -v "$SMI" >/dev/null 2>&1; then
  echo "$SMI: command not found"
  printf '\n@@end gpu__K__ 127\n'
  exit 0
fi
X=__HEALTH__
got=$(grab run "$SMI" --query-gpu=__GPU_FIELDS__${X:+,$X} --format=csv); took "nvidia-smi --query-gpu" gpu
refused=
if [ "$rc" != 0 ] && [ -n "$X" ]; then
  case "$out" in
    *"is not a valid field"*)
      refused=1; got=$(grab run "$SMI" --query-gpu=__GPU_FIELDS__ --format=csv); took "nvidia-smi --query-gpu" gpu ;;
  esac
fi
printf '%s\n' "$out"
out=
printf '\n@@end gpu__K__ %s\n' "$rc"
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then exit 0; fi
echo "@@begin health__K__"
printf 'asked %s\n' "$X"
if [ -n "$refused" ]; then echo refused; fi
printf '\n@@end health__K__ 0\n'
if [ __LEARN__ = 1 ] && [ "$rc" = 0 ]; then
  echo "@@begin learn__K__"
  L=$(run "$SMI" --help-query-gpu 2>/dev/null | head -c "$C" | awk -v want=__WANT__ '__HEALTH_AWK__')
  printf 'fields %s\n' "$L"
  run "$SMI" --version 2>&1 | head -n 20
  printf '\n@@end learn__K__ %s\n' "$?"
  if [ -n "$L" ]; then
    echo "@@begin gpuhealth__K__"
    run "$SMI" --query-gpu=index,uuid,"$L" --format=csv 2>&1
    printf '\n@@end gpuhealth__K__ %s\n' "$?"
  fi
fi
"""


def wanted_health_fields() -> str:
    """HEALTH_QUERY_FIELDS as the learning awk reads them: ``name=reading,...``, current names first."""
    return ",".join(f"{name}={names[0]}" for names in parse.HEALTH_QUERY_FIELDS for name in names)


def _fill(probe: HostProbe | None) -> Mapping[str, str]:
    fields = probe.health_fields if probe is not None else ()
    health = ",".join(fields) if fields else ""
    return {
        "__HEALTH__": shlex.quote(health) if health else "",
        "__LEARN__": "1" if probe is not None and fields is None else "0",
        "__WANT__": shlex.quote(wanted_health_fields()),
        "__HEALTH_AWK__": HEALTH_AWK,
        "__GPU_FIELDS__": ",".join(parse.GPU_QUERY_FIELDS),
    }


def _read(draft: Draft) -> None:
    """The GPUs, or the snapshot's failure when they are not known."""
    gpu_sec = draft.sections.get("gpu")
    if gpu_sec is None:
        draft.fail(HostErrorKind.UNPARSEABLE, f"unexpected probe output: {draft.unexpected()!r}")
        return
    if gpu_sec.exit_status in TIMEOUT_EXITS:
        draft.fail(
            HostErrorKind.PROBE_TIMEOUT,
            f"nvidia-smi did not answer within {step_timeout(draft.command_timeout)}s and was killed; "
            "the driver may be hung or a GPU may have fallen off the bus",
        )
        return
    if gpu_sec.exit_status is None:
        # Some GPUs may be missing from a list cut short: no GPU data is better than a wrong count.
        draft.fail(
            HostErrorKind.PROBE_TIMEOUT,
            "the probe was cut short before nvidia-smi finished listing the GPUs "
            "(the connection dropped or the output was cut)",
        )
        return
    gpus, issues = parse.parse_query_gpu(gpu_sec.text, required=parse.GPU_QUERY_FIELDS)
    failure = parse.query_gpu_failure(gpu_sec.text, gpu_sec.exit_status)
    if not gpus:
        issue = failure or (issues[0] if issues else None)
        if issue is None:
            issue = HostIssue(HostErrorKind.NO_DEVICES, "nvidia-smi listed no GPUs")
        draft.failure = issue
        return
    warnings = draft.warnings
    warnings += issues
    if failure is not None and failure not in warnings:
        warnings.append(failure)
    # The output's own structure is worth a warning only once it is known to be usable.
    for structure in draft.problems:
        warnings.append(
            HostIssue(HostErrorKind.PROBE_FAILED, f"the probe output is malformed ({structure}); processes unknown")
        )
    draft.gpus = _with_health(gpus, draft)
    _learn_driver(draft)


def _learn_driver(draft: Draft) -> None:
    """The driver version into the probe (a change makes it learn the fields again) and the context."""
    probe = draft.probe
    version = _driver_version(draft.gpus, draft.warnings)
    if probe is not None and version is not None:
        if probe.driver_version is not None and version != probe.driver_version:
            probe.forget_learned()  # a new driver may know other fields, and another CUDA version
        probe.driver_version = version
    if draft.context is not None:
        cuda = probe.cuda_version if probe is not None else None
        draft.context = dataclasses.replace(draft.context, driver_version=version, cuda_version=cuda)


def _with_health(gpus: list[Gpu], draft: Draft) -> list[Gpu]:
    """The GPUs with their health readings, and what the probe learned about the driver.

    Normally the health fields come in the GPU rows themselves; in the poll that learns them they
    come from the ``gpuhealth`` section, matched to the GPUs by index and UUID."""
    _read_health_section(draft)
    probe, warnings = draft.probe, draft.warnings
    learn_sec = draft.sections.get("learn")
    if learn_sec is not None and probe is not None:
        if learn_sec.exit_status is None:
            warnings.append(cut_short("the driver's field list", "learned next poll", HostErrorKind.UNPARSEABLE))
        else:
            lines = learn_sec.text.split("\n")
            listed = next((line[len("fields ") :] for line in lines if line.startswith("fields ")), "")
            probe.learn(parse.health_fields_from(listed), parse.parse_cuda_version(learn_sec.text))
    extra_sec = draft.sections.get("gpuhealth")
    if extra_sec is not None:
        if extra_sec.exit_status is None:
            warnings.append(cut_short("the GPU health query", "health unknown", HostErrorKind.UNPARSEABLE))
        extra, extra_issues = parse.parse_query_gpu(extra_sec.text)
        gpus = _merge_health(gpus, extra, warnings, cut=extra_sec.exit_status is None)
        warnings += [i for i in extra_issues if i.kind is HostErrorKind.UNPARSEABLE]
    return gpus


def _merge_health(gpus: list[Gpu], extra: list[Gpu], warnings: list[HostIssue], cut: bool) -> list[Gpu]:
    """The learning poll's health rows matched to the GPUs by index and UUID; a GPU with no such
    row (missing, or another UUID at its index) has its health unknown this poll, with a warning
    (none when the section was cut short: that already has one)."""
    by_index = {g.index: g for g in extra}
    merged, missing = [], []
    for gpu in gpus:
        found = by_index.get(gpu.index)
        if found is not None and (found.uuid or "").lower() == (gpu.uuid or "").lower():
            if found.health is not None:
                gpu = dataclasses.replace(gpu, health=found.health)
        else:
            missing.append(gpu.index)
        merged.append(gpu)
    if missing and not cut:
        shown = ", ".join(str(i) for i in missing[:8]) + (" ..." if len(missing) > 8 else "")
        warnings.append(
            HostIssue(
                HostErrorKind.UNPARSEABLE,
                f"the GPU health query gave no row for GPU {shown}; its health is unknown this poll",
            )
        )
    return merged


def _read_health_section(draft: Draft) -> None:
    """The ``health`` section: which fields were asked, and whether nvidia-smi refused one (then
    they are learned again)."""
    health_sec = draft.sections.get("health")
    if health_sec is None:
        return
    foreign = [line for line in health_sec.text.split("\n") if line.strip() and not line.startswith("asked ")]
    foreign = [line for line in foreign if line != "refused"]
    if foreign or health_sec.exit_status is None:
        draft.warnings.append(
            HostIssue(
                HostErrorKind.UNPARSEABLE,
                f"the probe's health step printed what it never prints: {first_line(chr(10).join(foreign))}",
            )
        )
    if "refused" in health_sec.text.split("\n"):
        draft.warnings.append(
            HostIssue(
                HostErrorKind.UNPARSEABLE,
                "nvidia-smi refused a GPU health field it had listed as supported; health is unknown this poll "
                "and the fields are learned again",
            )
        )
        if draft.probe is not None:
            draft.probe.forget_learned()


def _driver_version(gpus: Sequence[Gpu], warnings: list[HostIssue]) -> str | None:
    """The driver version the GPUs report (all the same on one host); a change makes the probe
    learn the driver's fields again."""
    versions = {g.health.driver_version for g in gpus if g.health is not None and g.health.driver_version}
    if len(versions) > 1:
        warnings.append(
            HostIssue(
                HostErrorKind.UNPARSEABLE, f"the GPUs report different driver versions: {', '.join(sorted(versions))}"
            )
        )
        return None
    return next(iter(versions), None)


STEP = Step("gpu", _GPU, ("gpu", "health", "learn", "gpuhealth"), _fill, _read)
