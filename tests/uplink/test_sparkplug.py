"""Sparkplug B against mosquitto, seen by a host application in the test that
decodes with the bindings generated from the official sparkplug_b.proto."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from tests.helpers import SCORED_PUMP, gateway_config, wait_until

pytest.importorskip("google.protobuf")

from gateway.uplink.sparkplug import sparkplug_b_pb2 as pb  # noqa: E402

pytestmark = pytest.mark.slow


class Host:
    """A Sparkplug host application: every message under spBv1.0/, decoded, in arrival order."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, pb.Payload]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"host-{os.getpid()}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("spBv1.0/#", qos=1)
        self.client.on_message = self._message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_until(self.client.is_connected, 10, what="the host to connect")

    def _message(self, client, userdata, message) -> None:
        payload = pb.Payload.FromString(message.payload) if message.topic.split("/")[1] != "STATE" else None
        with self.lock:
            self.messages.append((message.topic, payload))

    def of(self, kind: str) -> list[tuple[str, pb.Payload]]:
        with self.lock:
            return [(t, p) for t, p in self.messages if t.split("/")[2] == kind]

    def command(self, topic: str, name: str, datatype: int, **value) -> None:
        payload = pb.Payload()
        m = payload.metrics.add()
        m.name, m.datatype = name, datatype
        for field, v in value.items():
            setattr(m, field, v)
        self.client.publish(topic, payload.SerializeToString(), qos=0).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_births_aliases_seq_wrap_rebirth_refused_write_and_bdseq_on_the_will(mosquitto, gateway, tmp_path):
    host = Host(mosquitto.port)
    try:
        devices = "\n  - {name: pump1, source: sim, profile: pump, seed: 3, interval: 20ms}\n"
        text = gateway_config(tmp_path / "data", mosquitto.port, devices=devices,
                              upstream=", format: sparkplug_b, sparkplug: {group_id: plant-a, edge_node_id: gw1}")
        gw = gateway(text).start()
        wait_until(lambda: len(host.messages) > 320, 60, what="more than 256 node messages")
        topics = [t for t, _ in host.messages]
        assert topics[0] == "spBv1.0/plant-a/NBIRTH/gw1" and topics[1] == "spBv1.0/plant-a/DBIRTH/gw1/pump1"
        nbirth = host.of("NBIRTH")[0][1]
        names = {m.name: m for m in nbirth.metrics}
        assert nbirth.seq == 0 and names["Node Control/Rebirth"].datatype == pb.Boolean
        bdseq = names["bdSeq"].long_value
        dbirth = host.of("DBIRTH")[0][1]
        born = {m.alias: m.name for m in dbirth.metrics}
        assert {"motor_rpm", "bearing_temp_c"} <= set(born.values()) and all(m.datatype for m in dbirth.metrics)
        # born with the first reading, not with nulls it could have had
        assert not any(m.is_null for m in dbirth.metrics if m.name in ("motor_rpm", "bearing_temp_c"))
        assert "Node Control/Rebirth" in names and not names["Node Control/Rebirth"].HasField("alias")
        assert names["bdSeq"].datatype == pb.Int64
        # seq: 0-255 over every node message of the session, in order, wrapping
        seqs = [p.seq for _, p in host.messages if p is not None and not _.split("/")[2].endswith("DEATH")]
        assert seqs[:2] == [0, 1] and all(b == (a + 1) % 256 for a, b in zip(seqs, seqs[1:])), seqs[:300]
        for _, data in host.of("DDATA"):
            assert data.metrics and all(m.alias in born and not m.name for m in data.metrics)
            assert data.timestamp  # when it was published; its metrics, only what changed, the sample's time
        # A write is refused (read-only), a rebirth is honoured.
        host.command("spBv1.0/plant-a/DCMD/gw1/pump1", "motor_rpm", pb.Double, double_value=0.0)
        host.command("spBv1.0/plant-a/NCMD/gw1", "Node Control/Rebirth", pb.Boolean, boolean_value=True)
        wait_until(lambda: len(host.of("NBIRTH")) == 2 and len(host.of("DBIRTH")) == 2, 20, what="the rebirth")
        wait_until(lambda: 'refused a write to "motor_rpm"' in gw.logs(), 10, what="the refusal")
        # names and topics from the wire cannot rewrite the log line (a bidi override, a line break)
        host.command("spBv1.0/plant-a/DCMD/gw1/x\u202ey", "a\u202eb\nc", pb.Double, double_value=0.0)
        wait_until(lambda: 'refused a write to "a\\u202eb\\nc" on spBv1.0/plant-a/DCMD/gw1/x\\u202ey' in gw.logs(), 10,
                   what="the hostile refusal, escaped")
        gw.kill()  # kill -9: the Will says the node died, with this session's bdSeq
        wait_until(lambda: host.of("NDEATH"), 60, what="NDEATH from the Will")
        death = host.of("NDEATH")[0][1]
        assert [(m.name, m.long_value) for m in death.metrics] == [("bdSeq", bdseq)]
        again = gateway(text).start()
        wait_until(lambda: len(host.of("NBIRTH")) == 3, 30, what="the next session's birth")
        assert {m.name: m for m in host.of("NBIRTH")[-1][1].metrics}["bdSeq"].long_value == (bdseq + 1) % 256
        assert again.stop() == 0
        assert "Traceback" not in gw.logs() + again.logs()
    finally:
        host.close()


