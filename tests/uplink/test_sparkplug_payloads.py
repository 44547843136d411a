"""Sparkplug B payloads: what the gateway encodes, decoded with the bindings
generated from the official sparkplug_b.proto."""

from __future__ import annotations

import pytest

pytest.importorskip("google.protobuf")

from gateway import config, sources  # noqa: E402
from gateway.uplink.sparkplug import metrics  # noqa: E402
from gateway.uplink.sparkplug import sparkplug_b_pb2 as pb  # noqa: E402

CFG = config.parse("""
gateway: {id: line3-gw1, site: plant-a}
upstream: {host: h}
devices:
  - name: press1
    source: modbus_tcp
    host: 192.0.2.10
    registers:
      - {name: status, address: 0}
      - {name: temp, address: 1, type: int16, scale: 0.1}
      - {name: running, address: 2, type: bool, bit: 0}
      - {name: count, address: 3, type: uint32}
    counters: [{name: produced, register: count, bits: 32}]
  - {name: pump1, source: sim, profile: pump}
  - {name: line1, source: sim, profile: flexo_line}
""")
TYPES = {d.name: sources.tag_types(d) for d in CFG.devices}


def test_aliases_are_unique_across_the_node_and_datatypes_follow_the_registers():
    node = metrics.NodeMetrics([("Health/backlog", int(pb.UInt64))], CFG.devices, TYPES, scored={"pump1": True})
    aliases = [m.alias for m in node.node.values() if m.alias] + [m.alias for d in node.devices.values() for m in d.values()]
    assert len(aliases) == len(set(aliases)) and sorted(aliases) == list(range(1, len(aliases) + 1))
    press = node.devices["press1"]
    assert [press[t].datatype for t in ("status", "temp", "running", "count")] == [pb.UInt16, pb.Double, pb.Boolean,
                                                                                  pb.UInt32]
    assert press["counters/produced/total"].datatype == pb.UInt64
    assert node.devices["pump1"]["Anomaly/Score"].datatype == pb.Double
    assert node.devices["pump1"]["Anomaly/Active"].datatype == pb.Boolean
    # a simulated device's integer tags are integers, as in its JSON: the PLC map types them
    assert node.devices["line1"]["machine_status"].datatype == pb.UInt16
    assert node.devices["pump1"]["bearing_temp_c"].datatype == pb.Double  # int16 x 0.01
    assert node.devices["pump1"]["flow_l_min"].datatype == pb.Float
    assert node.node["Node Control/Rebirth"].datatype == pb.Boolean
    assert node.node["bdSeq"].datatype == pb.Int64


def test_tck_id_operational_behavior_data_commands_rebirth_name_aliases():
    """Node Control/Rebirth has no alias: in the NBIRTH it is named only."""
    node = metrics.NodeMetrics([], CFG.devices, TYPES)
    birth = pb.Payload.FromString(metrics.payload(1, 0, [(node.node["bdSeq"], 3, 1), (node.node["Node Control/Rebirth"],
                                                                                      False, 1)], birth=True))
    rebirth = birth.metrics[1]
    assert rebirth.name == "Node Control/Rebirth" and not rebirth.HasField("alias")
    assert birth.metrics[0].datatype == pb.Int64 and birth.metrics[0].long_value == 3


