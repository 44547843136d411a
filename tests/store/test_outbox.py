"""The outbox file: seq persisted, bounds and drop policies counted exactly, a corrupt file moved aside."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gateway.counters import CounterRow
from gateway.store.outbox import Bounds, Outbox
from tests.helpers import ENV


def payloads(store: Outbox) -> list[dict]:
    return [json.loads(m.payload) for m in store.fetch(0, 10**6)]


def test_seq_and_counters_survive_reopen(tmp_path):
    path = str(tmp_path / "g.db")
    store = Outbox.open(path)
    for i in range(5):
        store.stage("t", {"i": i})
    store.stage_counter("line1", "produced", CounterRow(10, 123, 4, "2026-11-24/A", 1.0))
    assert store.commit()
    store.close()
    store = Outbox.open(path)
    assert store.last_seq == 5
    assert store.stats.messages == 5
    assert store.stage("t", {}) == 6
    assert store.counters()[("line1", "produced")].total == 123


def test_uncommitted_messages_are_never_fetched(tmp_path):
    store = Outbox.open(str(tmp_path / "g.db"))
    store.stage("t", {"a": 1})
    assert store.fetch(0, 10) == []
    store.commit()
    assert [m.seq for m in store.fetch(0, 10)] == [1]


def test_ack_deletes_on_next_commit_and_is_not_resent(tmp_path):
    store = Outbox.open(str(tmp_path / "g.db"))
    for i in range(3):
        store.stage("t", {"i": i})
    store.commit()
    first = store.fetch(0, 10)[0]
    store.ack(first.seq, first.size)
    assert [m.seq for m in store.fetch(0, 10)] == [2, 3]  # acknowledged: not sent again, even before commit
    store.commit()
    assert store.stats.messages == 2
    assert store.stats.bytes == sum(m.size for m in store.fetch(0, 10))


@pytest.mark.parametrize("policy,survivors", [("drop_oldest", [8, 9, 10]), ("drop_newest", [1, 2, 3])])
def test_bounds_drop_per_policy_and_count_every_drop(tmp_path, policy, survivors):
    path = str(tmp_path / "g.db")
    store = Outbox.open(path, bounds=Bounds(max_messages=3, when_full=policy))
    for i in range(10):
        store.stage("t", {"i": i})
        store.commit()
    assert [m["seq"] for m in payloads(store)] == survivors
    assert store.stats.dropped == 7
    store.close()
    assert Outbox.open(path).stats.dropped == 7  # persisted


def test_max_bytes_and_max_age(tmp_path):
    store = Outbox.open(str(tmp_path / "g.db"), bounds=Bounds(max_bytes=200, max_age=60))
    for i in range(10):
        store.stage("t", {"pad": "x" * 30}, created=1000.0 + i)
    store.commit(now=1010.0)
    assert store.stats.bytes <= 200
    kept = store.stats.messages
    assert 0 < kept < 10 and store.stats.dropped == 10 - kept
    store.stage("t", {"late": 1}, created=1100.0)
    store.commit(now=1100.0)  # everything older than 60 s expires
    assert [m["seq"] for m in payloads(store)] == [11]


def test_corrupt_file_is_moved_aside(tmp_path):
    path = tmp_path / "g.db"
    path.write_bytes(os.urandom(8192))
    store = Outbox.open(str(path))
    store.stage("t", {})
    assert store.commit()
    aside = [p for p in os.listdir(tmp_path) if ".corrupt-" in p]
    assert aside and (tmp_path / aside[0]).stat().st_size == 8192


def test_disk_refusing_writes_keeps_messages_and_recovers(tmp_path):
    store = Outbox.open(str(tmp_path / "g.db"))
    store.stage("t", {"pad": "x" * 100})
    store.commit()
    page_count = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {page_count}")  # the file may not grow: like a full disk
    for i in range(300):
        store.stage("t", {"pad": "x" * 500, "i": i})
    assert not store.commit()
    assert store.stats.last_error and "full" in store.stats.last_error
    assert store.pending == 300
    store._db.execute("PRAGMA max_page_count = 1073741823")  # space comes back
    assert store.commit()
    assert store.stats.last_error is None
    assert [m["seq"] for m in payloads(store)] == list(range(1, 302))


def test_rows_in_flight_are_never_dropped(tmp_path):
    store = Outbox.open(str(tmp_path / "g.db"), bounds=Bounds(max_messages=3))
    for i in range(3):
        store.stage("t", {"i": i})
    store.commit()
    store.hold(1)  # handed to the broker, not yet acknowledged
    store.hold(2)
    store.stage("t", {"i": 3})
    store.commit()
    assert [m["seq"] for m in payloads(store)] == [1, 2, 4]  # seq 3 dropped, not the rows in flight
    assert store.stats.dropped == 1


def test_outbox_export_writes_every_message_or_says_which_file_it_could_not(tmp_path):
    """`outbox export FILE`: one JSON line per waiting message, written whole; a full disk or a missing folder is
    the file's error, exit 73 (it said 'cannot read the outbox ...', exit 69); `-` is standard output."""
    data = tmp_path / "data"
    data.mkdir()
    store = Outbox.open(str(data / "gateway.db"))
    for i in range(3):
        store.stage(f"edge/lab/w/p{i}/telemetry", {"i": i})
    store.commit()
    store.close()
    config = tmp_path / "gw.yaml"
    config.write_text(f'gateway: {{id: w, site: lab, data_dir: "{data}"}}\nupstream: {{host: 127.0.0.1}}\n'
                      "devices: [{name: p1, source: sim, profile: pump}]\n")

    def export(target: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway", "outbox", "export", target, "-c", str(config)],
                              capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=60)

    done = export(str(tmp_path / "out.jsonl"))
    assert done.returncode == 0 and done.stderr == f"exported 3 messages to {tmp_path}/out.jsonl\n", done.stderr
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(m["seq"], m["topic"], m["payload"]["i"]) for m in lines] == [(i + 1, f"edge/lab/w/p{i}/telemetry", i)
                                                                         for i in range(3)]
    shown = export("-")
    assert shown.returncode == 0 and shown.stdout == (tmp_path / "out.jsonl").read_text()
    for target, why in (("/dev/full", "No space left on device"), (f"{tmp_path}/no/out.jsonl", "No such file or directory")):
        failed = export(target)
        assert failed.returncode == 73 and failed.stderr == f"cannot write {target}: {why}\n", failed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "gw.yaml", "out.jsonl"]  # no .tmp left
    # A damaged outbox (not yet opened by the gateway, which repairs it): `stats` and `export` were tracebacks.
    import sqlite3

    db = sqlite3.connect(data / "gateway.db")
    db.execute("UPDATE outbox SET payload = X'00ff', created = 'x' WHERE seq = 2")
    db.execute("UPDATE topics SET topic = X'ff' WHERE topic = 'edge/lab/w/p0/telemetry'")
    db.execute("INSERT OR REPLACE INTO meta VALUES ('dropped', 'x')")
    db.commit()
    db.close()
    shown = export("-")
    assert shown.returncode == 0 and "2 of them are not what the gateway writes" in shown.stderr, shown.stderr
    lines = [json.loads(line) for line in shown.stdout.splitlines()]
    assert lines[0]["topic"] == "\ufffd" and lines[1]["damaged_payload"] == "\x00\ufffd" and lines[1]["created"] is None
    assert lines[2]["payload"]["i"] == 2
    for args in ([], ["--json"]):
        stats = subprocess.run([sys.executable, "-m", "gateway", "outbox", "stats", *args, "-c", str(config)],
                               capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=60)
        assert stats.returncode == 0 and "Traceback" not in stats.stderr, stats.stderr
    assert json.loads(stats.stdout)["dropped"] == 0 and json.loads(stats.stdout)["messages"] == 3


