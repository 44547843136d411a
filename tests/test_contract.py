"""The upstream contract: one golden payload per topic, and the documented topic table is the code's."""

from __future__ import annotations

import json
import re

import pytest

from gateway import contract
from gateway.contract import Topics
from gateway.counters import CounterRow
from gateway.pipeline import shiftbook
from gateway.pipeline.shiftbook import ShiftRecord
from tests.helpers import ROOT

TS = 1_764_000_000.25  # 2025-11-24T16:00:00.250Z


def test_every_topic_is_documented():
    topics = Topics("{root}")
    code = {topics.status, topics.health} | {getattr(topics, kind)("{device}")
                                             for kind in ("telemetry", "anomaly", "counters", "shift", "state", "alarm", "oee")}
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
    rec.down_by_reason.update({"11": 600.0, "31": 2700.0, "none": 300.0})
    rec.alarm_s.update(bearing_hot=90.0)
    rec.alarm_count.update(bearing_hot=2)
    figures = shiftbook.figures(rec, specs[:2], rows, 0.5, True)
    payload = contract.shift("line1", rec, figures, True, 5.0, scored=True,
                             reasons={11: "web break", 31: "electrical fault"})
    assert payload == {
        "device": "line1", "ts": "2025-11-24T16:00:00.250Z", "shift_id": "2025-11-24/A", "shift": "A",
        "start": "2025-11-24T08:00:00.250Z", "end": "2025-11-24T16:00:00.250Z", "length_s": 28800.0,
        "partial": False, "observed_s": 28800.0, "counters": {"produced": 120, "defects": 3},
        "total": 120, "good": 117, "defect": 3, "quality_rate": 0.975,
        "state_s": {"running": 21600.0, "idle": 3600.0, "down": 3600.0, "planned_stop": 0.0, "unknown": 0.0},
        "availability": 0.75, "performance": 0.6667, "oee": 0.4875, "anomaly_minutes": 10.0,
        "downtime_by_reason": [{"code": 31, "reason": "electrical fault", "seconds": 2700.0},
                               {"code": 11, "reason": "web break", "seconds": 600.0},
                               {"code": None, "reason": None, "seconds": 300.0}],
        "alarms": {"bearing_hot": {"count": 2, "minutes": 1.5}}}
    # The live OEE of the running shift carries the same figures: at the end, the same numbers.
    live = contract.live_oee("line1", TS, rec, figures, "down", {"code": 31, "text": "electrical fault"}, final=True)
    assert {k: live[k] for k in ("availability", "performance", "oee", "quality_rate", "total", "state_s")} == \
        {k: payload[k] for k in ("availability", "performance", "oee", "quality_rate", "total", "state_s")}
    assert live["state"] == "down" and live["reason"] == {"code": 31, "text": "electrical fault"} and live["final"]


def test_status_online_and_offline():
    online = json.loads(contract.status("online", "gw", "1.0", TS, {"pump1": {"state": "ok", "source": "sim"}}))
    assert online == {"state": "online", "gateway_id": "gw", "version": "1.0", "started": "2025-11-24T16:00:00.250Z",
                      "devices": {"pump1": {"state": "ok", "source": "sim"}}}
    assert "devices" not in json.loads(contract.status("offline", "gw", "1.0", TS))


def test_nothing_goes_out_as_nan():
    import pytest
    with pytest.raises(ValueError):
        contract.encode({"values": {"a": float("nan")}})


def test_values_go_out_as_the_register_map_types_them():
    from gateway import tagtypes
    from gateway.modbus_map import MapEntry

    regs = [MapEntry("count", "holding", 0, "uint32"), MapEntry("temp", "holding", 2, "int16", 0.1),
            MapEntry("level", "holding", 3, "uint16", 0.25, offset=-40.5), MapEntry("flow", "input", 0, "float32"),
            MapEntry("energy", "input", 2, "float64"), MapEntry("on", "holding", 9, "bool", bit=3),
            MapEntry("door", "coil", 0, "bool"), MapEntry("kwh", "input", 6, "float64", 0.001)]
    types = {r.name: tagtypes.of_register(r) for r in regs}
    raw = {"count": 1013.0, "temp": 438 * 0.1, "level": 7 * 0.25 - 40.5, "flow": 12.300000190734863,
           "energy": 0.1 + 0.2, "on": 1.0, "door": 0.0, "kwh": 123456789 * 0.001}
    payload = contract.telemetry("m", 0.0, tagtypes.shape(raw, types), {})
    assert contract.encode(payload) == (b'{"ts":"1970-01-01T00:00:00.000Z","device":"m","values":{"count":1013,'
                                        b'"temp":43.8,"level":-38.75,"flow":12.3,"energy":0.30000000000000004,'
                                        b'"on":1,"door":0,"kwh":123456.789}}')
    assert tagtypes.shape({"temp": None, "flow": float("nan")}, types) == {"temp": None, "flow": None}


