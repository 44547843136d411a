"""The upstream contract: every topic and every payload the gateway publishes, built here only.

    {root}/status              retained   online/offline (offline is the Last Will), version, devices
    {root}/{device}/telemetry             seq, ts, device, values [, quality] [, score, threshold]
    {root}/{device}/anomaly               event start/end, score, threshold, model, top_tags
    {root}/{device}/counters              per counter: total, shift, shift_id, kind
    {root}/{device}/shift                 a closed shift: counts, quality rate, OEE, anomaly minutes
    {root}/health                         backlog, drops, upstream, devices, inference latency

Builders return plain dicts; the outbox adds `seq` and encodes them (JSON today; another
encoding, such as Sparkplug B, is another function over the same dicts). `ts` is the
time the sample was taken (RFC 3339, UTC, milliseconds), never the time of sending.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.counters import CounterRow
from gateway.units import rfc3339

Payload = dict[str, Any]


DEVICE_KINDS = ("telemetry", "anomaly", "counters", "shift", "state", "alarm", "oee")
GATEWAY_KINDS = ("status", "health")


class Route(str):
    """A topic that knows what it carries: its `device` (None for the gateway's own) and its `kind`
    (telemetry, counters, ... status, health). It is the topic string everywhere a string is wanted;
    a format reads `device` and `kind` instead of splitting the topic."""

    device: str | None
    kind: str

    def __new__(cls, topic: str, device: str | None, kind: str) -> Route:
        route = super().__new__(cls, topic)
        route.device, route.kind = device, kind
        return route

    @classmethod
    def of(cls, topic: str) -> Route:
        """The route of a topic these builders made (a topic read back from the outbox file)."""
        if isinstance(topic, Route):
            return topic
        *head, kind = topic.split("/")
        if kind in DEVICE_KINDS and len(head) >= 2:
            return cls(topic, head[-1], kind)
        return cls(topic, None, kind)


@dataclass(frozen=True)
class Topics:
    """The topic of each kind of message under one root (`edge/{site}/{gateway_id}` by default)."""

    root: str

    @property
    def status(self) -> Route:
        return Route(f"{self.root}/status", None, "status")

    @property
    def health(self) -> Route:
        return Route(f"{self.root}/health", None, "health")

    def _device(self, device: str, kind: str) -> Route:
        return Route(f"{self.root}/{device}/{kind}", device, kind)

    def telemetry(self, device: str) -> Route:
        return self._device(device, "telemetry")

    def anomaly(self, device: str) -> Route:
        return self._device(device, "anomaly")

    def counters(self, device: str) -> Route:
        return self._device(device, "counters")

    def shift(self, device: str) -> Route:
        return self._device(device, "shift")

    def state(self, device: str) -> Route:
        return self._device(device, "state")

    def alarm(self, device: str) -> Route:
        return self._device(device, "alarm")

    def oee(self, device: str) -> Route:
        return self._device(device, "oee")


def encode(payload: Payload) -> bytes:
    """A payload as it goes on the wire: compact JSON, never NaN."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def telemetry(device: str, ts: float, values: Mapping[str, float | int | None], quality: Mapping[str, str],
              score: float | None = None, threshold: float | None = None, scored: bool = False,
              simulated: bool = False) -> Payload:
    """One sample; `quality` lists only the tags that are not ok; score and threshold when a model is attached;
    `"simulated": true` when a simulated machine made it (never mistaken for a real one upstream)."""
    payload: Payload = {"ts": rfc3339(ts), "device": device, "values": dict(values)}
    if simulated:
        payload["simulated"] = True
    if scored:
        payload["score"] = None if score is None else round(score, 5)
        payload["threshold"] = threshold
    not_ok = {tag: q for tag, q in quality.items() if q != "ok"}
    if not_ok:
        payload["quality"] = not_ok
    return payload


def anomaly(device: str, ts: float, kind: str, score: float, threshold: float, model: str,
            top_tags: list[dict[str, Any]], started: float | None = None, peak: float | None = None) -> Payload:
    """An anomaly event: `start`, or `end` with when it started, how long it lasted and its peak score."""
    payload: Payload = {"ts": rfc3339(ts), "device": device, "event": kind, "score": round(score, 5),
                        "threshold": threshold, "model": model, "top_tags": top_tags}
    if kind == "end" and started is not None and peak is not None:
        payload.update(started=rfc3339(started), duration_s=round(ts - started, 1), peak_score=round(peak, 5))
    return payload


