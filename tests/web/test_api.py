"""The JSON API in process (fast): the server's own routes over a stand-in gateway, through aiohttp's test client."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("aiohttp")

from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from gateway.config.schema import WebSection  # noqa: E402
from gateway.web import server, view  # noqa: E402


class StandIn:
    """The least of a running gateway that the routes below read: devices by name."""

    def __init__(self, *names: str) -> None:
        self.devices: list[Any] = [SimpleNamespace(name=n) for n in names]
        self.history = None


def site(gw: StandIn) -> server.Site:
    return server.Site(gw, WebSection())  # type: ignore[arg-type]


async def _get(client: TestClient, path: str) -> tuple[int, Any]:
    async with client.get(path) as resp:
        return resp.status, await resp.json()


def test_the_devices_documents_are_built_at_most_once_per_cache_period(monkeypatch):
    """They were built for every request: 8 clients asking for 204 devices made the devices skip 467 ticks in 15 s.
    The clock is stopped, so that the count does not depend on how fast this machine is."""
    gw = StandIn("pump1", "flexo1")
    builds: list[int] = []

    def documents(g: Any) -> list[dict[str, Any]]:
        builds.append(1)
        return [{"name": r.name, "build": len(builds)} for r in g.devices]

    monkeypatch.setattr(view, "devices", documents)
    monkeypatch.setattr(view, "device", lambda g, r: documents(SimpleNamespace(devices=[r]))[0])
    s = site(gw)
    now = [1000.0]
    s.clock = lambda: now[0]

    async def main() -> None:
        async with TestClient(TestServer(s.app())) as client:
            for _ in range(50):
                assert await _get(client, "/api/v1/devices") == (200, {"devices": [{"name": "pump1", "build": 1},
                                                                                   {"name": "flexo1", "build": 1}]})
                assert await _get(client, "/api/v1/devices/flexo1") == (200, {"name": "flexo1", "build": 1})
            assert len(builds) == 1
            now[0] += server.CACHE_S
            assert await _get(client, "/api/v1/devices/pump1") == (200, {"name": "pump1", "build": 2})
            assert (await _get(client, "/api/v1/devices"))[1]["devices"][0] == {"name": "pump1", "build": 2}
            # A device a reload has just added is answered at once, not after the cache period.
            gw.devices.append(SimpleNamespace(name="added"))
            assert await _get(client, "/api/v1/devices/added") == (200, {"name": "added", "build": 3})
            assert (await _get(client, "/api/v1/devices/nope"))[0] == 404

    asyncio.run(main())
    assert len(builds) == 3


def test_head_of_the_live_stream_is_its_headers_without_a_stream():
    """It streamed snapshots for a minute after its headers and held one of the MAX_STREAMS slots."""
    s = site(StandIn("pump1"))

    async def main() -> tuple[bytes, bytes]:
        async with TestServer(s.app()) as srv:
            reader, writer = await asyncio.open_connection(srv.host, srv.port)
            writer.write(b"HEAD /api/v1/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            after = await reader.read(100)  # the end of the connection (b""), or what a stream sends
            writer.close()
            await writer.wait_closed()
            return head, after

    head, after = asyncio.run(main())
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Type: text/event-stream" in head, head
    assert after == b"" and s.streams == 0
