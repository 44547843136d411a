"""Raw samples kept on the box, to train and check anomaly models: `data_dir/history.db`.

Beside the outbox, not in it: history is never sent, and its size cannot crowd out messages
waiting for the upstream. A device with `history:` has every sample recorded (values as
float64, NaN for a missing or bad reading, and the quality of any reading that was not good),
committed with the outbox's transactions; a `kill -9` loses at most the last commit interval.
Bounded per device by age (`keep`) and size (`max_bytes`): the oldest go first, and freed pages
are returned to the file system. A write that fails (disk full) is logged once and the samples
are dropped: history never stops a device or the uplink.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway import datadir
from gateway.sample import OK, Sample
from gateway.store.outbox import WAL_LIMIT
from gateway.units import LAST_INSTANT

log = logging.getLogger("edge_gateway.store.history")

FILE = datadir.HISTORY
ROW_OVERHEAD = 40  # bytes per row beside its values: rowid, series, time, record and index entry

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (id INTEGER PRIMARY KEY, device TEXT NOT NULL, tags TEXT NOT NULL,
                                   UNIQUE (device, tags));
CREATE TABLE IF NOT EXISTS samples (series INTEGER NOT NULL, ts REAL NOT NULL, data BLOB NOT NULL, quality TEXT);
CREATE INDEX IF NOT EXISTS samples_by_time ON samples (series, ts);
"""


@dataclass(frozen=True)
class Bounds:
    keep: float
    max_bytes: int


def _names(text: object) -> list[str] | None:
    """A series' tags as kept (a JSON list of names), or None when they are not."""
    try:
        names = json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError):
        return None
    return names if isinstance(names, list) and names and all(isinstance(n, str) for n in names) else None