def test_a_damaged_outbox_file_is_repaired_at_open_said_once_and_delivers_the_rest(tmp_path, caplog):
    """Rows the gateway never writes (a disk or a hand): a message whose topic row is gone or not text, a creation
    time that is text or past 9999, a count that is not a number. The uplink failed on them at every start, a crash
    loop under systemd (exit 70), and `Outbox.open` itself on a topic that is not text. Now the open takes them out
    (undeliverable messages as drops, times as now), says so once, and every other message is fetched in order."""
    import sqlite3
    import time

    path = str(tmp_path / "g.db")
    store = Outbox.open(path, bounds=Bounds(max_age=10 * 365 * 86400.0))
    for i in range(10):
        store.stage("root/pump1/telemetry", {"i": i}, created=1.79e9 + i)
    store.stage("root/line1/telemetry", {"i": 10}, created=1.79e9 + 10)
    assert store.commit()
    store.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE outbox SET topic_id = 999 WHERE seq = 2")
    db.execute("UPDATE topics SET topic = X'00ff' WHERE topic = 'root/line1/telemetry'")
    db.execute("UPDATE outbox SET created = 'x' WHERE seq = 3")
    db.execute("UPDATE outbox SET created = 1e300 WHERE seq = 4")
    db.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', 'x')")
    db.commit()
    db.close()
    before = time.time()
    store = Outbox.open(path, bounds=Bounds(max_age=10 * 365 * 86400.0))
    messages = store.fetch(0, 100)
    assert [m.seq for m in messages] == [1, 3, 4, 5, 6, 7, 8, 9, 10]
    assert all(m.topic == "root/pump1/telemetry" for m in messages)
    assert [json.loads(m.payload)["i"] for m in messages] == [0, 2, 3, 4, 5, 6, 7, 8, 9]
    assert messages[1].created >= before and messages[2].created >= before and messages[0].created == 1.79e9
    assert store.stats.dropped == 2 and store.stats.messages == 9 and store.last_seq == 11
    assert store.stage("root/pump1/telemetry", {}) == 12
    said = [r.getMessage() for r in caplog.records if "never writes" in r.getMessage()]
    assert len(said) == 1 and "2 message(s) whose topic is lost, seq 2 to 11: dropped" in said[0], said
    assert "2 creation time(s) that are not a time: taken as now" in said[0]
    assert "1 count(s) that are not a count: counted again" in said[0]
    assert store.commit()
    store.close()
    caplog.clear()
    store = Outbox.open(path, bounds=Bounds(max_age=10 * 365 * 86400.0))
    assert not [r for r in caplog.records if "never writes" in r.getMessage()] and store.stats.dropped == 2
    store.close()
    # A last_seq no message can carry: the next seq overflowed at the first commit, at every start (a fuzzing pass).
    db = sqlite3.connect(path)
    db.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (2**63 - 1,))
    db.commit()
    db.close()
    store = Outbox.open(path, bounds=Bounds(max_age=10 * 365 * 86400.0))
    assert store.stage("root/pump1/telemetry", {}) == 13 and store.commit()
    assert "1 count(s) that are not a count: counted again" in caplog.records[-1].getMessage()
    store.close()


