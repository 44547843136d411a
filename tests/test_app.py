"""The supervised task tree, in process: a loop that fails ends the daemon (after a drain), the stop
trigger is the caller's, a reload survives any bytes in the file, the watchdog sees every loop."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path

import pytest

from gateway import config
from gateway.app import Gateway, LoopFailed
from gateway.errors import AlreadyRunning
from gateway.notify import Notifier
from gateway.supervise import LoopEnded, Supervisor, run_all
from tests.helpers import ROOT, free_port, gateway_config


class Recorder(Notifier):
    """The sd_notify messages, recorded instead of sent."""

    def __init__(self, watchdog_interval: float = 0.0) -> None:
        super().__init__(env={})
        self.watchdog_interval = watchdog_interval
        self.sent: list[str] = []

    def send(self, *fields: str) -> None:
        self.sent.extend(fields)


def make_config(tmp_path: Path, devices: str | None = None) -> tuple[Path, config.Config]:
    # Nothing listens on the upstream port: the uplink retries in the background, which is all it should do.
    path = tmp_path / "gateway.yaml"
    path.write_text(gateway_config(tmp_path / "data", free_port(), devices=devices))
    return path, config.load(str(path))


async def wait_for(predicate, what: str, timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.02)
    try:
        await asyncio.wait_for(poll(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


def test_the_caller_stops_it_and_the_drain_keeps_the_outbox(tmp_path):
    path, cfg = make_config(tmp_path)

    async def main() -> None:
        shutdown = asyncio.Event()
        notifier = Recorder()
        async with Gateway(cfg, str(path), notifier) as gw:
            run = asyncio.create_task(gw.run(shutdown))
            await wait_for(lambda: gw.outbox.stats.messages >= 10, "ten committed messages")
            shutdown.set()
            await run
            assert "READY=1" in notifier.sent and "STOPPING=1" in notifier.sent
            kept = gw.outbox.stats.messages
        state = json.loads((tmp_path / "data" / "state.json").read_text())
        assert state["backlog"]["messages"] == kept > 0
        assert set(state["devices"]) == {"pump1", "line1"}
    asyncio.run(main())


def test_a_loop_that_raises_ends_the_daemon_with_its_traceback(tmp_path, caplog):
    path, cfg = make_config(tmp_path)

    async def main() -> None:
        async with Gateway(cfg, str(path), Recorder()) as gw:
            committed = 0
            real_commit = gw.outbox.commit

            def commit(now: float | None = None) -> bool:  # a bug in the commit path, on the 5th commit
                nonlocal committed
                committed += 1
                if committed == 5:
                    raise RuntimeError("a bug in the commit path")
                return real_commit(now)
            gw.outbox.commit = commit  # type: ignore[method-assign]
            with pytest.raises(LoopFailed, match="task commit failed"):
                await asyncio.wait_for(gw.run(asyncio.Event()), 20)
    with caplog.at_level(logging.ERROR):
        asyncio.run(main())
    crash = [r for r in caplog.records if "task commit failed" in r.getMessage()]
    assert crash and crash[0].exc_info and "a bug in the commit path" in str(crash[0].exc_info[1])


def test_a_crashed_uplink_pump_ends_the_uplink():
    async def main() -> None:
        async def pump() -> None:
            await asyncio.sleep(0.01)
            raise RuntimeError("pump bug")

        async def connection() -> None:
            await asyncio.Event().wait()
        with pytest.raises(RuntimeError, match="pump bug"):
            await run_all(connection=connection(), pump=pump())
        assert len(asyncio.all_tasks()) == 1  # the connection loop was cancelled and awaited, not left behind
    asyncio.run(main())


def test_a_loop_that_returns_is_a_failure_and_the_watchdog_sees_it():
    async def main() -> None:
        sup = Supervisor()

        async def forever() -> None:
            await asyncio.Event().wait()

        async def returns() -> None:
            await asyncio.sleep(0.01)
        sup.start(forever(), "forever")
        assert sup.alive()
        sup.start(returns(), "returns")
        name, error = await asyncio.wait_for(sup.wait(), 5)
        assert name == "returns" and isinstance(error, LoopEnded)
        assert not sup.alive()
        await sup.aclose()
        assert len(asyncio.all_tasks()) == 1
    asyncio.run(main())


def test_reload_survives_bytes_that_are_not_yaml_and_applies_a_good_file_later(tmp_path, caplog):
    path, cfg = make_config(tmp_path)
    good = path.read_bytes()

    async def main() -> None:
        async with Gateway(cfg, str(path), Recorder()) as gw:
            run = asyncio.create_task(gw.run(asyncio.Event()))
            await wait_for(lambda: gw.outbox.stats.messages > 0, "a committed message")
            path.write_bytes(b"\xff\xfe not UTF-8 \x80")
            gw.reload_requested.set()
            await wait_for(lambda: any("reload refused" in r.getMessage() for r in caplog.records),
                           "the bad reload to be refused")
            path.write_bytes(good.replace(b"health_interval: 1s", b"health_interval: 2s"))
            gw.reload_requested.set()
            await wait_for(lambda: gw.config.gateway.health_interval == 2.0, "the good reload to apply")
            assert not run.done()
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    refused = [r.getMessage() for r in caplog.records if "reload refused" in r.getMessage()]
    assert refused == [f"reload refused, the running config stays: {path}: line 1: not UTF-8 text: byte 0xff at "
                       f"offset 0; save the file as UTF-8"]


def test_a_second_gateway_on_the_same_data_dir_is_refused(tmp_path):
    path, cfg = make_config(tmp_path)

    async def main() -> None:
        async with Gateway(cfg, str(path), Recorder()):
            with pytest.raises(AlreadyRunning):
                async with Gateway(cfg, str(path), Recorder()):
                    pass
    asyncio.run(main())


@pytest.mark.parametrize("completes", [True, False])
def test_a_deadline_never_swallows_a_cancellation(completes):
    """Cancelled as what it waits for completes (or not): the task ends cancelled, it does not carry on.
    (asyncio.wait_for before Python 3.12 returns the result instead, and a device loop ran on.)"""
    from gateway.supervise import within

    async def main() -> None:
        fut = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(within(fut, 5))
        await asyncio.sleep(0)  # the task is waiting now
        if completes:
            fut.set_result(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(main())


def test_a_second_stop_skips_a_drain_that_hangs(tmp_path, caplog):
    path, cfg = make_config(tmp_path)

    async def main() -> None:
        shutdown, force = asyncio.Event(), asyncio.Event()
        async with Gateway(cfg, str(path), Recorder()) as gw:
            async def stuck(flush_timeout: float = 0.0) -> None:  # an upstream that never lets go
                await asyncio.Event().wait()
            gw.uplink.stop = stuck  # type: ignore[method-assign]
            run = asyncio.create_task(gw.run(shutdown, force))
            await wait_for(lambda: gw.outbox.stats.messages > 0, "a committed message")
            shutdown.set()
            await wait_for(lambda: any("stopping:" in r.getMessage() for r in caplog.records), "the drain")
            force.set()
            await asyncio.wait_for(run, 5)  # well inside the 10 s drain bound
    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    assert any("shutdown drain skipped by a second signal" in r.getMessage() for r in caplog.records)


def test_a_deadline_that_passes_cancels_and_awaits_what_it_waited_for():
    from gateway.supervise import within

    async def main() -> None:
        ended = asyncio.Event()

        async def slow() -> None:
            try:
                await asyncio.sleep(10)
            finally:
                ended.set()
        with pytest.raises(asyncio.TimeoutError):
            await within(slow(), 0.05)
        assert ended.is_set()
        assert await within(asyncio.sleep(0, "ok"), 1) == "ok"
    asyncio.run(main())


def test_a_deadline_passes_on_a_cancellation_that_the_awaited_code_swallows():
    """A library coroutine that catches CancelledError and returns normally must not keep us running."""
    from gateway.supervise import within

    async def main() -> None:
        started = asyncio.Event()

        async def swallows() -> str:
            started.set()
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                return "carried on"
            return "slept"
        task = asyncio.create_task(within(swallows(), 5))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(main())


def test_a_damaged_history_file_is_logged_and_the_devices_run_on(tmp_path, caplog):
    path = tmp_path / "gateway.yaml"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "history.db").write_bytes(b"\x00not SQLite at all" * 5000)
    # Scored by the shipped model as if commissioned on 7 minutes: its note must not promise a history.
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(ROOT / "models" / "pump-ae.tflite", models)
    meta = json.loads((ROOT / "models" / "pump-ae.json").read_text())
    meta["false_alarms"]["recording_s"] = 420.0
    (models / "pump-ae.json").write_text(json.dumps(meta))
    path.write_text(gateway_config(tmp_path / "data", free_port(), devices="""
  - {name: pump1, source: sim, profile: pump, seed: 3, interval: 50ms, history: {}, model: pump-ae, time_scale: 20}
