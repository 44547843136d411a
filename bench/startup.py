"""Start-up and memory: time from exec to READY=1 (sd_notify), and RSS after a minute with 10 devices.

Printed next to a bare Python process that only imports the gateway's libraries (paho-mqtt,
PyYAML, pymodbus, sqlite3), measured in the same run: what the interpreter alone costs.

    .venv/bin/python bench/startup.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from common import SHIFTS, daemon, mosquitto


def devices(model: str | None = None) -> str:
    """Five pumps and five flexo lines at 1 Hz; the pumps scored by `model` when given."""
    extra = f", model: {model}" if model else ""
    return "".join(f"\n  - {{name: pump{i}, source: sim, profile: pump, seed: {i}, interval: 1s{extra}}}"
                   for i in range(5)) + \
        "".join(f"\n  - {{name: line{i}, source: sim, profile: flexo_line, seed: {i}, interval: 1s, counters: "
                f"[{{name: produced, register: produced_raw, bits: 32}}]}}" for i in range(5))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def gateway(device_yaml: str):
    """`edge-gateway run` with these devices and a mosquitto upstream; yields (pid, seconds to READY=1)."""
    with mosquitto() as (port, _), tempfile.TemporaryDirectory() as tmp, daemon(
            f"gateway: {{id: bench, site: lab, data_dir: {tmp}/data, timezone: Europe/Berlin}}\n"
            f"upstream: {{host: 127.0.0.1, port: {port}}}\n{SHIFTS}devices:{device_yaml}\n", tmp) as started:
        yield started


def bare_python(imports: str) -> tuple[float, float]:
    """Seconds to import these modules in a fresh interpreter, and its RSS then."""
    start = time.perf_counter()
    bare = subprocess.Popen([sys.executable, "-c", f"import {imports}, time; print(flush=True); time.sleep(3)"],
                            stdout=subprocess.PIPE)
    bare.stdout.readline()
    elapsed = time.perf_counter() - start
    rss = rss_mib(bare.pid)
    bare.kill()
    bare.wait()
    return elapsed, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    with gateway(devices()) as (pid, ready):
        rss_ready = rss_mib(pid)
        time.sleep(args.seconds)
        rss_later = rss_mib(pid)
    bare_time, bare_rss = bare_python("sqlite3, yaml, paho.mqtt.client, pymodbus.client")
    print("edge-gateway run, 10 simulated devices at 1 Hz, mosquitto upstream")
    print(f"  exec -> READY=1              {ready * 1000:7.0f} ms   (target <= 1000 ms)")
    print(f"  RSS at READY                 {rss_ready:7.1f} MiB")
    print(f"  RSS after {args.seconds:.0f} s               {rss_later:7.1f} MiB")
    print("baseline: bare python importing sqlite3, yaml, paho-mqtt, pymodbus, same run")
    print(f"  exec -> imports done         {bare_time * 1000:7.0f} ms")
    print(f"  RSS                          {bare_rss:7.1f} MiB")


if __name__ == "__main__":
    main()
