"""Waits between attempts to reach a broker or a PLC, shared by the uplink and the device links.

Two cases, because they cost the other side very different amounts:
- it cannot be reached at all (connection refused, reset, unreachable, timed out): an attempt
  costs it nothing (the kernel answers), and what matters is noticing within seconds that it is
  back. `down()` draws each wait evenly from [lo, cap], the cap doubling from lo up to a few
  seconds ("full jitter"), so a fleet that lost its broker together comes back spread over the
  cap instead of in one burst, and each gateway is back within about one cap;
- it answered and refused, or did not finish the handshake (credentials, TLS, overload):
  every attempt costs it a handshake and will not fix itself soon. `backoff()` grows
  exponentially to a long cap, each wait spread by ±jitter.
"""

from __future__ import annotations

import random


def backoff(attempt: int, lo: float, hi: float, jitter: float, rng: random.Random | None = None) -> float:
    """Exponential backoff from `lo` to `hi`, each delay spread by ±jitter so a fleet does not stampede."""
    base = min(hi, lo * 2 ** min(attempt, 30))
    return float(base * (1.0 + jitter * (2.0 * (rng or random).random() - 1.0)))


def down(attempt: int, lo: float, hi: float, rng: random.Random | None = None) -> float:
    """A wait drawn evenly from [lo, min(hi, lo × 2^attempt)]: for a peer that cannot be reached at all."""
    cap = max(lo, min(hi, lo * 2 ** min(attempt, 30)))
    return float(lo + (cap - lo) * (rng or random).random())
