"""Machine events through the real device pipeline and SQLite, with scripted PLC values: state changes with
stop reasons, limit alarms (delay, hysteresis, bad quality, anomaly gating), live OEE, and restarts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from gateway import config
from gateway.contract import Topics
from gateway.pipeline.device import DeviceRunner
from gateway.sample import Sample
from gateway.shifts import ShiftCalendar
from gateway.store.outbox import Bounds, Outbox
from tests.helpers import LINE_CONFIG as SHIFTS_CONFIG
from tests.helpers import Line as ScriptedLine
from tests.helpers import NoSource, utc

# The shift tests' line, with a stop reason register, live OEE and two alarms.
CONFIG = SHIFTS_CONFIG.replace(
    "    oee: {status_tag: machine_status, states: {1: running, 2: idle, 3: down, 4: planned_stop}, ideal_rate: 120}\n",
    """    oee:
      status_tag: machine_status
      states: {1: running, 2: idle, 3: down, 4: planned_stop}
      ideal_rate: 120
      reason_tag: stop_reason
      reasons: {11: web break, 12: ink change, 21: no material, 31: electrical fault}
      live_interval: 30m
    alarms:
      - {name: dryer_hot, tag: dryer_temp_c, above: 85, for: 3m, clear: 80, severity: high}
      - {name: slow, tag: line_speed_m_min, below: 100, severity: low}
""")


class Line(ScriptedLine):
    """The shift tests' line with a stop reason register, live OEE and two alarms."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, CONFIG)


def minutes(line: Line, t: float, n: int, status: int, reason: int = 0, made: int = 0, **kw) -> float:
    for _ in range(n):
        line.sample(t, status, reason, made, **kw)
        t += 60
    return t


def test_state_events_with_reasons_and_exact_durations_across_a_boundary_and_a_restart(tmp_path):
    line = Line(tmp_path / "g.db")
    t = utc("2026-11-24T12:00:00")  # 13:00 local, shift A
    t = minutes(line, t, 20, 1, made=100)                       # running 20 min
    t = minutes(line, t, 15, 3, reason=11)                      # down: web break
    t = minutes(line, t, 10, 1, made=100)
    t = minutes(line, t, 10, 3, reason=31)                      # down across 14:00: electrical fault
    line.restart()                                              # the gateway restarts while the line is down
    t = minutes(line, t, 20, 3, reason=31)
    t = minutes(line, t, 5, 2, reason=77)                       # idle, a code nobody wrote down
    t = minutes(line, t, 5, 1, made=100)
    states = line.on("state")
    assert [(s["previous"], s["state"]) for s in states] == [
        (None, "running"), ("running", "down"), ("down", "running"), ("running", "down"), ("down", "idle"),
        ("idle", "running")]
    assert [s["previous_duration_s"] for s in states[1:]] == [1200.0, 900.0, 600.0, 1800.0, 300.0]  # exact
    assert states[1]["reason"] == {"code": 11, "text": "web break"}
    assert states[3]["reason"] == {"code": 31, "text": "electrical fault"}
    assert "reason" not in states[2] and "reason" not in states[4]  # it left down, not running
    assert states[3]["since"] == "2026-11-24T12:45:00.000Z"  # the sample time of the change
    # Shift A closed at 14:00 local: its down time, by reason, adds up to its down time.
    a = line.on("shift")[0]
    assert a["shift_id"] == "2026-11-24/A"
    by_reason = a["downtime_by_reason"]
    assert by_reason == [{"code": 11, "reason": "web break", "seconds": 900.0},
                         {"code": 31, "reason": "electrical fault", "seconds": 900.0}] or \
        by_reason == [{"code": 31, "reason": "electrical fault", "seconds": 900.0},
                      {"code": 11, "reason": "web break", "seconds": 900.0}]
    assert sum(r["seconds"] for r in by_reason) == a["state_s"]["down"]
    # At the boundary, the live OEE's last word on shift A is the summary's own figures.
    final = [o for o in line.on("oee") if o.get("final")]
    assert len(final) == 1 and final[0]["shift_id"] == "2026-11-24/A"
    for key in ("availability", "performance", "oee", "quality_rate", "total", "state_s", "counters"):
        assert final[0][key] == a[key], key
    live = [o for o in line.on("oee") if not o.get("final")]
    assert live[-1]["shift_id"] == "2026-11-24/B" and live[-1]["state"] in ("down", "idle", "running")
    # A shift's first live OEE has had no minute of running: no performance, no OEE (a fuzzing pass saw 32,702 %
    # from counts read in its first sample); they come once it has.
    b = [o for o in live if o["shift_id"] == "2026-11-24/B"]
    assert b[0]["state_s"]["running"] < 60 and (b[0]["performance"], b[0]["oee"]) == (None, None)
    assert all(o["performance"] is not None for o in b if o["state_s"]["running"] >= 60)
    # An unknown code is its number with no text.
    assert line.runner.health_report()["machine"]["state"] == "running"


