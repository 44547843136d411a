"""Counters: the wrap/reset rule, and totals that survive restarts (real SQLite, reopened)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import counters
from gateway.store.outbox import Outbox


def test_rule():
    assert counters.step(None, 500, 16, 0.1) == counters.Step(0, "baseline")
    assert counters.step(10, 15, 16, 0.1) == counters.Step(5, "count")
    assert counters.step(65530, 4, 16, 0.1) == counters.Step(10, "wrap")
    assert counters.step(2**32 - 1, 0, 32, 0.1) == counters.Step(1, "wrap")
    assert counters.step(30000, 7, 16, 0.1) == counters.Step(7, "reset")
    assert counters.raw_value(float("nan"), 16) is None
    assert counters.raw_value(70000.0, 16) is None
    assert counters.raw_value(12.5, 16) is None
    assert counters.raw_value(12.0, 16) == 12


def test_shift_total_restarts_with_the_shift():
    row, _ = counters.advance(None, 100, 32, 0.1, "2026-11-24/A", 0.0)
    row, _ = counters.advance(row, 130, 32, 0.1, "2026-11-24/A", 1.0)
    assert (row.total, row.shift_total) == (30, 30)
    row, _ = counters.advance(row, 135, 32, 0.1, "2026-11-24/B", 2.0)
    assert (row.total, row.shift_total, row.shift_id) == (35, 5, "2026-11-24/B")


def test_a_jump_no_machine_can_make_is_a_new_baseline():
    row, _ = counters.advance(None, 30, 16, 0.1, None, 0.0)
    row, result = counters.advance(row, 65500, 16, 0.1, None, 1.0)  # a simulator restarted near the top
    assert result.event == "pending" and (row.total, row.last_raw) == (0, 30)  # (the next reading says what it was)
    row, result = counters.advance(row, 8, 16, 0.1, None, 2.0)  # then it wraps and counts on
    assert result == counters.Step(44, "suspect", 65470, at=65500) and row.total == 44 and row.last_raw == 8
    row, result = counters.advance(row, 40_000, 16, 0.1, None, 3.0)  # a "reset" to a high value
    row, result = counters.advance(row, 40_001, 16, 0.1, None, 4.0)
    assert result.event == "suspect" and row.total == 45 and row.last_raw == 40_001
    # With the machine's top rate: 5/s for 10 s allows 55 counts.
    row, _ = counters.advance(None, 1000, 32, 0.1, None, 0.0)
    row, result = counters.advance(row, 1055, 32, 0.1, None, 10.0, max_rate=5)
    assert result == counters.Step(55, "count")
    row, result = counters.advance(row, 1155, 32, 0.1, None, 20.0, max_rate=5)
    assert result.event == "pending" and row.total == 55
    row, result = counters.advance(row, 1158, 32, 0.1, None, 20.2, max_rate=5)  # at least one second's worth
    assert result == counters.Step(3, "suspect", 100, at=1155) and row.total == 58 and row.last_raw == 1158


@pytest.mark.parametrize("bits,readings,counted,event", [
    (32, [1_000_000, 0, 1_000_010, 1_000_020], 20, "glitch"),  # a PLC in STOP, a gateway answering zeros at start
    (32, [1_000_000, 0x4240000F, 1_000_010, 1_000_020], 20, "glitch"),  # its two words swapped once
    (32, [1_000_000, 999_995, 1_000_000, 1_000_010], 10, "glitch"),  # a step back by a little
    (16, [30_000, 0, 30_010, 30_020], 20, "glitch"),
    (32, [1_000_000, 3, 25, 40], 40, "reset"),  # a real reset: 3 since it, then counting on
    (16, [30_000, 5, 40, 60], 60, "reset"),
    (16, [63_000, 2_000, 2_020, 2_040], 4_576, "wrap"),  # a wrap of more than the pace allows: one reading late
    (32, [1_000, 61_000, 121_000, 181_000], 180_000, "count"),  # a fast line read every minute, from the start
])
def test_one_reading_that_breaks_the_sequence_waits_for_the_next_to_say_what_it_was(bits, readings, counted, event):
    """An attack pass: one read of 0 between 1,000,000 and 1,000,010 added 1,000,010 to the lifetime total (taken
    as a reset, then counting on from 0); one read with its words swapped 1,111,490,595; a step back by 5 999,995."""
    row, events = None, []
    for i, raw in enumerate(readings):
        row, result = counters.advance(row, raw, bits, 0.1, None, 60.0 * i)
        events.append(result.event)
    assert row.total == counted and row.last_raw == readings[-1], (row, events)
    assert event in events and row.pending is None


def test_a_counter_that_goes_on_from_no_reading_is_taken_as_moved():
    row, _ = counters.advance(None, 1_000, 32, 0.1, None, 0.0)
    for i, raw in enumerate([900_000, 50, 20]):  # each below the one before, and 50 no reset of 900,000's
        row, result = counters.advance(row, raw, 32, 0.1, None, 1.0 + i)
    assert result == counters.Step(0, "moved", at=50) and (row.total, row.last_raw) == (0, 20)


# A machine's life: increments between samples, PLC resets, gateway restarts.
events = st.lists(st.one_of(
    st.tuples(st.just("count"), st.integers(0, 3000)),
    st.tuples(st.just("reset"), st.integers(0, 50)),  # reset, then counts made after it before the next read
    st.just(("restart", 0)),
), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(bits=st.sampled_from([16, 32]), start=st.integers(0, 2**32 - 1), life=events)
def test_total_equals_true_count_across_wraps_resets_and_restarts(tmp_path_factory, bits, start, life):
    modulus = 1 << bits
    path = str(tmp_path_factory.mktemp("c") / "g.db")
    store = Outbox.open(path)
    raw = start % modulus
    true_total = 0
    row, _ = counters.advance(None, raw, bits, 0.1, None, 0.0)  # the baseline
    for kind, n in life:
        if kind == "count":
            raw = (raw + n) % modulus
            true_total += n
        elif kind == "reset":
            # The counter restarted from zero and counted n since. The documented limits: a reset that
            # leaves the raw value above the old one, or that falls from the top tenth of the range to
            # near zero, reads exactly like counting or a wrap; those are not generated.
            if not (n < raw and (n - raw) % modulus > 0.1 * modulus):
                continue
            raw = n
            true_total += n
        else:  # the gateway restarts: state comes back from the file
            store.stage_counter("d", "c", row)
            assert store.commit()
            store.close()
            store = Outbox.open(path)
            row = store.counters("d")[("d", "c")]
            continue
        # Read twice: the next poll reads what the machine, idle, still shows. A reading that broke the sequence
        # (a reset, a step beyond the pace) waits for the next to tell it from a glitch: a reset read before the
        # step ahead of it was told, to a value that goes on from the reading before that, is read as a glitch.
        for _ in range(2):
            row, _ = counters.advance(row, raw, bits, 0.1, None, 0.0)
    assert row.total == true_total
    store.close()


def test_kill_9_at_random_points_never_loses_or_double_counts(mosquitto, gateway, subscribe, tmp_path):
    """A PLC that keeps counting while the gateway is killed -9 and restarted, again and again."""
    import json
    import random
    import subprocess
    import sys
    import time

    from sim.plc import FLEXO_MAP, registers_yaml
    from tests.helpers import ENV, ROOT, free_port, gateway_config, wait_until

    port, truth = free_port(), tmp_path / "truth.json"
    plc = subprocess.Popen([sys.executable, "-m", "gateway", "sim", "--modbus-tcp", f"127.0.0.1:{port}",
                            "--units", "2=flexo_line:7", "--rate-per-min", "3000", "--truth", str(truth)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
    try:
        wait_until(truth.exists, 20, what="the simulated PLC")
        devices = f"""
  - name: line1
    source: modbus_tcp
    host: 127.0.0.1
    port: {port}
    unit: 2
    interval: 50ms
    registers:
{registers_yaml(FLEXO_MAP)}
    counters:
      - {{name: produced, register: produced_raw, bits: 32}}
      - {{name: defects, register: defects_raw, bits: 32, kind: defect}}