def test_a_reload_that_adds_or_removes_a_device_is_a_new_session_with_its_births(mosquitto, gateway, tmp_path):
    """A fuzzing pass: a device added by SIGHUP was polled, but its rows were acknowledged and deleted unsent (the
    old session's births did not know it); after one was removed, a rebirth raised StopIteration and the next
    reconnect ended the daemon (exit 70)."""
    import signal

    host = Host(mosquitto.port)
    try:
        one = "\n  - {name: pump1, source: sim, profile: pump, seed: 3, interval: 50ms}\n"
        two = one.replace("above: 1,", "above: 2,") + "  - {name: pump2, source: sim, profile: pump, seed: 4, " \
                                                      "interval: 50ms}\n"
        gw = gateway(gateway_config(tmp_path / "data", mosquitto.port, devices=one,
                                    upstream=", format: sparkplug_b")).start()
        wait_until(lambda: len(host.of("DDATA")) > 3, 30, what="data")
        gw.config.write_text(gw.config.read_text().replace(one, two))
        gw.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: [t for t, _ in host.of("DDATA") if t.endswith("/pump2")], 30, what="pump2's data")
        assert [t for t, _ in host.of("DBIRTH") if t.endswith("/pump2")]
        assert len(host.of("NBIRTH")) == 2 and len(host.of("NDEATH")) == 1  # the old session ended, a new began
        gw.config.write_text(gw.config.read_text().replace(two, one))
        gw.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len(host.of("NBIRTH")) == 3, 30, what="the session without pump2")
        host.command("spBv1.0/lab/NCMD/test-gw", "Node Control/Rebirth", pb.Boolean, boolean_value=True)
        wait_until(lambda: len(host.of("NBIRTH")) == 4, 30, what="the rebirth")

        def reborn() -> list[str]:
            births = [t for t, _ in host.messages if "BIRTH" in t]
            return births[len(births) - births[::-1].index("spBv1.0/lab/NBIRTH/test-gw"):]
        wait_until(reborn, 10, what="the rebirth's DBIRTH")
        time.sleep(0.5)  # one batch: a DBIRTH of pump2 would have followed at once
        assert reborn() == ["spBv1.0/lab/DBIRTH/test-gw/pump1"]
        mosquitto.kill()
        wait_until(lambda: "lost the connection" in gw.logs(), 30, what="the broker gone")
        assert "(closed by the broker or the network)" in gw.logs()  # not paho's "Unspecified error"
        mosquitto.start()
        wait_until(lambda: "connected to upstream" in gw.logs().split("lost the connection")[-1], 30,
                   what="connected again after the broker's restart")
        time.sleep(1)  # its births are out: before, the uplink ended here (StopIteration), and the daemon with 70
        assert gw.proc.poll() is None and gw.stop() == 0
        assert "Traceback" not in gw.logs()
    finally:
        host.close()


def host_state(host: Host, name: str, online: bool) -> None:
    import json
    import time
    body = json.dumps({"online": online, "timestamp": int(time.time() * 1000)}).encode()
    host.client.publish(f"spBv1.0/STATE/{name}", body, qos=1, retain=True).wait_for_publish(5)


