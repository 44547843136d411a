"""Samples per second and CPU per sample through sim → counters → outbox → uplink → mosquitto.

Every sample of a simulated pump and flexo line becomes a telemetry message (and a
counters message when a count changed), committed to the SQLite outbox in batches,
published QoS 1 and deleted on PUBACK. Printed next to plain paho publishing QoS 1
to the same mosquitto, measured in the same run.

    .venv/bin/python bench/pipeline.py [--samples 20000] [--format json|sparkplug_b]

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
from gateway.device import DeviceRunner
from gateway.outbox import Outbox
from gateway.shifts import ShiftCalendar
from gateway.sources import Links, open_source, tag_types
from gateway.uplink import Format, JsonFormat, Uplink

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


async def run_pipeline(port: int, samples: int, data: str, fmt: str = "json", events: bool = False) -> dict:
    text = (CONFIG + EVENTS) if events else CONFIG
    cfg = config.parse(text.format(data=data, port=port).replace("max_inflight: 100}",
                                                                  f"max_inflight: 100, format: {fmt}}}"))
    store = Outbox.open(os.path.join(data, "g.db"))
    shifts = ShiftCalendar([], "UTC")
    links = Links()
    runners = [DeviceRunner(d, open_source(d, links), store, Topics(cfg.topic_root), shifts) for d in cfg.devices]
    if fmt == "sparkplug_b":
        from gateway.sparkplug.uplink import SparkplugFormat
        types = {r.name: tag_types(r.device, r.source) for r in runners}
        out: Format = SparkplugFormat(cfg, state_path=os.path.join(data, "sparkplug.json"), scored={},
                                      types_of=types.__getitem__)
    else:
        out = JsonFormat(client_id="bench-gw", status_topic=f"{cfg.topic_root}/status", offline_payload=b"{}")
    uplink = Uplink(cfg.upstream, store, out)
    uplink_task = asyncio.create_task(uplink.run())
    while not uplink.connected:
        await asyncio.sleep(0.01)

    async def commit_loop():
        while True:
            await asyncio.sleep(cfg.outbox.commit_interval)
            if store.commit():
                uplink.wake()
    committer = asyncio.create_task(commit_loop())
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--format", choices=("json", "sparkplug_b"), default="json")
    args = parser.parse_args()
    if args.format == "sparkplug_b":
        return compare_formats(args.samples)
    with mosquitto() as (port, _), tempfile.TemporaryDirectory() as data:
        result = asyncio.run(run_pipeline(port, args.samples, data))
        payload = b"x" * 330  # about the size of a pump telemetry message
        raw = raw_paho_rate(port, result["messages"], payload)
    sps = result["samples"] / result["wall"]
    mps = result["messages"] / result["wall"]
    print(f"pipeline: {result['samples']} samples -> {result['messages']} messages, all acknowledged by mosquitto")
    print(f"  samples/s            {sps:10.0f}")
    print(f"  messages/s           {mps:10.0f}")
    print(f"  CPU µs per sample    {result['cpu'] / result['samples'] * 1e6:10.1f}   (whole process, both cores' time)")
    print("baseline: raw paho -> mosquitto QoS 1, same message count, same run")
    print(f"  messages/s           {raw:10.0f}")
    print(f"gateway pipeline message rate = {mps / raw * 100:.0f} % of the raw paho rate")


def compare_formats(samples: int) -> None:
    _count_wire()
    results = {}
    for fmt in ("json", "sparkplug_b"):
        with mosquitto() as (port, _), tempfile.TemporaryDirectory() as data:
            results[fmt] = asyncio.run(run_pipeline(port, samples, data, fmt, events=True))
    print(f"pipeline, {samples} samples each, JSON and Sparkplug B in the same run, every row deleted only once "
          "the broker has it")
    for fmt, r in results.items():
        print(f"  {fmt:<12} {r['samples'] / r['wall']:8.0f} samples/s   {r['cpu'] / r['samples'] * 1e6:7.1f} CPU-µs "
              f"per sample   {r['wire'] / r['samples']:6.1f} bytes on the wire per sample")
    j, s = results["json"], results["sparkplug_b"]
    print(f"baseline: json (same run). sparkplug_b: {s['wire'] / j['wire'] * 100:.0f} % of the bytes, "
          f"{(s['cpu'] / s['samples']) / (j['cpu'] / j['samples']) * 100:.0f} % of the CPU per sample")


if __name__ == "__main__":
    main()
