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


@dataclass
class CounterRow:
    """A counter's state: the last raw value read, the lifetime and shift totals."""
    last_raw: int | None
    total: int
    shift_total: int
    shift_id: str | None
    updated: float = 0.0


@dataclass(frozen=True)
class Step:
    delta: int
    event: str  # "baseline" | "count" | "wrap" | "reset" | "suspect"
    seen: int = 0  # what a suspect step would have added


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


def advance(row: CounterRow | None, raw: int, bits: int, reset_threshold: float,
            shift_id: str | None, now: float, max_rate: float | None = None) -> tuple[CounterRow, Step]:
    """The counter's next state after reading `raw`; shift totals restart when the shift changes."""
    if row is None:
        row = CounterRow(last_raw=None, total=0, shift_total=0, shift_id=shift_id)
    result = step(row.last_raw, raw, bits, reset_threshold)
    if result.event != "baseline" and not plausible(result.delta, bits, now - row.updated, max_rate):
        result = Step(0, "suspect", result.delta)
    shift_total = row.shift_total if row.shift_id == shift_id else 0
    return replace(row, last_raw=raw, total=row.total + result.delta,
                   shift_total=shift_total + result.delta, shift_id=shift_id, updated=now), result