def test_primary_host_offline_stores_then_online_replays_history_in_order_nothing_lost(mosquitto, gateway, tmp_path):
    import csv
    import subprocess
    import sys
    import time

    from tests.helpers import ENV, ROOT

    host = Host(mosquitto.port)
    try:
        host_state(host, "scada-1", False)
        devices = ("\n  - {name: pump1, source: sim, profile: pump, seed: 3, interval: 50ms,"
                   " history: {keep: 1d}}\n")
        text = gateway_config(tmp_path / "data", mosquitto.port, devices=devices,
                              upstream=", format: sparkplug_b, sparkplug: {primary_host_id: scada-1}")
        gw = gateway(text).start()
        wait_until(lambda: "connected to upstream" in gw.logs(), 30, what="the connection")
        time.sleep(2)  # the host is offline: no NBIRTH before its STATE says online, and no data
        assert not [t for t, _ in host.messages if "/STATE/" not in t]
        host_state(host, "scada-1", True)
        # Live data follows the birth promptly (a host once waited 27 s): well within the deadline here.
        wait_until(lambda: len(host.of("NBIRTH")) == 1 and any(
            not m.is_historical for _, p in host.of("DDATA") for m in p.metrics), 10, what="history, then live")
        host_state(host, "scada-1", False)
        time.sleep(1.5)
        quiet = len(host.of("DDATA"))
        time.sleep(1)
        assert len(host.of("DDATA")) == quiet  # offline again: stored, not sent
        host_state(host, "scada-1", True)
        wait_until(lambda: len(host.of("NBIRTH")) == 2, 30, what="the birth after the host's return")
        time.sleep(2)
        assert gw.stop() == 0
    finally:
        host.close()
    data = [p for _, p in host.of("DDATA")]
    stamps = [p.metrics[0].timestamp for p in data]  # the sample's time (the payload's: when it was published)
    # Each stretch of history arrives in order; every sample recorded reached the host.
    export = subprocess.run([sys.executable, "-m", "gateway", "history", "export", "pump1", "-c", str(gw.config),
                             "--csv", str(tmp_path / "h.csv")], capture_output=True, text=True, env=ENV, cwd=ROOT,
                            timeout=60)
    assert export.returncode == 0, export.stderr
    from gateway.anomaly.recording import parse_time
    with open(tmp_path / "h.csv") as fh:
        recorded = {round(parse_time(row["time"]) * 1000) for row in csv.DictReader(fh)}
    sent = set(stamps)  # the export rounds to the ms, telemetry truncates: the same sample within 1 ms
    lost = [r for r in recorded if not {r - 1, r, r + 1} & sent]
    assert not lost, (len(lost), len(recorded))
    historical = [p.metrics[0].timestamp for p in data if p.metrics[0].is_historical]
    assert historical and historical == sorted(historical)
    live = [p.metrics[0].timestamp for p in data if not p.metrics[0].is_historical]
    assert live and min(live) > min(historical)


def test_a_device_in_error_gets_ddeath_and_dbirth_again_when_it_reads(mosquitto, gateway, tmp_path):
    import sys

    from gateway.ports import free_port, listening
    from sim.plc import PUMP_MAP
    from tests.helpers import ENV, ROOT, device_yaml, spawn

    port = free_port()

    def plc():
        proc = spawn([sys.executable, "-m", "gateway", "sim", "--modbus-tcp", f"127.0.0.1:{port}"],
                     tmp_path / "sim.log", "a", env=ENV, cwd=ROOT)
        wait_until(lambda: listening(port), 20, what="the simulated PLC")
        return proc

    host = Host(mosquitto.port)
    server = plc()
    try:
        text = gateway_config(tmp_path / "data", mosquitto.port,
                              devices=device_yaml("pump1", port, 1, PUMP_MAP[:6], timeout="300ms"),
                              upstream=", format: sparkplug_b")
        gw = gateway(text).start()
        wait_until(lambda: len(host.of("DDATA")) > 3, 30, what="data")
        server.kill()
        server.wait(10)
        wait_until(lambda: host.of("DDEATH"), 30, what="DDEATH for the unreadable device")
        server = plc()
        wait_until(lambda: len(host.of("DBIRTH")) == 2, 30, what="DBIRTH when it reads again")
        kinds = [t.split("/")[2] for t, _ in host.messages if t.split("/")[2] in ("DDATA", "DDEATH", "DBIRTH")]
        death = kinds.index("DDEATH")
        assert "DDATA" not in kinds[death + 1:kinds.index("DBIRTH", death)]  # nothing from a dead device
        wait_until(lambda: host.of("DDATA")[-1][0] == "spBv1.0/lab/DDATA/test-gw/pump1" and
                   kinds.index("DBIRTH", death) < len(host.messages), 10, what="data again")
        assert len(host.of("DDEATH")) == 1  # said once, however long the device stays down
        assert gw.stop() == 0
    finally:
        server.kill()
        server.wait(10)
        host.close()


