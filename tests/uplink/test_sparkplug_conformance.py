"""Sparkplug B 3.0 edge-node assertions, each test named after the specification's `tck-id`s it
checks (specification/src/main/asciidoc/chapters/*.adoc in eclipse-sparkplug/sparkplug).

In process: the gateway's own `SparkplugFormat` over messages built by `contract.py` as the
pipeline stores them, decoded with the bindings of the official sparkplug_b.proto; the uplink's
delivery against a real socket where a CONNECT matters. Against mosquitto and Eclipse Tahu's own
decoder: tests/test_sparkplug.py and tests/test_sparkplug_interop.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

pytest.importorskip("google.protobuf")

from gateway import config, contract, sources, tagtypes  # noqa: E402
from gateway.counters import CounterRow  # noqa: E402
from gateway.store.outbox import Message  # noqa: E402
from gateway.uplink.mqtt import Packet  # noqa: E402
from gateway.uplink.sparkplug import sparkplug_b_pb2 as pb  # noqa: E402
from gateway.uplink.sparkplug.uplink import BIRTH_WAIT, SparkplugFormat  # noqa: E402

CONFIG = """
gateway: {id: gw1, site: plant-a}
upstream: {host: 127.0.0.1, format: sparkplug_b%s}
devices:
  - {name: pump1, source: sim, profile: pump}
  - name: line1
    source: sim
    profile: flexo_line
    oee: {status_tag: machine_status, states: {1: running, 2: idle, 3: down, 4: planned_stop}, ideal_rate: 120}
    alarms: [{name: web_break, tag: web_tension_n, below: 50}]
    counters: [{name: produced, register: produced_raw, bits: 16}]
"""
T0 = 1_795_500_000.0
TOPICS = contract.Topics("edge/plant-a/gw1")


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def make(tmp_path: Path, sparkplug: str = "", scored: bool = True) -> tuple[SparkplugFormat, Clock]:
    cfg = config.parse(CONFIG % (f", sparkplug: {{{sparkplug}}}" if sparkplug else ""))
    types = {d.name: sources.tag_types(d) for d in cfg.devices}
    clock = Clock()
    fmt = SparkplugFormat(cfg, state_path=str(tmp_path / "sparkplug.json"), scored={"pump1": scored},
                          types_of=types.__getitem__, clock=clock)
    return fmt, clock


class Rows:
    """Messages as the outbox holds them: a Route topic, the contract's JSON, the time of what they report."""

    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, route: contract.Route, payload: dict, ts: float) -> Message:
        self.seq += 1
        return Message(self.seq, route, contract.encode({"seq": self.seq, **payload}), ts)

    def pump(self, ts: float, bearing: float = 41.5, failed: bool = False) -> Message:
        values = {"motor_rpm": None if failed else 1480.2, "bearing_temp_c": None if failed else bearing}
        quality = dict.fromkeys(values, "error") if failed else {}
        return self(TOPICS.telemetry("pump1"), contract.telemetry("pump1", ts, values, quality, 0.12, 0.5, True), ts)

    def line(self, ts: float, status: int = 1) -> Message:
        values = {"machine_status": status, "web_tension_n": 120.0}
        return self(TOPICS.telemetry("line1"), contract.telemetry("line1", ts, values, {}, simulated=True), ts)


def decode(packets: list[Packet]) -> list[tuple[str, pb.Payload]]:
    return [(p.topic.split("/")[2], pb.Payload.FromString(p.payload)) for p in packets]


def born(fmt: SparkplugFormat, clock: Clock, rows: Rows) -> list[Packet]:
    """Connect, and the births once both devices have a reading in the outbox."""
    fmt.connect_answered()
    return fmt.session_started(lambda: [rows.pump(clock.now - 0.5), rows.line(clock.now - 0.4)])


