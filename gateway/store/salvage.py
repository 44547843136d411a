"""What can still be read of a damaged outbox file, for the new one that takes its place.

SQLite finds a file damaged (SQLITE_CORRUPT, SQLITE_NOTADB) or its tables are not the outbox's (a `-wal` of
another database applied over it): the file is moved aside and a new one started, so that the gateway runs and
collects rather than failing every start. This module reads, table by table and in rowid order, every row it
can: forward from the start until a page cannot be read, then backward from the end until one cannot; the
rowids between are lost, and said. When the file with its `-wal` is not the outbox's, the file alone (its last
checkpoint, `immutable=1` so that SQLite ignores the `-wal`) is read instead.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

# What SQLite says of a file that is not a database or whose pages make no sense (primary result codes): only
# these move a file aside. The texts are for a Python without `sqlite_errorcode` (before 3.11).
CORRUPT_CODES = (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB
CORRUPT_TEXTS = ("database disk image is malformed", "file is not a database", "file is encrypted or is not a database")


class NotAnOutbox(sqlite3.DatabaseError):
    """A table of the outbox's name without the outbox's columns: another database's, or its `-wal` applied."""


def corrupt(err: sqlite3.Error) -> bool:
    """Whether `err` says that the file is damaged, rather than that it cannot be read or written now."""
    if isinstance(err, NotAnOutbox):
        return True
    code = getattr(err, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in CORRUPT_CODES
    return any(text in str(err) for text in CORRUPT_TEXTS)


def uri(path: str, query: str) -> str:
    """The URI SQLite opens `path` by with `query` (a name with '?' or '#' in it is quoted)."""
    return f"file:{urllib.parse.quote(os.path.abspath(path))}?{query}"


def check(db: sqlite3.Connection, columns: dict[str, list[str]]) -> None:
    """Raise NotAnOutbox when a table of the outbox's lacks a column the outbox writes (a later version's extra
    columns are fine)."""
    for table, wanted in columns.items():
        found = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if found and not set(wanted) <= found:
            raise NotAnOutbox(f"its table {table} is not the outbox's (columns {', '.join(sorted(found))})")


@dataclass
class Salvage:
    """The rows read of each table (without their rowid), and per table the rowids that could not be read."""

    rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    lost: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # first, last (None: to the end)
    without_wal: bool = False  # read from the file alone: its `-wal` was another database's
    unreadable: str | None = None  # why nothing at all could be read


def read(path: str, columns: dict[str, list[str]]) -> Salvage:
    """What can be read of the outbox file at `path` (moved aside), read-only."""
    found = _read(uri(path, "mode=ro"), columns)
    if found.unreadable is not None and found.unreadable.startswith("its table"):
        alone = _read(uri(path, "mode=ro&immutable=1"), columns)
        if alone.unreadable is None:
            alone.without_wal = True
            return alone
    return found


def _read(uri: str, columns: dict[str, list[str]]) -> Salvage:
    found = Salvage()
    try:
        src = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as err:
        found.unreadable = str(err)
        return found
    try:
        check(src, columns)
    except NotAnOutbox as err:
        found.unreadable = str(err)
        src.close()
        return found
    except sqlite3.Error:
        pass  # each table on its own, below
    try:
        for table, cols in columns.items():
            try:
                if not src.execute(f"PRAGMA table_info({table})").fetchall():
                    continue
            except sqlite3.Error:  # where the table lies cannot be read: all of it is lost
                found.lost[table] = (0, None)
                continue
            found.rows[table], gap = _rows(src, table, cols)
            if gap is not None:
                found.lost[table] = gap
    finally:
        src.close()
    return found


def _rows(src: sqlite3.Connection, table: str, cols: list[str]
          ) -> tuple[list[tuple[Any, ...]], tuple[int, int | None] | None]:
    """A table's readable rows in rowid order, and the rowids between the last read forward and the first read
    backward (None when every row was read)."""
    query = f"SELECT rowid, {', '.join(cols)} FROM {table}"
    head: list[tuple[Any, ...]] = []
    try:
        for row in src.execute(query + " ORDER BY rowid"):
            head.append(row)
        return [row[1:] for row in head], None
    except sqlite3.DatabaseError:
        pass
    after = int(head[-1][0]) if head else -(2**63)
    tail: list[tuple[Any, ...]] = []
    try:
        for row in src.execute(query + " WHERE rowid > ? ORDER BY rowid DESC", (after,)):
            tail.append(row)
    except sqlite3.DatabaseError:
        pass
    before = int(tail[-1][0]) - 1 if tail else None
    return [row[1:] for row in head + tail[::-1]], (max(after + 1, 0), before)
