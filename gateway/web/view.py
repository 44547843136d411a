"""What the page, the API and /metrics show, read from the running daemon's own state.

Everything here only reads: the device runners' health, their last sample, their stages
(machine state, alarms, live OEE, counters, anomaly scorer), the outbox and uplink stats.
Nothing calls into a stage in a way that changes it; in particular the scorers' latency
lists, which the health loop takes, are only looked at (`Recorder.tick`).

`Recorder` keeps what the daemon itself forgets: the anomaly score of the last hour (one
point per device per tick), the anomaly events of that hour with their top tags, the
inference latencies as a histogram, a snapshot for the live page, built once per tick
and shared by every watcher, and each device's counts since the daemon started (`totals`):
a reload that changes a device gives it a new runner whose counts start at 0, and a
Prometheus counter must never go down while the process lives.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from gateway import __version__, report, sources, tagtypes
from gateway.units import rfc3339

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.pipeline.device import DeviceRunner
    from gateway.store.history import History
    from gateway.store.outbox import Outbox
    from gateway.uplink.mqtt import Uplink



class Gateway(Protocol):
    """What the web window reads of the running daemon (`app.Gateway`), and nothing it could change."""

    @property
    def config(self) -> Config: ...
    @property
    def started(self) -> float: ...
    @property
    def devices(self) -> list[DeviceRunner]: ...
    @property
    def outbox(self) -> Outbox: ...
    @property
    def uplink(self) -> Uplink: ...
    @property
    def history(self) -> History | None: ...


HOUR = 3600.0
MAX_EVENTS = 50  # anomaly events kept per device (those of the last hour are drawn)
# Upper bounds (µs) of the inference latency histogram: one TFLite invoke is ~50-500 µs here.
LATENCY_BUCKETS_US = (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 50000.0)

# The config has no unit key: a tag's unit is read from the suffix of its name, as the
# simulated plant and most PLC tag lists write it (`bearing_temp_c`, `flow_l_min`).
UNITS = (("_temp_c", "°C"), ("_c", "°C"), ("_bar", "bar"), ("_rpm", "rpm"), ("_mm_s", "mm/s"),
         ("_l_min", "l/min"), ("_m_min", "m/min"), ("_a", "A"), ("_n", "N"), ("_s", "s"), ("_pct", "%"),
         ("_kw", "kW"), ("_v", "V"), ("_hz", "Hz"), ("_kpa", "kPa"), ("_h", "h"), ("_mm", "mm"), ("_kg", "kg"))


def unit_of(tag: str) -> str | None:
    """The unit a tag's name ends in, or None."""
    low = tag.lower()
    return next((unit for suffix, unit in UNITS if low.endswith(suffix)), None)


@dataclass
class AnomalyTrack:
    """One scored device's last hour: (ts, score, threshold, active) points and events."""
    points: deque[tuple[float, float | None, float, bool]] = field(default_factory=lambda: deque(maxlen=3700))
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))
    active: bool = False


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS_US
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_US) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, values: Iterable[float]) -> None:
        for v in values:
            i = next((i for i, b in enumerate(self.buckets) if v <= b), len(self.buckets))
            self.counts[i] += 1
            self.total += v
            self.count += 1