def test_tck_id_topics_nbirth_bdseq_increment_payloads_ndeath_bdseq_and_will_message_qos_retain(tmp_path):
    fmt, clock = make(tmp_path)
    will = fmt.will()
    # tck-id-payloads-ndeath-will-message-qos / -retain, tck-id-message-flow-edge-node-birth-publish-will-message-topic
    assert (will.topic, will.qos, will.retain) == ("spBv1.0/plant-a/NDEATH/gw1", 1, False)
    death = pb.Payload.FromString(will.payload)
    assert [(m.name, m.datatype, m.long_value) for m in death.metrics] == [("bdSeq", pb.Int64, 0)]  # starts at zero
    assert not death.HasField("seq")  # tck-id-payloads-ndeath-seq
    assert fmt.will() == will  # asking again (a CONNECT that never went out) does not count
    rows = Rows()
    births = decode(born(fmt, clock, rows))
    nbirth = births[0][1]
    # tck-id-payloads-nbirth-bdseq-repeat: the NBIRTH's bdSeq is the Will's of this CONNECT
    assert {m.name: m.long_value for m in nbirth.metrics}["bdSeq"] == 0
    assert pb.Payload.FromString(fmt.will().payload).metrics[0].long_value == 1
    again, _ = make(tmp_path)  # kept across a restart (a kill -9 included: written before the CONNECT's Will counts)
    assert pb.Payload.FromString(again.will().payload).metrics[0].long_value == 1
    Path(tmp_path / "sparkplug.json").write_text(json.dumps({"bdSeq": 255}))
    wrap, _ = make(tmp_path)
    assert pb.Payload.FromString(wrap.will().payload).metrics[0].long_value == 0


@pytest.mark.parametrize("peer", ["nothing listens", "a proxy whose broker is down"])
def test_tck_id_topics_nbirth_bdseq_increment_counts_connects_the_broker_answered_not_attempts(tmp_path, peer):
    """A broker that cannot be reached never sees a CONNECT: bdSeq must not move (a host once saw it jump
    2 -> 15). That includes a proxy that takes the TCP connection, reads the CONNECT and closes (its broker
    is down): the CONNECT went out, but no broker holds its Will. Only a CONNACK proves one did."""
    import socket
    import threading

    from gateway.store.outbox import Outbox
    from gateway.uplink.mqtt import Uplink
    from tests.helpers import free_port, gateway_config

    port = free_port()
    done = threading.Event()
    proxy = threading.Thread()
    if peer != "nothing listens":
        server = socket.create_server(("127.0.0.1", port))
        server.settimeout(0.1)

        def accept_and_close() -> None:
            with server:
                while not done.is_set():
                    try:
                        conn, _ = server.accept()
                    except OSError:  # the timeout: look at `done` again
                        continue
                    with conn:
                        conn.settimeout(2)
                        conn.recv(1024)  # the CONNECT arrives here, and goes no further
        proxy = threading.Thread(target=accept_and_close)
        proxy.start()
    cfg = config.parse(gateway_config(tmp_path / "data", port, upstream=", format: sparkplug_b"))
    fmt = SparkplugFormat(cfg, state_path=str(tmp_path / "sparkplug.json"), scored={},
                          types_of=lambda device: {})
    store = Outbox.open(str(tmp_path / "outbox.db"))
    uplink = Uplink(cfg.upstream, store, fmt)
    attempts: list[float] = []

    async def main() -> None:
        enough = asyncio.Event()

        async def record(seconds: float) -> None:  # the uplink's clock seam: record, do not sleep
            attempts.append(seconds)
            if len(attempts) >= 5:
                enough.set()
            await asyncio.sleep(0)
        uplink._sleep = record  # type: ignore[method-assign]
        task = asyncio.create_task(uplink.run())
        try:
            await asyncio.wait_for(enough.wait(), 60)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await uplink.stop(flush_timeout=0)
    asyncio.run(main())
    store.close()
    done.set()
    if proxy.is_alive():
        proxy.join(5)
    # and retried on the quick schedule of a broker that is down (reconnect.down_max), not backed off to minutes
    assert max(attempts) <= cfg.upstream.reconnect.down_max
    assert len(attempts) >= 5 and fmt.bdseq is None and not (tmp_path / "sparkplug.json").exists()
    assert pb.Payload.FromString(fmt.will().payload).metrics[0].long_value == 0


