"""Per device and shift: time in each machine state; a shift closes at its end (`contract.shift` says it).

Time between two samples is given to the state of the earlier sample, split exactly at a
shift boundary; a gap longer than `gap_limit` (the device was unreadable, the gateway was
down) is unobserved time. A shift whose observed time falls short of its length by more
than `gap_limit` is `partial`. The running shift's record is persisted with the counters,
so a restart continues it; a shift that ended while the gateway was down is closed at
start-up (partial), and shifts it missed entirely are reported as `missed`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from gateway.config import OeeSection
from gateway.shifts import Shift, ShiftCalendar

STATES = ("running", "idle", "down", "planned_stop", "unknown")
MAX_MISSED = 21  # a week of three shifts; beyond that one line in the log says how many more


@dataclass
class ShiftRecord:
    shift_id: str
    name: str
    start: float
    end: float
    state_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STATES, 0.0))
    observed_s: float = 0.0
    last_ts: float | None = None
    last_state: str | None = None
    missed: bool = False
    anomaly_s: float = 0.0  # observed time inside an anomaly event
    in_anomaly: bool = False

    @classmethod
    def of(cls, shift: Shift) -> ShiftRecord:
        return cls(shift.id, shift.name, shift.start.timestamp(), shift.end.timestamp())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ShiftBook:
    def __init__(self, calendar: ShiftCalendar, oee: OeeSection | None, gap_limit: float,
                 record: Mapping[str, Any] | None = None) -> None:
        self.calendar = calendar
        self.oee = oee
        self.gap_limit = gap_limit
        self.current = ShiftRecord(**record) if record else None
        self.changed = False  # the record needs persisting

    def state_of(self, value: float | None) -> str:
        if self.oee is None or value is None or not math.isfinite(value) or value != int(value):
            return "unknown"
        return self.oee.states.get(int(value), "unknown")

    def observe(self, ts: float, status: float | None) -> list[ShiftRecord]:
        """A sample at `ts` with the status tag's value; returns the shifts this closed."""
        closed = self.tick(ts)
        rec = self.current
        if rec is None:
            return closed
        if rec.last_ts is not None and 0 < ts - rec.last_ts <= self.gap_limit:
            self._attribute(rec, ts - rec.last_ts)
        rec.last_ts, rec.last_state = ts, self.state_of(status)
        self.changed = True
        return closed

    def tick(self, now: float) -> list[ShiftRecord]:
        """Close the running shift if `now` is past its end (also with no sample: the device may be down)."""
        if not self.calendar:
            return []
        shift = self.calendar.at(now)
        assert shift is not None  # a calendar with shifts always has one running
        rec = self.current
        if rec is not None and rec.shift_id == shift.id:
            return []
        closed: list[ShiftRecord] = []
        if rec is not None:
            # The time from the last sample up to the boundary still belongs to the old shift.
            if rec.last_ts is not None and 0 < rec.end - rec.last_ts and now - rec.last_ts <= self.gap_limit:
                self._attribute(rec, rec.end - rec.last_ts)
            closed.append(rec)
            closed += self._missed(rec.end, shift.start.timestamp())
        self.current = ShiftRecord.of(shift)
        if rec is not None and rec.last_ts is not None and now - rec.last_ts <= self.gap_limit:
            # Continuous observation across the boundary: the new shift starts observed.
            self.current.last_ts, self.current.last_state = self.current.start, rec.last_state
        if rec is not None:
            self.current.in_anomaly = rec.in_anomaly
        self.changed = True
        return closed

    def _missed(self, after: float, until: float) -> list[ShiftRecord]:
        missed: list[ShiftRecord] = []
        t = after
        while t < until and len(missed) < MAX_MISSED:
            shift = self.calendar.at(t)
            assert shift is not None
            missed.append(ShiftRecord(**{**ShiftRecord.of(shift).to_json(), "missed": True}))
            t = shift.end.timestamp()
        return missed

    def anomaly(self, ts: float, active: bool) -> None:
        """An anomaly event started (True) or ended at `ts`: time from here on counts (or not)."""
        if self.current is not None:
            self.current.in_anomaly = active
            self.changed = True

    def _attribute(self, rec: ShiftRecord, dt: float) -> None:
        rec.state_s[rec.last_state or "unknown"] += dt
        rec.observed_s += dt
        if rec.in_anomaly:
            rec.anomaly_s += dt
