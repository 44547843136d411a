"""The stages of one device's pipeline: counting (counters and shifts) → scoring → events → publishing.

Each stage takes a Sample, keeps its own state, and stages what it has to say in the
outbox through `contract`. What they share is handed to them, and named here: `Events` and
`Publishing` are given the device's `Counting` — events add machine-state and alarm time to
its shift book and read the live OEE from it; publishing sends the counters message beside
the telemetry (when totals moved, or at `max_silence`). The device runner (`device.py`) calls
the stages in order and tells the shift book when an anomaly event starts or ends.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from gateway import contract, counters, tagtypes
from gateway.config import AlarmSection, CounterSection, Device, ModbusRtuDevice, ModbusTcpDevice, SimDevice, counter_bits
from gateway.contract import Topics
from gateway.counters import CounterRow
from gateway.logs import fields
from gateway.modbus_map import WIDTH
from gateway.pipeline import shiftbook
from gateway.pipeline.events import AlarmState, AlarmWatch, StateWatch
from gateway.pipeline.modelnotes import OutOfModel, Recommission
from gateway.pipeline.shiftbook import ShiftBook, ShiftRecord
from gateway.sample import OK, Sample
from gateway.shifts import ShiftCalendar
from gateway.sources import tag_types
from gateway.store.outbox import Outbox
from gateway.units import finite, instant, rfc3339

if TYPE_CHECKING:
    from gateway.anomaly.model import DeviceScorer, Event, Model

log = logging.getLogger("edge_gateway.pipeline.stages")
LIVE_MIN_RUNNING = 60.0  # seconds of running before the live OEE gives performance and OEE
COUNTER_REGISTERS = "counter_registers"  # the device state kind: each counter's register (`_rebase_moved_counters`)
CLOSED_KEPT = 21  # closed-shift summaries kept in memory for the web API: a week of three shifts


class Counting:
    """Exact counters from raw PLC registers, and the shift book (time per state, closed shifts)."""

    def __init__(self, device: Device, outbox: Outbox, topics: Topics, shifts: ShiftCalendar, scored: bool) -> None:
        self.device = device
        self.outbox = outbox
        self.shifts = shifts
        self.scored = scored
        self._counters_topic = topics.counters(device.name)
        self._bits = {c.name: counter_bits(device, c) for c in device.counters}  # once, not per sample
        signed = {r.name: WIDTH[r.type] * 16 for r in getattr(device, "registers", ())
                  if r.type in ("int16", "int32") and r.bit is None and r.scale == 1 and r.offset == 0}
        self._signed = {c.name: signed[c.register] for c in device.counters if c.register in signed}
        self._shift_topic = topics.shift(device.name)
        self._oee_topic = topics.oee(device.name)
        self.gap_limit = max(3 * device.interval, 5.0)
        self.book = ShiftBook(shifts, device.oee, self.gap_limit, outbox.shift_record(device.name), device.name)
        configured = {c.name for c in device.counters}  # a counter taken out keeps its row in the file, unshown
        self.rows: dict[str, CounterRow] = {name: row for (_, name), row in outbox.counters(device.name).items()
                                            if name in configured}
        self._rebase_moved_counters()
        self.changed = bool(device.counters)  # totals moved since the last counters message
        self._problems: dict[str, str] = {}
        self._glitches: dict[str, int] = {}  # per counter, since the start
        self.closed: deque[dict[str, Any]] = deque(maxlen=CLOSED_KEPT)  # the last closed-shift summaries (web)

    def _rebase_moved_counters(self) -> None:
        """A counter given another register (a reload, a restart): its last raw value is the old register's, so
        the new register's first reading is a baseline, not a count or a PLC reset. The registers are kept in the
        device state, committed with the next messages."""
        name = self.device.name
        registers = {c.name: _counter_source(self.device, c) for c in self.device.counters}
        saved = self.outbox.device_state(name, COUNTER_REGISTERS)
        for counter in self.device.counters:
            old = saved.get(counter.name) if isinstance(saved, dict) else None
            row = self.rows.get(counter.name)
            # (a version before kept the tag's name alone: the same name is taken as the same register)
            if isinstance(old, str) and old not in (registers[counter.name], counter.register) and row is not None \
                    and row.last_raw is not None:
                self.rows[counter.name] = replace(row, last_raw=None)
                self.outbox.stage_counter(name, counter.name, self.rows[counter.name])  # with the registers: one commit
                new, was = registers[counter.name], old
                if old.split(" (")[0] != counter.register:  # another tag: named as the config names them
                    new, was = counter.register, old.split(" (")[0]
                log.warning("device %s: counter %s now reads register %s instead of %s: its first reading there is "
                            "the new baseline; the total goes on from %d", name, counter.name, new, was, row.total,
                            extra=fields(name, "counter_moved", counter=counter.name))
        if saved != registers:
            self.outbox.stage_state(name, COUNTER_REGISTERS, registers)

    def observe(self, sample: Sample) -> None:
        """Shifts first (a boundary closes the old shift before the counters move to the new one), then counters."""
        oee = self.device.oee
        status = sample.values.get(oee.status_tag) if oee else None
        reason = sample.values.get(oee.reason_tag) if oee and oee.reason_tag else None
        self._close(self.book.observe(sample.ts, status, reason))
        self._count(sample)

    def tick(self, now: float) -> None:
        """No sample (the read failed): a shift may still end."""
        self._close(self.book.tick(now))

    def anomaly(self, ts: float, active: bool) -> None:
        self.book.anomaly(ts, active)
        self.save_book()  # in the transaction of the event: a kill -9 cannot leave the shift counting anomaly time

    def live_oee(self, rec: ShiftRecord, ts: float, final: bool = False) -> dict[str, Any]:
        oee = self.device.oee
        assert oee is not None
        reason = contract.reason(rec.last_reason, oee.reasons) if oee.reason_tag else None
        figures = self.figures(rec)
        if not final and rec.state_s["running"] < LIVE_MIN_RUNNING:
            # The counts of a shift's first sample may have been made before its start (or while the gateway was
            # down): over seconds of running they read as a performance of thousands of percent.
            figures.update(performance=None, oee=None)
        return contract.live_oee(self.device.name, ts, rec, figures, rec.last_state, reason, final)

    def figures(self, rec: ShiftRecord) -> dict[str, Any]:
        """The shift's counts and, with `oee:`, its OEE so far (the live OEE and the closed shift alike)."""
        oee = self.device.oee
        return shiftbook.figures(rec, self.device.counters, self.rows, oee.ideal_rate if oee else None, oee is not None)

    def stage_counters(self, ts: float) -> None:
        payload = contract.counters(self.device.name, ts, self.device.counters, self.rows)
        if payload["counters"]:
            self.outbox.stage(self._counters_topic, payload, created=ts)
        self.changed = False

    def _count(self, sample: Sample) -> None:
        # The shift the book is in (after `observe`), not the calendar's at the sample's time: the box's clock stepped
        # back an hour (NTP) put the counts back into the shift already closed, and out of every shift record.
        shift_id = self.book.current.shift_id if self.book.current is not None else None
        for counter in self.device.counters:
            bits = self._bits[counter.name]
            value = sample.values.get(counter.register)
            if value is not None and value < 0 and counter.name in self._signed:
                value += 1 << self._signed[counter.name]  # an INT register's counter past its top reads negative
            raw = counters.raw_value(value, bits)
            if raw is None:
                self._problem(counter, f"register {counter.register} gave no valid {bits}-bit counter value",
                              f" ({value!r})")
                continue
            self._problem(counter, None)
            previous = self.rows.get(counter.name)
            row, step = counters.advance(previous, raw, bits, counter.reset_threshold, shift_id, sample.ts,
                                         counter.max_rate)
            if previous is not None:
                self._say(counter, previous, row, step, raw, bits, sample.ts)
                self._unseen_wraps(counter, previous, bits, sample.ts)
            if previous is None or (row.total, row.shift_total, row.shift_id) != (
                    previous.total, previous.shift_total, previous.shift_id):
                self.changed = True
            self.rows[counter.name] = row
            self.outbox.stage_counter(self.device.name, counter.name, row)

    def _close(self, closed: list[ShiftRecord]) -> None:
        name = self.device.name
        for rec in closed:
            oee = self.device.oee
            payload = contract.shift(name, rec, self.figures(rec), oee is not None, self.gap_limit, self.scored,
                                     oee.reasons if oee else None)
            if oee is not None and not rec.missed:  # the live OEE's last word on the shift: its summary's figures
                self.outbox.stage(self._oee_topic, self.live_oee(rec, rec.end, final=True), created=rec.end)
            self.outbox.stage(self._shift_topic, payload, created=rec.end)
            self.closed.append(payload)
            log.info("device %s: shift %s closed%s", name, rec.shift_id,
                     " (missed: the gateway was down)" if rec.missed else
                     " (partial)" if payload["partial"] else "", extra=fields(name, "shift_closed"))
        self.save_book()

    def save_book(self) -> None:
        """The running shift's record, when it changed: with the next commit, beside the messages that changed it."""
        if self.book.changed and self.book.current is not None:
            self.outbox.stage_shift(self.device.name, self.book.current.to_json())
            self.book.changed = False

    def _say(self, counter: CounterSection, previous: CounterRow, row: CounterRow, step: counters.Step, raw: int,
             bits: int, ts: float) -> None:
        """What a step tells the journal: a wrap, a reset, a jump no machine makes, a glitch, a counter moved."""
        name, at = self.device.name, step.at if step.at is not None else raw  # (a reading told by the next one)
        extra = fields(name, f"counter_{step.event}", counter=counter.name)
        if step.event == "wrap":
            log.info("device %s: counter %s wrapped at %d bits (raw %d -> %d)", name, counter.name, bits,
                     previous.last_raw, at, extra=extra)
        elif step.event == "suspect":
            log.warning("device %s: counter %s jumped from raw %d to %d (%d counts in %.0fs), more than the machine "
                        "can make%s; not counted, %d taken as the new baseline", name, counter.name,
                        previous.last_raw, at, step.seen, (previous.pending_at or ts) - previous.updated,
                        f" (max_rate {counter.max_rate:g}/s)" if counter.max_rate else " (over half the range)", at,
                        extra=extra)
        elif step.event == "reset":
            log.warning("device %s: counter %s was reset on the PLC (raw %d -> %d); counting on from %d", name,
                        counter.name, previous.last_raw, at, row.total - (raw - at), extra=extra)
        elif step.event == "moved":
            log.warning("device %s: counter %s read %d, then values that go on from neither it nor each other "
                        "(now %d): taken as a counter moved, %d is the new baseline; the total goes on from %d", name,
                        counter.name, previous.last_raw, raw, raw, row.total, extra=extra)
        elif step.event == "glitch":
            glitches = self._glitches[counter.name] = self._glitches.get(counter.name, 0) + 1
            if glitches & (glitches - 1) == 0:  # the 1st, 2nd, 4th, 8th ...: a PLC that glitches often is not a flood
                log.warning("device %s: counter %s read raw %d once between %d and %d: a glitch (a bad read, not "
                            "counts), not counted (%d glitch(es) so far)", name, counter.name, at,
                            previous.last_raw, raw, glitches, extra=extra)

    def _unseen_wraps(self, counter: CounterSection, previous: CounterRow, bits: int, ts: float) -> None:
        """Unread for longer than the counter takes to wrap at its top rate (`max_rate`, else its pace lately): whole
        wraps in between show in no reading, so counts may be missing. Said, with how many at most."""
        rate, gap = counter.max_rate or previous.pace, ts - previous.updated
        if previous.last_raw is None or previous.pending is not None or rate <= 0 or rate * gap < 1 << bits:
            return
        log.warning("device %s: counter %s was not read for %.0fs: at up to %.3g counts/s it wraps every %.0fs, so "
                    "up to %d whole wrap(s) of %d counts may be missing from its total, which no reading can show",
                    self.device.name, counter.name, gap, rate, (1 << bits) / rate, int(rate * gap) >> bits, 1 << bits,
                    extra=fields(self.device.name, "counter_unseen_wraps", counter=counter.name))

    def _problem(self, counter: CounterSection, problem: str | None, detail: str = "") -> None:
        """Logged once when a counter stops counting (not again for another value: `detail`), once when it counts
        again."""
        name = counter.name
        if self._problems.get(name) == problem:
            return
        device = self.device.name
        if problem:
            log.warning("device %s: counter %s not updated: %s%s", device, name, problem, detail,
                        extra=fields(device, "counter_bad", counter=name))
            self._problems[name] = problem
        elif self._problems.pop(name, None) is not None:
            log.info("device %s: counter %s is counting again", device, name,
                     extra=fields(device, "counter_ok", counter=name))