def test_tck_id_payloads_dbirth_order_operational_behavior_data_publish_dbirth_values(tmp_path):
    """Births wait for the first readings, then NBIRTH and every DBIRTH at once, with current values."""
    fmt, clock = make(tmp_path)
    rows = Rows()
    fmt.connect_answered()
    assert fmt.session_started(lambda: [rows.pump(T0 - 0.5)]) == [] and not fmt.ready  # line1 not read yet
    births = decode(fmt.session_started(lambda: [rows.pump(T0 - 0.5), rows.line(T0 - 0.4)]))
    assert [k for k, _ in births] == ["NBIRTH", "DBIRTH", "DBIRTH"] and fmt.ready
    assert [p.seq for _, p in births] == [0, 1, 2]  # tck-id-topics-nbirth-seq-num, tck-id-topics-dbirth-seq
    pump = {m.name: m for m in births[1][1].metrics}
    assert pump["bearing_temp_c"].double_value == 41.5 and not pump["bearing_temp_c"].is_null
    assert pump["bearing_temp_c"].timestamp == round((T0 - 0.5) * 1000)  # the value's own time
    assert pump["Anomaly/Score"].double_value == 0.12
    line = {m.name: m for m in births[2][1].metrics}
    assert line["machine_status"].datatype == pb.UInt16 and line["machine_status"].int_value == 1
    assert line["State"].is_null  # no state change reported yet: null, declared


def test_births_stop_waiting_for_a_device_that_never_reads(tmp_path):
    fmt, clock = make(tmp_path)
    rows = Rows()
    fmt.connect_answered()
    assert fmt.session_started(lambda: [rows.pump(T0)]) == []
    clock.now += BIRTH_WAIT
    births = decode(fmt.session_started(lambda: []))
    assert [k for k, _ in births] == ["NBIRTH", "DBIRTH", "DBIRTH"]
    # tck-id-operational-behavior-data-publish-dbirth-values: null where nothing is known; a limit is the config's
    assert all(m.is_null for m in births[2][1].metrics if m.name != "Alarms/web_break/Limit")
    assert {m.name: m for m in births[2][1].metrics}["Alarms/web_break/Limit"].double_value == 50


def test_tck_id_payloads_name_birth_data_requirement_every_metric_timestamped(tmp_path):
    fmt, clock = make(tmp_path)
    rows = Rows()
    packets = born(fmt, clock, rows)
    clock.now += 1
    packets += fmt.data(rows.pump(clock.now, bearing=42.0))
    packets += fmt.live(TOPICS.health, b"", False, {"backlog": {"messages": 3}, "dropped": 0, "store_errors": 0,
                                                     "uptime_s": 12.5})
    kinds = decode(packets)
    assert [k for k, _ in kinds] == ["NBIRTH", "DBIRTH", "DBIRTH", "DDATA", "NDATA"]
    for kind, payload in kinds:
        assert payload.HasField("timestamp") and all(m.HasField("timestamp") for m in payload.metrics), kind
    ddata = kinds[3][1]
    assert [m.timestamp for m in ddata.metrics] == [round(clock.now * 1000)] * len(ddata.metrics)


def test_tck_id_operational_behavior_data_commands_rebirth_name_aliases_and_payloads_nbirth_rebirth_req(tmp_path):
    fmt, clock = make(tmp_path)
    nbirth = decode(born(fmt, clock, Rows()))[0][1]
    rebirth = [m for m in nbirth.metrics if m.name == "Node Control/Rebirth"]
    assert len(rebirth) == 1 and not rebirth[0].HasField("alias")
    assert rebirth[0].datatype == pb.Boolean and rebirth[0].boolean_value is False
    aliases = [m.alias for _, p in decode(born(fmt, clock, Rows())) for m in p.metrics if m.HasField("alias")]
    assert len(aliases) == len(set(aliases))  # tck-id-payloads-alias-uniqueness


