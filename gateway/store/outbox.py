"""The outbox: one SQLite file holding the messages owed to the upstream, the counters and the sequence.

Messages and counter states are staged in memory and written together in ONE
transaction, so a counter's new total and the message that reports it are on disk
together or not at all. The uplink reads only committed rows; a row is deleted only
after the broker acknowledged it.

When to commit is `commit_loop`'s job (a group commit): the first message staged
after a commit rings `on_stage`, and the loop commits at once, taking everything
staged by then; what is staged while it commits goes into the next one. A bound on
commits per second (`max_rate`) spaces them for flash storage; state alone (counter
rows, acknowledgements to delete) waits at most `interval` for a message to ride with.

Bounds (messages, bytes, age) are enforced inside the same transaction; every
drop is counted in the `meta` table so the count survives restarts. On a disk
that filled, a reserve file gives room for the deletes of acknowledged rows alone,
and the messages kept in memory follow into the pages they free (`_write_in_room`,
`room`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import sqlite3
import time
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

from gateway import contract, datadir
from gateway.counters import MAX_TOTAL, CounterRow, total_of
from gateway.logs import fields
from gateway.store import salvage
from gateway.store.room import WAL_LIMIT as WAL_LIMIT  # the history holds its WAL to it too
from gateway.store.room import Reserve, free_bytes, wal_limit
from gateway.store.salvage import corrupt
from gateway.units import LAST_INSTANT, duration_text, instant

log = logging.getLogger("edge_gateway.store.outbox")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS topics (id INTEGER PRIMARY KEY, topic TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    topic_id INTEGER NOT NULL REFERENCES topics(id),
    created REAL NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    device TEXT NOT NULL,
    name TEXT NOT NULL,
    last_raw INTEGER,
    total INTEGER NOT NULL,
    shift_total INTEGER NOT NULL,
    shift_id TEXT,
    updated REAL NOT NULL,
    PRIMARY KEY (device, name)
);
CREATE TABLE IF NOT EXISTS shifts (device TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS device_state (device TEXT NOT NULL, kind TEXT NOT NULL, record TEXT NOT NULL,
                                         PRIMARY KEY (device, kind));
CREATE TABLE IF NOT EXISTS counter_audit (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    device TEXT NOT NULL,
    name TEXT NOT NULL,
    old_total INTEGER,
    new_total INTEGER NOT NULL,
    reason TEXT NOT NULL,
    by_user TEXT NOT NULL
);
"""


def _columns() -> dict[str, list[str]]:
    db = sqlite3.connect(":memory:")
    db.executescript(SCHEMA)
    tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    columns = {t: [row[1] for row in db.execute(f"PRAGMA table_info({t})")] for t in tables}
    db.close()
    return columns


COLUMNS = _columns()  # each table's columns, as SCHEMA writes them
# Messages kept in memory while the disk refuses writes (disk full, I/O error).
PENDING_LIMIT = 50_000
# How the group commit spaces commits. A commit blocks the event loop (an fsync with `sync: full`):
# when commits take d seconds (a moving average), one is followed by the next no sooner than
# d × (1/BUSY_SHARE - 1) later, so commits take at most that share of the loop. And each commit
# costs the same whatever it holds (and the uplink's wake-up after it): while the process uses
# more than CALM of a core (smoothed over BUSY_WINDOW), commits spread out, up to the timer's
# `interval` at a whole core, where a sample waits in line anyway. bench/pipeline.py (at a whole core) and bench/latency.py (500
# samples/s) measure both ends.
BUSY_SHARE = 0.2
# A drop episode (full, or expired) is over once nothing has been dropped for this long (seconds): max_age 3s
# expired a message every second or so, and each was an episode of its own, 240 lines in 18 s.
DROP_QUIET = 60.0
# Writes that fail again within this long (seconds) after they worked again are flapping (a full disk where each
# failure frees a little, a WAL cut back): said once, and their recovery only once they have worked this long.
WRITES_SETTLE = 30.0
CALM = 0.5
BUSY_WINDOW = 0.25  # seconds


@dataclass
class Message:
    """A stored message: its topic (a `contract.Route`: `device` and `kind` without parsing it), its
    JSON payload, and `created`, the time of what it reports (the sample's time)."""

    seq: int
    topic: contract.Route
    payload: bytes
    created: float
    decoded: dict[str, Any] | None = field(default=None, repr=False, compare=False)  # the dict it was built from

    @property
    def size(self) -> int:
        return len(self.payload)

    @property
    def device(self) -> str | None:
        return self.topic.device

    @property
    def kind(self) -> str:
        return self.topic.kind

    @property
    def body(self) -> dict[str, Any]:
        """The payload as the contract built it: the staged dict while in memory, else decoded here, once."""
        if self.decoded is None:
            self.decoded = json.loads(self.payload)
        return self.decoded


@dataclass
class Bounds:
    max_messages: int = 1_000_000
    max_bytes: int = 512 * 1024**2
    max_age: float = 7 * 86400.0
    when_full: str = "drop_oldest"


@dataclass
class Stats:
    messages: int = 0
    bytes: int = 0
    dropped: int = 0
    committed: int = 0
    write_errors: int = 0
    last_error: str | None = None
    # Per why ("full", "expired"): [first, last] ranges of seq dropped this episode.
    drop_episodes: dict[str, list[list[int]]] = field(default_factory=dict)