def test_alarm_delay_hysteresis_and_bad_quality_hold(tmp_path):
    line = Line(tmp_path / "g.db")
    t = utc("2026-11-24T08:00:00")
    t = minutes(line, t, 2, 1, dryer=90.0)     # 2 min above 85: not yet (for: 3m)
    t = minutes(line, t, 1, 1, dryer=70.0)     # back: the delay starts again
    assert line.on("alarm") == []
    t = minutes(line, t, 4, 1, dryer=86.0)     # 3 min above: raised at the fourth sample
    start = [a for a in line.on("alarm") if a["name"] == "dryer_hot"]
    assert [(a["event"], a["value"], a["limit"], a["severity"]) for a in start] == [("start", 86.0, 85.0, "high")]
    assert start[0]["ts"] == "2026-11-24T08:06:00.000Z"
    t = minutes(line, t, 3, 1, dryer=82.0)     # below the limit but above clear: still active
    t = minutes(line, t, 3, 1, dryer=None)     # the sensor fails: neither raises nor clears
    assert line.runner.health_report()["alarms"] == {"active": ["dryer_hot"], "unknown": ["dryer_hot"]}
    line.restart()                             # active across a restart: no second start
    t = minutes(line, t, 2, 1, dryer=84.0)
    t = minutes(line, t, 1, 1, dryer=79.0)     # at or below clear: ended, once
    ended = [a for a in line.on("alarm") if a["name"] == "dryer_hot"]
    assert [a["event"] for a in ended] == ["start", "end"]
    assert ended[1]["started"] == ended[0]["ts"] and ended[1]["duration_s"] == 9 * 60.0
    assert line.runner.health_report()["alarms"] == {"active": [], "unknown": []}
    # A below-limit alarm without delay, and the shift summary's count and minutes per alarm.
    t = minutes(line, t, 2, 1, speed=50.0)
    t = minutes(line, t, 1, 1, speed=150.0)
    slow = [a["event"] for a in line.on("alarm") if a["name"] == "slow"]
    assert slow == ["start", "end"]
    minutes(line, utc("2026-11-24T13:00:00"), 1, 1)  # 14:00 local: shift A closes
    a = line.on("shift")[0]
    assert a["alarms"] == {"dryer_hot": {"count": 1, "minutes": 9.0}, "slow": {"count": 1, "minutes": 2.0}}


def _rewrite_saved(line: Line, change) -> None:
    """Every record the outbox keeps for the line (machine state, alarms, running shift) passed through `change`,
    as another version of the gateway, or a hand, might have left them."""
    store = line.store
    for kind in ("machine", "alarms"):
        store.stage_state("line1", kind, change(store.device_state("line1", kind)))
    store.stage_shift("line1", change(store.shift_record("line1")))
    assert store.commit()


def test_saved_states_with_fields_of_a_later_version_are_taken_up_and_unreadable_ones_start_afresh(tmp_path):
    """A rollback after a newer version wrote its records: the fields this version knows are taken up (the
    machine down since 10:00, the alarm active, the shift's running figures), the others ignored. A record
    that is not one at all starts that state afresh: never a crash at start."""
    line = Line(tmp_path / "g.db")
    t = minutes(line, utc("2026-11-24T08:00:00"), 10, 1, made=100, dryer=90.0)
    t = minutes(line, t, 5, 3, reason=11, dryer=90.0)
    down_since = line.runner.health_report()["machine"]["since"]
    assert line.runner.health_report()["alarms"]["active"] == ["dryer_hot"]
    _rewrite_saved(line, lambda r: {**r, "from_a_later_version": [1, {"x": None}]} |
                   ({k: {**v, "later": True} for k, v in r.items() if isinstance(v, dict) and "active" in v}))
    line.restart()
    report = line.runner.health_report()
    assert report["machine"]["state"] == "down" and report["machine"]["since"] == down_since
    assert report["alarms"]["active"] == ["dryer_hot"]
    t = minutes(line, t, 5, 1, made=100, dryer=70.0)
    assert [a["event"] for a in line.on("alarm")] == ["start", "end"]  # no second start: the state was taken up
    for garbage in ([1, 2], "down", 7, {"state": "down"}):
        _rewrite_saved(line, lambda _, g=garbage: g)
        line.restart()
        t = minutes(line, t, 2, 1, made=10)
        assert line.runner.health_report()["machine"]["state"] == "running"
        assert line.runner.health.errors == 0
    minutes(line, utc("2026-11-24T13:00:00"), 1, 1)  # 14:00 local: shift A closes, partial after the garbage
    assert line.on("shift")[-1]["shift_id"].endswith("/A")