def test_tck_id_payloads_alias_data_cmd_requirement_metric_datatype_not_req_topics_ddata_payload(tmp_path):
    fmt, clock = make(tmp_path)
    rows = Rows()
    born(fmt, clock, rows)
    clock.now += 1
    first = decode(fmt.data(rows.pump(clock.now, bearing=42.0)))
    assert [m.HasField("name") or m.HasField("datatype") for m in first[0][1].metrics] == [False] * len(first[0][1].metrics)
    assert len(first[0][1].metrics) == 1  # only bearing_temp_c changed since the DBIRTH
    clock.now += 1
    assert fmt.data(rows.pump(clock.now, bearing=42.0)) == []  # nothing changed: nothing sent


def test_tck_id_payloads_sequence_num_incrementing_over_every_node_message_and_wraps(tmp_path):
    fmt, clock = make(tmp_path)
    rows = Rows()
    seqs = [p.seq for _, p in decode(born(fmt, clock, rows))]
    for i in range(300):
        clock.now += 1
        seqs += [p.seq for _, p in decode(fmt.data(rows.pump(clock.now, bearing=40 + i * 0.01)))]
    assert seqs[:3] == [0, 1, 2] and all(b == (a + 1) % 256 for a, b in zip(seqs, seqs[1:]))


def test_rows_older_than_the_birth_are_historical_never_live(tmp_path):
    """After a kill -9 and a restart (or a reconnect, a rebirth, the host's return), what was stored before
    this session's NBIRTH goes out with is_historical on every metric; a host once saw a counter go 1003 -> 3."""
    fmt, clock = make(tmp_path)
    rows = Rows()
    old = [rows.pump(T0 - 34 + i, bearing=30 + i) for i in range(3)]
    counters = rows(TOPICS.counters("line1"), contract.counters(
        "line1", T0 - 33, [config.parse(CONFIG % "").devices[1].counters[0]],
        {"produced": CounterRow(3, 1003, 3, "s1", T0 - 33)}), T0 - 33)
    born(fmt, clock, rows)
    history = decode(fmt.data(old[0]) + fmt.data(counters) + fmt.data(old[1]))
    assert [k for k, _ in history] == ["DDATA"] * 3
    assert all(m.is_historical and m.timestamp < T0 * 1000 for _, p in history for m in p.metrics)
    clock.now += 1
    live = decode(fmt.data(rows.pump(clock.now, bearing=50)))
    assert live and not any(m.is_historical for _, p in live for m in p.metrics)


def test_tck_id_operational_behavior_device_ddeath_once_then_dbirth_when_it_reads(tmp_path):
    fmt, clock = make(tmp_path)
    rows = Rows()
    born(fmt, clock, rows)
    out = []
    for failed in (True, True, False):
        clock.now += 1
        out += decode(fmt.data(rows.pump(clock.now, failed=failed)))
        out += decode(fmt.data(rows(TOPICS.anomaly("pump1"), contract.anomaly(
            "pump1", clock.now, "start", 0.9, 0.5, "pump-ae", []), clock.now)))
    kinds = [k for k, _ in out]
    # dead: the anomaly's start (the gateway's own figure) is born with the tags null and dies again, once; the
    # failed reading and the same start again send nothing; the good reading births it (and the start's score follows)
    assert kinds == ["DDEATH", "DBIRTH", "DDEATH", "DBIRTH", "DDATA"], kinds
    assert out[0][1].HasField("seq")  # tck-id-payloads-ddeath-seq
    birth = {m.name: m for m in out[1][1].metrics}
    assert birth["motor_rpm"].is_null and birth["bearing_temp_c"].is_null and birth["Anomaly/Active"].boolean_value


