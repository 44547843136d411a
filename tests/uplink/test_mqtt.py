"""The uplink's delivery core with the JSON format, in process against the embedded amqtt broker:
it runs as an async context manager and, on leaving it, delivers what is owed, says offline and
disconnects (no polling stop)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator

import paho.mqtt.client as mqtt
import pytest

from gateway import config, contract
from gateway.store.outbox import Outbox
from gateway.uplink.mqtt import JsonFormat, Uplink
from tests.helpers import free_port, gateway_config


def test_the_uplink_is_an_async_context_manager_that_delivers_before_it_closes(tmp_path):
    pytest.importorskip("amqtt")
    from gateway import broker

    topics = contract.Topics("edge/lab/gw")
    received: list[tuple[str, bytes]] = []
    lock = threading.Lock()

    def on_message(client, userdata, message) -> None:
        with lock:
            received.append((message.topic, bytes(message.payload)))

    async def main() -> None:
        port = free_port()
        server = await broker.start(f"127.0.0.1:{port}", allow_anonymous=True)
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="uplink-test-sub")
        sub.on_message = on_message
        store = Outbox.open(str(tmp_path / "outbox.db"))
        try:
            await asyncio.to_thread(sub.connect, "127.0.0.1", port)
            sub.loop_start()
            sub.subscribe("edge/#", qos=1)
            await asyncio.sleep(0.2)  # the SUBACK
            upstream = config.parse(gateway_config(tmp_path / "data", port)).upstream
            fmt = JsonFormat(client_id="uplink-test", status_topic=topics.status, offline_payload=b'{"state":"offline"}')
            fmt.online_payload = b'{"state":"online"}'
            async with Uplink(upstream, store, fmt, flush_timeout=10) as uplink:
                for _ in range(200):  # connected within 10 s
                    if uplink.connected:
                        break
                    await asyncio.sleep(0.05)
                assert uplink.connected
                for i in range(50):
                    store.stage(topics.telemetry("pump1"), {"ts": "2026-12-05T08:00:00.000Z", "i": i}, created=i)
                store.commit()
                uplink.wake()
            # Left: every row acknowledged before the farewell.
            store.commit()
            assert store.stats.messages == 0 and uplink.stats.acked == 50 and not uplink.connected
            await asyncio.sleep(0.3)  # the subscriber's copies
        finally:
            sub.loop_stop()
            sub.disconnect()
            store.close()
            await server.shutdown()

    asyncio.run(main())
    with lock:
        got = list(received)
    data = [json.loads(p)["i"] for t, p in got if t.endswith("/telemetry")]
    assert data == list(range(50))
    status = [p for t, p in got if t == topics.status]
    assert status[0] == b'{"state":"online"}' and status[-1] == b'{"state":"offline"}'


def small_packet_broker(tmp_path, port: int):
    """mosquitto refusing any packet above 600 bytes (it closes the connection on one), started."""
    from tests.helpers import BrokerProcess, mosquitto_available
    if not mosquitto_available():
        pytest.skip("mosquitto not installed")
    return BrokerProcess("mosquitto", tmp_path, port,
                         f"max_packet_size 600\nlistener {port} 127.0.0.1\nallow_anonymous true\n").start()


@contextlib.asynccontextmanager
async def running(uplink: Uplink) -> AsyncIterator[Uplink]:
    """The uplink's loop for the block; stopped and awaited after it, also when the block fails."""
    task = asyncio.create_task(uplink.run())
    try:
        yield uplink
    finally:
        await uplink.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def until_stuck(uplink: Uplink) -> dict:
    """The uplink's `stuck` once it says so (60 s at most: empty if it never does; 5 closes with their backoff take
    10-17 s here, more beside the rest of the suite on two cores)."""
    for _ in range(1200):
        if uplink.stats.stuck is not None:
            break
        await asyncio.sleep(0.05)
    return dict(uplink.stats.stuck or {})