def unsent(gw, host: Host, tmp_path) -> tuple[list[int], list[int]]:
    """The sample times (ms) pump1's history recorded, as `edge-gateway history export` gives them, and
    those of them no DDATA carried."""
    import csv
    import subprocess
    import sys

    from gateway.anomaly.recording import parse_time
    from tests.helpers import ENV, ROOT

    export = subprocess.run([sys.executable, "-m", "gateway", "history", "export", "pump1", "-c", str(gw.config),
                             "--csv", str(tmp_path / "h.csv")], capture_output=True, text=True, env=ENV, cwd=ROOT,
                            timeout=60)
    assert export.returncode == 0, export.stderr
    with open(tmp_path / "h.csv") as fh:
        recorded = sorted(round(parse_time(row["time"]) * 1000) for row in csv.DictReader(fh))
    sent = {p.metrics[0].timestamp for _, p in host.of("DDATA")}  # the sample's time
    return recorded, [r for r in recorded if not {r - 1, r, r + 1} & sent]


def births_at(host: Host) -> list[tuple[str, float]]:
    """Each NBIRTH/DBIRTH's time (s), and each DBIRTH metric's newest timestamp: what a failure shows."""
    return [(t.split("/")[2], p.timestamp / 1000, max((m.timestamp for m in p.metrics), default=0) / 1000)
            for t, p in host.messages if p is not None and "BIRTH" in t]


def broker_said(broker, word: str) -> list[str]:
    """The lines of the broker's log with `word` in them."""
    log = broker.workdir / f"{broker.kind}-{broker.port}.log"
    return [line for line in log.read_text(errors="replace").splitlines() if word in line] if log.exists() else []


def test_broker_cuts_and_kill_9_lose_nothing_at_the_broker(mosquitto, gate, gateway, tmp_path):
    """QoS 0 DDATA, rows deleted only after the QoS 1 marker behind them is acknowledged: through network
    cuts and a kill -9, every recorded sample reaches the host, except those a crash never committed."""
    import time

    host = Host(mosquitto.port)
    g = gate(mosquitto.port)
    try:
        devices = "\n  - {name: pump1, source: sim, profile: pump, seed: 3, interval: 20ms, history: {keep: 1d}}\n"
        text = gateway_config(tmp_path / "data", g.port, devices=devices, upstream=", format: sparkplug_b")
        gw = gateway(text).start()
        wait_until(lambda: len(host.of("DDATA")) > 20, 30, what="data")
        for _ in range(3):  # a partition: what the gateway sends vanishes for 2 s, then the connection is cut
            g.dropping = True
            time.sleep(2)
            g.is_open, g.dropping = False, False
            g.cut()
            time.sleep(1.5)
            g.is_open = True
            before = len(host.of("NBIRTH"))
            wait_until(lambda b=before: len(host.of("NBIRTH")) > b, 30, what="the reconnect")
            time.sleep(0.5)
        killing = time.time()
        gw.kill()
        killed = time.time()  # it took samples until the signal landed (tens of ms on a loaded machine)
        births = len(host.of("NBIRTH"))
        gw = gateway(text).start()
        wait_until(lambda: len(host.of("NBIRTH")) > births, 30, what="the restarted gateway's birth")
        time.sleep(2)
        assert gw.stop() == 0
    finally:
        host.close()
    # After the kill -9: what the killed session left goes out after the new birth as history, never as live data.
    with host.lock:
        after = host.messages[max(i for i, (t, _) in enumerate(host.messages) if "/NBIRTH/" in t):]
    birth_ms = after[0][1].timestamp
    old = [p for t, p in after if "/DDATA/" in t and p.metrics[0].timestamp < birth_ms]
    assert old and all(m.is_historical for p in old for m in p.metrics)
    assert all(m.HasField("timestamp") for t, p in host.messages if p is not None for m in p.metrics
               if "/NDEATH/" not in t)
    recorded, lost = unsent(gw, host, tmp_path)
    # A kill -9 may lose the samples of its last commit interval (history is written just before the outbox).
    assert all(killing - 1.0 <= r / 1000 <= killed for r in lost), (len(lost), len(recorded), killing, killed,
                                                                   [r / 1000 for r in lost], births_at(host),
                                                                   broker_said(mosquitto, "dropped"))
    assert len(recorded) > 200