def test_a_shift_closed_while_the_device_is_dead_reaches_the_host(tmp_path):
    """An attack pass: two shifts closed while a PLC was switched off were handed over as no packets, so the uplink
    deleted their rows unsent; its next DBIRTH had only the last. Each reaches the host now: born for it with its tags
    null (tck-id-operational-behavior-data-publish-dbirth-values), then dead again (no DDATA after a DDEATH)."""
    fmt, clock = make(tmp_path)
    rows = Rows()
    born(fmt, clock, rows)

    def shift(sid: str) -> Message:
        return rows(TOPICS.shift("line1"), {"ts": "x", "device": "line1", "shift_id": sid, "shift": sid[-1],
                                            "length_s": 28800.0, "partial": False, "total": 1000, "good": 990,
                                            "defect": 10, "quality_rate": 0.99, "availability": 0.9,
                                            "performance": 0.8, "oee": 0.7128, "anomaly_minutes": None}, clock.now)
    failed = rows(TOPICS.telemetry("line1"), contract.telemetry(
        "line1", clock.now + 1, {"machine_status": None, "web_tension_n": None},
        {"machine_status": "error", "web_tension_n": "error"}, simulated=True), clock.now + 1)
    clock.now += 1
    out = decode(fmt.data(failed))
    for sid in ("2026-12-05/B", "2026-12-05/C"):
        clock.now += 1
        out += decode(fmt.data(shift(sid)))
    assert [k for k, _ in out] == ["DDEATH", "DBIRTH", "DDEATH", "DBIRTH", "DDEATH"]
    seqs = [p.seq for _, p in out]
    assert all(b == (a + 1) % 256 for a, b in zip(seqs, seqs[1:])), seqs
    ids = [{m.name: m for m in p.metrics}["Shift/Last/ID"].string_value for k, p in out if k == "DBIRTH"]
    assert ids == ["2026-12-05/B", "2026-12-05/C"]
    for k, p in out:
        if k == "DBIRTH":
            tags = {m.name: m for m in p.metrics}
            assert tags["machine_status"].is_null and tags["web_tension_n"].is_null
    clock.now += 1
    again = decode(fmt.data(rows.line(clock.now)))  # the PLC back: born with its reading
    assert [k for k, _ in again] == ["DBIRTH"]
    assert {m.name: m for m in again[0][1].metrics}["web_tension_n"].double_value == 120.0


def test_a_stored_value_its_metric_cannot_hold_goes_out_null_never_wrapped(tmp_path, caplog):
    """An attack pass: a row stored while a tag's register was int16 (-5), sent after a reload made it uint16, went out
    as UInt16 4294967291 (and a float32 level of 12.7 as 12)."""
    import logging

    fmt, clock = make(tmp_path)
    rows = Rows()
    born(fmt, clock, rows)
    fmt.metrics.retype("line1", {"machine_status": tagtypes.integer("UInt16")})
    clock.now += 1
    with caplog.at_level(logging.WARNING):
        for status in (-5, 12.7, -5):
            msg = rows(TOPICS.telemetry("line1"), contract.telemetry(
                "line1", clock.now, {"machine_status": status, "web_tension_n": 120.0}, {}, simulated=True), clock.now)
            out = decode(fmt.data(msg))
            if out:
                assert {m.alias: m for m in out[0][1].metrics}[fmt.metrics.devices["line1"]["machine_status"].alias
                                                                 ].is_null
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "machine_status = -5" in said[0] and "UInt16: sent as null" in said[0], said
    assert fmt.unheld == 3 and fmt.damaged == 0