DAMAGED = ("x", -1e12, 1e300, None, True, [1], {"a": 1}, -5, 10**30, {"running": "x"}, {"banana": 1.0}, ["x", 5])


@pytest.mark.parametrize("kind", ["machine", "alarms", "shift"])
def test_a_saved_state_with_a_damaged_field_starts_afresh_said_once_and_every_sample_goes_on(tmp_path, caplog, kind):
    """Each field of each record the line keeps (machine state, alarm state, running shift) given a value of another
    type, or out of range (before 1970, after 9999, negative, beyond 2^53), or keys and states no sample writes: the
    record, read at the restart, used to fail every sample that reached it with a traceback. Now the record starts
    afresh, the log says so once with the field, and the line runs on, its state and shift events as before."""
    line = Line(tmp_path / "g.db")
    t = minutes(line, utc("2026-11-24T08:00:00"), 10, 1, made=100, dryer=90.0)
    t = minutes(line, t, 5, 3, reason=11, dryer=90.0)
    store = line.store
    good = store.shift_record("line1") if kind == "shift" else store.device_state("line1", kind)
    target = good["dryer_hot"] if kind == "alarms" else good
    damaged = []
    for key in list(target):
        for value in DAMAGED:
            record = json.loads(json.dumps(good))
            (record["dryer_hot"] if kind == "alarms" else record)[key] = value
            if kind == "shift":
                store.stage_shift("line1", record)
            else:
                store.stage_state("line1", kind, record)
            assert store.commit()
            caplog.clear()
            line.restart()
            store = line.store
            t = minutes(line, t, 2, 1, made=10, dryer=70.0)
            t = minutes(line, t, 2, 3, reason=11, dryer=90.0)
            assert line.runner.health.errors == 0, (key, value)
            said = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
            assert len(said) <= 1 and all("device line1: its saved " in m and "it starts afresh" in m for m in said)
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], (key, value)
            damaged += [(key, json.dumps(value))] if said else []
            good = store.shift_record("line1") if kind == "shift" else store.device_state("line1", kind)
            target = good["dryer_hot"] if kind == "alarms" else good
    for key, value in {"machine": [("since", '"x"'), ("since", "1e+300"), ("state", '"x"'), ("reason", "1e+300")],
                       "alarms": [("started", "-1000000000000.0"), ("active", "[1]"), ("pending", "true")],
                       "shift": [("observed_s", "null"), ("last_state", '"x"'), ("state_s", '{"banana": 1.0}'),
                                 ("down_by_reason", '{"a": 1}'), ("active_alarms", '["x", 5]'), ("end", "-5"),
                                 ("alarm_count", '{"running": "x"}')]}[kind]:
        assert (key, value) in damaged, (key, value, damaged)
    states = line.on("state")
    assert states and all(s["state"] in ("running", "down") for s in states)


def test_check_config_names_each_events_problem(tmp_path):
    bad = CONFIG.replace("reason_tag: stop_reason", "reason_tag: stop_reasn").replace(
        "clear: 80, severity: high", "clear: 90, severity: urgent").replace(
        "tag: line_speed_m_min, below: 100", "tag: speed, below: 100").replace(
        "      reasons: {11: web break, 12: ink change, 21: no material, 31: electrical fault}\n", "")
    with pytest.raises(config.ConfigError) as caught:
        config.parse(bad, "g.yaml")
    text = str(caught.value)
    for expected in ('devices[0].oee.reasons: required with reason_tag',
                     'devices[0].alarms[0].severity: expected one of low, medium, high, critical, got "urgent"',
                     "devices[0].alarms[0].clear: expected at most the limit (above: 85)",
                     'devices[0].oee.reason_tag: expected one of this device\'s tags',
                     'devices[0].alarms[1].tag: expected one of this device\'s tags'):
        assert expected in text, text
    assert all(line.startswith("g.yaml:") for line in text.splitlines())


