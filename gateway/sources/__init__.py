"""Sources read machines. Each one turns a device's config into `Sample`s on request.

A source's `read()` is awaited by the device's poll loop; it raises `SourceError`
for a failed read (the poll loop counts and reports it), never anything else.
"""

from __future__ import annotations

from gateway.config import DeviceSection


class SourceError(Exception):
    """A read failed; `str()` says why in a form fit for the log and health."""


def open_source(device: DeviceSection, links: dict | None = None, local_broker=None, client_id: str = "edge-gateway"):
    """The source for a device; `links` is shared by all devices so that they can share connections.

    Polled sources have `read()`; pushing sources (mqtt) have `pushes = True` and `next()`.
    """
    if device.source == "sim":
        from gateway.sources.sim import SimSource
        return SimSource(device)
    if device.source in ("modbus_tcp", "modbus_rtu"):
        from gateway.sources.modbus import ModbusSource
        return ModbusSource(device, {} if links is None else links)
    if device.source == "mqtt":
        from gateway.config import LocalBrokerSection
        from gateway.sources.mqtt import MqttLink, MqttSource
        links = {} if links is None else links
        if "mqtt" not in links:
            links["mqtt"] = MqttLink(local_broker or LocalBrokerSection(), f"{client_id}-local")
        return MqttSource(device, links["mqtt"])
    raise SourceError(f"source {device.source} is not available in this version")