def _counter_source(device: Device, counter: CounterSection) -> str:
    """Where a counter's raw value is read, as the journal names it: its tag, and the register, node or field and
    the endpoint behind it. A reload that gives the tag another address, type or PLC (the name unchanged) moves the
    counter: its old raw value is no baseline there (900,000 in the new register counted as production)."""
    parts = [counter.register]
    for reg in getattr(device, "registers", ()):
        if reg.name == counter.register:
            parts.append(f"{reg.table} {reg.address} {reg.type}" + (f" bit {reg.bit}" if reg.bit is not None else "")
                         + ("" if (reg.word_order, reg.byte_order) == ("big", "big") else
                            f" {reg.word_order}/{reg.byte_order}") + (f" x{reg.scale:g}" if reg.scale != 1 else "")
                         + (f" {reg.offset:+g}" if reg.offset else ""))
    for node in getattr(device, "nodes", ()):
        if node.name == counter.register:
            parts.append(node.node)
    if (field := getattr(device, "fields", {}).get(counter.register)) is not None:
        parts.append(f"field {field}")
    serial = getattr(device, "serial", None)
    where = getattr(device, "endpoint", None) or getattr(device, "topic", None) or (serial.port if serial else None)
    if isinstance(device, ModbusTcpDevice):
        where = f"{device.host}:{device.port or 502}"
    if isinstance(device, (ModbusTcpDevice, ModbusRtuDevice)):
        where = f"{where} unit {device.unit if device.unit is not None else 1}"
    if isinstance(device, SimDevice):
        where = f"sim {device.profile}"
    return f"{parts[0]} ({', '.join([*parts[1:], where or ''])})" if len(parts) > 1 or where else parts[0]