def test_with_anomaly_raises_only_while_the_real_model_sees_the_simulated_bearing_wear(tmp_path):
    pytest.importorskip("ai_edge_litert")
    import sim
    from gateway.anomaly import model as anomaly

    cfg = config.parse("""
gateway: {id: g, site: s}
upstream: {host: h}
devices:
  - name: pump1
    source: sim
    profile: pump
    model: pump-ae
    alarms:
      - {name: bearing_hot, tag: bearing_temp_c, above: 85, for: 10s, clear: 80, severity: high}
      - {name: bearing_hot_anomaly, tag: bearing_temp_c, above: 85, with_anomaly: true, severity: critical}
""")
    model = anomaly.load("pump-ae", anomaly.model_dir())
    store = Outbox.open(str(tmp_path / "g.db"), bounds=Bounds(max_age=10 * 365 * 86400.0))
    runner = DeviceRunner(cfg.devices[0], NoSource(), store, Topics("root"), ShiftCalendar([], "UTC"), model=model)
    pump = sim.make("pump", 4)
    pump.inject("bearing_wear", at=1800.0, ramp=600.0)
    t0, active, hot = 1_795_000_000.0, [], []
    for i in range(5400):
        readings = {tag: round(v, 3) for tag, v in pump.step(1.0).items()}
        runner.process(Sample.from_readings("pump1", t0 + i, readings))
        active.append(runner.scoring.scorer.state.active)
        hot.append(readings["bearing_temp_c"] > 85)
    assert store.commit()
    messages = [(m.topic.split("/")[-1], json.loads(m.payload)) for m in store.fetch(0, 10**7)]
    store.close()
    alarms = [p for k, p in messages if k == "alarm"]
    anomalies = [p for k, p in messages if k == "anomaly"]
    assert anomalies and anomalies[0]["event"] == "start" and any(hot), "the wear must heat the bearing past 85 °C"
    plain = [a for a in alarms if a["name"] == "bearing_hot"]
    gated = [a for a in alarms if a["name"] == "bearing_hot_anomaly"]
    assert plain and plain[0]["event"] == "start" and gated and gated[0]["event"] == "start"
    assert gated[0]["severity"] == "critical" and gated[0]["value"] > 85
    first_hot = hot.index(True)
    first_active = active.index(True)
    start_index = round(utc_seconds(gated[0]["ts"]) - t0)
    assert start_index >= max(first_hot, first_active)  # only when both hold
    for a in gated:  # every start of the gated alarm falls inside an anomaly event
        if a["event"] == "start":
            assert active[round(utc_seconds(a["ts"]) - t0)]
    assert utc_seconds(plain[0]["ts"]) - t0 >= first_hot + 10  # `for: 10s`


def utc_seconds(text: str) -> float:
    from gateway.anomaly.recording import parse_time
    return parse_time(text)


def test_an_alarm_active_across_kill_9_ends_exactly_once(mosquitto, gateway, subscribe, tmp_path):
    """The daemon, killed -9 while the simulated bearing is hot: after the restart (the in-process
    simulator starts cold again) the alarm ends once, and no second start is sent."""
    import subprocess
    import sys

    from tests.helpers import ENV, ROOT, gateway_config, wait_until

    devices = """
  - name: pump1
    source: sim
    profile: pump
    seed: 2
    interval: 100ms
    time_scale: 100
    faults: [{fault: bearing_wear, at: 0s, ramp: 60s}]
    alarms: [{name: bearing_hot, tag: bearing_temp_c, above: 85, clear: 80, severity: high}]
  - name: line1
    source: sim
    profile: flexo_line
    interval: 100ms
    oee: {status_tag: machine_status, states: {1: running, 2: idle, 3: down, 4: planned_stop}, ideal_rate: 120,
          reason_tag: stop_reason, reasons: {11: web break}, live_interval: 1s}
"""
    sub = subscribe(mosquitto.port, topic="edge/lab/test-gw/pump1/alarm")
    config_text = gateway_config(tmp_path / "data", mosquitto.port, devices=devices)
    first = gateway(config_text).start()
    wait_until(lambda: sub.on("/alarm"), 60, what="the bearing alarm to start")

    def status() -> str:
        return subprocess.run([sys.executable, "-m", "gateway", "status", "-c", str(first.config)], capture_output=True,
                              text=True, env=ENV, cwd=ROOT, timeout=30).stdout
    wait_until(lambda: "alarms  active: bearing_hot" in status(), 20, what="status to show the active alarm")
    shown = status()
    assert "  machine running since " in shown and "  oee     " in shown and "availability" in shown, shown
    first.kill()
    second = gateway(config_text).start()
    wait_until(lambda: [a for a in sub.on("/alarm") if a["event"] == "end"], 30, what="the alarm to end")
    assert second.stop() == 0
    alarms = {a["seq"]: a for a in sub.on("/alarm")}  # a message resent after kill -9 has the same seq
    assert [a["event"] for _, a in sorted(alarms.items())] == ["start", "end"], alarms
    start, end = (a for _, a in sorted(alarms.items()))
    assert end["started"] == start["ts"] and end["value"] <= 80
    assert "Traceback" not in first.logs() + second.logs()


