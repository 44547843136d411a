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
from gateway import config as configuration
from gateway.config import Config
from gateway.device import DeviceRunner
from gateway.notify import Notifier
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
    def __init__(self, config: Config, config_path: str | None = None, notifier: Notifier | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self._lock = store_lock(config.gateway.data_dir)
        if self._lock is None:
            raise AlreadyRunning(f"another edge-gateway is running with data_dir {config.gateway.data_dir}")
        self.started = time.time()
        out = config.outbox
        self.store = Store(os.path.join(config.gateway.data_dir, STORE_FILE), bounds=_bounds(config), sync=out.sync)
        self.devices: list[DeviceRunner] = []
        self._build(config)
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._device_tasks: list[asyncio.Task] = []
        self._uplink_task: asyncio.Task | None = None
        self._broker_task: asyncio.Task | None = None

    def _build(self, config: Config, *, uplink: bool = True) -> None:
        """Devices (and the uplink) from a config; the store is not touched."""
        self.config = config
        self.root = config.topic_root
        gw = config.gateway
        shifts = ShiftCalendar([(s.name, s.start) for s in config.shifts], gw.timezone)
        links: dict = {}  # connections shared by devices on one endpoint or serial line
        models = configuration.load_models(config)  # one interpreter per model, shared by its devices
        self.devices = [DeviceRunner(d, open_source(d, links, config.local_broker, gw.id), self.store, self.root,
                                     shifts, on_state_change=self._device_state_changed,
                                     model=models.get(d.model)) for d in config.devices]
        if uplink:
            self.uplink = Uplink(config.upstream, self.store, client_id=config.upstream.client_id or gw.id,
                                 status_topic=f"{self.root}/status", offline_payload=self._status("offline"))
        self.uplink.online_payload = self._status("online")

    # -- status and health ------------------------------------------------------------
    def _status(self, state: str) -> bytes:
        fields = {"gateway_id": self.config.gateway.id, "version": __version__, "started": rfc3339(self.started)}
        if state == "online":
            fields["devices"] = {r.device.name: {"state": r.health.state, "source": r.device.source}
                                 for r in self.devices}
        return status_payload(state, **fields)

    def _device_state_changed(self, runner: DeviceRunner) -> None:
        self.uplink.online_payload = self._status("online")
        self.uplink.publish_live(f"{self.root}/status", self.uplink.online_payload, retain=True)

    def health(self) -> dict:
        store, uplink = self.store.stats, self.uplink.stats
        latencies = [us for r in self.devices if r.scorer is not None for us in r.scorer.take_latency()]
        health = {
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
                                        else None,
                                        **({"anomaly": a} if (a := r.anomaly_status()) else {})}
                        for r in self.devices},
        }
        if latencies:
            latencies.sort()
            health["inference_us"] = {"windows": len(latencies), "mean": round(sum(latencies) / len(latencies), 1),
                                      "p95": round(latencies[int(0.95 * (len(latencies) - 1))], 1),
                                      "max": round(latencies[-1], 1)}
        return health

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
            self.notifier.status(self.status_line())

    def status_line(self) -> str:
        ok = sum(1 for r in self.devices if r.health.state == "ok")
        up = self.uplink.stats
        age = f"{time.time() - up.last_ack:.0f}s ago" if up.last_ack else "never"
        return (f"{ok}/{len(self.devices)} devices ok, backlog {self.store.stats.messages} msgs, upstream "
                f"{'connected' if up.connected else 'NOT connected'}, last publish {age}")

    async def _watchdog_loop(self) -> None:
        """WATCHDOG=1 only while the event loop runs (this task) and the uplink task is alive."""
        while True:
            await asyncio.sleep(self.notifier.watchdog_interval)
            if self._uplink_task is None or self._uplink_task.done():
                log.error("the uplink task has ended: withholding the watchdog so that systemd restarts us")
                continue
            self.notifier.watchdog()

    # -- the embedded local broker ------------------------------------------------------------
    async def _local_broker(self, cfg, up: asyncio.Event) -> None:
        """Run amqtt in this process for local sensors; a busy port is retried, never fatal to the rest."""
        from gateway import broker as local_broker

        failed = None
        while True:
            try:
                server = await local_broker.start(cfg.listen, allow_anonymous=cfg.allow_anonymous,
                                                  password_file=cfg.password_file)
                break
            except Exception as err:  # amqtt raises its own errors for a busy port or a bad password file
                if str(err) != failed:
                    log.error("local broker cannot start on %s: %s; retrying every 5s", cfg.listen, err)
                    failed = str(err)
                await asyncio.sleep(5)
        log.info("local broker listening on %s (%s)", cfg.listen,
                 "anonymous clients allowed" if cfg.allow_anonymous else "password required")
        up.set()
        try:
            await asyncio.Event().wait()
        finally:
            await server.shutdown()

    async def _start_broker(self) -> None:
        if self.config.local_broker.enabled:
            up = asyncio.Event()
            self._broker_task = asyncio.create_task(self._local_broker(self.config.local_broker, up),
                                                    name="local-broker")
            try:  # so that the mqtt devices find it listening; a broker that cannot start is retried
                await asyncio.wait_for(up.wait(), timeout=5)
            except asyncio.TimeoutError:
                pass

    async def _stop_broker(self) -> None:
        if self._broker_task is not None:
            self._broker_task.cancel()
            await asyncio.gather(self._broker_task, return_exceptions=True)
            self._broker_task = None

    # -- life cycle ------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def _start_devices(self) -> None:
        self._device_tasks = [asyncio.create_task(r.run(), name=f"device-{r.device.name}") for r in self.devices]

    async def _stop_devices(self) -> None:
        for task in self._device_tasks:
            task.cancel()
        await asyncio.gather(*self._device_tasks, return_exceptions=True)
        for runner in self.devices:
            runner.flush()
            await runner.source.close()
        self._commit()

    async def reload(self) -> bool:
        """SIGHUP: re-read and validate the config; apply it, keeping the outbox, or keep the old one."""
        self.notifier.reloading()
        old = self.config
        try:
            new = configuration.load(self.config_path or "")
        except configuration.ConfigError as err:
            for line in str(err).splitlines():
                log.error("reload refused, the running config stays: %s", line)
            self.notifier.ready(f"reload refused ({len(err.problems)} problems in the config); " + self.status_line())
            return False
        if new.gateway.data_dir != old.gateway.data_dir:
            log.error("reload refused: gateway.data_dir changed (%s -> %s); that needs a restart",
                      old.gateway.data_dir, new.gateway.data_dir)
            self.notifier.ready("reload refused (data_dir changed); " + self.status_line())
            return False
        await self._stop_devices()
        self.store.bounds = _bounds(new)
        if new.outbox.sync != old.outbox.sync:
            log.warning("outbox.sync %s applies from the next start", new.outbox.sync)
        new_uplink = (new.upstream, new.topic_root, new.gateway.id) != (old.upstream, old.topic_root, old.gateway.id)
        if new_uplink:
            await self.uplink.stop(flush_timeout=2.0)
            self._uplink_task.cancel()
            await asyncio.gather(self._uplink_task, return_exceptions=True)
        if new.local_broker != old.local_broker:
            await self._stop_broker()
        self._build(new, uplink=new_uplink)
        if new.local_broker != old.local_broker:
            await self._start_broker()
        if new_uplink:
            self._uplink_task = asyncio.create_task(self.uplink.run(), name="uplink")
        logging.getLogger().setLevel(new.gateway.log_level.upper())
        self._start_devices()
        log.info("config reloaded: %d devices%s; the outbox keeps its %d messages", len(self.devices),
                 ", new upstream connection" if new_uplink else "", self.store.stats.messages)
        self.notifier.ready(self.status_line())
        return True

    async def _reload_loop(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            await self.reload()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        log.info("edge-gateway %s started: %d devices, topic root %s, store %s (%d messages waiting)",
                 __version__, len(self.devices), self.root, self.store.path, self.store.stats.messages)
        await self._start_broker()
        self._start_devices()
        self._uplink_task = asyncio.create_task(self.uplink.run(), name="uplink")
        timers = [asyncio.create_task(self._commit_loop(), name="commit"),
                  asyncio.create_task(self._health_loop(), name="health"),
                  asyncio.create_task(self._reload_loop(), name="reload")]
        if self.notifier.watchdog_interval:
            timers.append(asyncio.create_task(self._watchdog_loop(), name="watchdog"))
        # Ready once the config is loaded and the outbox open: not waiting for the broker.
        self.notifier.ready(self.status_line())
        await self._stop.wait()
        self.notifier.stopping()
        log.info("stopping: committing and delivering what is in flight")
        for task in timers:
            task.cancel()
        await asyncio.gather(*timers, return_exceptions=True)
        await self._stop_devices()
        await self._stop_broker()
        await self.uplink.stop(flush_timeout=5.0)
        self._uplink_task.cancel()
        await asyncio.gather(self._uplink_task, return_exceptions=True)
        self.store.commit()  # the last acknowledgements
        self._write_state(self.health())
        self.store.close()
        log.info("stopped; %d messages kept in the outbox for the next start", self.store.stats.messages)


def _bounds(config: Config) -> Bounds:
    out = config.outbox
    return Bounds(out.max_messages, out.max_bytes, out.max_age, out.when_full)