def test_machine_events_are_device_metrics_declared_in_the_dbirth(tmp_path):
    fmt, clock = make(tmp_path)
    rows = Rows()
    line = {m.name: m for m in decode(born(fmt, clock, rows))[2][1].metrics}
    for name in ("State", "State/Reason Code", "State/Reason", "OEE/Availability", "OEE/Performance", "OEE/Quality",
                 "OEE/OEE", "Alarms/web_break/Active", "Alarms/web_break/Value", "Alarms/web_break/Limit",
                 "Shift/Last/ID", "Shift/Last/OEE", "Shift/Last/Start", "counters/produced/total"):
        assert name in line, name
    clock.now += 1
    t = clock.now
    events = [rows(TOPICS.state("line1"), contract.state("line1", t, "down", "running", t - 60,
                                                         {"code": 7, "text": "web break"}, True), t),
              rows(TOPICS.alarm("line1"), contract.alarm("line1", t, "start", "web_break", "medium",
                                                         "web_tension_n", 12.5, 50.0), t),
              rows(TOPICS.oee("line1"), {"ts": "x", "device": "line1", "availability": 0.9, "performance": 0.8,
                                         "quality_rate": 0.99, "oee": 0.7128}, t),
              rows(TOPICS.shift("line1"), {"ts": "x", "device": "line1", "shift_id": "2026-12-05/A", "shift": "A",
                                           "length_s": 28800.0, "partial": False, "total": 1000, "good": 990,
                                           "defect": 10, "quality_rate": 0.99, "availability": 0.9,
                                           "performance": 0.8, "oee": 0.7128, "anomaly_minutes": None}, t)]
    got: dict[str, pb.Payload.Metric] = {}
    alias = {m.alias: name for name, m in line.items()}
    for _, payload in decode([p for msg in events for p in fmt.data(msg)]):
        got.update({alias[m.alias]: m for m in payload.metrics})
    assert got["State"].string_value == "down" and got["State/Reason Code"].int_value == 7
    assert got["State/Reason"].string_value == "web break"
    assert got["Alarms/web_break/Active"].boolean_value is True and got["Alarms/web_break/Value"].double_value == 12.5
    assert got["OEE/OEE"].double_value == 0.7128 and got["OEE/Quality"].double_value == 0.99
    assert got["Shift/Last/ID"].string_value == "2026-12-05/A" and got["Shift/Last/Total"].long_value == 1000
    assert got["Shift/Last/End"].long_value - got["Shift/Last/Start"].long_value == 28_800_000
    assert "Shift/Last/Anomaly Minutes" not in got  # null in the DBIRTH, still null: not sent again


def test_tck_id_message_flow_edge_node_birth_publish_phid_wait_online_timestamp_and_host_offline(tmp_path):
    fmt, clock = make(tmp_path, "primary_host_id: scada-1")
    rows = Rows()
    fmt.connect_answered()
    assert ("spBv1.0/STATE/scada-1", 1) in fmt.subscriptions()
    newest = lambda: [rows.pump(T0), rows.line(T0)]  # noqa: E731
    assert fmt.session_started(newest) == [] and not fmt.ready  # tck-id-operational-behavior-edge-node-birth-sequence-wait
    state = "spBv1.0/STATE/scada-1"
    reaction = fmt.received(state, json.dumps({"online": True, "timestamp": 2000}).encode())
    assert reaction.resend and fmt.session_started(newest)[0].topic.endswith("/NBIRTH/gw1")
    # A STATE older than the last one is stale (tck-id-message-flow-edge-node-birth-publish-phid-wait-timestamp)
    assert fmt.received(state, json.dumps({"online": False, "timestamp": 1000}).encode()).packets == [] and fmt.ready
    # tck-id-operational-behavior-edge-node-termination-host-offline: NDEATH, then the connection ends
    off = fmt.received(state, json.dumps({"online": False, "timestamp": 3000}).encode())
    assert off.reconnect and [p.topic for p in off.packets] == ["spBv1.0/plant-a/NDEATH/gw1"] and not fmt.ready


def test_tck_id_operational_behavior_edge_node_termination_host_offline_timestamp_with_a_host_clock_ahead(tmp_path):
    """An attack pass: a host whose clock runs 120 s ahead of the node's: online T1, online T1 + 10 s (it
    reconnected), then its old session's offline, stamped T1, arrives late. The node "MUST NOT disconnect if the
    timestamp value is less than the value from the previous online STATE message"; it did (it compared with the
    host's stamps clamped to its own clock)."""
    fmt, clock = make(tmp_path, "primary_host_id: scada-1")
    rows = Rows()
    fmt.connect_answered()
    state, t1 = "spBv1.0/STATE/scada-1", int((T0 + 120) * 1000)
    assert fmt.received(state, json.dumps({"online": True, "timestamp": t1}).encode()).resend
    fmt.session_started(lambda: [rows.pump(T0), rows.line(T0)])
    clock.now += 10
    fmt.received(state, json.dumps({"online": True, "timestamp": t1 + 10_000}).encode())
    late = fmt.received(state, json.dumps({"online": False, "timestamp": t1}).encode())
    assert late.packets == [] and not late.reconnect and fmt.ready
    off = fmt.received(state, json.dumps({"online": False, "timestamp": t1 + 10_000}).encode())  # its own Will
    assert off.reconnect and not fmt.ready


