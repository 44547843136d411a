"""Sources read machines. Each turns a device's config into a stream of `Sample`s.

Every source implements `Source`: polled (Modbus, the simulator: `PolledSource` keeps the
schedule) or pushed (local MQTT), the device runner sees the same thing, one Sample per
reading. A failed read is a Sample too (`Sample.failure`, every tag an error), so a
source's trouble stays with its device and the stream never ends on a bad read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from gateway.config import Device, LocalBrokerSection, ModbusRtuDevice, ModbusTcpDevice, OpcUaDevice, SimDevice
from gateway.errors import SourceError
from gateway.sample import Sample
from gateway.tagtypes import AS_SENT, TagType, of_registers

if TYPE_CHECKING:
    from gateway.sources.modbus import Link
    from gateway.sources.mqtt import MqttLink

__all__ = ["Links", "Source", "SourceError", "TypedSource", "open_source", "tag_types"]


class Source(Protocol):
    """One device's readings. `samples()` yields one Sample per reading, a failed one as
    `Sample.failure`, and ends only when cancelled; `aclose()` releases what it holds and is idempotent."""

    def samples(self) -> AsyncIterator[Sample]: ...

    async def aclose(self) -> None: ...

    @property
    def skipped_ticks(self) -> int:
        """Polls skipped because one took longer than the interval (0 for a pushing source)."""
        ...

    @property
    def dropped(self) -> int:
        """Readings dropped unread because they came faster than the pipeline took them (0 for a polled source)."""
        ...


@runtime_checkable
class TypedSource(Protocol):
    """A source that learns its tags' types from the machine (OPC UA: each node's DataType, at connect)."""

    @property
    def learned_types(self) -> Mapping[str, TagType]: ...


def tag_types(device: Device, source: Source | None = None) -> dict[str, TagType]:
    """Every tag of a device with the type its source gives it: the one type rule (`tagtypes.py`).

    A Modbus register map says it; the simulated source, its PLC's map; an OPC UA node its DataType
    (known once connected: `source`); an MQTT sensor nothing (its numbers as sent)."""
    if isinstance(device, SimDevice):
        from gateway.sources.sim import tag_types as sim_types
        types = sim_types(device)
    elif isinstance(device, (ModbusTcpDevice, ModbusRtuDevice)):
        types = of_registers(device.tags, device.registers)
    else:
        types = dict.fromkeys(device.tags, AS_SENT)
    if isinstance(source, TypedSource):
        types.update((tag, t) for tag, t in source.learned_types.items() if tag in types)
    return types


class Links:
    """Connections shared by the devices behind one endpoint, serial line or broker; built, never started."""

    def __init__(self, local_broker: LocalBrokerSection | None = None, client_id: str = "edge-gateway",
                 data_dir: str = ".", config_path: str | None = None) -> None:
        self.local_broker = local_broker or LocalBrokerSection()
        self.client_id = client_id
        self.data_dir = data_dir  # where OPC UA's trust store is by default (<data_dir>/pki)
        self.config_path = config_path  # for the commands the log tells the user to type (their -c)
        self.modbus: dict[str, Link] = {}
        self.mqtt: MqttLink | None = None

    def take_over(self, old: Links) -> None:
        """A reload: the connections of the devices it keeps go on (their sources hold them), and a device added
        behind one of them shares it: a Modbus endpoint or line, the local broker (unless its section or the
        gateway's id changed). The others were closed with their last device's source."""
        self.modbus = {key: link for key, link in old.modbus.items() if link.users}
        if old.mqtt is not None and old.mqtt.sources and (old.local_broker, old.client_id) == \
                (self.local_broker, self.client_id):
            self.mqtt = old.mqtt


def open_source(device: Device, links: Links) -> Source:
    """The source for a device; `links` is shared by all devices so that they share connections."""
    # Each protocol's module is imported only when a device uses it.
    if isinstance(device, SimDevice):
        from gateway.sources.sim import SimSource
        return SimSource(device)
    if isinstance(device, (ModbusTcpDevice, ModbusRtuDevice)):
        from gateway.sources.modbus import ModbusSource
        return ModbusSource(device, links.modbus)
    if isinstance(device, OpcUaDevice):
        from gateway.sources.opcua import OpcUaSource
        from gateway.sources.opcua_trust import pki_dir
        return OpcUaSource(device, pki_dir(device, links.data_dir), links.config_path)
    from gateway.sources.mqtt import MqttLink, MqttSource
    if links.mqtt is None:
        links.mqtt = MqttLink(links.local_broker, f"{links.client_id}-local")
    return MqttSource(device, links.mqtt)
