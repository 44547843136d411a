"""A flexographic printing and packaging line: status, speed, process values and counters.

The line moves between running, idle, down and maintenance (a Markov chain with
mean durations, plus a short changeover idle at each 8-hour shift change). Each stop has
a reason in the `stop_reason` register, with its own duration: a web break (11) is
mended in minutes, an ink change (12) takes a quarter of an hour, an electrical fault (31)
half an hour or more; an idle line waits for material (21). A changeover has no code (0). While
running it makes pieces at `base_rate` × performance; a fraction (1 − quality)
of them are defects. The true counts are exact integers; the PLC-style raw
counters are those counts plus an offset, modulo 2^bits, so they wrap — and a
technician (or a schedule) can reset them to zero.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

STATUS_CODES = {"running": 1, "idle": 2, "down": 3, "maintenance": 4}
# Mean time in each state (seconds), and where the line goes next.
_MEAN_DURATION = {"running": 2400.0, "idle": 300.0, "down": 480.0, "maintenance": 1200.0}
_NEXT = {
    "running": (("idle", 0.55), ("down", 0.40), ("maintenance", 0.05)),
    "idle": (("running", 1.0),),
    "down": (("running", 1.0),),
    "maintenance": (("running", 1.0),),
}

TAGS = (
    "machine_status",
    "line_speed_m_min",
    "web_tension_n",
    "dryer_temp_c",
    "ink_viscosity_s",
    "produced_raw",
    "defects_raw",
    "stop_reason",
)

SHIFT_SECONDS = 8 * 3600.0
# Stop reasons as the PLC codes them: (code, text, share of the stops of that state, mean seconds).
REASONS = {
    "down": ((11, "web break", 0.55, 240.0), (12, "ink change", 0.30, 900.0), (31, "electrical fault", 0.15, 2100.0)),
    "idle": ((21, "no material", 1.0, 300.0),),
    "maintenance": ((12, "ink change", 1.0, 1200.0),),
}
REASON_TEXT = {code: text for options in REASONS.values() for code, text, _, _ in options}


@dataclass
class RawCounter:
    """A PLC counter register: the true count plus an offset, modulo 2^bits."""

    bits: int = 32
    offset: int = 0

    def read(self, true_count: int) -> int:
        return (true_count + self.offset) % (1 << self.bits)

    def reset(self, true_count: int) -> None:
        """The PLC counter goes back to zero now."""
        self.offset = -true_count

    def start_near_top(self, true_count: int, margin: int = 50) -> None:
        """Place the raw value `margin` counts below the wrap, to exercise it soon."""
        self.offset = (1 << self.bits) - margin - true_count


class FlexoLine:
    """Steps the line forward in simulated time and reads its PLC tags."""

    tags = TAGS

    def __init__(self, seed: int = 0, *, base_rate: float = 120.0, counter_bits: int = 32,
                 start_hour: float = 8.0, counter_near_top: bool = False,
                 reset_every: float | None = None) -> None:
        self.rng = random.Random(seed)
        self.t = 0.0
        self.base_rate = base_rate / 60.0  # pieces per second at 100 % performance
        self.start_hour = start_hour
        self.state = "running"
        self._state_left = self.rng.expovariate(1.0 / _MEAN_DURATION["running"])
        self._changeover_left = 0.0
        self.performance = 0.92
        self.quality = 0.975
        self._made = 0.0  # fractional pieces not yet counted
        self.produced = 0  # true total pieces (good + defect)
        self.defects = 0
        self.time_in_state = {name: 0.0 for name in STATUS_CODES}
        self.produced_counter = RawCounter(counter_bits)
        self.defects_counter = RawCounter(counter_bits)
        if counter_near_top:
            self.produced_counter.start_near_top(0)
            self.defects_counter.start_near_top(0, margin=5)
        self.reason = 0  # the stop reason register: 0 while running
        self._reason_rng = random.Random(seed * 7919 + 1)  # the machine's other draws stay as they were
        self.reset_every = reset_every
        self._next_reset = reset_every
        self._dryer = 65.0

    @property
    def status(self) -> str:
        return "idle" if self._changeover_left > 0 else self.state

    def reset_counters(self) -> None:
        """A technician resets the PLC counters to zero."""
        self.produced_counter.reset(self.produced)
        self.defects_counter.reset(self.defects)

    def truth(self) -> dict[str, int]:
        """The true counts since the simulation started."""
        return {"produced": self.produced, "defects": self.defects, "good": self.produced - self.defects}

    def _shift_changes_between(self, t0: float, t1: float) -> bool:
        offset = (self.start_hour - 6.0) % 8.0 * 3600.0  # shifts change at 06, 14, 22
        return int((t0 + offset) // SHIFT_SECONDS) != int((t1 + offset) // SHIFT_SECONDS)

    def step(self, dt: float) -> dict[str, float | None]:
        rng = self.rng
        if self._shift_changes_between(self.t, self.t + dt):
            self._changeover_left = 600.0  # ten-minute changeover at each shift change
        self.t += dt
        self.time_in_state[self.status] += dt
        self._changeover_left = max(0.0, self._changeover_left - dt)
        self._state_left -= dt
        if self._state_left <= 0:
            self.state = _choose(rng, _NEXT[self.state])
            self._state_left = rng.expovariate(1.0 / _MEAN_DURATION[self.state])
            self.reason = 0
            if self.state in REASONS:  # how long a stop lasts depends on why
                options = REASONS[self.state]
                x = self._reason_rng.random()
                for code, _, share, mean in options:
                    x -= share
                    if x < 0 or code == options[-1][0]:
                        self.reason = code
                        self._state_left = self._reason_rng.expovariate(1.0 / mean)
                        break
        self.performance = min(1.0, max(0.6, self.performance + rng.gauss(0, 0.004) * dt**0.5))
        self.quality = min(1.0, max(0.85, self.quality + rng.gauss(0, 0.001) * dt**0.5))

        running = self.status == "running"
        if running:
            self._made += self.base_rate * self.performance * dt
            whole = int(self._made)
            self._made -= whole
            for _ in range(whole):
                self.produced += 1
                if rng.random() > self.quality:
                    self.defects += 1
        if self._next_reset is not None and self.t >= self._next_reset:
            self.reset_counters()
            self._next_reset += self.reset_every

        speed = 250.0 * self.performance if running else 0.0
        self._dryer += ((68.0 if running else 45.0) - self._dryer) * min(1.0, dt / 300.0)
        return {
            "machine_status": float(STATUS_CODES[self.status]),
            "line_speed_m_min": speed + (rng.gauss(0, 1.0) if running else 0.0),
            "web_tension_n": (180.0 + rng.gauss(0, 3.0)) if running else 40.0 + rng.gauss(0, 0.5),
            "dryer_temp_c": self._dryer + rng.gauss(0, 0.2),
            "ink_viscosity_s": 22.0 + 1.5 * (1.0 - self.quality) * 10 + rng.gauss(0, 0.2),
            "produced_raw": float(self.produced_counter.read(self.produced)),
            "defects_raw": float(self.defects_counter.read(self.defects)),
            "stop_reason": float(self.reason if self.state != "running" else 0),
        }


def _choose(rng: random.Random, options: tuple[tuple[str, float], ...]) -> str:
    x = rng.random()
    for name, p in options:
        x -= p
        if x < 0:
            return name
    return options[-1][0]