""").replace("health_interval: 1s}", f'health_interval: 1s, model_dir: "{models}"}}'))
    cfg = config.load(str(path))

    async def main() -> None:
        async with Gateway(cfg, str(path), Recorder(), prepared=config.preflight(cfg, str(path))) as gw:
            run = asyncio.create_task(gw.run(asyncio.Event()))
            await wait_for(lambda: gw.outbox.stats.messages > 0, "a committed message")
            assert gw.health()["devices"]["pump1"]["polls"] > 0
            assert "this device's history is not being recorded (the journal says why)" in \
                gw.health()["devices"]["pump1"]["anomaly"]["note"]
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
    asyncio.run(main())
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("history" in e and "cannot be opened (file is not a database)" in e for e in errors), errors
    assert not any(r.exc_info for r in caplog.records)


def test_a_history_moved_away_is_started_anew_at_the_next_reload(tmp_path, caplog):
    """A fuzzing pass: the log's advice for a damaged history ('move the file away and reload') did nothing once
    the file was open: the daemon kept writing to the moved file, and `history export` found no history."""
    from gateway.store.history import History

    path = tmp_path / "gateway.yaml"
    path.write_text(gateway_config(tmp_path / "data", free_port(), devices="""
  - {name: pump1, source: sim, profile: pump, seed: 3, interval: 50ms, history: {}}