def test_an_alarm_without_clear_or_for_does_not_chatter_on_a_value_wavering_at_its_limit():
    """85 °C ± 0.5 for 3 s at 10 samples a second: raised once (it was 9 times in 3 s), then
    cleared once when the value falls past the default deadband (2 % of 85: at 83.3)."""
    from gateway.config import AlarmSection
    from gateway.pipeline.events import AlarmWatch

    hot = AlarmSection(name="hot", tag="temp", above=85.0)
    low = AlarmSection(name="low", tag="flow", below=5.0)
    watch = AlarmWatch((hot, low))
    events = []
    for i in range(30):
        wave = 0.5 if i % 2 else -0.5
        events += watch.observe(i / 10, {"temp": 85 + wave, "flow": 5 - wave / 10}, {"temp": True, "flow": True},
                                False)
    assert [(e.rule.name, e.kind) for e in events] == [("hot", "start"), ("low", "start")]
    events = watch.observe(3.0, {"temp": 83.4, "flow": 5.09}, {"temp": True, "flow": True}, False)
    assert events == []  # back inside the limits, not yet past the deadband
    events = watch.observe(3.1, {"temp": 83.3, "flow": 5.1}, {"temp": True, "flow": True}, False)
    assert [(e.rule.name, e.kind) for e in events] == [("hot", "end"), ("low", "end")]
    # An explicit clear at the limit is the user's choice: no deadband.
    assert AlarmSection(name="x", tag="t", above=85.0, clear=85.0).clear_at == 85.0


def _pump_pipeline(path: Path, model):
    cfg = config.parse("""
gateway: {id: g, site: s}
upstream: {host: h}
devices:
  - {name: pump1, source: sim, profile: pump, model: pump-ae}
""")
    store = Outbox.open(str(path), bounds=Bounds(max_age=10 * 365 * 86400.0))
    calendar = ShiftCalendar([("day", "00:00")], "UTC")
    return store, DeviceRunner(cfg.devices[0], NoSource(), store, Topics("root"), calendar, model=model)


def test_an_anomaly_event_open_across_a_restart_ends_exactly_once_and_a_held_threshold_is_kept(tmp_path):
    """The gateway stops without a word (kill -9: the last commit is all that is kept) while the bearing
    wear's event is open, and again while its threshold is held after it subsided. The machine goes on;
    each restart resumes the event's state: no second start, one end that knows when the event started,
    the held threshold as it was, and the shift's anomaly time stops with the event."""
    pytest.importorskip("ai_edge_litert")
    import sim
    from gateway.anomaly import model as anomaly

    model = anomaly.load("pump-ae", anomaly.model_dir())
    pump = sim.make("pump", 4)
    pump.inject("bearing_wear", at=600.0, ramp=120.0, duration=900.0)
    t0, path, messages = 1_795_000_000.0, tmp_path / "g.db", []
    store, runner = _pump_pipeline(path, model)
    restarts: list[tuple[str, float]] = []

    def collect() -> None:
        for m in store.fetch(0, 10**7):
            messages.append((m.topic.split("/")[-1], json.loads(m.payload)))
            store.ack(m.seq, len(m.payload))
        assert store.commit()

    for i in range(4000):
        readings = {tag: round(v, 3) for tag, v in pump.step(1.0).items()}
        if any(t <= i < t + 20 for _, t in restarts):
            continue  # the gateway is down: these samples are never read
        if len(restarts) == 2 and i > restarts[1][1] + 300:
            break
        runner.process(Sample.from_readings("pump1", t0 + i, readings))
        assert store.commit()
        st = runner.scoring.scorer.state
        if not restarts and st.active and i > 600 + 200:  # well inside the event
            restarts.append(("open", i))
        elif len(restarts) == 1 and not st.active and st.threshold > model.threshold * 1.5:
            restarts.append(("held", i))
            held = st.threshold
        else:
            continue
        collect()
        store, runner = _pump_pipeline(path, model)  # kill -9: nothing closed, a new process on the same file
        if restarts[-1][0] == "held":
            assert runner.scoring.threshold == pytest.approx(held)
            assert runner.health_report()["anomaly"]["threshold"] == pytest.approx(held)
        else:
            assert runner.scoring.scorer.state.active and runner.health_report()["anomaly"]["state"] == "anomaly"
    collect()
    assert [kind for kind, _ in restarts] == ["open", "held"], restarts
    events = [p for k, p in messages if k == "anomaly"]
    assert [e["event"] for e in events][:2] == ["start", "end"], events
    start, end = events[:2]
    assert end["started"] == start["ts"] and end["duration_s"] > 200
    shift = runner.counting.book.current
    assert shift is not None and not shift.in_anomaly
    assert shift.anomaly_s == pytest.approx(end["duration_s"], abs=30)  # the shift counts the event's time once
    store.close()