class Events:
    """Machine-state changes with their stop reason, limit alarms, and the running shift's live OEE."""

    def __init__(self, device: Device, outbox: Outbox, topics: Topics, counting: Counting) -> None:
        self.device = device
        self.outbox = outbox
        self.counting = counting
        name = device.name
        self.machine = StateWatch(outbox.device_state(name, "machine"), name) if device.oee else None
        self.alarms = AlarmWatch(device.alarms, outbox.device_state(name, "alarms"), name) if device.alarms else None
        self._topics = {"state": topics.state(name), "alarm": topics.alarm(name), "oee": topics.oee(name)}
        self._types = tag_types(device)
        self._next_live: float | None = None
        self.last_live: dict[str, Any] | None = None

    def push(self, sample: Sample, anomaly: bool) -> None:
        if self.machine is not None and not sample.failed:
            self._state(sample)
        if self.alarms is not None:
            self._alarms(sample, anomaly)
        oee, rec = self.device.oee, self.counting.book.current
        if oee is not None and rec is not None and not sample.failed:
            new_shift = self.last_live is None or self.last_live["shift_id"] != rec.shift_id
            if new_shift or self._next_live is None or sample.ts >= self._next_live:
                self.last_live = self.counting.live_oee(rec, sample.ts)
                self.outbox.stage(self._topics["oee"], self.last_live, created=sample.ts)
                self._next_live = sample.ts + oee.live_interval

    def _state(self, sample: Sample) -> None:
        oee, book, machine = self.device.oee, self.counting.book, self.machine
        assert oee is not None and machine is not None
        status = sample.values.get(oee.status_tag)
        if status is None:  # the status could not be read: no state to tell
            return
        reason = book.reason_of(sample.values.get(oee.reason_tag)) if oee.reason_tag else None
        known_reason = machine.current.reason
        change = machine.observe(sample.ts, book.state_of(status), reason)
        if change is None:
            if machine.current.reason != known_reason:
                self.outbox.stage_state(self.device.name, "machine", machine.to_json())
            return
        name = self.device.name
        stop = contract.reason(change.reason, oee.reasons) if change.previous == "running" else None
        self.outbox.stage(self._topics["state"], contract.state(name, change.ts, change.state, change.previous,
                                                                change.previous_since, stop, oee.reason_tag is not None),
                          created=change.ts)
        self.outbox.stage_state(name, "machine", machine.to_json())
        why = f" ({stop['code']}: {stop['text'] or 'no text for this code'})" if stop else ""
        log.info("device %s: machine %s%s", name, change.state, why, extra=fields(name, "machine_state"))

    def _alarms(self, sample: Sample, anomaly: bool) -> None:
        alarms = self.alarms
        assert alarms is not None
        unknown = alarms.unknown()
        good = {tag: sample.quality.get(tag, OK) == OK for tag in sample.values}
        events = alarms.observe(sample.ts, dict(sample.values), good, anomaly)
        name = self.device.name
        for e in events:
            rule = e.rule
            value = self._types.get(rule.tag, tagtypes.AS_SENT).shape(e.value)  # as the telemetry says it
            self.outbox.stage(self._topics["alarm"], contract.alarm(name, e.ts, e.kind, rule.name, rule.severity,
                                                                    rule.tag, value, rule.limit, e.started),
                              created=e.ts)
            self.counting.book.alarm(rule.name, e.kind == "start")
            log.warning("device %s: alarm %s %s: %s %s %g (limit %g, %s)", name, rule.name,
                        "raised" if e.kind == "start" else "cleared", rule.tag, "=", e.value, rule.limit,
                        rule.severity, extra=fields(name, f"alarm_{e.kind}"))
        now_unknown = alarms.unknown()
        if now_unknown != unknown:
            if now_unknown:
                log.warning("device %s: alarms %s unknown: their tags have no good reading", name,
                            ", ".join(now_unknown), extra=fields(name, "alarm_unknown"))
            else:
                log.info("device %s: every alarm has a good reading again", name, extra=fields(name, "alarm_known"))
        if events or now_unknown != unknown:
            self.outbox.stage_state(name, "alarms", alarms.to_json())
            self.counting.save_book()

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.machine is not None:
            cur = self.machine.current
            oee = self.device.oee
            out["machine"] = {"state": cur.state, "since": rfc3339(cur.since) if cur.since else None,
                              "reason": contract.reason(cur.reason, oee.reasons) if oee and oee.reason_tag else None}
        if self.alarms is not None:
            out["alarms"] = {"active": self.alarms.active(), "unknown": self.alarms.unknown()}
        if self.last_live is not None:
            out["oee"] = {k: self.last_live.get(k) for k in ("shift_id", "availability", "performance",
                                                             "quality_rate", "oee", "total", "good", "defect")}
        return out


