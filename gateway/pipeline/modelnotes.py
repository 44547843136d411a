"""What the daemon tells a user of a device's anomaly model that does not fit the machine, and how to fix it.

Two causes, each said once in the journal and carried in health (`anomaly.note`), `status` and the status page:

- `Recommission`: the model was commissioned on too little normal running to show the machine's slow changes;
  once the device's history holds enough, the note gives the span to train it again from.
- `OutOfModel`: the device has run outside its model for hours: an anomaly event open, or the threshold held
  after one, all that time. A fault that lasts, or running the commissioning never saw (another operating point,
  another season); said again when the machine is back within the model.

Both give the `model train` command that trains the model again from the device's own history.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

from gateway.config import DEFAULT_PATH, Device
from gateway.units import duration_text, rfc3339

if TYPE_CHECKING:
    from gateway.anomaly.model import DeviceScorer, Model

GAP_SAMPLES = 5  # a longer gap between a device's samples is not running the history recorded (as the scorer's fill)


def train_command(device: Device, model: Model, config_path: str | None) -> str:
    """`model train` from the device's history, as the user runs it (`-c` when the daemon runs another config)."""
    return f"edge-gateway model train {model.name} --device {device.name}" + (
        f" -c {shlex.quote(config_path)}" if config_path and config_path != DEFAULT_PATH else "")


def unrecorded(device: Device, recorded: bool, command: str, it: str, amount: str = "") -> str | None:
    """How to train from the device's history when it has none, or its file could not be opened; None when it is
    recorded."""
    if device.history is None:
        return (f"give the device a history (devices[].history) to record {it} on the box, then train it again from it "
                f"({command})")
    if not recorded:
        return (f"this device's history is not being recorded (the journal says why): once it is, train it again from "
                f"{amount}it ({command})")
    return None


class Recommission:
    """A model commissioned on too little normal running (`Model.short_note`), on one device: what to expect of it,
    and how to train it again from the device's own running. On a device with a history, once that history holds
    enough running since the model was taken up, it says so (once) with the span and the events in it."""

    def __init__(self, device: Device, model: Model, config_path: str | None, now: float, recorded: bool) -> None:
        """`recorded`: the device's samples go into the history (configured, and the file could be opened)."""
        from gateway.anomaly.model import SLOW_EVIDENCE_S

        self.model_name = model.name
        self.commissioned = duration_text(model.commissioned_s)
        self.span_s = SLOW_EVIDENCE_S
        self.enough = duration_text(SLOW_EVIDENCE_S)
        self.command = train_command(device, model, config_path)
        self.watching = recorded  # for the running recorded since the first sample
        self.since: float | None = None
        self.last: float | None = None
        self.recorded_s = 0.0  # running recorded since: sample to sample, gaps of more than GAP_SAMPLES not counted
        self.gap_s = GAP_SAMPLES * device.interval
        self.events = 0  # anomaly events started since
        self.first_event: float | None = None
        how = unrecorded(device, recorded, self.command, "them", f"{self.enough} of ") or (
            f"this device's history records them: once it holds {self.enough} of normal running, run {self.command} "
            f"--from {second(now)}")
        self.note = (f"model {model.name} was {model.short_note()}. Train it again from {self.enough} or more of "
                     f"normal running: {how}")

    @classmethod
    def of(cls, device: Device, model: Model, config_path: str | None, now: float, recorded: bool
           ) -> Recommission | None:
        return cls(device, model, config_path, now, recorded) if model.short_note() is not None else None

    def observe(self, ts: float, read: bool, started: bool) -> str | None:
        """One sample (while `watching`; `read`: not a failed read): the new note, once the history holds `span_s` of
        running since the first."""
        if not read:
            return None
        if self.since is None:
            self.since = ts
        elif self.last is not None and 0 < ts - self.last <= self.gap_s:
            self.recorded_s += ts - self.last
        self.last = ts
        if started:
            self.events += 1
            self.first_event = ts if self.first_event is None else self.first_event
        if self.recorded_s < self.span_s:
            return None
        self.watching = False
        if self.first_event is None:
            events = "it raised no anomaly event in them"
        else:
            events = (f"it raised {self.events} anomaly event(s) in them, the first at {second(self.first_event)}: "
                      f"if one was a fault, leave it out with --from/--to")
        self.note = (f"model {self.model_name} was commissioned on {self.commissioned} of normal running; this "
                     f"device's history now holds {self.enough} of its running since the model was taken up, and "
                     f"{events}. If that was normal running, train the model again from it: {self.command} --from "
                     f"{second(self.since)} --to {second(ts + 1)}")
        return self.note


class OutOfModel:
    """A device that has run outside its model (`DeviceScorer.outside`) for `after_s` (`SLOW_EVIDENCE_S`) or more: an
    anomaly event open, or the score above the model's threshold after one that subsided, all that time. `observe`
    says so once, and once more when the machine is back within the model; `note` holds it meanwhile. The span counts
    from the start of the event that began it (an open event's start survives a restart, as the event does)."""

    def __init__(self, device: Device, model: Model, config_path: str | None, recorded: bool) -> None:
        from gateway.anomaly.model import SLOW_EVIDENCE_S

        self.model_name = model.name
        self.after_s = SLOW_EVIDENCE_S
        self.command = train_command(device, model, config_path)
        self.unrecorded = unrecorded(device, recorded, self.command, "it")  # None: the history holds its running
        self.since: float | None = None  # the start of the event that began the span outside the model
        self.note: str | None = None

    def observe(self, ts: float, scorer: DeviceScorer) -> tuple[str, str] | None:
        """After each sample: (what to log, its journal EVENT) when the device has been outside its model for
        `after_s`, and when it is back within it after that; None otherwise (the common case: two tests)."""
        if not scorer.outside:
            if self.since is None:
                return None
            lasted, was = ts - self.since, self.note
            self.since = self.note = None
            if was is None:
                return None

            return (f"model {self.model_name} fits the machine's running again, after {duration_text(lasted)} outside "
                    f"it", "anomaly_model_fits")
        if self.since is None:
            self.since = scorer.event_started if scorer.event_started is not None else ts
        if self.note is not None or ts - self.since < self.after_s or scorer.state.score is None:
            return None  # (no score: warming up after a restart, when a resumed event may still end, or a gap)

        since = second(self.since)
        if scorer.event_started != self.since:  # another event began in the threshold held after the first
            what = f"anomaly events have been open, or the score above the model's threshold after them, since {since}"
        elif scorer.state.active:
            what = f"an anomaly event has been open since {since}"
        else:
            what = (f"the score has stayed above the model's threshold (alarms held above it) since an anomaly event "
                    f"that started at {since} subsided")
        if scorer.errors is not None:
            what += "; the tags furthest from it: " + ", ".join(t["tag"] for t in scorer.top_tags(scorer.errors))
        enough = duration_text(self.after_s)
        how = self.unrecorded or (f"the device's history holds it: {self.command} --from "
                                  f"{second(self.since - self.after_s)} takes the {enough} before it began and all of it "
                                  f"since")
        self.note = (f"model {self.model_name} has not fitted the machine's running for {duration_text(ts - self.since)}: "
                     f"{what}. Either a fault has lasted that long, or the machine now runs where the model's "
                     f"commissioning never saw it (another operating point, another season). If it runs normally, "
                     f"train the model again from running that covers this and its usual running: {how}")
        return self.note, "anomaly_model_unfit"


def second(ts: float) -> str:
    """RFC 3339 UTC to the second (as `model train --from/--to` take it)."""
    return rfc3339(ts)[:19] + "Z"
