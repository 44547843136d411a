"""`/metrics` across a reload (slow): a real daemon, reloaded by SIGHUP, scraped through prometheus_client's parser.

A reload that changes a device gives it a new runner whose counts start again: its samples, read errors,
skipped ticks, dropped readings and windows scored went from 389 to 1 while `process_start_time_seconds` stayed,
which Prometheus takes for a restart of the counter it never saw (rate() of a wrong spike or gap).
"""

from __future__ import annotations

import signal
from typing import Any

import pytest

from tests.helpers import SCORED_PUMP, wait_until
from tests.system.test_web_api import get, start_daemon

pytest.importorskip("aiohttp")
pytestmark = pytest.mark.slow

# pump1 is changed by the reload (another seed: a new runner, a new scorer); steady is not.
BEFORE = SCORED_PUMP + "  - {name: steady, source: sim, profile: pump, seed: 4, interval: 100ms}\n"
AFTER = BEFORE.replace("    seed: 3\n", "    seed: 7\n", 1)
COUNTERS = ("edge_gateway_device_samples", "edge_gateway_device_read_errors", "edge_gateway_device_skipped_ticks",
            "edge_gateway_device_dropped", "edge_gateway_anomaly_windows_scored", "edge_gateway_anomaly_events")


def scrape(base: str) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    status, _, body = get(base + "/metrics")
    assert status == 200
    out: dict[tuple[str, str], Any] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, s.labels.get("device", ""))] = s.value
    return out


def test_per_device_counters_never_go_down_when_a_reload_replaces_a_device(tmp_path, mosquitto, gateway):
    assert AFTER != BEFORE
    proc, base = start_daemon(tmp_path, mosquitto, gateway, devices=BEFORE)
    first = wait_until(lambda: (m := scrape(base)).get(("edge_gateway_anomaly_windows_scored_total", "pump1"), 0) >= 3
                       and m, 60, what="pump1 to have windows scored")
    proc.config.write_text(proc.config.read_text().replace(BEFORE, AFTER))
    proc.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "config reloaded" in proc.logs(), 30, what="the reload")
    reloaded = scrape(base)[("edge_gateway_uptime_seconds", "")]
    # Scrapes from a second after the reload (past the 0.5 s cache): each counter of each device at least what it
    # was before, and still at least so at the next scrape.
    last = wait_until(lambda: (m := scrape(base))[("edge_gateway_uptime_seconds", "")] >= reloaded + 1.0 and m, 30,
                      what="a scrape a second after the reload")
    assert last[("process_start_time_seconds", "")] == first[("process_start_time_seconds", "")]
    for then in (first, last):
        now = scrape(base)
        for device in ("pump1", "steady"):
            for name in COUNTERS:
                key = (name + "_total", device)
                if key in then:
                    assert now[key] >= then[key], (key, then[key], now[key])
    assert last[("edge_gateway_device_samples_total", "pump1")] > first[("edge_gateway_device_samples_total", "pump1")]
    assert "devices (" in proc.logs() and proc.stop() == 0