def test_live_data_goes_out_while_a_long_backlog_still_replays_as_history(mosquitto, tmp_path):
    """The backlog of an outage replays as history beside live data, not ahead of it: a sample committed
    after the births reaches the host before the last of 2,000 older ones (a window of 10 rows here,
    so the replay takes seconds). Before, live data waited behind the whole backlog (a host saw none for
    27 s after its STATE online)."""
    import asyncio
    import time

    from gateway import config, contract, sources
    from gateway.store.outbox import Outbox
    from gateway.uplink.mqtt import Uplink
    from gateway.uplink.sparkplug.uplink import SparkplugFormat

    cfg = config.parse(gateway_config(tmp_path / "data", mosquitto.port,
                                      devices="\n  - {name: pump1, source: sim, profile: pump}\n",
                                      upstream=", max_inflight: 10, format: sparkplug_b"))
    fmt = SparkplugFormat(cfg, state_path=str(tmp_path / "sparkplug.json"), scored={},
                          types_of=lambda device: sources.tag_types(cfg.devices[0]))
    store = Outbox.open(str(tmp_path / "outbox.db"))
    route = contract.Topics("edge/lab/test-gw").telemetry("pump1")
    t0 = time.time() - 100
    backlog = 2000
    for i in range(backlog):
        ts = t0 + i * 0.01
        store.stage(route, contract.telemetry("pump1", ts, {"motor_rpm": 1000.0 + i}, {}, simulated=True), created=ts)
    store.commit()
    host = Host(mosquitto.port)

    def wait(predicate, timeout: float, what: str):
        async def poll():
            deadline = time.monotonic() + timeout
            while not predicate():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                await asyncio.sleep(0.01)
        return poll()

    def historical() -> int:
        return sum(1 for _, p in host.of("DDATA") if p.metrics[0].is_historical)

    async def main() -> None:
        async with Uplink(cfg.upstream, store, fmt) as uplink:
            await wait(lambda: host.of("NBIRTH"), 20, "the births")
            now = time.time()
            store.stage(route, contract.telemetry("pump1", now, {"motor_rpm": 1.0}, {}, simulated=True), created=now)
            store.commit()
            uplink.wake()
            await wait(lambda: historical() >= backlog, 120, "the whole backlog")
            store.commit()  # the acknowledged rows deleted, as the daemon's commit loop does
    try:
        asyncio.run(main())
    finally:
        host.close()
        store.close()
    kinds = [(t.split("/")[2], p.metrics[0].is_historical if p is not None and p.metrics else None)
             for t, p in host.messages]
    data = [h for k, h in kinds if k == "DDATA"]
    live = data.index(False)
    assert data.count(True) == backlog and data.count(False) == 1
    assert live < len(data) - 200, f"the live sample came after {live} of {backlog} historical ones"
    assert kinds[0] == ("NBIRTH", False) and kinds[1][0] == "DBIRTH"


def test_a_network_that_drops_data_and_comes_back_is_noticed_and_nothing_is_lost(mosquitto, gate, gateway, tmp_path):
    """A partition that swallows what passes (a proxy's blackhole) and then heals without cutting the
    connection: the markers sent meanwhile never get their PUBACK, while later ones do. Before, their
    rows waited for a reconnect that never came and the window clogged (a long enough partition stopped
    every DDATA for good); now the gateway ends the connection as broken (the Will's NDEATH), is born again
    and sends those rows as history."""
    import time

    host = Host(mosquitto.port)
    g = gate(mosquitto.port)
    try:
        devices = "\n  - {name: pump1, source: sim, profile: pump, seed: 3, interval: 20ms, history: {keep: 1d}}\n"
        text = gateway_config(tmp_path / "data", g.port, devices=devices, upstream=", format: sparkplug_b")
        gw = gateway(text).start()
        wait_until(lambda: len(host.of("DDATA")) > 20, 30, what="data")
        g.dropping = True
        time.sleep(6)
        g.dropping = False  # healed: the same connection carries data again
        wait_until(lambda: len(host.of("NBIRTH")) == 2, 30, what="a new session after the lost packets")
        wait_until(lambda: any(m.is_historical for _, p in host.of("DDATA") for m in p.metrics), 30,
                   what="what the partition swallowed, as history")
        time.sleep(1)
        assert gw.stop() == 0
        assert "never acknowledged (the network lost them)" in gw.logs(), gw.logs()[-4000:]
    finally:
        host.close()
    kinds = [t.split("/")[2] for t, _ in host.messages]
    assert "NDEATH" in kinds[:kinds.index("NBIRTH", 1)]  # the Will: the broken session's death, before the birth
    recorded, lost = unsent(gw, host, tmp_path)
    # On a failure: which, and whether the stop kept rows in the outbox (sent at the next start, not lost).
    assert not lost and len(recorded) > 300, (len(lost), len(recorded), lost[:3], recorded[-1],
                                              [line for line in gw.logs().splitlines() if "outbox" in line][-2:])


