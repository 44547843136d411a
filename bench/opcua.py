"""OPC UA: 10 devices × 50 nodes at 1 s, through subscriptions and through polling, with Modbus alongside.

An asyncua server in its own process holds 500 Double variables and changes every one each
second. The gateway's device pipeline (in this process) reads them as 10 `source: opcua` devices
of 50 nodes, first in `mode: subscribe`, then in `mode: poll`; then 10 Modbus devices of 50
registers at 1 s from `edge-gateway sim` (the same tag count, the same pipeline). Printed: samples
per second, CPU per sample, and the process's RSS after each. The floors, in the same run: an
asyncua read loop (one client per device, `read_values` of its 50 nodes every second, nothing
done with them) and the same with pymodbus (one read of 50 registers), which is what any
program reading these tags costs; the ratios say how far the pipeline is from them.

    .venv/bin/python bench/opcua.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import subprocess
import sys
import tempfile
import time

import modbus as modbus_bench
from common import free_port, wait_port

from gateway import config
from gateway.contract import Topics
from gateway.pipeline.device import DeviceRunner
from gateway.shifts import ShiftCalendar
from gateway.sources import Links, open_source
from gateway.store.outbox import Outbox

DEVICES, NODES = 10, 50


async def serve(port: int) -> None:
    from asyncua import Server, ua

    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/bench/")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    idx = await server.register_namespace("urn:edge-gateway:bench")
    nodes = []
    for d in range(DEVICES):
        obj = await server.nodes.objects.add_object(idx, f"Dev{d}")
        for n in range(NODES):
            nodes.append(await obj.add_variable(ua.NodeId(f"Dev{d}.n{n}", idx), f"n{n}", 0.0))
    rng = random.Random(1)
    async with server:
        while True:
            for node in nodes:
                await node.write_value(rng.uniform(0, 100))
            await asyncio.sleep(1.0)


def opcua_yaml(port: int, mode: str) -> str:
    devices = "".join(f"""
  - name: dev{d}
    source: opcua
    endpoint: opc.tcp://127.0.0.1:{port}/bench/
    mode: {mode}
    interval: 1s
    timeout: 2s
    nodes:
