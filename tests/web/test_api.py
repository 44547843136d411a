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


async def _raw(s: server.Site, requests: list[bytes]) -> list[bytes]:
    """Each request sent as is on its own connection to the server as `serve` runs it (its own connection handler,
    which answers what aiohttp's parser refuses); the answers."""
    from aiohttp import web

    from gateway.ports import free_port

    runner = web.AppRunner(s.app(), **server.HANDLER_ARGS)
    await runner.setup()
    assert runner.server is not None
    loop = asyncio.get_running_loop()
    port = free_port()
    listening = await loop.create_server(server.Gate(runner.server, loop), "127.0.0.1", port)
    answers = []
    try:
        for request in requests:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            answers.append(await reader.read())
            writer.close()
            await writer.wait_closed()
    finally:
        listening.close()
        await listening.wait_closed()
        await runner.cleanup()
    return answers


@pytest.mark.parametrize("line,status,error", [
    (b"FOO /api/v1/status HTTP/1.1", 405, "method not allowed: only GET (and HEAD) are served"),
    (b"get /api/v1/status HTTP/1.1", 405, "method not allowed: only GET (and HEAD) are served"),
    (b"POST /api/v1/status HTTP/1.1", 405, "method not allowed: only GET (and HEAD) are served"),
    (b"G@T /api/v1/status HTTP/1.1", 400, "malformed request: the method is not a token such as GET"),
    (b"GET /api/v1/status HTTP/1.1 x", 400, "malformed request: expected METHOD PATH HTTP/1.1"),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1", 400, "malformed request: a request line or header over 8 KiB"),
])
def test_another_method_is_405_and_a_malformed_request_says_what_is_wrong(line, status, error):
    """FOO and get (a well-formed request line, another method) were refused as 'malformed or oversized request (a
    line or header over 8 KiB?)'; the docs promise 405 for any method but GET."""
    import json

    [answer] = asyncio.run(_raw(site(StandIn("pump1")), [line + b"\r\nHost: x\r\nConnection: close\r\n\r\n"]))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == str(status).encode(), head
    assert json.loads(body) == {"error": json.loads(body)["error"], "status": status}
    assert json.loads(body)["error"].startswith(error), body
    if status == 405:
        assert b"\r\nAllow: GET, HEAD\r\n" in head
    assert b"a" * 100 not in answer  # nothing sent is echoed


@pytest.mark.parametrize("text", ["\u0661\u0660", "1_0", "+5", " 5", "5 ", "0x5", "5.0", "\uff15"])
def test_a_query_integer_is_ascii_digits_only(text):
    """int() took Arabic-Indic and fullwidth digits, underscores, a sign and spaces."""
    with pytest.raises(server.ApiError) as err:
        server._int(text, "limit", 1000, 1, 1000)
    assert err.value.status == 400 and str(err.value) == f"limit: expected a whole number from 1 to 1000, got {text!r}"
    assert server._int("10", "limit", 1000, 1, 1000) == 10 and server._int("0010", "limit", 1000, 1, 1000) == 10


@pytest.mark.parametrize("text", ["2026-11-24T06:00:00", "2026-11-24", "2026-11-24 06:00", "\u0661\u0667\u0660\u0660",
                                  " 1767225600", "+1767225600", "1_767_225_600"])
def test_a_time_without_its_offset_or_in_other_digits_is_refused(text):
    """A time without an offset was read in the daemon's own zone, which the client cannot know."""
    with pytest.raises(server.ApiError) as err:
        server._time(text, "from", 0.0)
    assert err.value.status == 400 and str(err.value).startswith(
        "from: expected a UNIX time or an RFC 3339 time with its offset or Z, such as 2026-11-24T06:00:00Z")


def test_times_with_an_offset_and_unix_times_are_read():
    assert server._time("2026-01-01T00:00:00Z", "from", 0.0) == 1767225600.0
    assert server._time("2026-01-01T01:00:00+01:00", "from", 0.0) == 1767225600.0
    assert server._time("1767225600.25", "from", 0.0) == 1767225600.25
    assert server._time("", "from", 7.0) == 7.0
