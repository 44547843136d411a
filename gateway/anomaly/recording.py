"""Recordings of a machine's tags: read from CSV, put on a regular time grid, written back out.

What `model train` and `model score` read, and what `history export` writes: a time column
and one column per tag. Reading is forgiving in the ways plant exports differ and strict where a
wrong guess would corrupt a model:

- the delimiter is `,`, `;` or a tab (the one the header holds most of); with `;` or a tab, a decimal
  comma is accepted. The text is UTF-8, UTF-16 with its byte-order mark (a spreadsheet's "Unicode
  text"), else read as Latin-1. A row is one line: a cell that opens a quote closes it on that line;
- the time column is the one named, else the first whose name says time (`time`, `timestamp`,
  `datetime`, `date`, `ts`), else the first whose cells read as times. A time is RFC 3339 /
  ISO 8601 (no zone = UTC) or, in a column so named, epoch seconds (milliseconds when > 1e11), from the
  year 1 to 9999 UTC;
- every numeric column is a tag unless `tags` names them; a cell that is empty or not a number
  is a missing value; a column that holds no number at all is left out and said so;
- rows are put in time order; a time given twice keeps its last row (a replay keeps every row as given).

Any problem is a `DataError` naming the file, and where it helps, the line and column.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
import re
import stat
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

import numpy as np

from gateway.errors import GatewayError
from gateway.files import replacing
from gateway.units import LAST_INSTANT

TIME_NAMES = ("time", "timestamp", "datetime", "date", "ts", "date_time", "time_stamp")
_ISO_HINT = re.compile(r"^\d{4}-\d{2}-\d{2}")
DELIMITERS = (",", ";", "\t")  # on a tie, the first
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


class DataError(GatewayError):
    """Input data that cannot be used (a CSV without a time column, too few rows...): exit 65."""


@dataclass
class Recording:
    """Rows in time order: `times` (n,) epoch seconds, `values` (n, tags) with NaN where missing."""

    source: str
    tags: list[str]
    times: np.ndarray
    values: np.ndarray
    notes: list[str] = field(default_factory=list)  # what reading left out or fixed, for the user

    def __len__(self) -> int:
        return len(self.times)

    def select(self, tags: Sequence[str]) -> Recording:
        missing = [t for t in tags if t not in self.tags]
        if missing:
            raise DataError(f"{self.source}: no column {names_text(missing)} (it has {names_text(self.tags)})")
        index = [self.tags.index(t) for t in tags]
        return Recording(self.source, list(tags), self.times, self.values[:, index], self.notes)

    def median_interval(self) -> float | None:
        steps = np.diff(self.times)
        steps = steps[steps > 0]
        return float(np.median(steps)) if len(steps) else None

    def on_grid(self, interval: float, max_gap: int) -> tuple[np.ndarray, np.ndarray]:
        """Samples every `interval` from the first row to the last: each row lands on its nearest slot (the
        last row wins a slot); empty slots are missing values. A gap longer than `max_gap` slots is cut short
        to `max_gap` missing slots (it breaks every window across it the same). Returns (slot times, values)."""
        if not len(self):
            return np.empty(0), np.empty((0, len(self.tags)))
        slot = np.rint((self.times - self.times[0]) / interval).astype(np.int64)
        steps = np.diff(slot, prepend=slot[0])
        slot = np.cumsum(np.minimum(steps, max_gap + 1))
        out = np.full((int(slot[-1]) + 1, len(self.tags)), np.nan)
        out[slot] = self.values
        times = np.empty(len(out))
        times[slot] = self.times
        filled = np.zeros(len(out), dtype=bool)
        filled[slot] = True
        # An empty slot's time: the previous row's time plus the slots since (only used to report).
        last = np.maximum.accumulate(np.where(filled, np.arange(len(out)), 0))
        times = np.where(filled, times, times[last] + (np.arange(len(out)) - last) * interval)
        return times, out


# A CSV larger than this is refused, to be given in parts (a week of 50 tags at 1 Hz is about 300 MiB). Reading one
# takes about twice its size in memory (its bytes, then their text) and 8 bytes a number kept: 476 MiB of 50 tags
# peaked at 1.0 GiB.
MAX_BYTES = 512 << 20
_LINE_END = re.compile(r"\r\n|\r|\n")
FIRST_INSTANT = datetime(1, 1, 1, tzinfo=timezone.utc).timestamp()  # the times a recording may hold: those
# `format_time` can write back (a replay's rows, history's export), 0001-01-01 to 9999-12-31 UTC


def parse_time(text: str, epoch: bool = False) -> float | None:
    """Epoch seconds from an RFC 3339 / ISO 8601 time (no zone = UTC) or, when `epoch`, a number."""
    text = text.strip()
    if not text:
        return None
    if epoch:
        try:
            value = float(text)
        except ValueError:
            return None
        if not math.isfinite(value):
            return None
        value = value / 1000.0 if abs(value) > 1e11 else value
        return value if FIRST_INSTANT <= value <= LAST_INSTANT else None  # microseconds are past the year 9999
    if not _ISO_HINT.match(text):
        return None
    if text[-1] in "zZ":
        text = text[:-1] + "+00:00"
    try:
        stamp = datetime.fromisoformat(text.replace("T", " ", 1) if "T" in text[:11] else text)
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    ts = stamp.timestamp()
    return ts if FIRST_INSTANT <= ts <= LAST_INSTANT else None  # 9999-12-31T23:00-05:00 is the year 10000 in UTC


def format_time(ts: float) -> str:
    """RFC 3339 UTC, rounded to the millisecond; without a fraction when that is a whole second."""
    second = math.floor(ts)
    millis = round((ts - second) * 1000)
    if millis == 1000:  # within half a millisecond of the next second: it is that second (not this one)
        second, millis = second + 1, 0
    d = datetime.fromtimestamp(second, tz=timezone.utc)
    # Not strftime("%Y"): glibc writes the year 1 as "1", a time that parse_time (and so read_csv) refuses.
    text = f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}:{d.minute:02d}:{d.second:02d}"
    return f"{text}.{millis:03d}Z" if millis else f"{text}Z"


def _number(text: str, decimal_comma: bool) -> float:
    """A cell's number; for no number (empty, text, inf, nan) math.nan itself, the one object `read_csv` looks for."""
    text = text.strip()
    if decimal_comma:
        text = text.replace(",", ".")
    try:
        value = float(text)
    except ValueError:
        return math.nan
    return value if math.isfinite(value) else math.nan