"""
        sub = subscribe(mosquitto.port, topic="edge/lab/test-gw/line1/#")
        config = gateway_config(tmp_path / "data", mosquitto.port, devices=devices)
        rng = random.Random(2026)
        for _ in range(5):
            gw = gateway(config).start()
            time.sleep(rng.uniform(0.4, 2.0))
            gw.kill()  # kill -9 at a random point while counting
            time.sleep(rng.uniform(0.0, 0.5))  # the PLC keeps counting while the gateway is down
        last = gateway(config).start()
        time.sleep(1.5)
        assert last.stop() == 0
        raws = {t["ts"]: t["values"] for t in sub.on("/telemetry")}
        baseline = sub.on("/telemetry")[0]["values"]  # the first committed sample: the counters' baseline
        messages = sorted(sub.on("/counters"), key=lambda m: m["seq"])
        for name in ("produced", "defects"):
            totals = [m["counters"][name]["total"] for m in messages]
            assert totals == sorted(totals), f"upstream saw {name} go down"
        final = messages[-1]
        for name, raw in (("produced", "produced_raw"), ("defects", "defects_raw")):
            assert final["counters"][name]["total"] == raws[final["ts"]][raw] - baseline[raw], name
        # The PLC's raw registers are its true counts (no offset, no reset): the totals are the truth.
        plant = json.loads(truth.read_text())["2"]
        assert plant["produced_raw"] == plant["produced"] >= raws[final["ts"]]["produced_raw"]
        assert final["counters"]["produced"]["total"] > 100
    finally:
        plc.kill()
        plc.wait(10)


def test_restarting_a_simulated_line_near_the_top_adds_nothing(mosquitto, gateway, subscribe, tmp_path):
    """The simulated PLC starts again near the top of its 16-bit counters with the gateway: a jump no
    machine can make, re-baselined with a counter_suspect line, not 65,000 defects."""
    from tests.helpers import gateway_config, wait_until

    devices = """
  - name: line1
    source: sim
    profile: flexo_line
    seed: 5
    interval: 100ms
    plc: {counter_bits: 16, start_near_top: true, rate_per_min: 3000}
    counters:
      - {name: produced, register: produced_raw, bits: 16}
      - {name: defects, register: defects_raw, bits: 16, kind: defect}