def test_tck_id_operational_behavior_data_commands_rebirth_action_2_and_3(tmp_path):
    """A Tahu-style NCMD (the metric by name, Boolean true): a complete birth sequence with the same bdSeq."""
    fmt, clock = make(tmp_path)
    first = decode(born(fmt, clock, Rows()))
    command = pb.Payload(timestamp=1)
    m = command.metrics.add()
    m.name, m.datatype, m.boolean_value = "Node Control/Rebirth", pb.Boolean, True
    again = decode(fmt.received("spBv1.0/plant-a/NCMD/gw1", command.SerializeToString()).packets)
    assert [k for k, _ in again] == ["NBIRTH", "DBIRTH", "DBIRTH"] and again[0][1].seq == 0
    bdseq = [{mm.name: mm.long_value for mm in p.metrics}["bdSeq"] for _, p in (first[0], again[0])]
    assert bdseq[0] == bdseq[1]
    write = pb.Payload(timestamp=1)
    w = write.metrics.add()
    w.name, w.datatype, w.double_value = "motor_rpm", pb.Double, 0.0
    assert fmt.received("spBv1.0/plant-a/DCMD/gw1/pump1", write.SerializeToString()).packets == []  # read-only


def test_tck_id_operational_behavior_data_commands_rebirth_action_1_a_request_after_the_births_is_answered(tmp_path):
    """An attack pass: births, then half a second later a host that saw a gap after them asks again; the request was
    dropped (births at most every second). A request stamped before the last births is answered by them; one
    stamped after them gets births, at most every 0.25 s."""
    import time

    fmt, clock = make(tmp_path)
    born(fmt, clock, Rows())

    def ask(stamp_ms: int) -> list[str]:
        command = pb.Payload(timestamp=stamp_ms)
        m = command.metrics.add()
        m.name, m.datatype, m.boolean_value = "Node Control/Rebirth", pb.Boolean, True
        return [k for k, _ in decode(fmt.received("spBv1.0/plant-a/NCMD/gw1", command.SerializeToString()).packets)]

    births = ["NBIRTH", "DBIRTH", "DBIRTH"]
    assert ask(int(T0 * 1000)) == births
    assert ask(int(T0 * 1000) - 5) == []  # made before these births: they answer it
    time.sleep(0.3)
    clock.now += 0.3
    assert ask(int(clock.now * 1000)) == births  # after them
    assert ask(int(clock.now * 1000) + 1) == []  # (at most every 0.25 s, whatever the stamps say)


def test_a_tag_is_declared_with_the_type_its_source_learned_by_the_time_of_the_dbirth(tmp_path):
    """An OPC UA node's DataType is read at connect, after the uplink was built: the DBIRTH declares it."""
    from gateway import tagtypes

    cfg = config.parse(CONFIG % "")
    learned: dict[str, dict[str, tagtypes.TagType]] = {d.name: sources.tag_types(d) for d in cfg.devices}
    clock = Clock()
    fmt = SparkplugFormat(cfg, state_path=str(tmp_path / "sparkplug.json"), scored={},
                          types_of=lambda device: learned[device], clock=clock)
    learned["pump1"] = {**learned["pump1"], "motor_rpm": tagtypes.integer("Int64")}
    rows = Rows()
    fmt.connect_answered()
    pump = {m.name: m for m in decode(fmt.session_started(lambda: [rows.pump(T0), rows.line(T0)]))[1][1].metrics}
    assert pump["motor_rpm"].datatype == pb.Int64 and pump["bearing_temp_c"].datatype == pb.Double


