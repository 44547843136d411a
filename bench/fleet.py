"""A fleet of gateways and one broker that goes down: how soon each is back, and how hard they hit it.

    python bench/fleet.py [--gateways 50] [--outage 30] [--rounds 1]

Starts two fleets of real `edge-gateway run` processes (each one simulated pump at 1 Hz) against one
mosquitto, in the same run: one with the reconnect policy as shipped (`new`: while the broker is down,
waits drawn evenly from 0.5 s up to `down_max` 2 s), one with the policy before it (`old`: doubling
from 1 s to 60 s, `reconnect: {min: 1s, down_max: 60s}`). The old policy spread each wait ±30 %
around the doubling base; here it is drawn evenly below it, which waits less: the comparison
flatters the old policy. Then, per round, the broker is killed (-9), stays down `--outage` seconds
and is started again on the same port. Printed per policy:

- reconnect delay: from the broker listening again to each gateway's "connected to upstream ...
  again" log line (its own clock, ms), median / p95 / max over every gateway and round;
- connects per second at the broker (mosquitto's own log of accepted clients): the peak second and
  the first 10 s, i.e. whether the fleet comes back in one burst;
- all delivering: until a subscriber has received fresh telemetry from every gateway of the fleet.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import paho.mqtt.client as mqtt
from common import free_port, listening, wait_port

ROOT = Path(__file__).resolve().parent.parent
POLICIES = {"new": "", "old": ", reconnect: {min: 1s, down_max: 60s, max: 60s}"}
CONNECTED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) WARNING .*connected to upstream \S+ again")
ACCEPTED = re.compile(r"^(\d+): New client connected from \S+ as fleet-(new|old)-\d+")


def broker(port: int, workdir: Path, round_: int) -> tuple[subprocess.Popen, Path]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    log = workdir / f"mosquitto-{round_}.log"
    log.touch()
    log.chmod(0o666)  # mosquitto started as root writes as its own user
    conf = workdir / f"mosquitto-{round_}.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\n"
                    f"log_dest file {log}\nlog_type notice\nconnection_messages true\nlog_timestamp true\n"
                    "log_timestamp_format %s\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, 10)
    if not listening(port):
        sys.exit(f"bench: mosquitto did not start on port {port}")
    return proc, log


def gateway_yaml(name: str, data_dir: Path, port: int, policy: str) -> str:
    return (f"gateway: {{id: {name}, site: fleet, data_dir: \"{data_dir}\", health_interval: 60s}}\n"
            f"upstream: {{host: 127.0.0.1, port: {port}, client_id: {name}{POLICIES[policy]}}}\n"
            f"devices:\n  - {{name: pump1, source: sim, profile: pump, seed: 1, interval: 1s}}\n")


class Subscriber:
    """Telemetry arrival times per gateway; connects again at once when the broker comes back."""

    def __init__(self, port: int) -> None:
        self.last: dict[str, float] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fleet-watch-{os.getpid()}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("edge/fleet/+/pump1/telemetry", qos=0)
        self.client.on_message = self._message
        self.client.reconnect_delay_set(0.05, 0.1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _message(self, client, userdata, message) -> None:
        with self.lock:
            self.last[message.topic.split("/")[2]] = time.time()

    def delivering_since(self, since: float) -> set[str]:
        with self.lock:
            return {name for name, ts in self.last.items() if ts > since}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateways", type=int, default=50, help="per policy (default %(default)s)")
    parser.add_argument("--outage", type=float, default=30.0, help="seconds the broker is down (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=1, help="outages in a row (default %(default)s)")
    parser.add_argument("--wait", type=float, default=150.0, help="longest wait for a fleet to return (s)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    workdir.chmod(0o755)
    port = free_port()
    mosq, _ = broker(port, workdir, 0)
    gateways: dict[str, tuple[str, subprocess.Popen, Path]] = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    sub = None
    try:
        for policy in POLICIES:
            for i in range(args.gateways):
                name = f"fleet-{policy}-{i:03d}"
                home = workdir / name
                home.mkdir()
                (home / "gateway.yaml").write_text(gateway_yaml(name, home / "data", port, policy))
                log = home / "gateway.log"
                proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(home / "gateway.yaml")],
                                        stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env, cwd=ROOT)
                gateways[name] = (policy, proc, log)
        sub = Subscriber(port)
        deadline = time.monotonic() + 60 + args.gateways
        while len(sub.delivering_since(0)) < len(gateways) and time.monotonic() < deadline:
            time.sleep(0.5)
        if len(sub.delivering_since(0)) < len(gateways):
            sys.exit(f"bench: only {len(sub.delivering_since(0))} of {len(gateways)} gateways delivering at start")
        delays: dict[str, list[float]] = {p: [] for p in POLICIES}
        per_second: dict[str, list[Counter[int]]] = {p: [] for p in POLICIES}
        all_back: dict[str, list[float]] = {p: [] for p in POLICIES}
        for round_ in range(1, args.rounds + 1):
            seen = {name: log.read_text().count("connected to upstream") for name, (_, _, log) in gateways.items()}
            mosq.send_signal(signal.SIGKILL)
            mosq.wait()
            time.sleep(args.outage)
            mosq, mosq_log = broker(port, workdir, round_)
            back = time.time()
            waiting = {p: {n for n, (q, _, _) in gateways.items() if q == p} for p in POLICIES}
            end = time.monotonic() + args.wait
            while any(waiting.values()) and time.monotonic() < end:
                delivering = sub.delivering_since(back)
                for policy, names in waiting.items():
                    if names and names <= delivering:
                        all_back[policy].append(time.time() - back)
                        names.clear()
                time.sleep(0.05)
            for policy, names in waiting.items():
                if names:
                    all_back[policy].append(float("inf"))
            for name, (policy, _, log) in gateways.items():
                lines = [m for line in log.read_text().splitlines() if (m := CONNECTED.match(line))]
                if len(lines) + 1 > seen[name]:  # the first connect has no "again"
                    stamp = datetime.strptime(lines[-1].group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                    delays[policy].append(stamp - back)
            counts: dict[str, Counter[int]] = {p: Counter() for p in POLICIES}
            for line in mosq_log.read_text().splitlines():
                if m := ACCEPTED.match(line):
                    counts[m.group(2)][int(m.group(1)) - int(back)] += 1
            for policy in POLICIES:
                per_second[policy].append(counts[policy])
        print(f"fleet: {args.gateways} gateways per policy, broker down {args.outage:g}s, {args.rounds} round(s); "
              f"{os.cpu_count()} cores")
        result = {}
        for policy in POLICIES:
            d = delays[policy]
            peak = max((max(c.values(), default=0) for c in per_second[policy]), default=0)
            first10 = statistics.mean(sum(v for s, v in c.items() if 0 <= s < 10) / 10 for c in per_second[policy])
            back_s = max(all_back[policy])
            result[policy] = {"reconnect_median_s": round(statistics.median(d), 2) if d else None,
                              "reconnect_p95_s": round(percentile(d, 0.95), 2) if d else None,
                              "reconnect_max_s": round(max(d), 2) if d else None, "samples": len(d),
                              "connects_peak_per_s": peak, "connects_per_s_first_10s": round(first10, 1),
                              "all_delivering_s": round(back_s, 1)}
            print(f"  {policy:<4} reconnect after the broker is back: median {result[policy]['reconnect_median_s']}s, "
                  f"p95 {result[policy]['reconnect_p95_s']}s, max {result[policy]['reconnect_max_s']}s ({len(d)} "
                  f"reconnects); connects at the broker: peak {peak}/s, {first10:.1f}/s over the first 10 s; "
                  f"all {args.gateways} delivering after {back_s:.1f}s")
        print(json.dumps(result))
    finally:
        if sub is not None:
            sub.close()
        for _, proc, _ in gateways.values():
            proc.send_signal(signal.SIGKILL)
        for _, proc, _ in gateways.values():
            proc.wait()
        mosq.kill()
        mosq.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