def read_csv(path: str | Path, *, time_column: str | None = None, tags: Sequence[str] | None = None,
             as_given: bool = False) -> Recording:
    """A CSV file as a `Recording`; see the module's docstring for what is accepted. `as_given`: every row, in
    the file's order (a replay gives one result per row of the file, to be set beside it)."""
    path = Path(path)
    try:
        names, t, v, notes = _columns(path, _decoded(_read(path)), time_column, tags)  # the bytes go once decoded
        steps = np.diff(t)
        back, repeated = int((steps < 0).sum()), int((steps == 0).sum())
        if as_given:
            if back or repeated:
                notes.append(f"{back} row(s) earlier than the row before, {repeated} at the same time as the row "
                             f"before: all kept, in the file's order")
            return Recording(str(path), names, t, v, notes)
        order = np.argsort(t, kind="stable")
        t, v = t[order], v[order]
        if back:
            notes.append("rows put in time order")
        keep = np.append(t[1:] != t[:-1], True) if len(t) else np.empty(0, dtype=bool)
        if len(t) and not keep.all():
            notes.append(f"{int((~keep).sum())} row(s) with a time given twice: the last one kept")
        return Recording(str(path), names, t[keep], v[keep], notes)
    except MemoryError:  # below MAX_BYTES, but more than this process may take (a small box, a ulimit -v)
        raise DataError(f"{path}: too large to read here (out of memory): give it in parts (model train takes --csv "
                        f"more than once)") from None


