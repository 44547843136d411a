"""One device's pipeline: its source's samples → counting → scoring → publishing → outbox.

A device's failures stay with the device: a failed read, a bad tag or a bad counter value
is counted, logged once per change of state, reported in health, and the loop goes on.
A bug while processing one sample is logged with its traceback and counted as that
device's error; it cannot stop another device or the uplink.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.config import Device
from gateway.contract import Topics
from gateway.logs import fields
from gateway.pipeline.health import DeviceHealth
from gateway.pipeline.stages import Counting, Events, OrphanedAlarms, Publishing, Scoring, UnwatchedEvent, scoring_for
from gateway.sample import Sample
from gateway.shifts import ShiftCalendar
from gateway.sources import Source
from gateway.sources.poll import PolledSource
from gateway.store.history import History
from gateway.store.outbox import Outbox
from gateway.units import rfc3339

if TYPE_CHECKING:
    from gateway.anomaly.model import Model

log = logging.getLogger("edge_gateway.pipeline.device")


class DeviceRunner:
    def __init__(self, device: Device, source: Source, outbox: Outbox, topics: Topics, shifts: ShiftCalendar,
                 on_state_change: Callable[[], None] = lambda: None, model: Model | None = None,
                 model_error: str | None = None, history: History | None = None,
                 config_path: str | None = None, before: DeviceRunner | None = None) -> None:
        self.device = device
        self.name = device.name
        self.source = source
        # A reload keeps what an unchanged device knows and no file holds: its health and counts, its newest reading,
        # its anomaly scorer's context (else each reload left it unscored for a context, and said again that its
        # model was commissioned short). Any device keeps its closed shifts for the web page.
        same = before if before is not None and before.device == device else None
        self.health: DeviceHealth = same.health if same is not None else DeviceHealth(device.name, device.tags,
                                                                                        on_state_change)
        self.health.on_change = on_state_change
        if same is not None and same.scoring is not None and model is not None and \
                same.scoring.serves(device, model, topics):
            self.scoring: Scoring | None = same.scoring
        else:
            self.scoring = scoring_for(device, model, outbox, topics, config_path, recorded=history is not None)
        self.counting = Counting(device, outbox, topics, shifts, scored=self.scoring is not None)
        self.events = Events(device, outbox, topics, self.counting) if device.oee or device.alarms else None
        # Why the configured model cannot serve this device (the daemon started without it; a reload takes it up).
        self.model_error = model_error
        if model_error is not None:
            log.error("device %s: its model cannot be used, the device runs without anomaly scoring until it is "
                      "fixed and the config reloaded (systemctl reload edge-gateway): %s", self.name, model_error,
                      extra=fields(self.name, "anomaly_model_unusable"))
        self.unwatched = UnwatchedEvent.of(device.name, outbox, topics, self.counting,
                                           "its model cannot be used" if model_error else "the device has no model any "
                                           "more") if self.scoring is None else None
        self.orphaned = OrphanedAlarms.of(device.name, device.alarms, outbox, topics, self.counting)
        self.publishing = Publishing(device, outbox, topics, self.counting, self.scoring)
        self.history = history
        self.last_sample: Sample | None = same.last_sample if same is not None else None  # the web page's
        # A new source's counts go on from the old one's, and a polled one's first reading keeps the
        # device's pace (a storm of reloads read every device at each one, and a kept scorer took them as its
        # samples). A sensor that sends on its own is taken as it sends.
        if same is None:
            self._skipped, self._dropped = 0, 0
        elif same.source is source:  # kept by a reload, with its connection: its counts go on in it
            self._skipped, self._dropped = same._skipped, same._dropped
        else:
            self._skipped, self._dropped = same.skipped_ticks, same.dropped
        self.last_read: float | None = same.last_read if same is not None else None  # good or failed
        self._resume_at = self.last_read + device.interval \
            if self.last_read is not None and isinstance(source, PolledSource) else None
        if before is not None:
            self.counting.closed = before.counting.closed  # what was closed stays true: the web page's last shifts

    @property
    def skipped_ticks(self) -> int:
        return self._skipped + self.source.skipped_ticks

    @property
    def dropped(self) -> int:
        return self._dropped + self.source.dropped

    async def run(self) -> None:
        """Process every sample the source yields, until cancelled."""
        if self._resume_at is not None:  # kept by a reload: not sooner than an interval after its last reading
            await asyncio.sleep(min(max(0.0, self._resume_at - time.time()), self.device.interval))
        async for sample in self.source.samples():
            self.process(sample)

    def process(self, sample: Sample) -> None:
        self.health.polls += 1
        self.last_read = time.time()
        self.last_sample = sample
        try:
            self._process(sample)
        except Exception as err:  # a bug must not take the device loop (or the plant) down
            log.exception("device %s: unexpected error processing a sample", self.name)
            self.health.failed(f"internal error: {err!r}")

    def _process(self, sample: Sample) -> None:
        if sample.failed:
            self.health.failed(sample.problem or "read failed")
            self.counting.tick(sample.ts)
        else:
            self.health.sampled(sample.ts, sample.bad_tags, sample.problem)
            self.counting.observe(sample)
        if self.unwatched is not None:
            self.unwatched.end(sample.ts)
            self.unwatched = None
        if self.orphaned is not None:
            self.orphaned.end(sample.ts)
            self.orphaned = None
        if self.scoring is not None and (event := self.scoring.push(sample)) is not None:
            self.counting.anomaly(sample.ts, event.kind == "start")
        if self.events is not None:
            self.events.push(sample, self.scoring is not None and self.scoring.scorer.state.active)
        self.publishing.push(sample)
        if self.history is not None:
            self.history.add(self.name, self.device.tags, sample)

    def flush(self) -> None:
        """At shutdown: report counter totals that changed since the last counters message; keep the anomaly
        event state as it is now (between samples it is saved every `SAVE_EVERY` windows)."""
        if self.counting.changed and self.health.last_sample is not None:
            self.counting.stage_counters(self.health.last_sample)
        if self.scoring is not None and self.scoring.scorer.settling:
            self.scoring.save()

    def standing(self) -> dict[str, Any]:
        """What this device's pipeline holds now that only an event tells upstream: whether its anomaly event is
        open, each alarm rule's state, the machine state. A session's births need them where no row that
        told them is left (acknowledged and deleted before a restart or a reload, or never: no alarm yet)."""
        out: dict[str, Any] = {}
        if self.scoring is not None:
            scorer = self.scoring.scorer
            out["anomaly"] = {"active": scorer.state.active, "since": scorer.event_started if scorer.state.active
                              else None}
        if self.events is not None and self.events.alarms is not None:
            states = self.events.alarms.states
            # (an alarm that is not active while its tag has no good reading: not known either way)
            out["alarms"] = {name: {"active": st.active if st.active or not st.unknown else None,
                                    "since": st.started} for name, st in states.items()}
        if self.events is not None and self.events.machine is not None and \
                (cur := self.events.machine.current).state is not None:
            out["machine"] = {"state": cur.state, "since": cur.since}  # (its reason: only a change tells it)
        return out

    def health_report(self) -> dict[str, Any]:
        h = self.health
        report: dict[str, Any] = {"state": h.state, "polls": h.polls, "errors": h.errors,
                                  "skipped_ticks": self.skipped_ticks, "dropped": self.dropped,
                                  "bad_tags": h.bad_tags,
                                  "last_error": h.last_error,
                                  "last_sample": rfc3339(h.last_sample) if h.last_sample else None}
        if self.scoring is not None:
            report["anomaly"] = self.scoring.status()
        if self.model_error is not None:
            report["model_error"] = self.model_error
        if self.events is not None:
            report.update(self.events.status())
        return report