class Recorder:
    """The last hour of anomaly scores and events, the latency histogram, and the shared live snapshot."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.tracks: dict[str, AnomalyTrack] = {}
        self.latency = Histogram()
        self.recent: deque[float] = deque(maxlen=1000)  # the newest inference latencies (µs), for `status`
        self.events_total: dict[str, int] = {}
        self.snapshot = b"{}"
        self.ticks = 0
        self._seen: dict[str, int] = {}  # device -> windows timed when last looked
        self._runners: dict[str, DeviceRunner] = {}  # device -> its runner when last looked
        self._before: dict[str, dict[str, int]] = {}  # device -> its counts in the runners a reload replaced

    def tick(self, now: float | None = None, watched: bool = True) -> None:
        """Record this second; build the live snapshot only when a page is `watched`."""
        now = time.time() if now is None else now
        self.totals()  # (each second: a runner replaced by a reload is seen with its last counts)
        for r in self.gw.devices:
            if r.scoring is None:
                continue
            self._track(r, now)
            self._latencies(r)
        self.ticks += 1
        if watched:
            self.snap()

    def totals(self) -> dict[str, dict[str, int]]:
        """Each device's counts (COUNTED) since the daemon started: its runner's, plus those of the runners a
        reload replaced with counts starting again (a changed device: a new health, a new scorer), or removed."""
        current = {r.name: r for r in self.gw.devices}
        for name, old in list(self._runners.items()):
            new = current.get(name)
            if new is old:
                continue
            before = self._before.setdefault(name, dict.fromkeys(COUNTED, 0))
            counts = _counts(old)
            if new is None or new.health is not old.health:  # its health, skipped and dropped start again
                for key in ("samples", "errors", "skipped", "dropped"):
                    before[key] += counts[key]
            if old.scoring is not None and (new is None or new.scoring is not old.scoring):
                before["scored"] += counts["scored"]
            del self._runners[name]
        out = {}
        for name, r in current.items():
            self._runners[name] = r
            counts, earlier = _counts(r), self._before.get(name)
            out[name] = {k: v + earlier[k] for k, v in counts.items()} if earlier else counts
        return out

    def snap(self) -> bytes:
        """The live snapshot, built now."""
        self.snapshot = json.dumps(live(self.gw, self), separators=(",", ":")).encode()
        return self.snapshot

    def _track(self, r: DeviceRunner, now: float) -> None:
        assert r.scoring is not None
        track = self.tracks.setdefault(r.name, AnomalyTrack())
        state = r.scoring.scorer.state
        track.points.append((round(now, 3), _finite(state.score), r.scoring.threshold, state.active))
        if state.active and not track.active:
            scorer = r.scoring.scorer
            top = scorer.top_tags(scorer.errors) if scorer.errors is not None else []
            track.events.append({"start": now, "end": None, "top": top, "peak": state.score})
            self.events_total[r.name] = self.events_total.get(r.name, 0) + 1
        elif state.active and track.events:
            ev = track.events[-1]
            if state.score is not None and (ev["peak"] is None or state.score > ev["peak"]):
                ev["peak"] = state.score
        elif not state.active and track.active and track.events:
            track.events[-1]["end"] = now
        track.active = state.active

    def _latencies(self, r: DeviceRunner) -> None:
        """The inference latencies timed since the last tick (the health loop takes its own list: not this)."""
        assert r.scoring is not None
        state = r.scoring.scorer.state
        seen = self._seen.get(r.name, 0)
        fresh = min(state.timed - seen, len(state.recent_us)) if state.timed >= seen else len(state.recent_us)
        new = list(state.recent_us)[len(state.recent_us) - fresh:] if fresh > 0 else []
        self.latency.observe(new)
        self.recent.extend(new)
        self._seen[r.name] = state.timed

    def anomaly(self, name: str, now: float | None = None) -> dict[str, Any] | None:
        """The device's score over the last hour and its events, or None when no model scores it."""
        runner = runner_of(self.gw, name)
        if runner is None or runner.scoring is None:
            return None
        now = time.time() if now is None else now
        track = self.tracks.get(name, AnomalyTrack())
        since = now - HOUR
        pts = [p for p in track.points if p[0] >= since]
        return {"device": name, "threshold": runner.scoring.threshold, "model": runner.scoring.scorer.model.name,
                "ts": [p[0] for p in pts], "score": [p[1] for p in pts], "thresholds": [p[2] for p in pts],
                "events": [_event(e) for e in track.events if e["end"] is None or e["end"] >= since]}


COUNTED = ("samples", "errors", "skipped", "dropped", "scored")


def _counts(r: DeviceRunner) -> dict[str, int]:
    """The runner's own counts, by the names of COUNTED."""
    scored = r.scoring.scorer.state.scored if r.scoring is not None else 0
    return {"samples": r.health.polls, "errors": r.health.errors, "skipped": r.skipped_ticks, "dropped": r.dropped,
            "scored": scored}