"""))
    cfg = config.load(str(path))
    db = tmp_path / "data" / "history.db"

    async def main() -> None:
        async with Gateway(cfg, str(path), Recorder()) as gw:
            run = asyncio.create_task(gw.run(asyncio.Event()))
            await wait_for(lambda: db.exists() and gw.history is not None and gw.history.bounds, "the history")
            gw.history.commit()
            db.rename(tmp_path / "moved.db")
            assert await gw.reload()
            await wait_for(lambda: db.exists(), "a new history file")
            await asyncio.sleep(0.5)
            gw.history.commit()
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    assert any("was moved away: closing it, a new one is started" in r.getMessage() for r in caplog.records)
    fresh = History.open(db, readonly=True)
    try:
        tags, rows = fresh.export("pump1", 0, 1e10)
        assert len(list(rows)) > 3
    finally:
        fresh.close()


def test_a_reload_keeps_what_an_unchanged_device_knows_and_starts_a_changed_one_afresh(tmp_path, caplog):
    """A soak found every reload restarting every device: a scored device unscored for a context (30 s for
    pump-ae) and its poll count back to 0, for a change to another device. An unchanged device goes on; one the
    reload changes, or whose model file changed, starts afresh."""
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models", models)
    devices = """
  - {name: kept, source: sim, profile: pump, seed: 3, interval: 50ms, time_scale: 20, model: pump-ae}
  - {name: changed, source: sim, profile: pump, seed: 4, interval: 50ms, time_scale: 20, model: pump-ae}
  - {name: slow, source: sim, profile: pump, seed: 6, interval: 1s}
