"""Which shift a moment belongs to: shifts start at local wall-clock times in the site's zone.

A shift runs from its start to the next shift's start, computed in local time and
converted through zoneinfo, so a shift spanning a DST change lasts 7 or 9 hours. Shifts
follow each other in the order of their UTC starts, which a skipped hour or day can make
differ from the list's.
"""

from __future__ import annotations

from collections.abc import Iterable
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

        self._carried: Shift | None = None

    def __bool__(self) -> bool:
        return bool(self._starts)

    def carry(self, shift: Shift, now: float, closed: Iterable[str] = ()) -> None:
        """Take up `shift`, running at `now` under an earlier calendar (a reload or restart changed the shifts or
        the zone), whose `closed` ids were published: it keeps its id and start, and ends where this calendar ends
        it, else where it was to end; on over this calendar's shifts of the next two days whose id was published."""
        if not self._starts or (self._carried is not None and self._carried.start > shift.start):
            return  # (the shift of a device that has not read since the other devices' shift began)
        day, _, name = shift.id.partition("/")
        try:
            own = next((self.at(self._utc(date.fromisoformat(day), start).timestamp()) for start, n in self._starts
                        if n == name), None)
        except ValueError:  # (not an id this calendar gives)
            own = None
        end = own.end if own is not None and own.id == shift.id and own.end.timestamp() > now else shift.end
        taken, t = {*closed, shift.id}, end.timestamp()
        while t < end.timestamp() + 2 * 86400:
            later = self.at(t)
            assert later is not None
            if later.id in taken:
                end = later.end
            t = later.end.timestamp()
        self._carried = Shift(shift.id, shift.name, shift.start, end)

    def at(self, ts: float) -> Shift | None:
        """The shift running at UNIX time `ts`, or None when no shifts are configured."""
        if not self._starts:
            return None
        carried = self._carried
        if carried is not None and carried.start.timestamp() <= ts < carried.end.timestamp():
            return carried
        now = datetime.fromtimestamp(ts, tz=timezone.utc)
        local = now.astimezone(self.tz).date()
        # In order of their UTC starts, not of the list: a start inside a skipped hour (02:30 on the spring DST day)
        # falls an hour later (03:30), after a 03:00 start. Two days back: a zone that skipped a whole local day
        # (Pacific/Apia, 2011-12-30) has that day's starts at the next day's instants, all after `ts`.
        days = [local + timedelta(days=d) for d in (-2, -1, 0, 1)]
        starts = sorted((self._utc(day, start), day, start, name) for day in days for start, name in self._starts)
        begun = max(i for i, (utc, *_) in enumerate(starts) if utc <= now)
        begin, day, _, name = starts[begun]
        # The next start later than this one (of two starts at one instant, the later local time runs).
        end = next(utc for utc, *_ in starts[begun + 1:] if utc > begin)
        return Shift(f"{day.isoformat()}/{name}", name, begin, end)

    def _utc(self, day: date, start: time) -> datetime:
        # Compared in UTC: aware datetimes sharing a tzinfo compare by wall time, which DST breaks.
        # fold=0: a wall time that occurs twice (DST end) means its first occurrence; one that does not occur (DST
        # start) comes the length of the gap later.
        return datetime.combine(day, start, tzinfo=self.tz).astimezone(timezone.utc)
