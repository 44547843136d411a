"""Exact cumulative counters from raw PLC counter registers.

The rule, for a raw counter of `bits` bits (modulus M = 2^bits), from the last raw
value `last` to the new raw value `raw`:

* `raw >= last`: the machine counted `raw - last`.
* `raw < last` and `(raw - last) mod M <= reset_threshold × M`: the counter wrapped;
  the machine counted `(raw - last) mod M`.
* otherwise the counter was reset (PLC download, technician): it counts from zero,
  so the machine counted `raw`. Counts made between the last sample and the reset
  cannot be seen by anyone reading the register; that is the rule's one limit.

The first value ever seen is the baseline: it adds nothing to the lifetime total.

A step that no machine could have made is not counted but taken as a new baseline
(`suspect`): more than `max_rate` counts per second since the last reading (at least one
second's worth, plus 10 %), or, without `max_rate`, more than half the modulus at once —
a counter that can move that far between two readings cannot be told from one that wrapped,
and it is what a PLC replaced, a program download or a simulator restarted looks like.

A reading that breaks the sequence — any drop that is not a small wrap, or a step forward
larger than the machine's recent pace allows — waits for the next reading to say what it was
(`pending`). If the next goes on from the baseline (a PLC read 0 once, answered with its words
swapped, stepped back by one), the odd one was a glitch and counts nothing; if it goes on from
the odd one, that was a reset, a wrap or counting, by the rule above. Where both fit, the one
that counts less is taken. The counts are then one reading late, never lost or doubled; a
counter that breaks its sequence three readings in a row is taken as moved (a new baseline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

MAX_TOTAL = 2**53 - 1  # the largest total `counters set` takes: exact in any JSON reader (a double), far from
# SQLite's 2^63 - 1 (a total set near that overflowed the next commit: a crash loop); counting there takes centuries


def total_of(value: object) -> int | None:
    """A count read back (a total, a raw value, a meta count) as the gateway writes it: an int from 0 to
    `MAX_TOTAL`; None for anything else (a file damaged or edited by hand)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOTAL else None


# A step forward is taken at once up to JUMP_FLOOR counts, or JUMP_PACE times the highest rate seen lately (halved
# every PACE_HALF_LIFE seconds): a larger one waits for the next reading (`pending`).
JUMP_FLOOR, JUMP_PACE, PACE_HALF_LIFE = 64, 10.0, 3600.0
MOVED_AFTER = 3  # readings in a row that break the sequence: the counter moved for good


@dataclass
class CounterRow:
    """A counter's state: the last raw value read, the lifetime and shift totals (those are stored); a reading
    waiting for the next to say what it was, and the pace lately (memory only: a restart compares its first
    reading with the stored raw value)."""
    last_raw: int | None
    total: int
    shift_total: int
    shift_id: str | None
    updated: float = 0.0
    pending: int | None = None
    pending_at: float = 0.0
    misses: int = 0
    pace: float = 0.0  # counts per second, the highest lately


@dataclass(frozen=True)
class Step:
    delta: int
    event: str  # "baseline" | "count" | "wrap" | "reset" | "suspect" | "pending" | "glitch" | "moved"
    seen: int = 0  # what a suspect step would have added; what a glitch or a moved counter would have
    at: int | None = None  # the raw value the event happened at, when a later reading told it (`pending`)


def step(last: int | None, raw: int, bits: int, reset_threshold: float) -> Step:
    """How much the machine counted going from raw value `last` to `raw`."""
    if last is None:
        return Step(0, "baseline")
    if raw >= last:
        return Step(raw - last, "count")
    modulus = 1 << bits
    wrapped = (raw - last) % modulus
    if wrapped <= reset_threshold * modulus:
        return Step(wrapped, "wrap")
    return Step(raw, "reset")


