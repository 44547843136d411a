"""Counters: the wrap/reset rule, and totals that survive restarts (real SQLite, reopened)."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from gateway import counters
from gateway.store import Store


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
    store = Store(path)
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
            store = Store(path)
            row = store.counters("d")[("d", "c")]
            continue
        row, _ = counters.advance(row, raw, bits, 0.1, None, 0.0)
    assert row.total == true_total
    store.close()
