"""How far one gateway scales: devices × tags × rate, until the event loop lags or a core is full.

    .venv/bin/python bench/scale.py [--seconds 5]

Each step runs the daemon's own device pipeline (DeviceRunner: PolledSource schedule → counting →
publishing → Outbox, committed to a real SQLite file every 100 ms) for `--seconds`, with
every device polled at 1 Hz or 10 Hz, each with 10 or 50 tags and one counter. The sources are
synthetic (values made in process, no protocol), so the figures are the gateway's own cost per
sample; the uplink's is measured by bench/pipeline.py and bench/drain.py. Devices double until
the loop skips ticks (a poll due was late by a whole interval) on more than 1 % of polls or the
process uses more than 90 % of one core. Baseline, in the same run: the bare schedule (the same
PolledSource loops, each sample dropped), which is what any asyncio poller costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gateway import config  # noqa: E402
from gateway.contract import Topics  # noqa: E402
from gateway.device import DeviceRunner  # noqa: E402
from gateway.outbox import Outbox  # noqa: E402
from gateway.sample import Sample  # noqa: E402
from gateway.shifts import ShiftCalendar  # noqa: E402
from gateway.sources.poll import PolledSource  # noqa: E402


class Synthetic(PolledSource):
    """A machine with `tags` analog values and one counter, read without a protocol."""

    def __init__(self, device: config.Device) -> None:
        super().__init__(device.name, device.tags, device.interval, 1.0)
        self._rng = random.Random(device.name)
        self._count = 0

    async def read(self) -> Sample:
        self._count += self._rng.randint(0, 3)
        readings: dict[str, float | None] = {t: round(self._rng.uniform(0, 100), 3) for t in self.tags[:-1]}
        readings["count"] = float(self._count)
        return Sample.from_readings(self.device_name, time.time(), readings)


def config_text(devices: int, tags: int, hz: int) -> str:
    regs = "".join(f"      - {{name: t{i}, address: {i}}}\n" for i in range(tags - 1))
    dev = "".join(f"  - name: m{d}\n    source: modbus_tcp\n    host: 127.0.0.1\n    interval: {1000 // hz}ms\n"
                  f"    registers:\n{regs}      - {{name: count, address: {tags}, type: uint32}}\n"
                  f"    counters: [{{name: produced, register: count}}]\n" for d in range(devices))
    return f"gateway: {{id: bench, site: lab}}\nupstream: {{host: 127.0.0.1}}\ndevices:\n{dev}"


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


async def step(devices: int, tags: int, hz: int, seconds: float, data: str, bare: bool) -> dict[str, float]:
    cfg = config.parse(config_text(devices, tags, hz))
    outbox = Outbox.open(os.path.join(data, f"s{devices}-{tags}-{hz}-{int(bare)}.db"))
    runners = [DeviceRunner(d, Synthetic(d), outbox, Topics("bench"), ShiftCalendar([], "UTC")) for d in cfg.devices]

    async def drain(runner: DeviceRunner) -> None:
        async for _ in runner.source.samples():
            runner.health.polls += 1

    async def commit() -> None:
        while True:
            await asyncio.sleep(0.1)
            outbox.commit()
    tasks = [asyncio.create_task(drain(r) if bare else r.run()) for r in runners]
    tasks.append(asyncio.create_task(commit()))
    await asyncio.sleep(1.0)  # warm up: first polls, first commit
    polls0, skipped0 = sum(r.health.polls for r in runners), sum(r.source.skipped_ticks for r in runners)
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(seconds)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    polls = sum(r.health.polls for r in runners) - polls0
    skipped = sum(r.source.skipped_ticks for r in runners) - skipped0
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    outbox.close()
    return {"rate": polls / wall, "cpu_us": cpu / max(polls, 1) * 1e6, "core": cpu / wall,
            "skipped": skipped / max(polls + skipped, 1), "rss": rss_mib()}


def run_step(devices: int, tags: int, hz: int, seconds: float, bare: bool) -> dict[str, float]:
    """One step in a process of its own, so that its RSS is its own."""
    out = subprocess.run([sys.executable, __file__, "--step", f"{devices},{tags},{hz},{int(bare)}",
                          "--seconds", str(seconds)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-devices", type=int, default=6400)
    parser.add_argument("--step", help=argparse.SUPPRESS)  # DEVICES,TAGS,HZ,BARE: one step, as JSON
    args = parser.parse_args()
    if args.step:
        devices, tags, hz, bare = (int(x) for x in args.step.split(","))
        with tempfile.TemporaryDirectory() as data:
            print(json.dumps(asyncio.run(step(devices, tags, hz, args.seconds, data, bool(bare)))))
        return
    print(f"{'Hz':>3} {'tags':>4} {'devices':>7} {'samples/s':>10} {'CPU-µs/sample':>14} {'bare µs':>8} "
          f"{'core':>5} {'skipped':>8} {'RSS MiB':>8} {'bare RSS':>8}")
    for hz in (1, 10):
        for tags in (10, 50):
            devices = 10 if hz == 10 else 50
            while devices <= args.max_devices:
                r = run_step(devices, tags, hz, args.seconds, bare=False)
                b = run_step(devices, tags, hz, args.seconds, bare=True)
                print(f"{hz:>3} {tags:>4} {devices:>7} {r['rate']:>10.0f} {r['cpu_us']:>14.1f} "
                      f"{b['cpu_us']:>8.1f} {r['core']:>5.0%} {r['skipped']:>8.2%} {r['rss']:>8.1f} "
                      f"{b['rss']:>8.1f}", flush=True)
                if r["skipped"] > 0.01 or r["core"] > 0.9:
                    print(f"    limit: {'the loop skips ticks' if r['skipped'] > 0.01 else 'one core is full'} "
                          f"at {devices} devices × {tags} tags × {hz} Hz = {devices * hz} samples/s due")
                    break
                devices *= 2


if __name__ == "__main__":
    main()
