"""Raw sample history (devices[].history) in its own SQLite file: recorded, bounded, exported, never blocking."""

from __future__ import annotations

import logging
import sqlite3
import time

import pytest

from gateway.sample import ERROR, STALE, Sample
from gateway.store.history import Bounds, History

TAGS = ("flow", "temp")
NOW = time.time()


def sample(ts: float, flow: float | None = 1.0, temp: float | None = 20.0, quality=None) -> Sample:
    return Sample("p1", ts, {"flow": flow, "temp": temp}, quality or {"flow": "ok", "temp": "ok"})


def rows(store: History, device: str = "p1", start=None, end=None):
    tags, it = store.export(device, start, end)
    return tags, list(it)


def test_samples_are_recorded_with_quality_and_exported_in_time_order(tmp_path):
    store = History.open(tmp_path / "history.db")
    store.configure({"p1": Bounds(keep=86400, max_bytes=10**6)})
    store.add("p1", TAGS, sample(100.0, 1.5, 20.0))
    store.add("p1", TAGS, sample(101.0, 2.5, None, {"flow": "ok", "temp": ERROR}))
    store.add("p1", TAGS, sample(102.0, 3.5, 21.0, {"flow": STALE, "temp": "ok"}))
    store.add("p1", TAGS, Sample.failure("p1", 103.0, TAGS, "timeout"))
    assert rows(store) == (["flow", "temp"], [])  # nothing before the commit
    store.commit(now=200.0)
    tags, got = rows(store)
    assert tags == ["flow", "temp"]
    assert got == [(100.0, [1.5, 20.0]), (101.0, [2.5, None]), (102.0, [None, 21.0]), (103.0, [None, None])]
    quality = [q for (q,) in store.db.execute("SELECT quality FROM samples ORDER BY ts")]
    assert quality == [None, '{"temp": "error"}', '{"flow": "stale"}', '{"flow": "timeout", "temp": "timeout"}']
    assert rows(store, start=101.0, end=102.0)[1] == got[1:3]
    store.close()


def test_a_changed_tag_list_keeps_both_series_under_one_export(tmp_path):
    store = History.open(tmp_path / "history.db")
    store.configure({"p1": Bounds(86400, 10**6)})
    store.add("p1", TAGS, sample(1.0))
    store.add("p1", ("flow", "speed"), Sample("p1", 2.0, {"flow": 2.0, "speed": 9.0}, {}))
    store.commit(now=10.0)
    assert rows(store) == (["flow", "temp", "speed"], [(1.0, [1.0, 20.0, None]), (2.0, [2.0, None, 9.0])])
    store.close()


def test_bounds_by_age_and_by_size_drop_the_oldest_and_keep_other_devices(tmp_path):
    store = History.open(tmp_path / "history.db")
    store.configure({"p1": Bounds(keep=100, max_bytes=60 * 100), "p2": Bounds(keep=10**6, max_bytes=10**7)})
    for t in range(300):
        store.add("p1", TAGS, sample(float(t)))
        store.add("p2", TAGS, Sample("p2", float(t), {"flow": 1.0, "temp": 1.0}, {}))
    store.commit(now=300.0)
    _, kept = rows(store)
    assert kept[-1][0] == 299.0
    assert kept[0][0] >= 200.0  # older than `keep`
    assert len(kept) * (16 + 40) <= 60 * 100  # and within max_bytes (16 bytes of values + the row's overhead)
    assert len(rows(store, "p2")[1]) == 300
    store.close()


def test_a_full_disk_drops_samples_logs_once_and_recovers(tmp_path, caplog):
    store = History.open(tmp_path / "history.db")
    store.configure({"p1": Bounds(10**6, 10**9)})
    store.db.execute("PRAGMA max_page_count = 8")  # SQLite's own "database or disk is full"
    caplog.set_level(logging.INFO, "edge_gateway.store.history")
    for round_ in range(3):
        for t in range(2000):
            store.add("p1", TAGS, sample(round_ * 10000.0 + t))
        store.commit(now=1.0)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "full" in errors[0].getMessage()
    assert store.dropped > 0
    store.db.execute("PRAGMA max_page_count = 1000000")
    store.add("p1", TAGS, sample(99999.0))
    store.commit(now=2.0)
    assert "writing again" in caplog.records[-1].getMessage()
    assert rows(store)[1][-1][0] == 99999.0
    store.close()