def raw_value(value: float | None, bits: int) -> int | None:
    """The raw register value as an integer, or None if it cannot be a counter reading."""
    if value is None or not math.isfinite(value) or value != int(value):
        return None
    raw = int(value)
    return raw if 0 <= raw < (1 << bits) else None


def plausible(delta: int, bits: int, elapsed: float, max_rate: float | None) -> bool:
    """Whether a machine can have counted `delta` in `elapsed` seconds."""
    if max_rate is not None:
        return delta <= max_rate * max(elapsed, 1.0) * 1.1
    return delta <= (1 << bits) // 2


def _goes_on(last: int, raw: int, bits: int, reset_threshold: float, elapsed: float,
             max_rate: float | None) -> Step | None:
    """The step from `last` to `raw` if it is counting or a wrap a machine can make, else None."""
    result = step(last, raw, bits, reset_threshold)
    return result if result.event in ("count", "wrap") and plausible(result.delta, bits, elapsed, max_rate) else None


def advance(row: CounterRow | None, raw: int, bits: int, reset_threshold: float,
            shift_id: str | None, now: float, max_rate: float | None = None) -> tuple[CounterRow, Step]:
    """The counter's next state after reading `raw`; shift totals restart when the shift changes."""
    if row is None:
        row = CounterRow(last_raw=None, total=0, shift_total=0, shift_id=shift_id)
    if row.shift_id != shift_id:  # (a copy only then: this runs for every counter of every sample)
        row = replace(row, shift_total=0, shift_id=shift_id)
    if row.last_raw is None:
        return replace(row, last_raw=raw, updated=now, pending=None, misses=0), Step(0, "baseline")
    elapsed = now - row.updated
    if row.pending is None:
        result = _goes_on(row.last_raw, raw, bits, reset_threshold, elapsed, max_rate)
        limit = max(JUMP_FLOOR, JUMP_PACE * row.pace * max(elapsed, 1.0))
        if result is not None and (max_rate is not None or result.delta <= limit):
            return _counted(row, raw, now, result, elapsed), result
        return replace(row, pending=raw, pending_at=now, misses=1), Step(0, "pending")
    odd = row.pending
    from_base = _goes_on(row.last_raw, raw, bits, reset_threshold, elapsed, max_rate)
    from_odd = _goes_on(odd, raw, bits, reset_threshold, now - row.pending_at, max_rate)
    if from_odd is not None and (from_base is None or from_odd.delta < from_base.delta):
        # the odd reading was true: its own step by the rule (a reset counts what it shows, a jump no machine can
        # make is a new baseline), then counting on from it
        first = step(row.last_raw, odd, bits, reset_threshold)
        if not plausible(first.delta, bits, row.pending_at - row.updated, max_rate):
            first = Step(0, "suspect", first.delta)
        result = Step(first.delta + from_odd.delta, first.event, first.seen, at=odd)
        return _counted(row, raw, now, result, elapsed), result
    if from_base is not None:  # the odd reading was a glitch: counting goes on from the baseline
        result = Step(from_base.delta, "glitch", step(row.last_raw, odd, bits, reset_threshold).delta, at=odd)
        return _counted(row, raw, now, result, elapsed), result
    if row.misses + 1 >= MOVED_AFTER:  # no reading goes on from another: the counter moved for good
        return replace(row, last_raw=raw, updated=now, pending=None, misses=0), Step(0, "moved", at=odd)
    return replace(row, pending=raw, pending_at=now, misses=row.misses + 1), Step(0, "pending")


def _counted(row: CounterRow, raw: int, now: float, result: Step, elapsed: float) -> CounterRow:
    pace = row.pace * 0.5 ** (max(elapsed, 0.0) / PACE_HALF_LIFE)
    if result.event in ("count", "wrap", "glitch") and elapsed >= 0.5:
        pace = max(pace, result.delta / elapsed)
    return replace(row, last_raw=raw, total=row.total + result.delta, shift_total=row.shift_total + result.delta,
                   updated=now, pending=None, misses=0, pace=pace)
