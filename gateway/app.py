"""The wiring: config → sources → device pipelines → outbox → uplink, under one supervisor.

Every stage is built in `_build` and nowhere else. Every long-lived loop runs as a named
task of one `Supervisor`: each device (`device[NAME]`), `commit`, `health`, `reload`,
`uplink` (with its connection loop and pump), `local-mqtt`, `local-broker`, `watchdog`.
A loop that raises ends the daemon: its traceback is logged, what can be drained is, and
`run` raises `LoopFailed` so that the process exits non-zero and systemd restarts it.
(A device's failed *reads* are not such a failure: they stay with the device.)

`async with Gateway(...)` takes the data_dir lock and opens the outbox; `run(shutdown)`
runs until the `shutdown` event is set, then drains in order, within a bound: timers,
devices with their counters flushed, the local broker, delivery of what is in flight,
the last commit, the state file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Mapping
from types import TracebackType
from typing import IO, Any

from gateway import __version__, contract, datadir, report
from gateway import config as configuration
from gateway.config import Config, LocalBrokerSection, ModbusRtuDevice, ModbusTcpDevice, Prepared
from gateway.contract import Topics
from gateway.errors import AlreadyRunning, ConfigError
from gateway.logs import fields
from gateway.notify import Notifier
from gateway.pipeline.device import DeviceRunner
from gateway.pipeline.stages import end_departed
from gateway.shifts import ShiftCalendar
from gateway.sources import Links, Source, open_source, tag_types
from gateway.store.history import FILE as HISTORY_FILE
from gateway.store.history import Bounds as HistoryBounds
from gateway.store.history import History
from gateway.store.outbox import Bounds, Outbox, commit_loop, lock
from gateway.supervise import Supervisor, within
from gateway.tagtypes import TagType
from gateway.uplink.mqtt import Format, JsonFormat, Uplink

log = logging.getLogger("edge_gateway.app")

HISTORY_RETRY = 10.0  # seconds between tries to open a history file that could not be opened (a full disk)
DRAIN_LIMIT = 10.0  # seconds the whole shutdown drain may take
FLUSH_LIMIT = 5.0  # of which, delivering what is in flight


class LoopFailed(Exception):
    """A supervised loop raised or ended: the daemon must be restarted."""


class Gateway:
    def __init__(self, config: Config, config_path: str | None = None, notifier: Notifier | None = None,
                 prepared: Prepared | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.prepared = prepared or Prepared()
        self.started = time.time()
        self.devices: list[DeviceRunner] = []
        self.reload_requested = asyncio.Event()
        self._sup = Supervisor()
        self._lock: IO[str] | None = None
        self._outbox: Outbox | None = None
        self._history: History | None = None
        self._uplink: Uplink | None = None
        self._links: Links | None = None
        self._history_committed = 0.0
        self._state_failed: str | None = None  # why the state file could not be written, said once
        self._broker_users: bytes | None = None  # the embedded broker's users file as it started with it
        self._history_error: str | None = None  # why the history could not be opened; tried again meanwhile
        self._history_retry = 0.0
        self._rebuilding = asyncio.Lock()  # a reload and the history's retry both build the devices: one at a time

    # -- life cycle ------------------------------------------------------------------------
    async def __aenter__(self) -> Gateway:
        gw = self.config.gateway
        self._lock = lock(gw.data_dir)
        if self._lock is None:
            raise AlreadyRunning(f"another edge-gateway is running with data_dir {gw.data_dir}")
        try:
            self._outbox = Outbox.open(datadir.path(gw.data_dir, datadir.OUTBOX), bounds=_bounds(self.config),
                                  sync=self.config.outbox.sync)
            self._outbox.keep_above(report.saved_seq(gw.data_dir))
        except BaseException:
            self._lock.close()
            raise
        self._build(self.config, self.prepared, uplink=True)
        self._end_departed(self.config)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, err: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._sup.aclose()
        if self._history is not None:
            self._history.close()
        if self._outbox is not None:
            self._outbox.close()
        if self._lock is not None:
            self._lock.close()

    @property
    def outbox(self) -> Outbox:
        assert self._outbox is not None, "use `async with Gateway(...)`"
        return self._outbox

    @property
    def history(self) -> History | None:
        return self._history

    @property
    def uplink(self) -> Uplink:
        assert self._uplink is not None, "use `async with Gateway(...)`"
        return self._uplink

    def _build(self, config: Config, prepared: Prepared, *, uplink: bool, kept: Mapping[str, Source] | None = None) -> None:
        """Devices (and the uplink) from a config; the outbox is not touched. Builds only: starts nothing. `kept`: the
        sources of devices a reload leaves as they were (`_stop_devices`), with their connections."""
        self.config, self.prepared = config, prepared
        gw = config.gateway
        self.topics = Topics(config.topic_root)
        shifts = ShiftCalendar([(s.name, s.start) for s in config.shifts], gw.timezone)
        links = Links(config.local_broker, gw.id, gw.data_dir, self.config_path)
        if self._links is not None:
            links.take_over(self._links)
        self._links = links
        recorded = {d.name: HistoryBounds(d.history.keep, d.history.max_bytes) for d in config.devices if d.history}
        if recorded and self._history is not None and self._history.moved():
            log.warning("history %s was moved away: closing it, a new one is started", self._history.path)
            self._history.close()
            self._history = None
        if recorded and self._history is None:
            self._open_history()
        elif not recorded:
            self._history_error = None  # no device wants it any more
        if self._history is not None:
            self._history.configure(recorded)
        before = {r.name: r for r in self.devices}  # a reload: what unchanged devices know goes on
        self.devices = [DeviceRunner(d, (kept or {}).get(d.name) or open_source(d, links), self.outbox, self.topics, shifts,
                                     on_state_change=self._device_state_changed,
                                     model=prepared.models.get(d.model) if d.model and d.name not in
                                     prepared.unusable else None,  # (a model that loads may still not fit)
                                     model_error=prepared.unusable.get(d.name),
                                     history=self._history if d.history else None, config_path=self.config_path,
                                     before=before.get(d.name))
                        for d in config.devices]
        fmt: Format | None = None
        if uplink and config.upstream.format == "sparkplug_b":
            from gateway.uplink.sparkplug.uplink import SparkplugFormat  # protobuf only when Sparkplug is used
            fmt = SparkplugFormat(config, state_path=datadir.path(gw.data_dir, datadir.SPARKPLUG),
                                  scored={r.name: r.scoring is not None for r in self.devices}, types_of=self._tag_types,
                                  standing=self._standing)
            if self._uplink is not None and isinstance(self._uplink.format, SparkplugFormat):
                fmt.take_over(self._uplink.format)  # a reload's new session: its births with what is known
        elif uplink:
            fmt = JsonFormat(client_id=config.upstream.client_id or gw.id, status_topic=self.topics.status,
                             offline_payload=self._status("offline"), qos=config.upstream.qos)
        if fmt is not None:
            self._uplink = Uplink(config.upstream, self.outbox, fmt)
        self.uplink.online_payload = self._status("online")

    def _end_departed(self, config: Config) -> None:
        """What devices taken out of the config (by this reload, or while the daemon was stopped) left open ends
        now: no later sample of theirs will end it."""
        end_departed(self.outbox.state_devices() - {d.name for d in config.devices}, self.outbox, self.topics)

    def _open_history(self) -> bool:
        """Open the history; on failure say so once and try again every HISTORY_RETRY (from the health loop)."""
        path = os.path.join(self.config.gateway.data_dir, HISTORY_FILE)
        try:
            self._history = History.open(path)
        except sqlite3.Error as err:  # history is for training: a damaged file must not stop the plant's data
            self._history_retry = time.monotonic() + HISTORY_RETRY
            if self._history_error is None:
                log.error("history %s cannot be opened (%s): samples are not recorded; tried again every %gs "
                          "(a full disk that gets space back), a damaged file must be moved away", path, err,
                          HISTORY_RETRY)
            self._history_error = f"{path} cannot be opened: {err}"
            return False
        if self._history_error is not None:
            log.warning("history %s opened: samples are recorded again", path)
        self._history_error = None
        return True

    async def _retry_history(self) -> None:
        """The history wanted (`_history_error` is cleared when no device wants it), not open, and due for another
        try: once it opens, the devices are built again on
        the running config (as at a reload) to record into it."""
        if self._history is not None or self._history_error is None or time.monotonic() < self._history_retry:
            return
        async with self._rebuilding:  # a reload waiting meanwhile builds after this, on what this opened
            if self._history is not None or self._history_error is None or not self._open_history():
                return  # (a reload meanwhile opened it, or no longer wants it)
            kept = await self._stop_devices(self.config)
            self._build(self.config, self.prepared, uplink=False, kept=kept)
            self._start_devices()

    def _standing(self, device: str) -> dict[str, Any]:
        runner = next((r for r in self.devices if r.name == device), None)
        return runner.standing() if runner is not None else {}

    def _tag_types(self, device: str) -> dict[str, TagType]:
        """A device's tag types as its source gives them now (an OPC UA source learns them at connect)."""
        runner = next((r for r in self.devices if r.name == device), None)
        return tag_types(runner.device, runner.source) if runner is not None else {}

    async def run(self, shutdown: asyncio.Event, force: asyncio.Event | None = None) -> None:
        """Run until `shutdown` is set (then drain) or a loop fails (then drain and raise LoopFailed).

        Setting `force` during the drain skips the rest of it (a second SIGTERM).
        """
        log.info("edge-gateway %s started: %d devices, topic root %s, outbox %s (%d messages waiting)",
                 __version__, len(self.devices), self.topics.root, self.outbox.path, self.outbox.stats.messages)
        self._write_state()  # at once: `status` has a state, and the file its room, before the disk can fill
        await self._start_broker()
        self._start_devices()
        sup = self._sup
        sup.start(self.uplink.run(), "uplink")
        sup.start(self._commit_loop(), "commit")
        sup.start(self._health_loop(), "health")
        sup.start(self._reload_loop(), "reload")
        if self.config.web is not None:
            from gateway.web.server import serve  # aiohttp only when web: is configured
            sup.start(serve(self, self.config.web), "web")
        if self.notifier.watchdog_interval:
            sup.start(self._watchdog_loop(), "watchdog")
        # Ready once the config is loaded and the outbox open: not waiting for the broker.
        self.notifier.ready(self.status_line())
        crash = await self._until_stop_or_crash(shutdown)
        if crash is not None:
            name, error = crash
            log.error("task %s failed; stopping so that systemd restarts the gateway", name,
                      exc_info=(type(error), error, error.__traceback__))
        self.notifier.stopping()
        log.info("stopping: committing and delivering what is in flight")
        await self._drain_within(DRAIN_LIMIT, force)
        log.info("stopped; %d messages kept in the outbox for the next start", self.outbox.stats.messages)
        if self.outbox.pending:  # held in memory while the disk refused them: said, never lost without a word
            log.error("%d messages held in memory could not be written (%s) and are lost; their seqs are a gap "
                      "upstream", self.outbox.pending, self.outbox.stats.last_error or "the store refused them",
                      extra=fields(None, "outbox_drop"))
        if crash is not None:
            raise LoopFailed(f"task {crash[0]} failed: {crash[1]!r}")

    async def _until_stop_or_crash(self, shutdown: asyncio.Event) -> tuple[str, BaseException] | None:
        """Until `shutdown` is set (None) or a supervised task ends (which one, and why)."""
        stop = asyncio.ensure_future(shutdown.wait())
        failed = asyncio.ensure_future(self._sup.wait())
        try:
            await asyncio.wait([stop, failed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            failed.cancel()
        return failed.result() if failed.done() and not failed.cancelled() else None

    async def _drain_within(self, limit: float, force: asyncio.Event | None) -> None:
        """The ordered drain, cut short after `limit` seconds or when `force` is set."""
        drain = asyncio.ensure_future(self._drain())
        waits = [drain] + ([asyncio.ensure_future(force.wait())] if force is not None else [])
        try:
            done, _ = await asyncio.wait(waits, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits[1:]:
                w.cancel()
        if drain in done:
            return
        log.warning("shutdown drain %s; stopping now (the outbox keeps what was committed)",
                    "skipped by a second signal" if force is not None and force.is_set()
                    else f"took longer than {limit:g}s")
        drain.cancel()
        await asyncio.gather(drain, return_exceptions=True)
        await self._sup.aclose()
        self.outbox.commit()

    async def _drain(self) -> None:
        sup = self._sup
        await sup.stop("web", "commit", "health", "reload", "watchdog")
        await self._stop_devices()
        await self._stop_broker()
        await self.uplink.stop(flush_timeout=FLUSH_LIMIT)
        await sup.stop("uplink")
        self.outbox.commit()  # the last acknowledgements
        self._write_state()

    def _write_state(self, health: dict[str, Any] | None = None) -> None:
        """The state file `status` reads; one that cannot be written is said once, and once when it is again."""
        failed = report.write_state(self.config.gateway.data_dir, health or self.health(), self.devices,
                                    self.outbox.seq_mark(self.config.gateway.health_interval))
        if failed != self._state_failed:
            if failed:
                log.warning("%s", failed)
            elif self._state_failed:
                log.info("the state file is written again")
            self._state_failed = failed

    # -- devices ------------------------------------------------------------------------------
    def _start_devices(self) -> None:
        for runner in self.devices:
            self._sup.start(runner.run(), f"device[{runner.name}]")
        running = self._sup.tasks.get("local-mqtt")
        if self._links is not None and self._links.mqtt is not None and (running is None or running.done()):
            self._sup.start(self._links.mqtt.run(), "local-mqtt")  # (one a reload kept runs on)

    async def _stop_devices(self, next_config: Config | None = None) -> dict[str, Source]:
        """Stop the devices, each flushed. Their sources are closed, except (at a reload to `next_config`) those of
        devices it has as they are: returned by name, connected, for `_build`. Local sensors are kept with the
        local broker's link (`Links.take_over`), unless its section or the gateway's id changed."""
        await self._sup.stop(*(f"device[{r.name}]" for r in self.devices))
        staying = {d.name: d for d in next_config.devices} if next_config is not None else {}
        same_broker = next_config is not None and (next_config.local_broker, next_config.gateway.id) == \
            (self.config.local_broker, self.config.gateway.id)
        links = _links_wanted(next_config) if next_config is not None else {}
        kept = {r.name: r.source for r in self.devices if staying.get(r.name) == r.device
                and (r.device.source != "mqtt" or same_broker) and _same_link(r, links)}
        if not any(r.device.source == "mqtt" and r.name in kept for r in self.devices):
            await self._sup.stop("local-mqtt")  # (its link closes with its last source)
        for runner in self.devices:
            runner.flush()
            if runner.name not in kept:
                await runner.source.aclose()
        self._commit()
        return kept

    def _device_state_changed(self) -> None:
        self.uplink.online_payload = self._status("online")
        self.uplink.publish_live(self.topics.status, self.uplink.online_payload, retain=True)

    # -- status and health ------------------------------------------------------------------
    def _status(self, state: str) -> bytes:
        devices = {r.name: {"state": r.health.state, "source": r.device.source} for r in self.devices} \
            if state == "online" else None
        return contract.status(state, self.config.gateway.id, __version__, self.started, devices)

    def health(self) -> dict[str, Any]:
        health = report.report(self.config.gateway.id, self.started, self.outbox, self.uplink, self.devices,
                               history=self._history)
        if self._history is None and self._history_error is not None:
            health["history"] = {"devices": [], "dropped": 0, "error": self._history_error}
        return health

    def status_line(self) -> str:
        return report.status_line(self.devices, self.outbox, self.uplink)

    # -- timers -------------------------------------------------------------------------------
    async def _commit_loop(self) -> None:
        """A group commit (see `outbox.commit_loop`); the uplink publishes right after each one."""
        out = self.config.outbox
        await commit_loop(self.outbox, self._committed, interval=out.commit_interval, max_rate=out.max_commit_rate,
                          group=out.group_commit)

    def _committed(self, messages: int) -> None:
        if messages:
            self.uplink.wake()
        # The history (training data, not owed to anyone) keeps the timer's cadence: fewer transactions.
        now = time.monotonic()
        if self._history is not None and now - self._history_committed >= self.config.outbox.commit_interval:
            self._history_committed = now
            self._history.commit()

    def _commit(self) -> None:
        if self._history is not None:
            self._history.commit()
        before = self.outbox.stats.committed
        if self.outbox.commit() and self.outbox.stats.committed != before:
            self.uplink.wake()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.gateway.health_interval)
            await self._retry_history()
            for runner in self.devices:
                runner.health.settle()  # (a flapping device that now holds its state: said)
            latest = self.health()
            self.uplink.publish_live(self.topics.health, contract.health(latest), body=latest)
            self._write_state(latest)
            self.notifier.status(self.status_line())

    async def _watchdog_loop(self) -> None:
        """WATCHDOG=1 only while the event loop runs (this task) and every supervised loop is alive."""
        while True:
            await asyncio.sleep(self.notifier.watchdog_interval or 1.0)
            if not self._sup.alive():
                log.error("a supervised task has ended: withholding the watchdog so that systemd restarts us")
                continue
            self.notifier.watchdog()

    # -- the embedded local broker --------------------------------------------------------------
    async def _local_broker(self, cfg: LocalBrokerSection, up: asyncio.Event) -> None:
        """Run amqtt in this process for local sensors; a busy port is retried, never fatal to the rest."""
        from gateway import broker as local_broker

        failed = None
        while True:
            try:
                server = await local_broker.start(cfg.listen, allow_anonymous=cfg.allow_anonymous,
                                                  password_file=cfg.password_file,
                                                  max_message_size=cfg.max_message_size)
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
            self._broker_users = _read(self.config.local_broker.password_file)
            up = asyncio.Event()
            self._sup.start(self._local_broker(self.config.local_broker, up), "local-broker")
            try:  # so that the mqtt devices find it listening; a broker that cannot start is retried
                await within(up.wait(), 5)
            except asyncio.TimeoutError:
                pass

    async def _stop_broker(self) -> None:
        await self._sup.stop("local-broker")

    # -- reload ---------------------------------------------------------------------------------
    async def _reload_loop(self) -> None:
        while True:
            await self.reload_requested.wait()
            self.reload_requested.clear()
            await self.reload()

    async def reload(self) -> bool:
        """SIGHUP: re-read and check the config; apply it, keeping the outbox, or keep the old one."""
        self.notifier.reloading()
        old = self.config
        path = self.config_path or ""
        try:
            new = configuration.load(path)
            prepared = configuration.preflight(new, path)
        except ConfigError as err:
            for line in str(err).splitlines():
                log.error("reload refused, the running config stays: %s", line)
            self.notifier.ready(f"reload refused ({len(err.problems)} problems in the config); " + self.status_line())
            return False
        if new.gateway.data_dir != old.gateway.data_dir:
            log.error("reload refused: gateway.data_dir changed (%s -> %s); that needs a restart",
                      old.gateway.data_dir, new.gateway.data_dir)
            self.notifier.ready("reload refused (data_dir changed); " + self.status_line())
            return False
        async with self._rebuilding:
            await self._apply(old, new, prepared)
        return True

    async def _apply(self, old: Config, new: Config, prepared: Prepared) -> None:
        """A checked config in place of the running one: the devices (and what changed of the rest) built again."""
        kept = await self._stop_devices(new)
        self._end_departed(new)
        scoring = [r.scoring for r in self.devices if r.scoring is not None]
        self.outbox.bounds = _bounds(new)
        if new.outbox.sync != old.outbox.sync:
            log.warning("outbox.sync %s applies from the next start", new.outbox.sync)
        if new.web != old.web:
            log.warning("the web section's change applies from the next start")
        cadence = ("group_commit", "max_commit_rate", "commit_interval")
        new_cadence = any(getattr(new.outbox, k) != getattr(old.outbox, k) for k in cadence)
        if new_cadence:
            await self._sup.stop("commit")
        new_uplink = (new.upstream, new.topic_root, new.gateway.id) != (old.upstream, old.topic_root, old.gateway.id)
        if new.upstream.format == "sparkplug_b" and not new_uplink and _births(new, prepared) != _births(old, self.prepared):
            # Sparkplug: the births declare every device and metric, so a device, tag, counter, alarm or model added
            # or taken out needs a new session (NDEATH, NBIRTH, each DBIRTH), or its data has nothing to go under.
            new_uplink = True
            log.info("the devices changed: a new Sparkplug session, with their births")
        if new_uplink:
            await self.uplink.stop(flush_timeout=2.0)
            await self._sup.stop("uplink")
        # amqtt reads its users once: a user added or deleted with `broker-user` takes a restart of the broker
        new_broker = new.local_broker != old.local_broker or (
            new.local_broker.enabled and _read(new.local_broker.password_file) != self._broker_users)
        if new_broker and new.local_broker == old.local_broker:
            log.info("the local broker's users file changed: the broker restarts with it (sensors reconnect)")
        if new_broker:
            await self._stop_broker()
        self._build(new, prepared, uplink=new_uplink, kept=kept)
        if new_broker:
            await self._start_broker()
        if new_uplink:
            self._sup.start(self.uplink.run(), "uplink")
        if new_cadence:
            self._sup.start(self._commit_loop(), "commit")
        logging.getLogger().setLevel(new.gateway.log_level.upper())
        self._start_devices()
        scored = sum(any(r.scoring is s for s in scoring) for r in self.devices)
        linked = sum(r.device.source != "sim" for r in self.devices if r.name in kept)  # (a simulated one has none)
        unchanged = f"{len(kept)} unchanged, " + ("reading on" if not linked else "their connections kept"
                                                   if linked == len(kept) else f"{linked} with their connections kept")
        log.info("config reloaded: %d devices (%s%s)%s; the outbox keeps its %d "
                 "messages", len(self.devices), unchanged,
                 f"; {scored} scored going on with their context" if scored else "",
                 ", new upstream connection" if new_uplink else "", self.outbox.stats.messages)
        self.notifier.ready(self.status_line())


def _links_wanted(config: Config) -> dict[str, tuple[Any, ...]]:
    """Each Modbus endpoint's link as the config makes it: as its first device there wants it (`endpoint`)."""
    wanted: dict[str, tuple[Any, ...]] = {}
    if any(isinstance(d, (ModbusTcpDevice, ModbusRtuDevice)) for d in config.devices):
        from gateway.sources.modbus import endpoint

        for d in config.devices:
            if isinstance(d, (ModbusTcpDevice, ModbusRtuDevice)):
                key, spec = endpoint(d)
                wanted.setdefault(key, spec)
    return wanted


def _same_link(runner: DeviceRunner, wanted: Mapping[str, tuple[Any, ...]]) -> bool:
    """Whether a Modbus device's link is the one the next config makes for its endpoint (`_links_wanted`): a baud
    rate or timeout changed on the devices one reload at a time kept the old one, for ever. Any other device: yes."""
    if not isinstance(runner.device, (ModbusTcpDevice, ModbusRtuDevice)):
        return True
    from gateway.sources.modbus import ModbusSource, endpoint

    key, spec = endpoint(runner.device)
    return isinstance(runner.source, ModbusSource) and wanted.get(key) == spec == runner.source.link.spec


def _births(config: Config, prepared: Prepared) -> tuple[Any, ...]:
    """What a Sparkplug session's births are made of: each device as configured, and whether it is scored."""
    return tuple((d, d.model is not None and d.name not in prepared.unusable) for d in config.devices)


def _read(path: str | None) -> bytes | None:
    """A file's bytes (None: no file, or unreadable: preflight has said so)."""
    if not path:
        return None
    try:
        with open(path, "rb") as fh:
            return fh.read(1 << 20)
    except OSError:
        return None


def _bounds(config: Config) -> Bounds:
    out = config.outbox
    return Bounds(out.max_messages, out.max_bytes, out.max_age, out.when_full)
