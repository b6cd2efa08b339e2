"""The web page, the JSON API, /healthz and /metrics, called as a WSGI app over a fleet state built
from real captures (no server, no browser: those are in test_web_e2e.py)."""

from __future__ import annotations

import base64
import gzip
import io
import json
import re
import shutil
import subprocess
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from builders import WEB_T0 as T0
from builders import XSS, Clock, busy_host, config, fleet, host
from gpuwatch.attribution import AttributionSettings, CgroupRead, ContainerInfo, attribute_owners
from gpuwatch.cli import main
from gpuwatch.config import ConfigError, FreeGpuConfig, WebConfig
from gpuwatch.config.load import parse_config
from gpuwatch.demo import demo_config
from gpuwatch.fleet import FleetState
from gpuwatch.metrics import build_registry
from gpuwatch.model import GpuProcess, HostErrorKind, HostSnapshot, PsEntry
from gpuwatch.pageview import AlertView, proc_view
from gpuwatch.render import fleet_table, snapshot_dict
from gpuwatch.rules import RULES, AlertKey, AlertRecord
from gpuwatch.store import AlertStore, Outbox, StoreReader, open_db
from gpuwatch.web import Query, WebApp, page_view

STANDIN = Path(__file__).parent / "fixtures" / "standin"
H100_LOAD = STANDIN / "csv-query-gpu/nvgpuexp-h100-80gb-hbm3-linux-590.48.01-load-query-gpu-all-fields.csv"
H100_IDLE = STANDIN / "csv-query-gpu/nvgpuexp-h100-80gb-hbm3-linux-590.48.01-idle-query-gpu-all-fields.csv"
H100_APPS = STANDIN / "csv-compute-apps/nvgpuexp-h100-80gb-hbm3-linux-590.48.01-load-compute-apps.csv"
MIG_LOAD = STANDIN / "csv-query-gpu/nvgpuexp-h100-mig-linux-590.48.01-load-query-gpu-all-fields.csv"
MIG_APPS = STANDIN / "csv-compute-apps/nvgpuexp-h100-mig-linux-590.48.01-load-compute-apps.csv"

MIB = 1024 * 1024


def app_for(state: FleetState, tmp_path: Path, store: StoreReader | None = None, **web: Any) -> WebApp:
    cfg = config(tmp_path, **web)
    assert cfg.web is not None
    return WebApp(state, lambda: cfg, cfg.web, store)


def call(app: WebApp, path: str, method: str = "GET", **headers: str) -> tuple[int, dict[str, str], bytes]:
    """One request through the WSGI interface: (status code, headers, body, gunzipped when needed)."""
    path, _, query = path.partition("?")
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query, "wsgi.input": io.BytesIO()}
    environ.update({"HTTP_" + k.upper(): v for k, v in headers.items()})
    seen: dict[str, Any] = {}

    def start_response(status: str, header_list: list[tuple[str, str]]) -> None:
        seen["status"], seen["headers"] = status, dict(header_list)

    body = b"".join(app(environ, start_response))
    if seen["headers"].get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    return int(seen["status"].split()[0]), seen["headers"], body


# ---------------------------------------------------------------- the page


def test_the_page_shows_problems_first_then_every_gpu_with_its_users(tmp_path: Path) -> None:
    clock = Clock()
    app = app_for(fleet(clock), tmp_path)
    clock.step(5)
    status, headers, body = call(app, "/")
    html = body.decode()
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    summary = re.search(r'<p class="summary">(.*?)</p>', html)
    assert summary is not None
    assert re.sub("<[^>]+>", " ", summary.group(1)).split() == "4 hosts 3 answered 1 down 3 GPUs 1 free".split()
    problems, first_host = html.index('class="problems"'), html.index('<section class="host"')
    assert problems < first_host  # down hosts above everything
    assert "gpu-d" in html[problems:first_host] and "connection refused by 10.9.9.9:22" in html
    for name in ("gpu-a", "gpu-f", "gpu-m", "alice", "verylongusername", "bob", "pid 11345 (owner unknown)"):
        assert name in html
    assert html.count('class="gpu free"') == 1  # the idle H100 stands out
    assert "N/A" in html  # MIG: utilization unknown, no bar
    assert "python3 train.py --lr 3e-4" in html  # the full command, to expand


def test_what_a_host_says_is_escaped_everywhere_and_no_script_runs_inline(tmp_path: Path) -> None:
    app = app_for(fleet(Clock()), tmp_path)
    for path in ("/", "/fragment", "/?q=alice"):
        _, headers, body = call(app, path)
        html = body.decode()
        assert XSS not in html and "<img" not in html
        assert "&lt;img src=x onerror=alert(1)&gt;" in html  # shown as text, in the command and its title
        assert 'title="pid 11327: &lt;img src=x onerror=alert(1)&gt;"' in html
        csp = headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
        assert headers["X-Content-Type-Options"] == "nosniff"
        elements = Elements.of(html)
        assert not [e for e in elements if e[0] == "img"]
        assert not [e for e in elements if e[0] == "script" and "src" not in e[1]]  # no inline script
        assert not [e for e in elements if any(name.startswith("on") for name in e[1])]  # no event handler


