"""Local MQTT sensors: JSON messages on the local broker, mapped to tags.

One paho client per gateway subscribes to every `source: mqtt` device's topic (QoS 1)
and hands each message to its device as it arrives: these sources push, they are not
polled. A message becomes a Sample by the device's `fields` map (`tag: json.field`,
dots reach into nested objects); the sample time comes from `timestamp_field` when set
(epoch seconds, epoch milliseconds or RFC 3339), else from the arrival. A message larger than
`local_broker.max_message_size` is not parsed at all: it is an error of its device.

What a sensor gets wrong stays with its tags: malformed JSON makes every tag of the
device an error; a missing field or a value that is not a number makes that tag an
error; a bad timestamp falls back to the arrival time. Each is counted and said in
`Sample.problem`; the device runner logs it once per change.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config import LocalBrokerSection, MqttDevice
from gateway.credentials import read_secret
from gateway.errors import SourceError
from gateway.logs import fields, quoted
from gateway.retry import backoff, down
from gateway.sample import ERROR, OK, Sample
from gateway.supervise import in_daemon_thread, within
from gateway.units import duration_text, rfc3339

log = logging.getLogger("edge_gateway.sources.mqtt")

QUEUE_LIMIT = 1000  # messages per device waiting for the pipeline; beyond this the oldest are dropped


class Refused(Exception):
    """The local broker answered the CONNECT with a refusal (credentials, not authorized)."""


class MqttLink:
    """The gateway's one connection to the local broker, shared by all mqtt devices.

    `run()` is a long-lived loop (the gateway supervises it as `local-mqtt`); `aclose()` disconnects.
    """

    def __init__(self, broker: LocalBrokerSection, client_id: str) -> None:
        self.broker = broker
        self.client_id = client_id
        self.sources: list[MqttSource] = []
        self.connected = False
        self.last_error: str | None = None
        self._client: mqtt.Client | None = None
        self._lost = asyncio.Event()
        self._inbox: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()  # from paho's thread (`_hand_over`)
        self._inbox_lock = threading.Lock()
        self._draining = False

    def add(self, source: MqttSource) -> None:
        """A device's source; connected already (a reload added the device), its topic is subscribed at once."""
        self.sources.append(source)
        if self.connected and self._client is not None:
            self._client.subscribe(source.device.topic, qos=1)

    def remove(self, source: MqttSource) -> None:
        """A device's source closed (a reload took the device out or changed it): its topic is no longer taken,
        unless another device's is the same."""
        if source in self.sources:
            self.sources.remove(source)
        topic = source.device.topic
        if self.connected and self._client is not None and all(s.device.topic != topic for s in self.sources):
            self._client.unsubscribe(topic)

    async def aclose(self) -> None:
        await in_daemon_thread(self._disconnect, 3.0, "the local broker connection")

    # -- connection, with backoff; messages arrive on paho's thread ---------------------------
    async def run(self) -> None:
        """Connect, subscribe every device's topic, reconnect with backoff; until cancelled."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            self._lost = asyncio.Event()
            connected: asyncio.Future[Any] = loop.create_future()
            try:
                # connect() blocks on the socket (and DNS): not on the loop's thread.
                await asyncio.to_thread(self._connect, loop, connected, self._lost)
                rc = await within(connected, 10)
                if rc != 0:
                    raise Refused(f"the local broker refused the connection: {rc}")
            except (OSError, Refused, asyncio.TimeoutError, ValueError) as err:
                self._disconnect()
                why = str(err) or "no CONNACK within 10s"
                self._failed(f"local broker {self.broker.listen}: {why}")
                attempt += 1
                # Down (refused, reset): back within seconds; answering and refusing us: exponential.
                await asyncio.sleep(backoff(attempt, 0.5, 30.0, 0.3) if isinstance(err, (Refused, ValueError))
                                    else down(attempt, 0.5, 2.0))
                continue
            attempt = 0
            self.connected, self.last_error = True, None
            log.info("connected to the local broker %s (%d mqtt devices)", self.broker.listen, len(self.sources))
            await self._lost.wait()
            self._disconnect()
            self._failed(f"local broker {self.broker.listen}: connection lost")

    def _connect(self, loop: asyncio.AbstractEventLoop, connected: asyncio.Future[Any], lost: asyncio.Event) -> None:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             reconnect_on_failure=False)
        creds = self.broker.client
        if creds is not None:
            client.username_pw_set(creds.username, read_secret(creds.password_file))

        def settle(result: int | str) -> None:  # on the loop's thread: the first answer counts
            if not connected.done():
                connected.set_result(result)

        def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
            if not reason.is_failure:
                for source in self.sources:
                    c.subscribe(source.device.topic, qos=1)
            loop.call_soon_threadsafe(settle, 0 if not reason.is_failure else str(reason))

        def on_disconnect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
            loop.call_soon_threadsafe(lost.set)
            loop.call_soon_threadsafe(settle, str(reason))

        def on_message(c: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
            arrived = time.time()
            size, limit = len(message.payload), self.broker.max_message_size
            for source in self.sources:
                if mqtt.topic_matches_sub(source.device.topic, message.topic):
                    if size > limit:  # never parsed: a 10 MB JSON document would stay in the heap
                        self._hand_over(loop, source.deliver_error, (SourceError(
                            f"a message above local_broker.max_message_size ({limit} bytes) on {source.device.topic}: "
                            f"{size} bytes on {message.topic}, dropped"),))
                    else:
                        self._hand_over(loop, source.deliver, (message.topic, message.payload, arrived))

        client.on_connect, client.on_disconnect, client.on_message = on_connect, on_disconnect, on_message
        host, port = self.broker.address
        self._client = client
        client.connect(host, port, keepalive=30)
        client.loop_start()

    def _hand_over(self, loop: asyncio.AbstractEventLoop, call: Callable[..., None], args: tuple[Any, ...]) -> None:
        """From paho's thread to the loop: one wake-up per burst, not per message. Each wake-up is a byte in
        asyncio's self-pipe, which a flood of sensor messages filled: a signal's byte (SIGTERM, SIGHUP) was then
        lost, with a traceback on stderr."""
        with self._inbox_lock:
            self._inbox.append((call, args))
            if self._draining:
                return
            self._draining = True
        loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        while True:
            with self._inbox_lock:
                if not self._inbox:
                    self._draining = False
                    return
                batch, self._inbox = self._inbox, deque()
            for call, args in batch:
                call(*args)

    def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self.connected = False

    def _failed(self, why: str) -> None:
        if why != self.last_error:
            self.last_error = why
            for source in self.sources:
                source.deliver_error(SourceError(why))


class MqttSource:
    """One device's messages, as they arrive; silence longer than 3 intervals is a failed reading."""

    skipped_ticks = 0  # nothing is polled

    def __init__(self, device: MqttDevice, link: MqttLink) -> None:
        self.device = device
        self.link = link
        self.dropped = 0  # messages dropped unread because the pipeline fell behind (health's `dropped`)
        self._dropping = False  # since the first drop, until the queue is empty again: said once each way
        self._last_ts: float | None = None
        self._queue: asyncio.Queue[Sample | SourceError] | None = None
        link.add(self)

    def _q(self) -> asyncio.Queue[Sample | SourceError]:
        if self._queue is None:
            self._queue = asyncio.Queue()
        return self._queue

    def deliver(self, topic: str, payload: bytes | bytearray, arrived: float) -> None:
        queue = self._q()
        if queue.qsize() >= QUEUE_LIMIT:
            queue.get_nowait()
            self.dropped += 1
            if not self._dropping:
                self._dropping = True
                log.warning("device %s: messages on %s arrive faster than they are processed: with %d waiting, "
                            "the oldest are dropped (counted in health's dropped)", self.device.name,
                            self.device.topic, QUEUE_LIMIT, extra=fields(self.device.name, "messages_dropped"))
        queue.put_nowait(decode(self.device, payload, arrived))

    def deliver_error(self, err: SourceError) -> None:
        self._q().put_nowait(err)

    async def samples(self) -> AsyncIterator[Sample]:
        device = self.device
        silence = max(3 * device.interval, device.timeout)
        while True:
            try:
                item = await within(self._q().get(), silence)
            except asyncio.TimeoutError:
                quiet = f"no message on {device.topic} for {silence:g}s"
                # While the link is down, its reason (refused: Not authorized) is the device's, not the silence.
                down = self.link.last_error if not self.link.connected else None
                item = SourceError(f"{down} ({quiet})" if down else quiet)
            if self._dropping and self._q().empty():
                self._dropping = False
                log.info("device %s: caught up with its messages (%d dropped so far)", device.name, self.dropped,
                         extra=fields(device.name, "messages_caught_up"))
            sample = Sample.failure(device.name, time.time(), device.tags, str(item)) \
                if isinstance(item, SourceError) else item
            # Never before the last sample (a sensor's late or reordered message): the pipeline's clock, its
            # shifts, counters and events, only goes forward.
            if self._last_ts is not None and sample.ts < self._last_ts:
                sample.ts = self._last_ts
            self._last_ts = sample.ts
            yield sample

    async def aclose(self) -> None:
        """The link's connection is the gateway's (`Links`): this device's topic is let go; the last one's close ends
        the connection."""
        self.link.remove(self)
        if not self.link.sources:
            await self.link.aclose()


