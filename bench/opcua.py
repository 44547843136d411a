"""OPC UA: 10 devices × 50 nodes at 1 s, through subscriptions and through polling, with Modbus alongside.

An asyncua server in its own process holds 500 Double variables and changes every one each
second. The gateway's device pipeline (in this process) reads them as 10 `source: opcua` devices
of 50 nodes, first in `mode: subscribe`, then in `mode: poll`; then 10 Modbus devices of 50
registers at 1 s from `edge-gateway sim` (the same tag count, the same pipeline). Printed: samples
per second, CPU per sample, and the process's RSS after each. The floors, in the same run: an
asyncua read loop (one client per device, set up as the gateway sets up its own, `read_values` of
its 50 nodes every second through asyncua's codec, nothing done with them) and the same with
pymodbus (one read of 50 registers), which is what any program reading these tags costs; the
ratios say how far the pipeline is from them. `--repeat N` runs all five N times, interleaved, and
prints the range of each ratio (this machine's other load moves single figures by ±20 %).

    .venv/bin/python bench/opcua.py [--seconds 20] [--repeat 1]
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
            # asyncua's client as the gateway sets it up (no state probe every second, no check of
            # asyncua-made subscriptions every 0.5 s), so the two differ only in how they read
            client = Client(f"opc.tcp://127.0.0.1:{port}/bench/", timeout=2, watchdog_intervall=30.0)
            client._stale_check_interval = 30.0
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
    parser.add_argument("--repeat", type=int, default=1, help="rounds of all five, interleaved")
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
    rounds: list[dict] = []
    try:
        wait_port(port, 30)
        wait_port(plc_port, 30)
        time.sleep(1.0)
        modbus_bench.INTERVAL = 1.0
        with tempfile.TemporaryDirectory() as data:
            rss0 = rss_mib()
            for _ in range(args.repeat):  # interleaved, so that the machine's other load falls on all alike
                results = {}
                results["opcua subscribe"] = asyncio.run(measure(opcua_yaml(port, "subscribe"), args.seconds, data))
                results["opcua poll"] = asyncio.run(measure(opcua_yaml(port, "poll"), args.seconds, data))
                results["baseline: modbus poll"] = asyncio.run(
                    measure(modbus_bench.gateway_yaml(plc_port, ""), args.seconds, data))
                results["floor: asyncua reads"] = asyncio.run(floor("opcua", port, args.seconds))
                results["floor: pymodbus reads"] = asyncio.run(floor("modbus", plc_port, args.seconds))
                rounds.append(results)
    finally:
        for proc in (server, plc):
            proc.kill()
            proc.wait()
    print(f"{DEVICES} devices × {NODES} tags every 1 s, {args.seconds:g} s each, one process (RSS before: "
          f"{rss0:.1f} MiB, grows with what each run imports)")
    ratios: dict[str, list[float]] = {}
    for i, results in enumerate(rounds, 1):
        print(f"round {i} of {len(rounds)}")
        for name, r in results.items():
            print(f"  {name:<22} {r['samples'] / r['wall']:6.1f} samples/s (of {DEVICES}), "
                  f"{r['cpu'] / max(1, r['samples']) * 1e6:7.0f} CPU-µs per sample, errors {r['errors']}, "
                  f"RSS after {r['rss']:.1f} MiB")

        def us(name: str, results: dict = results) -> float:
            r = results[name]
            return r["cpu"] / max(1, r["samples"]) * 1e6
        modbus = us("baseline: modbus poll")
        for label, value in (("opcua poll / modbus poll", us("opcua poll") / modbus),
                             ("opcua subscribe / modbus poll", us("opcua subscribe") / modbus),
                             ("opcua poll / asyncua floor", us("opcua poll") / us("floor: asyncua reads")),
                             ("modbus poll / pymodbus floor", modbus / us("floor: pymodbus reads")),
                             ("asyncua floor / pymodbus floor",
                              us("floor: asyncua reads") / us("floor: pymodbus reads"))):
            ratios.setdefault(label, []).append(value)
        print("  ratios: " + ", ".join(f"{label} {values[-1]:.2f}" for label, values in ratios.items()))
    if len(rounds) > 1:
        print("ratios over the rounds: " + "; ".join(f"{label} {min(v):.2f}–{max(v):.2f}"
                                                     for label, v in ratios.items()))


if __name__ == "__main__":
    main()
