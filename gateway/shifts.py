"""Which shift a moment belongs to: shifts start at local wall-clock times in the site's zone.

A shift runs from its start to the next shift's start, computed in local time and
converted through zoneinfo, so a shift spanning a DST change lasts 7 or 9 hours.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class Shift:
    id: str  # "2026-11-24/A": the local date the shift started, and its name
    name: str
    start: datetime  # UTC
    end: datetime  # UTC


class ShiftCalendar:
    def __init__(self, shifts: list[tuple[str, str]], tz: str) -> None:
        """`shifts`: (name, "HH:MM") pairs in any order."""
        self.tz = ZoneInfo(tz)
        self._starts = sorted((time.fromisoformat(start), name) for name, start in shifts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def at(self, ts: float) -> Shift | None:
        """The shift running at UNIX time `ts`, or None when no shifts are configured."""
        if not self._starts:
            return None
        now = datetime.fromtimestamp(ts, tz=timezone.utc)
        local = now.astimezone(self.tz)
        candidates = [(day, start, name) for day in (local.date() - timedelta(days=1), local.date())
                      for start, name in self._starts]
        begun = [c for c in candidates if self._utc(c[0], c[1]) <= now]
        day, start, name = begun[-1]
        index = candidates.index((day, start, name))
        if index + 1 < len(candidates):
            nday, nstart, _ = candidates[index + 1]
        else:
            nday, nstart = day + timedelta(days=1), self._starts[0][0]
        return Shift(f"{day.isoformat()}/{name}", name, self._utc(day, start), self._utc(nday, nstart))

    def _utc(self, day: date, start: time) -> datetime:
        # Compared in UTC: aware datetimes sharing a tzinfo compare by wall time, which DST breaks.
        # fold=0: a wall time that occurs twice (DST end) means its first occurrence.
        return datetime.combine(day, start, tzinfo=self.tz).astimezone(timezone.utc)