""" + "\n".join(f'      - {{name: n{n}, node: "ns=2;s=Dev{d}.n{n}"}}' for n in range(NODES)) for d in range(DEVICES))
    return f"gateway: {{id: bench, site: lab}}\nupstream: {{host: 127.0.0.1}}\ndevices:{devices}\n"


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


async def measure(text: str, seconds: float, data: str) -> dict:
    cfg = config.parse(text)
    store = Outbox.open(os.path.join(data, f"g{time.monotonic_ns()}.db"))
    runners = [DeviceRunner(d, open_source(d, Links()), store, Topics("bench"), ShiftCalendar([], "UTC"))
               for d in cfg.devices]
    for r in runners:  # connect (and subscribe) outside the measurement
        r.process(await r.source.read_once())
    polls0 = sum(r.health.polls for r in runners)
    cpu0, t0 = time.process_time(), time.perf_counter()
    tasks = [asyncio.create_task(r.run()) for r in runners]

    async def committer():
        while True:
            await asyncio.sleep(0.1)
            store.commit()
    tasks.append(asyncio.create_task(committer()))
    await asyncio.sleep(seconds)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    polls = sum(r.health.polls for r in runners) - polls0
    errors = sum(r.health.errors for r in runners)
    for r in runners:
        await r.source.aclose()
    store.close()
    return {"samples": polls, "wall": wall, "cpu": cpu, "errors": errors, "rss": rss_mib()}


async def floor(kind: str, port: int, seconds: float) -> dict:
    """The cheapest loop reading the same tags: no pipeline, no storage."""
    readers = []
    if kind == "opcua":
        from asyncua import Client

        for d in range(DEVICES):
            client = Client(f"opc.tcp://127.0.0.1:{port}/bench/", timeout=2)
            await client.connect()
            nodes = [client.get_node(f"ns=2;s=Dev{d}.n{n}") for n in range(NODES)]
            readers.append((client, lambda c=client, ns=nodes: c.read_values(ns)))
    else:
        from pymodbus.client import AsyncModbusTcpClient

        span = modbus_bench.REGISTERS + sum(1 for i in range(modbus_bench.REGISTERS) if i % 3 == 2)  # float32: 2
        for unit in range(1, DEVICES + 1):
            client = AsyncModbusTcpClient("127.0.0.1", port=port)
            await client.connect()
            readers.append((client, lambda c=client, u=unit: c.read_holding_registers(0, count=span, device_id=u)))
    count = 0

    async def loop(read) -> None:
        nonlocal count
        while True:
            await read()
            count += 1
            await asyncio.sleep(1.0)
    for _, read in readers:  # the first read outside the measurement, as for the gateway
        await read()
    cpu0, t0 = time.process_time(), time.perf_counter()
    tasks = [asyncio.create_task(loop(read)) for _, read in readers]
    await asyncio.sleep(seconds)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    for client, _ in readers:
        if kind == "opcua":
            await client.disconnect()
        else:
            client.close()
    return {"samples": count, "wall": wall, "cpu": cpu, "errors": 0, "rss": rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    logging.basicConfig(level=logging.CRITICAL)
    port, plc_port = free_port(), free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    units = ",".join(f"{u}=pump:{u}" for u in range(1, DEVICES + 1))
    plc = subprocess.Popen([sys.executable, "-m", "gateway", "sim", "--modbus-tcp", f"127.0.0.1:{plc_port}",
                            "--units", units], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = {}
    try:
        wait_port(port, 30)
        wait_port(plc_port, 30)
        time.sleep(1.0)
        with tempfile.TemporaryDirectory() as data:
            rss0 = rss_mib()
            results["opcua subscribe"] = asyncio.run(measure(opcua_yaml(port, "subscribe"), args.seconds, data))
            results["opcua poll"] = asyncio.run(measure(opcua_yaml(port, "poll"), args.seconds, data))
            modbus_bench.INTERVAL = 1.0
            results["baseline: modbus poll"] = asyncio.run(
                measure(modbus_bench.gateway_yaml(plc_port, ""), args.seconds, data))
            results["floor: asyncua reads"] = asyncio.run(floor("opcua", port, args.seconds))
            results["floor: pymodbus reads"] = asyncio.run(floor("modbus", plc_port, args.seconds))
    finally:
        for proc in (server, plc):
            proc.kill()
            proc.wait()
    print(f"{DEVICES} devices × {NODES} tags every 1 s, {args.seconds:g} s each, one process (RSS before: "
          f"{rss0:.1f} MiB, grows with what each run imports)")
    for name, r in results.items():
        print(f"  {name:<22} {r['samples'] / r['wall']:6.1f} samples/s (of {DEVICES}), "
              f"{r['cpu'] / max(1, r['samples']) * 1e6:7.0f} CPU-µs per sample, errors {r['errors']}, "
              f"RSS after {r['rss']:.1f} MiB")

    def us(name: str) -> float:
        r = results[name]
        return r["cpu"] / max(1, r["samples"]) * 1e6
    modbus = us("baseline: modbus poll")
    print(f"ratios: opcua poll / modbus poll {us('opcua poll') / modbus:.2f}, opcua subscribe / modbus poll "
          f"{us('opcua subscribe') / modbus:.2f}; opcua poll / asyncua floor {us('opcua poll') / us('floor: asyncua reads'):.2f}, "
          f"modbus poll / pymodbus floor {modbus / us('floor: pymodbus reads'):.2f}; "
          f"asyncua floor / pymodbus floor {us('floor: asyncua reads') / us('floor: pymodbus reads'):.2f}")


if __name__ == "__main__":
    main()