"""
    path = tmp_path / "gateway.yaml"
    path.write_text(gateway_config(tmp_path / "data", free_port(), devices=devices).replace(
        "health_interval: 1s}", f'health_interval: 1s, model_dir: "{models}"}}'))
    cfg = config.load(str(path))

    def runner(gw: Gateway, name: str):
        return next(r for r in gw.devices if r.name == name)

    async def main() -> None:
        async with Gateway(cfg, str(path), Recorder(), config.preflight(cfg, str(path))) as gw:
            run = asyncio.create_task(gw.run(asyncio.Event()))
            await wait_for(lambda: all(r.scoring.scorer.state.scored > 3 for r in gw.devices if r.scoring),
                           "scored windows")
            kept, changed, slow = runner(gw, "kept"), runner(gw, "changed"), runner(gw, "slow")
            state = kept.scoring.scorer.state
            scored, unscored, polls = state.scored, state.unscored, kept.health.polls
            kept.source._skipped = 5  # as if it had overrun 5 ticks: a counter that must not go back at a reload
            read = slow.health.polls
            await wait_for(lambda: slow.health.polls > read, "a reading of the slow device")
            last = slow.health.last_sample
            path.write_text(path.read_text().replace("seed: 4", "seed: 5"))
            assert await gw.reload()
            assert runner(gw, "kept").skipped_ticks >= 5
            # its next reading keeps its pace: a second after the last, not at once (a storm of reloads read
            # every device at each one)
            await wait_for(lambda: slow.health.polls > read + 1, "the slow device's next reading")
            assert slow.health.last_sample - last >= 0.9, slow.health.last_sample - last
            assert runner(gw, "kept").scoring is kept.scoring and runner(gw, "kept").health is kept.health
            assert runner(gw, "kept").source is kept.source  # read on as it was, not opened again
            assert runner(gw, "changed").scoring is not changed.scoring
            assert runner(gw, "changed").source is not changed.source
            assert runner(gw, "changed").scoring.scorer.state.scored == 0
            assert runner(gw, "changed").counting.closed is changed.counting.closed  # the web page's closed shifts
            await wait_for(lambda: kept.scoring.scorer.state.scored > scored + 3, "the kept device scoring on")
            assert kept.health.polls > polls
            assert state.unscored == unscored  # no window without its context: no warm-up again
            meta = models / "pump-ae.json"  # the model file changed: its scoring starts afresh
            data = json.loads(meta.read_text())
            data["threshold"] *= 1.5
            meta.write_text(json.dumps(data))
            assert await gw.reload()
            assert runner(gw, "kept").scoring is not kept.scoring
            assert runner(gw, "kept").scoring.scorer.model.threshold == data["threshold"]
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    reloaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("config reloaded")]
    assert reloaded[0].startswith("config reloaded: 3 devices (2 unchanged, reading on; 1 scored going "
                                  "on with their context)"), reloaded
    assert reloaded[1].startswith("config reloaded: 3 devices (3 unchanged, reading on);"), reloaded


def test_a_reload_and_the_history_opening_at_last_build_the_devices_one_after_the_other(tmp_path, caplog):
    """An attack pass: the history's retry (every 10 s after it could not be opened) built and started the
    devices while a reload was waiting; the reload then started them a second time, and the daemon ended (70)."""
    path = tmp_path / "gateway.yaml"
    path.write_text(gateway_config(tmp_path / "data", free_port(), devices="""
  - {name: pump1, source: sim, profile: pump, seed: 3, interval: 50ms, history: {}}
