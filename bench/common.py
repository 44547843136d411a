"""Shared by the benchmarks: a mosquitto on a free loopback port, and the raw paho QoS 1 baseline."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.05)
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
    client.connect("127.0.0.1", port)
    client.loop_start()
    start = time.perf_counter()
    for i in range(count):
        client.publish("bench/raw", payload, qos=1)
    while acked < count:
        time.sleep(0.001)
    elapsed = time.perf_counter() - start
    client.loop_stop()
    client.disconnect()
    return count / elapsed