class Elements(HTMLParser):
    """Every start tag of a page with its attributes, as a browser's parser sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, dict(attrs)))

    @classmethod
    def of(cls, html: str) -> list[tuple[str, dict[str, str | None]]]:
        parser = cls()
        parser.feed(html)
        return parser.found


def test_filter_by_user_host_or_model_and_free_only(tmp_path: Path) -> None:
    snapshot = fleet(Clock()).snapshot()
    limits = FreeGpuConfig()

    def shown(query: str) -> list[tuple[str, int]]:
        view = page_view(snapshot, limits, Query.parse(query))
        return [(h.name, g.index) for h in view.hosts for g in h.gpus]

    assert shown("") == [("gpu-a", 0), ("gpu-f", 0), ("gpu-m", 0)]
    assert shown("q=alice") == [("gpu-a", 0)]
    assert shown("q=BOB") == [("gpu-m", 0)]  # case does not matter
    assert shown("q=gpu-f") == [("gpu-f", 0)]
    assert shown("q=h100+alice") == [("gpu-a", 0)]  # every word must match
    assert shown("free=1") == [("gpu-f", 0)]
    assert shown("q=alice&free=1") == []
    assert page_view(snapshot, limits, Query.parse("q=alice&free=1")).empty == "no GPU matches the filter"
    view = page_view(snapshot, limits, Query.parse("q=gpu-d"))
    assert [p.name for p in view.problems] == ["gpu-d"] and view.shown == "showing 0 of 3 GPUs"
    # kept in the URL: the page renders the filter it was given, so a shared link shows the same
    html = call(app_for(fleet(Clock()), tmp_path), "/?q=alice&free=1")[2].decode()
    assert 'value="alice"' in html and 'value="1" checked' in html


def test_down_and_stale_hosts_say_why_and_since_when(tmp_path: Path) -> None:
    clock = Clock()
    state = fleet(clock)
    clock.step(60)
    state.update(HostSnapshot.failed("gpu-d", "gpu-d", HostErrorKind.UNREACHABLE, "connection refused again"))
    clock.step(130)  # gpu-f, gpu-m: 190 s old, past 3 x 60 s
    for name in ("gpu-a", "gpu-d"):
        state.update(
            busy_host() if name == "gpu-a" else HostSnapshot.failed(name, name, HostErrorKind.UNREACHABLE, "x")
        )
    view = page_view(state.snapshot(), FreeGpuConfig(), Query())
    problems = {p.name: p for p in view.problems}
    assert problems["gpu-d"].state == "down" and problems["gpu-d"].since_ts == T0.timestamp()  # its first failure
    assert problems["gpu-f"].state == "stale" and problems["gpu-f"].reason == "no new result for 3m10s (last: 1 GPU)"
    assert [h.name for h in view.hosts] == ["gpu-a"]  # stale GPUs are never shown as current, nor free


# ---------------------------------------------------------------- the API and /healthz


def test_the_snapshot_api_is_the_status_json_document(tmp_path: Path) -> None:
    clock = Clock()
    state = fleet(clock)
    app = app_for(state, tmp_path)
    status, headers, body = call(app, "/api/v1/snapshot")
    assert status == 200 and headers["Content-Type"] == "application/json; charset=utf-8"
    doc = json.loads(body)
    assert doc == snapshot_dict(state.snapshot(), FreeGpuConfig())
    assert doc["summary"] == {"hosts": 4, "hosts_down": 1, "hosts_stale": 0, "gpus": 3, "free_gpus": 1}
    assert [g["free"] for h in doc["hosts"] for g in h["gpus"]] == [False, True, False]
    down = doc["hosts"][3]
    assert down["failing_since"] == "2026-11-28T10:00:00+00:00" and down["last_ok_at"] is None


def test_the_alerts_api_is_the_alerts_json_document(tmp_path: Path) -> None:
    db = open_db(tmp_path / "state")
    since = T0.timestamp()
    record = AlertRecord(
        AlertKey("max_gpus_per_user", "gpu-a", user="alice"), "firing", since, value=3, threshold=2, unit="GPUs"
    )
    AlertStore(db).save({record.key.id: record}, AlertStore(db).memory())
    AlertStore(db).add_silence(ends_at=4e9, comment="agreed", now=since, user="alice")
    Outbox(db).add("feishu", "GPU alerts", [{"text": "x"}, {"text": "y"}])
    db.close()
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(f"hosts: [gpu-a]\nstate_dir: {tmp_path / 'state'}\n")
    out = io.StringIO()
    assert main(["alerts", "--json", "-c", str(cfg_file)], out=out) == 0
    store = StoreReader(tmp_path / "state")
    app = app_for(fleet(Clock()), tmp_path, store)
    status, _, body = call(app, "/api/v1/alerts")
    assert status == 200
    assert json.loads(body) == json.loads(out.getvalue())
    assert json.loads(body)["alerts"][0]["silenced_by"] == [1]
    store.close()


def test_healthz_is_503_with_the_reason_when_no_host_was_polled_for_three_intervals(tmp_path: Path) -> None:
    clock = Clock()
    state = FleetState([("gpu-a", "gpu-a")], poll_every=60, now=clock)
    app = app_for(state, tmp_path)
    status, _, body = call(app, "/healthz")
    assert (status, body) == (200, b"starting: no result yet (0s since start)\n")
    clock.step(181)
    status, _, body = call(app, "/healthz")
    assert status == 503 and body == b"no host has been polled since start, 3m1s ago (3 polls)\n"
    state.update(busy_host())
    assert call(app, "/healthz")[:2][0] == 200
    assert call(app, "/healthz")[2] == b"ok: 1 of 1 host answered; newest result 0s ago\n"
    clock.step(200)
    status, _, body = call(app, "/healthz")
    assert status == 503 and body == b"no host has been polled for 3m20s (3 poll intervals of 1m)\n"


def test_only_get_and_head_unknown_paths_404_and_a_base_path(tmp_path: Path) -> None:
    app = app_for(fleet(Clock()), tmp_path, base_path="/gpuwatch/")
    assert call(app, "/", "POST")[0] == 405 and call(app, "/", "POST")[1]["Allow"] == "GET, HEAD"
    assert call(app, "/api/v1/snapshot", "DELETE")[0] == 405
    assert call(app, "/nope")[0] == 404 and call(app, "/gpuwatch/nope")[0] == 404
    assert call(app, "/static/../web.py")[0] == 404
    status, headers, body = call(app, "/gpuwatch/", "HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 1000
    html = call(app, "/gpuwatch/")[2].decode()
    assert 'href="/gpuwatch/static/gpuwatch.css?v=' in html and 'data-base="/gpuwatch"' in html
    assert call(app, "/api/v1/snapshot")[0] == 200  # behind a proxy that strips the prefix too
    css = call(app, "/gpuwatch/static/gpuwatch.css")
    assert css[0] == 200 and css[1]["Content-Type"].startswith("text/css")


def test_the_fragment_answers_304_until_something_changes(tmp_path: Path) -> None:
    clock = Clock()
    state = fleet(clock)
    app = app_for(state, tmp_path)
    status, headers, _ = call(app, "/fragment")
    etag = headers["ETag"]
    assert status == 200
    assert call(app, "/fragment", If_None_Match=etag)[0] == 304
    assert call(app, "/fragment?q=alice", If_None_Match=etag)[0] == 200  # another filter, another answer
    state.update(busy_host())
    assert call(app, "/fragment", If_None_Match=etag)[0] == 200


def test_basic_auth_guards_everything_but_healthz_and_no_secret_is_ever_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUWATCH_WEB_PASSWORD", "s3cret-pass")
    app = app_for(fleet(Clock()), tmp_path, auth={"user": "lab", "password_env": "GPUWATCH_WEB_PASSWORD"})

    def basic(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    for path in ("/", "/api/v1/snapshot", "/metrics", "/fragment", "/static/gpuwatch.js"):
        status, headers, _ = call(app, path)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic realm=")
        assert call(app, path, Authorization=basic("lab", "wrong"))[0] == 401
        assert call(app, path, Authorization=basic("other", "s3cret-pass"))[0] == 401
        status, _, body = call(app, path, Authorization=basic("lab", "s3cret-pass"))
        assert status == 200 and b"s3cret-pass" not in body and b"GPUWATCH_WEB_PASSWORD" not in body
    assert call(app, "/healthz")[0] == 200  # for uptime checkers
    assert call(app, "/", Authorization="Basic !!!")[0] == 401
    monkeypatch.delenv("GPUWATCH_WEB_PASSWORD")
    with pytest.raises(ValueError, match=r"web.auth.password_env: \$GPUWATCH_WEB_PASSWORD is not set"):
        app_for(fleet(Clock()), tmp_path, auth={"user": "lab", "password_env": "GPUWATCH_WEB_PASSWORD"})


def test_the_whole_page_of_100_hosts_with_8_gpus_stays_under_150_kb(tmp_path: Path) -> None:
    names = [f"node-{i:03d}" for i in range(100)]
    state = FleetState([(n, n) for n in names], poll_every=60)
    busy, idle = busy_host(), host("x", H100_IDLE)
    for n in names:
        gpus = tuple(g.__class__(**{**g.__dict__, "index": i}) for i, g in enumerate([*busy.gpus * 4, *idle.gpus * 4]))
        state.update(HostSnapshot(n, n, ok=True, gpus=gpus, processes=busy.processes))
    app = app_for(state, tmp_path)
    sizes = []
    for path in ("/", "/static/gpuwatch.css", "/static/gpuwatch.js"):
        environ_headers = {"Accept_Encoding": "gzip"}
        status, headers, _ = call(app, path, **environ_headers)
        assert status == 200
        sizes.append(int(headers["Content-Length"]))
    assert sum(sizes) < 150_000, sizes


# ---------------------------------------------------------------- /metrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def test_metrics_in_base_units_with_no_sample_for_an_unknown_value(tmp_path: Path) -> None:
    clock = Clock()
    state = fleet(clock)
    state.update(HostSnapshot.failed("gpu-d", "gpu-d", HostErrorKind.UNREACHABLE, "refused"))
    state.update(HostSnapshot.failed("gpu-d", "gpu-d", HostErrorKind.AUTH_FAILED, "denied"))
    status, headers, body = call(app_for(state, tmp_path), "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    found = samples(body.decode())
    a0 = (("gpu", "0"), ("host", "gpu-a"), ("model", "NVIDIA H100 80GB HBM3"))
    uuid = next(g.uuid for g in busy_host().gpus)
    a0 = tuple(sorted((*a0, ("uuid", uuid or ""))))
    assert found[("gpuwatch_gpu_memory_used_bytes", a0)] == 19818 * MIB
    assert found[("gpuwatch_gpu_memory_total_bytes", a0)] == 81559 * MIB
    assert found[("gpuwatch_gpu_utilization_ratio", a0)] == 1.0
    assert found[("gpuwatch_gpu_temperature_celsius", a0)] == 59
    assert found[("gpuwatch_host_up", (("host", "gpu-a"),))] == 1
    assert found[("gpuwatch_host_up", (("host", "gpu-d"),))] == 0
    assert found[("gpuwatch_host_probe_duration_seconds", (("host", "gpu-a"),))] == 0.31
    assert found[("gpuwatch_host_last_success_timestamp_seconds", (("host", "gpu-a"),))] == T0.timestamp()
    assert found[("gpuwatch_user_gpu_memory_bytes", (("gpu", "0"), ("host", "gpu-a"), ("user", "alice")))] == 2566 * MIB
    assert found[("gpuwatch_user_gpus", (("host", "gpu-a"), ("user", "alice")))] == 1
    assert found[("gpuwatch_user_gpus", (("host", "gpu-a"), ("user", "N/A")))] == 1  # ps could not see 11345
    assert found[("gpuwatch_probe_errors_total", (("host", "gpu-d"), ("kind", "unreachable")))] == 2
    assert found[("gpuwatch_probe_errors_total", (("host", "gpu-d"), ("kind", "auth_failed")))] == 1
    mig_util = [k for k in found if k[0] == "gpuwatch_gpu_utilization_ratio" and ("host", "gpu-m") in k[1]]
    assert mig_util == []  # MIG mode: utilization unknown, so no sample (never 0)
    assert not [k for k in found if ("host", "gpu-d") in k[1] and k[0].startswith("gpuwatch_gpu_")]


def test_metrics_read_the_alert_state_and_outbox_and_register_nothing_globally(tmp_path: Path) -> None:
    db = open_db(tmp_path / "state")
    record = AlertRecord(AlertKey("host_down", "gpu-d"), "firing", T0.timestamp(), value=3, threshold=3, unit="polls")
    pending = AlertRecord(AlertKey("host_down", "gpu-x"), "pending", T0.timestamp(), value=1, threshold=3, unit="polls")
    AlertStore(db).save({record.key.id: record, pending.key.id: pending}, AlertStore(db).memory())
    Outbox(db).add("email", "GPU alerts", [{"text": "x"}])
    db.close()
    cfg = parse_config(
        {
            "hosts": ["gpu-a"],
            "state_dir": str(tmp_path / "state"),
            "email": {"to": ["a@example.com"], "from": "g@example.com", "smtp_host": "localhost"},
        }
    )
    store = StoreReader(tmp_path / "state")
    registry = build_registry(fleet(Clock()), lambda: cfg, store)
    found = samples(prometheus_client.generate_latest(registry).decode())
    assert found[("gpuwatch_alerts_firing", (("rule", "host_down"),))] == 1
    assert found[("gpuwatch_alerts_firing", (("rule", "gpu_error"),))] == 0  # every rule switched on has a series
    assert found[("gpuwatch_outbox_messages", (("channel", "email"),))] == 1
    store.close()
    assert not [m for m in prometheus_client.REGISTRY.collect() if m.name.startswith("gpuwatch")]


def test_a_notice_only_rule_never_shows_as_an_alert_series(tmp_path: Path) -> None:
    """host_rebooted, driver_changed and gpu_freed send notices, never alerts: switched on, they have
    no gpuwatch_alerts_firing series (an always-zero one would say they could fire)."""
    open_db(tmp_path / "state").close()
    alerts = {"host_down": {"after": 3}, "host_rebooted": True, "driver_changed": True, "gpu_freed": {"users": ["al"]}}
    cfg = parse_config({"hosts": ["gpu-a"], "state_dir": str(tmp_path / "state"), "alerts": alerts})
    store = StoreReader(tmp_path / "state")
    found = samples(prometheus_client.generate_latest(build_registry(fleet(Clock()), lambda: cfg, store)).decode())
    store.close()
    series = sorted(dict(labels)["rule"] for name, labels in found if name == "gpuwatch_alerts_firing")
    assert series == ["host_down"]
    notice_only = sorted(r.name for r in RULES if not r.announces.alerts)
    assert notice_only == ["driver_changed", "gpu_freed", "host_rebooted"]


# ---------------------------------------------------------------- config


def test_the_web_section() -> None:
    def web(**section: Any) -> WebConfig | None:
        return parse_config({"hosts": ["a"], "web": section or None}).web

    assert web() == WebConfig()  # present, even empty: the defaults
    assert parse_config({"hosts": ["a"]}).web is None  # absent: the daemon serves nothing
    got = web(listen="0.0.0.0:9000", base_path="/gpus/", public_url="https://gpu.lab.example/gpus/")
    assert got is not None and (got.host, got.port, got.base_path, got.loopback) == ("0.0.0.0", 9000, "/gpus", False)
    v6 = web(listen="[::1]:8787")
    assert v6 is not None and v6.host == "::1" and v6.loopback and v6.listen == "[::1]:8787"
    for section, message in (
        ({"listen": "somewhere"}, "web.listen: 'somewhere' is not host:port"),
        ({"listen": "127.0.0.1:70000"}, "web.listen (port): 70000 is out of range"),
        ({"base_path": "gpus"}, "web.base_path: 'gpus' must be a path such as /gpuwatch"),
        ({"auth": {"user": "lab"}}, "web.auth: needs 'password_env'"),
        ({"auth": {"user": "lab", "password": "x"}}, "web.auth.password: unknown key"),
        ({"public_url": "gpu.lab"}, "web.public_url: expected an http"),
        ({"port": 1}, "web.port: unknown key"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            web(**section)


# ---------------------------------------------------------------- who: the person behind the process

CGROUP = Path(__file__).parent / "fixtures" / "cgroup"
DOCKER_ID = "9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d"  # docker-v1-systemd-centos.txt


def attributed(snapshot: HostSnapshot, pid: int, capture: str, **facts: Any) -> HostSnapshot:
    """``snapshot`` with process ``pid`` attributed from a real cgroup capture, as a poll does it."""
    lines = tuple((CGROUP / capture).read_text(encoding="utf-8").splitlines())
    procs, issues = attribute_owners(
        snapshot.processes,
        {pid: CgroupRead(lines=lines)},
        facts.get("users", {}),
        facts.get("inspected", {}),
        AttributionSettings(),
    )
    assert not issues
    return replace(snapshot, processes=procs)


def owners_fleet(clock: Clock) -> FleetState:
    """gpu-a: alice's process in a container labelled owner=bob; gpu-m: root runs carol's Slurm job."""
    state = FleetState([(n, n) for n in ("gpu-a", "gpu-m")], poll_every=60, now=clock)
    ps_a = {11327: PsEntry(11327, "alice", 7200, "python3 train.py --bf16")}
    labelled = ContainerInfo(name="train-llm", image="pytorch:24.01", labels={"owner": "bob"})
    gpu_a = attributed(
        host("gpu-a", H100_LOAD, H100_APPS, ps_a),
        11327,
        "docker-v1-systemd-centos.txt",
        inspected={DOCKER_ID: labelled},
    )
    ps_m = {21180: PsEntry(21180, "root", 60, "python3 sweep.py")}
    gpu_m = attributed(
        host("gpu-m", MIG_LOAD, MIG_APPS, ps_m), 21180, "slurm-v1-ex3-slurm21.txt", users={7319: "carol"}
    )
    state.update(gpu_a)
    state.update(gpu_m)
    return state


def test_the_page_names_the_person_behind_a_process_as_status_does_with_the_ps_user_as_detail(
    tmp_path: Path,
) -> None:
    state = owners_fleet(Clock())
    snapshot = state.snapshot()
    procs = {p.pid: p for h in snapshot.hosts for p in h.processes}
    assert (procs[11327].user, procs[11327].owner) == ("alice", "bob")  # the capture really says so
    assert (procs[21180].user, procs[21180].owner) == ("root", "carol")
    view = page_view(snapshot, FreeGpuConfig(), Query())
    shown = {p.key: p for h in view.hosts for g in h.gpus for p in g.processes}
    bob, carol = shown["gpu-a/0/11327"], shown["gpu-m/0/21180"]
    assert (bob.owner, bob.context, bob.ps_user) == ("bob", "docker train-llm, pytorch:24.01", "run as alice")
    assert (carol.owner, carol.context, carol.ps_user) == ("carol", "slurm 748468", "run as root")
    # The same owner and context as status (the fleet table) and the JSON document.
    table = fleet_table(snapshot, FreeGpuConfig())
    assert "bob (docker train-llm, pytorch:24.01)" in table and "carol (slurm 748468)" in table
    assert {p["owner"] for h in snapshot_dict(snapshot)["hosts"] for p in h["processes"] if p["pid"] == 11327} == {
        "bob"
    }

    def found(query: str) -> list[str]:
        return [
            f"{h.name}/{g.index}"
            for h in page_view(snapshot, FreeGpuConfig(), Query.parse(query)).hosts
            for g in h.gpus
        ]

    assert found("q=bob") == ["gpu-a/0"]  # bob's job, run by another account
    assert found("q=carol") == ["gpu-m/0"]
    assert found("q=train-llm") == ["gpu-a/0"] and found("q=748468") == ["gpu-m/0"]  # the context too
    assert found("q=alice") == []  # the ps user is detail, not the owner
    html = call(app_for(state, tmp_path), "/")[2].decode()
    assert '<b class="user">bob</b> <span class="ctx">(docker train-llm, pytorch:24.01)</span>' in html
    assert '<p class="where">bob: docker train-llm, pytorch:24.01; run as alice</p>' in html
    assert 'title="pid 11327, run as alice: python3 train.py --bf16"' in html
    assert '<b class="user">alice</b>' not in html


# ---------------------------------------------------------------- the page for people and walls (issue 19)


def eight_gpu_host(name: str, busy: int = 3) -> HostSnapshot:
    """``busy`` GPUs under load (alice's processes from the real capture) and the rest idle, 8 in all."""
    loaded, idle = busy_host(), host("x", H100_IDLE)
    gpus = [replace(g, index=i) for i, g in enumerate([*loaded.gpus * busy, *idle.gpus * (8 - busy)])]
    procs = tuple(replace(p, gpu_index=i) for i in range(busy) for p in loaded.processes)
    return HostSnapshot(name, name, ok=True, gpus=tuple(gpus), processes=procs, probe_seconds=0.2)


def summary_words(html: str) -> list[str]:
    found = re.search(r'<p class="summary">(.*?)</p>', html)
    assert found is not None
    return re.sub("<[^>]+>", " ", found.group(1)).split()


def test_a_down_hosts_gpus_count_as_unknown_not_gone(tmp_path: Path) -> None:
    clock = Clock()
    state = fleet(clock)
    state.update(eight_gpu_host("gpu-d"))  # gpu-d answers once with 8 GPUs, then goes down
    app = app_for(state, tmp_path)
    assert summary_words(call(app, "/")[2].decode()) == "4 hosts 4 answered 11 GPUs 6 free".split()
    clock.step(60)
    state.update(HostSnapshot.failed("gpu-d", "gpu-d", HostErrorKind.UNREACHABLE, "connection refused"))
    html = call(app, "/")[2].decode()
    assert summary_words(html) == "4 hosts 3 answered 1 down 11 GPUs 1 free 8 unknown (no current data)".split()
    wall = call(app, "/?view=wall")[2].decode()
    tile = wall[wall.index('data-host="gpu-d"') : wall.index("</section>", wall.index('data-host="gpu-d"'))]
    assert tile.count('class="cell unknown"') == 8 and "unreachable" in tile and "connection refused" in tile


def test_waiting_for_the_first_answer_is_no_fault(tmp_path: Path) -> None:
    state = FleetState([(n, n) for n in ("gpu-a", "gpu-b", "gpu-c", "gpu-d")], poll_every=60, now=Clock())
    app = app_for(state, tmp_path)
    html = call(app, "/")[2].decode()
    assert summary_words(html) == "4 hosts waiting for the first answer".split()
    assert 'class="bad"' not in html and "down" not in summary_words(html)
    assert 'class="problems"' not in html  # no red box while every host is only waiting
    assert "Waiting for the first answer from gpu-a, gpu-b, gpu-c, gpu-d." in html
    state.update(busy_host())
    assert summary_words(call(app, "/")[2].decode()) == (
        "4 hosts 1 answered 3 waiting for the first answer 1 GPU 0 free".split()
    )


def test_process_labels_are_the_executables_name() -> None:
    gpu = busy_host().gpus[0]
    proc = GpuProcess(
        pid=7,
        gpu_index=gpu.index,
        gpu_uuid=gpu.uuid,
        user="alice",
        name="/home/alice/my models/with spaces/python3.11",
        command="/home/alice/my models/with spaces/python3.11 train.py --epochs 3",
        used_memory_mib=100,
        runtime_seconds=5,
    )
    snap = HostSnapshot("h", "h", ok=True, gpus=(gpu,), processes=(proc,))
    assert proc_view(snap, proc).name == "python3.11"  # before: "my"
    unnamed = replace(proc, name="", command="/opt/tools/bin/runner --x")
    assert proc_view(snap, unnamed).name == "runner"


def test_memory_held_with_no_process_says_so_and_why(tmp_path: Path) -> None:
    state = FleetState([("gpu-h", "gpu-h")], poll_every=60, now=Clock())
    state.update(replace(busy_host("gpu-h"), processes=()))  # 19818 MiB used, nvidia-smi lists no process
    view = page_view(state.snapshot(), FreeGpuConfig(), Query())
    gpu = view.hosts[0].gpus[0]
    assert (gpu.free, gpu.state) == (False, "held")
    assert gpu.note.startswith("19,818 MiB in use, no process listed") or gpu.note.startswith("19818 MiB in use")
    assert "another container or PID namespace" in gpu.note
    html = call(app_for(state, tmp_path), "/")[2].decode()
    assert 'class="gpu held"' in html and "MEMORY HELD" in html and "another container or PID namespace" in html
    assert "HELD" in call(app_for(state, tmp_path), "/?view=wall")[2].decode()
    state.update(replace(busy_host("gpu-h"), processes=(), gpus=(replace(busy_host().gpus[0], memory_used_mib=3),)))
    assert page_view(state.snapshot(), FreeGpuConfig(), Query()).hosts[0].gpus[0].state == "busy"  # 3 MiB: not held
    # a process ps could not see says why, too
    shown = page_view(fleet(Clock()).snapshot(), FreeGpuConfig(), Query())
    unseen = next(p for h in shown.hosts for g in h.gpus for p in g.processes if p.owner.startswith("pid 11345"))
    assert "another PID namespace" in unseen.context


def test_model_names_once_per_host() -> None:
    state = FleetState([("big", "big")], poll_every=60, now=Clock())
    state.update(eight_gpu_host("big"))
    view = page_view(state.snapshot(), FreeGpuConfig(), Query())
    assert view.hosts[0].models == "8 × NVIDIA H100 80GB HBM3"
    app = WebApp(state, lambda: parse_config({"hosts": ["big"]}), WebConfig())
    for path in ("/", "/?view=wall"):
        html = call(app, path)[2].decode()
        assert html.count("NVIDIA H100 80GB HBM3") == 1, path


def test_the_per_person_summary_names_container_and_slurm_owners(tmp_path: Path) -> None:
    view = page_view(owners_fleet(Clock()).snapshot(), FreeGpuConfig(), Query())
    people = {p.name: p for p in view.people}
    assert set(people) == {"bob", "carol", "owner unknown"}  # the owners, not the ps users alice and root
    assert list(people)[-1] == "owner unknown" and "another PID namespace" in people["owner unknown"].where
    assert (people["bob"].gpus, people["bob"].hosts) == (1, "gpu-a")
    assert people["bob"].where == "docker train-llm, pytorch:24.01" and people["carol"].where == "slurm 748468"
    state = FleetState([("gpu-a", "gpu-a"), ("gpu-b", "gpu-b")], poll_every=60, now=Clock())
    state.update(eight_gpu_host("gpu-a", busy=3))
    state.update(eight_gpu_host("gpu-b", busy=2))
    view = page_view(state.snapshot(), FreeGpuConfig(), Query())
    rows = [(p.name, p.gpus, p.memory, p.hosts) for p in view.people]
    # per GPU: alice 2566 MiB, verylongusername 2566 MiB (the capture), pid 11345 unseen
    assert rows[0] == ("alice", 5, f"{5 * 2566 / 1024:.1f} GiB", "gpu-a, gpu-b")
    assert rows[-1][0] == "owner unknown" and rows[-1][1] == 5
    html = call(app_for(state, tmp_path), "/")[2].decode()
    assert 'id="people"' in html and '<th scope="row" class="user" title="">alice</th><td class="n">5</td>' in html
    assert 'id="people"' in call(app_for(state, tmp_path), "/?view=wall")[2].decode()


def test_sorts_free_first_by_memory_and_by_host_kept_in_the_url(tmp_path: Path) -> None:
    names = ["node-10", "node-2", "node-1"]
    state = FleetState([(n, n) for n in names], poll_every=60, now=Clock())
    state.update(eight_gpu_host("node-10", busy=8))
    state.update(eight_gpu_host("node-2", busy=2))
    state.update(eight_gpu_host("node-1", busy=5))
    snapshot = state.snapshot()

    def order(query: str) -> list[str]:
        return [h.name for h in page_view(snapshot, FreeGpuConfig(), Query.parse(query)).hosts]

    assert order("") == names  # the config's order
    assert order("sort=host") == ["node-1", "node-2", "node-10"]  # natural order
    assert order("sort=free") == ["node-2", "node-1", "node-10"]  # most free GPUs first
    assert order("sort=memory")[-1] == "node-10"  # the host with the least memory free last
    assert order("sort=bogus") == names
    first = page_view(snapshot, FreeGpuConfig(), Query.parse("sort=free")).hosts[1]
    assert [g.free for g in first.gpus] == [True] * 3 + [False] * 5  # free GPUs first within a host
    memory = page_view(snapshot, FreeGpuConfig(), Query.parse("sort=memory")).hosts[0]
    assert [g.memory_free_mib for g in memory.gpus] == sorted((g.memory_free_mib for g in memory.gpus), reverse=True)
    assert Query.parse("q=a&sort=free&view=wall").url_query() == "?q=a&sort=free&view=wall"
    html = call(app_for(state, tmp_path), "/?sort=memory&view=wall")[2].decode()
    assert '<option value="memory" selected>' in html and 'id="view" value="wall"' in html
    assert 'id="viewlink" href="/?sort=memory&amp;view=list"' in html  # the other view keeps the sort
    assert html.index('data-host="node-2"') < html.index('data-host="node-10"')


def test_the_wall_view_by_url_and_as_the_default_setting(tmp_path: Path) -> None:
    state = fleet(Clock())
    html = call(app_for(state, tmp_path), "/?view=wall")[2].decode()
    assert 'class="view-wall"' in html and 'class="tiles"' in html and '<section class="host"' not in html
    assert [m for m in re.findall(r'data-host="([^"]+)"', html)] == ["gpu-a", "gpu-f", "gpu-m", "gpu-d"]
    assert html.count('class="cell free"') == 1 and "FREE" in html
    kiosk = app_for(state, tmp_path, view="wall")
    assert 'class="view-wall"' in call(kiosk, "/")[2].decode()
    assert 'class="tiles"' in call(kiosk, "/fragment")[2].decode()  # refreshes as the wall
    assert 'class="view-list"' in call(kiosk, "/?view=list")[2].decode()
    assert call(kiosk, "/fragment?view=list")[2].decode().count('<section class="host"') == 3
    with pytest.raises(ConfigError, match=re.escape("web.view: 'kiosk' is not one of list, wall")):
        config(tmp_path, view="kiosk")


def firing_store(tmp_path: Path, silence: bool = False, ack: bool = False) -> StoreReader:
    db = open_db(tmp_path / "state")
    since = T0.timestamp()
    firing = AlertRecord(
        AlertKey("max_gpus_per_user", "gpu-a", user="alice"),
        "firing",
        since,
        value=3,
        threshold=2,
        unit="GPUs",
        fired_at=since,
    )
    pending = AlertRecord(AlertKey("host_down", "gpu-x"), "pending", since, value=1, threshold=3, unit="polls")
    AlertStore(db).save({firing.key.id: firing, pending.key.id: pending}, AlertStore(db).memory())
    if silence:
        AlertStore(db).add_silence(ends_at=4e9, comment="agreed", now=since, user="alice")
    if ack:
        AlertStore(db).add_ack(alerts={firing.key.id: since}, now=since, comment="on it <b>", author="bob")
    db.close()
    return StoreReader(tmp_path / "state")


def test_the_alerts_panel_lists_what_is_firing(tmp_path: Path) -> None:
    store = firing_store(tmp_path)
    app = app_for(fleet(Clock()), tmp_path, store)
    for path in ("/", "/?view=wall", "/fragment"):
        html = call(app, path)[2].decode()
        panel = html[html.index('<section class="alerts"') : html.index("</section>", html.index('class="alerts"'))]
        assert "1 alert firing" in panel and "max_gpus_per_user" in panel
        assert "alice holds 3 GPUs on gpu-a" in panel and "gpu-x" not in panel  # pending is not firing
    _, headers, _ = call(app, "/fragment")
    store.close()
    muted = firing_store(tmp_path / "2", silence=True)
    app = app_for(fleet(Clock()), tmp_path / "2", muted)
    assert "since <time" in call(app, "/")[2].decode() and ", silenced</span>" in call(app, "/")[2].decode()
    assert call(app, "/fragment", If_None_Match=headers["ETag"])[0] == 200
    muted.close()
    open_db(tmp_path / "3" / "state").close()
    empty = StoreReader(tmp_path / "3" / "state")
    assert "No alert firing." in call(app_for(fleet(Clock()), tmp_path / "3", empty), "/")[2].decode()
    empty.close()
    assert 'id="alerts"' not in call(app_for(fleet(Clock()), tmp_path), "/")[2].decode()  # no alert state here


def test_the_alerts_panel_says_who_acknowledged_an_alert(tmp_path: Path) -> None:
    """gpuwatch ack shows on the page beside the alert it acknowledged, its comment as text."""
    store = firing_store(tmp_path, ack=True)
    html = call(app_for(fleet(Clock()), tmp_path, store), "/")[2].decode()
    store.close()
    panel = html[html.index('<section class="alerts"') : html.index("</section>", html.index('class="alerts"'))]
    assert '<span class="ack">acknowledged by bob: on it &lt;b&gt;</span>' in panel
    plain = firing_store(tmp_path / "2")
    assert 'class="ack"' not in call(app_for(fleet(Clock()), tmp_path / "2", plain), "/")[2].decode()
    plain.close()


def test_gpuwatch_gpu_free_has_the_pages_meaning_of_free(tmp_path: Path) -> None:
    state = fleet(Clock())
    state.update(replace(busy_host("gpu-h"), name="gpu-m", processes=()))  # memory held, no process: not free
    app = app_for(state, tmp_path)
    body = call(app, "/metrics")[2]
    found = samples(body.decode())
    free = {dict(k[1])["host"]: v for k, v in found.items() if k[0] == "gpuwatch_gpu_free"}
    page = page_view(state.snapshot(), FreeGpuConfig(), Query())
    assert free == {h.name: float(g.free) for h in page.hosts for g in h.gpus}
    assert free == {"gpu-a": 0.0, "gpu-f": 1.0, "gpu-m": 0.0}  # gpu-d is down: no sample
    promtool = shutil.which("promtool")
    if promtool:
        check = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30)
        assert check.returncode == 0, (check.stdout + check.stderr).decode()


