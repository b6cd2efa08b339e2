"""GPU bookings (``gpuwatch reserve``) with an explicit clock: reading what people type, overlaps,
the store, a booked GPU free for no one else in every view, and the rule reservation_conflict."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from builders import DAY, HOUR, T0, Engine, Job, alerts_config, cli, h100_host, write_config
from gpuwatch.cli import _only_reads, build_parser
from gpuwatch.config import FreeGpuConfig
from gpuwatch.metrics import fleet_metrics
from gpuwatch.model import FleetSnapshot, HostSnapshot, Reservation
from gpuwatch.pageview import Query, page_view
from gpuwatch.render import fleet_table, snapshot_dict
from gpuwatch.report import alert_message, free_report, overview
from gpuwatch.reservation import (
    booking_state,
    gpu_ranges,
    in_force,
    overlapping,
    parse_gpus,
    parse_time,
    reservations_dict,
    with_reservations,
)
from gpuwatch.store import DB_NAME, AlertStore, Overlap, ReservationStore, open_db, open_db_readonly
from gpuwatch.store.db import _MIGRATIONS
from gpuwatch.summary import free_gpus, gpu_free, reserved_idle, totals

CST = timezone(timedelta(hours=8), "CST")
FREE = FreeGpuConfig()


def booking(
    rid: int = 1,
    user: str = "bob",
    host: str = "gpu03",
    gpus: tuple[int, ...] = (0, 1),
    starts_at: float = T0,
    ends_at: float = T0 + DAY,
    comment: str = "",
) -> Reservation:
    return Reservation(rid, user, host, gpus, starts_at, ends_at, comment, "admin", T0 - HOUR)


def fleet_at(now: float, *hosts: HostSnapshot) -> FleetSnapshot:
    return FleetSnapshot(taken_at=datetime.fromtimestamp(now, timezone.utc), hosts=hosts)


# ---------------------------------------------------------------- what people type


@pytest.mark.parametrize(
    ("text", "gpus"),
    [("0-3", (0, 1, 2, 3)), ("0,2,5", (0, 2, 5)), ("1-2,5", (1, 2, 5)), (" 3 ", (3,)), ("2,1,2", (1, 2))],
)
def test_gpu_lists_are_read_as_ranges_and_indices(text: str, gpus: tuple[int, ...]) -> None:
    assert parse_gpus(text) == gpus


@pytest.mark.parametrize(
    ("text", "says"),
    [("3-1", "from the lower index"), ("a", "not a list of GPU indices"), ("", "not a list"), ("0-5000", "up to")],
)
def test_a_bad_gpu_list_is_refused_in_words(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_gpus(text)


def test_gpu_ranges_say_runs_as_ranges() -> None:
    assert gpu_ranges([5, 0, 1, 2, 3]) == "0-3, 5"


def test_times_are_local_unless_they_carry_an_offset() -> None:
    nine = datetime(2026, 12, 1, 9, 0, tzinfo=CST).timestamp()
    assert parse_time("2026-12-01 09:00", CST) == nine
    assert parse_time("2026-12-01T09:00:00", CST) == nine
    assert parse_time("2026-12-01  09:00", CST) == nine
    assert parse_time("2026-12-01", CST) == datetime(2026, 12, 1, tzinfo=CST).timestamp()
    assert parse_time("2026-12-01T01:00+00:00", CST) == nine


@pytest.mark.parametrize("text", ["tomorrow", "2026-13-01 09:00", "09:00", "2026-12-01 25:00"])
def test_a_bad_time_is_refused_naming_the_forms_it_takes(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a time; give one as '2026-12-01 09:00'"):
        parse_time(text, CST)


# ---------------------------------------------------------------- overlaps and what is in force


def test_bookings_overlap_only_on_the_same_gpu_of_the_same_host_at_the_same_time() -> None:
    existing = [booking(1, gpus=(0, 1)), booking(2, host="gpu04", gpus=(2,))]
    assert overlapping(existing, "gpu03", (1, 2), T0 + HOUR, T0 + 2 * HOUR) == [existing[0]]
    assert overlapping(existing, "gpu03", (2, 3), T0, T0 + DAY) == []  # other GPUs
    assert overlapping(existing, "gpu04", (0,), T0, T0 + DAY) == []  # other host, other GPU
    assert overlapping(existing, "gpu03", (0,), T0 + DAY, T0 + 2 * DAY) == []  # starts as the other ends
    assert overlapping(existing, "gpu03", (0,), T0 - DAY, T0) == []  # ends as the other starts
    assert overlapping(existing, "gpu03", (0,), T0 - DAY, T0 + 1) == [existing[0]]


def test_a_booking_is_in_force_from_its_start_until_just_before_its_end() -> None:
    b = booking()
    assert [booking_state(b, t) for t in (T0 - 1, T0, T0 + DAY - 1, T0 + DAY)] == [
        "future",
        "in force",
        "in force",
        "past",
    ]
    assert in_force([b, booking(2, starts_at=T0 + DAY, ends_at=T0 + 2 * DAY)], T0) == (b,)


# ---------------------------------------------------------------- free for no one else


def test_a_booked_idle_gpu_is_reserved_not_free_while_the_booking_is_in_force() -> None:
    gpu03 = h100_host("gpu03", [Job("alice", 4102, 2)])  # GPU 0, 1, 3 idle; alice on 2
    b = booking(gpus=(0, 1))
    before = with_reservations(fleet_at(T0 - 1, gpu03), [b]).hosts[0]
    during = with_reservations(fleet_at(T0 + HOUR, gpu03), [b]).hosts[0]
    after = with_reservations(fleet_at(T0 + DAY, gpu03), [b]).hosts[0]
    assert [g.index for g in free_gpus(before, FREE)] == [0, 1, 3]
    assert [g.index for g in free_gpus(during, FREE)] == [3]
    assert [g.index for g in free_gpus(after, FREE)] == [0, 1, 3]
    assert during.reservations == (b,) and before.reservations == () == after.reservations
    assert [(g.index, r.id) for g, r in reserved_idle(during, FREE)] == [(0, 1), (1, 1)]
    assert not gpu_free(during, during.gpus[0], FREE)
    assert totals(with_reservations(fleet_at(T0 + HOUR, gpu03), [b]), FREE).free_gpus == 1


def test_the_free_report_shows_a_booked_idle_gpu_as_reserved() -> None:
    gpu03 = h100_host("gpu03", [Job("alice", 4102, 2)])
    message = free_report(with_reservations(fleet_at(T0, gpu03), [booking(gpus=(0, 1))]), FREE)
    text = message.text
    assert message.title.endswith(": 1 of 4")
    assert "gpu03: 1 free of 4 NVIDIA H100 80GB HBM3: GPU 3 (0/81559 MiB)" in text
    assert "GPU 0 is idle but reserved for bob until 2027-01-16 08:00 UTC" in text
    rows = [row.cells for section in message.body.sections for row in section.rows] if message.body else []
    assert ("0", "H100 80GB HBM3", "idle, reserved for bob until 2027-01-16 08:00 UTC") in rows


def test_with_every_idle_gpu_booked_the_free_report_says_none_is_free_and_lists_them() -> None:
    gpu03 = h100_host("gpu03", n_gpus=2)
    text = free_report(with_reservations(fleet_at(T0, gpu03), [booking(gpus=(0, 1))]), FREE).text
    assert "\n\nNo GPU is free right now.\n\ngpu03: 0 free of 2\n" in text
    assert "gpu03: 0 free of 2\n    GPU 0 is idle but reserved for bob" in text


def test_status_json_page_overview_and_metrics_say_reserved() -> None:
    gpu03 = h100_host("gpu03", [Job("alice", 4102, 2)])
    snapshot = with_reservations(fleet_at(T0, gpu03), [booking(gpus=(0, 2), comment="paper deadline")])
    doc = snapshot_dict(snapshot, FREE)
    gpus = doc["hosts"][0]["gpus"]
    assert [g["free"] for g in gpus] == [False, True, False, True]
    assert gpus[0]["reserved_for"] == {
        "id": 1,
        "user": "bob",
        "until": "2027-01-16T08:00:00+00:00",
        "comment": "paper deadline",
    }
    assert gpus[1]["reserved_for"] is None and doc["summary"]["free_gpus"] == 2
    table = fleet_table(snapshot, FREE)
    assert "reserved for bob until 2027-01-16 08:00 UTC" in table.splitlines()[1]
    assert "alice" in table.splitlines()[3] and "reserved for bob" in table.splitlines()[3]
    assert "    reserved for bob until" in overview(snapshot, FREE).text
    view = page_view(snapshot, FREE, Query())
    shown = {g.index: g for g in view.hosts[0].gpus}
    assert shown[0].state == "reserved" and not shown[0].free
    assert shown[0].reserved == "reserved for bob until 2027-01-16 08:00 UTC (paper deadline)"
    assert shown[2].state == "busy" and shown[2].reserved.startswith("reserved for bob")
    assert shown[1].state == "free" and shown[1].reserved == ""
    samples = {
        (m.name, s.labels["gpu"]): s.value
        for m in fleet_metrics(snapshot, {}, FREE)
        for s in m.samples
        if "gpu" in s.labels and "user" not in s.labels
    }
    assert samples[("gpuwatch_gpu_free", "0")] == 0.0 and samples[("gpuwatch_gpu_free", "1")] == 1.0
    assert samples[("gpuwatch_gpu_reserved", "0")] == 1.0 and samples[("gpuwatch_gpu_reserved", "1")] == 0.0


def test_the_reservations_document_says_each_bookings_state() -> None:
    doc = reservations_dict([booking(), booking(2, starts_at=T0 + DAY, ends_at=T0 + 2 * DAY)], T0)
    assert doc["now"] == "2027-01-15T08:00:00+00:00"
    assert [(r["id"], r["state"], r["gpus"], r["from"]) for r in doc["reservations"]] == [
        (1, "in force", [0, 1], "2027-01-15T08:00:00+00:00"),
        (2, "future", [0, 1], "2027-01-16T08:00:00+00:00"),
    ]


# ---------------------------------------------------------------- the store


def test_the_store_refuses_an_overlap_naming_the_booking_it_overlaps(tmp_path: Path) -> None:
    db = open_db(tmp_path / "state")
    store = ReservationStore(db)
    first = store.add(user="bob", host="gpu03", gpus=(0, 1, 2, 3), starts_at=T0, ends_at=T0 + DAY, now=T0, comment="c")
    with pytest.raises(Overlap) as refused:
        store.add(user="alice", host="gpu03", gpus=(3, 4), starts_at=T0 + HOUR, ends_at=T0 + 2 * DAY, now=T0)
    assert refused.value.existing == (first,)
    other = store.add(user="alice", host="gpu03", gpus=(4,), starts_at=T0, ends_at=T0 + DAY, now=T0)
    later = store.add(user="alice", host="gpu03", gpus=(3,), starts_at=T0 + DAY, ends_at=T0 + 2 * DAY, now=T0)
    assert store.all() == [first, other, later]
    assert store.current(T0 + DAY) == [later]
    assert store.remove(first.id) and not store.remove(first.id)
    assert store.get(other.id) == other and store.get(first.id) is None
    db.close()


# ---------------------------------------------------------------- the rule


def conflict_engine() -> Engine:
    return Engine(alerts_config(reservation_conflict=True))


def test_someone_else_on_a_booked_gpu_fires_once_and_resolves_when_the_booking_ends() -> None:
    engine = conflict_engine()
    b = booking(gpus=(0, 1, 2))
    alice_on_1 = h100_host("gpu03", [Job("alice", 4101, 1), Job("bob", 4103, 0)])
    for now in (T0 - HOUR, T0, T0 + HOUR):
        transitions = engine.step(now, *with_reservations(fleet_at(now, alice_on_1), [b]).hosts)
        fired = [t for t in transitions if t.kind == "firing"]
        assert len(fired) == (1 if now == T0 else 0)
        if fired:
            record = fired[0].record
            assert record.key.id == "reservation_conflict|gpu03||alice||reservation 1"
            assert record.facts["holder"] == "bob" and record.facts["gpus"] == [1]
    ended = engine.step(T0 + DAY, *with_reservations(fleet_at(T0 + DAY, alice_on_1), [b]).hosts)
    assert [(t.kind, t.record.key.user) for t in ended] == [("resolved", "alice")]


def test_the_conflict_resolves_when_the_other_person_stops() -> None:
    engine = conflict_engine()
    b = booking(gpus=(1,))
    engine.step(T0, *with_reservations(fleet_at(T0, h100_host("gpu03", [Job("alice", 4101, 1)])), [b]).hosts)
    assert engine.firing() == ["reservation_conflict|gpu03||alice||reservation 1"]
    stopped = engine.step(T0 + 60, *with_reservations(fleet_at(T0 + 60, h100_host("gpu03")), [b]).hosts)
    assert [t.kind for t in stopped] == ["resolved"]


def test_the_holder_on_their_own_booking_is_no_conflict() -> None:
    engine = conflict_engine()
    host = h100_host("gpu03", [Job("bob", 4100, 0), Job("bob", 4101, 1)])
    assert engine.step(T0, *with_reservations(fleet_at(T0, host), [booking()]).hosts) == []


def test_the_message_names_both_people_and_mentions_both() -> None:
    engine = conflict_engine()
    host = h100_host("gpu03", [Job("alice", 4101, 1), Job("alice", 4102, 2)])
    transitions = engine.step(T0, *with_reservations(fleet_at(T0, host), [booking(gpus=(0, 1, 2))]).hosts)
    message = alert_message(transitions, [], {"alice": "ou_alice", "bob": "ou_bob", "carol": "ou_c"})
    assert message is not None
    assert "alice runs processes on gpu03 GPU 1-2, reserved for bob until 2027-01-16 08:00 UTC" in message.text
    assert "(reservation #1)" in message.text
    assert set(message.mentions) == {"ou_alice", "ou_bob"}


def test_a_booking_that_starts_while_its_gpus_are_busy_is_a_notice_once() -> None:
    engine = conflict_engine()
    b = booking(gpus=(0, 1), starts_at=T0 + HOUR)
    host = h100_host("gpu03", [Job("alice", 4101, 1)])
    engine.step(T0, *with_reservations(fleet_at(T0, host), [b]).hosts)  # first result: remembered only
    assert engine.notices == []
    engine.step(T0 + HOUR, *with_reservations(fleet_at(T0 + HOUR, host), [b]).hosts)
    assert len(engine.notices) == 1
    notice = engine.notices[0]
    assert notice.users == ("bob", "alice")
    message = alert_message([], engine.notices, {})
    assert message is not None
    assert (
        "bob's reservation #1 of gpu03 GPU 0-1 has started, until 2027-01-16 08:00 UTC, but GPU 1 is still busy "
        "(alice still on it)" in message.text
    )
    engine.step(T0 + 2 * HOUR, *with_reservations(fleet_at(T0 + 2 * HOUR, host), [b]).hosts)
    assert engine.notices == []


def test_a_booking_that_starts_on_idle_gpus_says_nothing() -> None:
    engine = conflict_engine()
    b = booking(gpus=(0, 1), starts_at=T0 + HOUR)
    host = h100_host("gpu03", [Job("alice", 4102, 2)])
    engine.step(T0, *with_reservations(fleet_at(T0, host), [b]).hosts)
    assert engine.step(T0 + HOUR, *with_reservations(fleet_at(T0 + HOUR, host), [b]).hosts) == []
    assert engine.notices == []


def test_gpu_freed_does_not_call_a_booked_gpu_free_and_does_when_the_booking_ends() -> None:
    engine = Engine(alerts_config(gpu_freed={"users": ["carol"]}))
    b = booking(gpus=(1,), ends_at=T0 + 2 * HOUR)
    engine.step(T0, *with_reservations(fleet_at(T0, h100_host("gpu03", [Job("alice", 4101, 1)])), [b]).hosts)
    engine.step(T0 + HOUR, *with_reservations(fleet_at(T0 + HOUR, h100_host("gpu03")), [b]).hosts)
    assert engine.notices == []  # alice stopped, but GPU 1 is bob's now
    engine.step(T0 + 2 * HOUR, *with_reservations(fleet_at(T0 + 2 * HOUR, h100_host("gpu03")), [b]).hosts)
    assert [(n.kind.value, n.gpu) for n in engine.notices] == [("gpu_free", 1)]


# ---------------------------------------------------------------- the command line


def test_reserve_add_list_and_remove(tmp_path: Path) -> None:
    config = write_config(tmp_path, hosts=["gpu03", "gpu04"])
    code, out = cli(
        config,
        "reserve",
        "add",
        "--user",
        "bob",
        "--host",
        "gpu03",
        "--gpus",
        "0-3",
        "--for",
        "48h",
        "--comment",
        "paper",
        "--author",
        "admin",
    )
    assert code == 0 and out.startswith("reservation #1 added: bob: gpu03 GPU 0-3, ") and out.endswith("(paper)\n")
    code, out = cli(
        config,
        "reserve",
        "add",
        "--user",
        "carol",
        "--host",
        "gpu04",
        "--gpus",
        "1",
        "--from",
        "2099-01-01 09:00",
        "--until",
        "2099-01-02 09:00",
    )
    assert code == 0
    code, out = cli(config, "reserve", "list")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[0].startswith("#1 bob: gpu03 GPU 0-3, ") and lines[0].endswith("[in force] by admin (paper)")
    assert lines[1].startswith("#2 carol: gpu04 GPU 1, 2099-01-01 09:00 ") and "[future]" in lines[1]
    code, out = cli(config, "reserve", "list", "--json")
    doc = json.loads(out)
    assert [(r["id"], r["user"], r["state"]) for r in doc["reservations"]] == [
        (1, "bob", "in force"),
        (2, "carol", "future"),
    ]
    code, out = cli(config, "reserve", "remove", "#1", "7")
    assert (
        code == 1
        and out.splitlines()[0].startswith("reservation #1 removed: bob: gpu03")
        and "no reservation #7" in out
    )
    assert [r["id"] for r in json.loads(cli(config, "reserve", "list", "--json")[1])["reservations"]] == [2]


def test_an_overlapping_booking_is_refused_naming_the_one_it_overlaps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, hosts=["gpu03"])
    cli(config, "reserve", "add", "--user", "bob", "--host", "gpu03", "--gpus", "0-3", "--for", "48h")
    capsys.readouterr()
    code, out = cli(config, "reserve", "add", "--user", "alice", "--host", "gpu03", "--gpus", "3,5", "--for", "1h")
    err = capsys.readouterr().err
    assert code == 1 and out == ""
    assert err.startswith("gpuwatch: reserve add: refused: gpu03 GPU 3, 5 overlaps reservation #1 bob: gpu03 GPU 0-3, ")
    assert cli(config, "reserve", "add", "--user", "alice", "--host", "gpu03", "--gpus", "4-5", "--for", "1h")[0] == 0


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (
            ["--host", "gpu3", "--gpus", "0", "--for", "1h"],
            "reserve add --host: 'gpu3' is not a configured host; did you mean 'gpu03'? the hosts are: gpu03, gpu04",
        ),
        (["--host", "nope", "--gpus", "0", "--for", "1h"], "the hosts are: gpu03, gpu04"),
        (["--host", "gpu03", "--gpus", "x", "--for", "1h"], "reserve add --gpus: 'x' is not a list of GPU indices"),
        (
            ["--host", "gpu03", "--gpus", "0", "--from", "soon", "--for", "1h"],
            "reserve add --from: 'soon' is not a time",
        ),
        (["--host", "gpu03", "--gpus", "0", "--until", "later"], "reserve add --until: 'later' is not a time"),
        (["--host", "gpu03", "--gpus", "0", "--for", "0s"], "reserve add --for"),
        (
            ["--host", "gpu03", "--gpus", "0", "--from", "2099-01-02", "--until", "2099-01-01"],
            "reserve add: --until 2099-01-01 00:00 ",
        ),
        (["--host", "gpu03", "--gpus", "0", "--from", "2001-01-01", "--until", "2001-01-02"], "which has passed"),
    ],
)
def test_reserve_add_says_what_is_wrong_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    config = write_config(tmp_path, hosts=["gpu03", "gpu04"])
    code, out = cli(config, "reserve", "add", "--user", "bob", *argv)
    err = capsys.readouterr().err
    assert code == 2 and out == ""
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "state" / "gpuwatch.sqlite3").exists()  # checked before the database is opened


def test_reserve_list_with_no_state_yet_lists_none(tmp_path: Path) -> None:
    config = write_config(tmp_path, hosts=["gpu03"])
    assert cli(config, "reserve", "list") == (0, "no reservations in force or to come\n")


def test_a_user_no_host_has_shown_is_booked_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, hosts=["gpu03"])
    db = open_db(tmp_path / "state")
    AlertStore(db).saw_users(["bob", "alice"], T0)
    db.close()
    code, out = cli(config, "reserve", "add", "--user", "bobb", "--host", "gpu03", "--gpus", "0", "--for", "1h")
    err = capsys.readouterr().err
    assert code == 0 and out.startswith("reservation #1 added: bobb: gpu03 GPU 0, ")
    assert "warning: no host has shown a user 'bobb' yet; did you mean 'bob'? the booking is added anyway" in err
    assert "gpuwatch reserve remove 1" in err
    cli(config, "reserve", "add", "--user", "alice", "--host", "gpu03", "--gpus", "1", "--for", "1h")
    assert "warning" not in capsys.readouterr().err


def test_reserve_list_only_reads() -> None:
    parser = build_parser()
    assert _only_reads("reserve", parser.parse_args(["reserve", "list"]))
    assert not _only_reads("reserve", parser.parse_args(["reserve", "remove", "1"]))


def test_an_older_schema_read_only_has_no_bookings(tmp_path: Path) -> None:
    """A reader (the web page, ``reserve list``) of a file an older gpuwatch left: no bookings yet."""
    state = tmp_path / "state"
    open_db(state).close()
    conn = sqlite3.connect(state / DB_NAME)
    conn.execute("DROP TABLE reservations")
    before = next(i for i, script in enumerate(_MIGRATIONS) if "CREATE TABLE reservations" in script)
    conn.execute(f"PRAGMA user_version = {before}")
    conn.close()
    db = open_db_readonly(state)
    assert ReservationStore(db).all() == [] and ReservationStore(db).get(1) is None
    db.close()