"""))
    cfg = config.load(str(path))
    blocked = tmp_path / "data" / "history.db"
    blocked.mkdir(parents=True)  # a directory: the history cannot be opened

    async def main() -> None:
        async with Gateway(cfg, str(path), Recorder()) as gw:
            run = asyncio.create_task(gw.run(asyncio.Event()))
            await wait_for(lambda: gw.devices[0].health.polls > 2, "the device")
            assert gw.history is None
            blocked.rmdir()
            gw._history_retry = 0.0  # due now
            path.write_text(path.read_text().replace("seed: 3", "seed: 4"))
            assert (await asyncio.gather(gw.reload(), gw._retry_history()))[0] is True
            await asyncio.sleep(0.3)
            assert not run.done(), run
            assert gw.history is not None and [r.device.seed for r in gw.devices] == [4]
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    assert not any("already running" in r.getMessage() or r.exc_info for r in caplog.records)


@pytest.mark.parametrize("takes_out", ["the rule", "the device", "the device, while stopped"])
def test_an_alarm_whose_rule_a_reload_takes_out_ends(tmp_path, caplog, takes_out):
    """Attack passes: a reload that took out the rule of an active alarm (or a device's every rule, or the device
    itself, or the device while the daemon was stopped) left upstream with its start and no end, for ever;
    docs/events.md says an end is never lost."""
    rule = "    alarms: [{name: turning, tag: motor_rpm, above: 1, severity: high}]\n"
    alarmed = f"""
  - name: pump1
    source: sim
    profile: pump
    seed: 3
    interval: 50ms
{rule}  - {{name: other, source: sim, profile: pump, seed: 4, interval: 50ms}}
"""
    path, cfg = make_config(tmp_path, alarmed)

    async def main() -> None:
        async with Gateway(cfg, str(path), Recorder()) as gw:
            run = asyncio.create_task(gw.run(asyncio.Event()))
            await wait_for(lambda: gw.devices[0].events.alarms.active() == ["turning"], "the alarm")
            text = path.read_text()
            path.write_text(text.replace(rule, "") if takes_out == "the rule" else
                            text.replace(alarmed.split("  - {name: other")[0], "\n"))
            if takes_out != "the device, while stopped":
                assert await gw.reload()
                await wait_for(lambda: gw.devices[0].health.polls > 3, "samples after the reload")
            gw.outbox.commit()
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        if takes_out == "the device, while stopped":
            async with Gateway(config.load(str(path)), str(path), Recorder()) as gw:
                gw.outbox.commit()
        async with Gateway(config.load(str(path)), str(path), Recorder()) as gw:  # and nothing more at a next start
            gw.outbox.commit()
            rows = [m.body for m in gw.outbox.fetch(0, 100_000) if m.topic.endswith("/pump1/alarm")]
            assert [(r["event"], r["name"]) for r in rows] == [("start", "turning"), ("end", "turning")], rows
            end = rows[1]
            assert (end["severity"], end["tag"], end["limit"], end["value"]) == ("high", "motor_rpm", 1, None)
            assert end["started"] == rows[0]["ts"]
            assert gw.outbox.device_state("pump1", "alarms") in ({}, None)
            if takes_out != "the rule":  # and its running shift stopped counting it (an attack pass)
                assert gw.outbox.shift_record("pump1")["active_alarms"] == []
    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    why = "its rule is not in the config any more" if takes_out == "the rule" else \
        "the device is not in the config any more"
    assert sum(f"alarm turning ended: {why}" in r.getMessage() for r in caplog.records) == 1


def test_a_departed_devices_damaged_state_is_said_once_then_forgotten(tmp_path, caplog):
    """The worst-input pass: a device no longer configured whose saved states were damaged (edited by hand) was said
    to be "damaged: it starts afresh" at every start and reload, for ever: nothing rewrote them."""
    import os
    import sqlite3

    from gateway import datadir
    from gateway.store.outbox import Outbox

    path, cfg = make_config(tmp_path)
    os.makedirs(cfg.gateway.data_dir, exist_ok=True)
    store = Outbox.open(datadir.path(cfg.gateway.data_dir, datadir.OUTBOX))  # the outbox's own schema
    store.stage_state("gone", "machine", {"state": "running", "since": 1.0, "reason": None})
    store.commit()
    store.close()
    db = sqlite3.connect(datadir.path(cfg.gateway.data_dir, datadir.OUTBOX))
    db.executemany("INSERT OR REPLACE INTO device_state VALUES (?, ?, ?)",
                   [("gone", "alarms", '{"hot": {"active": "yes"}}'), ("gone", "anomaly", "[" * 10_000)])
    db.commit()
    db.close()

    async def start() -> None:
        async with Gateway(config.load(str(path)), str(path), Recorder()) as gw:
            assert await gw.reload()
            gw.outbox.commit()
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            asyncio.run(start())
    said = [r.getMessage() for r in caplog.records if "device gone" in r.getMessage()]
    assert len(said) == 2 and all("cannot be read" in m or "damaged" in m for m in said), said
    assert not [r for r in caplog.records if r.exc_info]


def test_after_a_reload_a_failing_device_keeps_its_pace_and_a_sensor_is_taken_as_it_sends(tmp_path):
    """An attack pass on the pace kept across a reload: it waited from the last good reading, so a device that
    could not be read was read again at every reload (23 errors in 18 s of reloads, for a 1 s interval); and it
    held an MQTT sensor's messages for up to an interval (an hour for an hourly sensor), dropping what came
    meanwhile. A failed reading counts, and a sensor that sends on its own is not paced."""
    from gateway.sources import Links, open_source

    dead = free_port()
    devices = f"""
  - name: plc
    source: modbus_tcp
    host: 127.0.0.1
    port: {dead}
    unit: 1
    interval: 1s
    registers:
      - {{name: speed, table: holding, address: 1, type: uint16}}
  - {{name: pump1, source: sim, profile: pump, seed: 3, interval: 50ms}}