def test_the_demo_page_says_it_is_a_demo(tmp_path: Path) -> None:
    cfg = demo_config(tmp_path / "state", "127.0.0.1:0", 2.0)
    assert cfg.web is not None and cfg.web.demo
    html = call(WebApp(fleet(Clock()), lambda: cfg, cfg.web), "/")[2].decode()
    assert "<title>Demo · GPUs · gpuwatch</title>" in html
    assert '<p class="demo" id="demo"><b>Demo:</b> an invented fleet' in html
    assert 'id="demo"' not in call(app_for(fleet(Clock()), tmp_path), "/")[2].decode()


def test_the_wall_lists_at_most_a_screenful_of_alerts_and_people() -> None:
    state = FleetState([("gpu-a", "gpu-a")], poll_every=60, now=Clock())
    state.update(busy_host())
    alerts = tuple(
        AlertView("gpu_temperature", f"h{i}", f"h{i} GPU 0 at 91°C", "10:00", T0.timestamp(), "5m ago", "")
        for i in range(9)
    )
    app = WebApp(state, lambda: parse_config({"hosts": ["gpu-a"]}), WebConfig())
    view = page_view(state.snapshot(), FreeGpuConfig(), Query(view="wall"), alerts=alerts, alerts_known=True)
    html = app.templates.get_template("wall.html").render(view=view, base="")
    assert "9 alerts firing" in html and html.count('class="alert"') == 6 and "and 3 more" in html
    listed = replace(view, view="list")
    assert app.templates.get_template("fleet.html").render(view=listed, base="").count('class="alert"') == 9


def test_a_cgroup_that_told_nothing_is_no_place_in_the_per_person_summary() -> None:
    state = FleetState([("gpu-a", "gpu-a")], poll_every=60, now=Clock())
    snap = busy_host()
    state.update(replace(snap, processes=tuple(replace(p, cgroup_note="unreadable") for p in snap.processes)))
    people = {p.name: p for p in page_view(state.snapshot(), FreeGpuConfig(), Query()).people}
    assert people["alice"].where == ""