"""
    sub = subscribe(mosquitto.port, topic="edge/lab/test-gw/line1/#")
    config = gateway_config(tmp_path / "data", mosquitto.port, devices=devices)
    for _ in range(2):
        before = len(sub.on("/counters"))
        gw = gateway(config).start()
        wait_until(lambda: len(sub.on("/counters")) > before + 5, 30, what="counts")
        assert gw.stop() == 0
    totals = [m["counters"]["produced"]["total"] for m in sub.on("/counters")]
    defects = [m["counters"]["defects"]["total"] for m in sub.on("/counters")]
    assert 0 < max(totals) < 1000 and max(defects) < 1000, (totals, defects)
    assert "counter produced jumped from raw" in gw.logs() and "taken as the new baseline" in gw.logs()


def test_a_line_that_glitches_resets_and_moves_says_each_once_and_counts_exactly(tmp_path, caplog):
    """Through a line's pipeline on a real outbox: one read of 0 (a glitch), a PLC reset, values that go on from
    nothing (moved); the journal's lines, and the totals upstream."""
    import logging

    from tests.helpers import Line

    line, t = Line(tmp_path / "g.db"), 1_795_500_000.0

    def read(raw: int, at: float) -> None:
        made, line.produced = line.produced, raw  # what the PLC's register shows this once
        line.sample(at, 1)
        line.produced = made

    with caplog.at_level(logging.INFO):
        for i, raw in enumerate([1_000_000, 1_000_020, 0, 1_000_040, 1_000_060, 7, 27, 47, 5_000_000, 3, 1, 1, 2]):
            read(raw, t + 60 * i)
    said = [r.getMessage() for r in caplog.records if "counter produced" in r.getMessage()]
    assert said == [
        "device line1: counter produced read raw 0 once between 1000020 and 1000040: a glitch (a bad read, not "
        "counts), not counted (1 glitch(es) so far)",
        "device line1: counter produced was reset on the PLC (raw 1000060 -> 7); counting on from 67",
        "device line1: counter produced read 47, then values that go on from neither it nor each other (now 1): "
        "taken as a counter moved, 1 is the new baseline; the total goes on from 107",
    ], said
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert line.on("counters")[-1]["counters"]["produced"]["total"] == 108  # 60, 7 + 40 after the reset, then 1


def _runner(tmp_path, config: str):
    from gateway.config import parse
    from gateway.contract import Topics
    from gateway.pipeline.device import DeviceRunner
    from gateway.shifts import ShiftCalendar
    from gateway.store.outbox import Bounds, Outbox
    from tests.helpers import NoSource

    cfg = parse(config)
    store = Outbox.open(str(tmp_path / "g.db"), bounds=Bounds(max_age=10 * 365 * 86400.0))
    calendar = ShiftCalendar([(s.name, s.start) for s in cfg.shifts], cfg.gateway.timezone)
    return store, DeviceRunner(cfg.devices[0], NoSource(), store, Topics("root"), calendar)


def _plc(register: str, counter: str = "") -> str:
    """A config of one PLC, m1, whose counter `made` reads register `cnt` (`register`: the rest of its entry)."""
    return f"""
gateway: {{id: g, site: s}}
upstream: {{host: h}}
devices:
  - name: m1
    source: modbus_tcp
    host: 127.0.0.1
    registers: [{{name: cnt, {register}}}]
    counters: [{{name: made, register: cnt{counter}}}]
"""