"""
    path, cfg = make_config(tmp_path, devices)

    async def main() -> None:
        async with Gateway(cfg, str(path), Recorder()) as gw:
            run = asyncio.create_task(gw.run(asyncio.Event()))
            plc = gw.devices[0]
            await wait_for(lambda: plc.health.errors >= 2, "failed readings")
            errors = plc.health.errors
            await wait_for(lambda: plc.health.errors > errors, "another failed reading")
            last = plc.last_read
            path.write_text(path.read_text().replace("seed: 3", "seed: 4"))
            assert await gw.reload()
            plc = gw.devices[0]
            await wait_for(lambda: plc.last_read != last, "its next reading", timeout=5)
            assert plc.last_read - last >= 0.9, plc.last_read - last
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
    asyncio.run(main())

    sensors = config.parse(f"""
gateway: {{id: g, site: s, data_dir: "{tmp_path / 'data2'}"}}
upstream: {{host: 127.0.0.1}}
local_broker: {{enabled: true, allow_anonymous: true}}
devices:
  - {{name: pump7, source: mqtt, topic: plant/pump7/state, interval: 1h, fields: {{rpm: rpm}}}}
""")
    from gateway.contract import Topics
    from gateway.pipeline.device import DeviceRunner
    from gateway.shifts import ShiftCalendar
    from gateway.store.outbox import Outbox

    outbox = Outbox.open(str(tmp_path / "outbox.db"))
    try:
        device, links = sensors.devices[0], Links(sensors.local_broker)
        args = (outbox, Topics("r"), ShiftCalendar([], "UTC"))
        first = DeviceRunner(device, open_source(device, links), *args)
        first.last_read = 1e9  # it has read
        again = DeviceRunner(device, open_source(device, links), *args, before=first)
        assert again._resume_at is None  # its messages are taken as they come
    finally:
        outbox.close()
