"""The web server (aiohttp) in the daemon's own event loop: the page, `/api/v1/`, `/metrics`, the live stream.

Read-only: only GET (and HEAD) routes exist; nothing here changes the gateway or a PLC.
It must never slow the device loops, so every answer is cheap and bounded:
- `Recorder.tick` (once a second) builds the live snapshot once, only while a page watches; every watcher
  gets the same bytes, and a watcher that stops reading is dropped after `WRITE_LIMIT` (once its socket's
  buffers are full) or at the latest after `LIVE_LIFETIME`, when a page that reads reconnects;
- at most `MAX_CONNECTIONS` connections are served at once; up to `MAX_WAITING` more wait (not
  read) for a free slot for at most `WAIT_LIMIT`, beyond that 503 at once (`Gate`); the waiting are
  served by address in turn, and a full queue makes room for an address with fewer waiting; at most
  `MAX_STREAMS` live streams; an idle connection is closed after `IDLE_LIMIT`, a request whose head
  takes longer than `HEAD_LIMIT` to arrive with a 408; with TLS, a connection is admitted (served or
  waiting) before its handshake, which it does in its slot within `HEAD_LIMIT` (`_Handshake`);
- a request line or header over 8 KiB is refused (400) by aiohttp's parser before any
  handler runs; a history page has at most `MAX_ROWS` rows, `HISTORY_AT_ONCE` are rendered at a time,
  each giving the loop back every `HISTORY_SLICE` rows;
- `/api/v1/status`, `/api/v1/devices`, `/api/v1/devices/{name}` and `/metrics` are rendered at most once per
  `CACHE_S` (the devices' documents are built once for both).
Errors are JSON `{"error": ..., "status": ...}` with their status code, never a traceback.
Every answer carries the security headers; none carries CORS headers (same origin only).
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import math
import os
import re
import resource
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import datetime
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.web_protocol import RequestHandler

from gateway.config import WebSection
from gateway.config.schema import loopback
from gateway.web import view
from gateway.web.auth import Users
from gateway.web.metrics import CONTENT_TYPE, Exposition

if TYPE_CHECKING:
    from gateway.web.view import Gateway

log = logging.getLogger("edge_gateway.web.server")

MAX_CONNECTIONS = 64  # each served connection is work in one pass of the loop the devices share: few enough that a
# pass stays well under a 250 ms poll interval (at 256 a flood of requests held it up past one)
MAX_WAITING = 10_000  # each holds a file descriptor: `serve` raises the soft limit to the hard one
WAIT_LIMIT = 10.0  # seconds a connection may wait for a free slot
MAX_STREAMS = 32
IDLE_LIMIT = 15.0  # seconds an idle keep-alive connection is kept
WRITE_LIMIT = 10.0  # seconds a live stream may take to take one update
HEAD_LIMIT = 5.0  # seconds a request's head may take to arrive, from its first byte (or the connection's start)
LIVE_LIFETIME = 60.0  # seconds a live stream runs before the page is asked to reconnect (EventSource does, at once)
HISTORY_AT_ONCE = 2  # history pages rendered at a time; each gives the loop back every HISTORY_SLICE rows
HISTORY_SLICE = 100
MAX_ROWS = 1000  # history rows per page
CACHE_S = 0.5
# asyncio accepts up to `backlog` connections in one go, before the loop runs anything else: a small batch
# keeps a flood of connections from holding the device loops up; the rest wait in the kernel's queue,
# which is made longer (QUEUE) so that a burst waits there rather than in SYN retries of seconds.
BACKLOG = 32
QUEUE = 4096
TICK_S = 1.0
STATIC = {"app.js": "text/javascript", "app.css": "text/css", "uplot.min.js": "text/javascript",
          "uplot.min.css": "text/css", "uplot.LICENSE": "text/plain"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=_dumps(body), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message, "status": status}, status)


def _not_allowed() -> web.Response:
    resp = _error(405, "method not allowed: only GET (and HEAD) are served; nothing here changes the gateway")
    resp.headers["Allow"] = "GET, HEAD"
    return resp


# A request line of another method (RFC 9110 token), such as FOO or get, which aiohttp's parser refuses as malformed.
REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [!-~]+ HTTP/1\.[01]")
MALFORMED = {LineTooLong: "a request line or header over 8 KiB", BadHttpMethod: "the method is not a token such as GET",
             BadStatusLine: "expected METHOD PATH HTTP/1.1", InvalidHeader: "a header that is not NAME: VALUE",
             InvalidURLError: "a path that is not a URL path"}  # (the first class that fits: BadHttpMethod is a BadStatusLine)


def _another_method(exc: BaseException) -> bool:
    """Whether aiohttp refused a well-formed request line for its method (its message quotes the line)."""
    if not isinstance(exc, BadHttpMethod):
        return False
    quoted = re.search(r"\n\n  (b'.*'|b\".*\")\n", exc.message)
    try:
        line = ast.literal_eval(quoted[1]) if quoted else None
    except (ValueError, SyntaxError):
        return False
    return isinstance(line, bytes) and REQUEST_LINE.fullmatch(line) is not None


class Site:
    """The routes, over the running gateway."""

    def __init__(self, gw: Gateway, cfg: WebSection) -> None:
        self.gw = gw
        self.cfg = cfg
        self.rec = view.Recorder(gw)
        self.metrics = Exposition(gw, self.rec)
        self.users = Users(cfg.users_file) if cfg.users_file else None
        self.streams = 0
        self.history_turns = asyncio.Semaphore(HISTORY_AT_ONCE)
        self.tick = asyncio.Event()
        self.closing = False  # the daemon stops: live streams end at their next wake-up
        self._cache: dict[str, tuple[float, bytes]] = {}
        self._devices: tuple[float, dict[str, dict[str, Any]]] | None = None  # (built, every device's document)
        self.clock = time.monotonic  # (a test stops it)
        self._static = {name: resources.files("gateway.web").joinpath("static").joinpath(name).read_bytes()
                        for name in (*STATIC, "index.html")}

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        r = app.router
        r.add_get("/", self.index)
        r.add_get("/static/{name}", self.static)
        r.add_get("/api/v1/status", self.status)
        r.add_get("/api/v1/devices", self.devices)
        r.add_get("/api/v1/devices/{name}", self.device)
        r.add_get("/api/v1/devices/{name}/history", self.history)
        r.add_get("/api/v1/devices/{name}/anomaly", self.anomaly)
        r.add_get("/api/v1/shifts", self.shifts)
        r.add_get("/api/v1/live", self.live)
        r.add_get("/metrics", self.prometheus)
        app.on_shutdown.append(self._end_streams)
        return app

    async def _end_streams(self, app: web.Application) -> None:
        """On stop, before aiohttp waits for the handlers: a live stream never ends by itself, so an open page
        would hold the daemon's ordered drain (which stops the web first) until its limit cut it short."""
        self.closing = True
        self.tick.set()

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Login, JSON errors and the security headers, around every route."""
        try:
            if self.users is not None:
                client = request.remote or "?"
                header = request.headers.get("Authorization")
                wait = 0.0 if self.users.known(header) else self.users.blocked(client)
                if wait > 0:
                    resp: web.StreamResponse = _error(429, f"too many failed logins; try again in {math.ceil(wait)}s")
                    resp.headers["Retry-After"] = str(math.ceil(wait))
                elif await self.users.check(header, client) is None:
                    resp = _error(401, "login required")
                    resp.headers["WWW-Authenticate"] = 'Basic realm="edge-gateway", charset="UTF-8"'
                else:
                    resp = await handler(request)
            else:
                resp = await handler(request)
        except ApiError as err:
            resp = _error(err.status, str(err))
        except web.HTTPMethodNotAllowed:  # aiohttp's own, for a method it knows (POST, DELETE, ...)
            resp = _not_allowed()
        except web.HTTPException as err:  # aiohttp's own 404 for an unknown path
            resp = _error(err.status, err.reason)
        except Exception:  # a bug in a page must not reach the client as a traceback, nor stop the daemon
            log.exception("web: unexpected error answering %s", request.path[:200])
            resp = _error(500, "internal error (logged by the gateway)")
        if not resp.prepared:
            resp.headers.update(HEADERS)
            if request.path.startswith(("/api/", "/metrics")):
                resp.headers["Cache-Control"] = "no-store"
        return resp

    # -- routes ---------------------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self._static["index.html"], content_type="text/html", charset="utf-8")

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in STATIC:
            raise ApiError(404, "no such file")
        return web.Response(body=self._static[name], content_type=STATIC[name],
                            headers={"Cache-Control": "max-age=3600"})

    def _cached(self, key: str, render: Callable[[], bytes]) -> bytes:
        now = self.clock()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < CACHE_S:
            return hit[1]
        body = render()
        self._cache[key] = (now, body)
        return body

    async def status(self, request: web.Request) -> web.StreamResponse:
        body = self._cached("status", lambda: json.dumps(view.status(self.gw, self.rec), separators=(",", ":")).encode())
        return web.Response(body=body, content_type="application/json")

    def _device_docs(self, name: str | None = None) -> dict[str, dict[str, Any]]:
        """Every device's document by name, built at most once per CACHE_S (again when `name`, a device a reload
        has just added, is not among them): 8 clients asking for 204 devices made the devices skip 467 ticks in
        15 s while each request built them all."""
        now = self.clock()
        if self._devices is None or now - self._devices[0] >= CACHE_S or (name is not None and
                                                                          name not in self._devices[1]):
            self._devices = (now, {doc["name"]: doc for doc in view.devices(self.gw)})
        return self._devices[1]

    async def devices(self, request: web.Request) -> web.StreamResponse:
        body = self._cached("devices", lambda: _dumps({"devices": list(self._device_docs().values())}))
        return web.Response(body=body, content_type="application/json")

    def _runner(self, request: web.Request) -> Any:
        return self._named(request.match_info["name"])

    def _named(self, name: str) -> Any:
        runner = view.runner_of(self.gw, name)
        if runner is None:
            raise ApiError(404, f"no device {name[:100]!r} (devices: {', '.join(r.name for r in self.gw.devices)})")
        return runner

    async def device(self, request: web.Request) -> web.StreamResponse:
        name = self._runner(request).name
        body = self._cached(f"device:{name}", lambda: _dumps(self._device_docs(name)[name]))
        return web.Response(body=body, content_type="application/json")

    async def anomaly(self, request: web.Request) -> web.StreamResponse:
        runner = self._runner(request)
        doc = self.rec.anomaly(runner.name)
        if doc is None:
            raise ApiError(404, f"device {runner.name} has no anomaly model (devices[].model)")
        return _json(doc)

    async def history(self, request: web.Request) -> web.StreamResponse:
        runner = self._runner(request)
        history = self.gw.history
        if runner.history is None or history is None:
            raise ApiError(404, f"device {runner.name} records no history (devices[].history)")
        q = request.query
        now = time.time()
        end = _time(q.get("to"), "to", now)
        start = _time(q.get("from"), "from", end - 3600.0)
        limit = _int(q.get("limit"), "limit", MAX_ROWS, 1, MAX_ROWS)
        if start > end:
            raise ApiError(400, "from: expected a time before to")
        # A page of 1,000 rows is 50 ms of this loop's time, which the devices share: a few at a time, each giving
        # the loop back every HISTORY_SLICE rows (300 requests at once made a 50 ms device skip 42 ticks).
        async with self.history_turns:
            tags, rows = history.export(runner.name, start, end)
            out: list[list[Any]] = []
            more = None
            try:
                for ts, values in rows:
                    if len(out) == limit:
                        more = ts
                        break
                    out.append([round(ts, 3), *values])
                    if len(out) % HISTORY_SLICE == 0:
                        await asyncio.sleep(0)
            finally:
                close = getattr(rows, "close", None)
                if close is not None:
                    close()
        return _json({"device": runner.name, "from": start, "to": end, "columns": ["ts", *tags], "rows": out,
                      "next_from": more})

    async def shifts(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        last = _int(q.get("last"), "last", 10, 1, 100)
        wanted = q.get("device")
        runners = self.gw.devices
        if wanted is not None:
            runners = [self._named(wanted)]
        return _json({"shifts": {r.name: view.shifts(r, last) for r in runners}})

    async def prometheus(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self._cached("metrics", self.metrics.render), headers={"Content-Type": CONTENT_TYPE})

    async def live(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: the snapshot now and after every tick, until the client goes."""
        if request.method == "HEAD":  # its headers only: it streamed for LIVE_LIFETIME and held a stream's slot
            return web.Response(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        if self.streams >= MAX_STREAMS:
            raise ApiError(503, f"{MAX_STREAMS} pages are watching already; try again later")
        self.streams += 1
        try:
            resp = web.StreamResponse(headers={**HEADERS, "Content-Type": "text/event-stream",
                                               "Cache-Control": "no-store"})
            await resp.prepare(request)
            snapshot = self.rec.snap() if self.streams == 1 else self.rec.snapshot  # the first watcher: fresh
            # A page that stops reading is found only once the socket's buffers are full, which at a snapshot a
            # second takes many minutes: 32 such held every stream. Each stream ends after LIVE_LIFETIME; a page
            # that reads reconnects at once (EventSource, `retry`), one that does not is gone.
            ends = time.monotonic() + LIVE_LIFETIME
            await resp.write(b"retry: 500\n\n")
            while not self.closing and time.monotonic() < ends:
                await asyncio.wait_for(resp.write(b"data: " + snapshot + b"\n\n"), WRITE_LIMIT)
                await self.tick.wait()
                snapshot = self.rec.snapshot
            return resp  # the daemon stops, or the page reconnects
        except (asyncio.TimeoutError, ConnectionError):
            return resp  # a watcher that stopped reading or went away
        finally:
            self.streams -= 1

    # -- the clock ---------------------------------------------------------------------------------
    async def run_ticks(self) -> None:
        while True:
            self.rec.tick(watched=self.streams > 0)
            event, self.tick = self.tick, asyncio.Event()
            event.set()
            await asyncio.sleep(TICK_S)


UNIX_TIME = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")
WHOLE = re.compile(r"[0-9]{1,9}")  # ASCII digits only: int() also took "١٠", "1_0", "+5" and " 5"


def _time(text: str | None, what: str, default: float) -> float:
    """A UNIX time or an RFC 3339 time with its offset from the query; ApiError 400 when it is neither.

    A time without an offset is refused rather than read in the daemon's zone (which the client cannot know)."""
    if text is None or text == "":
        return default
    expected = (f"{what}: expected a UNIX time or an RFC 3339 time with its offset or Z, such as "
                f"2026-11-24T06:00:00Z or 2026-11-24T07:00:00+01:00, got {text[:40]!r}")
    if UNIX_TIME.fullmatch(text):
        return float(text)
    try:
        infinite = not math.isfinite(float(text))  # nan, inf, 1e400
    except ValueError:
        infinite = False
    if infinite:
        raise ApiError(400, f"{what}: expected a finite time, got {text[:40]!r}")
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if when.tzinfo is None:
            raise ApiError(400, expected)
        return when.timestamp()
    except (ValueError, OverflowError, OSError):  # year 1 at +14:00 is before the epoch's range
        raise ApiError(400, expected) from None


def _int(text: str | None, what: str, default: int, low: int, high: int) -> int:
    if text is None or text == "":
        return default
    value = int(text) if WHOLE.fullmatch(text) else low - 1
    if not low <= value <= high:
        raise ApiError(400, f"{what}: expected a whole number from {low} to {high}, got {text[:40]!r}")
    return value


_BUSY_BODY = b'{"error":"too many connections","status":503}'
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


_SLOW_BODY = b'{"error":"the request took too long to arrive","status":408}'
SLOW = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(_SLOW_BODY), _SLOW_BODY))


class _Handler(RequestHandler):
    """aiohttp's connection handler, whose answer to a request it cannot parse (a header or path over the
    limits, garbage) is a short JSON 400 with the security headers, logged in one line without a traceback,
    and never echoes what was sent. Its slot goes to the next waiting connection when it closes.

    A request's head must arrive within HEAD_LIMIT of its first byte (a new connection's, of the connection):
    aiohttp waits for ever, so 64 clients sending a header line every few seconds (slowloris) held every slot and
    the status page and /metrics got 503. An idle keep-alive connection is aiohttp's (closed after IDLE_LIMIT)."""

    gate: Gate | None = None
    _head: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:  # a whole head arrived (and perhaps the start of the next)
            self._cancel_head()
        elif self._head is None:  # the first bytes of the next request on a kept-alive connection
            self._await_head()

    def _await_head(self) -> None:
        self._head = asyncio.get_running_loop().call_later(HEAD_LIMIT, self._too_slow)

    def _cancel_head(self) -> None:
        if self._head is not None:
            self._head.cancel()
            self._head = None

    def _too_slow(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            log.debug("web: closed a connection whose request took over %g s to arrive", HEAD_LIMIT)
            transport.write(SLOW)
            transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head()
        super().connection_lost(exc)
        if self.gate is not None:
            self.gate.busy -= 1
            self.gate.release()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError) or status >= 500:
            return super().handle_error(request, status, exc, message)
        log.debug("web: refused a malformed request from %s (%s)", request.remote, type(exc).__name__)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent")
        if _another_method(exc):
            resp = _not_allowed()
        else:
            why = next((text for kind, text in MALFORMED.items() if isinstance(exc, kind)), None)
            resp = _error(status, f"malformed request: {why}" if why else "malformed request: not HTTP/1.1 as expected")
        resp.headers.update(HEADERS)
        resp.force_close()
        return resp


HANDLER_ARGS: dict[str, Any] = {"access_log": None, "keepalive_timeout": IDLE_LIMIT, "max_line_size": 8190, "max_field_size": 8190,
                                "max_headers": 64}


class _Waiting(asyncio.Protocol):
    """A connection waiting for a slot, not read meanwhile; closed after WAIT_LIMIT."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        address = _address(transport)
        if self.gate.queued >= MAX_WAITING and not self.gate.make_room(address):
            self.transport = transport
            self.refuse()
            return
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(WAIT_LIMIT, self._expire)
        self.gate.waiting.setdefault(address, deque()).append(self)
        self.gate.queued += 1
        asyncio.get_running_loop().call_soon(self.gate.release)  # a slot may have freed meanwhile

    def _expire(self) -> None:
        self.refuse()

    def refuse(self) -> None:
        """503 and closed, unread (closed only, before a TLS handshake: a client would take the 503 for garbage)."""
        if self.transport is not None:
            if self.gate.tls is None:
                self.transport.write(BUSY)
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()


class _Handshake(asyncio.Protocol):
    """A TLS connection given a slot: its handshake, within HEAD_LIMIT, then aiohttp's handler. asyncio's own TLS
    server does the handshake before any protocol sees the connection, so that connections that never sent a
    ClientHello were held (for 60 s) outside every limit: 11,600 of them took every file descriptor."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.early: list[bytes] = []  # what the client sent right after its handshake, before the handler took over

    def data_received(self, data: bytes) -> None:
        self.early.append(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport) and self.gate.tls is not None
        transport.pause_reading()  # start_tls reads the ClientHello itself
        task = self.gate.loop.create_task(self._handshake(transport, self.gate.tls))
        self.gate.handshakes.add(task)
        task.add_done_callback(self.gate.handshakes.discard)

    async def _handshake(self, transport: asyncio.Transport, ctx: ssl.SSLContext) -> None:
        gate = self.gate
        try:
            tls = await gate.loop.start_tls(transport, self, ctx, server_side=True, ssl_handshake_timeout=HEAD_LIMIT)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as err:  # a scanner, a silent client
            log.debug("web: a TLS handshake failed: %s", err)
            transport.close()
            tls = None
            # Its traceback holds start_tls's frame, and with it asyncio's TLS protocol and its 256 KiB buffer, in a
            # cycle (the frame's waiter holds the exception) that only a rare full collection frees: 3,000 half
            # ClientHellos took RSS from 47 to 335 MB. Without it they are freed at once (+22 MB, flat).
            err.__traceback__ = err.__context__ = None
        if tls is None or tls.is_closing():
            gate.busy -= 1  # its slot is free
            gate.release()
            return
        handler = gate._handler()
        tls.set_protocol(handler)
        handler.connection_made(tls)
        if self.early:
            handler.data_received(b"".join(self.early))


def _address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "?"


class Gate:
    """At most MAX_CONNECTIONS connections in aiohttp's hands; then up to MAX_WAITING wait; then 503.

    A free slot goes to the addresses waiting in turn, the oldest of each first, and a full queue makes room
    for a newcomer from an address with fewer waiting: a client that opens thousands of connections (a
    dashboard gone wrong, a scanner) makes the others wait for one slot, not behind all of its connections,
    and cannot shut them out by filling the queue."""

    def __init__(self, server: web.Server, loop: asyncio.AbstractEventLoop, tls: ssl.SSLContext | None = None) -> None:
        self.server = server
        self.loop = loop
        self.tls = tls  # the handshake is done in a slot (`_Handshake`), never before admission
        # Slots held: connections in aiohttp's hands, and TLS handshakes; counted when given (`_slot`), not when
        # asyncio gets round to connection_made, or a burst accepted in one go took more than MAX_CONNECTIONS.
        self.busy = 0
        self.handshakes: set[asyncio.Task[None]] = set()
        self.waiting: dict[str, deque[_Waiting]] = {}  # by address, in turn: dict order, the one served goes last
        self.queued = 0  # in `waiting` (those closed meanwhile included, until their turn comes)

    def __call__(self) -> asyncio.BaseProtocol:
        if self.busy < MAX_CONNECTIONS and not self.queued:
            return self._slot()
        return _Waiting(self)  # which waits, or is refused at once when the queue is full (its address decides)

    def _slot(self) -> _Handler | _Handshake:
        """A slot's protocol; the slot is free again when its connection closes (a handshake's, if it fails)."""
        self.busy += 1
        return _Handshake(self) if self.tls is not None else self._handler()

    def make_room(self, address: str) -> bool:
        """The queue is full: the newest of the address with the most waiting is refused, when that is more than
        `address` would have; whether there is room for it now."""
        longest = max(self.waiting, key=lambda a: len(self.waiting[a]))
        if len(self.waiting[longest]) <= len(self.waiting.get(address, ())) + 1:
            return False
        self.waiting[longest].pop().refuse()
        self.queued -= 1
        return True

    def _handler(self) -> _Handler:
        handler = _Handler(self.server, loop=self.loop, **HANDLER_ARGS)
        handler.gate = self
        return handler

    def release(self) -> None:
        """A slot is free: hand it to the oldest connection still waiting of the address whose turn it is."""
        while self.queued and self.busy < MAX_CONNECTIONS:
            address = next(iter(self.waiting))
            queue = self.waiting.pop(address)
            wait = queue.popleft()
            self.queued -= 1
            if queue:
                self.waiting[address] = queue  # its next waits for the other addresses' turns
            transport = wait.transport
            if transport is None or transport.is_closing():
                continue
            if wait.timer is not None:
                wait.timer.cancel()
            wait.transport = None
            slot = self._slot()
            transport.set_protocol(slot)
            slot.connection_made(transport)
            if isinstance(slot, _Handler):
                transport.resume_reading()  # (a handshake reads when it starts)


def tls_context(cfg: WebSection) -> ssl.SSLContext | None:
    if cfg.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.tls.cert_file, cfg.tls.key_file)
    return ctx


def _more_files(wanted: int) -> None:
    """Raise the soft limit of open files towards `wanted` (within the hard limit), for waiting connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _lengthen_queue(server: asyncio.AbstractServer) -> None:
    """listen(QUEUE) on the server's sockets, keeping asyncio's small accept batch (BACKLOG)."""
    for ts in getattr(server, "sockets", ()):
        sock = socket.socket(fileno=os.dup(ts.fileno()))  # the same listening socket, through a second fd
        try:
            sock.listen(QUEUE)
        finally:
            sock.close()


async def serve(gw: Gateway, cfg: WebSection) -> None:
    """Serve until cancelled; a port that cannot be had is retried every 5 s, never fatal to the plant."""
    _more_files(MAX_CONNECTIONS + MAX_WAITING + 1024)
    site = Site(gw, cfg)
    runner = web.AppRunner(site.app(), **HANDLER_ARGS)
    await runner.setup()
    handler = runner.server
    assert handler is not None
    host, port = cfg.address
    loop = asyncio.get_running_loop()

    protocol = Gate(handler, loop)

    server = None
    failed = None
    ticks = asyncio.ensure_future(site.run_ticks())
    try:
        while server is None:
            try:
                protocol.tls = tls_context(cfg)  # (a certificate that cannot be read is retried with the port)
                server = await loop.create_server(protocol, host, port, backlog=BACKLOG, reuse_address=True)
            # ValueError: a host name asyncio cannot encode (UnicodeError, which check-config refuses; a config that
            # passed an older check-config must not end the daemon, only its page).
            except (OSError, ssl.SSLError, ValueError) as err:
                if str(err) != failed:
                    log.error("web: cannot serve on %s: %s; retrying every 5s", cfg.listen, err)
                    failed = str(err)
                await asyncio.sleep(5)
        _lengthen_queue(server)
        scheme = "https" if cfg.tls else "http"
        log.info("web: status page on %s://%s/ (%s)", scheme, cfg.listen,
                 "login required" if cfg.users_file else "no login: loopback only")
        if cfg.users_file and not cfg.tls and not loopback(host):
            log.warning("web: logins cross the network unencrypted; set web.tls to serve HTTPS")
        await asyncio.Event().wait()
    finally:
        ticks.cancel()
        if server is not None:
            server.close()
        await runner.cleanup()
        await asyncio.gather(ticks, return_exceptions=True)
