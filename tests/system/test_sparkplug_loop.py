"""Sparkplug B through a loop of real faults, seen by a primary host that decodes every message with
Eclipse Tahu's own codec (npm `sparkplug-payload`, tests/interop/tahu.js): the daemon killed with
-9 and restarted, mosquitto killed and restarted, the network cut after a partition that swallows
bytes, and the primary host going offline and online again (Sparkplug 3.0 STATE: JSON, retained,
QoS 1, the Will with the timestamp of the CONNECT, `online: true` with the same timestamp).

Checked per the 3.0 specification over the whole run: each session opens with NBIRTH (seq 0) and
the DBIRTHs before any DDATA; NBIRTH's bdSeq is the bdSeq of its session's NDEATH and advances by
exactly one per CONNECT the broker saw (counted in mosquitto's log); seq runs on by one (mod 256)
within a session; every metric has a timestamp; data older than the current birth is
is_historical, live data never older; a counter never goes back in live data; and every sample
the gateway recorded reaches the host (live or as history), except those of the last commit
interval before each kill -9. The times from STATE online to the first live DDATA and from a
restart to NBIRTH are printed, not asserted (tests never time things; bench/sparkplug_host.py
measures them).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from tests.helpers import ENV, ROOT, gateway_config, wait_until
from tests.uplink.test_sparkplug_interop import tahu  # noqa: F401  (the fixture: Tahu's codec in a Node process)

pytest.importorskip("google.protobuf")

pytestmark = pytest.mark.slow
HOST_ID = "scada-1"
STATE = f"spBv1.0/STATE/{HOST_ID}"
NODE = "test-gw"
DEVICES = ("pump1", "line1", "pump2")
LOST = "spBv1.0/-/LOST"  # the recorder's own mark: its connection to the broker ended


class Recorder:
    """Every message under spBv1.0/ with its arrival time, through broker restarts (reconnects at once)."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[float, str, bytes]] = []
        self.lock = threading.Lock()
        self.subscribed = 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"recorder-{os.getpid()}")
        self.client.reconnect_delay_set(0.05, 0.2)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("spBv1.0/#", qos=1)
        self.client.on_subscribe = self._subscribed
        self.client.on_message = self._message
        self.client.on_disconnect = self._lost
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        wait_until(lambda: self.subscribed, 10, what="the recorder's subscription")

    def _subscribed(self, *args) -> None:
        self.subscribed += 1

    def _message(self, client, userdata, message) -> None:
        with self.lock:
            self.messages.append((time.monotonic(), message.topic, bytes(message.payload)))

    def _lost(self, *args) -> None:  # the broker went away: every session it carried is over for a host
        with self.lock:
            self.messages.append((time.monotonic(), LOST, b""))

    def of(self, kind: str, since: float = 0.0) -> list[tuple[float, str, bytes]]:
        with self.lock:
            return [m for m in self.messages if m[0] >= since and m[1].split("/")[2] == kind]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class PrimaryHost:
    """The primary host's session as Sparkplug 3.0 has it: the Will is STATE offline with the timestamp of
    this CONNECT; once subscribed, STATE online (retained, QoS 1) with the same timestamp."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.client: mqtt.Client | None = None
        self.stamp = 0
        self.online_at = 0.0

    def connect(self) -> None:
        self.stamp = max(self.stamp + 1, int(time.time() * 1000))
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{HOST_ID}-{os.getpid()}")
        client.will_set(STATE, json.dumps({"online": False, "timestamp": self.stamp}), qos=1, retain=True)
        subscribed = threading.Event()
        client.on_subscribe = lambda *a: subscribed.set()
        client.connect("127.0.0.1", self.port, keepalive=10)
        client.loop_start()
        client.subscribe([("spBv1.0/#", 1), (STATE, 1)])
        assert subscribed.wait(10), "the host's subscription"
        client.publish(STATE, json.dumps({"online": True, "timestamp": self.stamp}), qos=1,
                       retain=True).wait_for_publish(5)
        self.online_at = time.monotonic()
        self.client = client

    def offline(self) -> None:
        """An orderly end: STATE offline (the timestamp of the online one), then DISCONNECT."""
        assert self.client is not None
        self.client.publish(STATE, json.dumps({"online": False, "timestamp": self.stamp}), qos=1,
                            retain=True).wait_for_publish(5)
        self.drop()

    def drop(self) -> None:
        if self.client is not None:
            self.client.disconnect()  # first: paho's thread then ends at once (loop_stop first waits up to 1 s)
            self.client.loop_stop()
            self.client = None


def mosquitto_connects(log_text: str, client_id: str) -> int:
    return sum(1 for line in log_text.splitlines() if "New client connected" in line and f" as {client_id} " in line)


def test_crash_broker_network_and_host_loops_keep_every_session_whole_and_lose_nothing(
        mosquitto, gate, gateway, tmp_path, tahu):  # noqa: F811
    rec = Recorder(mosquitto.port)
    host = PrimaryHost(mosquitto.port)
    g = gate(mosquitto.port)
    devices = """
  - {name: pump1, source: sim, profile: pump, seed: 3, interval: 50ms, history: {keep: 1d}}
  - name: line1
    source: sim
    profile: flexo_line
    seed: 5
    interval: 50ms
    plc: {counter_bits: 32, rate_per_min: 6000}
    counters: [{name: produced, register: produced_raw, bits: 32}]
    history: {keep: 1d}
  - {name: pump2, source: sim, profile: pump, seed: 4, interval: 100ms, history: {keep: 1d}}