@pytest.mark.slow  # a real mosquitto, restarted
def test_a_message_the_broker_refuses_is_named_once_kept_and_delivered_when_the_limit_is_raised(tmp_path, caplog):
    """mosquitto's max_packet_size below one message's size: it closes the connection at that message, every
    time, and nothing behind it went either, with two log lines per attempt and nothing saying which. Now the
    uplink says once which message it is (seq, topic, size), health shows it, and the message is kept: with
    the limit raised it goes, and the rest after it, in order."""
    from tests.helpers import BrokerProcess
    port = free_port()
    brokers = [small_packet_broker(tmp_path, port)]
    topics = contract.Topics("edge/lab/gw")
    store = Outbox.open(str(tmp_path / "outbox.db"))
    for i in range(6):  # the fourth is a shift summary of many counters: 2 KB
        store.stage(topics.telemetry("pump1"), {"i": i, "pad": "x" * (2000 if i == 3 else 10)}, created=time.time())
    store.commit()
    upstream = config.parse(gateway_config(tmp_path / "data", port)).upstream
    fmt = JsonFormat(client_id="stuck-test", status_topic=topics.status, offline_payload=b'{"state":"offline"}')

    async def main() -> dict:
        async with running(Uplink(upstream, store, fmt)) as uplink:
            stuck = await until_stuck(uplink)
            store.commit()  # (acknowledged rows leave the file at the next commit)
            assert store.stats.messages == 3  # the first three went; the refused one and those after it wait
            brokers[0].kill()
            brokers.append(BrokerProcess("mosquitto", tmp_path, port))  # the limit raised
            brokers[-1].start()
            for _ in range(400):
                store.commit()
                if store.stats.messages == 0 and uplink.stats.stuck is None:
                    break
                await asyncio.sleep(0.05)
            assert store.stats.messages == 0 and uplink.stats.stuck is None
            return stuck

    try:
        with caplog.at_level("INFO", logger="edge_gateway.uplink.mqtt"):
            stuck = asyncio.run(main())
    finally:
        for b in brokers:  # every broker this test started, also when it failed half-way
            b.kill()
        store.close()
    assert stuck["seq"] == 4 and stuck["topic"] == "edge/lab/gw/pump1/telemetry" and stuck["bytes"] > 2000
    said = [r.getMessage() for r in caplog.records]
    assert sum("it refuses that message" in m for m in said) == 1
    assert any("acknowledges messages again (the message seq 4 went through)" in m for m in said)


@pytest.mark.slow  # a real mosquitto
def test_a_packet_of_the_format_s_own_that_the_broker_refuses_is_the_one_named(tmp_path, caplog):
    """A fuzzing pass: a Sparkplug DBIRTH above mosquitto's max_packet_size closed every connection, and the log
    named the oldest row (327 bytes) as the message refused. Here the format's own packet is the retained status
    of a gateway with many devices: the one named is it, with its size."""
    port = free_port()
    broker = small_packet_broker(tmp_path, port)
    topics = contract.Topics("edge/lab/gw")
    store = Outbox.open(str(tmp_path / "outbox.db"))
    store.stage(topics.telemetry("pump1"), {"i": 0}, created=time.time())
    store.commit()
    upstream = config.parse(gateway_config(tmp_path / "data", port)).upstream
    fmt = JsonFormat(client_id="stuck-test", status_topic=topics.status, offline_payload=b'{"state":"offline"}')
    fmt.online_payload = json.dumps({"state": "online", "devices": {f"line{i}": "ok" for i in range(200)}}).encode()

    async def main() -> dict:
        async with running(Uplink(upstream, store, fmt)) as uplink:
            return await until_stuck(uplink)

    try:
        with caplog.at_level("INFO", logger="edge_gateway.uplink.mqtt"):
            stuck = asyncio.run(main())
    finally:
        broker.kill()
        store.close()
    assert stuck["topic"] == topics.status and stuck["bytes"] == len(fmt.online_payload), stuck
    said = [r.getMessage() for r in caplog.records if "closed the connection 5 times" in r.getMessage()]
    assert len(said) == 1 and f"after the packet {topics.status} ({len(fmt.online_payload)} bytes)" in said[0], said