def test_an_anomaly_event_left_open_by_a_model_taken_out_of_the_config_ends_once(tmp_path):
    """The device's model is taken out of the config while its event is open: the next start ends that event
    (upstream and the shift book would otherwise wait for an end forever), once."""
    pytest.importorskip("ai_edge_litert")
    import sim
    from gateway.anomaly import model as anomaly

    pump = sim.make("pump", 4)
    pump.inject("cavitation", at=120.0, ramp=0.0)
    t0, path = 1_795_000_000.0, tmp_path / "g.db"
    store, runner = _pump_pipeline(path, anomaly.load("pump-ae", anomaly.model_dir()))
    t = 0
    while not runner.scoring.scorer.state.active:
        runner.process(Sample.from_readings("pump1", t0 + t, pump.step(1.0)))
        assert store.commit() and t < 600
        t += 1
    for _ in range(2):  # two restarts without the model: one end
        store, runner = _pump_pipeline(path, None)
        for _ in range(5):
            runner.process(Sample.from_readings("pump1", t0 + t, pump.step(1.0)))
            assert store.commit()
            t += 1
    events = [json.loads(m.payload) for m in store.fetch(0, 10**7) if m.topic.endswith("/anomaly")]
    assert [e["event"] for e in events] == ["start", "end"], events
    assert events[1]["started"] == events[0]["ts"] and events[1]["model"] == "pump-ae"
    assert not runner.counting.book.current.in_anomaly
    store.close()


@pytest.mark.parametrize("started", [-1e12, 1e300, -1e300, 253402300800.0])
def test_a_saved_anomaly_event_with_a_damaged_start_time_is_not_taken_up_and_every_sample_goes_on(tmp_path, caplog,
                                                                                                   started):
    """A saved event state whose start time no message can carry (before 1970, after 9999: a damaged record) failed
    every sample of the device with a traceback, with its model (the event's end) and without (the unwatched end).
    Now the event is not taken up (as a start time that is not a number), a held threshold is kept without its
    start, and the device runs on."""
    pytest.importorskip("ai_edge_litert")
    import sim
    from gateway.anomaly import model as anomaly

    model = anomaly.load("pump-ae", anomaly.model_dir())
    pump, t0 = sim.make("pump", 4), 1_795_000_000.0
    for n, (record, with_model) in enumerate([
            ({"active": True, "started": started, "peak": 9.0, "level": 9.0}, True),
            ({"active": True, "started": started}, False),
            ({"active": False, "started": started, "threshold": 3 * model.threshold, "level": 9.0}, True)]):
        store, runner = _pump_pipeline(tmp_path / f"g{n}.db", model if with_model else None)
        store.stage_state("pump1", "anomaly", {"model": model.identity, "name": "pump-ae", **record})
        assert store.commit()
        store.close()
        store, runner = _pump_pipeline(tmp_path / f"g{n}.db", model if with_model else None)
        for i in range(100):
            runner.process(Sample.from_readings("pump1", t0 + i, pump.step(1.0)))
            assert store.commit()
        assert runner.health.errors == 0 and runner.health.state == "ok"
        if with_model:
            assert runner.health_report()["anomaly"]["windows_scored"] > 0
        store.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.parametrize("how", ["kill -9", "stop", "reload"])
