"""OPC UA servers (asyncua, the `[opcua]` extra; imported only when a device uses it). Read-only.

Work in progress (issue 15): `mode: poll` reads every node of the device in one Read request per
interval; `mode: subscribe` is to come. A value becomes the device's Sample like any other
source: numbers and Booleans as numbers, a bad StatusCode as that tag's quality `error`, and the
sample time the newest SourceTimestamp the server gave (else the time of the read).

A failure stays with the device: an endpoint that cannot be reached, a session lost, a read that
times out. Each reconnect makes a fresh client (a broken one is never reused), after a jittered
backoff (`retry.down` while the server cannot be reached at all, exponential when it refuses).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import time
from typing import Any

from gateway.config import OpcUaDevice
from gateway.credentials import read_secret
from gateway.errors import SourceError
from gateway.retry import backoff, down
from gateway.sample import ERROR, OK, Sample
from gateway.sources.poll import PolledSource
from gateway.supervise import within

log = logging.getLogger("edge_gateway.opcua")


class OpcUaSource(PolledSource):
    def __init__(self, device: OpcUaDevice) -> None:
        super().__init__(device.name, device.tags, device.interval, 2 * device.timeout + 0.5)
        self.device = device
        self._client: Any = None
        self._attempt = 0
        self._retry_at = 0.0
        self._rng = random.Random()
        self._reads: Any = None  # the ReadParameters of every node, built once per session

    async def _connected(self) -> Any:
        if self._client is not None:
            return self._client
        now = time.monotonic()
        if now < self._retry_at:
            raise SourceError(f"{self.device.endpoint}: not connected, next attempt in {self._retry_at - now:.1f}s")
        from asyncua import ua
        from asyncua.client.client import Client

        device = self.device
        client = Client(device.endpoint, timeout=device.timeout)
        if device.username and device.password_file:
            client.set_user(device.username)
            client.set_password(read_secret(device.password_file) or "")
        try:
            if device.security is not None:
                sec = device.security
                await client.set_security_string(
                    f"{sec.policy},{sec.mode},{sec.cert_file},{sec.key_file}"
                    + (f",{sec.server_cert_file}" if sec.server_cert_file else ""))
            await within(client.connect(), device.timeout + 1.0)
        except Exception as err:  # asyncua raises OSError, TimeoutError, ua.UaError and its own on a failed connect
            reached = not isinstance(err, (OSError, asyncio.TimeoutError))
            self._retry_at = time.monotonic() + (backoff(self._attempt, 0.5, 30.0, 0.3, self._rng) if reached
                                                 else down(self._attempt, 0.5, 2.0, self._rng))
            self._attempt += 1
            await _close(client)
            raise SourceError(f"{device.endpoint}: cannot connect ({_why(err)})") from None
        self._attempt = 0
        params = ua.ReadParameters()
        for node in device.nodes:
            rv = ua.ReadValueId()
            rv.NodeId = ua.NodeId.from_string(node.node)
            rv.AttributeId = ua.AttributeIds.Value  # type: ignore[attr-defined]
            params.NodesToRead.append(rv)
        self._client, self._reads = client, params
        log.info("device %s: connected to %s", device.name, device.endpoint)
        return client

    async def read(self) -> Sample:
        client = await self._connected()
        device = self.device
        try:
            results = await within(client.uaclient.read(self._reads), device.timeout)
        except Exception as err:  # the session or the connection is gone: a fresh client next time
            await self.aclose()
            raise SourceError(f"{device.endpoint}: read failed ({_why(err)}); reconnecting") from None
        values: dict[str, float | None] = {}
        quality: dict[str, str] = {}
        problems: list[str] = []
        newest: float | None = None
        for node, dv in zip(device.nodes, results, strict=False):
            status = dv.StatusCode_ if hasattr(dv, "StatusCode_") else dv.StatusCode
            value = _number(dv.Value.Value if dv.Value is not None else None)
            if not status.is_good() or value is None:
                why = status.name if not status.is_good() else "not a number"
                problems.append(f"{node.name} ({node.node}): {why}")
                values[node.name], quality[node.name] = None, ERROR
                continue
            values[node.name], quality[node.name] = value, OK
            if dv.SourceTimestamp is not None:
                stamp = dv.SourceTimestamp  # asyncua gives UTC, with or without tzinfo
                ts = (stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.timezone.utc)).timestamp()
                newest = ts if newest is None else max(newest, ts)
        if problems and len(problems) == len(device.nodes):
            raise SourceError(f"{device.endpoint}: " + "; ".join(problems))
        return Sample(device.name, newest or time.time(), values, quality, "; ".join(problems) or None)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await _close(client)


async def _close(client: Any) -> None:
    try:
        await within(client.disconnect(), 2.0)
    except Exception:  # a broken session may not close cleanly; the client is dropped anyway
        pass


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        number = float(value)
        return number if number == number and abs(number) != float("inf") else None
    return None


def _why(err: BaseException) -> str:
    return (str(err) or type(err).__name__)[:200]
