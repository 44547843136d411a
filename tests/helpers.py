"""What the tests share: the repository paths, waiting for a named condition, processes that log to a
file, real brokers, an upstream subscriber, a TCP gate that cuts the network, the gateway as a
subprocess and its config. Fixtures that clean up what they start are in conftest.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from gateway.ports import free_port, listening
from sim.plc import registers_yaml

ROOT = Path(__file__).resolve().parent.parent


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def spawn(command: list[str], log: Path, mode: str = "a", **kw: Any) -> subprocess.Popen:
    """Start a process whose stdout and stderr go to `log` (the child keeps the file; we close our copy)."""
    with open(log, mode) as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, **kw)


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class BrokerProcess:
    """A broker in its own process, so that tests can kill it for real."""

    def __init__(self, kind: str, workdir: Path, port: int | None = None, extra_conf: str = "") -> None:
        self.kind = kind
        self.workdir = workdir
        self.port = port or free_port()
        self.extra_conf = extra_conf
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        if self.kind == "mosquitto":
            conf = self.workdir / f"mosquitto-{self.port}.conf"
            # `user root`: as root, mosquitto would otherwise drop to a user that cannot read tmp_path.
            # `max_queued_messages 0`: a test's subscriber (Python, decoding under CPU load) may fall behind a
            # replayed backlog; past 1,000 queued messages mosquitto drops QoS 0 messages to it ("Outgoing
            # messages are being dropped"), a loss between broker and subscriber that no publisher can see.
            conf.write_text("user root\npersistence false\nmax_queued_messages 0\n" + (self.extra_conf or
                            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"))
            return [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)]
        return [sys.executable, "-m", "gateway.broker", "--listen", f"127.0.0.1:{self.port}", "--allow-anonymous"]

    def start(self) -> BrokerProcess:
        self.proc = spawn(self.command(), self.workdir / f"{self.kind}-{self.port}.log", env=ENV)
        wait_until(lambda: listening(self.port) or self.proc.poll() is not None, 15, what=f"{self.kind} to listen")
        assert self.proc.poll() is None, f"{self.kind} exited: {(self.workdir / f'{self.kind}-{self.port}.log').read_text()}"
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    stop = kill


def mosquitto_available() -> bool:
    return bool(shutil.which("mosquitto") or os.path.exists("/usr/sbin/mosquitto"))


class Subscriber:
    """What a historian sees upstream: every message, decoded, with its topic."""

    def __init__(self, port: int, topic: str = "#", client_id: str = "test-sub", clean: bool = True,
                 username: str | None = None, password: str | None = None) -> None:
        self.messages: list[tuple[str, dict, bool]] = []
        self.lock = threading.Lock()
        self.topic = topic
        self.subscriptions = 0  # SUBACKs received: one per (re)connection
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(self.topic, qos=1)
        self.client.on_subscribe = self._on_subscribe
        self.client.reconnect_delay_set(0.1, 0.3)
        if username:
            self.client.username_pw_set(username, password)
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        wait_until(lambda: self.subscriptions, 10, what="the subscription")

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.subscriptions += 1

    def _on_message(self, client, userdata, msg) -> None:
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            payload = {"_raw": msg.payload}
        with self.lock:
            self.messages.append((msg.topic, payload, bool(msg.retain)))

    def on(self, suffix: str) -> list[dict]:
        with self.lock:
            return [p for t, p, _ in self.messages if t.endswith(suffix)]

    def seqs(self) -> list[int]:
        with self.lock:
            return [p["seq"] for _, p, _ in self.messages if "seq" in p]

    def close(self) -> None:
        # DISCONNECT first: it wakes paho's network thread, which then ends at once; loop_stop() first
        # waits out the thread's select (up to 1 s) on every test's teardown.
        self.client.disconnect()
        self.client.loop_stop()


class TcpGate:
    """A TCP relay between the gateway and the broker that the test can close and open.

    While closed, new connections are accepted and dropped at once, as by a broker that is
    not there. The test uses it to bring the upstream subscriber back before the gateway
    after a broker restart, so that the subscriber cannot miss what the broker accepted.
    """

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.is_open = True
        self.dropping = False  # a partition: bytes are read and thrown away, both ways, the connection stays
        self.closed_for_good = False
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed_for_good:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.is_open:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=2)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self.conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self.dropping:
                    dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def cut(self) -> None:
        """Sever the connections passing through now: a network loss."""
        conns, self.conns = self.conns, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            except OSError:
                pass

    def close(self) -> None:
        self.closed_for_good = True
        self.server.close()
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass


# The simulated pump scored by the shipped model (one sample a simulated second, 20 a real one): a device entry to
# which keys are added (`alarms:`, `faults:`).
SCORED_PUMP = """
  - name: pump1
    source: sim
    profile: pump
    seed: 3
    interval: 50ms
    time_scale: 20
    model: pump-ae
"""


def gateway_config(data_dir: Path, port: int, devices: str | None = None, extra: str = "", upstream: str = "") -> str:
    devices = devices or """
  - {name: pump1, source: sim, profile: pump, seed: 3, interval: 100ms}
  - name: line1
    source: sim
    profile: flexo_line
    seed: 5
    interval: 100ms
    plc: {counter_bits: 16, start_near_top: true, rate_per_min: 1200}
    counters: [{name: produced, register: produced_raw, bits: 16}]
