"""Counters: the wrap/reset rule, and totals that survive restarts (real SQLite, reopened)."""

from __future__ import annotations

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
    assert result == counters.Step(0, "suspect", 65470) and (row.total, row.last_raw) == (0, 65500)
    row, result = counters.advance(row, 8, 16, 0.1, None, 2.0)  # then it wraps and counts on
    assert result == counters.Step(44, "wrap") and row.total == 44
    row, result = counters.advance(row, 40_000, 16, 0.1, None, 3.0)  # a "reset" to a high value
    assert result.event == "suspect" and row.total == 44
    # With the machine's top rate: 5/s for 10 s allows 55 counts.
    row, _ = counters.advance(None, 1000, 32, 0.1, None, 0.0)
    row, result = counters.advance(row, 1055, 32, 0.1, None, 10.0, max_rate=5)
    assert result == counters.Step(55, "count")
    row, result = counters.advance(row, 1155, 32, 0.1, None, 20.0, max_rate=5)
    assert result == counters.Step(0, "suspect", 100) and row.total == 55 and row.last_raw == 1155
    row, result = counters.advance(row, 1158, 32, 0.1, None, 20.2, max_rate=5)  # at least one second's worth
    assert result == counters.Step(3, "count")


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
