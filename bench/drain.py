"""Backlog drain: how fast a gateway empties its outbox after an outage.

Fills the SQLite outbox with N real telemetry messages (a simulated pump, the same
store code as the daemon) while no broker is running, then starts mosquitto and
lets the daemon's uplink and commit loop drain it: every message published QoS 1,
acknowledged, and deleted. Printed next to plain paho publishing the same number of
messages of the same size QoS 1 to the same mosquitto, in the same run; and the
outbox's size on disk per message.

    .venv/bin/python bench/drain.py [--messages 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

from common import free_port, mosquitto, raw_paho_rate

import sim
from gateway import config
from gateway.sample import Sample
from gateway.store.outbox import Outbox
from gateway.units import rfc3339
from gateway.uplink.mqtt import JsonFormat, Uplink


def fill(path: str, count: int) -> tuple[int, int]:
    """N pump telemetry messages in the outbox; returns (bytes on disk, payload bytes)."""
    store = Outbox.open(path)
    pump = sim.Pump(seed=1)
    ts = time.time() - count
    for i in range(count):
        sample = Sample.from_readings("pump1", ts + i, {k: round(v, 3) for k, v in pump.step(1.0).items()})
        store.stage("edge/lab/bench/pump1/telemetry", {"ts": rfc3339(sample.ts), "device": "pump1",
                                                       "values": sample.values}, created=sample.ts)
        if i % 5000 == 4999:
            store.commit()
    store.commit()
    payload = store.stats.bytes
    store.close()
    disk = sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s))
    return disk, payload


async def drain(path: str, port: int, inflight: int) -> tuple[int, float, float]:
    cfg = config.parse(f"gateway: {{id: bench, site: lab}}\n"
                       f"upstream: {{host: 127.0.0.1, port: {port}, max_inflight: {inflight}}}\n"
                       "devices: [{name: pump1, source: sim, profile: pump}]\n")
    store = Outbox.open(path)
    count = store.stats.messages
    uplink = Uplink(cfg.upstream, store, JsonFormat(client_id="bench-drain", status_topic="edge/lab/bench/status",
                                                    offline_payload=b"{}"))
    cpu0, t0 = time.process_time(), time.perf_counter()
    task = asyncio.create_task(uplink.run())
    while store.stats.messages or uplink.inflight:
        await asyncio.sleep(cfg.outbox.commit_interval)  # the daemon's commit loop
        store.commit()
        uplink.wake()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    await uplink.stop(1.0)
    task.cancel()
    store.close()
    return count, wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--inflight", type=int, default=100, help="upstream.max_inflight (default %(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "gateway.db")
        port = free_port()  # no broker listens here yet: the backlog builds up
        disk, payload = fill(path, args.messages)
        with mosquitto(port):
            count, wall, cpu = asyncio.run(drain(path, port, args.inflight))
            size = payload // args.messages
            raw = raw_paho_rate(port, args.messages, b"x" * size, inflight=args.inflight)
    rate = count / wall
    print(f"drain: {count} backlog messages ({size} B payload each) published QoS 1, acknowledged, deleted")
    print(f"  drain msg/s                 {rate:10.0f}   ({wall:.1f} s, CPU {cpu / count * 1e6:.0f} µs per message)")
    print(f"baseline: raw paho -> mosquitto QoS 1, same count and size, in-flight {args.inflight}, same run")
    print(f"  raw msg/s                   {raw:10.0f}")
    print(f"drain rate = {rate / raw * 100:.0f} % of raw paho (target >= 50 %)")
    print(f"outbox on disk: {disk / args.messages:.0f} bytes per message "
          f"({payload / args.messages:.0f} payload + {(disk - payload) / args.messages:.0f} SQLite overhead)")


if __name__ == "__main__":
    main()
