"""From a register changing on the PLC to the message at an upstream subscriber: where the time goes.

    .venv/bin/python bench/latency.py [--seconds 30] [--quick | --only HZ,DEVICES,SYNC]
                                      [--max-commit-rate R] [--profile PREFIX]

A Modbus TCP server (its own process, one port per device) changes a uint32 register of each
device at random times, 0.5–1.5 poll intervals apart; the register holds the time of its own
last change (ms since the run's epoch), so every message says when its value changed. The real
daemon (`python -m gateway run`, its own process) polls the devices and publishes JSON to
mosquitto; a paho subscriber in this process notes when each message arrives. Per message:

    change → read      the poll phase: the sample's ts (taken as the poll starts; RFC 3339 ms,
                       floored) minus the change time — the first message carrying a new value
    read → received    ours: poll round trip, pipeline, outbox commit, publish, broker, subscriber
                       — every telemetry message
    change → received  the whole path, for the first message carrying a new value

at 1 Hz and 10 Hz polling, 1 and 50 devices, `outbox.sync: normal` and `full`, each with the
group commit (the default) and, in the same run and right after it, the earlier cadence
(`outbox.group_commit: false`: one commit every 100 ms). Also the daemon's CPU per sample
(utime + stime from /proc over the measured window).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import paho.mqtt.client as mqtt
from common import mosquitto

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


# -- the PLC: a minimal Modbus TCP server (read holding registers only) ---------------------------
async def _serve_plc(devices: int, interval: float, epoch: float) -> None:
    """`devices` ports, each a device whose registers 0–1 hold, as uint32, the ms since `epoch` of its last
    change; prints `ready PORT,PORT,...`."""
    regs: dict[int, int] = {}

    async def changer(port: int) -> None:
        rng = random.Random(port)
        while True:
            await asyncio.sleep(rng.uniform(0.5, 1.5) * interval)
            regs[port] = int((time.time() - epoch) * 1000)

    async def handle(port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readexactly(7)
                tid, _, length, unit = struct.unpack(">HHHB", head)
                pdu = await reader.readexactly(length - 1)
                fc, address, count = struct.unpack(">BHH", pdu[:5])
                if fc != 3:
                    body = struct.pack(">BB", fc | 0x80, 1)
                else:
                    words = [0] * count
                    value = regs[port]
                    for i in range(count):
                        a = address + i
                        words[i] = (value >> 16) & 0xFFFF if a == 0 else value & 0xFFFF if a == 1 else 0
                    body = struct.pack(f">BB{count}H", 3, 2 * count, *words)
                writer.write(struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    servers = []
    for _ in range(devices):
        server = await asyncio.start_server(lambda r, w: handle(w.get_extra_info("sockname")[1], r, w),
                                            "127.0.0.1", 0)
        regs[server.sockets[0].getsockname()[1]] = 0
        servers.append(server)
    ports = list(regs)
    tasks = [asyncio.create_task(changer(p)) for p in ports]
    print("ready " + ",".join(map(str, ports)), flush=True)
    await asyncio.gather(*tasks, *(s.serve_forever() for s in servers))


# -- one measured configuration -------------------------------------------------------------------
CONFIG = """
gateway: {{id: lat, site: lab, data_dir: "{data}", log_level: warning}}
upstream: {{host: 127.0.0.1, port: {broker}}}
outbox: {{sync: {sync}, group_commit: {group}, max_commit_rate: {rate}}}
devices:
{devices}"""
DEVICE = """  - name: d{i}
    source: modbus_tcp
    host: 127.0.0.1
    port: {port}
    interval: {interval_ms}ms
    registers: [{{name: changed_ms, address: 0, type: uint32}}]
