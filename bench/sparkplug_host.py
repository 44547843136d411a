"""Sparkplug B as a primary host sees it: how soon data flows again after a kill -9 of the daemon and
after the primary host's STATE goes online over a backlog, with the JSON uplink's reconnect over
the same backlog as the baseline, in the same run.

Each gateway is the real daemon (`python -m gateway run`) against one mosquitto, with DEVICES
simulated pumps read every 1/HZ s. The host is a paho client here that decodes with the bindings of
the official sparkplug_b.proto (tests/system/test_sparkplug_loop.py decodes every message with Tahu's).

- kill -9 -> NBIRTH: the daemon killed and started again (host online): start to NBIRTH. JSON: start
  to its first message (the retained status online).
- STATE online -> data: the host offline for OFFLINE s (the gateway stores), then STATE online:
  to NBIRTH, to the first DDATA, to the first live DDATA, and to the end of the history. JSON: the
  broker unreachable for the same time (the JSON uplink's only "offline"), then back: to the first
  message, the first telemetry less than 1 s old, and the end of the backlog.

    .venv/bin/python bench/sparkplug_host.py [--devices 10] [--hz 10] [--offline 30]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from common import free_port, mosquitto, wait_port

from gateway.uplink.sparkplug import sparkplug_b_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
HOST = "scada-1"
STATE = f"spBv1.0/STATE/{HOST}"


class Watcher:
    """Every message, with its arrival time; Sparkplug payloads decoded."""

    def __init__(self, port: int, topic: str) -> None:
        self.port, self.topic = port, topic
        self.messages: list[tuple[float, str, object]] = []
        self.lock = threading.Lock()
        self.client: mqtt.Client | None = None

    def connect(self, will: bytes | None = None) -> None:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-host-{os.getpid()}-{time.time()}")
        if will is not None:
            client.will_set(STATE, will, qos=1, retain=True)
        subscribed = threading.Event()
        client.on_subscribe = lambda *a: subscribed.set()
        client.on_message = self._message
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        client.subscribe(self.topic, qos=1)
        if not subscribed.wait(10):
            raise RuntimeError("no SUBACK")
        self.client = client

    def _message(self, client, userdata, message) -> None:
        now = time.monotonic()
        if message.topic.startswith("spBv1.0/") and "/STATE/" not in message.topic:
            body: object = pb.Payload.FromString(message.payload)
        else:
            try:
                body = json.loads(message.payload)
            except ValueError:
                body = None
        with self.lock:
            self.messages.append((now, message.topic, body))

    def since(self, t: float) -> list[tuple[float, str, object]]:
        with self.lock:
            return [m for m in self.messages if m[0] >= t]

    def drop(self) -> None:
        if self.client is not None:
            self.client.loop_stop()
            self.client.disconnect()
            self.client = None


def until(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.01)
    return None


def config(data_dir: str, port: int, fmt: str, devices: int, hz: float) -> str:
    upstream = f", format: sparkplug_b, sparkplug: {{primary_host_id: {HOST}}}" if fmt == "sparkplug_b" else ""
    lines = "\n".join(f"  - {{name: pump{i}, source: sim, profile: pump, seed: {i}, interval: {1000 / hz:.0f}ms}}"
                      for i in range(devices))
    return (f"gateway: {{id: bench-{fmt}, site: lab, data_dir: \"{data_dir}\", health_interval: 5s}}\n"
            f"upstream: {{host: 127.0.0.1, port: {port}, reconnect: {{min: 200ms, max: 1s}}{upstream}}}\n"
            f"devices:\n{lines}\n")


class Daemon:
    def __init__(self, tmp: str, text: str, name: str) -> None:
        self.path = Path(tmp) / f"{name}.yaml"
        self.path.write_text(text)
        self.log = Path(tmp) / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(self.path)], stdout=out,
                                         stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        return time.monotonic()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def live(body: object, now_wall: float) -> bool:
    return isinstance(body, pb.Payload) and bool(body.metrics) and not body.metrics[0].is_historical


def sparkplug(tmp: str, port: int, args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    host = Watcher(port, "spBv1.0/#")
    stamp = int(time.time() * 1000)
    host.connect(json.dumps({"online": False, "timestamp": stamp}).encode())
    assert host.client is not None
    host.client.publish(STATE, json.dumps({"online": True, "timestamp": stamp}), qos=1, retain=True).wait_for_publish(5)
    gw = Daemon(tmp, config(os.path.join(tmp, "sp"), port, "sparkplug_b", args.devices, args.hz), "sparkplug")
    try:
        gw.start()
        until(lambda: [m for m in host.since(0) if "/DDATA/" in m[1]], 60)
        time.sleep(2)
        gw.kill()
        t0 = gw.start()
        got = until(lambda: [m for m in host.since(t0) if "/NBIRTH/" in m[1]], 60)
        out["kill -9 -> NBIRTH"] = got[0][0] - t0 if got else float("nan")
        time.sleep(2)
        # the host goes offline (orderly: STATE offline with its online timestamp), the gateway stores
        host.client.publish(STATE, json.dumps({"online": False, "timestamp": stamp}), qos=1,
                            retain=True).wait_for_publish(5)
        host.drop()
        time.sleep(args.offline)
        stamp = int(time.time() * 1000)
        host.connect(json.dumps({"online": False, "timestamp": stamp}).encode())
        host.client.publish(STATE, json.dumps({"online": True, "timestamp": stamp}), qos=1,
                            retain=True).wait_for_publish(5)
        t1 = time.monotonic()
        births = until(lambda: [m for m in host.since(t1) if "/NBIRTH/" in m[1]], 60)
        data = until(lambda: [m for m in host.since(t1) if "/DDATA/" in m[1]], 120)
        fresh = until(lambda: [m for m in host.since(t1) if "/DDATA/" in m[1] and live(m[2], time.time())], 300)
        out["STATE online -> NBIRTH"] = births[0][0] - t1 if births else float("nan")
        out["STATE online -> first DDATA"] = data[0][0] - t1 if data else float("nan")
        out["STATE online -> first live DDATA"] = fresh[0][0] - t1 if fresh else float("nan")

        def history_done() -> float | None:
            msgs = [m for m in host.since(t1) if "/DDATA/" in m[1]]
            hist = [m for m in msgs if not live(m[2], 0)]
            return hist[-1][0] if hist and msgs[-1][0] - hist[-1][0] > 2.0 else None
        done = until(history_done, 300)
        out["STATE online -> history replayed"] = done - t1 if done else float("nan")
        out["history DDATA replayed"] = float(len([m for m in host.since(t1) if "/DDATA/" in m[1]
                                                   and not live(m[2], 0)]))
    finally:
        gw.stop()
        host.drop()
    return out


def json_baseline(tmp: str, args: argparse.Namespace) -> dict[str, float]:
    """The JSON uplink: kill -9 -> first message; the broker away for OFFLINE s -> first live telemetry."""
    out: dict[str, float] = {}
    port = free_port()
    with mosquitto(port) as (_, broker):
        sub = Watcher(port, "edge/#")
        sub.connect()
        gw = Daemon(tmp, config(os.path.join(tmp, "js"), port, "json", args.devices, args.hz), "json")
        try:
            gw.start()
            until(lambda: [m for m in sub.since(0) if m[1].endswith("/telemetry")], 60)
            time.sleep(2)
            gw.kill()
            t0 = gw.start()
            got = until(lambda: [m for m in sub.since(t0) if m[1].endswith("/status")], 60)
            out["kill -9 -> first message"] = got[0][0] - t0 if got else float("nan")
            time.sleep(2)
        finally:
            pass
        sub.drop()
        broker.kill()
        broker.wait()
    # the same port again, after OFFLINE s: what the gateway stored meanwhile is the backlog
    time.sleep(args.offline)
    with mosquitto(port) as _:
        sub = Watcher(port, "edge/#")
        sub.connect()
        t1 = time.monotonic()
        wait_port(port, 5)

        def fresh() -> list:
            return [m for m in sub.since(t1) if m[1].endswith("/telemetry") and isinstance(m[2], dict)
                    and _age(m[2]) < 1.0]
        first = until(lambda: sub.since(t1), 60)
        new = until(fresh, 300)
        out["broker back -> first message"] = first[0][0] - t1 if first else float("nan")
        out["broker back -> first live telemetry"] = new[0][0] - t1 if new else float("nan")
        gw.stop()
        sub.drop()
    return out


def _age(body: dict) -> float:
    from gateway.anomaly.recording import parse_time
    return time.time() - parse_time(body["ts"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--hz", type=float, default=10.0, help="readings per second of each device")
    parser.add_argument("--offline", type=float, default=30.0, help="seconds the host (JSON: the broker) is away")
    args = parser.parse_args()
    backlog = args.devices * args.hz * args.offline
    with tempfile.TemporaryDirectory() as tmp:
        with mosquitto() as (port, _):
            sp = sparkplug(tmp, port, args)
        js = json_baseline(tmp, args)
    print(f"sparkplug_host: {args.devices} devices x {args.hz:g} Hz, away {args.offline:g} s "
          f"(about {backlog:.0f} samples stored meanwhile)")
    for name, value in sp.items():
        print(f"  sparkplug  {name:36s} {value:8.2f}" + ("" if name.startswith("history DDATA") else " s"))
    print("baseline: the JSON uplink, same devices, same run")
    for name, value in js.items():
        print(f"  json       {name:36s} {value:8.2f} s")


if __name__ == "__main__":
    main()
