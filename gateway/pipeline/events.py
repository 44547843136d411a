"""A device's machine events, from its samples: state changes (with the stop reason) and limit alarms.

Both run on the sample clock and keep the state a restart must not forget (the current
machine state and since when; each alarm's active, pending and unknown state), which the
pipeline persists in the transaction of the messages that report it: a restart neither
repeats a start nor loses an end.

An alarm `above: L` is raised once the value has been above L for `for` seconds (sample
time; 0: at once) and cleared when it falls to `clear` or below: the band between is the
hysteresis. Without `clear` it is L less 2 % of |L| (ISA-18.2's deadband), so that a value
wavering at the limit raises the alarm once, not at every crossing. `below:` mirrors it.
`with_anomaly: true` raises only while the device's anomaly event is active, and clears when
the event ends. A reading of bad quality neither
raises nor clears: the alarm keeps its state and is reported `unknown` until a good one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gateway.config import AlarmSection
from gateway.config.schema import MACHINE_STATES
from gateway.pipeline.shiftbook import ReasonCode, is_code
from gateway.store.outbox import restore


@dataclass
class MachineState:
    """The machine state the last sample showed, since when, and the stop reason code then."""
    state: str | None = None
    since: float | None = None
    reason: ReasonCode | None = None

    def damage(self) -> str | None:
        """What `restore` must not take up besides the types: a state no sample derives, a reason no code."""
        if self.reason is not None and not is_code(self.reason):
            return f"reason: {str(self.reason)[:40]}"
        return None if self.state in (None, *MACHINE_STATES, "unknown") else f"state: {self.state[:40]!r}"


@dataclass(frozen=True)
class StateChange:
    ts: float
    state: str
    previous: str | None
    previous_since: float | None
    reason: int | None  # the stop reason at the change (when it left running)


class StateWatch:
    def __init__(self, saved: dict[str, Any] | None = None, device: str | None = None) -> None:
        self.current = restore(MachineState, saved, device, "machine state") or MachineState()

    def observe(self, ts: float, state: str, reason: ReasonCode | None) -> StateChange | None:
        """The state derived from this sample (as the shift book derives it); a change when it differs."""
        cur = self.current
        if state == cur.state:
            if state != "running" and cur.reason is None and reason is not None:
                cur.reason = reason  # a code the PLC set after the status: kept for live OEE and status
            return None
        change = StateChange(ts, state, cur.state, cur.since, reason)
        self.current = MachineState(state, ts, reason if state != "running" else None)
        return change

    def to_json(self) -> dict[str, Any]:
        return asdict(self.current)


@dataclass
class AlarmState:
    active: bool = False
    started: float | None = None
    pending: float | None = None  # the condition has held since (waiting for `for`)
    unknown: bool = False  # the last reading of its tag was bad
    # The rule it started under: its end is told with them when a reload takes the rule out (`OrphanedAlarms`).
    severity: str | None = None
    tag: str | None = None
    limit: float | None = None


@dataclass(frozen=True)
class AlarmEvent:
    rule: AlarmSection
    kind: str  # start | end
    ts: float
    value: float | None
    started: float | None = None


class AlarmWatch:
    def __init__(self, rules: tuple[AlarmSection, ...], saved: dict[str, Any] | None = None,
                 device: str | None = None) -> None:
        self.rules = rules
        saved = saved if isinstance(saved, dict) else {}
        self.states = {r.name: restore(AlarmState, saved.get(r.name), device, f"state of alarm {r.name}") or
                       AlarmState() for r in rules}

    def observe(self, ts: float, values: dict[str, float | None], good: dict[str, bool],
                anomaly: bool) -> list[AlarmEvent]:
        events: list[AlarmEvent] = []
        for rule in self.rules:
            st = self.states[rule.name]
            value = values.get(rule.tag)
            if value is None or not good.get(rule.tag, False):
                st.unknown = True  # neither raises nor clears; a pending delay starts again after it
                st.pending = None
                continue
            st.unknown = False
            beyond = value > rule.limit if rule.above is not None else value < rule.limit
            if st.active:
                clear = rule.clear_at
                back = value <= clear if rule.above is not None else value >= clear
                if back or (rule.with_anomaly and not anomaly):
                    events.append(AlarmEvent(rule, "end", ts, value, st.started))
                    st.active, st.started, st.pending = False, None, None
                continue
            if not beyond or (rule.with_anomaly and not anomaly):
                st.pending = None
                continue
            if st.pending is None:
                st.pending = ts
            if ts - st.pending >= rule.delay:
                st.active, st.started, st.pending = True, ts, None
                st.severity, st.tag, st.limit = rule.severity, rule.tag, rule.limit
                events.append(AlarmEvent(rule, "start", ts, value))
        return events

    def active(self) -> list[str]:
        return [name for name, st in self.states.items() if st.active]

    @staticmethod
    def orphans(rules: tuple[AlarmSection, ...], saved: dict[str, Any] | None,
                device: str | None = None) -> dict[str, AlarmState]:
        """Alarms active in `saved` whose rule `rules` no longer has (a reload or a restart took it out)."""
        names = {r.name for r in rules}
        found = {name: restore(AlarmState, record, device, f"state of alarm {name}")
                 for name, record in (saved.items() if isinstance(saved, dict) else ()) if name not in names}
        return {name: st for name, st in found.items() if st is not None and st.active}

    def unknown(self) -> list[str]:
        return [name for name, st in self.states.items() if st.unknown]

    def to_json(self) -> dict[str, Any]:
        return {name: asdict(st) for name, st in self.states.items()}
