"""The unit that flows down the pipeline: one reading of one device."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

OK, STALE, ERROR = "ok", "stale", "error"


@dataclass
class Sample:
    device: str
    ts: float  # UNIX time the sample was taken
    values: dict[str, float | None]
    quality: dict[str, str] = field(default_factory=dict)  # tag -> ok | stale | error
    problem: str | None = None  # why some tags are bad (e.g. a Modbus exception), for the log and health

    @classmethod
    def from_readings(cls, device: str, ts: float, readings: dict[str, float | None]) -> "Sample":
        """A sample whose missing, NaN or infinite readings are marked as errors."""
        values, quality = {}, {}
        for tag, value in readings.items():
            good = value is not None and math.isfinite(value)
            values[tag] = float(value) if good else None
            quality[tag] = OK if good else ERROR
        return cls(device, ts, values, quality)

    @property
    def bad_tags(self) -> list[str]:
        return [tag for tag, q in self.quality.items() if q != OK]