def _event(e: dict[str, Any]) -> dict[str, Any]:
    return {"start": e["start"], "end": e["end"], "top_tags": e["top"], "peak": _finite(e["peak"])}


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def runner_of(gw: Gateway, name: str) -> DeviceRunner | None:
    return next((r for r in gw.devices if r.name == name), None)


# -- the API's documents ---------------------------------------------------------------------
def status(gw: Gateway, rec: Recorder, now: float | None = None) -> dict[str, Any]:
    """What `edge-gateway status --json` prints, from memory (the health loop's latencies are not taken)."""
    now = time.time() if now is None else now
    out = report.report(gw.config.gateway.id, gw.started, gw.outbox, gw.uplink, [], now=now, history=gw.history)
    out["devices"] = {r.name: r.health_report() for r in gw.devices}
    out["counters"] = {r.name: counters(r) for r in gw.devices}
    if rec.recent:  # as report.report says it, over the newest windows rather than the last health interval
        lat = sorted(rec.recent)
        out["inference_us"] = {"windows": len(lat), "mean": round(sum(lat) / len(lat), 1),
                                  "p95": round(lat[int(0.95 * (len(lat) - 1))], 1), "max": round(lat[-1], 1)}
    out["running"] = True
    out["age_s"] = 0.0
    return out


def counters(r: DeviceRunner) -> dict[str, Any]:
    return {name: {"total": row.total, "shift": row.shift_total, "shift_id": row.shift_id}
            for name, row in r.counting.rows.items()}


def device(gw: Gateway, r: DeviceRunner) -> dict[str, Any]:
    """One device: its health, last sample (every tag with quality and unit), states, counters, alarms, OEE, anomaly."""
    h = r.health
    sample = r.last_sample
    types = sources.tag_types(r.device, r.source)
    values = tagtypes.shape(sample.values, types) if sample is not None else {}
    tags = [{"name": t, "value": values.get(t), "quality": sample.quality.get(t, "ok") if sample else None,
             "unit": unit_of(t)} for t in r.device.tags]
    out: dict[str, Any] = {
        "name": r.name, "source": r.device.source, "state": h.state, "interval_s": r.device.interval,
        "last_sample": rfc3339(h.last_sample) if h.last_sample else None, "last_sample_ts": h.last_sample,
        "polls": h.polls, "errors": h.errors, "skipped_ticks": r.skipped_ticks,
        "dropped": r.dropped, "last_error": h.last_error, "bad_tags": h.bad_tags, "tags": tags, "counters": counters(r),
        "history": r.history is not None,
        "model_error": r.model_error,
    }
    if r.events is not None:
        out.update(r.events.status())
    if r.scoring is not None:
        scorer = r.scoring.scorer
        anomaly = r.scoring.status()
        anomaly["score"] = _finite(anomaly["score"])
        anomaly["top_tags"] = scorer.top_tags(scorer.errors) if scorer.errors is not None else []
        out["anomaly"] = anomaly
    return out


def devices(gw: Gateway) -> list[dict[str, Any]]:
    return [device(gw, r) for r in gw.devices]


def live(gw: Gateway, rec: Recorder) -> dict[str, Any]:
    """The live page's snapshot: every device, the gateway's health, each scored device's newest point."""
    now = time.time()
    st = status(gw, rec, now)
    points = {}
    for name, track in rec.tracks.items():
        if track.points:
            ts, score, threshold, active = track.points[-1]
            points[name] = {"ts": ts, "score": score, "threshold": threshold, "active": active,
                            "events": [_event(e) for e in track.events if e["end"] is None or e["end"] >= now - HOUR]}
    return {"ts": now, "gateway_id": gw.config.gateway.id, "version": __version__, "uptime_s": st["uptime_s"],
            "health": {k: st.get(k) for k in ("backlog", "dropped", "store_errors", "upstream")},
            "inference_us": _latency_summary(rec.latency), "devices": devices(gw), "anomaly": points}


def _latency_summary(h: Histogram) -> dict[str, Any] | None:
    return {"count": h.count, "mean": round(h.total / h.count, 1)} if h.count else None


def shifts(r: DeviceRunner, last: int) -> list[dict[str, Any]]:
    """The device's closed shift summaries seen since the daemon started, newest first."""
    return list(reversed(list(r.counting.closed)))[:last]
