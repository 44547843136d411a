"""Shared by the benchmarks: a mosquitto on a free loopback port, and the raw paho QoS 1 baseline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.ports import free_port, listening  # noqa: E402  (re-exported for the benchmarks)


@contextmanager
def daemon(config_text: str, tmp: str):
    """`edge-gateway run` with this configuration (written into `tmp`); yields (pid, seconds from exec to
    READY=1, read from its NOTIFY_SOCKET as systemd would); terminated at the end."""
    import socket

    config = Path(tmp) / "gateway.yaml"
    config.write_text(config_text)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(f"{tmp}/notify.sock")
    notify.settimeout(30)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(config)],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
                                 "NOTIFY_SOCKET": f"{tmp}/notify.sock"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while b"READY=1" not in notify.recv(4096):
            pass
        yield proc.pid, time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(30)
        notify.close()


SHIFTS = 'shifts: [{name: A, start: "06:00"}, {name: B, start: "14:00"}, {name: C, start: "22:00"}]\n'


def wait_port(port: int, timeout: float) -> None:
    """Until something listens on 127.0.0.1:port (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not listening(port):
        time.sleep(0.05)


@contextmanager
def mosquitto(port: int | None = None):
    """A mosquitto process on 127.0.0.1; yields (port, Popen)."""
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(exe):
        sys.exit("bench: mosquitto is not installed (apt-get install mosquitto)")
    port = port or free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "m.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        "max_inflight_messages 0\nmax_queued_messages 0\n")
        proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port, 10)
            yield port, proc
        finally:
            proc.kill()
            proc.wait()


def raw_paho_rate(port: int, count: int, payload: bytes, inflight: int = 100) -> float:
    """Messages per second that plain paho achieves publishing QoS 1 to the broker, all acknowledged."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-raw-{os.getpid()}")
    client.max_inflight_messages_set(inflight)
    client.max_queued_messages_set(0)
    acked = 0

    def on_publish(c, u, mid, rc, p):
        nonlocal acked
        acked += 1
    client.on_publish = on_publish
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    if not connected.wait(10):  # messages published before CONNACK can be stranded in paho's queue
        raise RuntimeError("no CONNACK from mosquitto")
    start = time.perf_counter()
    # At most two windows outstanding: paho's message ids are 16 bit, so queueing more than 65535
    # unacknowledged messages reuses ids and loses acknowledgements.
    for i in range(count):
        while i - acked >= 2 * inflight:
            time.sleep(0.0002)
        client.publish("bench/raw", payload, qos=1)
    deadline = time.monotonic() + 300
    while acked < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"raw paho baseline: only {acked} of {count} acknowledged")
        time.sleep(0.001)
    elapsed = time.perf_counter() - start
    client.loop_stop()
    client.disconnect()
    return count / elapsed