SAVE_EVERY = 30  # windows: how stale a saved open event's level or a held threshold may be after a kill -9


class Scoring:
    """The anomaly model: every `stride` samples a window is scored; events go upstream at once."""

    def __init__(self, device: Device, model: Model, outbox: Outbox, topics: Topics,
                 config_path: str | None = None, recorded: bool = False) -> None:
        from gateway.anomaly.model import DeviceScorer  # numpy and the runtime only when a model is attached

        self.device = device
        self.scorer: DeviceScorer = DeviceScorer(model)
        self.recommission = Recommission.of(device, model, config_path, time.time(), recorded)
        if self.recommission is not None:
            log.warning("device %s: %s", device.name, self.recommission.note,
                        extra=fields(device.name, "anomaly_model_short"))
        self.out_of_model = OutOfModel(device, model, config_path, recorded)
        self.outbox = outbox
        self._topic = topics.anomaly(device.name)
        saved = outbox.device_state(device.name, "anomaly")
        damage = (self.scorer.resume(saved) if isinstance(saved, dict) else
                  None if saved is None else f"a {type(saved).__name__}, not an object")
        if damage is not None:  # an event open before it is not taken up: said, as other damaged saved state
            log.warning("device %s: its saved anomaly event is damaged (%s): it starts afresh", device.name, damage,
                        extra=fields(device.name, "state_unreadable"))
        self._saved_at = 0  # windows scored when the event state was last staged
        self._saved_settling = self.scorer.settling

    @property
    def score(self) -> float | None:
        return self.scorer.state.score

    @property
    def note(self) -> str | None:
        """For a device outside its model for hours (`OutOfModel`), or a model commissioned short (`Recommission`):
        what it means and how to train the model again."""
        if self.out_of_model.note is not None:
            return self.out_of_model.note
        return self.recommission.note if self.recommission is not None else None

    @property
    def threshold(self) -> float:
        """In effect now: the model's, or held higher while the machine settles after an event that subsided."""
        return float(self.scorer.state.threshold)

    def push(self, sample: Sample) -> Event | None:
        """Score the sample's window when one is due; the event, when one starts or ends."""
        values = {tag: v if sample.quality.get(tag, OK) == OK else None for tag, v in sample.values.items()}
        scorer = self.scorer
        event = scorer.push(sample.ts, values)
        settling = scorer.settling
        if event is not None or settling != self._saved_settling or \
                (settling and scorer.state.scored - self._saved_at >= SAVE_EVERY):
            self.save()  # in the transaction of the event it reports: a restart neither repeats a start nor loses an end
        if (r := self.recommission) is not None and r.watching and \
                (said := r.observe(sample.ts, not sample.failed, event is not None and event.kind == "start")):
            log.warning("device %s: %s", self.device.name, said, extra=fields(self.device.name, "anomaly_model_ready"))
        if (fit := self.out_of_model.observe(sample.ts, scorer)) is not None:
            text, what = fit
            log.log(logging.INFO if what == "anomaly_model_fits" else logging.WARNING, "device %s: %s",
                    self.device.name, text, extra=fields(self.device.name, what))
        if event is None:
            return None
        model, name = self.scorer.model, self.device.name
        self.outbox.stage(self._topic, contract.anomaly(name, sample.ts, event.kind, event.score, event.threshold,
                                                        model.name, event.top, event.started, event.peak),
                          created=sample.ts)
        tags = ", ".join(t["tag"] + (" (flatline)" if t.get("flatline") else "") for t in event.top)
        if event.kind == "start":
            log.warning("device %s: anomaly started: score %.4f > threshold %.4f; top tags %s", name,
                        event.score, event.threshold, tags, extra=fields(name, "anomaly_start"))
        elif event.subsided:
            log.warning("device %s: anomaly ended after %.0fs (peak score %.4f): the score subsided to %.4f; the "
                        "threshold is held at %.4f (model %.4f) until the machine settles", name,
                        sample.ts - (event.started or sample.ts), event.peak or 0.0, event.score, event.threshold,
                        model.threshold, extra=fields(name, "anomaly_end"))
        else:
            log.warning("device %s: anomaly ended after %.0fs (peak score %.4f)", name,
                        sample.ts - (event.started or sample.ts), event.peak or 0.0,
                        extra=fields(name, "anomaly_end"))
        return event

    def serves(self, device: Device, model: Model, topics: Topics) -> bool:
        """Whether this scoring can go on as it is for the device, model and topics of a reloaded config: the same
        device (tags, interval, history), the same model file and metadata, the same anomaly topic."""
        mine = self.scorer.model
        return (device == self.device and model.identity == mine.identity and model.meta == mine.meta
                and topics.anomaly(device.name) == self._topic)

    def save(self) -> None:
        """Stage the event state (`DeviceScorer.event_state`) for the next commit."""
        self.outbox.stage_state(self.device.name, "anomaly", self.scorer.event_state())
        self._saved_at, self._saved_settling = self.scorer.state.scored, self.scorer.settling

    def status(self) -> dict[str, Any]:
        st = self.scorer.state
        return {"model": self.scorer.model.name, "state": "anomaly" if st.active else
                ("normal" if st.score is not None else "not scored"), "score": st.score,
                "threshold": self.threshold, "model_threshold": self.scorer.model.threshold, "windows_scored": st.scored,
                "windows_not_scored": st.unscored, "why_not_scored": st.why_unscored,
                "commissioned_s": self.scorer.model.commissioned_s or None, "note": self.note}

    def take_latency(self) -> list[float]:
        return self.scorer.take_latency()


