"""The wiring: config → sources → device pipelines → store → uplink, on one event loop.

Every stage is built here and nowhere else. Timers: the commit loop (outbox
transaction every `outbox.commit_interval`) and the health loop (health topic and
the local state file every `gateway.health_interval`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time

from gateway import __version__
from gateway.config import Config
from gateway.device import DeviceRunner
from gateway.shifts import ShiftCalendar
from gateway.sources import open_source
from gateway.store import Bounds, Store, lock as store_lock
from gateway.units import rfc3339
from gateway.uplink import Uplink, status_payload

log = logging.getLogger("edge_gateway")

STORE_FILE = "gateway.db"
STATE_FILE = "state.json"


class AlreadyRunning(Exception):
    pass


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._lock = store_lock(config.gateway.data_dir)
        if self._lock is None:
            raise AlreadyRunning(f"another edge-gateway is running with data_dir {config.gateway.data_dir}")
        self.started = time.time()
        self.root = config.topic_root
        gw = config.gateway
        out = config.outbox
        self.store = Store(os.path.join(gw.data_dir, STORE_FILE),
                           bounds=Bounds(out.max_messages, out.max_bytes, out.max_age, out.when_full),
                           sync=out.sync)
        shifts = ShiftCalendar([(s.name, s.start) for s in config.shifts], gw.timezone)
        links: dict = {}  # connections shared by devices on one endpoint or serial line
        self.devices = [DeviceRunner(d, open_source(d, links), self.store, self.root, shifts,
                                     on_state_change=self._device_state_changed) for d in config.devices]
        self.uplink = Uplink(config.upstream, self.store, client_id=config.upstream.client_id or gw.id,
                             status_topic=f"{self.root}/status", offline_payload=self._status("offline"))
        self.uplink.online_payload = self._status("online")
        self._stop = asyncio.Event()

    # -- status and health ------------------------------------------------------------
    def _status(self, state: str) -> bytes:
        fields = {"gateway_id": self.config.gateway.id, "version": __version__, "started": rfc3339(self.started)}
        if state == "online":
            fields["devices"] = {r.device.name: {"state": r.health.state, "source": r.device.source}
                                 for r in getattr(self, "devices", [])}
        return status_payload(state, **fields)

    def _device_state_changed(self, runner: DeviceRunner) -> None:
        self.uplink.online_payload = self._status("online")
        self.uplink.publish_live(f"{self.root}/status", self.uplink.online_payload, retain=True)

    def health(self) -> dict:
        store, uplink = self.store.stats, self.uplink.stats
        return {
            "ts": rfc3339(time.time()),
            "gateway_id": self.config.gateway.id,
            "uptime_s": round(time.time() - self.started, 1),
            "backlog": {"messages": store.messages, "bytes": store.bytes,
                        "oldest_age_s": round(self.store.oldest_age(), 1), "uncommitted": self.store.pending},
            "dropped": store.dropped,
            "store_errors": store.write_errors,
            "store_error": store.last_error,
            "upstream": {"connected": uplink.connected, "reconnects": uplink.reconnects,
                         "published": uplink.published, "acked": uplink.acked,
                         "publish_rate": round(self.uplink.publish_rate(), 2),
                         "last_ack": rfc3339(uplink.last_ack) if uplink.last_ack else None,
                         "last_error": uplink.last_error},
            "devices": {r.device.name: {"state": r.health.state, "polls": r.health.polls,
                                        "errors": r.health.errors, "skipped_ticks": r.health.skipped_ticks,
                                        "bad_tags": r.health.bad_tags, "last_error": r.health.last_error,
                                        "last_sample": rfc3339(r.health.last_sample) if r.health.last_sample
                                        else None} for r in self.devices},
        }

    def _write_state(self, health: dict) -> None:
        """The local state file read by `edge-gateway status` (no broker needed)."""
        health["counters"] = {r.device.name: {name: {"total": row.total, "shift": row.shift_total,
                                                     "shift_id": row.shift_id}
                                              for name, row in r.counter_rows().items()} for r in self.devices}
        path = os.path.join(self.config.gateway.data_dir, STATE_FILE)
        try:
            with open(path + ".tmp", "w", encoding="utf-8") as fh:
                json.dump(health, fh, indent=1)
            os.replace(path + ".tmp", path)
        except OSError as err:  # a full disk must not stop the health loop
            log.debug("cannot write %s: %s", path, err)

    # -- timers -------------------------------------------------------------------------
    async def _commit_loop(self) -> None:
        interval = self.config.outbox.commit_interval
        while True:
            await asyncio.sleep(interval)
            self._commit()

    def _commit(self) -> None:
        before = self.store.stats.committed
        if self.store.commit() and self.store.stats.committed != before:
            self.uplink.wake()

    async def _health_loop(self) -> None:
        topic = f"{self.root}/health"
        while True:
            await asyncio.sleep(self.config.gateway.health_interval)
            health = self.health()
            self.uplink.publish_live(topic, json.dumps(health, separators=(",", ":")).encode())
            self._write_state(health)

    # -- life cycle ------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        log.info("edge-gateway %s started: %d devices, topic root %s, store %s (%d messages waiting)",
                 __version__, len(self.devices), self.root, self.store.path, self.store.stats.messages)
        tasks = [asyncio.create_task(r.run(), name=f"device-{r.device.name}") for r in self.devices]
        tasks += [asyncio.create_task(self._commit_loop(), name="commit"),
                  asyncio.create_task(self._health_loop(), name="health")]
        uplink = asyncio.create_task(self.uplink.run(), name="uplink")
        await self._stop.wait()
        log.info("stopping: committing and delivering what is in flight")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for runner in self.devices:
            runner.flush()
            await runner.source.close()
        self._commit()
        await self.uplink.stop(flush_timeout=5.0)
        uplink.cancel()
        await asyncio.gather(uplink, return_exceptions=True)
        self.store.commit()  # the last acknowledgements
        self._write_state(self.health())
        self.store.close()
        log.info("stopped; %d messages kept in the outbox for the next start", self.store.stats.messages)
