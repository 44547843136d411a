"""The simulator: deterministic per seed, physically coupled, faults move the named tags."""

from __future__ import annotations

import math
import statistics

import pytest

import sim
from sim.pump import TAGS as PUMP_TAGS


def run(machine, seconds: int, dt: float = 1.0) -> list[dict]:
    return [machine.step(dt) for _ in range(int(seconds / dt))]


@pytest.mark.parametrize("profile", ["pump", "flexo_line"])
def test_same_seed_same_series_other_seed_other_series(profile):
    a, b, c = (run(sim.make(profile, seed), 600) for seed in (42, 42, 43))
    assert a == b
    assert a != c


def test_pump_is_physical():
    rows = run(sim.Pump(seed=1), 3600)
    rpm = [r["motor_rpm"] for r in rows]
    assert 1440 < statistics.mean(rpm) < 1500
    assert set(rows[0]) == set(PUMP_TAGS)
    # Flow, discharge pressure and current move together; suction pressure falls as flow rises.
    flow = [r["flow_l_min"] for r in rows]
    assert statistics.correlation(flow, [r["motor_current_a"] for r in rows]) > 0.8
    assert statistics.correlation(flow, [r["suction_pressure_bar"] for r in rows]) < -0.5
    for r in rows:
        assert r["discharge_pressure_bar"] > r["suction_pressure_bar"]
        assert r["bearing_temp_c"] > r["ambient_temp_c"]


def test_ambient_follows_a_daily_cycle():
    rows = run(sim.Pump(seed=1, start_hour=0.0), 86400, dt=60.0)
    ambient = [r["ambient_temp_c"] for r in rows]
    warmest = ambient.index(max(ambient)) / 60.0  # hours after midnight
    assert 12 <= warmest <= 18
    assert max(ambient) - min(ambient) > 6


FAULT_EFFECTS = [
    ("bearing_wear", {}, "bearing_temp_c", +5.0),
    ("bearing_wear", {}, "vibration_mm_s", +2.0),
    ("cavitation", {}, "suction_pressure_bar", -0.5),
    ("seal_leak", {}, "discharge_pressure_bar", -0.2),
    ("seal_leak", {}, "oil_pressure_bar", -0.2),
]


@pytest.mark.parametrize("fault,options,tag,change", FAULT_EFFECTS)
def test_a_physical_fault_moves_its_tags(fault, options, tag, change):
    healthy, faulty = sim.Pump(seed=9), sim.Pump(seed=9)
    faulty.inject(fault, severity=1.0, ramp=60.0, **options)
    h, f = run(healthy, 1800)[-300:], run(faulty, 1800)[-300:]
    delta = statistics.mean(r[tag] for r in f) - statistics.mean(r[tag] for r in h)
    assert delta * math.copysign(1, change) > abs(change), (tag, delta)


def test_sensor_faults_stuck_spike_dropout():
    pump = sim.Pump(seed=2)
    run(pump, 60)
    pump.inject("stuck_sensor", tag="flow_l_min", duration=30)
    stuck = {r["flow_l_min"] for r in run(pump, 30)}
    assert len(stuck) == 1
    assert len({r["flow_l_min"] for r in run(pump, 30)}) > 1  # free again afterwards
    before = run(pump, 10)[-1]["motor_current_a"]
    pump.inject("spike", tag="motor_current_a", duration=1, severity=1.0)
    assert pump.step(1.0)["motor_current_a"] > 2.5 * before
    pump.inject("dropout", tag="vibration_mm_s", duration=20)
    gone = [r["vibration_mm_s"] for r in run(pump, 20)]
    assert all(v is None or math.isnan(v) for v in gone)


def test_scheduled_fault_starts_at_its_time():
    pump = sim.Pump(seed=4)
    pump.inject("stuck_sensor", tag="oil_pressure_bar", at=100.0, duration=50.0)
    rows = run(pump, 200)
    assert len({r["oil_pressure_bar"] for r in rows[:99]}) > 50
    assert len({r["oil_pressure_bar"] for r in rows[100:150]}) == 1  # readings after t = 100 .. 150


def test_flexo_line_counts_wrap_reset_and_states():
    line = sim.FlexoLine(seed=3, counter_bits=16, counter_near_top=True, base_rate=600)
    raws = [line.step(1.0)["produced_raw"] for _ in range(60)]
    assert max(raws) > 65000 and min(raws) < 1000  # the raw counter wrapped
    assert line.produced > 0 and 0 <= line.defects < line.produced
    assert raws[-1] == (line.produced - 50) % 65536  # raw = truth + offset, mod 2^16
    line.reset_counters()
    assert line.step(1.0)["produced_raw"] < 30
    states = set()
    for _ in range(48 * 60):
        states.add(line.step(60.0)["machine_status"])
    assert {1.0, 2.0, 3.0} <= states  # running, idle, down over two days
    truth = line.truth()
    assert truth["good"] + truth["defects"] == truth["produced"]


def test_the_config_knows_each_profile_by_the_tags_the_simulator_yields():
    from gateway.config import SIM_PROFILES

    assert {name: tuple(cls.tags) for name, cls in sim.PROFILES.items()} == SIM_PROFILES


@pytest.mark.parametrize("args,expected", [
    (["--modbus-tcp", "127.0.0.1:99999"], "--modbus-tcp '127.0.0.1:99999': expected HOST:PORT with a port from 0 to 65535"),
    (["--units", "300=pump:1"], "--units '300=pump:1': expected UNIT=PROFILE:SEED, a unit from 0 to 247"),
    (["--units", "1=pump:1,1=pump:2"], "--units names unit 1 twice"),
    (["--fault", "2:bearing_wear"], "--fault '2:bearing_wear': unit 2 is not a pump unit"),
    (["--fault", "1:nosuch"], "KIND one of bearing_wear, cavitation, seal_leak, stuck_sensor, spike, dropout"),
    (["--exception", "1:99"], "--exception 1:99: a Modbus exception code is one of 1, 2, 3, 4, 5, 6, 7, 8, 10, 11"),
    (["--delay", "1:-5"], "--delay 1:-5: expected seconds from 0"),
    (["--mqtt-interval", "0"], "--mqtt-interval 0: expected a number above 0"),
])
def test_the_simulator_names_a_bad_argument_and_exits_64(args, expected, capsys):
    """They were tracebacks (a port above 65535, a unit id above 254), a puzzle ('bad argument (9)'), or taken and
    failing later: an exception code pymodbus cannot send, a fault kind that does nothing, a busy MQTT loop."""
    from gateway.cli import main
    code = main(["sim", *(["--modbus-tcp", "127.0.0.1:0"] if "--modbus-tcp" not in args else []), *args])
    assert code == 64 and expected in capsys.readouterr().err
