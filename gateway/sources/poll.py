"""Polling on a drift-free schedule: a source's `read()` becomes a stream of samples.

The first poll is at once; then tick k is due at start + phase + k × interval (the first of
them at least half an interval after it), where the phase is the device's own fixed share of
the interval (from a hash of its name, as Prometheus offsets its scrapes). So devices with the
same interval are not all read in the same millisecond: their samples reach the pipeline spread
over the interval rather than in one burst that the last of them waits through
(bench/latency.py: read → received at 50 devices × 10 Hz). A poll that runs late skips the
ticks it overran (counted in `skipped_ticks`) rather than bunching reads together; a read that
takes longer than the source's deadline, or raises SourceError, becomes a failed Sample.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import zlib
from collections.abc import AsyncIterator

from gateway.errors import SourceError
from gateway.sample import Sample
from gateway.supervise import within

log = logging.getLogger("edge_gateway.sources.poll")


class PolledSource:
    """A source read on request, every `interval`; subclasses give `read()`, which must end within `deadline`."""

    def __init__(self, device_name: str, tags: tuple[str, ...], interval: float, deadline: float) -> None:
        self.device_name = device_name
        self.tags = tags
        self.interval = interval
        self._deadline = deadline
        self._skipped = 0
        self.phase = interval * (zlib.crc32(device_name.encode()) / 2**32)

    @property
    def deadline(self) -> float:
        """The longest one `read()` may take before it is given up as failed."""
        return self._deadline

    @property
    def skipped_ticks(self) -> int:
        return self._skipped

    @property
    def dropped(self) -> int:
        return 0  # a poll is read when the pipeline asks for it

    async def read(self) -> Sample:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass

    async def read_once(self) -> Sample:
        """One reading, or a failed Sample saying why there is none."""
        try:
            return await within(self.read(), self.deadline)
        except asyncio.TimeoutError:
            why = f"no answer within {self.deadline:g}s"
        except SourceError as err:
            why = str(err)
        except Exception as err:  # a bug in a source is logged with its traceback but stays with its device
            log.exception("device %s: unexpected error reading the source", self.device_name)
            why = f"internal error: {err!r}"
        return Sample.failure(self.device_name, time.time(), self.tags, why)

    async def samples(self) -> AsyncIterator[Sample]:
        loop = asyncio.get_running_loop()
        interval = self.interval
        # The first poll at once, the next on the device's phase but never less than half an interval
        # later: two reads in a row would make a sample of nothing that changed.
        phase = self.phase if self.phase >= interval / 2 else self.phase + interval
        start, tick = loop.time() + phase - interval, 0
        while True:
            yield await self.read_once()  # the time the consumer takes counts towards this tick
            elapsed = loop.time() - start
            due = max(tick + 1, math.floor(elapsed / interval) + 1)
            self._skipped += due - tick - 1
            tick = due
            await asyncio.sleep(max(0.0, start + tick * interval - loop.time()))