def test_a_reader_sees_only_committed_rows_while_the_daemon_writes(tmp_path):
    store = History.open(tmp_path / "history.db")
    store.configure({"p1": Bounds(10**6, 10**9)})
    store.add("p1", TAGS, sample(NOW - 2))
    store.commit()
    store.add("p1", TAGS, sample(NOW - 1))  # not committed: a kill -9 now loses only this one
    reader = History.open(tmp_path / "history.db", readonly=True)
    assert [t for t, _ in rows(reader)[1]] == [NOW - 2]
    with pytest.raises(sqlite3.OperationalError):
        reader.db.execute("INSERT INTO series (device, tags) VALUES ('x', '[]')")
    reader.db.close()
    store.close()
    assert [t for t, _ in rows(History.open(tmp_path / "history.db"))[1]] == [NOW - 2, NOW - 1]  # close commits


def test_a_damaged_history_file_is_exported_without_what_the_gateway_never_writes(tmp_path):
    """Rows and series edited by hand or damaged: a blob of the wrong size or text for the values, text or a time
    past 9999 or before 1970 for the time, tags that are not a list of names. `history export` and `stats` (and the
    web API and `model train --device`, through `export`) were a traceback; now they leave those out, and say so."""
    import subprocess
    import sys

    from tests.helpers import ENV, ROOT, gateway_config

    data = tmp_path / "data"
    data.mkdir()
    store = History.open(data / "history.db")
    store.configure({"p1": Bounds(keep=10**10, max_bytes=10**6)})
    for i in range(10):
        store.add("p1", TAGS, sample(NOW + i, 1.0 + i, 20.0))
    store.add("p2", TAGS, sample(NOW, 1.0, 20.0))
    store.commit(now=NOW + 20)
    store.close()
    db = sqlite3.connect(data / "history.db")
    for i, change in enumerate(("data = X'00ff'", "data = 'text'", "ts = 'x'", "ts = 1e300", "ts = -1e15"), 2):
        db.execute(f"UPDATE samples SET {change} WHERE ts = ?", (NOW + i,))
    db.execute("UPDATE series SET tags = '[1, 2]' WHERE device = 'p2'")
    db.commit()
    db.close()
    store = History.open(data / "history.db", readonly=True)
    tags, got = rows(store)
    assert tags == ["flow", "temp"] and len(got) == 5 and store.damaged == 2  # 3 rows not in any span: not counted
    assert all(v == [1.0 + (ts - NOW), 20.0] for ts, v in got)
    assert rows(store, "p2") == ([], []) and store.damaged == 3
    assert [(d, n) for d, n, *_ in store.devices()] == [("p1", 7), ("p2", 1)]
    store.close()
    config = tmp_path / "gateway.yaml"
    config.write_text(gateway_config(data, 1883))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "gateway", "history", *args, "-c", str(config)], capture_output=True,
                              text=True, env=ENV, cwd=ROOT, timeout=60)
    exported = cli("export", "p1", "--csv", str(tmp_path / "p1.csv"))
    assert exported.returncode == 0 and "Traceback" not in exported.stderr, exported.stderr
    assert "5 samples of p1" in exported.stderr and "2 damaged series or row(s) of p1 left out" in exported.stderr
    assert len((tmp_path / "p1.csv").read_text().splitlines()) == 6
    refused = cli("export", "p2", "--csv", str(tmp_path / "p2.csv"))
    assert refused.returncode == 65 and "holds 1 series of it, all damaged" in refused.stderr, refused.stderr
    stats = cli("stats")
    assert stats.returncode == 0 and "p1: 7 samples" in stats.stdout, stats.stderr


def test_its_wal_is_cut_back_to_a_mebibyte_as_the_outbox_s(tmp_path):
    """A soak test: history.db-wal stayed at SQLite's 4 MB while the outbox's is held at 1 MiB, as documented."""
    store = History.open(tmp_path / "history.db")
    store.configure({"p1": Bounds(keep=10**9, max_bytes=10**9)})
    t = NOW - 10**6
    for _ in range(60):
        for _ in range(1000):
            t += 1.0
            store.add("p1", TAGS, sample(t, t % 97, t % 89))
        store.commit(now=t)
    wal = (tmp_path / "history.db-wal").stat().st_size
    assert (tmp_path / "history.db").stat().st_size > 2 * 2**20  # more written than the WAL may keep
    assert wal <= 1.1 * 2**20, wal
    store.close()