class PublishPolicy:
    """When a sample becomes a telemetry message: every `interval`, or on change beyond a deadband."""

    def __init__(self, device: Device) -> None:
        cfg = device.publish
        self.on_change = cfg.on_change
        self.every_sample = cfg.interval is None and not cfg.on_change  # the default: publish what is read
        self.interval = cfg.interval if cfg.interval is not None else device.interval
        self.deadband = cfg.deadband
        self.max_silence = cfg.max_silence
        self._last: Sample | None = None

    def wants(self, sample: Sample) -> bool:
        last = self._last
        if last is None or self.every_sample:
            return self._take(sample)
        if self.on_change:
            if sample.ts - last.ts >= self.max_silence or sample.quality != last.quality:
                return self._take(sample)
            for tag, value in sample.values.items():
                old = last.values.get(tag)
                if old is None or value is None:
                    if (value is None) != (old is None):
                        return self._take(sample)
                elif abs(value - old) > self.deadband.get(tag, 0.0):
                    return self._take(sample)
            return False
        # A small tolerance so that jitter in the poll timing does not skip every other interval.
        if sample.ts - last.ts >= self.interval * 0.98:
            return self._take(sample)
        return False

    def _take(self, sample: Sample) -> bool:
        self._last = sample
        return True


class Publishing:
    """Telemetry by the publish policy; with it, the counters message when totals moved (or at max_silence)."""

    def __init__(self, device: Device, outbox: Outbox, topics: Topics, counting: Counting,
                 scoring: Scoring | None) -> None:
        self.device = device
        self.outbox = outbox
        self.policy = PublishPolicy(device)
        self.counting = counting
        self.scoring = scoring
        self.published = 0
        self._topic = topics.telemetry(device.name)
        self._last_counters_ts = 0.0
        self._types = tag_types(device)
        self._simulated = device.source == "sim"

    def push(self, sample: Sample) -> None:
        if not self.policy.wants(sample):
            return
        scoring = self.scoring
        payload = contract.telemetry(self.device.name, sample.ts, tagtypes.shape(sample.values, self._types),
                                     sample.quality, scoring.score if scoring else None,
                                     scoring.threshold if scoring else None, scored=scoring is not None,
                                     simulated=self._simulated)
        self.outbox.stage(self._topic, payload, created=sample.ts)
        self.published += 1
        if self.counting.changed or sample.ts - self._last_counters_ts >= self.policy.max_silence:
            self.counting.stage_counters(sample.ts)
            self._last_counters_ts = sample.ts