def test_birth_names_every_metric_and_data_carries_aliases_only_every_metric_timestamped():
    node = metrics.NodeMetrics([], CFG.devices, TYPES)
    press = node.devices["press1"]
    t = 1_795_500_000_123
    birth = pb.Payload.FromString(metrics.payload(t, 0, [(press["status"], 3, t - 5), (press["temp"], 41.5, t - 5),
                                                         (press["running"], 1, t - 5), (press["count"], None, t)],
                                                  birth=True))
    assert birth.seq == 0 and birth.timestamp == t
    assert [(m.name, m.alias, m.datatype) for m in birth.metrics] == [
        ("status", press["status"].alias, pb.UInt16), ("temp", press["temp"].alias, pb.Double),
        ("running", press["running"].alias, pb.Boolean), ("count", press["count"].alias, pb.UInt32)]
    assert birth.metrics[0].int_value == 3 and birth.metrics[1].double_value == 41.5
    assert birth.metrics[2].boolean_value is True and birth.metrics[3].is_null
    assert [m.timestamp for m in birth.metrics] == [t - 5, t - 5, t - 5, t]
    data = pb.Payload.FromString(metrics.payload(t + 877, 7, [(press["temp"], 41.6, t + 877)], historical=True))
    assert data.seq == 7 and not data.metrics[0].HasField("name") and data.metrics[0].alias == press["temp"].alias
    assert data.metrics[0].is_historical and data.metrics[0].timestamp == t + 877
    live = pb.Payload.FromString(metrics.payload(t + 877, 8, [(press["temp"], 41.7, t + 877)]))
    # tck-id-payloads-name-birth-data-requirement: a timestamp on every metric of live data too
    assert live.timestamp == t + 877 and live.metrics[0].timestamp == t + 877 and not live.metrics[0].is_historical


def test_uint32_goes_in_long_value_where_tahu_reads_it_signed_ints_twos_complement():
    node = metrics.NodeMetrics([], CFG.devices, TYPES)
    press = node.devices["press1"]
    data = pb.Payload.FromString(metrics.payload(1, 1, [(press["count"], 3_000_000_000, 1), (press["count"], 70_000, 1),
                                                        (press["status"], 65535, 1)]))
    assert [m.long_value for m in data.metrics[:2]] == [3_000_000_000, 70_000]
    assert not data.metrics[0].HasField("int_value") and data.metrics[2].int_value == 65535


def test_death_carries_the_sessions_bdseq_as_int64_and_topics_follow_the_specification():
    death = pb.Payload.FromString(metrics.death(255))
    assert [(m.name, m.datatype, m.long_value) for m in death.metrics] == [("bdSeq", pb.Int64, 255)]
    topics = metrics.Topics("plant-a", "line3-gw1")
    assert topics.node_topic("NBIRTH") == "spBv1.0/plant-a/NBIRTH/line3-gw1"
    assert topics.device_topic("DDATA", "press1") == "spBv1.0/plant-a/DDATA/line3-gw1/press1"
    assert metrics.Topics.state("scada-1") == "spBv1.0/STATE/scada-1"


@pytest.mark.parametrize("register,value,datatype", [
    ("{type: uint16, offset: -40}", -30, pb.Int32),  # a temperature register, raw 10
    ("{type: int16, offset: 1000}", 33000, pb.Int32),
    ("{type: int32, offset: -1}", -2**31 - 1, pb.Int64),
    ("{type: uint32, offset: 1}", 2**32, pb.UInt64),
    ("{type: uint16, offset: 10}", 65545, pb.UInt32),
    ("{type: uint16, offset: 0}", 65535, pb.UInt16),
    ("{type: uint16, offset: 1e30}", 1e30, pb.Double),  # no integer holds it
])
def test_an_integer_register_with_an_offset_is_declared_a_type_that_holds_it(register, value, datatype):
    """An attack pass, with Tahu's decoder: a uint16 with `offset: -40` kept UInt16, and its -30 went out as
    4294967266; an int16 + 1000 sent 33000 as an Int16."""
    cfg = config.parse(f"""
gateway: {{id: gw, site: s}}
upstream: {{host: h}}
devices:
  - name: plc
    source: modbus_tcp
    host: 192.0.2.10
    registers: [{{name: t, address: 0, {register[1:-1]}}}]
""")
    node = metrics.NodeMetrics([], cfg.devices, {"plc": sources.tag_types(cfg.devices[0])})
    metric = node.devices["plc"]["t"]
    assert metric.datatype == datatype
    data = pb.Payload.FromString(metrics.payload(1, 1, [(metric, value, 1)])).metrics[0]
    got = {pb.Int32: lambda: data.int_value - (2**32 if data.int_value >= 2**31 else 0),
           pb.Int64: lambda: data.long_value - (2**64 if data.long_value >= 2**63 else 0),
           pb.UInt64: lambda: data.long_value, pb.UInt32: lambda: data.long_value, pb.UInt16: lambda: data.int_value,
           pb.Double: lambda: data.double_value}[datatype]()
    assert got == value