def test_a_device_born_before_its_source_knew_the_types_is_born_again_with_them(tmp_path):
    """An attack pass: an OPC UA server slower than the births (5 s): the DBIRTH declared every tag Double (null),
    then the DataTypes were learned, and a UInt64 of 2^60 + 1 went out as the double 1.152921504606847e18 until a
    rebirth. The first reading after the types are known brings a DBIRTH that declares them, carrying it."""
    from gateway import tagtypes

    cfg = config.parse(CONFIG % "")
    learned: dict[str, dict[str, tagtypes.TagType]] = {d.name: sources.tag_types(d) for d in cfg.devices}
    learned["pump1"] = dict.fromkeys(learned["pump1"], tagtypes.AS_SENT)  # (not connected yet)
    clock = Clock()
    fmt = SparkplugFormat(cfg, state_path=str(tmp_path / "sparkplug.json"), scored={},
                          types_of=lambda device: learned[device], clock=clock)
    fmt.learning.add("pump1")  # (the simulated pump stands for an OPC UA device here: its types come at connect)
    rows = Rows()
    fmt.connect_answered()
    births = decode(fmt.session_started(lambda: [rows.pump(T0), rows.line(T0)]))
    assert {m.name: m for m in births[1][1].metrics}["motor_rpm"].datatype == pb.Double
    clock.now += 1
    assert [k for k, _ in decode(fmt.data(rows.pump(clock.now, bearing=42.0)))] == ["DDATA"]  # still unknown
    learned["pump1"] = {**learned["pump1"], "motor_rpm": tagtypes.integer("UInt64")}
    clock.now += 1
    reading = rows(TOPICS.telemetry("pump1"), contract.telemetry(
        "pump1", clock.now, {"motor_rpm": 2**60 + 1, "bearing_temp_c": 42.0}, {}, None, None, True), clock.now)
    again = decode(fmt.data(reading))
    assert [k for k, _ in again] == ["DBIRTH"]
    rpm = {m.name: m for m in again[0][1].metrics}["motor_rpm"]
    assert rpm.datatype == pb.UInt64 and rpm.long_value == 2**60 + 1
    clock.now += 1
    assert [k for k, _ in decode(fmt.data(rows.pump(clock.now, bearing=43.0)))] == ["DDATA"]  # once


def test_a_device_dead_at_the_birth_is_born_by_its_next_good_reading_even_one_stored_before_it(tmp_path):
    """After a restart the newest stored reading of pump1 had failed: no DBIRTH with the births. The first good
    reading, although older than the NBIRTH (history), brings its DBIRTH, then goes out as history."""
    fmt, clock = make(tmp_path)
    rows = Rows()
    fmt.connect_answered()
    births = decode(fmt.session_started(lambda: [rows.pump(T0 - 1, failed=True), rows.line(T0 - 1)]))
    assert [t for t, _ in births] == ["NBIRTH", "DBIRTH"]  # line1 only
    assert fmt.data(rows.pump(T0 - 0.9, failed=True)) == []
    out = decode(fmt.data(rows.pump(T0 - 0.5, bearing=43.0)))
    assert [k for k, _ in out] == ["DBIRTH", "DDATA"] and all(m.is_historical for m in out[1][1].metrics)


def test_tck_id_payloads_ddata_timestamp_and_ddeath_timestamp_are_when_published(tmp_path):
    """An attack pass: a DDATA's payload timestamp was its sample's time (hours old for history replayed after an
    outage); it is when the message is published, each metric keeping its value's time."""
    fmt, clock = make(tmp_path)
    rows = Rows()
    born(fmt, clock, rows)
    old, live = rows.pump(T0 - 3600, bearing=50.0), rows.pump(clock.now + 1, bearing=51.0)
    clock.now += 2  # (handed over a little after its sample: a group commit)
    sent = decode(fmt.data(old) + fmt.data(live) + fmt.data(rows.pump(clock.now - 0.5, failed=True)))
    assert [k for k, _ in sent] == ["DDATA", "DDATA", "DDEATH"]
    assert all(p.timestamp == round(clock.now * 1000) for _, p in sent)
    assert {m.timestamp for m in sent[0][1].metrics} == {round((T0 - 3600) * 1000)}
    assert {m.timestamp for m in sent[1][1].metrics} == {round((T0 + 1) * 1000)}