def _read(path: Path) -> bytes:
    """The file's bytes: a regular file as large as it is, refused above MAX_BYTES before any is read, or a pipe
    (`--csv /dev/stdin`) up to MAX_BYTES. Not f.read(MAX_BYTES + 1): CPython allocates what read(n) asks, 512 MiB
    for a file of 35 KB. Anything else is refused: a FIFO that no program writes to blocked open() for ever, and a
    device such as /dev/zero has no end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO opens at once, written to or not
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            if st.st_size > MAX_BYTES:
                raise DataError(_too_large(path))
        elif stat.S_ISFIFO(st.st_mode):
            os.set_blocking(fd, True)  # read to its end: a program writes the recording into it
        else:
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a device"
            raise DataError(f"{path} is {kind}, not a file: expected a CSV file (or a pipe, such as /dev/stdin)")
        chunks, size = [], 0
        ask = st.st_size if stat.S_ISREG(st.st_mode) else 0  # then in parts: a pipe, a file still written to
        while size <= MAX_BYTES:
            chunk = os.read(fd, min(max(ask - size, 1 << 16), MAX_BYTES + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from None
    finally:
        os.close(fd)
    if size > MAX_BYTES:
        raise DataError(_too_large(path))
    if not size and stat.S_ISFIFO(st.st_mode):
        raise DataError(f"{path}: a pipe with nothing written into it (no program had it open to write): expected a "
                        f"CSV file, or a pipe that a program writes a recording into")
    return b"".join(chunks)  # a regular file's one part is not copied


def _too_large(path: Path) -> str:
    return (f"{path}: larger than {MAX_BYTES >> 20} MiB, more than this reads at once: give it in parts "
            f"(model train takes --csv more than once)")


def _columns(path: Path, text: str, time_column: str | None, tags: Sequence[str] | None
             ) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """The tags kept, the rows' times and values in the file's order, and the notes. Only the columns wanted are
    converted, each cell straight to a float as its row is read: a list of every row's cells, as strings, took about
    18 times the file's size (1 GB for 53 MiB of 50 tags)."""
    header_line = next(_split(text), "")
    if not header_line.strip():
        raise DataError(f"{path}: empty file, or no header line")
    delimiter = max(DELIMITERS, key=header_line.count)
    lines = _rows(path, text, delimiter)
    header = [h.strip() for h in next(lines)[1]]
    position = {h: i for i, h in enumerate(header)}  # by name in one step: a header may have a million columns
    if len(position) != len(header):
        twice = sorted(h for h, n in Counter(header).items() if n > 1)
        raise DataError(f"{path}: column {names_text(twice)} appears more than once in the header")
    rows = _body(path, lines, len(header), delimiter)
    head = list(itertools.islice(rows, 50))  # what the time column is told by
    t_index = _time_column(path, header, head, time_column)
    epoch = header[t_index].lower() in TIME_NAMES and not any(_ISO_HINT.match(r[t_index].strip()) for _, r in head[:20])
    decimal_comma = delimiter != ","
    notes: list[str] = []
    wanted = list(tags) if tags else [h for i, h in enumerate(header) if i != t_index and h]
    if not tags and "" in position and position[""] != t_index:  # pandas writes its row index so: no tag
        notes.append(f"column {position[''] + 1} left out: it has no name")
    unknown = [t for t in wanted if t not in position]
    if unknown:
        raise DataError(f"{path}: no column {names_text(unknown)} (it has {names_text(header)})")
    index = [position[name] for name in wanted]
    times, flat = array("d"), array("d")  # 8 bytes a number, row after row
    bad, first_bad = [0] * len(index), [""] * len(index)  # cells given that are not a number, and the first of them
    for lineno, cells in itertools.chain(head, rows):
        ts = parse_time(cells[t_index], epoch)
        if ts is None:
            raise DataError(f"{path}:{lineno}: column {header[t_index]}: {cells[t_index].strip()!r} is not a time "
                            f"(RFC 3339, e.g. 2026-03-09T10:14:33Z{', or epoch seconds or milliseconds' if epoch else ''}"
                            f", from the year 1 to 9999 UTC)")
        times.append(ts)
        numbers = [_number(cells[i], decimal_comma) for i in index]
        if math.nan in numbers:  # found by identity, at C speed: _number gives that one object for any NaN
            for j, number in enumerate(numbers):
                if number is math.nan and cells[index[j]].strip():
                    first_bad[j] = first_bad[j] or cells[index[j]].strip()
                    bad[j] += 1
        flat.extend(numbers)
    values = np.frombuffer(flat, dtype=np.float64).reshape(len(times), len(index))
    good = np.count_nonzero(~np.isnan(values), axis=0)
    names: list[str] = []
    kept: list[int] = []
    for j, name in enumerate(wanted):
        given = int(good[j]) + bad[j]
        if tags is None and given and not good[j]:
            notes.append(f"column {name} left out: not numeric")
            continue
        if tags is not None and len(times) and not good[j]:  # a tag asked for (or a model's) that no row gives
            raise DataError(f"{path}: column {name} holds no number (" +
                            (f"first cell {first_bad[j]!r})" if given else "every cell empty)"))
        if bad[j]:
            notes.append(f"column {name}: {bad[j]} cell(s) not a number, taken as missing")
        names.append(name)
        kept.append(j)
    if not names:
        raise DataError(f"{path}: no numeric column besides the time column {header[t_index]}")
    return names, np.frombuffer(times, dtype=np.float64), values if len(kept) == len(index) else values[:, kept], notes


def _split(text: str) -> Iterator[str]:
    """The text's lines one by one, without their ends (a list of them took as much memory again as the text). A line
    ends at \\r\\n, \\r or \\n; not as str.splitlines(): a Windows-1252 "…" (0x85), read as Latin-1, is a line end to it."""
    start = 0
    for end in _LINE_END.finditer(text):
        yield text[start:end.start()]
        start = end.end()
    if start < len(text):
        yield text[start:]