"""


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def measure(broker: int, plc_ports: list[int], epoch: float, hz: int, sync: str, group: bool,
            seconds: float, profile: str | None = None, rate: float = 0) -> dict[str, object]:
    """Run the daemon on this configuration; the latencies (ms) and CPU per sample over `seconds`."""
    interval_ms = 1000 // hz
    received: list[tuple[float, bytes]] = []
    lock = threading.Lock()

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        with lock:
            received.append((now, msg.payload))
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"lat-sub-{os.getpid()}")
    sub.on_message = on_message
    sub.connect("127.0.0.1", broker)
    sub.subscribe("edge/+/+/+/telemetry", qos=1)
    sub.loop_start()
    with tempfile.TemporaryDirectory() as data:
        devices = "".join(DEVICE.format(i=i, port=p, interval_ms=interval_ms) for i, p in enumerate(plc_ports))
        cfg = Path(data) / "gateway.yaml"
        cfg.write_text(CONFIG.format(data=data, broker=broker, sync=sync, group=str(group).lower(), devices=devices,
                                      rate=rate))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(cfg)], env=env,
                                stdout=subprocess.DEVNULL, stderr=open(Path(data) / "log", "w"))
        try:
            deadline = time.monotonic() + 20
            while len({json.loads(p)["device"] for _, p in list(received)}) < len(plc_ports):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the gateway did not deliver from every device: "
                                       + (Path(data) / "log").read_text()[-2000:])
                time.sleep(0.05)
            time.sleep(1.0)  # warm: connections made, first commits done
            with lock:
                received.clear()
            spy = None
            if profile:  # py-spy's own sampling costs the daemon nothing (it reads its memory from outside)
                spy = subprocess.Popen(["py-spy", "record", "-p", str(proc.pid), "-d", str(int(seconds)), "-r", "200",
                                        "-f", "raw", "-o", f"{profile}-{len(plc_ports)}x{hz}hz-{sync}-"
                                        f"{'group' if group else 'timer'}.txt"], stdout=subprocess.DEVNULL)
            cpu0, t0 = _cpu_s(proc.pid), time.time()
            time.sleep(seconds)
            cpu, t1 = _cpu_s(proc.pid) - cpu0, time.time()
            time.sleep(0.5)  # messages read in the window still on their way
            if spy is not None:
                spy.wait(30)
        finally:
            proc.terminate()
            proc.wait(15)
    sub.loop_stop()
    sub.disconnect()
    ours, poll, whole = [], [], []
    last: dict[str, int] = {}
    samples = 0
    for recv, payload in received:
        doc = json.loads(payload)
        read = _ts(doc["ts"])
        if not t0 <= read < t1:
            continue
        samples += 1
        ours.append((recv - read) * 1000)
        value = doc["values"]["changed_ms"]
        if value is not None and last.get(doc["device"]) not in (None, value):
            changed = epoch + value / 1000
            poll.append((read - changed) * 1000)
            whole.append((recv - changed) * 1000)
        if value is not None:
            last[doc["device"]] = value
    return {"ours": ours, "poll": poll, "whole": whole, "samples": samples,
            "cpu_us": cpu / max(samples, 1) * 1e6, "rate": samples / (t1 - t0)}


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def row(label: str, xs: list[float]) -> str:
    return (f"{label:<18} {statistics.median(xs) if xs else float('nan'):7.1f} {pct(xs, 90):7.1f} "
            f"{pct(xs, 99):7.1f} {max(xs) if xs else float('nan'):7.1f} {len(xs):6d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window per configuration at 1 Hz "
                                                                     "(10 Hz: a third of it)")
    parser.add_argument("--quick", action="store_true", help="only 10 Hz, 1 and 50 devices, sync normal")
    parser.add_argument("--only", metavar="HZ,DEVICES,SYNC", help="only this configuration, e.g. 10,50,full")
    parser.add_argument("--profile", metavar="PREFIX", help="record the daemon with py-spy (collapsed stacks)")
    parser.add_argument("--max-commit-rate", type=float, default=0, help="outbox.max_commit_rate of the group runs")
    parser.add_argument("--plc", help=argparse.SUPPRESS)  # DEVICES;INTERVAL;EPOCH: be the PLC
    args = parser.parse_args()
    if args.plc:
        devices, interval, epoch = args.plc.split(";")
        asyncio.run(_serve_plc(int(devices), float(interval), float(epoch)))
        return
    matrix = [(hz, n, sync) for sync in ("normal", "full") for hz in (1, 10) for n in (1, 50)]
    if args.quick:
        matrix = [(10, n, "normal") for n in (1, 50)]
    if args.only:
        hz, n, sync = args.only.split(",")
        matrix = [(int(hz), int(n), sync)]
    epoch = float(int(time.time()))
    print("latency in ms: median, p90, p99, max, count; CPU µs per sample of the daemon process")
    print("group = group commit (default); timer = outbox.group_commit: false (a commit every 100 ms), same run")
    with mosquitto() as (broker, _):
        for hz, n, sync in matrix:
            plc = subprocess.Popen([sys.executable, __file__, "--plc", f"{n};{1 / hz};{epoch}"],
                                   stdout=subprocess.PIPE, text=True)
            try:
                assert plc.stdout is not None
                ready = plc.stdout.readline().split()
                if ready[:1] != ["ready"]:
                    raise RuntimeError("the Modbus server did not start")
                ports = [int(p) for p in ready[1].split(",")]
                seconds = args.seconds if hz == 1 else args.seconds / 3
                for group in (True, False):
                    r = measure(broker, ports, epoch, hz, sync, group, seconds, args.profile, args.max_commit_rate)
                    print(f"\n{hz} Hz, {n} devices, sync {sync}, {'group' if group else 'timer'}: "
                          f"{r['rate']:.0f} samples/s, {r['cpu_us']:.0f} CPU-µs per sample")
                    print(f"{'':<18} {'median':>7} {'p90':>7} {'p99':>7} {'max':>7} {'n':>6}")
                    for label, key in (("change → read", "poll"), ("read → received", "ours"),
                                       ("change → received", "whole")):
                        print(row(label, r[key]))  # type: ignore[arg-type]
                    sys.stdout.flush()
            finally:
                plc.kill()
                plc.wait()


if __name__ == "__main__":
    main()