class CounterSpec(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...


def counters(device: str, ts: float, specs: Iterable[CounterSpec], rows: Mapping[str, CounterRow]) -> Payload:
    """Every counter of a device that has a value: lifetime total, shift total, shift id and kind."""
    return {"ts": rfc3339(ts), "device": device, "counters": {
        c.name: {"total": row.total, "shift": row.shift_total, "shift_id": row.shift_id, "kind": c.kind}
        for c in specs if (row := rows.get(c.name)) is not None}}


class ShiftFacts(Protocol):
    """What the shift book knows of a closed shift."""
    @property
    def shift_id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def start(self) -> float: ...
    @property
    def end(self) -> float: ...
    @property
    def observed_s(self) -> float: ...
    @property
    def state_s(self) -> dict[str, float]: ...
    @property
    def anomaly_s(self) -> float: ...
    @property
    def missed(self) -> bool: ...
    @property
    def down_by_reason(self) -> dict[str, float]: ...
    @property
    def alarm_s(self) -> dict[str, float]: ...
    @property
    def alarm_count(self) -> dict[str, int]: ...


def shift(device: str, rec: ShiftFacts, figures: Payload, has_oee: bool, gap_limit: float, scored: bool = False,
          reasons: Mapping[int, str] | None = None) -> Payload:
    """A closed shift: its `figures` (counts by kind, quality rate, and with `oee:` availability,
    performance, OEE: `shiftbook.figures`), the down time by stop reason; time and starts of each alarm."""
    length = rec.end - rec.start
    payload: Payload = {
        "device": device, "ts": rfc3339(rec.end), "shift_id": rec.shift_id, "shift": rec.name,
        "start": rfc3339(rec.start), "end": rfc3339(rec.end), "length_s": round(length, 3),
        "partial": rec.missed or length - rec.observed_s > gap_limit, "observed_s": round(rec.observed_s, 3),
    }
    if rec.missed:
        payload.update(counters={}, missed=True)
        return payload
    payload.update(figures)
    if has_oee:
        payload["downtime_by_reason"] = downtime_by_reason(rec.down_by_reason, reasons or {})
    payload["anomaly_minutes"] = round(rec.anomaly_s / 60.0, 2) if scored else None  # None: no model attached
    payload["alarms"] = {name: {"count": rec.alarm_count.get(name, 0), "minutes": round(rec.alarm_s.get(name, 0.0) / 60.0, 2)}
                         for name in sorted(set(rec.alarm_s) | set(rec.alarm_count))}
    return payload


def downtime_by_reason(seconds: Mapping[str, float], reasons: Mapping[int, str]) -> list[Payload]:
    """Seconds down per stop reason, the longest first; time down without a code is `code: null`."""
    rows = [{"code": None if key == "none" else int(key),
             "reason": None if key == "none" else reasons.get(int(key)), "seconds": round(s, 3)}
            for key, s in seconds.items()]
    return sorted(rows, key=lambda r: -r["seconds"])


def reason(code: int | None, reasons: Mapping[int, str]) -> Payload | None:
    return None if code is None else {"code": code, "text": reasons.get(code)}


def state(device: str, ts: float, new: str, previous: str | None, previous_since: float | None,
          stop_reason: Payload | None, with_reason: bool) -> Payload:
    """A machine-state change: the new state since this sample, the one it left and how long it lasted;
    with a reason tag, why the machine stopped when it left running."""
    payload: Payload = {"ts": rfc3339(ts), "device": device, "state": new, "since": rfc3339(ts), "previous": previous,
                        "previous_duration_s": round(ts - previous_since, 3) if previous_since is not None else None}
    if with_reason and previous == "running":
        payload["reason"] = stop_reason
    return payload


def alarm(device: str, ts: float, kind: str, name: str, severity: str | None, tag: str | None,
          value: float | int | None, limit: float | None, started: float | None = None) -> Payload:
    """An alarm `start`, or its `end` with when it started and how long it lasted (severity, tag and limit null:
    the end of an alarm whose rule a reload took out, started before they were kept with it)."""
    payload: Payload = {"ts": rfc3339(ts), "device": device, "event": kind, "name": name, "severity": severity,
                        "tag": tag, "value": value, "limit": limit}
    if kind == "end" and started is not None:
        payload.update(started=rfc3339(started), duration_s=round(ts - started, 3))
    return payload


def live_oee(device: str, ts: float, rec: ShiftFacts, figures: Payload, current: str | None,
             stop_reason: Payload | None, final: bool = False) -> Payload:
    """The running shift so far, with its `figures` (`final`: the shift just closed, equal to its summary)."""
    payload: Payload = {"ts": rfc3339(ts), "device": device, "shift_id": rec.shift_id, "shift": rec.name,
                        "start": rfc3339(rec.start), "observed_s": round(rec.observed_s, 3)}
    payload.update(figures)
    payload.update(state=current, reason=stop_reason)
    if final:
        payload["final"] = True
    return payload


def status(state: str, gateway_id: str, version: str, started: float,
           devices: Mapping[str, Mapping[str, str]] | None = None) -> bytes:
    """The retained status: `online` with each device's state and source, or `offline` (the Last Will)."""
    payload: Payload = {"state": state, "gateway_id": gateway_id, "version": version, "started": rfc3339(started)}
    if devices is not None:
        payload["devices"] = {name: dict(d) for name, d in devices.items()}
    return encode(payload)


def health(report: Mapping[str, Any]) -> bytes:
    """The health message (built by `report.py`, which owns its fields)."""
    return encode(dict(report))
