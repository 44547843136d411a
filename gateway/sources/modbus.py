"""Modbus TCP and RTU sources (pymodbus 3.x async clients). Read-only.

Devices on one TCP endpoint (several unit ids behind one gateway or PLC) share one
connection; devices on one serial port share the line. Either way their requests are
serialized through the link's lock, and on a serial line each transaction is followed
by the 3.5-character silence the baud rate needs.

An answer that does not fit its request is never data: a different function, fewer or more
registers (or bits) than asked for, or bytes pymodbus cannot decode. Each is a SourceError of
the device, and the connection is dropped (what follows on the stream cannot be trusted).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from gateway.config import ModbusRtuDevice, ModbusTcpDevice
from gateway.errors import SourceError
from gateway.modbus_map import Read, decode, plan, width
from gateway.retry import backoff, down
from gateway.sample import ERROR, OK, Sample
from gateway.sources.poll import PolledSource
from gateway.supervise import within

log = logging.getLogger("edge_gateway.sources.modbus")

EXCEPTION_NAMES = {
    1: "ILLEGAL_FUNCTION", 2: "ILLEGAL_DATA_ADDRESS", 3: "ILLEGAL_DATA_VALUE", 4: "SLAVE_DEVICE_FAILURE",
    5: "ACKNOWLEDGE", 6: "SLAVE_DEVICE_BUSY", 7: "NEGATIVE_ACKNOWLEDGE", 8: "MEMORY_PARITY_ERROR",
    10: "GATEWAY_PATH_UNAVAILABLE", 11: "GATEWAY_TARGET_DEVICE_FAILED_TO_RESPOND",
}
_FUNCTIONS = {"holding": "read_holding_registers", "input": "read_input_registers",
              "coil": "read_coils", "discrete": "read_discrete_inputs"}
_CODES = {"holding": 3, "input": 4, "coil": 1, "discrete": 2}


class MalformedAnswer(Exception):
    """Bytes from the slave that pymodbus could not decode (set on the pending request)."""


def _guard(client: Any) -> Any:
    """Make a decoding failure the failure of the pending request, not of asyncio's transport.

    pymodbus (3.16) decodes a frame inside `data_received`; a wrong byte count or an unknown
    function code raises there, and asyncio then logs "Fatal error: protocol.data_received() call
    failed" with a traceback and closes the transport, while the request waits for its timeout.
    """
    protocol = client.ctx
    decode_frame = protocol.callback_data

    def callback_data(data: bytes, addr: Any = None) -> int:
        try:
            return int(decode_frame(data, addr))
        except Exception as err:  # whatever pymodbus raises on bytes it cannot decode
            future = getattr(protocol, "response_future", None)
            if future is not None and not future.done():
                future.set_exception(MalformedAnswer(f"{type(err).__name__}: {err}"[:200]))
            return len(data)  # nothing of it is usable

    protocol.callback_data = callback_data
    return client
DEFAULT_MAX_GAP = 10


class Link:
    """One connection (TCP endpoint or serial line), shared by the devices behind it.

    Reconnecting follows the two-speed rule of `gateway.retry`, as the uplink and OPC UA do. A
    connection that cannot be made (refused by the kernel, unreachable, timed out: the PLC is
    off or rebooting) is tried again after a wait drawn evenly up to 2 s, so a PLC that is back
    is read again within 2 s. A PLC that accepts the connection and drops it before answering
    (its connection slots are taken, a gateway in front of it refuses) is left alone
    exponentially longer, 0.5 s doubling to 30 s: each attempt costs it a connection slot (when
    pymodbus does not notice the hang-up, the request times out instead and the unit is left
    alone as below, 1 s doubling to 30 s). The count of attempts starts again at the first answer.

    A unit that does not answer is left alone for a while (1 s doubling to 30 s, jittered), on its
    own: its polls fail at once meanwhile, so a dead slave does not take a timeout's worth of the
    line on every poll from the units that do answer. On a serial line a timeout only discards
    what may still arrive; the port stays open for the other units.
    """

    def __init__(self, name: str, make_client: Callable[[], Any], gap: float = 0.0, serial: bool = False,
                 clock: Callable[[], float] = time.monotonic, spec: tuple[Any, ...] = ()) -> None:
        self.name = name
        self.spec = spec  # what the client is made with: a reload's device that wants other may not share it
        self._make_client = make_client
        self.gap = gap
        self.serial = serial
        self._silent: dict[int, tuple[int, float, str]] = {}  # unit -> (failures in a row, next try, why)
        self.lock = asyncio.Lock()
        self.client: Any = None  # a pymodbus async client
        self.requests = 0
        self._attempt = 0
        self._retry_at = 0.0
        self.last_wait = 0.0  # the wait before the next attempt, as last decided (for the tests)
        self._rng = random.Random()
        self._clock = clock
        self._budgets: dict[str, float] = {}  # device -> the longest one of its polls may hold the link
        self._answer_due = 0.0  # serial: until when a cancelled request's answer may still come (`read`)

    def share(self, device: str, budget: float) -> None:
        """A device polls over this link; one of its polls holds it for at most `budget` seconds."""
        self._budgets[device] = budget

    def release(self, device: str) -> None:
        """A device no longer polls over this link (its source closed); the last one closes the connection."""
        self._budgets.pop(device, None)
        if not self._budgets:
            self.close()

    @property
    def users(self) -> int:
        return len(self._budgets)

    def budget(self) -> float:
        """The longest a poll may take here: its own transactions after every other device's in the queue."""
        return sum(self._budgets.values())

    async def _connected(self) -> Any:
        if self.client is not None and self.client.connected:
            return self.client
        now = self._clock()
        if now < self._retry_at:
            raise SourceError(f"{self.name}: not connected, next attempt in {self._retry_at - now:.1f}s")
        if self.client is None:
            self.client = _guard(self._make_client())
        try:
            ok = await self.client.connect()
        except Exception as err:  # pymodbus raises a variety here; each means "cannot connect"
            ok, why = False, str(err)
        else:
            why = "connection refused or no route"
        if not ok:
            self._failed(down(self._attempt, 0.5, 2.0, self._rng))
            raise SourceError(f"{self.name}: cannot connect ({why})")
        return self.client

    def _drop(self) -> None:
        """Close the connection now; the next request reconnects at once."""
        if self.client is not None:
            self.client.close()
            self.client = None

    def _failed(self, wait: float) -> None:
        """No connection: the next attempt after `wait` seconds."""
        self.last_wait = wait
        self._retry_at = self._clock() + wait
        self._attempt += 1
        self._drop()

    async def read(self, read: Read, unit: int, timeout: float) -> Any:
        """One request; the response (possibly an exception response) or SourceError."""
        from pymodbus.exceptions import ConnectionException, ModbusException

        silent = self._silent.get(unit)
        if silent is not None and self._clock() < silent[1]:
            raise SourceError(silent[2])  # the same words as when it stopped answering: logged once
        async with self.lock:
            client = await self._connected()
            if self.serial and (wait := self._answer_due - self._clock()) > 0:
                await asyncio.sleep(wait)  # a request given up on may still be answered: not as this one's answer
                self._discard_input()
            self.requests += 1
            try:
                response = await within(
                    getattr(client, _FUNCTIONS[read.table])(read.address, count=read.count, device_id=unit),
                    timeout)
            except asyncio.CancelledError:
                # Its poll was cancelled (a reload), the request on the wire. Over TCP a late answer has its own
                # transaction id; on a serial line nothing tells it from the next request's answer: the next waits
                # until this one's answer is due, and drops what came.
                if self.serial:
                    self._answer_due = self._clock() + timeout
                    self._discard_input()
                raise
            except asyncio.TimeoutError:
                if self.serial:
                    self._discard_input()  # the other units on the line go on; a late answer is dropped
                else:
                    self._drop()  # a late answer must never be taken for the answer to a later request
                raise self._unit_failed(unit, f"{self.name}: no response within {timeout:g}s "
                                              f"(unit {unit}, {read.table} {read.address}+{read.count})") from None
            except (ConnectionException, ConnectionError, OSError) as err:  # connected, then dropped
                self._failed(backoff(self._attempt, 0.5, 30.0, 0.3, self._rng))
                raise SourceError(f"{self.name}: connection lost ({err})") from None
            except ModbusException as err:  # no valid response: timeout inside pymodbus, CRC error, garbage
                if self.serial:
                    self._discard_input()
                raise self._unit_failed(unit, f"{self.name}: no valid response (unit {unit}): {err}") from None
            except MalformedAnswer as err:  # dropped, and the unit left alone as one that gives no valid answer
                self._drop()
                raise self._unit_failed(unit, f"{self.name}: malformed answer (unit {unit}, {read.table} "
                                              f"{read.address}+{read.count}): {err}; dropped the connection") from None
            finally:
                if self.gap:
                    await asyncio.sleep(self.gap)
            if not response.isError():
                bits = read.table in ("coil", "discrete")
                got = len(response.bits if bits else response.registers)
                wanted = 8 * -(-read.count // 8) if bits else read.count  # bits come in whole bytes
                if response.function_code != _CODES[read.table] or got != wanted:
                    self._drop()  # (and reconnected with the unit's backoff: 99 connections in 20 s before)
                    raise self._unit_failed(unit, f"{self.name}: answer does not match the request (unit {unit}, "
                                                  f"{read.table} {read.address}+{read.count}: got function "
                                                  f"{response.function_code} with {got} "
                                                  f"{'bits' if bits else 'registers'}); dropped the connection")
            self._attempt = 0  # an answer: the PLC is back
            self._silent.pop(unit, None)
            return response

    def _unit_failed(self, unit: int, why: str) -> SourceError:
        """This unit gave no usable answer: the next attempt waits, doubling per failure in a row."""
        failures = self._silent[unit][0] + 1 if unit in self._silent else 1
        self.last_wait = backoff(failures - 1, 1.0, 30.0, 0.3, self._rng)
        self._silent[unit] = (failures, self._clock() + self.last_wait, why)
        return SourceError(why)

    def _discard_input(self) -> None:
        """Drop bytes received for a request given up on (the serial port stays open)."""
        protocol = getattr(self.client, "ctx", None)
        if protocol is not None:
            protocol.recv_buffer = b""

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def endpoint(device: ModbusTcpDevice | ModbusRtuDevice) -> tuple[str, tuple[Any, ...]]:
    """A device's connection: its key (one link per TCP endpoint or serial port) and what its client is made with.
    Devices of one config on one key share the first one's client; a reload keeps a link only while the first
    device on its key still wants it as it is (`Gateway._stop_devices`)."""
    if isinstance(device, ModbusTcpDevice):
        port = device.port or 502
        return f"tcp://{device.host}:{port}", (device.host, port, device.timeout)
    return f"rtu://{device.serial.port}", (device.serial, device.timeout)


def link_for(device: ModbusTcpDevice | ModbusRtuDevice, links: dict[str, Link]) -> Link:
    """The shared link for a device's endpoint or serial port (created on first use)."""
    from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient

    key, spec = endpoint(device)
    if key in links:  # (a reload carries a link over only as this config's first device on it wants it)
        return links[key]
    if isinstance(device, ModbusTcpDevice):
        host, port, _ = spec
        links[key] = Link(f"{host}:{port}", lambda: AsyncModbusTcpClient(
            host, port=port, timeout=device.timeout, retries=0, reconnect_delay=0), spec=spec)
        return links[key]
    s = device.serial
    char_time = (1 + s.bytesize + (0 if s.parity == "N" else 1) + s.stopbits) / s.baudrate
    gap = 3.5 * char_time if s.baudrate <= 19200 else 0.00175  # Modbus over serial line, 2.5.1.1
    links[key] = Link(s.port, lambda: AsyncModbusSerialClient(
        s.port, baudrate=s.baudrate, parity=s.parity, stopbits=s.stopbits, bytesize=s.bytesize,
        timeout=device.timeout, retries=0, reconnect_delay=0), gap=gap, serial=True, spec=spec)
    return links[key]


class ModbusSource(PolledSource):
    def __init__(self, device: ModbusTcpDevice | ModbusRtuDevice, links: dict[str, Link]) -> None:
        link = link_for(device, links)
        reads = plan(device.registers, max_gap=device.max_gap if device.max_gap is not None else DEFAULT_MAX_GAP,
                     max_per_read=device.max_registers_per_read)
        # A poll may take one timeout per request (plus the line's silences), after waiting for the
        # requests of the other devices on the same connection or line (their own timeouts).
        link.share(device.name, len(reads) * (device.timeout + link.gap))
        super().__init__(device.name, device.tags, device.interval, 0.0)
        self.device = device
        self.link = link
        self.reads = reads
        self.unit = device.unit if device.unit is not None else 1

    @property
    def deadline(self) -> float:
        return self.link.budget() + 0.5  # the link's as it is now: devices may join it after this one

    async def read(self) -> Sample:
        ts = time.time()
        values: dict[str, float | None] = {}
        quality: dict[str, str] = {}
        problems = []
        unfit = []  # tags whose registers hold no finite number (a float's NaN or infinity): the tag's error only
        for read in self.reads:
            response = await self.link.read(read, self.unit, self.device.timeout)
            if response.isError():
                code: int = getattr(response, "exception_code", -1)
                name = EXCEPTION_NAMES.get(code, f"exception {code}")
                problems.append(f"{name} (code {code}) reading {read.table} {read.address}+{read.count}")
                for reg in read.tags:
                    values[reg.name], quality[reg.name] = None, ERROR
                continue
            words = response.bits if read.table in ("coil", "discrete") else response.registers
            for reg in read.tags:
                offset = reg.address - read.address
                value = decode(words[offset:offset + width(reg)], reg)
                values[reg.name], quality[reg.name] = value, OK if value is not None else ERROR
                if value is None:
                    unfit.append(reg.name)
        if problems and len(problems) == len(self.reads):  # worded as the link's errors: one state, logged once
            raise SourceError(f"{self.link.name}: unit {self.unit}: " + "; ".join(problems))
        if unfit:
            problems.append(f"NaN or infinity in the registers of {', '.join(unfit)}")
        values = {reg.name: values[reg.name] for reg in self.device.registers}  # the configured order
        return Sample(self.device.name, ts, values, {tag: quality[tag] for tag in values}, "; ".join(problems) or None)

    async def aclose(self) -> None:
        self.link.release(self.device.name)