def test_an_outbox_behind_the_state_files_seq_goes_on_above_it_never_giving_a_seq_twice(tmp_path, caplog):
    """A fuzzing pass: with the WAL deleted while stopped (a power loss with sync: normal loses the last commits
    the same way) or the file moved aside as corrupt, numbering began again at 1, and the upstream, which drops a
    seq it has seen, dropped 152 new messages. The state file keeps the last committed seq and a floor above it."""
    from gateway import report

    data = tmp_path / "data"
    data.mkdir()
    path = str(data / "gateway.db")
    store = Outbox.open(path)
    for i in range(10):
        store.stage("root/pump1/telemetry", {"i": i})
    assert store.commit()
    store.stage("root/pump1/telemetry", {"i": 10})  # staged, not yet committed: it cannot have been sent
    report.write_state(str(data), {"ts": "x"}, [], store.seq_mark(1.0))
    assert store.commit()
    store.close()
    assert report.saved_seq(str(data)) == {"last": 10, "floor": 1010}

    store = Outbox.open(path)  # the same file: nothing lost, nothing said
    store.keep_above(report.saved_seq(str(data)))
    assert store.stage("root/pump1/telemetry", {}) == 12
    store.close()
    assert not [r for r in caplog.records if "were lost" in r.getMessage()]

    for suffix in ("", "-wal", "-shm"):  # the file replaced by a new one
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    store = Outbox.open(path)
    store.keep_above(report.saved_seq(str(data)))
    assert store.stage("root/pump1/telemetry", {}) == 1011 and store.commit()
    store.close()
    said = [r.getMessage() for r in caplog.records if "were lost" in r.getMessage()]
    assert len(said) == 1 and "its last seq is 0, but the gateway had given seq 10" in said[0]
    assert Outbox.open(path).last_seq == 1011  # kept in the file from then on

    (data / "state.json").write_text('{"seq": {"last": "x", "floor": 1e300}}')
    assert report.saved_seq(str(data)) is None


