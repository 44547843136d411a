"""Durations (`250ms`, `10s`, `7d`), sizes (`512MiB`), timestamps as the contract writes them, numbers read back."""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|kB|KB|KiB|MB|MiB|GB|GiB|TB|TiB)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1, "kB": 1000, "KB": 1000, "KiB": 1024, "MB": 1000**2, "MiB": 1024**2,
    "GB": 1000**3, "GiB": 1024**3, "TB": 1000**4, "TiB": 1024**4,
}


def parse_duration(text: str) -> float:
    """Seconds in a duration string such as `250ms`, `10s`, `5m`, `2h`, `7d`."""
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


MAX_SIZE = 2**50  # 1 PiB: more than any disk of a gateway; keeps the arithmetic finite


def parse_size(text: str | int) -> int:
    """Bytes in a size such as `512MiB`, `10 MB` or a plain integer."""
    if isinstance(text, int):
        if not 0 <= text <= MAX_SIZE:
            raise ValueError(text)
        return text
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(text)
    size = float(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if size > MAX_SIZE:  # also a number of 400 digits, which float() makes infinite
        raise ValueError(text)
    return int(size)


def rfc3339(ts: float) -> str:
    """A UNIX time as RFC 3339 UTC with milliseconds: `2026-11-24T06:00:00.123Z`."""
    # Every message carries one and most fall in the same second as the one before: the date and
    # time of day are formatted once per second (bench/scale.py: 6 % of the pipeline's CPU before).
    frac, whole = math.modf(ts)
    micro = round(frac * 1e6)  # as datetime.fromtimestamp rounds: to the microsecond, half to even
    second = int(whole)
    if micro >= 1_000_000:
        second, micro = second + 1, micro - 1_000_000
    elif micro < 0:
        second, micro = second - 1, micro + 1_000_000
    global _second, _prefix
    if second != _second:
        _prefix = datetime.fromtimestamp(second, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.")
        _second = second
    return f"{_prefix}{micro // 1000:03d}Z"


_second: int | None = None
_prefix = ""


def finite(value: object) -> float | None:
    """A JSON number that is a finite float, or None (a missing, mistyped or non-finite field read back)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        else None


LAST_INSTANT = 253402300799.0  # 9999-12-31T23:59:59Z: the last time `rfc3339` can write


def instant(value: object) -> float | None:
    """A UNIX time read back that `rfc3339` can write (1970 to 9999), or None: a damaged record's time must not fail
    every message that carries it."""
    ts = finite(value)
    return ts if ts is not None and 0.0 <= ts <= LAST_INSTANT else None


def duration_text(seconds: float) -> str:
    """A span as a user reads it: 45 s, 7 min, 16.8 h, 3.5 days."""
    if seconds >= 2 * 365 * 86400:
        return f"{seconds / (365 * 86400):.3g} years"
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 7200:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"
