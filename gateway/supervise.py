"""Long-lived loops under one owner: a loop that ends or raises ends them all, and says so.

`Supervisor` is a small TaskGroup that also runs on Python 3.10 (Ubuntu 22.04): every task
is named; the first one to raise (or, for a loop that should never end, to return) is the
verdict; the others are cancelled and awaited, never left behind. The daemon turns that
verdict into a logged traceback and a non-zero exit, so that systemd restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger("edge_gateway.supervise")


class LoopEnded(RuntimeError):
    """A loop that should run until cancelled returned."""


class Supervisor:
    def __init__(self) -> None:
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        self._done = asyncio.Event()

    def start(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run `coro` as a supervised task named `name` (a loop: it must not return)."""
        if name in self.tasks and not self.tasks[name].done():
            raise ValueError(f"a task named {name} is already running")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks[name] = task
        task.add_done_callback(lambda t: self._done.set())
        return task

    async def stop(self, *names: str) -> None:
        """Cancel and await these tasks (a deliberate end: not a failure)."""
        tasks = []
        for name in names:
            task = self.tasks.pop(name, None)
            if task is None:
                continue
            if task.done():  # it ended by itself: whoever watched it has reported it
                if not task.cancelled():
                    task.exception()
                continue
            task.cancel()
            tasks.append(task)
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                if task.cancelled():
                    continue
                raise  # we are being cancelled ourselves
            except Exception:  # it failed while stopping; it is stopped all the same
                log.exception("task %s failed while stopping", task.get_name())

    def alive(self) -> bool:
        """Whether every supervised task is still running."""
        return all(not t.done() for t in self.tasks.values())

    def failed(self) -> tuple[str, BaseException] | None:
        """The first task that ended, with why (LoopEnded for a loop that returned)."""
        for name, task in self.tasks.items():
            if task.done():
                if task.cancelled():
                    return name, LoopEnded(f"task {name} was cancelled")
                return name, task.exception() or LoopEnded(f"task {name} returned; it should run until stopped")
        return None

    async def wait(self) -> tuple[str, BaseException]:
        """Until a supervised task ends; which one, and why."""
        while True:
            found = self.failed()
            if found is not None:
                return found
            self._done.clear()
            await self._done.wait()

    async def aclose(self) -> None:
        """Cancel and await every task."""
        await self.stop(*list(self.tasks))


async def run_all(**loops: Coroutine[Any, Any, Any]) -> None:
    """Run loops together until one ends: its exception is raised (LoopEnded if it returned)."""
    sup = Supervisor()
    try:
        for name, coro in loops.items():
            sup.start(coro, name)
        _, error = await sup.wait()
        raise error
    finally:
        await sup.aclose()


async def in_daemon_thread(call: Callable[[], object], limit: float, what: str) -> bool:
    """Run a blocking call in a daemon thread, waiting at most `limit` seconds; whether it ended.

    Not the default executor: asyncio.run waits for that at exit without a bound, so a paho thread
    stuck on a dead socket would hold the process after its drain (seen: a stop that never ended).
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def finish() -> None:
        if not done.done():
            done.set_result(None)

    def target() -> None:
        try:
            call()
        finally:
            if not loop.is_closed():
                loop.call_soon_threadsafe(finish)
    threading.Thread(target=target, name=f"stop {what}", daemon=True).start()
    try:
        await within(asyncio.shield(done), limit)
    except asyncio.TimeoutError:
        log.warning("%s did not end within %gs; leaving it behind", what, limit)
        return False
    return True


async def within(aw: Awaitable[T], seconds: float) -> T:
    """`aw`'s result, or asyncio.TimeoutError after `seconds` (`aw` is then cancelled and awaited).

    Use this, not asyncio.wait_for: before Python 3.12, wait_for swallows a cancellation that arrives
    as the awaited thing completes, and the cancelled task carries on (seen: device loops that never
    stopped when cancelled on a poll tick, which would hang a reload or a shutdown). A timer cancels
    the task when time is up.
    """
    task = asyncio.ensure_future(aw)
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()
    timer = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        # Shielded: our own cancellation reaches us even when the awaited code swallows the
        # CancelledError it is given (a library that catches it and returns normally).
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        cancelling = getattr(current, "cancelling", lambda: 0)()  # Python 3.11+: were we cancelled too?
        if expired and not cancelling:
            raise asyncio.TimeoutError from None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    finally:
        timer.cancel()
