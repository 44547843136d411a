"""Modbus polling: 10 devices × 50 registers at 100 ms from a local simulated PLC (`edge-gateway sim`).

Prints achieved vs configured poll rate, requests per poll and CPU per poll for the
gateway's coalesced reads, next to the same map read one register per request
(no coalescing), measured in the same run against the same server process.

    .venv/bin/python bench/modbus.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import time

from common import free_port, wait_port

from gateway import config
from gateway.contract import Topics
from gateway.pipeline.device import DeviceRunner
from gateway.shifts import ShiftCalendar
from gateway.sources import Links, open_source
from gateway.store.outbox import Outbox

DEVICES, REGISTERS, INTERVAL = 10, 50, 0.1


def gateway_yaml(port: int, extra: str) -> str:
    # 50 registers: a mix of types across holding 0..49 (uint16, int16, and float32 pairs), like a real map.
    regs = []
    address = 0
    while len(regs) < REGISTERS:
        kind = ("uint16", "int16", "float32")[len(regs) % 3]
        regs.append(f"      - {{name: r{address}, table: holding, address: {address}, type: {kind}}}")
        address += 2 if kind == "float32" else 1
    devices = "".join(f"""
  - name: dev{unit}
    source: modbus_tcp
    host: 127.0.0.1
    port: {port}
    unit: {unit}
    interval: {int(INTERVAL * 1000)}ms
    timeout: 1s
{extra}    registers:
""" + "\n".join(regs) for unit in range(1, DEVICES + 1))
    return f"gateway: {{id: bench, site: lab}}\nupstream: {{host: 127.0.0.1}}\ndevices:{devices}\n"


async def measure(port: int, extra: str, seconds: float, data: str) -> dict:
    cfg = config.parse(gateway_yaml(port, extra))
    store = Outbox.open(os.path.join(data, f"g{len(extra)}.db"))
    links = Links()
    runners = [DeviceRunner(d, open_source(d, links), store, Topics("bench"), ShiftCalendar([], "UTC"))
               for d in cfg.devices]
    for r in runners:  # connect and warm up outside the measurement
        r.process(await r.source.read_once())
    link = next(iter(links.modbus.values()))
    polls0, requests0 = sum(r.health.polls for r in runners), link.requests
    cpu0, t0 = time.process_time(), time.perf_counter()
    tasks = [asyncio.create_task(r.run()) for r in runners]

    async def committer():
        while True:
            await asyncio.sleep(0.1)
            store.commit()  # no uplink here: committed rows just accumulate
    tasks.append(asyncio.create_task(committer()))
    await asyncio.sleep(seconds)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    polls = sum(r.health.polls for r in runners) - polls0
    errors = sum(r.health.errors for r in runners)
    skipped = sum(r.source.skipped_ticks for r in runners)
    for r in runners:
        await r.source.aclose()
    store.close()
    return {"polls": polls, "wall": wall, "cpu": cpu, "requests": link.requests - requests0, "errors": errors,
            "skipped": skipped}


def report(name: str, m: dict) -> None:
    configured = DEVICES / INTERVAL
    achieved = m["polls"] / m["wall"]
    print(f"{name}")
    print(f"  polls/s achieved      {achieved:8.1f}  of {configured:.0f} configured ({achieved / configured * 100:.0f} %), "
          f"skipped ticks {m['skipped']}, errors {m['errors']}")
    print(f"  requests per poll     {m['requests'] / max(1, m['polls']):8.1f}")
    print(f"  CPU per poll          {m['cpu'] / max(1, m['polls']) * 1e6:8.0f} µs  (gateway process; the PLC runs in "
          f"its own process)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # device state changes are not the subject here
    port = free_port()
    units = ",".join(f"{u}=pump:{u}" for u in range(1, DEVICES + 1))
    plc = subprocess.Popen([sys.executable, "-m", "gateway", "sim", "--modbus-tcp", f"127.0.0.1:{port}",
                            "--units", units], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, 20)
        with tempfile.TemporaryDirectory() as data:
            coalesced = asyncio.run(measure(port, "", args.seconds, data))
            single = asyncio.run(measure(port, "    max_registers_per_read: 1\n    max_gap: 0\n", args.seconds, data))
    finally:
        plc.kill()
        plc.wait()
    print(f"{DEVICES} devices × {REGISTERS} registers every {INTERVAL * 1000:.0f} ms, one Modbus TCP endpoint, "
          f"{args.seconds:g} s each")
    report("gateway (coalesced reads)", coalesced)
    report("baseline: same map, one register per request (no coalescing)", single)


if __name__ == "__main__":
    main()
