"""The unit that flows down the pipeline: one reading of one device."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

OK, STALE, ERROR = "ok", "stale", "error"


@dataclass
class Sample:
    device: str
    ts: float  # UNIX time the sample was taken
    values: dict[str, float | None]  # an int where the source reads an integer exactly (OPC UA Int64: no float)
    quality: dict[str, str] = field(default_factory=dict)  # tag -> ok | stale | error
    problem: str | None = None  # why some tags are bad (e.g. a Modbus exception), for the log and health
    failed: bool = False  # the read failed as a whole: every tag is an error and `problem` says why

    @classmethod
    def failure(cls, device: str, ts: float, tags: tuple[str, ...], why: str) -> Sample:
        """A read that failed: every tag an error. The historian sees the gap as bad data, not as silence."""
        return cls(device, ts, dict.fromkeys(tags), dict.fromkeys(tags, ERROR), why, failed=True)

    @classmethod
    def from_readings(cls, device: str, ts: float, readings: Mapping[str, float | None]) -> Sample:
        """A sample whose missing, NaN or infinite readings are marked as errors; ints stay exact ints."""
        values: dict[str, float | None] = {}
        quality: dict[str, str] = {}
        for tag, value in readings.items():
            good = value is not None and math.isfinite(value)
            values[tag] = (int(value) if isinstance(value, int) else float(value)) if good and value is not None else None
            quality[tag] = OK if good else ERROR
        return cls(device, ts, values, quality)

    @property
    def bad_tags(self) -> list[str]:
        return [tag for tag, q in self.quality.items() if q != OK]
