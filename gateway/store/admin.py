"""Offline tools on the outbox file, for `edge-gateway outbox` and `edge-gateway counters`.

The daemon need not run (and must not, for what writes: the data_dir lock says whether it does).
Readers open the file read-only.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from typing import IO, Any

from gateway.counters import total_of
from gateway.units import LAST_INSTANT, instant


def reader(path: str) -> sqlite3.Connection:
    """The outbox, read-only; FileNotFoundError when there is none (opening reads nothing yet)."""
    try:
        os.stat(path)  # (os.path.exists is False also for a file the user may not see: that is said as such)
    except FileNotFoundError:
        raise FileNotFoundError(f"no outbox at {path}") from None
    if not os.access(path, os.R_OK):
        raise PermissionError(13, "Permission denied", path)
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def inspect(path: str) -> dict[str, Any]:
    """What is waiting in the outbox: counts, bytes, seq range, age, per topic."""
    db = reader(path)
    try:
        # What the gateway never writes (a file damaged or edited by hand) is not counted as what it means: a
        # creation time that is not a time, a count that is not a number (the gateway repairs both when it opens).
        count, size, first, last, oldest = db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0), min(seq), max(seq), min(CASE WHEN typeof(created) IN "
            "('real', 'integer') AND created BETWEEN 0 AND ? THEN created END) FROM outbox", (LAST_INSTANT,)
        ).fetchone()
        meta = {k: v for k, v in db.execute("SELECT key, value FROM meta") if total_of(v) is not None}
        per_topic = db.execute("SELECT topic, count(*) FROM outbox JOIN topics ON topics.id = topic_id "
                               "GROUP BY topic ORDER BY count(*) DESC").fetchall()
    finally:
        db.close()
    on_disk = sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s))
    return {"messages": count, "payload_bytes": size, "file_bytes": on_disk, "first_seq": first, "last_seq": last,
            "oldest_age_s": round(time.time() - oldest, 1) if oldest else None, "next_seq": meta.get("last_seq", 0) + 1,
            "dropped": meta.get("dropped", 0), "purged": meta.get("purged", 0),
            "topics": {_text(t): n for t, n in per_topic}}


def export(path: str, out: IO[str]) -> tuple[int, int]:
    """Write every waiting message as one JSON line (seq, topic, created, payload); return how many, and how many of
    them the gateway never wrote (a file damaged or edited by hand): a payload that is not JSON is given as text in
    `damaged_payload` (bytes that are not UTF-8 replaced), a creation time that is not a time as null."""
    db = reader(path)
    n = damaged = 0
    try:
        rows = db.execute("SELECT seq, topic, created, payload FROM outbox JOIN topics ON topics.id = topic_id "
                          "ORDER BY seq")
        for seq, topic, created, payload in rows:
            record = {"seq": seq, "topic": _text(topic), "created": instant(created)}
            try:
                record["payload"] = json.loads(payload)
            except (ValueError, TypeError, RecursionError):
                record["damaged_payload"] = _text(payload)
            damaged += record["created"] is None or "damaged_payload" in record or record["topic"] != topic
            out.write(json.dumps(record, separators=(",", ":")) + "\n")
            n += 1
    finally:
        db.close()
    return n, damaged


def purge(path: str) -> int:
    """Delete every waiting message (seq keeps counting on); return how many. The daemon must be stopped."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        n = db.execute("DELETE FROM outbox").rowcount
        db.execute("INSERT INTO meta VALUES ('purged', ?) ON CONFLICT(key) DO UPDATE SET value = value + ?", (n, n))
        db.execute("COMMIT")
    finally:
        db.close()
    return n


def _read_all(path: str, query: str) -> list[tuple[Any, ...]]:
    db = reader(path)
    try:
        return db.execute(query).fetchall()
    finally:
        db.close()


def counter_rows(path: str) -> tuple[list[tuple[Any, ...]], list[str]]:
    """(device, name, total, shift_total, shift_id, last_raw, updated) of every counter, read-only, as the gateway
    takes them up (`outbox.counter_row`), and what was damaged: `device/name is damaged (field: value; ...)`."""
    from gateway.store.outbox import counter_row

    rows, damaged = [], []
    for device, name, total, shift_total, shift_id, last_raw, updated in _read_all(
            path, "SELECT device, name, total, shift_total, shift_id, last_raw, updated FROM counters "
                  "ORDER BY device, name"):
        row, bad = counter_row(last_raw, total, shift_total, shift_id, updated)
        rows.append((str(device), str(name), row.total, row.shift_total, row.shift_id, row.last_raw, row.updated))
        damaged += [f"{device}/{name} is damaged ({'; '.join(bad)})"] if bad else []
    return rows, damaged


def set_counter(path: str, device: str, name: str, total: int, reason: str, user: str) -> int | None:
    """Set a counter's lifetime total (a new baseline, e.g. after a PLC swap) and record it in the audit
    table; the next raw value read is taken as the new baseline. Returns the old total (None if new)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        row = db.execute("SELECT total FROM counters WHERE device = ? AND name = ?", (device, name)).fetchone()
        old = row[0] if row else None
        db.execute("INSERT INTO counters VALUES (?, ?, NULL, ?, 0, NULL, ?) ON CONFLICT(device, name) DO UPDATE "
                   "SET total = excluded.total, last_raw = NULL, updated = excluded.updated",
                   (device, name, total, time.time()))
        db.execute("INSERT INTO counter_audit (at, device, name, old_total, new_total, reason, by_user) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)", (time.time(), device, name, old, total, reason, user))
        db.execute("COMMIT")
    finally:
        db.close()
    return old


def counter_audit(path: str) -> tuple[list[tuple[Any, ...]], list[str]]:
    """(at, device, name, old_total, new_total, reason, by_user) of every baseline set, in order, read-only; a field
    that `set_counter` never writes (a file damaged or edited by hand) as None (a time, a count) or as text, and which
    entries had one: `entry N is damaged`."""
    rows, damaged = [], []
    for n, row in enumerate(_read_all(path, "SELECT at, device, name, old_total, new_total, reason, by_user FROM "
                                            "counter_audit ORDER BY id"), 1):
        at, device, name, old, new, reason, user = row
        fixed = (instant(at), _text(device), _text(name), total_of(old), total_of(new), _text(reason), _text(user))
        if fixed != tuple(row):
            damaged.append(f"entry {n} is damaged")
        rows.append(fixed)
    return rows, damaged


def _text(value: Any) -> str:
    return value if isinstance(value, str) else (
        value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value))