def _rows(path: Path, text: str, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """Each line's number and cells. A quoted cell ends on its own line: historians and spreadsheets write one row
    per line, and csv.reader let a stray quote (a cell `"0.5`) run on, taking every line after it into that cell:
    the rows left silently, or the file ended in "field larger than field limit" with no line to look at."""
    # An empty line after the last (read as a blank line: no row): a quote that the last line opens runs into it,
    # and is caught as any other.
    reader = csv.reader(itertools.chain(_split(text), [""]), delimiter=delimiter)
    done = 0  # the lines the rows so far took, one each
    header: list[str] = []
    try:
        for cells in reader:
            if reader.line_num > done + 1:
                break
            done = reader.line_num
            if done == 1:
                header = cells
            yield done, cells
        else:
            return
    except csv.Error as err:
        if reader.line_num == done + 1:  # within one line: a cell beyond the csv module's limit (128 KiB)
            raise DataError(f"{path}:{done + 1}: not a CSV recording: {err}") from None
    raise _unclosed(path, next(itertools.islice(_split(text), done, None)), done + 1, delimiter, header)


def _body(path: Path, rows: Iterator[tuple[int, list[str]]], width: int, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """The rows after the header that are not blank, each `width` cells long (a short row's last cells are empty)."""
    for lineno, cells in rows:
        if len(cells) > width and any(c.strip() for c in cells[width:]):
            raise DataError(f"{path}:{lineno}: {len(cells)} cells, but the header names {width} columns "
                            f"(delimiter {delimiter!r})")
        if any(c.strip() for c in cells):
            cells.extend([""] * (width - len(cells)))
            yield lineno, cells


def _unclosed(path: Path, line: str, lineno: int, delimiter: str, header: list[str]) -> DataError:
    """The error for a line whose last cell opens a quote that the line does not close."""
    cells = next(csv.reader([line], delimiter=delimiter), [""])  # on this line alone: the open cell is the last
    name = header[len(cells) - 1].strip() if lineno > 1 and len(cells) <= len(header) else ""
    column = names_text([name]) if name else str(len(cells))
    cell = '"' + cells[-1] if len(cells[-1]) < 40 else '"' + cells[-1][:40] + "..."
    return DataError(f"{path}:{lineno}: column {column}: the cell {cell!r} opens a quote that this line does not close: "
                     f"expected its closing quote on the same line (a recording holds one row per line)")


def names_text(names: Sequence[str], most: int = 20, longest: int = 60) -> str:
    """Names for a message: the first `most`, each cut to `longest` characters, and how many more."""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(n if len(n) <= longest else n[:longest] + "..." for n in names[:most]) + more


def _decoded(raw: bytes) -> str:
    for encoding in ("utf-16", "utf-8-sig") if raw.startswith(UTF16_BOMS) else ("utf-8-sig",):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            pass
    return raw.decode("latin-1")  # a spreadsheet's export: its tag names may be off, its numbers are not


def _time_column(path: Path, header: list[str], head: list[tuple[int, list[str]]], named: str | None) -> int:
    if named is not None:
        if named not in header:
            raise DataError(f"{path}: no time column {named!r} (it has {names_text(header)})")
        return header.index(named)
    for i, h in enumerate(header):
        if h.lower() in TIME_NAMES:
            return i
    for i in range(len(header)):
        sample = [cells[i] for _, cells in head if cells[i].strip()]
        if sample and all(parse_time(c) is not None for c in sample):
            return i
    raise DataError(f"{path}: no time column found among {names_text(header)}: name it with --time-column")


def write_csv(target: str | Path | IO[str], tags: Sequence[str],
              rows: Iterable[tuple[float, Sequence[float | None]]]) -> int:
    """`time` (RFC 3339 UTC) and one column per tag; a missing value is an empty cell. Returns the rows written.
    A path is written whole or not at all (`files.replacing`)."""
    if not isinstance(target, (str, Path)):
        return _write_rows(target, tags, rows)
    with replacing(target) as out:
        return _write_rows(out, tags, rows)


def _write_rows(out: IO[str], tags: Sequence[str], rows: Iterable[tuple[float, Sequence[float | None]]]) -> int:
    writer = csv.writer(out)
    writer.writerow(["time", *tags])
    count = 0
    for ts, values in rows:
        writer.writerow([format_time(ts), *("" if v is None or v != v else repr(float(v)) for v in values)])
        count += 1
    return count
