"""Jittered exponential backoff, shared by the uplink and the device links."""

from __future__ import annotations

import random


def backoff(attempt: int, lo: float, hi: float, jitter: float, rng: random.Random | None = None) -> float:
    """Exponential backoff from `lo` to `hi`, each delay spread by ±jitter so a fleet does not stampede."""
    base = min(hi, lo * 2 ** min(attempt, 30))
    return float(base * (1.0 + jitter * (2.0 * (rng or random).random() - 1.0)))
