"""Real parts for the tests: mosquitto and amqtt broker processes, the gateway as a subprocess,
an upstream subscriber. Every process started here is stopped by its fixture.

Two tiers: a test that starts processes (a broker, the gateway, the simulated PLC) is marked
`slow` here, by the fixtures it uses or by its module's `pytestmark`; the rest is the fast,
in-process tier (`./dev test -m "not slow"`), where a test that leaves a task or a thread
behind fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from gateway.ports import free_port, listening

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


# Fixtures that start processes: a test using one belongs to the slow tier.
PROCESS_FIXTURES = {"broker", "mosquitto", "gateway", "sim_server"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def nothing_left_behind(request, monkeypatch):
    """Fast tier: fail a test that leaves an asyncio task or a thread running after it."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    leaked: list[str] = []
    real_run = asyncio.run

    def checked_run(main: Any, **kw: Any) -> Any:
        async def watched() -> Any:
            result = await main
            left = [f"{t.get_name()} ({t.get_coro().__qualname__})" for t in asyncio.all_tasks()
                    if t is not asyncio.current_task()]
            leaked.extend(f"task {name}" for name in left)
            return result
        return real_run(watched(), **kw)
    monkeypatch.setattr(asyncio, "run", checked_run)
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 3.0
    while (threads := [t for t in threading.enumerate() if t not in before and t.is_alive()]) and \
            time.monotonic() < deadline:
        time.sleep(0.02)
    leaked.extend(f"thread {t.name}" for t in threads)
    assert not leaked, f"the test left running: {', '.join(leaked)}"


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
            conf.write_text("user root\npersistence false\n" + (self.extra_conf or
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


def _mosquitto_available() -> bool:
    return bool(shutil.which("mosquitto") or os.path.exists("/usr/sbin/mosquitto"))


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker(request, tmp_path):
    """The upstream broker, a real process: Debian's mosquitto and the embedded amqtt."""
    if request.param == "mosquitto" and not _mosquitto_available():
        if os.environ.get("CI"):
            pytest.fail("mosquitto is not installed; the test bootstrap should have installed it")
        pytest.skip("mosquitto not installed")
    proc = BrokerProcess(request.param, tmp_path).start()
    yield proc
    proc.kill()


@pytest.fixture
def mosquitto(tmp_path):
    if not _mosquitto_available():
        pytest.skip("mosquitto not installed")
    proc = BrokerProcess("mosquitto", tmp_path).start()
    yield proc
    proc.kill()


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
        self.client.loop_stop()
        self.client.disconnect()


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


@pytest.fixture
def gate():
    gates = []

    def make(target_port: int) -> TcpGate:
        g = TcpGate(target_port)
        gates.append(g)
        return g
    yield make
    for g in gates:
        g.close()


@pytest.fixture
def subscribe():
    subs = []

    def make(port: int, **kw) -> Subscriber:
        sub = Subscriber(port, **kw)
        subs.append(sub)
        return sub
    yield make
    for sub in subs:
        sub.close()


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


@pytest.fixture
def gateway(tmp_path):
    procs = []

    def make(config_text: str) -> GatewayProcess:
        proc = GatewayProcess(tmp_path, config_text)
        procs.append(proc)
        return proc
    yield make
    for proc in procs:
        proc.kill()