def test_an_anomaly_event_open_across_kill_9_ends_exactly_once(mosquitto, gateway, subscribe, tmp_path, how):
    """The daemon, killed -9 (or stopped, or reloaded) while cavitation's anomaly event is open: after the restart
    (the in-process simulator starts again before the fault) the event ends once, saying when it started, and no
    second start is sent before that end; the fault coming back later is a new event. A reload that changes nothing
    leaves the device as it was (its simulator goes on): the event ends once, when the fault does."""
    import signal

    pytest.importorskip("ai_edge_litert")
    from tests.helpers import SCORED_PUMP, gateway_config, wait_until

    devices = SCORED_PUMP + "    faults: [{fault: cavitation, at: 60s, ramp: 0s, duration: 120s}]\n"
    sub = subscribe(mosquitto.port, topic="edge/lab/test-gw/pump1/anomaly")
    config_text = gateway_config(tmp_path / "data", mosquitto.port, devices=devices)
    first = gateway(config_text).start()
    wait_until(lambda: sub.on("/anomaly"), 60, what="the cavitation's anomaly event to start")
    if how == "reload":  # the devices are built anew: the simulator too
        second = first
        first.proc.send_signal(signal.SIGHUP)
    else:
        first.kill() if how == "kill -9" else first.stop()
        second = gateway(config_text).start()
    wanted = 2 if how == "reload" else 3
    wait_until(lambda: len({a["seq"] for a in sub.on("/anomaly")}) >= wanted, 60, what="the event to end (and come back)")
    if how == "reload":
        wait_until(lambda: "config reloaded: 1 devices (1 unchanged" in second.logs(), 10, what="the reload")
    assert second.stop() == 0
    events = [a for _, a in sorted({a["seq"]: a for a in sub.on("/anomaly")}.items())]  # a resend keeps its seq
    kinds = [e["event"] for e in events]
    assert kinds[:wanted] == ["start", "end", "start"][:wanted] and "start,start" not in ",".join(kinds), kinds
    assert events[1]["started"] == events[0]["ts"]
    assert "Traceback" not in first.logs() + (second.logs() if second is not first else "")


@pytest.mark.parametrize("record", [[1, 2], 7, "active", None, {"active": True, "started": "yesterday"}])
def test_a_saved_anomaly_state_that_is_not_one_starts_the_device_all_the_same(tmp_path, record):
    """Whatever the outbox holds as a device's anomaly state (a file edited by hand, a bug of a later version),
    the device starts, with its model or without, and scores."""
    pytest.importorskip("ai_edge_litert")
    import sim
    from gateway.anomaly import model as anomaly

    store, _ = _pump_pipeline(tmp_path / "g.db", None)
    store.stage_state("pump1", "anomaly", record)  # type: ignore[arg-type]
    assert store.commit()
    store.close()
    pump = sim.make("pump", 4)
    for model in (anomaly.load("pump-ae", anomaly.model_dir()), None):
        store, runner = _pump_pipeline(tmp_path / "g.db", model)
        for t in range(40):
            runner.process(Sample.from_readings("pump1", 1_795_000_000.0 + t, pump.step(1.0)))
        assert runner.health.errors == 0
        if model is not None:
            assert runner.scoring.score is not None and not runner.scoring.scorer.state.active
        assert not [m for m in store.fetch(0, 10**7) if m.topic.endswith("/anomaly")]
        store.close()


@pytest.mark.parametrize("text", ["[" * 10_000 + "]" * 10_000, "{not json", b"\xff\xfe\x00", ""])
def test_saved_records_that_are_not_json_start_afresh_with_a_warning(tmp_path, caplog, text):
    """A damaged outbox file, or one edited by hand: nested 10,000 deep, not JSON, not UTF-8, empty. Each state
    (anomaly, machine, running shift) starts afresh with one warning; the device starts and scores."""
    import sqlite3

    pytest.importorskip("ai_edge_litert")
    import sim
    from gateway.anomaly import model as anomaly

    path = tmp_path / "g.db"
    store, runner = _pump_pipeline(path, None)
    pump = sim.make("pump", 4)
    runner.process(Sample.from_readings("pump1", 1_795_000_000.0, pump.step(1.0)))
    store.stage_state("pump1", "anomaly", {"active": True, "started": 1_795_000_000.0})
    assert store.commit()
    store.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE device_state SET record = ?", (text,))
        db.execute("UPDATE shifts SET record = ?", (text,))
    store, runner = _pump_pipeline(path, anomaly.load("pump-ae", anomaly.model_dir()))
    for t in range(1, 40):
        runner.process(Sample.from_readings("pump1", 1_795_000_000.0 + t, pump.step(1.0)))
    assert runner.health.errors == 0 and runner.scoring.score is not None and not runner.scoring.scorer.state.active
    assert "its saved anomaly state cannot be read" in caplog.text and "its saved running shift" in caplog.text
    assert "Traceback" not in caplog.text
    store.close()