def decode(device: MqttDevice, payload: bytes | bytearray, arrived: float) -> Sample | SourceError:
    """One message → a Sample, or a SourceError when nothing in it can be used."""
    try:
        try:
            doc = json.loads(payload)
        except ValueError as err:  # an integer of more digits than Python reads: that field's error (`_Digits`)
            if "integer string conversion" not in str(err):
                raise
            doc = json.loads(payload, parse_int=_integer)  # (not always: it takes the C scanner's speed away)
    except RecursionError:
        return SourceError(f"JSON nested too deeply on {device.topic}: payload {_preview(payload)}")
    except ValueError as err:  # not JSON, not UTF-8/16/32, or an integer of thousands of digits
        return SourceError(f"malformed JSON on {device.topic}: {err} (payload {_preview(payload)})")
    if not isinstance(doc, dict):
        return SourceError(f"expected a JSON object on {device.topic}: got {type(doc).__name__} "
                           f"(payload {_preview(payload)})")
    values: dict[str, float | None] = {}
    quality: dict[str, str] = {}
    problems: list[str] = []
    for tag, path in device.fields.items():
        found, value = _lookup(doc, path)
        if not found:
            problems.append(f"field {path} missing")
        elif (number := _number(value)) is None:
            problems.append(f"field {path}: expected a number, got {_show(value)}")
        else:
            values[tag], quality[tag] = number, OK
            continue
        values[tag], quality[tag] = None, ERROR
    ts = arrived
    if device.timestamp_field:
        found, raw = _lookup(doc, device.timestamp_field)
        parsed = _timestamp(raw) if found else None
        if parsed is None:
            problems.append(f"timestamp field {device.timestamp_field} "
                            f"{'missing' if not found else 'not a time: ' + _show(raw)}; arrival time used")
        elif not arrived - LATE_S <= parsed <= arrived + max(3 * device.interval, AHEAD_S):
            # A sensor whose clock was never set (1970) or runs ahead would take the device's shifts, counters
            # and events there: its message counts from when it came.
            problems.append(f"timestamp field {device.timestamp_field} far from the arrival time (a sensor clock not "
                            f"set?): {rfc3339(parsed)}, {duration_text(abs(parsed - arrived))} "
                            f"{'before' if parsed < arrived else 'after'} it; arrival time used")
        else:
            ts = parsed
    return Sample(device.name, ts, values, quality, "; ".join(problems) or None)


class _Digits(str):
    """An integer of more digits than Python reads (`sys.get_int_max_str_digits`): that field's error, not the whole
    message's (its other fields are good)."""


def _integer(text: str) -> int | _Digits:
    return int(text) if len(text) <= 400 else _Digits(text)


def _lookup(doc: dict[str, Any], path: str) -> tuple[bool, Any]:
    node = doc
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _number(value: Any) -> float | None:
    """A JSON value as a finite float (true/false as 1/0), or None."""
    if not isinstance(value, (bool, int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return number if math.isfinite(number) else None


# Sample times a sensor may give: UNIX seconds from 1970 up to the year 3000 (beyond: a broken clock), and of
# those only within a day before its message arrived (a sensor that buffered while the broker was away) and a
# minute (or 3 intervals) after it (clocks a little apart).
LATEST_TS = 32503680000.0
LATE_S, AHEAD_S = 86400.0, 60.0


def _timestamp(raw: Any) -> float | None:
    """Epoch seconds, epoch milliseconds or RFC 3339 with a zone, as UNIX seconds; None if not a time."""
    ts: float | None
    if isinstance(raw, str):
        try:
            parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            return None
        ts = parsed.timestamp() if parsed.tzinfo is not None else None  # a time without zone is ambiguous
    else:
        ts = None if isinstance(raw, bool) else _number(raw)
        if ts is not None and ts > 1e11:
            ts /= 1000.0  # epoch milliseconds
    return ts if ts is not None and 0 < ts < LATEST_TS else None


def _show(value: Any) -> str:
    """A value as the log shows it: short, whatever it is."""
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "a list"
    if isinstance(value, _Digits) or (isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**40):
        return "an integer too large for a number"
    return json.dumps(value)[:40]


def _preview(payload: bytes | bytearray) -> str:
    more = f"… ({len(payload)} bytes)" if len(payload) > 60 else ""
    return quoted(payload[:60].decode("utf-8", "replace")) + more
