"""`/metrics`: the daemon's state in the Prometheus text format, through prometheus_client.

One custom collector reads the same in-process state as the page at scrape time (nothing is
counted twice; a device's counters add those of the runners a reload replaced, `Recorder.totals`,
so that none goes down while `process_start_time_seconds` stays); prometheus_client's own process collector adds RSS, CPU and
open files. Names follow Prometheus conventions: `edge_gateway_` prefix, units in the name,
`_total` on counters (prometheus_client appends it to a counter family's name).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from gateway import __version__
from gateway.pipeline.shiftbook import STATES as MACHINE_STATES

if TYPE_CHECKING:
    from gateway.web.view import Gateway, Recorder

DEVICE_STATES = ("starting", "ok", "degraded", "error")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class GatewayCollector:
    def __init__(self, gw: Gateway, rec: Recorder) -> None:
        self.gw = gw
        self.rec = rec

    def collect(self) -> Iterator[Metric]:
        gw = self.gw
        yield from _gateway(gw)
        yield from _devices(gw, self.rec)
        yield _latency(self.rec)


def _gateway(gw: Gateway) -> Iterator[Metric]:
    info = GaugeMetricFamily("edge_gateway_info", "this gateway's id and version (always 1)",
                             labels=["gateway_id", "version"])
    info.add_metric([gw.config.gateway.id, __version__], 1)
    yield info
    yield GaugeMetricFamily("edge_gateway_uptime_seconds", "seconds since the daemon started",
                            value=round(time.time() - gw.started, 3))
    store, up = gw.outbox.stats, gw.uplink.stats
    yield GaugeMetricFamily("edge_gateway_outbox_messages", "messages waiting in the outbox", value=store.messages)
    yield GaugeMetricFamily("edge_gateway_outbox_bytes", "payload bytes waiting in the outbox", value=store.bytes)
    yield GaugeMetricFamily("edge_gateway_outbox_oldest_age_seconds", "age of the oldest waiting message",
                            value=round(gw.outbox.oldest_age(), 3))
    yield CounterMetricFamily("edge_gateway_outbox_dropped_messages", "messages dropped by the outbox bounds",
                              value=store.dropped)
    yield CounterMetricFamily("edge_gateway_outbox_write_errors", "failed outbox commits", value=store.write_errors)
    yield GaugeMetricFamily("edge_gateway_upstream_connected", "1 while connected to the upstream broker",
                            value=1 if up.connected else 0)
    yield CounterMetricFamily("edge_gateway_upstream_published_messages", "messages published upstream",
                              value=up.published)
    yield CounterMetricFamily("edge_gateway_upstream_acked_messages", "published messages the broker acknowledged",
                              value=up.acked)
    yield CounterMetricFamily("edge_gateway_upstream_reconnects", "connections to the upstream after the first",
                              value=up.reconnects)


def _devices(gw: Gateway, rec: Recorder) -> Iterator[Metric]:
    d = ["device"]
    fams: dict[str, Any] = {
        "samples": CounterMetricFamily("edge_gateway_device_samples", "samples processed (reads, good or not)", labels=d),
        "errors": CounterMetricFamily("edge_gateway_device_read_errors", "failed reads and readings with bad tags",
                                      labels=d),
        "skipped": CounterMetricFamily("edge_gateway_device_skipped_ticks", "poll ticks missed because a read ran late",
                                       labels=d),
        "dropped": CounterMetricFamily("edge_gateway_device_dropped",
                                       "readings dropped unread: a sensor sent faster than they were processed",
                                       labels=d),
        "state": GaugeMetricFamily("edge_gateway_device_state", "1 for the device's current state",
                                   labels=["device", "state"]),
        "last": GaugeMetricFamily("edge_gateway_device_last_sample_timestamp_seconds", "UNIX time of the last sample",
                                  labels=d),
        "machine": GaugeMetricFamily("edge_gateway_machine_state", "1 for the machine's current state (OEE)",
                                     labels=["device", "state"]),
        "alarms": GaugeMetricFamily("edge_gateway_alarms_active", "limit alarms active now", labels=d),
        "unknown": GaugeMetricFamily("edge_gateway_alarms_unknown", "limit alarms whose tag has no good reading",
                                     labels=d),
        "score": GaugeMetricFamily("edge_gateway_anomaly_score", "the last window's anomaly score", labels=d),
        "threshold": GaugeMetricFamily("edge_gateway_anomaly_threshold", "the score above which an event starts",
                                       labels=d),
        "active": GaugeMetricFamily("edge_gateway_anomaly_active", "1 while an anomaly event is open", labels=d),
        "events": CounterMetricFamily("edge_gateway_anomaly_events", "anomaly events started (since the daemon started)",
                                      labels=d),
        "scored": CounterMetricFamily("edge_gateway_anomaly_windows_scored", "windows scored", labels=d),
        "unusable": GaugeMetricFamily("edge_gateway_anomaly_model_unusable",
                                      "1 when the device's configured model could not be loaded at start: not scored",
                                      labels=d),
        "pieces": CounterMetricFamily("edge_gateway_counter_pieces", "lifetime count of each counter",
                                      labels=["device", "counter"]),
        "shift": GaugeMetricFamily("edge_gateway_counter_shift_pieces", "count of each counter in the running shift",
                                   labels=["device", "counter"]),
        "oee": GaugeMetricFamily("edge_gateway_oee_ratio", "live OEE of the running shift and its parts (0..1)",
                                 labels=["device", "part"]),
    }
    totals = rec.totals()
    for r in gw.devices:
        name, h, total = r.name, r.health, totals[r.name]
        fams["samples"].add_metric([name], total["samples"])
        fams["errors"].add_metric([name], total["errors"])
        fams["skipped"].add_metric([name], total["skipped"])
        fams["dropped"].add_metric([name], total["dropped"])
        for state in DEVICE_STATES:
            fams["state"].add_metric([name, state], 1 if h.state == state else 0)
        if h.last_sample is not None:
            fams["last"].add_metric([name], h.last_sample)
        for counter, row in r.counting.rows.items():
            fams["pieces"].add_metric([name, counter], row.total)
            fams["shift"].add_metric([name, counter], row.shift_total)
        ev = r.events
        if ev is not None and ev.machine is not None:
            for state in MACHINE_STATES:
                fams["machine"].add_metric([name, state], 1 if ev.machine.current.state == state else 0)
        if ev is not None and ev.alarms is not None:
            fams["alarms"].add_metric([name], len(ev.alarms.active()))
            fams["unknown"].add_metric([name], len(ev.alarms.unknown()))
        if ev is not None and ev.last_live is not None:
            for part, key in (("availability", "availability"), ("performance", "performance"),
                              ("quality", "quality_rate"), ("oee", "oee")):
                value = ev.last_live.get(key)
                if value is not None:
                    fams["oee"].add_metric([name, part], value)
        if r.device.model is not None:
            fams["unusable"].add_metric([name], 1 if r.model_error is not None else 0)
        if r.scoring is not None:
            st = r.scoring.scorer.state
            if st.score is not None:
                fams["score"].add_metric([name], st.score)
            fams["threshold"].add_metric([name], r.scoring.threshold)
            fams["active"].add_metric([name], 1 if st.active else 0)
            fams["events"].add_metric([name], rec.events_total.get(name, 0))
            fams["scored"].add_metric([name], total["scored"])
    yield from fams.values()


def _latency(rec: Recorder) -> Metric:
    h = rec.latency
    buckets: list[tuple[str, float]] = []
    cumulative = 0
    for bound, count in zip(h.buckets, h.counts, strict=False):
        cumulative += count
        buckets.append((_le(bound / 1e6), cumulative))
    buckets.append(("+Inf", h.count))
    return HistogramMetricFamily("edge_gateway_inference_latency_seconds",
                                 "time of one anomaly model invoke (every scored window, since the page started)",
                                 buckets=buckets, sum_value=h.total / 1e6)


def _le(seconds: float) -> str:
    return f"{seconds:.6f}".rstrip("0").rstrip(".")


class Exposition:
    """The registry a scrape renders: the gateway's collector and the process's."""

    def __init__(self, gw: Gateway, rec: Recorder) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(gw, rec))
        ProcessCollector(registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
