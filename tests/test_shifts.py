"""Shift summaries and OEE, driven sample by sample through the real device pipeline and SQLite."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from gateway.config import parse
from gateway.contract import Topics
from gateway.pipeline.device import DeviceRunner
from gateway.sample import Sample
from gateway.shifts import ShiftCalendar
from gateway.store.outbox import Bounds, Outbox

CONFIG = """
gateway: {id: g, site: s, timezone: Europe/Berlin}
upstream: {host: h}
shifts: [{name: A, start: "06:00"}, {name: B, start: "14:00"}, {name: C, start: "22:00"}]
devices:
  - name: line1
    source: sim
    profile: flexo_line
    interval: 1m
    counters:
      - {name: produced, register: produced_raw, bits: 32}
      - {name: defects, register: defects_raw, bits: 32, kind: defect}
    oee: {status_tag: machine_status, states: {1: running, 2: idle, 3: down, 4: planned_stop}, ideal_rate: 120}
"""


class NoSource:
    """The samples are fed by the test."""

    skipped_ticks = 0

    async def samples(self):
        raise AssertionError("not polled")
        yield

    async def aclose(self) -> None:
        pass


class Line:
    """The device pipeline of one line, fed scripted samples, on a real store file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cfg = parse(CONFIG)
        self.store = Outbox.open(str(path), bounds=Bounds(max_age=10 * 365 * 86400.0))  # the script is in the past
        calendar = ShiftCalendar([(s.name, s.start) for s in self.cfg.shifts], self.cfg.gateway.timezone)
        self.runner = DeviceRunner(self.cfg.devices[0], NoSource(), self.store, Topics("root"), calendar)
        self.produced = self.defects = 0

    def sample(self, ts: float, status: int, made: int = 0) -> None:
        for _ in range(made):
            self.produced += 1
            if self.produced % 100 == 0:
                self.defects += 1
        values = {"machine_status": float(status), "produced_raw": float(self.produced),
                  "defects_raw": float(self.defects)}
        self.runner.process(Sample("line1", ts, values, dict.fromkeys(values, "ok")))
        assert self.store.commit()

    def shifts(self) -> list[dict]:
        return [json.loads(m.payload) for m in self.store.fetch(0, 10**6) if m.topic.endswith("/shift")]

    def close(self) -> None:
        self.store.close()


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def run_minutes(line: Line, start: float, minutes: int, status: int = 1, per_minute: int = 0) -> float:
    t = start
    for _ in range(minutes):
        line.sample(t, status, per_minute)
        t += 60
    return t


@pytest.mark.parametrize("day,expected_hours", [("2026-03-28", 7), ("2026-10-24", 9)])
def test_night_shift_across_dst_closes_once_at_local_time(tmp_path, day, expected_hours):
    line = Line(tmp_path / "g.db")
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
    line = Line(tmp_path / "g.db")
    run_minutes(line, utc("2026-11-24T05:00:00"), 240, per_minute=100)  # 06:00..10:00 local, shift A
    line.close()  # the gateway goes down at 10:00 local, and comes back the next day at 07:00 local
    again = Line(tmp_path / "g.db")
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
    line = Line(tmp_path / "g.db")
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
