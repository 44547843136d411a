"""The outbox's group commit: a staged message is committed at once, not on the next tick of a timer.

Real SQLite on tmp_path, the real `commit_loop` on an event loop. `interval` is set far longer
than any wait here, so a commit that happens can only have been started by the message.
"""

from __future__ import annotations

import asyncio

from gateway.counters import CounterRow
from gateway.store.outbox import Outbox, commit_loop

LONG = 60.0  # seconds: the timer cadence that must not be what commits


async def until(condition, what: str, limit: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"{what} did not happen within {limit}s"
        await asyncio.sleep(0.001)


def run(coro) -> None:
    asyncio.run(coro)


def test_a_staged_message_is_committed_and_told_at_once(tmp_path):
    store = Outbox.open(str(tmp_path / "g.db"))
    told: list[int] = []

    async def main() -> None:
        loop = asyncio.create_task(commit_loop(store, told.append, interval=LONG))
        await asyncio.sleep(0)
        store.stage("t", {"i": 1})
        await until(lambda: told, "the first commit")
        assert [m.seq for m in store.fetch(0, 10)] == [1] and told == [1]
        store.stage("t", {"i": 2})
        store.stage("t", {"i": 3})  # staged in the same turn of the loop: one commit
        await until(lambda: len(told) == 2, "the second commit")
        assert told == [1, 2] and store.stats.messages == 3
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        assert store.on_stage is None
    run(main())


def test_state_without_a_message_waits_for_the_interval(tmp_path):
    store = Outbox.open(str(tmp_path / "g.db"))
    store.stage("t", {})
    store.commit()
    told: list[int] = []

    async def main() -> None:
        loop = asyncio.create_task(commit_loop(store, told.append, interval=0.05))
        await asyncio.sleep(0)
        store.ack(1, 10)
        store.stage_counter("d", "c", CounterRow(1, 1, 1, None, 1.0))
        assert store.dirty
        await until(lambda: not store.dirty, "the commit of the acknowledgement and the counter row")
        assert store.stats.messages == 0 and store.counters()[("d", "c")].total == 1 and told[-1] == 0
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    run(main())


def test_without_group_commit_messages_wait_for_the_timer(tmp_path):
    store = Outbox.open(str(tmp_path / "g.db"))
    told: list[int] = []

    async def main() -> None:
        loop = asyncio.create_task(commit_loop(store, told.append, interval=LONG, group=False))
        await asyncio.sleep(0)
        store.stage("t", {})
        for _ in range(20):
            await asyncio.sleep(0)
        assert store.pending == 1 and not told
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    run(main())


def test_a_refused_write_keeps_the_messages_and_is_retried(tmp_path):
    store = Outbox.open(str(tmp_path / "g.db"))
    store.stage("t", {"pad": "x" * 100})
    store.commit()
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")  # the file may not grow: like a full disk
    told: list[int] = []

    async def main() -> None:
        loop = asyncio.create_task(commit_loop(store, told.append, interval=0.02))
        await asyncio.sleep(0)
        for i in range(300):
            store.stage("t", {"pad": "x" * 500, "i": i})
        await until(lambda: store.stats.write_errors >= 2, "two refused writes")
        assert store.pending == 300 and not told
        store._db.execute("PRAGMA max_page_count = 1073741823")  # space comes back
        await until(lambda: told, "the commit once space is back")
        assert told == [300] and store.stats.messages == 301
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    run(main())


def test_max_rate_spaces_commits(tmp_path):
    store = Outbox.open(str(tmp_path / "g.db"))
    told: list[int] = []

    async def main() -> None:
        loop = asyncio.create_task(commit_loop(store, told.append, interval=LONG, max_rate=1 / LONG))
        await asyncio.sleep(0)
        store.stage("t", {})
        await until(lambda: told, "the first commit (nothing before it to space from)")
        store.stage("t", {})
        for _ in range(20):
            await asyncio.sleep(0)
        assert told == [1] and store.pending == 1  # the second waits for its turn
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    run(main())
