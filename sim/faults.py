"""Faults the simulator can inject: on demand, or on a schedule relative to the start."""

from __future__ import annotations

from dataclasses import dataclass

PUMP_FAULTS = ("bearing_wear", "cavitation", "seal_leak", "stuck_sensor", "spike", "dropout")
# Faults that act on one named tag rather than on the machine's physics.
TAG_FAULTS = ("stuck_sensor", "spike", "dropout")


@dataclass
class Fault:
    """One fault episode: active from `at` for `duration` seconds of simulated time.

    `severity` (0..1] scales the physical effect; `tag` names the sensor for the
    sensor faults (stuck_sensor, spike, dropout). Progressive faults (bearing wear,
    seal leak) grow over `ramp` seconds after onset.
    """

    kind: str
    at: float = 0.0
    duration: float = float("inf")
    severity: float = 1.0
    tag: str | None = None
    ramp: float = 120.0

    def active(self, t: float) -> bool:
        return self.at <= t < self.at + self.duration

    def progress(self, t: float) -> float:
        """0 before onset, rising to 1 over `ramp` seconds, 0 after the end."""
        if not self.active(t):
            return 0.0
        if self.ramp <= 0:
            return 1.0
        return min(1.0, (t - self.at) / self.ramp)