def test_a_new_session_at_a_reload_births_what_the_old_one_knew(mosquitto, gateway, tmp_path):
    """An attack pass: a reload that began a new session (a device added) sent the DBIRTH of an unchanged device
    with its active alarm's Active, Value and Limit null: the rows that said so were acknowledged and gone."""
    import signal

    host = Host(mosquitto.port)
    try:
        one = """
  - name: pump1
    source: sim
    profile: pump
    seed: 3
    interval: 50ms
    alarms: [{name: turning, tag: motor_rpm, above: 1, severity: low}]
"""
        two = one.replace("above: 1,", "above: 2,") + "  - {name: pump2, source: sim, profile: pump, seed: 4, " \
                                                      "interval: 50ms}\n"
        gw = gateway(gateway_config(tmp_path / "data", mosquitto.port, devices=one,
                                    upstream=", format: sparkplug_b")).start()
        wait_until(lambda: "alarm turning raised" in gw.logs() and len(host.of("DDATA")) > 20, 30,
                   what="the alarm, and data after it")
        gw.config.write_text(gw.config.read_text().replace(one, two))
        gw.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len([t for t, _ in host.of("DBIRTH") if t.endswith("/pump1")]) == 2, 30,
                   what="pump1's birth in the new session")
        birth = {m.name: m for m in [p for t, p in host.of("DBIRTH") if t.endswith("/pump1")][-1].metrics}
        active = birth["Alarms/turning/Active"]
        assert not active.is_null and active.boolean_value is True
        assert birth["Alarms/turning/Limit"].double_value == 2  # the rule's now, not the old session's row's
        assert gw.stop() == 0
        assert "Traceback" not in gw.logs()
    finally:
        host.close()


def test_births_carry_the_standing_alarms_and_anomaly_where_no_row_told_them(mosquitto, gateway, tmp_path):
    """A DBIRTH declared `Alarms/*/Active` and `Anomaly/Active` null where the gateway knew them: an alarm that never
    started (not active, and its limit is the config's), and after a restart an alarm active since before it,
    whose rows were acknowledged and deleted."""
    host = Host(mosquitto.port)
    devices = SCORED_PUMP + "    alarms: [{name: turning, tag: motor_rpm, above: 1, severity: low}, " \
                            "{name: never, tag: motor_rpm, above: 1000000000}]\n"

    def births() -> list[dict[str, Any]]:
        return [{m.name: m for m in p.metrics} for t, p in host.of("DBIRTH") if t.endswith("/pump1")]
    try:
        gw = gateway(gateway_config(tmp_path / "data", mosquitto.port, devices=devices,
                                    upstream=", format: sparkplug_b")).start()
        wait_until(lambda: births() and "alarm turning raised" in gw.logs() and len(host.of("DDATA")) > 10, 30,
                   what="the birth, the alarm, and data after it")
        first = births()[0]
        for name in ("Alarms/never/Active", "Anomaly/Active"):
            assert not first[name].is_null and first[name].boolean_value is False, (name, first[name])
        assert first["Alarms/never/Limit"].double_value == 1e9
        assert gw.stop() == 0  # every row acknowledged and deleted: the next session's births cannot read them
        gw.start()
        wait_until(lambda: len(births()) == 2, 30, what="the birth after the restart")
        again = births()[1]
        assert again["Alarms/turning/Active"].boolean_value is True and not again["Alarms/turning/Active"].is_null
        assert again["Alarms/turning/Active"].timestamp < again["motor_rpm"].timestamp  # active since before
        assert again["Alarms/never/Active"].boolean_value is False and not again["Alarms/never/Active"].is_null
        assert again["Alarms/turning/Limit"].double_value == 1 and again["Anomaly/Active"].boolean_value is False
        assert gw.stop() == 0
        assert "Traceback" not in gw.logs()
    finally:
        host.close()
