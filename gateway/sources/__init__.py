"""Sources read machines. Each one turns a device's config into `Sample`s on request.

A source's `read()` is awaited by the device's poll loop; it raises `SourceError`
for a failed read (the poll loop counts and reports it), never anything else.
"""

from __future__ import annotations

from gateway.config import DeviceSection


class SourceError(Exception):
    """A read failed; `str()` says why in a form fit for the log and health."""


def open_source(device: DeviceSection):
    if device.source == "sim":
        from gateway.sources.sim import SimSource
        return SimSource(device)
    raise SourceError(f"source {device.source} is not available in this version")
