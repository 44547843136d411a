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
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, NewType

from gateway.config import OeeSection
from gateway.contract import CounterSpec, Payload, ShiftFacts
from gateway.counters import CounterRow
from gateway.shifts import Shift, ShiftCalendar
from gateway.store.outbox import restore

STATES = ("running", "idle", "down", "planned_stop", "unknown")
# A stop reason code: any whole number the PLC's reason register shows but 0 ("none given"), negative ones too (an
# int16 register's -1 is a common "none", but the register and its codes are the user's). Its own type because
# `restore` takes a record's int as a count (0 and up): the records check their codes themselves (`is_code`).
ReasonCode = NewType("ReasonCode", int)
MAX_CODE = 2**53 - 1  # beyond it a register's float (and JSON) no longer holds every whole number
MAX_MISSED = 21  # a week of three shifts; beyond that one line in the log says how many more
KEPT_IDS = 24  # closed shift ids the running shift's record keeps: more than two days of shifts, as a rule


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
    last_reason: ReasonCode | None = None  # the stop reason code at the last sample (None: no code)
    down_by_reason: dict[str, float] = field(default_factory=dict)  # seconds down, by reason code ("none")
    active_alarms: list[str] = field(default_factory=list)
    alarm_s: dict[str, float] = field(default_factory=dict)  # observed seconds each alarm was active
    alarm_count: dict[str, int] = field(default_factory=dict)  # alarms started in this shift
    closed_ids: list[str] = field(default_factory=list)  # the last shifts this book closed (`ShiftCalendar.carry`)

    def damage(self) -> str | None:
        """What `restore` must not take up besides the types: keys and states no sample writes, a shift that ends
        before it starts."""
        if set(self.state_s) != set(STATES):
            return f"state_s: {sorted(self.state_s)[:6]}"
        if self.last_state not in (None, *STATES):
            return f"last_state: {self.last_state[:40]!r}"
        if self.last_reason is not None and not is_code(self.last_reason):
            return f"last_reason: {str(self.last_reason)[:40]}"
        if (bad := next((k for k in self.down_by_reason if k != "none" and not _code_key(k)), None)) is not None:
            return f"down_by_reason: {bad[:40]!r}"
        return None if self.start <= self.end else "end before start"

    @classmethod
    def of(cls, shift: Shift) -> ShiftRecord:
        return cls(shift.id, shift.name, shift.start.timestamp(), shift.end.timestamp())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ShiftBook:
    def __init__(self, calendar: ShiftCalendar, oee: OeeSection | None, gap_limit: float,
                 record: Mapping[str, Any] | None = None, device: str | None = None) -> None:
        self.calendar = calendar
        self.oee = oee
        self.gap_limit = gap_limit
        self.current = restore(ShiftRecord, record, device, "running shift")
        self.changed = False  # the record needs persisting
        self._carried = False  # the running shift told to the calendar, which may be new (`tick`)

    def state_of(self, value: float | None) -> str:
        if self.oee is None or value is None or not math.isfinite(value) or value != int(value):
            return "unknown"
        return self.oee.states.get(int(value), "unknown")

    def reason_of(self, value: float | None) -> ReasonCode | None:
        """A stop reason register's value as a code (None: not a code, or 0: none given)."""
        if value is None or not math.isfinite(value) or value != int(value) or not is_code(int(value)):
            return None
        return ReasonCode(int(value))

    def observe(self, ts: float, status: float | None, reason: float | None = None) -> list[ShiftRecord]:
        """A sample at `ts` with the status (and stop reason) tags' values; returns the shifts this closed."""
        closed = self.tick(ts)
        rec = self.current
        if rec is None or (rec.last_ts is not None and ts < rec.last_ts) or ts < rec.start:
            return closed  # from before the last sample (a clock set back): the book's time only goes forward
        if rec.last_ts is not None and 0 < ts - rec.last_ts <= self.gap_limit:
            self._attribute(rec, ts - rec.last_ts)
        rec.last_ts = ts
        if status is not None or rec.last_state is None:  # a status that could not be read changes nothing
            rec.last_state = self.state_of(status)
            rec.last_reason = self.reason_of(reason) if rec.last_state != "running" else None
        self.changed = True
        return closed

    def tick(self, now: float) -> list[ShiftRecord]:
        """Close the running shift if `now` is past its end (also with no sample: the device may be down)."""
        if not self.calendar:
            return []
        rec = self.current
        if not self._carried and rec is not None and not rec.missed and rec.start <= now < rec.end:
            # A reload or restart may have changed the shifts or the zone: the running shift goes on (to where the
            # new calendar ends it, else to its own end), and no shift this book closed is opened again.
            self.calendar.carry(Shift(rec.shift_id, rec.name, _utc(rec.start), _utc(rec.end)), now, rec.closed_ids)
        self._carried = True
        shift = self.calendar.at(now)
        assert shift is not None  # a calendar with shifts always has one running
        start, end = shift.start.timestamp(), shift.end.timestamp()
        if rec is not None and rec.shift_id == shift.id and (rec.start, rec.end) != (start, end) and now >= rec.start:
            rec.start, rec.end = start, end  # its times changed in the config: it ends when the calendar now says
            self.changed = True
        if rec is not None and (rec.shift_id == shift.id or now < rec.start):
            return []  # (before the running shift: a clock set back does not close it, nor open a past one)
        closed: list[ShiftRecord] = []
        cut = rec is not None and now < rec.end  # another shift now, before this one's end: the calendar changed
        if rec is not None:
            if cut:  # (a reload or restart with other shifts or timezone): it ends here, never in the future
                rec.end = now
            # The time from the last sample up to the boundary still belongs to the old shift.
            if rec.last_ts is not None and 0 < rec.end - rec.last_ts and now - rec.last_ts <= self.gap_limit:
                self._attribute(rec, rec.end - rec.last_ts)
            closed.append(rec)
            closed += self._missed(rec.end, start)
        self.current = ShiftRecord.of(shift)
        if rec is not None and rec.last_ts is not None and now - rec.last_ts <= self.gap_limit:
            # Continuous observation across the boundary: the new shift starts observed (after a change of the
            # calendar, from now: its time before was not watched as this shift).
            self.current.last_ts, self.current.last_state = (now if cut else start), rec.last_state
        if rec is not None:
            self.current.closed_ids = [*rec.closed_ids, *(r.shift_id for r in closed)][-KEPT_IDS:]
            self.current.in_anomaly = rec.in_anomaly
            self.current.last_reason = rec.last_reason
            self.current.active_alarms = list(rec.active_alarms)
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

    def alarm(self, name: str, active: bool) -> None:
        """An alarm started (True) or ended: it counts in this shift, its time from here on."""
        rec = self.current
        if rec is None:
            return
        if active and name not in rec.active_alarms:
            rec.active_alarms.append(name)
            rec.alarm_count[name] = rec.alarm_count.get(name, 0) + 1
        elif not active and name in rec.active_alarms:
            rec.active_alarms.remove(name)
        self.changed = True

    def _attribute(self, rec: ShiftRecord, dt: float) -> None:
        state = rec.last_state or "unknown"
        rec.state_s[state] += dt
        rec.observed_s += dt
        if rec.in_anomaly:
            rec.anomaly_s += dt
        if state == "down":
            key = str(rec.last_reason) if rec.last_reason is not None else "none"
            rec.down_by_reason[key] = rec.down_by_reason.get(key, 0.0) + dt
        for name in rec.active_alarms:
            rec.alarm_s[name] = rec.alarm_s.get(name, 0.0) + dt


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def is_code(value: object) -> bool:
    """Whether `value` is a stop reason code as `reason_of` gives one."""
    return isinstance(value, int) and not isinstance(value, bool) and value != 0 and abs(value) <= MAX_CODE


