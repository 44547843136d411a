"""Sparkplug B against code this project did not write: Eclipse Tahu's JavaScript codec (npm
`sparkplug-payload`, tests/interop/tahu.js) decodes every message of a real session through
mosquitto (births, DDATA, a device's DDEATH and its DBIRTH again, a rebirth it encoded itself, the
Will's NDEATH after a kill -9, the history replayed after the restart, the farewell NDEATH). Our own bindings come from the same
.proto, so only an independent decoder shows what a host built on Tahu sees (it once saw UInt32
metrics as null). `./dev test` installs the Node packages (`ensure_npm`)."""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tests.helpers import gateway_config, wait_until

pytest.importorskip("google.protobuf")

from gateway.uplink.sparkplug import sparkplug_b_pb2 as pb  # noqa: E402

pytestmark = pytest.mark.slow
INTEROP = Path(__file__).resolve().parent.parent / "interop"
PUMP_TAGS = ("motor_rpm", "bearing_temp_c", "oil_pressure_bar", "vibration_mm_s", "flow_l_min", "suction_pressure_bar",
             "discharge_pressure_bar", "motor_current_a", "casing_temp_c", "ambient_temp_c")


@pytest.fixture(scope="module")
def tahu():
    """The Tahu codec in a Node process: decode(topic, bytes) and encode(payload dict)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (./dev test installs Debian's nodejs and npm as root)")
    if not (INTEROP / "node_modules" / "sparkplug-payload").is_dir():
        npm = shutil.which("npm")
        assert npm, "node without npm: cannot install tests/interop (apt-get install npm)"
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=INTEROP, check=True, timeout=300,
                       capture_output=True)
    proc = subprocess.Popen([node, str(INTEROP / "tahu.js")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=INTEROP)

    class Codec:
        def ask(self, request: dict) -> dict:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
            answer = json.loads(proc.stdout.readline())
            assert "error" not in answer, answer["error"]
            return answer

        def decode(self, topic: str, data: bytes) -> dict:
            return self.ask({"op": "decode", "topic": topic, "b64": base64.b64encode(data).decode()})["payload"]

        def encode(self, payload: dict) -> bytes:
            return base64.b64decode(self.ask({"op": "encode", "payload": payload})["b64"])
    try:
        yield Codec()
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(10)
        proc.stdout.close()  # type: ignore[union-attr]  # else a ResourceWarning fails a later test


class Host:
    """Every message under spBv1.0/, raw, in arrival order."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"tahu-host-{os.getpid()}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("spBv1.0/#", qos=1)
        self.client.on_message = self._message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_until(self.client.is_connected, 10, what="the host to connect")

    def _message(self, client, userdata, message) -> None:
        with self.lock:
            self.messages.append((message.topic, bytes(message.payload)))

    def count(self, kind: str) -> int:
        with self.lock:
            return sum(1 for t, _ in self.messages if t.split("/")[2] == kind)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def expected(m: pb.Payload.Metric, datatype: int) -> object:
    """A metric's value as we meant it (from our bindings), in the terms Tahu's decoder gives."""
    if m.is_null:
        return None
    if datatype == pb.Boolean:
        return m.boolean_value
    if datatype in (pb.Int8, pb.Int16, pb.Int32):
        return m.int_value - (1 << 32) if m.int_value >= 1 << 31 else m.int_value
    if datatype in (pb.UInt8, pb.UInt16):
        return m.int_value
    if datatype in (pb.UInt32, pb.UInt64, pb.DateTime):
        return m.long_value
    if datatype == pb.Int64:
        return m.long_value - (1 << 64) if m.long_value >= 1 << 63 else m.long_value
    if datatype == pb.Float:
        return m.float_value
    if datatype in (pb.String, pb.Text):
        return m.string_value
    return m.double_value


