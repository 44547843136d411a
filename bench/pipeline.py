"""Samples per second and CPU per sample through sim → counters → outbox → uplink → mosquitto.

Every sample of a simulated pump and flexo line becomes a telemetry message (and a
counters message when a count changed), committed to the SQLite outbox in batches,
published QoS 1 and deleted on PUBACK, committed by the daemon's own group commit
(`outbox.commit_loop`). Printed next to, in the same run:

- the floor: the cheapest program doing the same work without our guarantees — the same
  simulated reads, each sample encoded as JSON ({ts, device, values}) and published by plain
  paho at QoS 1 (its network thread, up to 100 in flight), waiting for every PUBACK; no
  storage, no counters. The ratio CPU per sample / floor's says how close to the limit we are;
- plain paho publishing QoS 1 to the same mosquitto (message rate).

    .venv/bin/python bench/pipeline.py [--samples 20000] [--repeat 2] [--format json|sparkplug_b] [--timer]

JSON runs the group commit and the timer it replaced (a commit every 100 ms, outbox.group_commit:
false) alternately with the floor, `--repeat` times each.

With `--format sparkplug_b` the same samples, with the line's machine events (state, live OEE, an
alarm), go through the JSON format and through the Sparkplug B format (DDATA at QoS 0 with a
timestamp on every metric, events as device metrics, a QoS 1 marker per batch) in the same run:
samples/s, CPU-µs per sample and bytes on the wire per sample (every MQTT PUBLISH packet the gateway
sends, headers included).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

from common import mosquitto, raw_paho_rate

from gateway import config
from gateway.contract import Topics
from gateway.pipeline.device import DeviceRunner
from gateway.shifts import ShiftCalendar
from gateway.sources import Links, open_source, tag_types
from gateway.store.outbox import Outbox, commit_loop
from gateway.uplink.mqtt import Format, JsonFormat, Uplink

WIRE = {"bytes": 0}


def _count_wire() -> None:
    """Count the size of every PUBLISH packet the process sends (fixed header, topic, packet id, payload)."""
    import paho.mqtt.client as mqtt

    publish = mqtt.Client.publish

    def counted(self, topic, payload=None, qos=0, retain=False, properties=None):
        body = 2 + len(topic.encode()) + (2 if qos else 0) + len(payload or b"")
        WIRE["bytes"] += 1 + (1 if body < 128 else 2 if body < 16384 else 3) + body
        return publish(self, topic, payload, qos, retain, properties)
    mqtt.Client.publish = counted

CONFIG = """
gateway: {{id: bench, site: lab, data_dir: "{data}"}}
upstream: {{host: 127.0.0.1, port: {port}, max_inflight: 100}}
devices:
  - {{name: pump1, source: sim, profile: pump, seed: 1, interval: 1s}}
  - name: line1
    source: sim
    profile: flexo_line
    interval: 1s
    counters: [{{name: produced, register: produced_raw, bits: 32}}]
"""
# With --format sparkplug_b, for both formats: the machine events too (state changes, live OEE, an alarm),
# which Sparkplug carries as device metrics.
EVENTS = """    oee: {{status_tag: machine_status, states: {{1: running, 2: idle, 3: down, 4: planned_stop}}, ideal_rate: 120,
           reason_tag: stop_reason, reasons: {{11: web break, 12: ink change, 21: no material}}, live_interval: 1s}}
    alarms: [{{name: slow, tag: line_speed_m_min, below: 150}}]