"""
    return f"""
gateway: {{id: test-gw, site: lab, data_dir: "{data_dir}", timezone: Europe/Berlin, health_interval: 1s}}
upstream: {{host: 127.0.0.1, port: {port}, reconnect: {{min: 200ms, max: 1s}}{upstream}}}
shifts: [{{name: A, start: "06:00"}}, {{name: B, start: "14:00"}}, {{name: C, start: "22:00"}}]
{extra}
devices:{devices}"""


class GatewayProcess:
    """`edge-gateway run` as a user runs it, in a subprocess."""

    def __init__(self, workdir: Path, config_text: str) -> None:
        self.workdir = workdir
        self.config = workdir / "gateway.yaml"
        self.config.write_text(config_text)
        self.log = workdir / "gateway.log"
        self.proc: subprocess.Popen | None = None

    def start(self, **env: str) -> GatewayProcess:
        self.proc = spawn([sys.executable, "-m", "gateway", "run", "-c", str(self.config)], self.log,
                          env={**ENV, **env}, cwd=ROOT)
        return self

    def stop(self, sig=signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            return self.proc.wait(timeout)
        return self.proc.returncode if self.proc else 0

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def logs(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


class NotifySocket:
    """What systemd would receive on NOTIFY_SOCKET."""

    def __init__(self, path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self.running = True
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        while self.running:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                continue
            except OSError:
                return

    def fields(self) -> list[str]:
        return [line for msg in list(self.messages) for line in msg.split("\n")]

    def count(self, field: str) -> int:
        return self.fields().count(field)

    def close(self) -> None:
        self.running = False
        self.sock.close()


def device_yaml(name, port, unit, regmap, extra="", timeout="1s") -> str:
    regs = registers_yaml(regmap)
    return (f"\n  - name: {name}\n    source: modbus_tcp\n    host: 127.0.0.1\n    port: {port}\n"
            f"    unit: {unit}\n    interval: 200ms\n    timeout: {timeout}\n{extra}    registers:\n{regs}")


# One flexo line with shifts and OEE, for the scripted pipeline tests (shifts, machine events).
LINE_CONFIG = """
gateway: {id: g, site: s, timezone: Europe/Berlin}
upstream: {host: h}
shifts: [{name: A, start: "06:00"}, {name: B, start: "14:00"}, {name: C, start: "22:00"}]
devices:
  - name: line1
    source: sim
    profile: flexo_line
    interval: 1m
    counters:
      - {name: produced, register: produced_raw, bits: 32}
      - {name: defects, register: defects_raw, bits: 32, kind: defect}
    oee: {status_tag: machine_status, states: {1: running, 2: idle, 3: down, 4: planned_stop}, ideal_rate: 120}
"""


class NoSource:
    """The samples are fed by the test."""

    skipped_ticks = dropped = 0

    async def samples(self):
        raise AssertionError("not polled")
        yield

    async def aclose(self) -> None:
        pass


class Line:
    """One line's device pipeline on a real outbox file, fed scripted PLC values; `restart()` is a new
    process on the same file. With `defect_every`, every so many pieces made one is a defect."""

    def __init__(self, path: Path, config: str = LINE_CONFIG, defect_every: int = 0) -> None:
        from gateway.config import parse

        self.path = path
        self.cfg = parse(config)
        self.defect_every = defect_every
        self.produced = self.defects = 0
        self.messages: list[tuple[str, dict]] = []
        self._open()

    def _open(self) -> None:
        from gateway.contract import Topics
        from gateway.pipeline.device import DeviceRunner
        from gateway.shifts import ShiftCalendar
        from gateway.store.outbox import Bounds, Outbox

        self.store = Outbox.open(str(self.path), bounds=Bounds(max_age=10 * 365 * 86400.0))  # the script is in the past
        calendar = ShiftCalendar([(s.name, s.start) for s in self.cfg.shifts], self.cfg.gateway.timezone)
        self.runner = DeviceRunner(self.cfg.devices[0], NoSource(), self.store, Topics("root"), calendar)
        self._seen = self.store.last_seq

    def sample(self, ts: float, status: int, reason: int = 0, made: int = 0, dryer: float | None = 60.0,
               speed: float = 200.0) -> None:
        from gateway.sample import ERROR, OK, Sample

        for _ in range(made):
            self.produced += 1
            if self.defect_every and self.produced % self.defect_every == 0:
                self.defects += 1
        values = {"machine_status": float(status), "stop_reason": float(reason), "produced_raw": float(self.produced),
                  "defects_raw": float(self.defects), "dryer_temp_c": dryer, "line_speed_m_min": speed}
        quality = {tag: OK if v is not None else ERROR for tag, v in values.items()}
        self.runner.process(Sample("line1", ts, values, quality))
        assert self.store.commit()
        for m in self.store.fetch(self._seen, 10**6):
            self.messages.append((m.topic.split("/")[-1], json.loads(m.payload)))
            self._seen = m.seq

    def restart(self) -> None:
        self.store.close()
        self._open()

    def on(self, kind: str) -> list[dict]:
        return [p for k, p in self.messages if k == kind]

    def shifts(self) -> list[dict]:
        return self.on("shift")

    def close(self) -> None:
        self.store.close()


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()