def test_tahu_decodes_every_message_of_a_session_and_its_rebirth_ncmd_is_obeyed(mosquitto, gateway, tmp_path, tahu):
    host = Host(mosquitto.port)
    devices = """
  - {name: pump1, source: sim, profile: pump, seed: 3, interval: 50ms}
  - name: line1
    source: sim
    profile: flexo_line
    seed: 5
    interval: 50ms
    plc: {counter_bits: 32, start_near_top: true, rate_per_min: 6000}
    counters: [{name: produced, register: produced_raw, bits: 32}]
    oee: {status_tag: machine_status, states: {1: running, 2: idle, 3: down, 4: planned_stop}, ideal_rate: 120}
    alarms: [{name: slow, tag: line_speed_m_min, below: 1000}]
  - name: pump2
    source: sim
    profile: pump
    interval: 50ms
    faults: [FAULTS]
""".replace("FAULTS", ", ".join(f"{{fault: dropout, tag: {tag}, at: 2s, duration: 1s, ramp: 0s}}" for tag in PUMP_TAGS))
    text = gateway_config(tmp_path / "data", mosquitto.port, devices=devices,
                          upstream=", format: sparkplug_b, sparkplug: {group_id: plant-a, edge_node_id: gw1}")
    try:
        gw = gateway(text).start()
        wait_until(lambda: host.count("DDATA") > 40 and host.count("DDEATH") == 1 and host.count("DBIRTH") == 4, 60,
                   what="data, DDEATH for pump2 while every sensor drops out, and its DBIRTH when they are back")
        # A rebirth request encoded by Tahu, as a host built on it sends it.
        ncmd = tahu.encode({"timestamp": int(time.time() * 1000),
                            "metrics": [{"name": "Node Control/Rebirth", "type": "Boolean", "value": True}]})
        host.client.publish("spBv1.0/plant-a/NCMD/gw1", ncmd, qos=0).wait_for_publish(5)
        wait_until(lambda: host.count("NBIRTH") == 2, 20, what="the rebirth Tahu asked for")
        wait_until(lambda: host.count("DDATA") > 80, 60, what="more data")
        gw.kill()  # kill -9: the Will says the node died
        wait_until(lambda: host.count("NDEATH") == 1, 60, what="NDEATH from the Will")
        time.sleep(1)
        gw = gateway(text).start()
        wait_until(lambda: host.count("NBIRTH") == 3, 30, what="the next session's birth")
        wait_until(lambda: host.count("DDATA") > 150, 60, what="history and live data")
        assert gw.stop() == 0
        wait_until(lambda: host.count("NDEATH") == 2, 20, what="the farewell NDEATH")
    finally:
        host.close()
    with host.lock:
        messages = list(host.messages)
    datatypes: dict[int, int] = {}
    uint32 = historical = 0
    for topic, data in messages:
        kind = topic.split("/")[2]
        if kind in ("STATE", "NCMD", "DCMD"):  # the host's own messages
            continue
        ours = pb.Payload.FromString(data)
        theirs = tahu.decode(topic, data)
        if kind == "NBIRTH":
            datatypes.clear()
        assert len(theirs.get("metrics", [])) == len(ours.metrics), topic
        for m, t in zip(ours.metrics, theirs.get("metrics", [])):
            if kind.endswith("BIRTH") and m.HasField("alias"):
                datatypes[m.alias] = m.datatype
            datatype = m.datatype or datatypes[m.alias]
            want, got = expected(m, datatype), t["value"]
            where = f"{topic} {m.name or m.alias} ({pb.DataType.Name(datatype)})"
            if want is None:
                assert got is None, where
            elif datatype == pb.Float:
                assert math.isclose(float(got), want, rel_tol=1e-6), (where, got, want)
            elif isinstance(want, bool) or isinstance(want, str):
                assert got == want, (where, got, want)
            elif isinstance(want, int):
                assert got is not None and int(got) == want, (where, got, want)  # 64-bit values come as strings
            else:
                assert got == want, (where, got, want)
            if kind != "NDEATH":  # tck-id-payloads-name-birth-data-requirement
                assert "timestamp" in t, where
            if datatype == pb.UInt32 and want is not None and int(want) > 65535:
                uint32 += 1
            historical += bool(t.get("isHistorical"))
        if kind == "NDEATH":
            assert [(t["name"], t["type"]) for t in theirs["metrics"]] == [("bdSeq", "Int64")]
        if kind == "NBIRTH":
            rebirth = [t for t in theirs["metrics"] if t.get("name") == "Node Control/Rebirth"]
            assert rebirth and "alias" not in rebirth[0] and rebirth[0]["value"] is False
    assert uint32 > 0  # 32-bit counters past 65535 (near 2^32) read by Tahu from long_value, never null
    assert historical > 0  # the killed session's rows, replayed after the restart as history
    kinds = [t.split("/")[2] for t, _ in messages]
    assert kinds.count("NBIRTH") == 3 and kinds.count("NDEATH") == 2
    pump2 = [t.split("/")[2] for t, _ in messages if t.endswith("/pump2")]
    death = pump2.index("DDEATH")
    assert pump2[:death].count("DBIRTH") == 1 and pump2[death + 1] == "DBIRTH"  # born again when it reads


@pytest.mark.parametrize("datatype,value", [
    ("Int8", -128), ("Int16", -32768), ("Int32", -2**31), ("Int32", 2**31 - 1), ("UInt8", 255), ("UInt16", 65535),
    ("UInt32", 2**31), ("UInt32", 2**32 - 1), ("Int64", -1), ("Int64", -2**63), ("Int64", 2**63 - 1),
    ("UInt64", 2**63), ("UInt64", 2**64 - 1), ("DateTime", 1_700_000_000_123), ("Boolean", True),
    ("Double", -1e308), ("String", "h\u00e9llo"), ("Int32", None),
])
def test_tahu_reads_every_datatype_at_its_limits_as_sent(tahu, datatype, value):
    """Every scalar datatype at its limits, encoded by the gateway, decoded by Tahu as a host installs it (one
    `long` for Tahu and its protobufjs: an attack pass found two copies here, so Tahu never converted a 64-bit
    value, and Int64 -1 read as 18446744073709551615 passed unseen)."""
    from gateway.uplink.sparkplug import metrics

    metric = metrics.Metric("m", 10, metrics.dt(datatype))
    theirs = tahu.decode("spBv1.0/g/DBIRTH/n/d", metrics.payload(1, 0, [(metric, value, 1)], birth=True))
    got = theirs["metrics"][0]
    assert got["type"] == datatype
    if value is None:
        assert got["value"] is None  # (is_null: no value)
    elif isinstance(value, int) and not isinstance(value, bool):
        assert int(got["value"]) == value  # (64-bit values come as strings)
    else:
        assert got["value"] == value