@pytest.mark.parametrize("held,published", [(16777215.0, 16777215.0), (12345678.0, 12345678.0),
                                            (1.0000001, 1.0000001), (3.4028235e38, 3.4028235e38), (12.3, 12.3),
                                            (-0.0, -0.0), (1e-45, 1.401298e-45)])
def test_a_float32_goes_out_as_the_shortest_number_that_reads_back_as_it(held, published):
    """Seven significant digits made a PLC totaliser's 16777215 into 16777220, another float32 (so were
    12345678 and 1.0000001): a fuzzing pass against Modbus float32 registers and OPC UA Float nodes found it."""
    import struct

    from gateway import tagtypes
    f32 = struct.Struct("<f")
    value = f32.unpack(f32.pack(held))[0]  # as the PLC holds it: 12.300000190734863
    out = tagtypes.FLOAT.shape(value)
    assert out == published and f32.pack(out) == f32.pack(value)


def test_a_simulated_device_says_so():
    from gateway import config, sources, tagtypes

    device = config.parse("gateway: {id: g, site: s}\nupstream: {host: h}\ndevices:\n"
                          "  - {name: line1, source: sim, profile: flexo_line}\n").devices[0]
    types = sources.tag_types(device)
    assert types["machine_status"].kind == "int" and types["line_speed_m_min"].decimals == 1
    payload = contract.telemetry("line1", 0.0, tagtypes.shape({"machine_status": 1.0}, types), {}, simulated=True)
    assert payload == {"ts": "1970-01-01T00:00:00.000Z", "device": "line1", "simulated": True,
                       "values": {"machine_status": 1}}


def test_opc_ua_values_are_typed_by_their_nodes_datatype():
    import pytest
    ua = pytest.importorskip("asyncua").ua
    from gateway import tagtypes
    from gateway.sources.opcua import _typed, tag_type

    def typed(datatype_id: int, value):
        kind = tag_type(ua.NodeId(datatype_id, 0))
        return kind, tagtypes.shape({"v": _typed(value, kind)}, {"v": tagtypes.AS_SENT})["v"]

    assert typed(6, 50) == (tagtypes.integer("Int32"), 50)
    assert typed(1, True) == (tagtypes.BOOLEAN, 1)
    assert typed(10, 12.300000190734863) == (tagtypes.FLOAT, 12.3)
    assert typed(11, 0.1 + 0.2)[1] == 0.30000000000000004
    assert typed(8, 9007199254740993) == (tagtypes.integer("Int64"), 9007199254740993)  # exact, not via a float
    assert typed(9, 2**64 - 1)[1] == 2**64 - 1
    assert tag_type(ua.NodeId(26, 0)) == tagtypes.AS_SENT  # Number: the value keeps its own type
    payload = contract.telemetry("m", 0.0, {"big": typed(8, 9007199254740993)[1], "f": typed(10, 12.300000190734863)[1]}, {})
    assert contract.encode(payload).endswith(b'"values":{"big":9007199254740993,"f":12.3}}')
    from gateway.sample import Sample
    assert Sample.from_readings("m", 0.0, {"big": 9007199254740993}).values == {"big": 9007199254740993}
    # A value the node's DataType does not hold (the server serves another type than at connect): no value,
    # said; before, an Int32 node serving 2.5 was published as 2, 1e300 as a 301-digit integer, a Boolean's 7 as 7.
    from gateway.sources.opcua import _unfit
    for datatype_id, value in ((6, 2.5), (6, 0.4), (6, 1e300), (6, 2**31), (1, 7), (1, 2.0), (3, -1), (9, 2**64)):
        kind = tag_type(ua.NodeId(datatype_id, 0))
        assert _typed(value, kind) is None, (datatype_id, value)
        assert _unfit(value, kind).endswith(f"does not fit the node's DataType, {kind.datatype}")
    assert typed(6, 7.0)[1] == 7 and typed(1, 0.0)[1] == 0  # a whole number in range: taken
