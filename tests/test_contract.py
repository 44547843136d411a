"""The upstream contract: one golden payload per topic, and the documented topic table is the code's."""

from __future__ import annotations

import json
import re

from conftest import ROOT

from gateway import contract
from gateway.contract import Topics
from gateway.counters import CounterRow
from gateway.shiftbook import ShiftRecord

TS = 1_764_000_000.25  # 2025-11-24T16:00:00.250Z


def test_every_topic_is_documented():
    topics = Topics("{root}")
    code = {topics.status, topics.health} | {getattr(topics, kind)("{device}")
                                             for kind in ("telemetry", "anomaly", "counters", "shift")}
    doc = (ROOT / "docs" / "upstream.md").read_text()
    documented = set(re.findall(r"^\| `(\{root\}[^`]*)` \|", doc, flags=re.M))
    assert documented == code


def test_telemetry():
    assert contract.telemetry("pump1", TS, {"a": 1.5, "b": None}, {"a": "ok", "b": "error"}, 0.123456, 0.2,
                              scored=True) == {
        "ts": "2025-11-24T16:00:00.250Z", "device": "pump1", "values": {"a": 1.5, "b": None},
        "score": 0.12346, "threshold": 0.2, "quality": {"b": "error"}}
    assert contract.telemetry("pump1", TS, {"a": 1.5}, {"a": "ok"}) == {
        "ts": "2025-11-24T16:00:00.250Z", "device": "pump1", "values": {"a": 1.5}}


def test_anomaly():
    top = [{"tag": "vibration_mm_s", "share": 0.61}]
    assert contract.anomaly("pump1", TS, "end", 0.3, 0.2, "pump-ae", top, started=TS - 90, peak=0.51) == {
        "ts": "2025-11-24T16:00:00.250Z", "device": "pump1", "event": "end", "score": 0.3, "threshold": 0.2,
        "model": "pump-ae", "top_tags": top, "started": "2025-11-24T15:58:30.250Z", "duration_s": 90.0,
        "peak_score": 0.51}


class Spec:
    def __init__(self, name: str, kind: str) -> None:
        self.name, self.kind = name, kind


def test_counters_and_shift():
    rows = {"produced": CounterRow(7, 1000, 120, "2025-11-24/A"), "defects": CounterRow(1, 10, 3, "2025-11-24/A")}
    specs = [Spec("produced", "total"), Spec("defects", "defect"), Spec("never_read", "good")]
    assert contract.counters("line1", TS, specs, rows) == {
        "ts": "2025-11-24T16:00:00.250Z", "device": "line1", "counters": {
            "produced": {"total": 1000, "shift": 120, "shift_id": "2025-11-24/A", "kind": "total"},
            "defects": {"total": 10, "shift": 3, "shift_id": "2025-11-24/A", "kind": "defect"}}}
    rec = ShiftRecord("2025-11-24/A", "A", TS - 8 * 3600, TS, observed_s=8 * 3600.0, anomaly_s=600.0)
    rec.state_s.update(running=6 * 3600.0, idle=3600.0, down=3600.0)
    payload = contract.shift("line1", rec, specs[:2], rows, 0.5, True, 5.0, scored=True)
    assert payload == {
        "device": "line1", "ts": "2025-11-24T16:00:00.250Z", "shift_id": "2025-11-24/A", "shift": "A",
        "start": "2025-11-24T08:00:00.250Z", "end": "2025-11-24T16:00:00.250Z", "length_s": 28800.0,
        "partial": False, "observed_s": 28800.0, "counters": {"produced": 120, "defects": 3},
        "total": 120, "good": 117, "defect": 3, "quality_rate": 0.975,
        "state_s": {"running": 21600.0, "idle": 3600.0, "down": 3600.0, "planned_stop": 0.0, "unknown": 0.0},
        "availability": 0.75, "performance": 0.6667, "oee": 0.4875, "anomaly_minutes": 10.0}


def test_status_online_and_offline():
    online = json.loads(contract.status("online", "gw", "1.0", TS, {"pump1": {"state": "ok", "source": "sim"}}))
    assert online == {"state": "online", "gateway_id": "gw", "version": "1.0", "started": "2025-11-24T16:00:00.250Z",
                      "devices": {"pump1": {"state": "ok", "source": "sim"}}}
    assert "devices" not in json.loads(contract.status("offline", "gw", "1.0", TS))


def test_nothing_goes_out_as_nan():
    import pytest
    with pytest.raises(ValueError):
        contract.encode({"values": {"a": float("nan")}})