class Outbox:
    """The gateway's SQLite file. Owned by the event-loop thread: no call blocks for long."""

    def __init__(self, db: sqlite3.Connection, path: str, bounds: Bounds | None = None) -> None:
        """An outbox on an open connection; `Outbox.open` opens the file and reads where it stands."""
        self.path = path
        self.bounds = bounds or Bounds()
        self.stats = Stats()
        self.last_seq = 0
        self._db = db
        self._topics: dict[int, contract.Route] = {}
        self._topic_ids: dict[str, int] = {}
        self._pending: list[Message] = []
        self._pending_counters: dict[tuple[str, str], CounterRow] = {}
        self._pending_shifts: dict[str, str] = {}
        self._pending_states: dict[tuple[str, str], str | None] = {}  # None: forgotten (`forget_state`)
        self._acked: dict[int, int] = {}  # seq -> payload size
        # Rows handed to the broker and not yet acknowledged (`hold`/`release`): never dropped, since they
        # may well arrive.
        self._held: set[int] = set()
        self._acked_max = 0
        self._pending_dropped = 0
        self._meta_seq = -1  # last_seq as the meta table holds it
        self._mark_from: tuple[float, int] | None = None  # (when, last_seq) of the first seq_mark
        self._written_seq = 0  # the highest seq written by an earlier commit (or found at open)
        # Rung by the first message staged after a commit (see `commit_loop`); not per message.
        self.on_stage: Callable[[], None] | None = None
        # How long a message has waited is measured by this clock from the open on (see `_age_now`).
        self.clock: Callable[[], float] = time.monotonic
        self._opened = (time.time(), self.clock())
        self._last_drop: dict[str, float] = {}  # why -> when (by `clock`) the last message was dropped for it
        # Writes failing, as said in the log: None (they work), "failed" or "flapping" (see WRITES_SETTLE); since when
        # (by `clock`) they have worked, and how many failed since the state was last said.
        self._writes: str | None = None
        self._writes_ok_since: float | None = None
        self._writes_failed = 0
        self._writes_recovered: float | None = None  # when (by `clock`) writes were last said to work again
        # Room kept for the way out of a full disk (see `room`); `open` makes it beside the file.
        self._reserve: Reserve | None = None

    @classmethod
    def open(cls, path: str, *, bounds: Bounds | None = None, sync: str = "normal") -> Outbox:
        """Open (or create) the outbox file: seq, counts and drops as they were left. A damaged file (`corrupt`:
        found so anywhere while opening) is moved aside and a new one takes what can be read of it; StoreUnavailable
        when the file cannot be opened for another reason (a full disk, a lock): that file is kept."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            return cls._load(path, bounds, sync)
        except sqlite3.DatabaseError as err:
            if not corrupt(err):
                raise _unavailable(path, err) from err
            damage = err
        aside = f"{path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
        _move(path, aside)
        try:
            outbox = cls._load(path, bounds, sync)
            try:
                taken = outbox._take_in(aside)
            except BaseException:
                outbox._db.close()
                raise
        except sqlite3.Error as err:
            # The damaged file is put back, so that the next start reads it again rather than an empty new one.
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(path + suffix):
                    os.remove(path + suffix)
            _move(aside, path)
            raise _unavailable(path, err) from err
        log.error("outbox %s is unreadable (%s): moved aside to %s; a new one is started with %s", path, damage, aside,
                  taken, extra=fields(None, "state_unreadable"))
        return outbox

    @classmethod
    def _load(cls, path: str, bounds: Bounds | None, sync: str) -> Outbox:
        wal = wal_limit(path)
        db = _connect(path, sync, wal)
        try:
            outbox = cls(db, path, bounds)
            outbox._reserve = Reserve(f"{path}-reserve", 2 * wal)
            outbox._reserve.keep()
            outbox.stats.messages, outbox.stats.bytes = outbox._repair()
            outbox._reload_topics()
            outbox.last_seq = max(outbox._meta("last_seq"),
                                  db.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()[0])
            outbox._written_seq = outbox.last_seq
            outbox.stats.dropped = outbox._meta("dropped")
            # The small tables read whole once, so that damage in them is found here, not by a sample later.
            for table in ("meta", "topics", "counters", "shifts", "device_state"):
                db.execute(f"SELECT * FROM {table}").fetchall()
        except BaseException:
            db.close()
            raise
        return outbox

    def _take_in(self, aside: str) -> str:
        """Write what can be read of the damaged file `aside` into this (new) outbox; say what, and what was lost."""
        found = salvage.read(aside, COLUMNS)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for table, rows in found.rows.items():
                if rows:
                    marks = ", ".join("?" * len(COLUMNS[table]))
                    db.executemany(f"INSERT OR REPLACE INTO {table} ({', '.join(COLUMNS[table])}) VALUES ({marks})",
                                   rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.stats.messages, self.stats.bytes = self._repair()  # a message whose topic row was lost is a drop
        self._reload_topics()
        self.last_seq = self._written_seq = max(self._meta("last_seq"), db.execute(
            "SELECT coalesce(max(seq), 0) FROM outbox").fetchone()[0])
        self.stats.dropped = self._meta("dropped")
        if found.unreadable is not None or not any(found.rows.values()):
            return f"nothing of it: {found.unreadable or 'none of its rows can be read'}; what it held is lost"
        messages = found.rows.get("outbox", [])
        said = [f"{len(messages)} message(s)" + (f", seq {messages[0][0]} to {messages[-1][0]}" if messages else ""),
                f"{len(found.rows.get('counters', []))} counter(s)"]
        lost = []
        for table, (first, last) in found.lost.items():
            what = "seq" if table == "outbox" else f"{table} rows"
            lost.append(f"{what} {first} to {last}" if last is not None else f"{what} from {first} on")
        wal = " (its -wal is another database's: read without it, so its commits since the last checkpoint are " \
              "lost)" if found.without_wal else ""
        return f"what could be read of it{wal}: {', '.join(said)}" + (
            f"; unreadable, so lost: {'; '.join(lost)}" if lost else "; nothing else was lost")

    def _repair(self) -> tuple[int, int]:
        """Take out what the gateway never writes (a file damaged or edited by hand), which would fail the uplink at
        every start, a crash loop under systemd: messages whose topic is lost (no topic row, or one that is not
        text) cannot be delivered and are dropped (counted as drops); a creation time that is not a time from 1970 to
        9999 becomes now; a meta value that is not an integer is recounted. Said once, at the start. Returns the
        messages waiting and their payload bytes, counted in the same pass."""
        db, now = self._db, time.time()
        text_topics = "SELECT id FROM topics WHERE typeof(topic) = 'text'"
        untimed = "NOT (typeof(created) IN ('real', 'integer') AND created BETWEEN 0 AND ?)"
        lost_rows = f"topic_id NOT IN ({text_topics})"
        waiting = "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox"
        # One pass over the messages at every start, the count of what waits with it; more only when damaged.
        messages, size, n_lost, retimed = db.execute(
            f"SELECT count(*), coalesce(sum(length(payload)), 0), coalesce(sum({lost_rows}), 0), "
            f"coalesce(sum({untimed}), 0) FROM outbox", (LAST_INSTANT,)).fetchone()
        lost = (n_lost, *db.execute(f"SELECT min(seq), max(seq) FROM outbox WHERE {lost_rows}").fetchone()) \
            if n_lost else (0, None, None)
        # A count that is not an integer, or one no message can carry (last_seq 2**63 - 1 overflowed the next seq
        # at the first commit, every start: a crash loop), is counted again.
        bad_value = f"typeof(value) != 'integer' OR value NOT BETWEEN 0 AND {MAX_TOTAL}"
        (bad_meta,) = db.execute(f"SELECT count(*) FROM meta WHERE {bad_value}").fetchone()
        if not (lost[0] or retimed or bad_meta):
            return messages, size
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(f"DELETE FROM meta WHERE {bad_value}")
            # No seq is given twice: not the dropped messages' (they may have reached the upstream unacknowledged).
            db.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)",
                       (max(self._meta("last_seq"), db.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()[0]),))
            if lost[0]:
                db.execute(f"DELETE FROM outbox WHERE topic_id NOT IN ({text_topics})")
                db.execute("INSERT OR REPLACE INTO meta VALUES ('dropped', ?)", (self._meta("dropped") + lost[0],))
            db.execute("DELETE FROM topics WHERE typeof(topic) != 'text'")
            db.execute(f"UPDATE outbox SET created = ? WHERE {untimed}", (now, LAST_INSTANT))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        log.error("outbox %s held what the gateway never writes (a file damaged or edited by hand): %s", self.path,
                  "; ".join(part for part in (
                      f"{lost[0]} message(s) whose topic is lost, seq {lost[1]} to {lost[2]}: dropped, they cannot be "
                      f"delivered" if lost[0] else "",
                      f"{retimed} creation time(s) that are not a time: taken as now" if retimed else "",
                      f"{bad_meta} count(s) that are not a count: counted again" if bad_meta else "") if part),
                  extra=fields(None, "outbox_drop" if lost[0] else "state_unreadable"))
        messages, size = db.execute(waiting).fetchone()
        return messages, size

    # -- reading ---------------------------------------------------------------
    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else 0

    def counters(self, device: str | None = None) -> dict[tuple[str, str], CounterRow]:
        """Committed counter states (optionally of one device), by (device, name)."""
        query = "SELECT device, name, last_raw, total, shift_total, shift_id, updated FROM counters"
        rows = self._db.execute(query + (" WHERE device = ?" if device else ""), (device,) if device else ())
        out = {}
        for d, n, *rest in rows:
            out[(d, n)], damaged = counter_row(*rest)
            if damaged:
                log.warning("device %s: its saved counter %s is damaged (%s): %s", d, n, "; ".join(damaged),
                            "its lifetime or shift total starts again from 0" if any(
                                k.startswith(("total", "shift_total")) for k in damaged) else
                            "the next reading is a new baseline, nothing is added", extra=fields(d, "state_unreadable"))
        return out

    def fetch(self, after_seq: int, limit: int) -> list[Message]:
        """Committed, not yet acknowledged messages with seq > after_seq, oldest first."""
        # Rows acknowledged but not yet deleted lie behind the cursor, except right after a reconnect.
        skip = self._acked if self._acked and after_seq < self._acked_max else {}
        rows = self._db.execute("SELECT seq, topic_id, payload, created FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                                (after_seq, limit + len(skip)))
        topics = self._topics
        return [Message(seq, topics[tid], payload, created)
                for seq, tid, payload, created in rows if seq not in skip][:limit]

    def newest(self) -> list[Message]:
        """The newest committed, not yet deleted message of each topic (what a format's birth reports as current)."""
        rows = self._db.execute("SELECT seq, topic_id, payload, created FROM outbox WHERE seq IN "
                                "(SELECT max(seq) FROM outbox GROUP BY topic_id) ORDER BY seq")
        return [Message(seq, self._topics[tid], payload, created) for seq, tid, payload, created in rows]

    def oldest_age(self, now: float | None = None) -> float:
        row = self._db.execute("SELECT created FROM outbox ORDER BY seq LIMIT 1").fetchone()
        return max(0.0, (now or time.time()) - row[0]) if row else 0.0

    # -- staging (in memory until commit) -------------------------------------------------
    def stage(self, topic: str, payload: Mapping[str, Any], created: float | None = None) -> int:
        """Give `payload` the next seq and queue it for the next commit; return the seq."""
        self.last_seq += 1
        body = {"seq": self.last_seq, **payload}
        pending = self._pending
        pending.append(Message(self.last_seq, contract.Route.of(topic), contract.encode(body),
                               created or time.time(), body))
        if len(pending) == 1 and self.on_stage is not None:
            self.on_stage()
        elif len(pending) > PENDING_LIMIT:  # the disk has refused writes for a long time
            self._drop_pending()
        return self.last_seq

    def stage_counter(self, device: str, name: str, row: CounterRow) -> None:
        self._pending_counters[(device, name)] = row

    def stage_shift(self, device: str, record: Mapping[str, Any]) -> None:
        """The device's running shift record (time per state), written with the next commit."""
        self._pending_shifts[device] = json.dumps(record)

    def stage_state(self, device: str, kind: str, record: Mapping[str, Any]) -> None:
        """A device's state of one kind (its machine state, its active alarms), written with the next commit:
        in the transaction of the messages that report it, so a restart neither repeats nor loses one."""
        self._pending_states[(device, kind)] = json.dumps(record)

    def forget_state(self, device: str, kind: str) -> None:
        """No state of this kind kept for the device any more, from the next commit (a device taken out of the
        config, once what it left open has ended)."""
        self._pending_states[(device, kind)] = None

    def device_state(self, device: str, kind: str) -> Any:
        """What `stage_state` kept, decoded (check its shape: `restore`); None if nothing, or nothing readable."""
        row = self._db.execute("SELECT record FROM device_state WHERE device = ? AND kind = ?", (device, kind)).fetchone()
        return _decoded(row, device, f"{kind} state")

    def state_devices(self) -> set[str]:
        """The devices with a state kept (`stage_state`, committed)."""
        return {row[0] for row in self._db.execute("SELECT DISTINCT device FROM device_state")}

    def shift_record(self, device: str) -> Any:
        row = self._db.execute("SELECT record FROM shifts WHERE device = ?", (device,)).fetchone()
        return _decoded(row, device, "running shift")

    def hold(self, seq: int) -> None:
        """`seq` is in flight: the bounds must not drop it, it may well arrive."""
        self._held.add(seq)

    def release_all(self) -> None:
        """The connection is gone: nothing is in flight any more (it is owed again, oldest first)."""
        self._held.clear()

    @property
    def held(self) -> int:
        return len(self._held)

    def ack(self, seq: int, size: int) -> None:
        """The broker acknowledged `seq`: no longer in flight; delete it with the next commit."""
        self._held.discard(seq)
        self._acked[seq] = size
        self._acked_max = max(self._acked_max, seq)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def dirty(self) -> bool:
        """Whether the next commit has anything to write (messages, state, rows to delete)."""
        return bool(self._pending or self._pending_counters or self._pending_shifts or self._pending_states
                    or self._acked)

    def _drop_pending(self) -> None:
        if self.bounds.when_full == "drop_newest":
            victim = self._pending.pop()
        else:
            victim = self._pending.pop(0)
        self._count_drop(victim.seq, "full")
        self._pending_dropped += 1

    def _count_drop(self, seq: int, why: str) -> None:
        """Count `seq` as dropped because the outbox was full, or because it `expired` (older than max_age)."""
        ranges = self.stats.drop_episodes.setdefault(why, [])
        self._last_drop[why] = self.clock()
        if not ranges:
            if why == "expired":
                log.warning("outbox messages expired: older than max_age %s, dropping them, first seq dropped %d",
                            duration_text(self.bounds.max_age), seq, extra=fields(event="outbox_drop", seq=seq))
            else:
                log.warning("outbox full: dropping messages (when_full: %s), first seq dropped %d",
                            self.bounds.when_full, seq, extra=fields(event="outbox_drop", seq=seq))
        if ranges and ranges[-1][1] + 1 == seq:
            ranges[-1][1] = seq
        else:
            ranges.append([seq, seq])

    def _end_drop_episode(self, why: str, *, now: bool = False) -> None:
        """Say the episode of `why` is over, once nothing has been dropped for it for DROP_QUIET (or `now`)."""
        if why not in self.stats.drop_episodes or (
                not now and self.clock() - self._last_drop.get(why, 0.0) < DROP_QUIET):
            return
        ranges = self.stats.drop_episodes.pop(why)
        if ranges:
            count = sum(last - first + 1 for first, last in ranges)
            shown = ", ".join(f"{a}..{b}" if a != b else str(a) for a, b in ranges[:5])
            more = f" and {len(ranges) - 5} more ranges" if len(ranges) > 5 else ""
            what = f"expiry (max_age {duration_text(self.bounds.max_age)})" if why == "expired" else "drop episode"
            log.warning("outbox %s over: dropped seq %s%s (%d messages; %d dropped since the outbox "
                        "was created)", what, shown, more, count, self.stats.dropped,
                        extra=fields(event="outbox_drop_over", seq=ranges[0][0]))

    def _age_now(self, now: float) -> float:
        """The time a message's age is measured against: `now`, but no later than the open plus the time passed since
        by the monotonic clock. A wall clock stepped forward (a box without a battery-backed clock set right by
        NTP, days at once) would otherwise expire messages that waited seconds."""
        opened, since = self._opened
        return min(now, opened + (self.clock() - since))

    # -- the one transaction -------------------------------------------------------------
    def seq_mark(self, every: float) -> dict[str, int]:
        """For the state file, written every `every` seconds: the last seq committed (only those can have been
        sent), and a floor above any this process could commit before the next write (ten times its rate since
        the start, at least 1,000)."""
        now, last = time.monotonic(), self._written_seq
        if self._mark_from is None:
            self._mark_from = (now, last)
        since, first = self._mark_from
        rate = (last - first) / max(now - since, 1.0)
        return {"last": last, "floor": last + max(1000, math.ceil(10 * rate * every))}

    def keep_above(self, mark: dict[str, int] | None) -> None:
        """At the start: an outbox behind the state file's last seq lost its last commits (a power loss with
        `sync: normal`, a WAL deleted, a file moved aside); those seqs may have reached the upstream, which drops
        a seq it has seen (de-duplication on gateway id and seq). Numbering goes on above the floor, said once."""
        if mark is None or self.last_seq >= mark["last"]:
            return
        log.error("outbox %s: its last seq is %d, but the gateway had given seq %d: its last commits were lost "
                  "(a power loss with sync: normal, a file deleted or moved aside). Numbering goes on from %d, so "
                  "that no seq is given twice; the seqs between are lost", self.path, self.last_seq, mark["last"],
                  mark["floor"] + 1, extra=fields(None, "state_unreadable"))
        self.last_seq = max(mark["floor"], mark["last"])

    def _release_wal(self) -> None:
        """After a failed write (a full disk): move what the WAL holds into the database and cut the WAL to
        nothing, so that the space it took is there for the next commit. Fails quietly when it cannot."""
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error:
            pass

    def commit(self, now: float | None = None) -> bool:
        """Write staged messages and counters, delete acknowledged rows, enforce the bounds.

        Returns False, keeping what could not be written staged, when the disk refuses the write.
        """
        if not self.dirty:
            self._writes_work(0)
            if self.stats.drop_episodes and not self._pending_dropped:
                self._end_drop_episode("expired")
                if self.stats.messages < self.bounds.max_messages and self.stats.bytes < self.bounds.max_bytes:
                    self._end_drop_episode("full")
            return True
        now = now or time.time()
        staged = len(self._pending)
        try:
            self._write(self._pending, now, last=True)
        except sqlite3.Error as err:
            self._reload_topics()  # ids cached during the rolled-back transaction were never written
            self.stats.write_errors += 1
            self._writes_fail(err)
            self.stats.last_error = str(err)
            if not (_full(err) and self._write_in_room(now)):
                self._release_wal()
                return False
        self.stats.last_error = None
        self._writes_work(staged)
        if self._reserve is not None:
            self._reserve.keep()
        return True

    def _write(self, batch: list[Message], now: float, *, last: bool) -> None:
        """One transaction: the acknowledged deletes, `batch` (the oldest staged messages), with `last` the staged
        state too, and the bounds. Raises sqlite3.Error, having written nothing."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            messages, size = self.stats.messages, self.stats.bytes
            gone, gone_bytes = self._delete_acked(db)
            messages, size = messages - gone, size - gone_bytes
            admitted, refused = self._admit(batch, messages, size)
            self._insert(db, admitted, now)
            messages += len(admitted)
            size += sum(m.size for m in admitted)
            # One statement per kind, none for what has nothing staged: a group commit often holds one message.
            if last and self._pending_counters:
                db.executemany("INSERT OR REPLACE INTO counters VALUES (?, ?, ?, ?, ?, ?, ?)",
                               [(device, name, row.last_raw, row.total, row.shift_total, row.shift_id, row.updated)
                                for (device, name), row in self._pending_counters.items()])
            if last and self._pending_shifts:
                db.executemany("INSERT OR REPLACE INTO shifts VALUES (?, ?)", self._pending_shifts.items())
            if last and self._pending_states:
                db.executemany("INSERT OR REPLACE INTO device_state VALUES (?, ?, ?)",
                               ((d, k, r) for (d, k), r in self._pending_states.items() if r is not None))
                db.executemany("DELETE FROM device_state WHERE device = ? AND kind = ?",
                               (dk for dk, r in self._pending_states.items() if r is None))
            expired, over = self._trim(db, self._age_now(now), messages, size)
            dropped = [(m.seq, m.size) for m in refused] + expired + over
            messages -= len(dropped) - len(refused)
            size -= sum(b for _, b in dropped) - sum(m.size for m in refused)
            dropped_total = self.stats.dropped + self._pending_dropped + len(dropped)
            if self.last_seq != self._meta_seq:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (self.last_seq,))
            if dropped_total != self.stats.dropped:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('dropped', ?)", (dropped_total,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._meta_seq = self.last_seq
        self._written_seq = self.last_seq if last else max(self._written_seq, batch[-1].seq if batch else 0)
        self.stats.committed += len(admitted)
        self.stats.messages, self.stats.bytes, self.stats.dropped = messages, size, dropped_total
        for seq, _ in sorted(expired):
            self._count_drop(seq, "expired")
        for seq, _ in sorted([(m.seq, m.size) for m in refused] + over):
            self._count_drop(seq, "full")
        if not expired:
            self._end_drop_episode("expired")
        # Over once a commit drops nothing and leaves room: with small group commits, one that just fits
        # while the outbox is still full is not the end of the episode (the next message would be dropped).
        if not refused and not over and not self._pending_dropped and messages < self.bounds.max_messages \
                and size < self.bounds.max_bytes:
            self._end_drop_episode("full")
        self._pending_dropped = 0
        del self._pending[:len(batch)]
        self._acked.clear()
        if last:
            self._pending_counters.clear()
            self._pending_shifts.clear()
            self._pending_states.clear()

    def _write_in_room(self, now: float) -> bool:
        """After a write that failed for a full disk, with acknowledged rows to delete: write what is staged in the
        room they free; True once it all is.

        The reserve is given up so that the deletes alone fit into the WAL; a checkpoint then moves the WAL into the
        pages they freed and cuts it to nothing. The staged messages go in slices of a quarter of the reserve, each
        moved out of the WAL before the next, since one transaction of them all may not fit. The counters and
        states go with the last slice: a crash between slices leaves messages without the state they report (a
        state change said again after the restart), never a count without its message. With nothing acknowledged
        the reserve is kept for when the broker is back, and the staged messages wait in memory as before."""
        reserve = self._reserve
        free = free_bytes(self.path)
        # A disk with room is not full: the file was kept from growing (max_page_count), nothing to give up.
        if reserve is None or not self._acked or free is None \
                or free >= reserve.size + 2 * sum(m.size for m in self._pending):
            return False
        reserve.release()
        room = reserve.size // 4
        # The deletes go in slices too: each page a delete touches is a page in the WAL, and acknowledged rows
        # filling the disk fill a WAL as large.
        acked, self._acked = self._acked, {}
        while acked:
            nbytes = 0
            for seq, size in acked.items():
                if self._acked and nbytes + size > room:
                    break
                self._acked[seq] = size
                nbytes += size
            for seq in self._acked:
                del acked[seq]
            try:
                self._write([], now, last=False)
            except sqlite3.Error:
                self._acked.update(acked)
                return False
            self._release_wal()
        while True:
            batch: list[Message] = []
            nbytes = 0
            for msg in self._pending:
                if batch and nbytes + msg.size > room:
                    break
                batch.append(msg)
                nbytes += msg.size
            try:
                self._write(batch, now, last=len(batch) == len(self._pending))
            except sqlite3.Error:
                self._reload_topics()
                return False
            self._release_wal()
            if not self.dirty:
                return True

    def _writes_fail(self, err: sqlite3.Error) -> None:
        recovered = self._writes_recovered
        self._writes_ok_since = None
        self._writes_failed += 1
        if self._writes is None and recovered is not None and self.clock() - recovered < WRITES_SETTLE:
            self._writes = "flapping"
            log.error("outbox writes fail again (%s): %d messages kept in memory, retrying; failures and recoveries "
                      "are not logged until writes have worked for %.0fs", err, len(self._pending), WRITES_SETTLE)
        elif self._writes is None:
            self._writes = "failed"
            log.error("outbox write failed (%s): %d messages kept in memory, retrying", err, len(self._pending))

    def _writes_work(self, written: int) -> None:
        now = self.clock()
        if self._writes_ok_since is None:
            self._writes_ok_since = now
        if self._writes == "failed":  # the first recovery is said at once
            self._writes_recovered = now
            log.warning("outbox writes work again (%d messages kept in memory now written)", written)
        elif self._writes == "flapping" and now - self._writes_ok_since >= WRITES_SETTLE:
            log.warning("outbox writes work again, for %.0fs now (%d failed writes in all since they were said to "
                        "fail)", WRITES_SETTLE, self._writes_failed)
        else:
            return
        self._writes, self._writes_failed = None, 0

    def _reload_topics(self) -> None:
        try:
            self._topics = {tid: contract.Route.of(topic) for tid, topic in self._db.execute("SELECT id, topic FROM topics")}
        except sqlite3.Error:
            return
        self._topic_ids = {topic: tid for tid, topic in self._topics.items()}

    def _delete_acked(self, db: sqlite3.Connection) -> tuple[int, int]:
        if not self._acked:
            return 0, 0
        # An acknowledged row may be gone already (dropped while in flight): RETURNING counts what was there.
        rows = db.execute("DELETE FROM outbox WHERE seq IN (SELECT value FROM json_each(?)) "
                          "RETURNING length(payload)", (json.dumps(list(self._acked)),)).fetchall()
        return len(rows), sum(r[0] for r in rows)

    def _admit(self, batch: list[Message], messages: int, size: int) -> tuple[list[Message], list[Message]]:
        """With drop_newest, the messages of `batch` that do not fit are refused before insert."""
        if self.bounds.when_full != "drop_newest":
            return batch, []
        room, room_bytes = self.bounds.max_messages - messages, self.bounds.max_bytes - size
        for i, msg in enumerate(batch):
            room, room_bytes = room - 1, room_bytes - msg.size
            if room < 0 or room_bytes < 0:
                return batch[:i], batch[i:]
        return batch, []

    def _insert(self, db: sqlite3.Connection, messages: list[Message], now: float) -> None:
        rows = []
        for msg in messages:
            tid = self._topic_ids.get(msg.topic)
            if tid is None:
                db.execute("INSERT OR IGNORE INTO topics (topic) VALUES (?)", (msg.topic,))
                tid = db.execute("SELECT id FROM topics WHERE topic = ?", (msg.topic,)).fetchone()[0]
                self._topic_ids[msg.topic], self._topics[tid] = tid, msg.topic
            rows.append((msg.seq, tid, msg.created, msg.payload))
        db.executemany("INSERT INTO outbox VALUES (?, ?, ?, ?)", rows)

    def _trim(self, db: sqlite3.Connection, now: float, messages: int, size: int
              ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Delete expired rows, and with drop_oldest the oldest rows over the limits; return the (seq, size) of
        each, expired and over."""
        dropped: list[tuple[int, int]] = []
        inflight = json.dumps(sorted(self._held))
        oldest = db.execute("SELECT created FROM outbox ORDER BY seq LIMIT 1").fetchone()
        if oldest and oldest[0] < now - self.bounds.max_age:  # rows are in time order: expire from the front
            # Only rows of earlier commits: a message that arrives already older than max_age (a sensor's own
            # old timestamp) gets its one chance to be published rather than being dropped as it is written.
            dropped = db.execute("DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT 10000) "
                                 "AND created < ? AND seq <= ? AND seq NOT IN (SELECT value FROM json_each(?)) "
                                 "RETURNING seq, length(payload)",
                                 (now - self.bounds.max_age, self._written_seq, inflight)).fetchall()
        messages -= len(dropped)
        size -= sum(b for _, b in dropped)
        over, over_bytes = messages - self.bounds.max_messages, size - self.bounds.max_bytes
        if self.bounds.when_full == "drop_oldest" and (over > 0 or over_bytes > 0):
            victims = []
            cursor = db.execute("SELECT seq, length(payload) FROM outbox ORDER BY seq")
            for seq, nbytes in cursor:
                if over <= 0 and over_bytes <= 0:
                    break
                if seq in self._held:
                    continue
                over, over_bytes = over - 1, over_bytes - nbytes
                victims.append(seq)
            cursor.close()
            if victims:
                return dropped, db.execute("DELETE FROM outbox WHERE seq IN (SELECT value FROM json_each(?)) "
                                           "RETURNING seq, length(payload)", (json.dumps(victims),)).fetchall()
        return dropped, []

    def close(self) -> None:
        self.commit()
        for why in list(self.stats.drop_episodes):  # what was dropped is said before the process ends
            self._end_drop_episode(why, now=True)
        self._db.close()
        if self._reserve is not None:
            self._reserve.release()


async def commit_loop(outbox: Outbox, on_commit: Callable[[int], None], *, interval: float = 0.1,
                      max_rate: float = 0.0, group: bool = True) -> None:
    """Commit `outbox` until cancelled; after each commit, `on_commit(n)` with n the messages it wrote.

    Group commit: the first message staged after a commit wakes the loop, which commits at once
    (one turn of the event loop later), so an idle gateway writes a message within a millisecond
    and a busy one batches whatever was staged meanwhile. How soon the next commit may start
    follows from what the last one cost (see BUSY_SHARE); `max_rate` > 0 also keeps them at least
    1/max_rate apart (flash wear: a message then waits up to that long). State without a message
    (counter rows, acknowledged rows to delete) and a failed write wait at most `interval`.
    `group=False` is the previous cadence: one commit every `interval`, whatever is staged.
    """
    loop = asyncio.get_running_loop()
    min_gap = 1.0 / max_rate if max_rate > 0 else 0.0
    next_start, last_end, last_cpu, busy, took = 0.0, loop.time(), time.process_time(), 0.0, 0.0
    bell: asyncio.Future[None] | None = None

    def ring() -> None:
        if bell is not None and not bell.done():
            bell.set_result(None)
    if group:
        outbox.on_stage = ring
    try:
        while True:
            if not group or not outbox.pending:
                bell = loop.create_future()
                timer = loop.call_later(interval, ring)
                try:
                    await bell
                finally:
                    timer.cancel()
                    bell = None
            if group and (wait := next_start - loop.time()) > 0:
                await asyncio.sleep(wait)
            start = loop.time()
            before = outbox.stats.committed
            ok = outbox.commit()
            end, cpu = loop.time(), time.process_time()
            # The process's CPU share (smoothed over BUSY_WINDOW): near a whole core, the loop is saturated
            # and a sample waits in line anyway; then commits spread out, so that their cost is shared by more.
            weight = min(1.0, (end - last_end) / BUSY_WINDOW)
            busy = min(1.0, busy + weight * ((cpu - last_cpu) / max(end - last_end, 1e-6) - busy))
            saturation = max(0.0, (busy - CALM) / (1 - CALM))  # 0 up to CALM of a core, 1 at a whole core
            # What commits take, smoothed: a WAL checkpoint now and then must not hold back the next ones.
            took += 0.1 * (end - start - took)
            next_start = max(start + min_gap, end + took * (1 / BUSY_SHARE - 1), end + saturation * interval)
            last_end, last_cpu = end, cpu
            if ok:
                on_commit(outbox.stats.committed - before)
            else:  # the disk refuses writes: everything stays staged; try again after `interval`
                await asyncio.sleep(interval)
    finally:
        if outbox.on_stage is ring:
            outbox.on_stage = None


def _decoded(row: tuple[Any, ...] | None, device: str, what: str) -> Any:
    """A kept record's JSON, or None when it is not JSON (a file damaged or edited by hand): that state starts
    afresh, and the log says so."""
    if row is None:
        return None
    try:
        return json.loads(row[0])
    except (TypeError, ValueError, RecursionError) as err:  # RecursionError: nested thousands deep
        log.warning("device %s: its saved %s cannot be read (%s): it starts afresh", device, what,
                    type(err).__name__, extra=fields(device, "state_unreadable"))
        return None


Record = TypeVar("Record")


def restore(cls: type[Record], record: object, device: str | None = None, what: str = "state") -> Record | None:
    """A dataclass from a record this outbox kept (`device_state`, `shift_record`): its known fields only, since
    a later version may have written more (a rollback) and an earlier one fewer (they take their defaults).
    None when there is none, or it cannot be one: each field must be of its declared type, a number finite and
    within what a message can carry (`_fits`), and the class's own `damage()` must find nothing. A damaged record
    (a file damaged or edited by hand) would fail every sample that reads it: the caller starts afresh, and the
    log says so."""
    if record is None or not dataclasses.is_dataclass(cls):
        return None
    problem: str | None
    if not isinstance(record, dict):
        problem = f"a {type(record).__name__}, not an object"
    else:
        hints = _hints(cls)
        values = {f.name: record[f.name] for f in dataclasses.fields(cls) if f.name in record}
        problem = next((f"{k}: {json.dumps(v)[:40]}" for k, v in values.items() if not _fits(v, hints[k])), None)
        if problem is None:
            try:
                restored = cls(**values)
            except TypeError:  # a field it needs is missing
                problem = "fields missing: " + ", ".join(f.name for f in dataclasses.fields(cls) if f.name not in values)
            else:
                damage = getattr(restored, "damage", None)
                if (problem := damage() if damage is not None else None) is None:
                    return restored
    log.warning("%sits saved %s is damaged (%s): it starts afresh", f"device {device}: " if device else "", what,
                problem, extra=fields(device, "state_unreadable"))
    return None


def counter_row(last_raw: Any, total: Any, shift_total: Any, shift_id: Any, updated: Any
                 ) -> tuple[CounterRow, list[str]]:
    """A counter's kept state (a row of `counters`), each field that is not what this outbox writes (a file damaged
    or edited by hand: text, a blob, a count beyond `MAX_TOTAL`) taken afresh, and which they were."""
    damaged = []

    def count(field: str, value: Any, default: Any) -> Any:
        if value is default or total_of(value) is not None:
            return value
        damaged.append(f"{field}: {value!r:.40}")
        return default

    when = instant(updated)
    row = CounterRow(count("last_raw", last_raw, None), count("total", total, 0),
                     count("shift_total", shift_total, 0), shift_id if isinstance(shift_id, str) else None,
                     when or 0.0)
    if shift_id is not None and row.shift_id is None:
        damaged.append(f"shift_id: {shift_id!r:.40}")
    if when is None:
        damaged.append(f"updated: {updated!r:.40}")
    return row, damaged


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _fits(value: object, hint: Any) -> bool:
    """`value` read back from JSON is of the declared type: a float is a finite number from 0 to the end of 9999 (the
    records' times and durations, as `rfc3339` writes them), an int one from 0 to `MAX_TOTAL` (2^53 - 1)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool or hint is str:
        return isinstance(value, hint)
    if hint is int:
        return total_of(value) is not None
    if hint is float:
        return instant(value) is not None
    return True


class StoreUnavailable(sqlite3.OperationalError):
    """The outbox file cannot be opened now (a full disk, an I/O error, a lock another process holds, no right to
    write it), though nothing says that it is damaged: it is left where it is, with its backlog, for a later start."""


def _unavailable(path: str, err: sqlite3.Error) -> StoreUnavailable:
    """`err` at open, said with its cause: the result code, and the space left where a full disk may be why."""
    name = getattr(err, "sqlite_errorname", None)
    code = (getattr(err, "sqlite_errorcode", None) or 0) & 0xFF
    why = [name] if name else []
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    if code == 13 or (code == 10 and free is not None and free < 64 * 1024):  # SQLITE_FULL; SQLITE_IOERR
        why.append(f"the disk is full: {free} bytes free" if free is not None else "the disk is full")
    elif code in (5, 6):  # SQLITE_BUSY, SQLITE_LOCKED
        why.append("another process holds a lock on it, such as an sqlite3 shell or a backup")
    elif code == 8:  # SQLITE_READONLY
        why.append("it may not be written (a read-only file or file system)")
    cause = f" ({'; '.join(why)})" if why else ""
    return StoreUnavailable(f"{path}: {err}{cause}; the file is left as it is, with what it holds")


def _full(err: sqlite3.Error) -> bool:
    """Whether `err` is SQLite's "database or disk is full" (SQLITE_FULL)."""
    return (getattr(err, "sqlite_errorcode", 0) or 0) & 0xFF == 13


def _move(path: str, to: str) -> None:
    """Move the file `path` and its -wal and -shm to `to` (and its suffixes)."""
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, to + suffix)