"""


async def run_pipeline(port: int, samples: int, data: str, fmt: str = "json", group: bool = True,
                       events: bool = True) -> dict:
    text = (CONFIG + EVENTS) if events else CONFIG
    cfg = config.parse(text.format(data=data, port=port).replace("max_inflight: 100}",
                                                                  f"max_inflight: 100, format: {fmt}}}"))
    store = Outbox.open(os.path.join(data, "g.db"))
    shifts = ShiftCalendar([], "UTC")
    links = Links()
    runners = [DeviceRunner(d, open_source(d, links), store, Topics(cfg.topic_root), shifts) for d in cfg.devices]
    if fmt == "sparkplug_b":
        from gateway.uplink.sparkplug.uplink import SparkplugFormat
        types = {r.name: tag_types(r.device, r.source) for r in runners}
        out: Format = SparkplugFormat(cfg, state_path=os.path.join(data, "sparkplug.json"), scored={},
                                      types_of=types.__getitem__)
    else:
        out = JsonFormat(client_id="bench-gw", status_topic=f"{cfg.topic_root}/status", offline_payload=b"{}")
    uplink = Uplink(cfg.upstream, store, out)
    uplink_task = asyncio.create_task(uplink.run())
    while not uplink.connected:
        await asyncio.sleep(0.01)

    def committed(messages: int) -> None:
        if messages:
            uplink.wake()
    committer = asyncio.create_task(commit_loop(store, committed, interval=cfg.outbox.commit_interval, group=group))
    cpu0, t0 = time.process_time(), time.perf_counter()
    wire0 = WIRE["bytes"]
    done = 0
    while done < samples:
        for runner in runners:
            runner.process(await runner.source.read_once())
        done += len(runners)
        if done % 200 == 0:
            await asyncio.sleep(0)  # let the uplink and the committer run, as the poll loops' sleeps do
    produced = store.last_seq
    while store.stats.messages or store.pending or uplink.inflight:
        await asyncio.sleep(0.005)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    committer.cancel()
    await uplink.stop(1.0)
    uplink_task.cancel()
    store.close()
    return {"samples": done, "messages": produced, "wall": wall, "cpu": cpu, "wire": WIRE["bytes"] - wire0}


async def run_floor(port: int, samples: int) -> dict:
    """The same simulated reads, JSON-encoded and published QoS 1 by plain paho; no storage, no counters."""
    import json
    import threading

    import paho.mqtt.client as mqtt

    cfg = config.parse(CONFIG.format(data="/nonexistent", port=port))
    links = Links()
    sources = [open_source(d, links) for d in cfg.devices]
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-floor-{os.getpid()}")
    client.max_inflight_messages_set(100)
    window = threading.Semaphore(200)  # paho's 16-bit message ids: keep what is unacknowledged bounded
    all_acked = threading.Event()
    acked = 0

    def on_publish(c, u, mid, rc, p):
        nonlocal acked
        acked += 1
        window.release()
        if acked >= samples:
            all_acked.set()
    client.on_publish = on_publish
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    connected.wait(10)
    topics = [f"{cfg.topic_root}/{d.name}/telemetry" for d in cfg.devices]
    cpu0, t0 = time.process_time(), time.perf_counter()
    done = 0
    while done < samples:
        for source, topic in zip(sources, topics):
            sample = await source.read_once()
            window.acquire()
            client.publish(topic, json.dumps({"ts": sample.ts, "device": sample.device, "values": sample.values},
                                             separators=(",", ":")).encode(), qos=1)
        done += len(sources)
    all_acked.wait(60)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    client.loop_stop()
    client.disconnect()
    return {"samples": done, "messages": done, "wall": wall, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--format", choices=("json", "sparkplug_b"), default="json")
    parser.add_argument("--timer", action="store_true", help="with --format sparkplug_b: commit every 100 ms (the "
                                                             "cadence before group commit)")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    if args.format == "sparkplug_b":
        return compare_formats(args.samples, not args.timer)
    with mosquitto() as (port, _):
        floor, group, timer = [], [], []
        for _ in range(args.repeat):  # interleaved, so that a busy moment of the machine hits all three alike
            floor.append(asyncio.run(run_floor(port, args.samples)))
            for runs, commit in ((group, True), (timer, False)):
                with tempfile.TemporaryDirectory() as data:
                    runs.append(asyncio.run(run_pipeline(port, args.samples, data, group=commit)))
        raw = raw_paho_rate(port, group[0]["messages"], b"x" * 330)  # about the size of a pump telemetry message

    def us(runs: list[dict]) -> list[float]:
        return [r["cpu"] / r["samples"] * 1e6 for r in runs]

    def rate(runs: list[dict], key: str = "samples") -> list[float]:
        return [r[key] / r["wall"] for r in runs]

    def span(xs: list[float], fmt: str = "{:.0f}") -> str:
        return fmt.format(min(xs)) if len(xs) == 1 else f"{fmt.format(min(xs))}–{fmt.format(max(xs))}"
    print(f"pipeline: {args.samples} samples per run, {args.repeat} runs of each, interleaved; every message "
          "acknowledged by mosquitto")
    print(f"{'':<34} {'samples/s':>12} {'messages/s':>12} {'CPU-µs/sample':>14} {'× floor':>10}")
    f_us = us(floor)
    for label, runs in (("group commit (the daemon's)", group), ("timer, every 100 ms (before)", timer),
                        ("floor: reads -> JSON -> paho", floor)):
        ratios = [a / b for a, b in zip(us(runs), f_us)]
        print(f"{label:<34} {span(rate(runs)):>12} {span(rate(runs, 'messages')):>12} {span(us(runs)):>14} "
              f"{span(ratios, '{:.2f}'):>10}")
    g_t = [a / b for a, b in zip(us(group), us(timer))]
    print(f"group commit / timer, CPU per sample, run by run: {span(g_t, '{:.2f}')}")
    print(f"baseline: raw paho -> mosquitto QoS 1, same message count, same run: {raw:.0f} messages/s "
          f"(the pipeline: {max(rate(group, 'messages')) / raw * 100:.0f} % of it)")


def compare_formats(samples: int, group: bool = True) -> None:
    _count_wire()
    results = {}
    for fmt in ("json", "sparkplug_b"):
        with mosquitto() as (port, _), tempfile.TemporaryDirectory() as data:
            results[fmt] = asyncio.run(run_pipeline(port, samples, data, fmt, group))
    with mosquitto() as (port, _):
        floor = asyncio.run(run_floor(port, samples))
    print(f"pipeline, {samples} samples each, JSON and Sparkplug B in the same run, every row deleted only once "
          "the broker has it")
    for fmt, r in results.items():
        print(f"  {fmt:<12} {r['samples'] / r['wall']:8.0f} samples/s   {r['cpu'] / r['samples'] * 1e6:7.1f} CPU-µs "
              f"per sample   {r['wire'] / r['samples']:6.1f} bytes on the wire per sample")
    floor_us = floor["cpu"] / floor["samples"] * 1e6
    print(f"  {'floor':<12} {floor['samples'] / floor['wall']:8.0f} samples/s   {floor_us:7.1f} CPU-µs per sample "
          "(the same reads -> JSON -> plain paho QoS 1, no storage)")
    for fmt, r in results.items():
        print(f"  {fmt}: {r['cpu'] / r['samples'] * 1e6 / floor_us:.2f} × the floor's CPU per sample")
    j, s = results["json"], results["sparkplug_b"]
    print(f"baseline: json (same run). sparkplug_b: {s['wire'] / j['wire'] * 100:.0f} % of the bytes, "
          f"{(s['cpu'] / s['samples']) / (j['cpu'] / j['samples']) * 100:.0f} % of the CPU per sample")


if __name__ == "__main__":
    main()