def test_a_counter_on_an_int16_register_counts_past_32767_and_a_bad_value_is_said_once(tmp_path, caplog):
    """An attack pass: an int16 counter register reads 32768-65535 as negative: nothing was counted there, the way
    back through 0 was taken for a reset (true 6900, total 700), and "not updated: ... (-27236.0)" was logged at
    every poll (the value was in the line's key)."""
    import logging

    from gateway.sample import Sample

    store, runner = _runner(tmp_path, _plc("address: 0, type: int16"))
    t, made = 1_795_500_000.0, 32_700
    with caplog.at_level(logging.INFO):
        for i in range(400):  # 100 a minute, through 32767 (-32768) and round through 0
            made += 50 if i % 2 else 0
            raw = (made + 2**15) % 2**16 - 2**15  # as the int16 register reads it
            runner.process(Sample("m1", t + 30 * i, {"cnt": float(raw)}))
        for i in range(5):
            runner.process(Sample("m1", t + 30 * (400 + i), {"cnt": 0.5 + i}))  # not a count: said once
    assert store.commit()
    assert runner.counting.rows["made"].total == 200 * 50
    said = [r.getMessage() for r in caplog.records if "counter made" in r.getMessage()]
    assert said == ["device m1: counter made not updated: register cnt gave no valid 16-bit counter value (0.5)"], said
    store.close()


def test_counts_after_the_clock_steps_back_stay_in_the_running_shift(tmp_path):
    """An attack pass: the box's clock stepped back an hour (NTP) 30 minutes into shift B: the counters went back to
    shift A, already closed, and 5,400 pieces were in no shift record."""
    import datetime as dt

    from tests.helpers import Line

    line = Line(tmp_path / "g.db")
    b = dt.datetime(2026, 11, 24, 14, 0, tzinfo=dt.timezone(dt.timedelta(hours=1))).timestamp()  # shift B, Berlin
    for minute in range(-30, 30):
        line.sample(b + 60 * minute, 1, made=60)
    for minute in range(-30, 40):  # the clock an hour back: 13:30 again, then on
        line.sample(b + 60 * minute, 1, made=60)
    ids = [m["counters"]["produced"]["shift_id"] for m in line.on("counters")]
    assert ids[ids.index("2026-11-24/B"):] == ["2026-11-24/B"] * (len(ids) - ids.index("2026-11-24/B")), ids
    assert line.on("counters")[-1]["counters"]["produced"]["shift"] == 60 * (30 + 70)


def test_a_counter_whose_register_moves_under_the_same_name_starts_from_a_baseline_there(tmp_path, caplog):
    """An attack pass: a reload moved register `cnt` from address 20 to 30, where the PLC held 900,000: 899,020 were
    counted as production (the tag's name had not changed, and only the name was compared)."""
    import logging

    from gateway.sample import Sample

    config = _plc("address: 20, type: uint32")
    t = 1_795_500_000.0
    store, runner = _runner(tmp_path, config)
    for i in range(3):
        runner.process(Sample("m1", t + i, {"cnt": 1_000.0 + 10 * i}))
    assert store.commit()
    store.close()
    with caplog.at_level(logging.WARNING):
        store, runner = _runner(tmp_path, config.replace("address: 20", "address: 30"))
        for i in range(3):
            runner.process(Sample("m1", t + 10 + i, {"cnt": 900_000.0 + 10 * i}))
    assert store.commit()
    assert runner.counting.rows["made"].total == 20 + 20
    said = [r.getMessage() for r in caplog.records if "counter made" in r.getMessage()]
    assert said == ["device m1: counter made now reads register cnt (holding 30 uint32, 127.0.0.1:502 unit 1) instead "
                    "of cnt (holding 20 uint32, 127.0.0.1:502 unit 1): its first reading there is the new baseline; "
                    "the total goes on from 20"], said
    store.close()


def test_a_gap_longer_than_a_wrap_at_the_top_rate_is_said(tmp_path, caplog):
    """An attack pass: 200,000 counts on a 16-bit counter while the PLC was unread came through as 3,392, silently:
    whole wraps show in no reading. That cannot be counted, but it is said."""
    import logging

    from gateway.sample import Sample

    store, runner = _runner(tmp_path, _plc("address: 0, type: uint16", ", max_rate: 17"))
    t = 1_795_500_000.0
    with caplog.at_level(logging.WARNING):
        for i, (at, raw) in enumerate([(0, 100), (60, 1_120), (120, 2_140), (12_000, 5_532), (12_060, 6_552)]):
            runner.process(Sample("m1", t + at, {"cnt": float(raw)}))
    said = [r.getMessage() for r in caplog.records if "counter made" in r.getMessage()]
    assert said == ["device m1: counter made was not read for 11880s: at up to 17 counts/s it wraps every 3855s, so up "
                    "to 3 whole wrap(s) of 65536 counts may be missing from its total, which no reading can show"], said
    store.close()