"""
    text = gateway_config(tmp_path / "data", g.port, devices=devices,
                          upstream=f", format: sparkplug_b, sparkplug: {{primary_host_id: {HOST_ID}}}")
    kills: list[tuple[float, float]] = []
    to_live: list[tuple[str, float]] = []  # (what, seconds from STATE online to the first live DDATA)
    to_birth: list[float] = []  # seconds from a restart to its NBIRTH

    def live_ddata_since(t: float) -> float | None:
        for arrived, topic, data in rec.of("DDATA", t):
            if not any(m.get("isHistorical") for m in tahu.decode(topic, data).get("metrics", [])):
                return arrived
        return None

    def births(since: float = 0.0) -> int:
        return len(rec.of("NBIRTH", since))

    def await_live(what: str, online_at: float) -> None:
        arrived = wait_until(lambda: live_ddata_since(online_at), 60, what=f"live DDATA after {what}")
        to_live.append((what, arrived - online_at))

    host.connect()
    gw = gateway(text).start()
    try:
        started = time.monotonic()
        wait_until(lambda: births(), 30, what="the first NBIRTH")
        to_birth.append(rec.of("NBIRTH")[0][0] - started)
        await_live("the first start", host.online_at)
        for cycle in range(2):
            # kill -9 and a restart: the Will's NDEATH, a new session, the killed session's rows as history
            time.sleep(1.5)
            killing = time.time()
            gw.kill()
            kills.append((killing, time.time()))  # samples are taken until the signal lands
            wait_until(lambda: rec.of("NDEATH"), 30, what="NDEATH from the Will")
            gw = gateway(text).start()
            restarted = time.monotonic()
            wait_until(lambda: births(restarted), 30, what="the restarted gateway's NBIRTH")
            to_birth.append(rec.of("NBIRTH", restarted)[0][0] - restarted)
            await_live("a kill -9 and restart", restarted)

            # the primary host goes offline (NDEATH, disconnect, storing) and comes back after a while
            time.sleep(1.0)
            host.offline()
            time.sleep(3.0)
            host.connect()
            await_live("the host's return", host.online_at)

            # mosquitto killed and restarted: the recorder back first, then the host says online again
            time.sleep(1.0)
            mosquitto.kill()
            host.drop()
            time.sleep(1.5)
            subs = rec.subscribed
            mosquitto.start()
            wait_until(lambda s=subs: rec.subscribed > s, 20, what="the recorder back after the broker restart")
            host.connect()
            await_live("a broker restart", host.online_at)

            # a partition: what the gateway sends vanishes for 2 s, then its connection is cut
            time.sleep(1.0)
            g.dropping = True
            time.sleep(2.0)
            g.dropping = False
            cut = time.monotonic()
            g.cut()
            wait_until(lambda c=cut: births(c), 30, what="the birth after the network cut")
            await_live("a network cut", cut)
        time.sleep(1.5)
        assert gw.stop() == 0
        time.sleep(0.5)
    finally:
        host.drop()
        rec.close()
    for what, seconds in to_live:
        print(f"STATE online (or reconnect) -> first live DDATA after {what}: {seconds:.2f} s")
    print("restart -> NBIRTH: " + ", ".join(f"{s:.2f} s" for s in to_birth))

    with rec.lock:
        messages = [(t, p) for _, t, p in rec.messages if t.split("/")[1] != "STATE"]
    logs = gw.logs()
    assert "Traceback" not in logs

    # -- the sessions, as Tahu decodes them -------------------------------------------------------------
    session: dict | None = None
    bdseqs: list[tuple[str, int]] = []
    aliases: dict[int, str] = {}
    live_totals: list[int] = []
    sent: dict[str, set[int]] = {d: set() for d in DEVICES}
    historical = 0
    for topic, data in messages:
        if topic == LOST:
            session = None
            continue
        kind = topic.split("/")[2]
        payload = tahu.decode(topic, data)
        metrics = payload.get("metrics", [])
        if kind == "NDEATH":
            bdseq = int(metrics[0]["value"])
            bdseqs.append(("NDEATH", bdseq))
            if session is not None and bdseq == session["bdseq"]:
                session = None  # this session's death; a Will of a CONNECT that never gave birth names a later one
            else:
                assert session is None or bdseq > session["bdseq"], (topic, bdseq, session)
            continue
        for m in metrics:  # tck-id-payloads-name-birth-data-requirement
            assert "timestamp" in m, (topic, m)
        if kind == "NBIRTH":
            assert session is None, "NBIRTH inside a live session (no NDEATH between)"
            bdseq = int(next(m["value"] for m in metrics if m.get("name") == "bdSeq"))
            bdseqs.append(("NBIRTH", bdseq))
            assert int(payload["seq"]) == 0
            session = {"bdseq": bdseq, "seq": 0, "birth": int(payload["timestamp"]), "born": set()}
            continue
        assert session is not None, f"{kind} outside a session: {topic}"
        seq = int(payload["seq"])
        assert seq == (session["seq"] + 1) % 256, (topic, seq, session["seq"])  # tck-id-payloads-sequence-num-incrementing
        session["seq"] = seq
        device = topic.split("/")[4] if len(topic.split("/")) > 4 else None
        if kind == "DBIRTH":
            session["born"].add(device)
            aliases.update({int(m["alias"]): m["name"] for m in metrics if "alias" in m})
            continue
        if kind == "DDATA":
            assert device in session["born"], f"DDATA for {device} before its DBIRTH in this session"
            assert session["born"] == set(DEVICES) or len(session["born"]) == len(DEVICES), session["born"]
            sent[device].add(int(metrics[0]["timestamp"]))  # the sample's time (the payload's: when published)
            for m in metrics:
                stamp, name = int(m["timestamp"]), aliases[int(m["alias"])]
                if m.get("isHistorical"):
                    historical += 1
                    continue
                assert stamp >= session["birth"] - 1, f"live data older than its birth: {topic} {name} {stamp}"
                if name == "counters/produced/total" and m["value"] is not None:
                    live_totals.append(int(m["value"]))
    assert historical > 0
    assert live_totals and all(b >= a for a, b in zip(live_totals, live_totals[1:])), "a counter went back in live data"

    # bdSeq: NBIRTH carries the bdSeq of its CONNECT; one more per CONNECT the broker saw, from 0
    connects = mosquitto_connects((tmp_path / f"mosquitto-{mosquitto.port}.log").read_text(), NODE)
    births_seen = [b for k, b in bdseqs if k == "NBIRTH"]
    assert births_seen == sorted(set(births_seen)), bdseqs
    assert bdseqs[-1] == ("NDEATH", connects - 1), (bdseqs, connects)  # the farewell names the last CONNECT

    # nothing lost: every recorded sample reached the host, but what a kill -9 never committed
    for device in DEVICES:
        export = subprocess.run([sys.executable, "-m", "gateway", "history", "export", device, "-c", str(gw.config),
                                 "--csv", str(tmp_path / f"{device}.csv")], capture_output=True, text=True, env=ENV,
                                cwd=ROOT, timeout=60)
        assert export.returncode == 0, export.stderr
        with open(tmp_path / f"{device}.csv") as fh:
            from gateway.anomaly.recording import parse_time
            recorded = sorted(round(parse_time(row["time"]) * 1000) for row in csv.DictReader(fh))
        lost = [r for r in recorded if not {r - 1, r, r + 1} & sent[device]
                and not any(a - 1.0 <= r / 1000 <= b for a, b in kills)]
        assert not lost, (device, len(lost), len(recorded), lost[:10])
