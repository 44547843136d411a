"""One device's pipeline: poll on a drift-free schedule → counters → publish policy → outbox.

A device's failures stay with the device: a failed read, a bad tag or a bad counter
value is counted, logged once per change of state, reported in health, and the
loop goes on. Nothing here can stop another device or the uplink.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field

from gateway import counters
from gateway.config import DeviceSection
from gateway.logs import fields
from gateway.sample import ERROR, OK, Sample
from gateway.shiftbook import ShiftBook, summary
from gateway.shifts import ShiftCalendar
from gateway.sources import SourceError
from gateway.store import CounterRow, Store
from gateway.units import rfc3339

log = logging.getLogger("edge_gateway.device")


@dataclass
class DeviceHealth:
    state: str = "starting"  # starting | ok | degraded (some tags bad) | error (reads fail)
    polls: int = 0
    errors: int = 0
    skipped_ticks: int = 0
    published: int = 0
    last_sample: float | None = None
    last_error: str | None = None
    bad_tags: list[str] = field(default_factory=list)


class PublishPolicy:
    """When a sample becomes a telemetry message: every `interval`, or on change beyond a deadband."""

    def __init__(self, device: DeviceSection) -> None:
        cfg = device.publish
        self.on_change = cfg.on_change
        self.every_sample = cfg.interval is None and not cfg.on_change  # the default: publish what is read
        self.interval = cfg.interval if cfg.interval is not None else device.interval
        self.deadband = cfg.deadband
        self.max_silence = cfg.max_silence
        self._last_ts: float | None = None
        self._last: Sample | None = None

    def wants(self, sample: Sample) -> bool:
        last = self._last
        if last is None or self.every_sample:
            return self._take(sample)
        if self.on_change:
            if sample.ts - self._last_ts >= self.max_silence or sample.quality != last.quality:
                return self._take(sample)
            for tag, value in sample.values.items():
                old = last.values.get(tag)
                if (value is None) != (old is None) or (
                        value is not None and abs(value - old) > self.deadband.get(tag, 0.0)):
                    return self._take(sample)
            return False
        # A small tolerance so that jitter in the poll timing does not skip every other interval.
        if sample.ts - self._last_ts >= self.interval * 0.98:
            return self._take(sample)
        return False

    def _take(self, sample: Sample) -> bool:
        self._last, self._last_ts = sample, sample.ts
        return True


class DeviceRunner:
    def __init__(self, device: DeviceSection, source, store: Store, topic_root: str,
                 shifts: ShiftCalendar, on_state_change=None, model=None) -> None:
        self.device = device
        self.source = source
        self.store = store
        self.health = DeviceHealth()
        self.policy = PublishPolicy(device)
        self.shifts = shifts
        self._telemetry_topic = f"{topic_root}/{device.name}/telemetry"
        self._counters_topic = f"{topic_root}/{device.name}/counters"
        self._shift_topic = f"{topic_root}/{device.name}/shift"
        self._anomaly_topic = f"{topic_root}/{device.name}/anomaly"
        self.scorer = None
        if model is not None:
            from gateway.anomaly import DeviceScorer
            self.scorer = DeviceScorer(model)
        self.gap_limit = max(3 * device.interval, 5.0)
        self.book = ShiftBook(shifts, device.oee, self.gap_limit, store.shift_record(device.name))
        self._counters = {name: row for (_, name), row in store.counters(device.name).items()}
        self._counter_problems: dict[str, str] = {}
        self._counters_changed = bool(device.counters)
        self._last_counters_ts = 0.0
        self._on_state_change = on_state_change or (lambda runner: None)
        self._why: str | None = None
        self._deadline = getattr(source, "deadline", device.timeout)  # a poll may take several requests

    # -- the poll loop --------------------------------------------------------------------
    async def run(self) -> None:
        if getattr(self.source, "pushes", False):
            await self._run_pushed()
            return
        loop = asyncio.get_running_loop()
        interval = self.device.interval
        start, tick = loop.time(), 0
        while True:
            await self.poll_once()
            elapsed = loop.time() - start
            due = max(tick + 1, math.floor(elapsed / interval) + 1)
            self.health.skipped_ticks += due - tick - 1  # a slow poll skips ticks rather than bunching them
            tick = due
            await asyncio.sleep(max(0.0, start + tick * interval - loop.time()))

    async def poll_once(self) -> None:
        self.health.polls += 1
        try:
            sample = await asyncio.wait_for(self.source.read(), timeout=self._deadline)
        except (SourceError, asyncio.TimeoutError) as err:
            why = str(err) or f"no answer within {self._deadline:g}s"
            self._read_failed(why)
            return
        except Exception as err:  # a bug in a source must not take the device loop down
            log.exception("device %s: unexpected error reading the source", self.device.name)
            self._read_failed(f"internal error: {err!r}")
            return
        try:
            self.process(sample)
        except Exception as err:
            log.exception("device %s: unexpected error processing a sample", self.device.name)
            self._read_failed(f"internal error: {err!r}")

    async def _run_pushed(self) -> None:
        """A source that pushes (local MQTT): each message is a sample; silence is an error."""
        silence = max(3 * self.device.interval, self.device.timeout)
        while True:
            try:
                sample = await asyncio.wait_for(self.source.next(), timeout=silence)
            except asyncio.TimeoutError:
                self._read_failed(f"no message on {self.device.topic} for {silence:g}s")
                continue
            except SourceError as err:
                self._read_failed(str(err))
                continue
            self.health.polls += 1
            try:
                self.process(sample)
            except Exception as err:
                log.exception("device %s: unexpected error processing a sample", self.device.name)
                self._read_failed(f"internal error: {err!r}")

    def _read_failed(self, why: str) -> None:
        self._close_shifts(self.book.tick(time.time()))
        self.health.errors += 1
        self.health.last_error = why
        self._set_state("error", why)
        # The historian sees the gap as bad-quality data, not as silence.
        tags = self.device.tags
        sample = Sample(self.device.name, time.time(), dict.fromkeys(tags), dict.fromkeys(tags, ERROR))
        self._score(sample)
        self._publish(sample)

    # -- one sample -------------------------------------------------------------------------
    def process(self, sample: Sample) -> None:
        health = self.health
        health.last_sample = sample.ts
        bad = sample.bad_tags
        if bad or sample.problem:
            health.errors += 1
        health.bad_tags = bad
        why = f"bad tags: {', '.join(bad)}" + (f" ({sample.problem})" if sample.problem else "") if bad \
            else sample.problem
        if sample.problem:
            health.last_error = sample.problem
        # Logged again only when which tags are bad changes, not when a bad value does.
        self._set_state("degraded" if why else "ok", why, key=tuple(bad) or (why or "").split(":")[0])
        status = sample.values.get(self.device.oee.status_tag) if self.device.oee else None
        self._close_shifts(self.book.observe(sample.ts, status))  # before the counters move to the new shift
        self._update_counters(sample)
        self._score(sample)
        self._publish(sample)

    def _publish(self, sample: Sample) -> None:
        health = self.health
        if self.policy.wants(sample):
            payload = {"ts": rfc3339(sample.ts), "device": self.device.name, "values": sample.values}
            if self.scorer is not None:
                payload["score"] = None if self.scorer.state.score is None else round(self.scorer.state.score, 5)
                payload["threshold"] = self.scorer.model.threshold
            not_ok = {tag: q for tag, q in sample.quality.items() if q != OK}
            if not_ok:
                payload["quality"] = not_ok
            self.store.stage(self._telemetry_topic, payload, created=sample.ts)
            health.published += 1
            if self._counters_changed or sample.ts - self._last_counters_ts >= self.policy.max_silence:
                self._stage_counters(sample.ts)

    def _score(self, sample: Sample) -> None:
        """The anomaly model: every `stride` samples a window is scored; events go upstream at once."""
        if self.scorer is None:
            return
        values = {tag: v if sample.quality.get(tag, OK) == OK else None for tag, v in sample.values.items()}
        event = self.scorer.push(sample.ts, values)
        if event is None:
            return
        model = self.scorer.model
        payload = {"ts": rfc3339(sample.ts), "device": self.device.name, "event": event.kind,
                   "score": round(event.score, 5), "threshold": model.threshold, "model": model.name,
                   "top_tags": event.top}
        if event.kind == "end":
            payload.update(started=rfc3339(event.started), duration_s=round(sample.ts - event.started, 1),
                           peak_score=round(event.peak, 5))
        self.store.stage(self._anomaly_topic, payload, created=sample.ts)
        self.book.anomaly(sample.ts, event.kind == "start")
        tags = ", ".join(t["tag"] + (" (flatline)" if t.get("flatline") else "") for t in event.top)
        if event.kind == "start":
            log.warning("device %s: anomaly started: score %.4f > threshold %.4f; top tags %s", self.device.name,
                        event.score, model.threshold, tags, extra=fields(self.device.name, "anomaly_start"))
        else:
            log.warning("device %s: anomaly ended after %.0fs (peak score %.4f)", self.device.name,
                        sample.ts - event.started, event.peak, extra=fields(self.device.name, "anomaly_end"))

    def anomaly_status(self) -> dict | None:
        if self.scorer is None:
            return None
        st = self.scorer.state
        return {"model": self.scorer.model.name, "state": "anomaly" if st.active else
                ("normal" if st.score is not None else "not scored"), "score": st.score,
                "threshold": self.scorer.model.threshold, "windows_scored": st.scored,
                "windows_not_scored": st.unscored, "why_not_scored": st.why_unscored}

    def _update_counters(self, sample: Sample) -> None:
        shift = self.shifts.at(sample.ts)
        shift_id = shift.id if shift else None
        for counter in self.device.counters:
            raw = counters.raw_value(sample.values.get(counter.register), counter.bits)
            if raw is None:
                self._counter_problem(counter.name, f"register {counter.register} gave no valid "
                                                    f"{counter.bits}-bit counter value "
                                                    f"({sample.values.get(counter.register)!r})")
                continue
            self._counter_problem(counter.name, None)
            row, step = counters.advance(self._counters.get(counter.name), raw, counter.bits,
                                         counter.reset_threshold, shift_id, sample.ts)
            if step.event == "wrap":
                log.info("device %s: counter %s wrapped at %d bits (raw %d -> %d)", self.device.name,
                         counter.name, counter.bits, self._counters[counter.name].last_raw, raw,
                         extra=fields(self.device.name, "counter_wrap", counter=counter.name))
            elif step.event == "reset":
                log.warning("device %s: counter %s was reset on the PLC (raw %d -> %d); counting on from %d",
                            self.device.name, counter.name, self._counters[counter.name].last_raw, raw, row.total,
                            extra=fields(self.device.name, "counter_reset", counter=counter.name))
            previous = self._counters.get(counter.name)
            if previous is None or (row.total, row.shift_total, row.shift_id) != (
                    previous.total, previous.shift_total, previous.shift_id):
                self._counters_changed = True
            self._counters[counter.name] = row
            self.store.stage_counter(self.device.name, counter.name, row)

    def _close_shifts(self, closed) -> None:
        for rec in closed:
            payload = {"device": self.device.name, **summary(rec, self.device.counters, self._counters,
                                                              self.device.oee, self.gap_limit,
                                                              scored=self.scorer is not None)}
            self.store.stage(self._shift_topic, payload, created=rec.end)
            log.info("device %s: shift %s closed%s", self.device.name, rec.shift_id,
                     " (missed: the gateway was down)" if rec.missed else
                     " (partial)" if payload["partial"] else "", extra=fields(self.device.name, "shift_closed"))
        if self.book.changed and self.book.current is not None:
            self.store.stage_shift(self.device.name, self.book.current.to_json())
            self.book.changed = False

    def _counter_problem(self, name: str, problem: str | None) -> None:
        if self._counter_problems.get(name) == problem:
            return
        if problem:
            log.warning("device %s: counter %s not updated: %s", self.device.name, name, problem,
                        extra=fields(self.device.name, "counter_bad", counter=name))
            self._counter_problems[name] = problem
        else:
            if name in self._counter_problems:
                log.info("device %s: counter %s is counting again", self.device.name, name,
                         extra=fields(self.device.name, "counter_ok", counter=name))
            self._counter_problems.pop(name, None)

    def _stage_counters(self, ts: float) -> None:
        payload = {"ts": rfc3339(ts), "device": self.device.name, "counters": {
            c.name: {"total": row.total, "shift": row.shift_total, "shift_id": row.shift_id, "kind": c.kind}
            for c in self.device.counters if (row := self._counters.get(c.name)) is not None}}
        if payload["counters"]:
            self.store.stage(self._counters_topic, payload, created=ts)
        self._counters_changed = False
        self._last_counters_ts = ts

    def flush(self) -> None:
        """At shutdown: report counter totals that changed since the last counters message."""
        if self._counters_changed and self.health.last_sample is not None:
            self._stage_counters(self.health.last_sample)

    def counter_rows(self) -> dict[str, CounterRow]:
        return dict(self._counters)

    # -- state, logged once per change ---------------------------------------------------------
    def _set_state(self, state: str, why: str | None, key=None) -> None:
        old = self.health.state
        key = key if key is not None else (why or "").split(":")[0]  # the kind of problem, not its details
        if state == old and (state == "ok" or key == self._why):
            return
        self.health.state, self._why = state, key
        name = self.device.name
        extra = fields(name, f"device_{state}")
        if state == "error":
            log.error("device %s: read failed: %s (tags %s now error)", name, why, ", ".join(self.device.tags),
                      extra=extra)
        elif state == "degraded":
            log.warning("device %s: %s", name, why, extra=extra)
        elif old in ("error", "degraded"):
            log.warning("device %s: recovered, all tags ok", name, extra=extra)
        else:
            log.info("device %s: first sample read, all tags ok", name, extra=extra)
        self._on_state_change(self)

    def status(self) -> dict:
        h = self.health
        return {"state": h.state, "source": self.device.source, "errors": h.errors,
                "last_sample": rfc3339(h.last_sample) if h.last_sample else None, "last_error": h.last_error}