class History:
    """One SQLite file for every device that keeps history. Not thread-safe: the event loop's thread only."""

    def __init__(self, path: str | Path, db: sqlite3.Connection) -> None:
        self.path = Path(path)
        self.db = db
        self.identity = _identity(self.path)  # the file this connection writes (`moved`)
        self._series: dict[tuple[str, tuple[str, ...]], int] = {}
        self._device_of: dict[int, str] = {}
        self._pending: list[tuple[int, float, bytes, str | None]] = []
        self.bounds: dict[str, Bounds] = {}
        self._bytes: dict[str, int] = {}
        self.failing: str | None = None
        self.dropped = 0
        self.damaged = 0  # series and rows `export` left out: not what the gateway writes
        self._last_trim = 0.0

    @classmethod
    def open(cls, path: str | Path, *, readonly: bool = False) -> History:
        path = Path(path)
        if readonly:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
            return cls(path, db)
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # takes effect on a new file: freed pages can be returned
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT}")  # as the outbox's: 1 MiB, not SQLite's 4 MB
        db.execute(f"PRAGMA wal_autocheckpoint = {WAL_LIMIT // 4096}")
        db.execute("PRAGMA synchronous = NORMAL")
        db.executescript(_SCHEMA)
        return cls(path, db)

    def close(self) -> None:
        self.commit()
        self.db.close()

    def moved(self) -> bool:
        """The file at the path is no longer the one written here: moved away (or replaced) while open."""
        return _identity(self.path) != self.identity

    def configure(self, bounds: dict[str, Bounds]) -> None:
        """The devices that keep history, and their bounds (at start and on reload)."""
        self.bounds = dict(bounds)
        self._bytes = {device: self._stored_bytes(device) for device in bounds}

    def add(self, device: str, tags: Sequence[str], sample: Sample) -> None:
        """Record one sample (written at the next `commit`)."""
        key = (device, tuple(tags))
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self._series_id(device, key[1])
            self._device_of[series] = device
        values = []
        bad: dict[str, str] = {}
        for tag in tags:
            value = sample.values.get(tag)
            quality = sample.quality.get(tag, OK)
            if sample.failed:
                quality = sample.problem or "read failed"
            if quality != OK:
                bad[tag] = str(quality)
            good = isinstance(value, (int, float)) and not isinstance(value, bool) and quality == OK
            values.append(float(value) if good else math.nan)  # type: ignore[arg-type]
        data = struct.pack(f"<{len(values)}d", *values)
        self._pending.append((series, sample.ts, data, json.dumps(bad) if bad else None))
        if len(self._pending) > 100_000:  # the commit loop is stuck; keep memory bounded
            self._pending = self._pending[-50_000:]

    def commit(self, now: float | None = None) -> None:
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        try:
            with self.db:
                self.db.execute("BEGIN")
                self.db.executemany("INSERT INTO samples (series, ts, data, quality) VALUES (?, ?, ?, ?)", rows)
            for series, _, data, quality in rows:
                device = self._device_of[series]
                self._bytes[device] = self._bytes.get(device, 0) + len(data) + len(quality or "") + ROW_OVERHEAD
            now = time.time() if now is None else now
            if now - self._last_trim >= 60 or any(self._bytes.get(d, 0) > b.max_bytes for d, b in self.bounds.items()):
                self.trim(now)
        except sqlite3.Error as err:
            self.dropped += len(rows)
            if self.failing != str(err):
                log.error("history %s: cannot write (%s); samples are dropped until it can", self.path, err)
                self.failing = str(err)
            return
        if self.failing is not None:
            log.info("history %s: writing again (%d samples were dropped)", self.path, self.dropped)
            self.failing = None

    def trim(self, now: float) -> None:
        """Apply each device's bounds: older than `keep`, then the oldest until under `max_bytes`."""
        self._last_trim = now
        freed = False
        for device, bounds in self.bounds.items():
            ids = self._ids(device)
            if not ids:
                continue
            marks = ",".join("?" * len(ids))
            gone = self.db.execute(f"DELETE FROM samples WHERE series IN ({marks}) AND ts < ?",
                                   (*ids, now - bounds.keep)).rowcount
            if self._bytes.get(device, 0) > bounds.max_bytes:
                rows, size = self._usage(ids)
                per_row = size / rows if rows else 1
                excess = int(rows - 0.9 * bounds.max_bytes / per_row)  # down to 90 %: no trim on every commit
                if excess > 0:
                    cut = self.db.execute(f"SELECT ts FROM samples WHERE series IN ({marks}) ORDER BY ts "
                                          f"LIMIT 1 OFFSET ?", (*ids, excess - 1)).fetchone()
                    if cut is not None:
                        gone += self.db.execute(f"DELETE FROM samples WHERE series IN ({marks}) AND ts <= ?",
                                                (*ids, cut[0])).rowcount
            if gone:
                freed = True
                self._bytes[device] = self._stored_bytes(device)
        if freed:
            self.db.execute("PRAGMA incremental_vacuum")

    def export(self, device: str, start: float | None = None, end: float | None = None
               ) -> tuple[list[str], Iterator[tuple[float, list[float | None]]]]:
        """The device's tags (the union over its series, in first-seen order) and its rows in time order. What the
        gateway never writes (a file damaged or edited by hand) is left out and counted in `damaged`: a series whose
        tags are not a list of names, a row whose values are not one float64 per tag; a row whose time is not a time
        from 1970 to 9999 is not in any span."""
        series = self.db.execute("SELECT id, tags FROM series WHERE device = ? ORDER BY id", (device,)).fetchall()
        tags: list[str] = []
        layout: dict[int, list[str]] = {}
        for sid, text in series:
            if (names := _names(text)) is None:
                self.damaged += 1
                continue
            layout[sid] = names
            tags += [t for t in names if t not in tags]

        def rows() -> Iterator[tuple[float, list[float | None]]]:
            if not layout:
                return
            marks = ",".join("?" * len(layout))
            span = (max(0.0, -math.inf if start is None else start), min(LAST_INSTANT, math.inf if end is None else end))
            cursor = self.db.execute(
                f"SELECT series, ts, data FROM samples WHERE series IN ({marks}) AND ts >= ? AND ts <= ? "
                f"AND typeof(ts) IN ('real', 'integer') ORDER BY ts", (*layout, *span))
            for sid, ts, data in cursor:
                names = layout[sid]
                if not isinstance(data, bytes) or len(data) != 8 * len(names):
                    self.damaged += 1
                    continue
                values = dict(zip(names, struct.unpack(f"<{len(names)}d", data), strict=True))
                yield float(ts), [None if (v := values.get(t)) is None or math.isnan(v) else v for t in tags]

        return tags, rows()

    def devices(self) -> list[tuple[str, int, float | None, float | None]]:
        """Each recorded device: samples, first and last time."""
        return [tuple(r) for r in self.db.execute(
            "SELECT device, COUNT(samples.ts), MIN(samples.ts), MAX(samples.ts) FROM series "
            "LEFT JOIN samples ON samples.series = series.id AND typeof(samples.ts) IN ('real', 'integer') "
            "AND samples.ts BETWEEN 0 AND ? GROUP BY device ORDER BY device", (LAST_INSTANT,))]

    def _series_id(self, device: str, tags: tuple[str, ...]) -> int:
        text = json.dumps(list(tags))
        self.db.execute("INSERT OR IGNORE INTO series (device, tags) VALUES (?, ?)", (device, text))
        row = self.db.execute("SELECT id FROM series WHERE device = ? AND tags = ?", (device, text)).fetchone()
        return int(row[0])

    def _ids(self, device: str) -> list[int]:
        return [int(r[0]) for r in self.db.execute("SELECT id FROM series WHERE device = ?", (device,))]

    def _usage(self, ids: list[int]) -> tuple[int, int]:
        """Rows and bytes (values, quality and the per-row overhead) of these series."""
        if not ids:
            return 0, 0
        marks = ",".join("?" * len(ids))
        rows, size = self.db.execute(f"SELECT COUNT(*), COALESCE(SUM(LENGTH(data) + COALESCE(LENGTH(quality), 0)), 0) "
                                     f"FROM samples WHERE series IN ({marks})", ids).fetchone()
        return int(rows), int(size + rows * ROW_OVERHEAD)

    def _stored_bytes(self, device: str) -> int:
        return self._usage(self._ids(device))[1]


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino
