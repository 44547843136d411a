"""How far one gateway scales: devices × tags × rate, until the event loop lags or a core is full.

    .venv/bin/python bench/scale.py [--seconds 5] [--before REV] [--point DEVICES,TAGS,HZ] [--daemons 2]

Each step runs the daemon's own device pipeline (DeviceRunner: PolledSource schedule → counting →
publishing → Outbox, committed to a real SQLite file by the daemon's group commit) for `--seconds`,
in a process of its own pinned to one core, with
every device polled at 1 Hz or 10 Hz, each with 10 or 50 tags and one counter. The sources are
synthetic (values made in process, no protocol), so the figures are the gateway's own cost per
sample; the uplink's is measured by bench/pipeline.py and bench/drain.py. Devices double until
the loop skips ticks (a poll due was late by a whole interval) on more than 1 % of polls or the
process uses more than 90 % of one core. Baselines, in the same run: the bare schedule (the same
PolledSource loops, each sample dropped), which is what any asyncio poller costs; with `--before
REV`, the same step run by the code of git revision REV (its tree exported to a temporary folder).

`--point D,T,H` measures one point only (e.g. 1000,50,10); with `--daemons 2` the D devices are split
between two processes (two daemons, as with the systemd template unit), each pinned to its own core,
measured together: samples/s summed, CPU per sample over both.
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
from gateway.pipeline.device import DeviceRunner  # noqa: E402
from gateway.sample import Sample  # noqa: E402
from gateway.shifts import ShiftCalendar  # noqa: E402
from gateway.sources.poll import PolledSource  # noqa: E402
from gateway.store.outbox import Outbox, commit_loop  # noqa: E402


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

    tasks = [asyncio.create_task(drain(r) if bare else r.run()) for r in runners]
    tasks.append(asyncio.create_task(commit_loop(outbox, lambda n: None)))
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


def run_step(devices: int, tags: int, hz: int, seconds: float, bare: bool, root: str | None = None,
             core: int = 0) -> dict[str, float]:
    """One step in a process of its own (so that its RSS is its own), pinned to one core."""
    return json.loads(_start_step(devices, tags, hz, seconds, bare, root, core).communicate()[0])


def _start_step(devices: int, tags: int, hz: int, seconds: float, bare: bool, root: str | None,
                core: int) -> subprocess.Popen[str]:
    script = os.path.join(root, "bench", "scale.py") if root else __file__
    cores = sorted(os.sched_getaffinity(0))
    return subprocess.Popen([sys.executable, script, "--step", f"{devices},{tags},{hz},{int(bare)}",
                             "--seconds", str(seconds)], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, {cores[core % len(cores)]}))


def run_daemons(daemons: int, devices: int, tags: int, hz: int, seconds: float) -> dict[str, float]:
    """`daemons` processes at once, each with its share of the devices and a core of its own."""
    procs = [_start_step(devices // daemons, tags, hz, seconds, False, None, i) for i in range(daemons)]
    results = [json.loads(p.communicate()[0]) for p in procs]
    rate = sum(r["rate"] for r in results)
    return {"rate": rate, "cpu_us": sum(r["cpu_us"] * r["rate"] for r in results) / rate,
            "core": max(r["core"] for r in results), "skipped": max(r["skipped"] for r in results),
            "rss": sum(r["rss"] for r in results)}


def export(rev: str) -> str:
    """The tree of git revision `rev` in a temporary folder (removed at exit)."""
    import atexit
    import shutil

    root = tempfile.mkdtemp(prefix="scale-before-")
    atexit.register(shutil.rmtree, root, True)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    archive = subprocess.run(["git", "-C", here, "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", root], input=archive, check=True)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-devices", type=int, default=6400)
    parser.add_argument("--before", metavar="REV", help="also run each step with the code of this git revision")
    parser.add_argument("--point", metavar="DEVICES,TAGS,HZ", help="measure this one point")
    parser.add_argument("--daemons", type=int, default=1, help="with --point: also split it over this many daemons")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # DEVICES,TAGS,HZ,BARE: one step, as JSON
    args = parser.parse_args()
    if args.step:
        devices, tags, hz, bare = (int(x) for x in args.step.split(","))
        with tempfile.TemporaryDirectory() as data:
            print(json.dumps(asyncio.run(step(devices, tags, hz, args.seconds, data, bool(bare)))))
        return
    before = export(args.before) if args.before else None
    if args.point:
        devices, tags, hz = (int(x) for x in args.point.split(","))
        print(f"{devices} devices × {tags} tags × {hz} Hz = {devices * hz} samples/s due, {args.seconds:g} s each")
        rows = [("one daemon, one core", lambda: run_step(devices, tags, hz, args.seconds, bare=False))]
        if args.daemons > 1:
            rows.append((f"{args.daemons} daemons, a core each",
                         lambda: run_daemons(args.daemons, devices, tags, hz, args.seconds)))
        if before:
            rows.append((f"one daemon, {args.before}", lambda: run_step(devices, tags, hz, args.seconds, False, before)))
        rows.append(("bare schedule, one core", lambda: run_step(devices, tags, hz, args.seconds, bare=True)))
        for label, run in rows:
            r = run()
            print(f"  {label:<28} {r['rate']:>8.0f} samples/s {r['cpu_us']:>7.1f} CPU-µs/sample "
                  f"{r['core']:>5.0%} of a core {r['skipped']:>7.2%} ticks skipped {r['rss']:>7.1f} MiB", flush=True)
        return
    print(f"{'Hz':>3} {'tags':>4} {'devices':>7} {'samples/s':>10} {'CPU-µs/sample':>14} "
          + (f"{'before µs':>10} " if before else "") + f"{'bare µs':>8} "
          f"{'core':>5} {'skipped':>8} {'RSS MiB':>8} {'bare RSS':>8}")
    for hz in (1, 10):
        for tags in (10, 50):
            devices = 10 if hz == 10 else 50
            while devices <= args.max_devices:
                r = run_step(devices, tags, hz, args.seconds, bare=False)
                o = run_step(devices, tags, hz, args.seconds, False, before) if before else None
                b = run_step(devices, tags, hz, args.seconds, bare=True)
                print(f"{hz:>3} {tags:>4} {devices:>7} {r['rate']:>10.0f} {r['cpu_us']:>14.1f} "
                      + (f"{o['cpu_us']:>10.1f} " if o else "") + f"{b['cpu_us']:>8.1f} "
                      f"{r['core']:>5.0%} {r['skipped']:>8.2%} {r['rss']:>8.1f} {b['rss']:>8.1f}", flush=True)
                if r["skipped"] > 0.01 or r["core"] > 0.9:
                    print(f"    limit: {'the loop skips ticks' if r['skipped'] > 0.01 else 'one core is full'} "
                          f"at {devices} devices × {tags} tags × {hz} Hz = {devices * hz} samples/s due")
                    break
                devices *= 2


if __name__ == "__main__":
    main()