def _connect(path: str, sync: str, wal: int = WAL_LIMIT) -> sqlite3.Connection:
    if os.path.exists(path):
        # Its tables are checked read-only first: a connection that may write moves the WAL into the file when it
        # closes, and another database's WAL would then be in the outbox's file for good.
        ro = sqlite3.connect(salvage.uri(path, "mode=ro"), uri=True)
        try:
            salvage.check(ro, COLUMNS)
        finally:
            ro.close()
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        # A WAL grown while the broker was away keeps its size when it is reset, unless this says otherwise: on a
        # small disk it held the space the next commits needed, and they failed again once space came back.
        # And checkpointed at a quarter of SQLite's default, less on a small partition (`room.wal_limit`): on a disk
        # of a few MB the WAL filled it before its first checkpoint, the database file never grew, and nothing could
        # be moved out of the WAL any more.
        db.execute(f"PRAGMA journal_size_limit = {wal}")
        db.execute(f"PRAGMA wal_autocheckpoint = {wal // 4096}")
        db.execute(f"PRAGMA synchronous = {'FULL' if sync == 'full' else 'NORMAL'}")
        db.executescript(SCHEMA)
        db.execute("SELECT count(*) FROM outbox").fetchone()
    except BaseException:
        db.close()
        raise
    return db


def held(data_dir: str) -> bool | None:
    """Whether a gateway holds the data_dir lock now (None: the lock file cannot be opened to tell)."""
    import fcntl

    try:
        fh = open(datadir.path(data_dir, datadir.LOCK))  # read-only: any user who may read the state
    except FileNotFoundError:
        return False
    except OSError:
        return None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return None
        return False


def lock(data_dir: str) -> IO[str] | None:
    """Hold the data_dir lock for as long as the returned file stays open; None if another holds it."""
    import fcntl

    os.makedirs(data_dir, exist_ok=True)
    fh = open(datadir.path(data_dir, datadir.LOCK), "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh
