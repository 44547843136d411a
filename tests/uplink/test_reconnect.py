"""How long the uplink waits between attempts, against real sockets and a real broker: while the
broker is down it stays within seconds (spread, so a fleet does not return in one burst); a broker
that answers and refuses is backed off from exponentially. The waits are recorded, never timed."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway import config
from gateway.store.outbox import Outbox
from gateway.uplink.mqtt import JsonFormat, Uplink
from tests.helpers import free_port, gateway_config


async def recorded_waits(tmp_path: Path, port: int, count: int) -> list[float]:
    """The first `count` waits the uplink asks for while trying to reach 127.0.0.1:port, with the
    default reconnect settings."""
    text = gateway_config(tmp_path / "data", port).replace(", reconnect: {min: 200ms, max: 1s}", "")
    upstream = config.parse(text).upstream
    assert (upstream.reconnect.min, upstream.reconnect.down_max, upstream.reconnect.max) == (0.5, 2.0, 60.0)
    store = Outbox.open(str(tmp_path / "outbox.db"))
    uplink = Uplink(upstream, store, JsonFormat(client_id="reconnect-test", status_topic="t/status", offline_payload=b"{}"))
    waits: list[float] = []
    enough = asyncio.Event()

    async def record(seconds: float) -> None:  # the uplink's clock seam: record, do not sleep
        waits.append(seconds)
        if len(waits) >= count:
            enough.set()
        await asyncio.sleep(0)
    uplink._sleep = record  # type: ignore[method-assign]
    task = asyncio.create_task(uplink.run())
    try:
        await asyncio.wait_for(enough.wait(), 60)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await uplink.stop(flush_timeout=0)
        store.close()
    return waits[:count]


def test_a_broker_that_is_down_is_tried_again_within_seconds_spread_out(tmp_path):
    waits = asyncio.run(recorded_waits(tmp_path, free_port(), 40))  # nothing listens: connection refused
    assert all(0.5 <= w <= 2.0 for w in waits), waits  # reconnect.min .. reconnect.down_max, for ever
    late = waits[5:]
    assert max(late) - min(late) > 0.8, late  # full jitter: a fleet does not come back in step
    assert sum(late) / len(late) > 1.0  # and does not hammer either


def test_a_broker_that_refuses_us_is_backed_off_from_exponentially(tmp_path):
    pytest.importorskip("amqtt")
    from gateway import broker

    async def main() -> list[float]:
        port = free_port()
        server = await broker.start(f"127.0.0.1:{port}", allow_anonymous=False)  # no users: Not authorized
        try:
            return await recorded_waits(tmp_path, port, 8)
        finally:
            await server.shutdown()
    waits = asyncio.run(main())
    assert waits[0] < 1.0 and waits[-1] > 20, waits  # 0.5 s doubling towards reconnect.max (60 s)
    assert waits == sorted(waits) or max(waits) > 20


def waits_against_peer(tmp_path: Path, handle: Callable[[socket.socket], None], count: int = 8) -> list[float]:
    """The uplink's first `count` waits against a TCP peer that gives each connection it accepts to `handle`."""
    done = threading.Event()
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)

    def serve() -> None:
        with server:
            while not done.is_set():
                try:
                    conn, _ = server.accept()
                except OSError:
                    continue
                handle(conn)
    thread = threading.Thread(target=serve)
    thread.start()
    try:
        return asyncio.run(recorded_waits(tmp_path, server.getsockname()[1], count))
    finally:
        done.set()
        thread.join(5)


@pytest.mark.parametrize("peer", ["closes at once", "never answers"])
def test_a_proxy_whose_broker_is_gone_is_tried_again_within_seconds(tmp_path, monkeypatch, peer):
    """A proxy or load balancer takes the TCP connection while its broker is down or cut off: it closes
    at once, or the CONNECT vanishes. Neither costs a broker anything; an exponential wait (to 60 s)
    would hold the gateway back long after the network healed."""
    from gateway.uplink import mqtt as uplink_module
    monkeypatch.setattr(uplink_module, "CONNACK_LIMIT", 0.3)  # the wait for a CONNACK that never comes
    held: list[socket.socket] = []
    try:
        waits = waits_against_peer(tmp_path, socket.socket.close if peer == "closes at once" else held.append)
    finally:
        for conn in held:  # (read nothing, answered nothing)
            conn.close()
    assert all(0.5 <= w <= 2.0 for w in waits), waits  # reconnect.min .. reconnect.down_max


def test_a_broker_that_closes_each_connection_it_accepts_is_backed_off_from_and_said_once(tmp_path, caplog):
    """A fuzzing pass: a broker that closes every connection right after its CONNACK (another client with this
    client_id taking the session over, an ACL) was connected to again every 0.55 s exactly, for ever, with an
    ERROR and a WARNING each time: in step across a fleet, and nothing said what was going on."""
    def accept_then_close(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(2)
            try:
                conn.recv(1024)  # the CONNECT
                conn.sendall(b"\x20\x02\x00\x00")  # CONNACK: accepted; then the connection is closed
            except OSError:
                pass
    with caplog.at_level(logging.WARNING):
        waits = waits_against_peer(tmp_path, accept_then_close)
    assert waits[0] <= 2.0 and waits[-1] > 20, waits  # doubling from reconnect.min towards reconnect.max
    said = [r.getMessage() for r in caplog.records if "within 10s of accepting it" in r.getMessage()]
    assert len(said) == 1 and "'reconnect-test'" in said[0], said