def _fill(directory) -> None:
    """Write zeros into `directory` until its file system refuses more."""
    fd = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:
        pass
    finally:
        os.close(fd)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root only), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_good_outbox_on_a_full_disk_at_open_is_kept_with_its_backlog(small_disk):
    """An attack pass: a gateway started on a full disk took the good outbox for corrupt ('disk I/O error') and
    moved it aside, so its whole backlog (282 messages) was never sent. Only damage moves a file aside now; a full
    disk fails the open naming why (the daemon exits 73), and once space is back every message is there."""
    from gateway.store.outbox import StoreUnavailable

    path = str(small_disk / "gateway.db")
    store = Outbox.open(path)
    for i in range(282):
        store.stage("root/pump1/telemetry", {"i": i})
    assert store.commit()
    store.close()  # the WAL and the shared memory go with the last connection
    assert sorted(os.listdir(small_disk)) == ["gateway.db"]
    _fill(small_disk)
    with pytest.raises(StoreUnavailable) as failed:
        Outbox.open(path)
    assert "the disk is full: 0 bytes free" in str(failed.value) and "left as it is" in str(failed.value)
    assert not [name for name in os.listdir(small_disk) if "corrupt" in name]
    os.remove(small_disk / "filler")
    store = Outbox.open(path)
    assert [m["i"] for m in payloads(store)] == list(range(282))
    store.close()


