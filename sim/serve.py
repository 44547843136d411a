"""The simulated plant on the wire: Modbus TCP and/or RTU servers, an OPC UA server, MQTT sensor messages.

`serve` runs them all around one `SimPlant` (plc.py) until cancelled: `edge-gateway sim`, the demo
and the tests start the plant this way. Read-only towards the gateway, as a PLC behind it should be.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from sim.plc import SimPlant


async def publish_mqtt(plant: SimPlant, host: str, port: int, *, username: str | None = None,
                       password: str | None = None, interval: float = 1.0, prefix: str = "sim") -> None:
    """Publish every unit's readings as JSON to `{prefix}/unit{N}/state` (QoS 1), like a plant sensor."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edge-gateway-sim-{os.getpid()}")
    if username:
        client.username_pw_set(username, password)
    client.connect_async(host, port, keepalive=30)
    client.loop_start()
    try:
        while True:
            await asyncio.sleep(interval)
            now = time.time()
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
            for unit_id, unit in plant.units.items():
                doc = {"ts": stamp, **{k: (None if v is None or v != v else round(v, 3)) for k, v in unit.last.items()}}
                client.publish(f"{prefix}/unit{unit_id}/state", json.dumps(doc), qos=1)
    finally:
        client.disconnect()
        client.loop_stop()


class _KnownUnitsOnly:
    """pymodbus's SimCore answers an unknown unit id with SLAVE_DEVICE_FAILURE (a KeyError inside);
    raising NoSuchIdException instead lets `ignore_missing_devices` keep the line silent."""

    def __init__(self, core: Any) -> None:
        self._core = core

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)

    def _known(self, device_id: int) -> None:
        from pymodbus.exceptions import NoSuchIdException
        if device_id not in self._core.devices:
            raise NoSuchIdException(f"no unit {device_id}")

    async def async_getValues(self, device_id: int, *args: Any) -> Any:
        self._known(device_id)
        return await self._core.async_getValues(device_id, *args)

    async def async_setValues(self, device_id: int, *args: Any) -> Any:
        self._known(device_id)
        return await self._core.async_setValues(device_id, *args)


async def serve(plant: SimPlant, *, tcp: tuple[str, int] | None = None, rtu: str | None = None,
                baudrate: int = 19200, parity: str = "E", stopbits: int = 1, truth_path: str | None = None,
                mqtt: dict | None = None, opcua: tuple[str, int] | None = None,
                opcua_login: tuple[str, str] | None = None, opcua_cert: tuple[str, str] | None = None) -> None:
    """Serve the plant over Modbus TCP and/or RTU and OPC UA, and publish it over MQTT, until cancelled."""
    from pymodbus.server import ModbusSerialServer, ModbusTcpServer

    servers = []
    if tcp:
        servers.append(ModbusTcpServer(plant.devices(), address=tcp))
    if rtu:
        from pymodbus import FramerType
        # On an RS-485 line nobody answers for a unit that is not there: silence, as for a dead slave.
        serial = ModbusSerialServer(plant.devices(), framer=FramerType.RTU, port=rtu, baudrate=baudrate,
                                    parity=parity, stopbits=stopbits, bytesize=8, ignore_missing_devices=True)
        serial.context = _KnownUnitsOnly(serial.context)
        servers.append(serial)
    import signal

    def reset_counters() -> None:  # kill -USR1: a technician resets the PLC counters
        for unit in plant.units.values():
            if unit.profile == "flexo_line":
                unit.machine.reset_counters()
    import threading
    if threading.current_thread() is threading.main_thread():  # only the main thread may own signals
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, reset_counters)
    tasks = [asyncio.create_task(s.serve_forever(), name=f"modbus-server-{i}") for i, s in enumerate(servers)]
    if mqtt:
        tasks.append(asyncio.create_task(publish_mqtt(plant, **mqtt), name="mqtt-publisher"))
    if opcua:
        from sim.opcua import serve_opcua
        user, password = opcua_login or (None, None)
        cert, key = opcua_cert or (None, None)
        tasks.append(asyncio.create_task(serve_opcua(plant, *opcua, user=user, password=password, cert=cert, key=key),
                                         name="opcua-server"))
    tasks.append(asyncio.create_task(plant.run(truth_path=truth_path), name="plant"))
    try:
        await asyncio.gather(*tasks)
    finally:
        for server in servers:
            await server.shutdown()
        for task in tasks:
            task.cancel()
