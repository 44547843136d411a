"""Runs of the simulated pump as arrays, for training the anomaly model and evaluating it.

Not used by the daemon (it needs numpy). One row per sample, columns in `sim.pump.TAGS`
order; a missing reading is NaN.
"""

from __future__ import annotations

import numpy as np

from sim.pump import TAGS, Pump


def run(seed: int, seconds: float, *, interval: float = 1.0, start_hour: float = 8.0,
        faults: list[dict] | None = None, **options: object) -> np.ndarray:
    """Simulate `seconds` of a pump sampled every `interval`; faults as `Pump.inject` keyword dicts; `options`:
    `Pump`'s keywords (season, operating range)."""
    pump = Pump(seed=seed, start_hour=start_hour, **options)
    for fault in faults or []:
        pump.inject(**fault)
    steps = round(seconds / interval)
    out = np.empty((steps, len(TAGS)), dtype=np.float32)
    for i in range(steps):
        values = pump.step(interval)
        out[i] = [np.nan if (v := values[t]) is None else v for t in TAGS]
    return out


def windows(data: np.ndarray, window: int, stride: int) -> np.ndarray:
    """Overlapping windows (n, window, tags) taken every `stride` rows."""
    starts = range(0, len(data) - window + 1, stride)
    return np.stack([data[s:s + window] for s in starts]) if len(data) >= window else np.empty((0, window, data.shape[1]))
