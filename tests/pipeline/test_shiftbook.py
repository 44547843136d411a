"""Shift summaries and OEE, driven sample by sample through the real device pipeline and SQLite."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from tests.helpers import Line, utc


def run_minutes(line: Line, start: float, minutes: int, status: int = 1, per_minute: int = 0) -> float:
    t = start
    for _ in range(minutes):
        line.sample(t, status, made=per_minute)
        t += 60
    return t


@pytest.mark.parametrize("day,expected_hours", [("2026-03-28", 7), ("2026-10-24", 9)])
def test_night_shift_across_dst_closes_once_at_local_time(tmp_path, day, expected_hours):
    line = Line(tmp_path / "g.db", defect_every=100)
    start = utc(f"{day}T19:30:00")  # 20:30 or 21:30 local: inside shift B
    run_minutes(line, start, 60 * 20)
    shifts = line.shifts()
    ids = [s["shift_id"] for s in shifts]
    assert len(ids) == len(set(ids)), "every shift closes exactly once"
    night = next(s for s in shifts if s["shift_id"] == f"{day}/C")
    assert night["length_s"] == expected_hours * 3600
    assert night["start"].endswith("T21:00:00.000Z" if day.startswith("2026-03") else "T20:00:00.000Z")
    assert night["partial"] is False and night["observed_s"] == expected_hours * 3600
    assert shifts[0]["shift_id"] == f"{day}/B" and shifts[0]["partial"] is True  # joined mid-shift
    line.close()


def test_gateway_down_across_two_boundaries(tmp_path):
    line = Line(tmp_path / "g.db", defect_every=100)
    run_minutes(line, utc("2026-11-24T05:00:00"), 240, per_minute=100)  # 06:00..10:00 local, shift A
    line.close()  # the gateway goes down at 10:00 local, and comes back the next day at 07:00 local
    again = Line(tmp_path / "g.db", defect_every=100)
    again.produced, again.defects = line.produced + 5000, line.defects + 50  # the PLC kept counting
    run_minutes(again, utc("2026-11-25T06:00:00"), 10, per_minute=100)
    shifts = again.shifts()
    assert [s["shift_id"] for s in shifts] == ["2026-11-24/A", "2026-11-24/B", "2026-11-24/C"]
    a, b, c = shifts
    assert a["partial"] is True and a["observed_s"] == 239 * 60 and a["counters"]["produced"] == 239 * 100
    assert b["missed"] is True and c["missed"] is True and b["partial"] is True
    assert b["length_s"] == 8 * 3600
    # The counts made while the gateway was down appear in the shift it came back in.
    counters = [json.loads(m.payload) for m in again.store.fetch(0, 10**6) if m.topic.endswith("/counters")]
    assert counters[-1]["counters"]["produced"]["total"] == again.produced - 100  # the first raw value is the baseline
    assert counters[-1]["counters"]["produced"]["shift_id"] == "2026-11-25/A"
    again.close()


def test_oee_of_a_scripted_shift_matches_the_hand_computation(tmp_path):
    line = Line(tmp_path / "g.db", defect_every=100)
    t = utc("2026-11-24T05:00:00")  # 06:00 local: shift A starts
    script = [(4, 30, 0), (1, 240, 108), (2, 60, 0), (3, 30, 0), (1, 110, 108), (2, 10, 0)]  # 480 minutes
    for status, minutes, per_minute in script:
        # Production during a minute shows in the next sample's raw counter.
        for _ in range(minutes):
            line.sample(t, status)
            t += 60
            for _ in range(per_minute):
                line.produced += 1
                if line.produced % 100 == 0:
                    line.defects += 1
    line.sample(t, 2)  # 14:00 local: shift B begins, A closes
    a = line.shifts()[0]
    # By hand: running 350 min, idle 70, down 30, planned stop 30; 108 pieces per running minute.
    produced = 108 * 350
    defects = produced // 100
    assert (a["total"], a["defect"], a["good"]) == (produced, defects, produced - defects)
    assert a["state_s"] == {"running": 350 * 60, "idle": 70 * 60, "down": 30 * 60, "planned_stop": 30 * 60,
                            "unknown": 0}
    availability = 350 / (480 - 30)
    performance = produced / (120 * 350)
    quality = (produced - defects) / produced
    assert a["availability"] == round(availability, 4)
    assert a["performance"] == round(performance, 4) == 0.9
    assert a["quality_rate"] == round(quality, 4) == 0.99
    assert a["oee"] == round(availability * performance * quality, 4) == 0.693
    assert a["partial"] is False
    line.close()


def test_a_clock_set_back_neither_closes_the_running_shift_nor_reopens_a_past_one(tmp_path):
    """Samples from before the last one (a box's clock stepped back by NTP, a sensor's late message): the shift
    book's time goes only forward. Before, one such sample closed the running shift as partial, opened the old one,
    and the next sample closed that again: two summaries of each, and time counted twice."""
    line = Line(tmp_path / "g.db", defect_every=100)
    t = run_minutes(line, utc("2026-11-24T05:00:00"), 120, per_minute=100)  # 06:00..08:00 local, shift A
    run_minutes(line, utc("2026-11-24T04:00:00"), 3, per_minute=100)  # 05:00 local: yesterday's shift C
    t = run_minutes(line, t, 60 * 8, per_minute=100)  # on to 16:00 local, into shift B
    shifts = line.shifts()
    assert [s["shift_id"] for s in shifts] == ["2026-11-24/A"]
    a = shifts[0]
    assert a["partial"] is False and a["observed_s"] == 8 * 3600
    line.close()


def test_a_change_of_timezone_lets_the_running_shift_run_to_its_end_and_the_new_calendar_follow(tmp_path):
    """A fuzzing pass: a restart (or reload) with another timezone closed the running shift at its old end, hours
    ahead, credited those hours as observed, and started the new shift observed from its start, hours before. Then
    the running shift was cut at the change, which opened a shift of the new calendar that could have been closed
    already (a reload during B opened A again). Now the running shift runs to its end, and the new calendar's shift
    of that moment follows it."""
    from tests.helpers import LINE_CONFIG

    line = Line(tmp_path / "g.db", defect_every=100)
    t = run_minutes(line, utc("2026-11-24T13:00:00"), 60, per_minute=100)  # 14:00..15:00 Berlin, shift B
    line.close()
    tokyo = Line(tmp_path / "g.db", LINE_CONFIG.replace("Europe/Berlin", "Asia/Tokyo"), defect_every=100)
    tokyo.produced, tokyo.defects = line.produced, line.defects
    run_minutes(tokyo, t, 60 * 16, per_minute=100)  # to 07:00 Berlin, 15:00 Tokyo
    b, a = tokyo.shifts()
    assert b["shift_id"] == "2026-11-24/B" and b["end"] == "2026-11-24T21:00:00.000Z"
    assert b["observed_s"] == 8 * 3600 and b["counters"]["produced"] == 47900  # (the first count is the baseline)
    assert a["shift_id"] == "2026-11-25/A" and a["start"] == "2026-11-24T21:00:00.000Z"  # 06:00 Tokyo
    assert a["observed_s"] == 8 * 3600 and a["counters"]["produced"] == 48000
    tokyo.close()


def test_a_reload_that_moves_the_running_shift_opens_no_closed_shift_again(tmp_path):
    """An attack pass: a reload at 15:00 moved B's start from 14:00 to 15:30: B was cut after an hour and A, closed at
    14:00, was opened again and closed at 15:30 (an MES keyed on shift_id lost A's figures). Now B goes on, to where
    the new calendar ends it."""
    from tests.helpers import LINE_CONFIG

    line = Line(tmp_path / "g.db", defect_every=100)
    t = run_minutes(line, utc("2026-11-24T05:00:00"), 9 * 60, per_minute=100)  # 06:00..15:00 Berlin
    line.close()
    moved = Line(tmp_path / "g.db", LINE_CONFIG.replace('start: "14:00"', 'start: "15:30"'), defect_every=100)
    moved.produced, moved.defects = line.produced, line.defects
    run_minutes(moved, t, 60 * 8, per_minute=100)  # to 23:00 Berlin
    a, b = line.shifts() + moved.shifts()
    assert a["shift_id"] == "2026-11-24/A" and a["end"] == "2026-11-24T13:00:00.000Z"
    assert b["shift_id"] == "2026-11-24/B" and b["start"] == "2026-11-24T13:00:00.000Z"
    assert b["end"] == "2026-11-24T21:00:00.000Z" and b["observed_s"] == 8 * 3600 and b["partial"] is False
    assert b["counters"]["produced"] == 8 * 60 * 100  # the counters went on in B too
    assert [m["counters"]["produced"]["shift_id"] for m in moved.on("counters")][-1] == "2026-11-24/C"
    assert "2026-11-24/A" not in {m["counters"]["produced"]["shift_id"] for m in moved.on("counters")}
    moved.close()


def test_shift_times_changed_while_a_shift_runs_end_it_at_its_new_end(tmp_path):
    """Shift C moved from 22:00 to 21:00 while B runs: B ends at 21:00 with 7 hours, and the hour to 22:00 is C's
    only (before, B reported 22:00, 8 hours long and observed)."""
    from tests.helpers import LINE_CONFIG

    line = Line(tmp_path / "g.db", defect_every=100)
    t = run_minutes(line, utc("2026-11-24T13:00:00"), 60, per_minute=100)  # 14:00..15:00 Berlin, shift B
    line.close()
    again = Line(tmp_path / "g.db", LINE_CONFIG.replace('"22:00"', '"21:00"'), defect_every=100)
    again.produced, again.defects = line.produced, line.defects
    run_minutes(again, t, 60 * 16, per_minute=100)  # to 07:00 Berlin
    b, c = again.shifts()
    assert b["shift_id"] == "2026-11-24/B" and b["end"] == "2026-11-24T20:00:00.000Z"
    assert b["length_s"] == 7 * 3600 and b["observed_s"] == 7 * 3600 and b["partial"] is False
    assert c["shift_id"] == "2026-11-24/C" and c["start"] == "2026-11-24T20:00:00.000Z"
    assert c["observed_s"] == 9 * 3600 and c["partial"] is False  # 21:00 to 06:00
    again.close()


def test_a_counter_moved_to_another_register_starts_from_a_baseline_there_not_a_reset(tmp_path, caplog):
    """A fuzzing pass: counter `defects` moved from defects_raw to produced_raw by a reload: the old register's last
    raw value was compared with the new one's, a PLC reset was reported that never happened, and the new register's
    whole value was added to the total."""
    import logging

    from tests.helpers import LINE_CONFIG

    line = Line(tmp_path / "g.db", defect_every=10)
    t = run_minutes(line, utc("2026-11-24T07:00:00"), 30, per_minute=100)  # 300 defects of 3,000 made
    before = line.runner.counting.rows["defects"].total
    line.close()
    moved = LINE_CONFIG.replace("{name: defects, register: defects_raw", "{name: defects, register: produced_raw")
    with caplog.at_level(logging.INFO):
        again = Line(tmp_path / "g.db", moved, defect_every=10)
        again.produced, again.defects = line.produced, line.defects
        run_minutes(again, t, 10, per_minute=100)
        assert again.runner.counting.rows["defects"].total == before + 9 * 100  # the first reading is the baseline
        again.close()
        third = Line(tmp_path / "g.db", moved, defect_every=10)  # a restart: the register is the saved one now
        third.produced, third.defects = again.produced, again.defects
        run_minutes(third, t + 600, 2, per_minute=100)
        assert third.runner.counting.rows["defects"].total == before + 9 * 100 + 2 * 100
        third.close()
    said = [r.getMessage() for r in caplog.records if "counter defects" in r.getMessage()]
    assert said == [f"device line1: counter defects now reads register produced_raw instead of defects_raw: its "
                    f"first reading there is the new baseline; the total goes on from {before}"], said


def test_a_negative_stop_reason_is_a_code_that_a_restart_reads_back(tmp_path, caplog):
    """An attack pass: an int16 reason register showing -1 while the line was down was saved as code -1, then refused
    at the restart as damage: the running shift started afresh (down 0 s, availability 1.0 after an hour down, and
    partial) and the machine state too (a second state event, from `unknown`)."""
    import logging

    from tests.pipeline.test_events import Line as ReasonLine
    from tests.pipeline.test_events import minutes

    line = ReasonLine(tmp_path / "g.db")
    t = minutes(line, utc("2026-11-24T05:00:00"), 60, 1, made=100)  # 06:00 local, shift A: an hour running
    t = minutes(line, t, 60, 3, reason=-1)  # an hour down, the reason register at -1
    with caplog.at_level(logging.WARNING):
        line.restart()
    assert not [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    minutes(line, t, 6 * 60 + 1, 1, made=100)  # on to 14:00 local: A closes
    a = line.shifts()[0]
    assert a["shift_id"] == "2026-11-24/A" and a["partial"] is False
    assert a["state_s"]["down"] == 3600 and a["availability"] == 0.875
    assert a["downtime_by_reason"] == [{"code": -1, "reason": None, "seconds": 3600.0}]
    states = line.on("state")
    assert [(s["previous"], s["state"]) for s in states] == [(None, "running"), ("running", "down"),
                                                             ("down", "running")]
    assert states[1]["reason"] == {"code": -1, "text": None}
    assert states[2]["previous_duration_s"] == 3600.0
    line.close()


def test_a_status_that_could_not_be_read_changes_nothing(tmp_path):
    """An attack pass: one bad read of the status tag booked the minute after it as `unknown`, while the state topic
    (rightly) kept `running`: the shift's time took the bad read as a state."""
    from gateway.sample import ERROR, OK, Sample

    line = Line(tmp_path / "g.db")
    t = run_minutes(line, utc("2026-11-24T05:00:00"), 300, per_minute=100)  # 06:00 local, shift A
    values = {"machine_status": None, "stop_reason": 0.0, "produced_raw": float(line.produced), "defects_raw": 0.0}
    line.runner.process(Sample("line1", t, values, {tag: OK if v is not None else ERROR for tag, v in values.items()}))
    run_minutes(line, t + 60, 180, per_minute=100)  # on to 14:00 local: A closes
    a = line.shifts()[0]
    assert a["state_s"]["running"] == 8 * 3600 and a["state_s"]["unknown"] == 0 and a["availability"] == 1.0
    assert [(s["previous"], s["state"]) for s in line.on("state")] == [(None, "running")]
    line.close()


@pytest.mark.parametrize("zone", ["Europe/Berlin", "Pacific/Apia", "Australia/Lord_Howe", "America/St_Johns"])
def test_the_calendar_tiles_time_across_skipped_hours_and_a_skipped_day(zone):
    """An attack pass: starts inside the skipped spring hour (02:30 and 03:00 in Berlin on 2026-03-29) gave shifts that
    overlapped (A to 01:30Z, C from 01:00Z), `at` chose by the list's order, not by time; and a zone that skipped a
    whole day (Pacific/Apia, 2011-12-30) raised IndexError. Every moment now has one shift, and they follow each other
    without a gap or an overlap."""
    from gateway.shifts import ShiftCalendar

    for shifts in ([("A", "06:00"), ("B", "14:00"), ("C", "22:00")], [("A", "02:30"), ("B", "14:30")],
                   [("A", "01:00"), ("B", "02:30"), ("C", "03:00"), ("D", "12:00")],
                   [("A", "02:15"), ("B", "02:45"), ("C", "13:00")], [("N", "00:00")]):
        calendar = ShiftCalendar(shifts, zone)
        for day in ("2026-03-28", "2026-10-24", "2026-04-04", "2026-09-26", "2011-12-29"):
            previous = None
            for ts in range(int(utc(f"{day}T00:00:00")) - 86400, int(utc(f"{day}T00:00:00")) + 2 * 86400, 900):
                shift = calendar.at(ts)
                assert shift is not None and shift.start.timestamp() <= ts < shift.end.timestamp(), (shifts, ts)
                assert shift.end - shift.start <= timedelta(hours=26), (shifts, shift)
                if previous is not None and previous.id != shift.id:
                    assert previous.end == shift.start, (shifts, previous, shift)
                elif previous is not None:
                    assert previous == shift, (shifts, previous, shift)
                previous = shift


def test_performance_and_oee_stay_at_most_one_after_an_outage(tmp_path):
    """An attack pass: the PLC unreadable for 2 h while the line ran at its ideal rate: the pieces made then were the
    shift's, its running time was not, and performance and OEE read 1.34."""
    from gateway.sample import Sample

    line = Line(tmp_path / "g.db")
    t = utc("2026-11-24T05:00:00")  # 06:00 local, shift A
    for minute in range(8 * 60 + 1):
        line.produced += 120  # the ideal rate
        if 120 <= minute < 240:
            line.runner.process(Sample.failure("line1", t, ("machine_status", "produced_raw"), "timeout"))
        else:
            line.sample(t, 1)
        t += 60
    a = line.shifts()[0]
    assert a["partial"] is True and a["observed_s"] < 6 * 3600 + 120
    assert a["counters"]["produced"] > 120 * 7 * 60  # the outage's pieces are counted
    assert a["performance"] == 1.0 and a["oee"] == 1.0
    line.close()