@pytest.mark.parametrize("column, value, kept", [
    ("last_raw", "'x'", True), ("last_raw", "X'00ff'", True), ("last_raw", "-5", True),
    ("total", "'x'", False), ("total", "9223372036854775807", False), ("total", "1.5", False),
    ("shift_total", "X'00ff'", True), ("shift_id", "X'00'", True), ("updated", "'x'", True), ("updated", "-1e300", True)])
def test_a_saved_counter_with_a_damaged_field_is_said_and_counting_goes_on(tmp_path, caplog, column, value, kept):
    """A counter's row edited by hand or damaged (text or a blob in a number's column, a total past 2^53 that the next
    commit could not store): the line used to fail every sample, or every commit. Now the field starts afresh, said
    once with what it held, and counting goes on: the lifetime total is kept unless it was the damaged field."""
    import sqlite3

    line = Line(tmp_path / "g.db")
    t = minutes(line, utc("2026-11-24T08:00:00"), 3, 1, made=10)
    before = line.store.counters("line1")[("line1", "produced")].total
    line.store.close()
    db = sqlite3.connect(tmp_path / "g.db")
    db.execute(f"UPDATE counters SET {column} = {value} WHERE name = 'produced'")
    db.commit()
    db.close()
    line.restart()
    minutes(line, t, 5, 1, made=10)
    said = [r.getMessage() for r in caplog.records if "its saved counter produced is damaged" in r.getMessage()]
    assert len(said) == 1 and f"({column}: " in said[0], said
    assert line.runner.health.errors == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    total = line.store.counters("line1")[("line1", "produced")].total
    # 50 made since; a damaged last raw value makes the first reading a new baseline: its 10 are not counted.
    assert total == (before if kept else 0) + (40 if column == "last_raw" else 50)
    assert line.on("counters")[-1]["counters"]["produced"]["total"] == total


@pytest.mark.parametrize("record,said", [({"active": "yes", "started": 1_795_000_000.0}, 'active: "yes"'),
                                         ({"active": True, "started": "x"}, 'started: "x"'),
                                         ([1, 2], "a list, not an object")])
def test_a_damaged_saved_anomaly_event_is_said_once_and_the_device_scores_on(tmp_path, caplog, record, said):
    """A fuzzing pass: a saved open event edited by hand (`active: "yes"`) was dropped without a word, and the
    next event's start came upstream with no end for the first."""
    pytest.importorskip("ai_edge_litert")
    from gateway.anomaly import model as anomaly

    model = anomaly.load("pump-ae", anomaly.model_dir())
    path = tmp_path / "g.db"
    store, _ = _pump_pipeline(path, model)
    store.stage_state("pump1", "anomaly", record)
    assert store.commit()
    store.close()
    with caplog.at_level(logging.WARNING):
        store, runner = _pump_pipeline(path, model)
    lines = [r.getMessage() for r in caplog.records if "saved anomaly event" in r.getMessage()]
    assert lines == [f"device pump1: its saved anomaly event is damaged ({said}): it starts afresh"]
    assert not runner.scoring.scorer.state.active
    store.close()


def test_what_a_birth_takes_from_the_pipeline_is_what_the_events_told(tmp_path):
    """`DeviceRunner.standing` fills a Sparkplug DBIRTH where no row told a value. An attack pass: it said an alarm
    whose tag had never read was not active (the status page said unknown), and gave the machine a stop reason
    that no state event had told (the code of a state entered from another stop, or set after the status)."""
    line = Line(tmp_path / "g.db")
    t = utc("2026-11-24T08:00:00")
    line.sample(t, 1, dryer=None)
    assert line.runner.standing()["alarms"]["dryer_hot"]["active"] is None  # its tag never read: not known
    assert line.runner.standing()["alarms"]["slow"]["active"] is False
    t = minutes(line, t + 60, 2, 3, reason=31)
    t = minutes(line, t, 2, 2, reason=21, dryer=95.0)
    standing = line.runner.standing()
    assert standing["machine"] == {"state": "idle", "since": t - 120}
    assert standing["alarms"]["dryer_hot"] == {"active": False, "since": None}  # (for: 3m not yet over)
    t = minutes(line, t, 4, 2, dryer=95.0)
    assert line.runner.standing()["alarms"]["dryer_hot"]["active"] is True
    line.sample(t, 2, dryer=None)  # active, and then unknown: still active
    assert line.runner.standing()["alarms"]["dryer_hot"]["active"] is True