def _code_key(key: str) -> bool:
    """Whether `key` of `down_by_reason` is a code as `_attribute` writes it ("-1", "31")."""
    digits = key[1:] if key.startswith("-") else key
    return digits.isascii() and digits.isdigit() and str(int(key)) == key and is_code(int(key))


def figures(rec: ShiftFacts, specs: Iterable[CounterSpec], rows: Mapping[str, CounterRow],
            ideal_rate: float | None, has_oee: bool) -> Payload:
    """A shift's counts and OEE so far: what the closed shift and the live OEE both say, computed alike."""
    specs = list(specs)
    shift_counts = {c.name: (rows[c.name].shift_total if c.name in rows and rows[c.name].shift_id == rec.shift_id
                             else 0) for c in specs}
    kinds = {kind: sum(shift_counts[c.name] for c in specs if c.kind == kind) for kind in ("total", "good", "defect")}
    has = {kind: any(c.kind == kind for c in specs) for kind in ("total", "good", "defect")}
    total = kinds["total"] if has["total"] else kinds["good"] + kinds["defect"]
    good = kinds["good"] if has["good"] else total - kinds["defect"]
    quality = good / total if total and (has["defect"] or has["good"]) else None
    out: Payload = {"counters": shift_counts, "total": total, "good": good, "defect": total - good,
                    "quality_rate": _round(quality)}
    if has_oee:
        state = rec.state_s
        planned = rec.observed_s - state["planned_stop"] - state["unknown"]
        availability = state["running"] / planned if planned > 0 else None
        # At most 1: the pieces made while the gateway did not watch (the PLC unreadable, the gateway down, its state
        # unknown) are the shift's, as the exact counters say, but that time's running is not known; set against the
        # running watched alone they read above 100 % (1.34 after a 2 h outage at the ideal rate).
        performance = (min(1.0, total / (ideal_rate / 60.0 * state["running"]))
                       if ideal_rate and state["running"] > 0 else None)
        factors = (availability, performance, quality)
        out.update(state_s={k: round(v, 3) for k, v in state.items()}, availability=_round(availability),
                   performance=_round(performance),
                   oee=_round(math.prod(f for f in factors if f is not None)) if None not in factors else None)
    return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