def scoring_for(device: Device, model: Model | None, outbox: Outbox, topics: Topics,
                config_path: str | None = None, recorded: bool = False) -> Scoring | None:
    return Scoring(device, model, outbox, topics, config_path, recorded) if model is not None else None


class OrphanedAlarms:
    """Alarms active when a reload (or a restart) took their rules, or their device, out of the config: ended at
    the device's first sample (or at once, for a device gone), so that upstream and the shift book do not wait for
    an end forever (an end is never lost)."""

    def __init__(self, name: str, outbox: Outbox, topics: Topics, counting: Counting | None,
                 orphans: dict[str, AlarmState], why: str) -> None:
        self.name, self.outbox, self.counting, self.orphans, self.why = name, outbox, counting, orphans, why
        self._topic = topics.alarm(name)

    @classmethod
    def of(cls, name: str, rules: tuple[AlarmSection, ...], outbox: Outbox, topics: Topics, counting: Counting | None,
           why: str = "its rule is not in the config any more") -> OrphanedAlarms | None:
        orphans = AlarmWatch.orphans(rules, outbox.device_state(name, "alarms"), name)
        return cls(name, outbox, topics, counting, orphans, why) if orphans else None

    def end(self, ts: float) -> None:
        name = self.name
        for alarm, st in self.orphans.items():
            self.outbox.stage(self._topic, contract.alarm(name, ts, "end", alarm, st.severity, st.tag, None, st.limit,
                                                          st.started), created=ts)
            if self.counting is not None:
                self.counting.book.alarm(alarm, False)
            log.warning("device %s: alarm %s ended: %s", name, alarm, self.why, extra=fields(name, "alarm_end"))
        saved = self.outbox.device_state(name, "alarms")
        kept = {k: v for k, v in saved.items() if k not in self.orphans} if isinstance(saved, dict) else {}
        self.outbox.stage_state(name, "alarms", kept)
        if self.counting is not None:
            self.counting.save_book()


