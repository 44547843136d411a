"""An industrial centrifugal pump, its ten sensors, and the faults that plague it.

The physics is deliberately simple but coupled the way a real pump is:
the valve position sets the flow, the pump curve sets the head, suction pressure
falls with flow, motor current follows hydraulic power, bearing and casing
temperatures follow load and ambient through first-order lags, vibration rises
away from the best efficiency point. Ambient follows a daily cycle; everything
drifts slowly; every sensor has noise. All randomness comes from one seeded RNG.
"""

from __future__ import annotations

import math
import random

from sim.faults import TAG_FAULTS, Fault

TAGS = (
    "motor_rpm",
    "bearing_temp_c",
    "oil_pressure_bar",
    "vibration_mm_s",
    "flow_l_min",
    "suction_pressure_bar",
    "discharge_pressure_bar",
    "motor_current_a",
    "casing_temp_c",
    "ambient_temp_c",
)

NOMINAL_RPM = 1480.0
NOMINAL_FLOW = 1200.0  # l/min at full valve and nominal speed
BEP_FLOW = 1000.0  # best efficiency point
DAY = 86400.0


class Pump:
    """Steps the pump's state forward in simulated time and reads its sensors."""

    tags = TAGS

    def __init__(self, seed: int = 0, start_hour: float = 8.0, *, season_c: float = 0.0, season_per_day: float = 0.0,
                 valve: tuple[float, float] = (0.6, 0.95), rpm: float = NOMINAL_RPM) -> None:
        """`season_c`: ambient offset at the start (weeks later, or another season); `season_per_day`: how fast
        it keeps moving. `valve` and `rpm`: the pump's operating range (another pump on another duty)."""
        self.rng = random.Random(seed)
        self.t = 0.0
        self._start_hour = start_hour
        self._season, self._season_rate = season_c, season_per_day
        self._valve_range = valve
        self._rpm = rpm
        self.faults: list[Fault] = []
        # Slowly varying operating point and drifts, each a bounded random walk.
        self._valve = self._valve_target = (valve[0] + valve[1]) / 2
        self._drift_ambient = 0.0
        self._drift_oil = 0.0
        # Lagged temperatures start at their steady state for the initial load.
        ambient = self._ambient()
        self._bearing = ambient + 20.0
        self._casing = ambient + 10.0
        self._stuck: dict[int, float] = {}

    # -- fault injection -------------------------------------------------
    def inject(self, kind: str, *, severity: float = 1.0, duration: float = float("inf"),
               tag: str | None = None, ramp: float = 120.0, at: float | None = None) -> Fault:
        """Start a fault now (or at simulated time `at`) and return it."""
        if kind in TAG_FAULTS and tag is None:
            tag = "bearing_temp_c"
        fault = Fault(kind, self.t if at is None else at, duration, severity, tag, ramp)
        self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self.faults.clear()
        self._stuck.clear()

    def _effect(self, kind: str) -> float:
        return max((f.severity * f.progress(self.t) for f in self.faults if f.kind == kind), default=0.0)

    # -- physics -------------------------------------------------------------
    def _ambient(self) -> float:
        hour = (self._start_hour + self.t / 3600.0) % 24.0
        season = self._season + self._season_rate * self.t / DAY
        return 22.0 + season + 4.0 * math.sin(2 * math.pi * (hour - 9.0) / 24.0) + self._drift_ambient

    def step(self, dt: float) -> dict[str, float | None]:
        """Advance by `dt` seconds and return one reading of all ten sensors."""
        rng = self.rng
        self.t += dt
        # The process changes its demand every few minutes; the valve follows slowly.
        if rng.random() < dt / 300.0:
            self._valve_target = rng.uniform(*self._valve_range)
        self._valve += (self._valve_target - self._valve) * min(1.0, dt / 30.0)
        self._drift_ambient = max(-2.0, min(2.0, self._drift_ambient + rng.gauss(0, 0.002) * math.sqrt(dt)))
        self._drift_oil = max(-0.1, min(0.1, self._drift_oil + rng.gauss(0, 0.0005) * math.sqrt(dt)))

        wear = self._effect("bearing_wear")
        cavitation = self._effect("cavitation")
        leak = self._effect("seal_leak")

        ambient = self._ambient()
        load = self._valve  # 0..1
        rpm = self._rpm + 12.0 * (0.8 - load) - 8.0 * wear
        speed = rpm / NOMINAL_RPM
        flow = NOMINAL_FLOW * load * speed * (1.0 - 0.12 * cavitation) * (1.0 - 0.08 * leak)
        suction = 1.6 - 0.25 * (flow / NOMINAL_FLOW) ** 2 - 0.9 * cavitation
        head = 6.2 * speed**2 - 2.2 * (flow / NOMINAL_FLOW) ** 2 - 0.6 * leak  # bar
        discharge = suction + head
        hydraulic_kw = flow / 60000.0 * head * 1e5 / 1000.0
        current = 18.0 + 2.4 * hydraulic_kw / 0.75 + 3.0 * wear
        # Bearings heat with load and wear, cool towards ambient (tau 10 min).
        bearing_target = ambient + 12.0 + 12.0 * load + 55.0 * wear  # worn through: above 85 °C
        self._bearing += (bearing_target - self._bearing) * min(1.0, dt / 600.0)
        casing_target = ambient + 6.0 + 6.0 * load + 6.0 * leak
        self._casing += (casing_target - self._casing) * min(1.0, dt / 1200.0)
        oil = 2.6 - 0.006 * (self._bearing - 40.0) + self._drift_oil - 0.4 * leak
        off_bep = (flow - BEP_FLOW) / BEP_FLOW
        vibration = 1.6 + 2.5 * off_bep**2 + 6.0 * wear + 4.0 * cavitation * rng.random()

        values = {
            "motor_rpm": rpm + rng.gauss(0, 1.5),
            "bearing_temp_c": self._bearing + rng.gauss(0, 0.15),
            "oil_pressure_bar": oil + rng.gauss(0, 0.02),
            "vibration_mm_s": max(0.0, vibration + rng.gauss(0, 0.08)),
            "flow_l_min": flow + rng.gauss(0, 6.0) + 40.0 * cavitation * rng.gauss(0, 1),
            "suction_pressure_bar": suction + rng.gauss(0, 0.02),
            "discharge_pressure_bar": discharge + rng.gauss(0, 0.03) + 0.3 * cavitation * rng.gauss(0, 1),
            "motor_current_a": current + rng.gauss(0, 0.2),
            "casing_temp_c": self._casing + rng.gauss(0, 0.1),
            "ambient_temp_c": ambient + rng.gauss(0, 0.1),
        }
        return self._apply_sensor_faults(values, self.t - dt)

    def _apply_sensor_faults(self, values: dict[str, float | None], t0: float) -> dict[str, float | None]:
        """Sensor faults active at the start of this step show in its reading (a spike is seen once)."""
        for i, fault in enumerate(self.faults):
            if fault.kind not in TAG_FAULTS or fault.tag not in values:
                continue
            if not fault.active(t0):
                self._stuck.pop(i, None)
                continue
            if fault.kind == "stuck_sensor":
                values[fault.tag] = self._stuck.setdefault(i, values[fault.tag])
            elif fault.kind == "spike":
                values[fault.tag] = values[fault.tag] * (1.0 + 2.0 * fault.severity)
            elif fault.kind == "dropout":
                values[fault.tag] = float("nan") if self.rng.random() < 0.5 else None
        return values