def test_an_outbox_locked_by_another_process_at_open_is_kept(tmp_path):
    """An attack pass: an operator's sqlite3 shell holding a write lock on the outbox (in rollback-journal mode, as a
    restored backup is) while the gateway started: 'database is locked' had it moved aside as corrupt."""
    import sqlite3

    from gateway.store.outbox import StoreUnavailable

    path = str(tmp_path / "gateway.db")
    store = Outbox.open(path)
    for i in range(3):
        store.stage("root/pump1/telemetry", {"i": i})
    assert store.commit()
    store.close()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA journal_mode = DELETE")
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable) as failed:
            Outbox.open(path)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert "database is locked" in str(failed.value) and "another process holds a lock" in str(failed.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gateway.db"]
    assert [m["i"] for m in payloads(Outbox.open(path))] == [0, 1, 2]


def test_a_damaged_page_moves_the_file_aside_and_the_new_one_takes_every_row_that_can_be_read(tmp_path, caplog):
    """An attack pass: bytes of a page flipped made every start fail 'database disk image is malformed' (exit 73,
    nothing moved aside), a restart loop that collected nothing. SQLITE_CORRUPT anywhere in the open is damage now:
    the file is moved aside, the new one takes every row that can be read (before and after the bad page, the
    counters), the log says which seqs are lost, and numbering goes on above the last."""
    path = str(tmp_path / "g.db")
    store = Outbox.open(path)
    store.stage_counter("line1", "produced", CounterRow(10, 123, 4, "2026-11-24/A", 1.0))
    for i in range(2000):
        store.stage("root/pump1/telemetry", {"i": i, "pad": "x" * 80})
    assert store.commit()
    store.close()
    pages = os.path.getsize(path) // 4096
    with open(path, "r+b") as f:  # a page of messages halfway: its header is no b-tree page's any more
        f.seek(pages // 2 * 4096)
        f.write(b"\xff" * 8)
    store = Outbox.open(path)
    seqs = [m.seq for m in store.fetch(0, 10**6)]
    said = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
    assert len(said) == 1 and "database disk image is malformed" in said[0] and "moved aside to" in said[0], said
    first_lost, last_lost = (int(n) for n in said[0].split("lost: seq ")[1].split(" to "))
    assert 1 < first_lost <= last_lost < 2000 and last_lost - first_lost < 100
    assert seqs == [s for s in range(1, 2001) if not first_lost <= s <= last_lost]
    assert f"{len(seqs)} message(s), seq 1 to 2000, 1 counter(s)" in said[0]
    assert store.counters()[("line1", "produced")].total == 123
    assert store.stats.messages == len(seqs) and store.stage("root/pump1/telemetry", {}) == 2001
    assert store.commit()
    store.close()
    assert [p for p in os.listdir(tmp_path) if p.startswith("g.db.corrupt-") and not p.endswith(("-wal", "-shm"))]


def test_a_wal_of_another_database_is_found_at_open_and_the_outbox_read_without_it(tmp_path, caplog):
    """An attack pass: another database's -wal next to the outbox was applied at open, its table 'outbox' took the
    outbox's place, and every start failed 'no such column: payload'. The outbox's tables are checked at open: not
    the outbox's is damage, moved aside, and what the file held at its last checkpoint is taken (the WAL ignored)."""
    import shutil
    import sqlite3

    path = str(tmp_path / "g.db")
    store = Outbox.open(path)
    for i in range(5):
        store.stage("root/pump1/telemetry", {"i": i})
    assert store.commit()
    store.close()  # checkpointed: the file holds all five
    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("PRAGMA journal_mode = WAL")
    other.execute("PRAGMA wal_autocheckpoint = 0")
    other.execute("CREATE TABLE outbox (x)")
    other.executemany("INSERT INTO outbox VALUES (?)", [(i,) for i in range(1000)])
    other.commit()
    shutil.copy(tmp_path / "other.db-wal", path + "-wal")
    other.close()
    store = Outbox.open(path)
    assert [m["i"] for m in payloads(store)] == [0, 1, 2, 3, 4] and store.last_seq == 5
    said = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
    assert len(said) == 1 and "its table outbox is not the outbox's (columns x)" in said[0], said
    assert "its -wal is another database's" in said[0] and "5 message(s), seq 1 to 5" in said[0]
    store.close()


class Monotonic:
    """A monotonic clock a test moves by hand (in place of `time.monotonic`)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_wall_clock_stepped_forward_past_max_age_expires_nothing_that_waited_less(tmp_path, caplog, monkeypatch):
    """An attack pass: a box without a battery-backed clock, set right by NTP 8 days forward while the upstream was
    down, dropped 734 messages less than 20 s old (max_age 7d), logged as 'outbox full'. Age is how long a message
    waited: from the open on, 'now' is bounded by the monotonic time passed; expiry is said as such."""
    import time

    clock = Monotonic()
    monkeypatch.setattr(time, "monotonic", clock)
    store = Outbox.open(str(tmp_path / "g.db"), bounds=Bounds(max_age=7 * 86400.0))
    for i in range(734):
        store.stage("root/pump1/telemetry", {"i": i})
    assert store.commit()
    clock.now += 20
    store.stage("root/pump1/telemetry", {"i": 734})
    assert store.commit(now=time.time() + 8 * 86400)  # the wall clock stepped: 8 days later than it was
    assert store.stats.messages == 735 and store.stats.dropped == 0
    assert not [r for r in caplog.records if "drop" in r.getMessage() or "expire" in r.getMessage()]
    clock.now += 7 * 86400  # now they have waited 7 days
    store.stage("root/pump1/telemetry", {"i": 735})
    assert store.commit(now=time.time() + 15 * 86400)
    assert [m["i"] for m in payloads(store)] == [735] and store.stats.dropped == 735
    said = [r.getMessage() for r in caplog.records]
    assert said == ["outbox messages expired: older than max_age 7.0 days, dropping them, first seq dropped 1"], said


def test_an_expiry_or_drop_episode_is_said_at_its_start_and_once_nothing_was_dropped_for_a_minute(
        tmp_path, caplog, monkeypatch):
    """An attack pass: max_age 3s while the upstream was down logged 240 lines in 18 s, 'dropping' and 'episode
    over' in turn, since each commit that dropped nothing ended the episode. It ends after 60 s without a drop."""
    import time

    clock = Monotonic()
    monkeypatch.setattr(time, "monotonic", clock)
    store = Outbox.open(str(tmp_path / "g.db"), bounds=Bounds(max_age=3.0))
    start = time.time()
    for i in range(20):  # a message every second, for 20 s: each commit expires the one 4 s old, or none
        store.stage("root/pump1/telemetry", {"i": i}, created=start + i)
        assert store.commit(now=start + i)
        clock.now += 1
        assert store.commit(now=start + i + 0.5)  # a commit with nothing to drop (an acknowledgement, a counter)
    assert store.stats.dropped == 16
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith("outbox messages expired"), said
    for m in store.fetch(0, 100):  # the upstream is back: the rest is delivered
        store.ack(m.seq, m.size)
    clock.now += 58  # 59 s since the last drop
    assert store.commit(now=start + 80) and store.stats.messages == 0
    assert len(caplog.records) == 1
    clock.now += 1
    store.commit(now=start + 81)  # a minute without a drop: it is over, said once with every seq it dropped
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and said[1] == ("outbox expiry (max_age 3 s) over: dropped seq 1..16 (16 messages; 16 "
                                         "dropped since the outbox was created)"), said
    store.close()
    assert len(caplog.records) == 2


def test_writes_that_fail_and_work_in_turn_are_said_once_and_their_recovery_once_settled(tmp_path, caplog, monkeypatch):
    """An attack pass: a full disk with the broker up logged 'write failed' and 'work again' about once a second
    (14 pairs in 14 s): each failure cut the WAL back and freed enough for one commit. A failure soon after the
    recovery is said once, and the next recovery once writes have worked for 30 s."""
    import time

    clock = Monotonic()
    monkeypatch.setattr(time, "monotonic", clock)
    store = Outbox.open(str(tmp_path / "g.db"))
    store.stage("t", {"pad": "x" * 100})
    assert store.commit()

    def full(yes: bool) -> None:  # the file may not grow: like a full disk
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages if yes else 1073741823}")
    clock.now += 3600
    for _ in range(14):
        full(True)
        for i in range(300):
            store.stage("t", {"pad": "x" * 500, "i": i})
        assert not store.commit()
        clock.now += 0.5
        full(False)
        assert store.commit()
        clock.now += 0.5
    said = [r.getMessage().split(" (")[0] for r in caplog.records]
    assert said == ["outbox write failed", "outbox writes work again", "outbox writes fail again"], said
    for _ in range(29):
        clock.now += 1
        assert store.commit()
    assert len(caplog.records) == 3
    clock.now += 1
    assert store.commit()
    assert caplog.records[-1].getMessage() == ("outbox writes work again, for 30s now (13 failed writes in all since "
                                               "they were said to fail)")
    assert store.stats.write_errors == 14 and store.stats.last_error is None


def test_a_disk_filled_while_the_broker_was_away_frees_the_acknowledged_rows_and_goes_on(small_disk, caplog):
    """An attack pass: the data partition filled while the broker was down. The broker came back and acknowledged
    every stored message, but none was deleted, since the deletes rode in the transaction of the new messages,
    which the full disk refused; nothing sampled after that reached the upstream. The reserve beside the file gives
    room for the deletes alone, the WAL is moved into the pages they freed, and the messages kept in memory follow.
    The disk stays full all along (the filler is never removed)."""
    store = Outbox.open(str(small_disk / "gateway.db"))
    for i in range(1500):
        store.stage("root/pump1/telemetry", {"i": i, "pad": "x" * 200})
    assert store.commit()
    _fill(small_disk)
    for _ in range(50):  # what the WAL still has room for is written; then the messages wait in memory
        for i in range(300):
            store.stage("root/pump1/telemetry", {"i": i, "pad": "x" * 200})
        if not store.commit():
            break
    assert store.pending == 300  # the broker is away: nothing is acknowledged to make room
    acked = [m.seq for m in store.fetch(0, 10**6)]
    for msg in store.fetch(0, 10**6):  # the broker is back and acknowledges all, as the uplink tells the outbox
        store.hold(msg.seq)
        store.ack(msg.seq, msg.size)
    for i in range(300):
        store.stage("root/pump1/telemetry", {"i": i, "pad": "x" * 200})
    assert store.commit()
    assert store.pending == 0 and not set(acked) & {m.seq for m in store.fetch(0, 10**6)}
    for _ in range(10):  # and so on, the disk still full
        later = [store.stage("root/pump1/telemetry", {"pad": "x" * 200}) for _ in range(300)]
        assert store.commit()
    waiting = [m.seq for m in store.fetch(0, 10**6)]
    assert waiting == sorted(waiting) and waiting[-300:] == later
    # Nothing unacknowledged is lost but what is counted as dropped.
    dropped = set(range(1, store.last_seq + 1)) - set(acked) - set(waiting)
    assert store.stats.dropped == len(dropped) and store.stats.messages == len(waiting)
    assert store.stats.dropped == 0 and not dropped
    said = [r.getMessage().split(" (")[0] for r in caplog.records]
    assert said == ["outbox write failed", "outbox writes work again"], said
    store.close()
    assert not os.path.exists(small_disk / "gateway.db-reserve")

