"""A probe step is one module: its shell snippet, its placeholders and its reader travel together.

Shown with a hypothetical step (``nvidia-smi topo -m``) added end to end, as ``test_registry.py``
does for a rule: the script runs it in the same single exec, its section comes back with its exit
status, and its reader gets it; the other steps are untouched.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

import fuzzing
from fleet import scenario_healthy_multi_gpu, standin_env
from gpuwatch.config import HostContextConfig
from gpuwatch.model import HostErrorKind, HostIssue
from gpuwatch.probe import (
    SECTIONS,
    STEPS,
    Draft,
    HostProbe,
    ProbeSettings,
    Step,
    StepOutput,
    build_script,
    new_token,
    overflow,
    snapshot_from_output,
)

TOPO_SHELL = r"""echo "@@begin topo__K__"
run "$SMI" topo __TOPO_FLAGS__ 2>&1
printf '\n@@end topo__K__ %s\n' "$?"
"""


def topo_step(seen: list[StepOutput]) -> Step:
    """What a new ``probe/topo.py`` would hold (its reader would fill a new field of the context)."""

    def fill(host_probe: HostProbe | None) -> dict[str, str]:
        return {"__TOPO_FLAGS__": "-m"}

    def read(draft: Draft) -> None:
        section = draft.sections.get("topo")
        if section is None:
            draft.warnings.append(HostIssue(HostErrorKind.PROBE_FAILED, "the topology step did not run"))
            return
        seen.append(section)

    return Step("topo", TOPO_SHELL, ("topo",), fill, read)


def test_a_new_step_runs_in_the_same_exec_and_its_reader_gets_its_section(tmp_path: Path) -> None:
    scenario_healthy_multi_gpu(tmp_path / "standin" / "local")
    seen: list[StepOutput] = []
    steps = (*STEPS, topo_step(seen))
    token = new_token()
    script = build_script(30, token=token, steps=steps)
    assert script.startswith(build_script(30, token=token))  # the other steps' shell as it was
    done = subprocess.run(
        ["sh", "-s"], input=script, env=standin_env(tmp_path / "standin"), capture_output=True, text=True, timeout=60
    )
    snap = snapshot_from_output("h", "h", done.stdout, done.stderr, token=token, steps=steps)
    assert snap.ok and len(snap.gpus) == 4, snap.error
    assert [s.exit_status for s in seen] == [0]
    assert not any("malformed" in w.message or "topology" in w.message for w in snap.warnings), snap.warnings
    assert len(snap.processes) == 3 and snap.context is not None  # the other steps read as before


def test_each_step_prints_its_own_sections_and_no_section_twice() -> None:
    for step in STEPS:
        printed = set(re.findall(r"@@begin (\w+)__K__", step.shell))
        assert printed == set(step.sections), step.name
    assert len(SECTIONS) == len(set(SECTIONS))


def test_every_placeholder_is_filled_and_a_value_is_never_read_again() -> None:
    for host_probe in (None, HostProbe()):
        script = build_script(30, token=new_token(), probe=host_probe)
        assert not re.search(r"__[A-Z_]+__", script)
    odd = HostProbe(ProbeSettings(host_context=HostContextConfig(disks=("/data/__K__", "/x/__SMI__"))))
    script = build_script(30, token="a" * 32, probe=odd)
    assert "for p in /data/__K__ /x/__SMI__; do" in script  # a configured path stays as written


@pytest.mark.parametrize(
    ("printed", "kept"),
    [("", True), ("0123456789", True), ("012345678\n", True), ("0123456789a", False), ("\n" * 40, False)],
)
def test_grab_holds_at_most_the_cap_and_carries_the_exit_status(printed: str, kept: bool) -> None:
    """``grab``/``took`` with a 10-byte cap: an output of at most 10 bytes comes back whole with
    its exit status; one byte more (even newlines only) is the overflow section and the end."""
    shell = overflow.STEP.shell.replace("__CAP__", "10").replace("__K__", "")
    script = (
        f'{shell}got=$(grab sh -c \'printf "%s" "$1"; exit 3\' x {shlex.quote(printed)}); took test gpu\n'
        'printf \'[%s] %s\\n\' "$out" "$rc"\n'
    )
    done = subprocess.run(["sh", "-s"], input=script, capture_output=True, text=True, timeout=20)
    if kept:
        assert done.stdout == f"[{printed}] 3\n"
    else:
        assert done.stdout.startswith("\n@@end gpu 141\n@@begin overflow\ntest\n")
        assert done.stdout.endswith("\n@@end overflow 0\n") and "[" not in done.stdout


def test_owners_are_named_by_getent_and_a_silent_directory_is_said() -> None:
    """The probe's owners listing names each uid as ``getent`` does (``john doe``, ``josé`` where
    ps printed ``jos??``); when getent did not answer, ps's own names stand, with a warning."""
    (seed,) = [
        s
        for s in fuzzing.seeds()
        if s.name == "probe:nvgpuexp-rtx2080super-windows-610.62-load-query-gpu-all-fields.csv"
    ]
    snap = snapshot_from_output("h", "h", seed.text, token=seed.token)
    assert snap.ok and snap.warnings == ()
    owners = {p.owner for p in snap.processes}
    assert {"john doe", "jos\u00e9", "1001"} <= owners and "jos??" not in owners
    silent = re.sub(r"(@@begin uids \S+\n).*?(\n@@end uids \S+) \d+", r"\1\2 124", seed.text, flags=re.S)
    snap = snapshot_from_output("h", "h", silent, token=seed.token)
    assert "jos??" in {p.owner for p in snap.processes}
    assert [w.message for w in snap.warnings] == [
        "getent passwd did not answer within 3s (is the user directory reachable?); "
        "some owners are shown as ps printed them"
    ]


def test_a_process_on_several_gpus_has_its_cgroup_read_once(tmp_path: Path) -> None:
    """nvidia-smi lists a process once per GPU it uses; its /proc/PID/cgroup is read once all the
    same (read once per GPU, 8 GPUs' worth of lines looked like no real cgroup file)."""
    sleepers = [subprocess.Popen(["sleep", "120"]) for _ in range(3)]
    try:
        owners = dict(zip((11327, 11328, 11345), (p.pid for p in sleepers), strict=True))
        scenario_healthy_multi_gpu(tmp_path / "standin" / "local", 8, busy_gpus=range(8), owners_pids=owners)
        token = new_token()
        done = subprocess.run(
            ["sh", "-s"],
            input=build_script(30, token=token, probe=HostProbe()),
            env=standin_env(tmp_path / "standin"),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        for p in sleepers:
            p.kill()
            p.wait()
    snap = snapshot_from_output("h", "h", done.stdout, done.stderr, token=token, probe=HostProbe())
    assert snap.ok and len(snap.processes) == 24, snap.error
    assert {p.cgroup_note for p in snap.processes} == {None}
    cgroup = re.search(rf"@@begin cgroup {token}\n(.*?)\n@@end cgroup", done.stdout, re.S)
    assert cgroup is not None
    read = [line.split()[1] for line in cgroup[1].split("\n") if line.startswith("cg ")]
    for p in sleepers:
        lines = read.count(str(p.pid))
        assert 0 < lines <= 64, (p.pid, lines)
