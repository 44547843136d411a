"""The in-process simulator as a source: the simulated machine advances by real elapsed time."""

from __future__ import annotations

import time
from collections.abc import Callable

import sim
from gateway.config import SimDevice
from gateway.sample import Sample
from gateway.sources.poll import PolledSource
from gateway.tagtypes import TagType, of_registers


def tag_types(device: SimDevice) -> dict[str, TagType]:
    """The simulated PLC's map gives the tags their types: a `sim` device reads as its Modbus twin."""
    from sim.plc import MAPS
    return of_registers(device.tags, MAPS.get(device.profile, ()))


class SimSource(PolledSource):
    def __init__(self, device: SimDevice, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(device.name, device.tags, device.interval, device.timeout)
        self.device = device
        options = {}
        if device.plc is not None:
            options = {"base_rate": device.plc.rate_per_min, "counter_bits": device.plc.counter_bits,
                       "counter_near_top": device.plc.start_near_top, "reset_every": device.plc.reset_every}
        self.machine = sim.make(device.profile, device.seed or 0, **options)
        for f in device.faults:
            self.machine.inject(f.fault, at=f.at, duration=f.duration, severity=f.severity, tag=f.tag, ramp=f.ramp)
        self._clock = clock
        self._last: float | None = None

    async def read(self) -> Sample:
        now = self._clock()
        dt = self.device.interval if self._last is None else max(0.0, now - self._last)
        self._last = now
        readings = self.machine.step(dt * (self.device.time_scale or 1.0))
        # Like a PLC register with a scale of 0.001: no float noise in the last digits.
        readings = {tag: v if v is None or v != v else round(v, 3) for tag, v in readings.items()}
        return Sample.from_readings(self.device.name, time.time(), readings)