class UnwatchedEvent:
    """An anomaly event left open when the device lost its model (taken out of the config while the event was
    open, or unusable at the next start), or was itself taken out: ended at the device's first sample (or at once,
    for a device gone), so that upstream and the shift book do not wait for an end forever."""

    def __init__(self, name: str, outbox: Outbox, topics: Topics, counting: Counting | None, saved: dict[str, Any],
                 why: str) -> None:
        self.name, self.outbox, self.counting, self.saved, self.why = name, outbox, counting, saved, why
        self._topic = topics.anomaly(name)

    @classmethod
    def of(cls, name: str, outbox: Outbox, topics: Topics, counting: Counting | None, why: str
           ) -> UnwatchedEvent | None:
        saved = outbox.device_state(name, "anomaly")
        return cls(name, outbox, topics, counting, saved, why) \
            if isinstance(saved, dict) and saved.get("active") is True else None

    def end(self, ts: float) -> None:
        name, saved = self.name, self.saved
        started = instant(saved.get("started"))
        peak, level, threshold = (finite(saved.get(k)) for k in ("peak", "level", "threshold"))
        self.outbox.stage(self._topic, contract.anomaly(name, ts, "end", level or 0.0, threshold or 0.0,
                                                        str(saved.get("name", "?")), [], started, peak), created=ts)
        self.outbox.stage_state(name, "anomaly", {"active": False})
        if self.counting is not None:
            self.counting.anomaly(ts, False)
        log.warning("device %s: the anomaly event open since %s ended: %s", name,
                    rfc3339(started) if started is not None else "before the restart", self.why,
                    extra=fields(name, "anomaly_end"))


def end_departed(names: Iterable[str], outbox: Outbox, topics: Topics) -> None:
    """Devices the config no longer has (taken out by a reload, or while the daemon was stopped): their open
    anomaly event and active alarms end now, said so; nothing else would ever end them."""
    why, now = "the device is not in the config any more", time.time()
    for name in sorted(names):
        ended = [pending for pending in (UnwatchedEvent.of(name, outbox, topics, None, why),
                                         OrphanedAlarms.of(name, (), outbox, topics, None, why)) if pending is not None]
        for pending in ended:
            pending.end(now)
        record = outbox.shift_record(name) if ended else None
        if isinstance(record, dict) and (record.get("active_alarms") or record.get("in_anomaly")):
            # Its running shift no longer counts their time, and one raised again when it is back counts as a start.
            outbox.stage_shift(name, {**record, "active_alarms": [], "in_anomaly": False})
        # What is left holds nothing open: not kept, so that a state damaged beyond reading (a file edited by hand)
        # is not said again at every start and reload. Back in the config, the device starts with none open.
        outbox.forget_state(name, "anomaly")
        outbox.forget_state(name, "alarms")
