"""The uplink: committed outbox rows to the upstream broker, in seq order, through a format.

Two parts with one seam between them:
- `Uplink` owns delivery: one paho client per connection (clean session, its own network
  thread), the session, the in-flight window, acknowledgements, its own lifetime. The outbox is
  the only record of what is owed: on every (re)connect it starts again from the oldest
  unacknowledged row, keeps at most `max_inflight` QoS >= 1 packets awaiting their PUBACK (one
  per row in JSON, one per batch of QoS 0 rows in Sparkplug), and acknowledges a row to the
  outbox only when the broker has acknowledged it. Callbacks from paho's thread are handed
  to the event loop; all state lives on the loop's thread.
- A `Format` (JSON here, Sparkplug B in `gateway.uplink.sparkplug.uplink`) turns a stored message into
  packets: the Will, what starts a session, the data, the farewell. It never sees paho.

Acknowledgement rule, the same for every format: a row is acknowledged by the PUBACK of the last
QoS >= 1 packet made from it, or, when its packets are all QoS 0 (Sparkplug's DDATA), by the
PUBACK of the next QoS >= 1 packet on the same connection: the broker handles one connection's
packets in order, so that PUBACK means everything before it arrived. A batch that ends with such
rows is closed by the format's `marker()` packet.

Order: rows go out in seq order. A format that is `live_first` (Sparkplug) has two streams once its
session is ready: the rows committed since (live) at once, and the backlog staged before (history)
in the rest of the window, each in seq order, until the backlog is out; then one stream again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config import UpstreamSection
from gateway.credentials import read_secret
from gateway.errors import UplinkError
from gateway.logs import fields
from gateway.retry import backoff, down
from gateway.store.outbox import Message, Outbox
from gateway.supervise import in_daemon_thread, run_all, within

log = logging.getLogger("edge_gateway.uplink.mqtt")


@dataclass(frozen=True)
class Packet:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


@dataclass
class Reaction:
    """What a format does about a message it subscribed to: packets to send, and whether every row
    not yet acknowledged is to be sent again, oldest first (Sparkplug: the primary host came back)."""

    packets: list[Packet] = field(default_factory=list)
    resend: bool = False
    reconnect: bool = False  # end this connection after the packets (Sparkplug: the primary host went offline)


class Format(Protocol):
    """Stored messages as packets on the wire; knows nothing of connections, acks or threads."""

    client_id: str
    online_payload: bytes  # the retained status the gateway last gave (JSON publishes it)
    damaged: int  # rows it could not send: not what the gateway writes (Sparkplug; JSON sends rows as stored)
    # Whether rows committed after the session became ready go out at once, ahead of the older backlog
    # (Sparkplug: the backlog is history and may follow live data); else every row in seq order (JSON).
    live_first: bool

    def will(self) -> Packet:
        """The Will of the next CONNECT; must not change state (the attempt may never send a CONNECT)."""
        ...

    def connect_answered(self) -> None:
        """The broker answered the CONNECT carrying `will()` (a CONNACK, accepted or refused): it saw that
        Will (Sparkplug: bdSeq counts it). A CONNECT written into a connection that closed unanswered (a
        proxy whose broker is down) does not count: no broker ever held its Will."""
        ...

    def subscriptions(self) -> list[tuple[str, int]]:
        """Topic filters (with QoS) whose messages go to `received`."""
        ...

    def session_started(self, newest: Callable[[], list[Message]]) -> list[Packet]:
        """What opens a session (JSON: the online status; Sparkplug: the births). Called after the CONNACK and
        again at each wake-up while not `ready`; `newest` gives the newest stored message of each topic."""
        ...

    @property
    def ready(self) -> bool:
        """Whether stored rows may be sent now (Sparkplug: born, and the primary host is online)."""
        ...

    def data(self, msg: Message) -> list[Packet]:
        """The packets for one stored message, in order (none for what this format does not carry)."""
        ...

    def live(self, topic: str, payload: bytes, retain: bool, body: Mapping[str, Any] | None) -> list[Packet]:
        """The packets for a message that is not stored (the status, health: `body` is the report)."""
        ...

    def received(self, topic: str, payload: bytes) -> Reaction:
        """A message on a subscribed topic (a command, the primary host's STATE)."""
        ...

    def marker(self, last_seq: int) -> Packet:
        """A QoS >= 1 packet closing a batch of QoS 0 packets (its PUBACK acknowledges them)."""
        ...

    def probe(self, last_seq: int) -> Packet:
        """A QoS >= 1 packet that tells a subscriber nothing new: its PUBACK shows the connection carries
        data again after packets sent before it went unacknowledged (`last_seq`: the last row handed over)."""
        ...

    def farewell(self) -> Packet:
        """The QoS >= 1 packet an orderly end sends (the Will is for an unannounced one)."""
        ...

    def lost(self) -> None:
        """The connection ended: whatever a session had established is gone."""
        ...


class JsonFormat:
    """The JSON contract (`contract.py`): each row as stored, at the configured QoS; the retained
    status online at the start of a session, offline as the Will and the farewell."""

    def __init__(self, *, client_id: str, status_topic: str, offline_payload: bytes, qos: int = 1) -> None:
        self.client_id = client_id
        self.damaged = 0
        self.status_topic = status_topic
        self.offline_payload = offline_payload
        self.online_payload = b""
        self.qos = qos

    ready = True
    live_first = False  # subscribers de-duplicate on seq and expect it in order

    def will(self) -> Packet:
        return Packet(self.status_topic, self.offline_payload, 1, True)

    def connect_answered(self) -> None:
        pass

    def subscriptions(self) -> list[tuple[str, int]]:
        return []

    def session_started(self, newest: Callable[[], list[Message]]) -> list[Packet]:
        return [Packet(self.status_topic, self.online_payload, 1, True)]

    def data(self, msg: Message) -> list[Packet]:
        return [Packet(msg.topic, msg.payload, self.qos)]

    def live(self, topic: str, payload: bytes, retain: bool, body: Mapping[str, Any] | None) -> list[Packet]:
        return [Packet(topic, payload, 1, retain)]

    def received(self, topic: str, payload: bytes) -> Reaction:
        return Reaction()

    def marker(self, last_seq: int) -> Packet:  # never needed: every row is QoS >= 1
        return Packet(f"{self.status_topic}/delivered", str(last_seq).encode(), 1)

    def probe(self, last_seq: int) -> Packet:
        return Packet(self.status_topic, self.online_payload, 1, True)  # the retained status, as it already is

    def farewell(self) -> Packet:
        return Packet(self.status_topic, self.offline_payload, 1, True)

    def lost(self) -> None:
        pass


@dataclass
class UplinkStats:
    connected: bool = False
    connects: int = 0
    reconnects: int = 0
    published: int = 0
    acked: int = 0
    last_ack: float | None = None
    last_error: str | None = None
    # The oldest row the broker closed the connection on, again and again, acknowledging nothing: health's
    # `upstream.stuck` {seq, topic, bytes, closes} once that is STUCK_AFTER times in a row (see `_closed_on`).
    stuck: dict[str, Any] | None = None


class Uplink:
    """Delivery of the outbox through `fmt`. `async with Uplink(...)` runs it and, on exit, delivers
    what it can within `flush_timeout`, says farewell and disconnects; or `run()` under a supervisor
    and `stop()`."""

    def __init__(self, upstream: UpstreamSection, store: Outbox, fmt: Format, *, flush_timeout: float = 5.0) -> None:
        self.cfg = upstream
        self.store = store
        self.format = fmt
        self.flush_timeout = flush_timeout
        self.stats = UplinkStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self._inflight: dict[int, list[tuple[int, int]]] = {}  # paho mid -> the rows its PUBACK acknowledges
        # paho mid -> when it was handed to paho (monotonic), in the order sent (`_sent`): the first is the oldest
        self._sent_at: dict[int, float] = {}
        self._probes: dict[int, float] = {}  # paho mid -> when a probe was sent (see _check_acks)
        self._cursor = 0  # highest seq handed to paho on this connection (of the backlog, while it replays apart)
        self._split: int | None = None  # live_first: rows above it are live, at or below it the backlog (0: none)
        self._live_cursor = 0  # highest seq above the split handed to paho
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()  # an acknowledgement arrived or the pump found nothing to send
        self._lost = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._connack: asyncio.Future[Any] | None = None
        self._caught_up = True  # the last fetch found no more rows than it asked for
        self._rng = random.Random()
        self._acks: deque[float] = deque(maxlen=10_000)
        self._task: asyncio.Task[None] | None = None
        self._leaving = False  # this connection is being ended on purpose
        self._acked_here = False  # the broker acknowledged a row on this connection
        self._largest: tuple[str, int] | None = None  # the largest packet of the format's own on this connection
        self._suspect: tuple[int, int] | None = None  # (oldest row, connections closed on it in a row): `_closed_on`

    # -- public -------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self.stats.connected

    @property
    def inflight(self) -> int:
        """Rows handed to the broker and not yet acknowledged."""
        return sum(len(rows) for rows in self._inflight.values())

    @property
    def online_payload(self) -> bytes:
        return self.format.online_payload

    @online_payload.setter
    def online_payload(self, payload: bytes) -> None:
        self.format.online_payload = payload

    def wake(self) -> None:
        """New rows are committed: send them if there is room in the window."""
        self._wake.set()

    def publish_live(self, topic: str, payload: bytes, retain: bool = False,
                     body: Mapping[str, Any] | None = None) -> bool:
        """Publish a message that is not stored (status, health); False when not connected or not ready."""
        client = self._client
        if not self.connected or client is None or not self.format.ready or self._overdue() > ACK_GRACE:
            return False  # overdue: the network may be swallowing packets (the probes find out)
        packets = self.format.live(topic, payload, retain, body)
        for p in packets:
            client.publish(p.topic, p.payload, qos=p.qos, retain=p.retain)
        return bool(packets)

    def publish_rate(self, window: float = 10.0) -> float:
        now = time.monotonic()
        return sum(1 for t in self._acks if now - t <= window) / window

    async def __aenter__(self) -> Uplink:
        self._task = asyncio.create_task(self.run(), name="uplink")
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop(self.flush_timeout)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def run(self) -> None:
        """The connection loop and the pump, together until cancelled; either failing fails both."""
        self._loop = asyncio.get_running_loop()
        await run_all(**{"uplink-connection": self._connection_loop(), "uplink-pump": self._pump()})

    async def stop(self, flush_timeout: float = 5.0) -> None:
        """Deliver the backlog while connected (up to `flush_timeout`), say farewell, disconnect."""
        deadline = time.monotonic() + flush_timeout
        self._wake.set()
        while self.connected and self.format.ready and not self._drained():
            self._progress.clear()
            try:
                await within(self._progress.wait(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
        self._stop_event.set()
        client = self._client
        if client is not None and self.connected:
            p = self.format.farewell()
            info = client.publish(p.topic, p.payload, qos=p.qos, retain=p.retain)
            await asyncio.to_thread(_wait_published, info, max(0.5, deadline - time.monotonic()))
            client.disconnect()
        self._lost.set()
        self._wake.set()
        await self._drop_client()

    def _drained(self) -> bool:
        return not self._inflight and not self.store.fetch(self._cursor, 1)

    # -- connection ----------------------------------------------------------------------
    async def _connection_loop(self) -> None:
        """Connect, deliver, reconnect with jittered backoff; after stop(), wait to be cancelled."""
        attempt = flaps = 0
        policy = self.cfg.reconnect
        while not self._stop_event.is_set():
            try:
                await self._connect()
            except UplinkError as err:
                self._fail(str(err))
                await self._sleep(backoff(attempt, policy.min, policy.max, policy.jitter, self._rng) if err.reached
                                  else down(attempt, policy.min, policy.down_max, self._rng))
                attempt += 1
                continue
            attempt, connected = 0, time.monotonic()
            while not self._lost.is_set():
                try:
                    await within(self._lost.wait(), 1.0)
                except asyncio.TimeoutError:
                    self._check_acks()
            leaving = self._leaving
            await self._drop_client()
            if self._stop_event.is_set():
                break
            # The first attempt after a loss: soon, spread over the fleet. A connection the broker keeps closing
            # within seconds of accepting it waits longer each time, as a refusal does.
            flaps = flaps + 1 if time.monotonic() - connected < SHORT_LIVED and not leaving else 0
            if flaps == FLAPS_SAID:
                log.warning("the upstream closed the connection within %gs of accepting it %d times in a row: another "
                            "client with the client_id %r (a cloned gateway?), an ACL, or a packet above its size "
                            "limit; waiting longer between attempts (up to reconnect.max)", SHORT_LIVED, flaps,
                            self.format.client_id, extra=fields(event="upstream_flapping"))
            await self._sleep(backoff(flaps, policy.min, policy.max, policy.jitter, self._rng) if flaps
                              else down(1, policy.min, policy.down_max, self._rng))
        await asyncio.Event().wait()  # stopped: the owner cancels us

    def _new_client(self) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.format.client_id, clean_session=True,
                             protocol=mqtt.MQTTv311, reconnect_on_failure=False)
        # Room beyond the window for status, health and probes: paho queues a QoS 1 packet past its limit,
        # and a queued probe is never sent while lost packets hold the slots.
        client.max_inflight_messages_set(self.cfg.max_inflight + LIVE_ROOM)
        client.max_queued_messages_set(0)
        if self.cfg.username:
            client.username_pw_set(self.cfg.username, read_secret(self.cfg.password_file))
        if self.cfg.tls is not None:
            client.tls_set(ca_certs=self.cfg.tls.ca_file, certfile=self.cfg.tls.cert_file,
                           keyfile=self.cfg.tls.key_file, cert_reqs=ssl.CERT_REQUIRED)
        will = self.format.will()
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        client.on_connect = self._from_thread(self._on_connect)
        client.on_disconnect = self._from_thread(self._on_disconnect)
        client.on_publish = self._from_thread(self._on_publish)
        client.on_message = self._from_thread(self._on_message)
        return client

    def _from_thread(self, handler: Callable[..., None]) -> Callable[..., None]:
        """A paho callback (paho's thread) that runs `handler` on the loop's thread, without userdata."""
        def callback(client: mqtt.Client, userdata: Any, *args: Any) -> None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(handler, client, *args)
        return callback

    async def _connect(self) -> None:
        where = f"{self.cfg.host}:{self.cfg.effective_port}"
        try:
            client = self._new_client()
        except (OSError, ValueError) as err:  # unreadable password file, bad TLS files
            raise UplinkError(f"cannot set up the connection to {where}: {err}") from None
        self._connack = asyncio.get_running_loop().create_future()
        self._client = client
        self._lost.clear()
        self._leaving = False
        self._acked_here = False
        self._largest = None
        try:
            # paho writes the CONNECT once the socket (and TLS) is up: returning means it went out.
            await asyncio.to_thread(client.connect, self.cfg.host, self.cfg.effective_port,
                                    int(self.cfg.keepalive))
            client.loop_start()
            reason = await within(asyncio.shield(self._connack), CONNACK_LIMIT)
        except ssl.SSLCertVerificationError as err:
            await self._drop_client()
            raise UplinkError(f"TLS certificate verification failed for {where}: {err.verify_message}") from None
        except ssl.SSLError as err:
            await self._drop_client()
            raise UplinkError(f"TLS handshake with {where} failed: {err.reason or err}") from None
        except (OSError, asyncio.TimeoutError, UnicodeError) as err:
            # Refused, reset, unreachable or no TCP answer: nothing on the broker's side did any work. (UnicodeError:
            # a name the idna codec cannot encode for the lookup, which check-config refuses in the file)
            # No CONNACK in time is a struggling broker or, as often, a proxy whose far side is cut off:
            # retried as a broker that is down, since the CONNACK_LIMIT wait already spaces the attempts
            # (an exponential wait would hold a healed network back for up to reconnect.max).
            await self._drop_client()
            why = getattr(err, "strerror", None) or str(err) or f"no CONNACK within {CONNACK_LIMIT:g} s"
            raise UplinkError(f"cannot connect to {where}: {why}", reached=False) from None
        if reason is None:  # a proxy whose broker is down, or a broker turning connections away: cheap to retry
            await self._drop_client()
            raise UplinkError(f"{where} closed the connection before accepting it (no CONNACK)", reached=False)
        self.format.connect_answered()
        if reason.is_failure:
            await self._drop_client()
            raise UplinkError(f"{where} refused the connection: {reason}")
        self.stats.connected = True
        self.stats.connects += 1
        if self.stats.connects > 1:
            self.stats.reconnects += 1
        waiting = self.store.stats.messages
        if self.stats.connects > 1:
            log.warning("connected to upstream %s again; %d messages waiting, oldest first", where, waiting,
                        extra=fields(event="upstream_connected"))
        elif self.stats.last_error is not None:
            log.warning("connected to upstream %s after failed attempts; %d messages waiting", where, waiting,
                        extra=fields(event="upstream_connected"))
        else:
            log.info("connected to upstream %s; %d messages waiting", where, waiting,
                     extra=fields(event="upstream_connected"))
        self.stats.last_error = None
        self._restart_delivery()
        subscriptions = self.format.subscriptions()
        if subscriptions:
            client.subscribe(subscriptions)
        self._start_session(client)

    def _start_session(self, client: mqtt.Client) -> None:
        """The format's session start; while it is not ready, asked again at the next commit and at the
        latest after SESSION_RETRY (its wait for first readings is bounded)."""
        self._publish(client, self.format.session_started(self.store.newest))
        if not self.format.ready and self._loop is not None:
            self._loop.call_later(SESSION_RETRY, self._wake.set)

    def _restart_delivery(self) -> None:
        """Whatever was in flight is owed again, oldest first."""
        self._inflight.clear()
        self._sent_at.clear()
        self._probes.clear()
        self.store.release_all()
        self._cursor = self._live_cursor = 0
        self._split = None  # drawn when the format is ready (Sparkplug: at the births)
        self._caught_up = True
        self._wake.set()

    def _fail(self, message: str) -> None:
        if self.stats.last_error != message:
            log.error("%s; retrying with backoff", message, extra=fields(event="upstream_lost"))
        self.stats.last_error = message

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        self._session_over()
        self._inflight.clear()
        self._sent_at.clear()
        self._probes.clear()
        self.store.release_all()
        self._progress.set()
        if client is not None:
            client.disconnect()  # ends paho's network thread if the socket is still open
            await in_daemon_thread(client.loop_stop, LOOP_STOP_LIMIT, "paho's network thread")

    def _session_over(self) -> None:
        if self.stats.connected:
            self.stats.connected = False
            self.format.lost()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when stop() is called."""
        try:
            await within(self._stop_event.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    # -- callbacks, on the loop's thread -------------------------------------------------
    def _on_connect(self, client: mqtt.Client, flags: Any, reason: Any, properties: Any) -> None:
        if client is self._client and self._connack is not None and not self._connack.done():
            self._connack.set_result(reason)

    def _on_disconnect(self, client: mqtt.Client, flags: Any, reason: Any, properties: Any) -> None:
        if client is not self._client:
            return
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(None)  # closed before CONNACK
        if self.stats.connected and not self._stop_event.is_set() and not self._leaving:
            # paho's word for a socket the peer closed (a broker stopped, restarted, or refusing a packet)
            said = "closed by the broker or the network" if str(reason) == "Unspecified error" else str(reason)
            self._fail(f"lost the connection to {self.cfg.host}:{self.cfg.effective_port} ({said})")
            self._closed_on()
        self._session_over()
        self._lost.set()

    def _on_publish(self, client: mqtt.Client, mid: int, reason: Any, properties: Any) -> None:
        if client is not self._client:
            return
        rows = self._inflight.pop(mid, None)
        sent = self._sent_at.pop(mid, None)
        if rows is None:  # a live message (status, health, births), or a probe
            probed = self._probes.pop(mid, None)
            if probed is not None and self._oldest_sent(probed) < probed - ACK_GRACE:
                self._abandon(client, "packets sent before one the broker acknowledged were never acknowledged "
                                      "(the network lost them)")
            return
        for seq, size in rows:
            self.store.ack(seq, size)
        self.stats.acked += len(rows)
        self._acked_here = True
        if self._suspect is not None:
            self._delivering_again()
        self.stats.last_ack = time.time()
        now = time.monotonic()
        self._acks.extend([now] * len(rows))
        self._progress.set()
        self._wake.set()
        # The broker acknowledges one connection's packets in the order it received them: one sent well
        # before this one and still unacknowledged never arrived (a network that dropped data and came back).
        if sent is not None and self._oldest_sent(sent) < sent - ACK_GRACE:
            self._abandon(client, "packets sent before one the broker acknowledged were never acknowledged "
                                  "(the network lost them)")

    def _closed_on(self) -> None:
        """The broker closed a connection on which it acknowledged no row: if it did so on the same oldest row
        STUCK_AFTER times in a row, that row is what it refuses (a packet above its size limit: mosquitto's
        max_packet_size; cloud brokers' 128 or 256 KiB), and nothing behind it will go either. Said once and
        shown in health, naming the row; it is never dropped: raise the limit, or purge the outbox."""
        sent = [seq for rows in self._inflight.values() for seq, _ in rows]
        if self._acked_here or not sent:
            return
        oldest = min(sent)
        seq, closes = self._suspect if self._suspect is not None else (None, 0)
        self._suspect = (oldest, closes + 1 if seq == oldest else 1)
        if self._suspect[1] != STUCK_AFTER:
            return
        msg = next(iter(self.store.fetch(oldest - 1, 1)), None)
        if msg is None or msg.seq != oldest:
            return
        self.stats.stuck = {"seq": oldest, "topic": str(msg.topic), "bytes": msg.size, "closes": STUCK_AFTER}
        if self._largest is not None and self._largest[1] > msg.size:  # a birth, say, larger than the row
            topic, size = self._largest
            self.stats.stuck.update(topic=topic, bytes=size)
            log.error("the upstream closed the connection %d times in a row and acknowledged nothing, each time after "
                      "the packet %s (%d bytes), the largest sent on it: a broker limit on packet size (such as "
                      "mosquitto's max_packet_size, or a cloud broker's 128 or 256 KiB)? Nothing is delivered until "
                      "the limit is raised (or the device has fewer tags); the messages are kept", STUCK_AFTER, topic,
                      size, extra=fields(event="upstream_stuck", seq=oldest))
            return
        log.error("the upstream closed the connection %d times in a row on the message seq %d (%s, %d bytes) and "
                  "acknowledged nothing: it refuses that message (a broker limit on packet size, such as mosquitto's "
                  "max_packet_size?), and nothing behind it is delivered. Raise the limit; the message is kept",
                  STUCK_AFTER, oldest, msg.topic, msg.size, extra=fields(event="upstream_stuck", seq=oldest))

    def _delivering_again(self) -> None:
        if self.stats.stuck is not None:
            log.warning("the upstream acknowledges messages again (the message seq %d went through)",
                        self.stats.stuck["seq"], extra=fields(event="upstream_unstuck"))
        self._suspect, self.stats.stuck = None, None

    def _check_acks(self) -> None:
        """Once a second while connected: a packet unacknowledged for longer than the keepalive means a
        connection that stalls or lost it (the window full of lost packets would stall delivery for good)."""
        client = self._client
        if client is not None and self._sent_at:
            now = time.monotonic()
            waited = self._overdue()
            if waited > max(ACK_LIMIT, self.cfg.keepalive):
                self._abandon(client, f"no acknowledgement from the broker for {waited:.0f} s")
            elif waited > ACK_GRACE and self.connected and len(self._probes) < LIVE_ROOM // 2:
                # A window full of lost packets sends nothing more whose PUBACK would show the loss once the
                # network carries data again: a probe does, within a second of the heal rather than at the
                # keepalive bound. (Each lost probe holds one of paho's slots until the connection ends.)
                p = self.format.probe(max(self._cursor, self._live_cursor))
                info = client.publish(p.topic, p.payload, qos=p.qos, retain=p.retain)
                if info.rc == mqtt.MQTT_ERR_SUCCESS:
                    self._probes[info.mid] = now

    def _overdue(self) -> float:
        """Seconds the oldest packet in flight has waited for its PUBACK (0 with none)."""
        now = time.monotonic()
        return now - self._oldest_sent(now)

    def _sent(self, mid: int) -> None:
        """A QoS 1 packet handed to paho now. (A mid paho gives again moves to the end: the order stays
        the order sent, so the oldest is found without a look at every packet in flight on each PUBACK.)"""
        self._sent_at.pop(mid, None)
        self._sent_at[mid] = time.monotonic()

    def _oldest_sent(self, default: float) -> float:
        """When the oldest packet still in flight was sent; `default` with none."""
        return next(iter(self._sent_at.values()), default)

    def _abandon(self, client: mqtt.Client, why: str) -> None:
        """End a connection that lost packets as a broken one (no DISCONNECT: the broker publishes the
        Will), and connect again; what was in flight is sent again, oldest first."""
        if client is not self._client or self._lost.is_set():
            return
        self._fail(why)
        self._leaving = True  # said why already
        sock = client.socket()
        try:
            if isinstance(sock, socket.socket):  # an SSLSocket is one too
                sock.shutdown(socket.SHUT_RDWR)  # paho's thread sees the end and reports the disconnect
        except OSError:
            pass

    def _on_message(self, client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        if client is not self._client or not self.connected:
            return
        reaction = self.format.received(message.topic, bytes(message.payload))
        self._publish(client, reaction.packets)
        if reaction.reconnect:
            self._leaving = True  # not a lost connection: the format ended it (and said why)
            client.disconnect()  # paho sends what is queued first; the connection loop connects again
        elif reaction.resend:
            self._restart_delivery()
            if not self.format.ready and self._loop is not None:
                self._loop.call_later(SESSION_RETRY, self._wake.set)

    def _publish(self, client: mqtt.Client, packets: list[Packet]) -> None:
        """The format's own packets (births, deaths, a session's first messages): the largest is kept, for a
        broker that closes every connection on it (`_closed_on`)."""
        for p in packets:
            client.publish(p.topic, p.payload, qos=p.qos, retain=p.retain)
            if self._largest is None or len(p.payload) > self._largest[1]:
                self._largest = (p.topic, len(p.payload))

    # -- delivery --------------------------------------------------------------------------
    async def _pump(self) -> None:
        """Keep the in-flight window full with the oldest unsent committed rows."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            client = self._client
            if client is None or not self.connected or self._stop_event.is_set():
                continue
            if not self.format.ready:  # e.g. Sparkplug waiting for the first readings to be born with
                self._start_session(client)
                if not self.format.ready:
                    continue
            if self._split is None:  # the session is ready: what is staged by now is the backlog
                self._split = self.store.last_seq if self.format.live_first else 0
                self._live_cursor = self._split
            room = self.cfg.max_inflight - len(self._inflight)  # QoS >= 1 packets awaiting their PUBACK
            if room <= 0:
                continue
            sent = False
            if self._split:  # live rows first: a long backlog (history) must not hold them back
                live = self.store.fetch(self._live_cursor, room)
                self._live_cursor = self._send(client, live, self._live_cursor)
                room -= bool(live)
                sent = bool(live)
            # While a backlog drains, refill in batches rather than one query per acknowledgement.
            if room > 0 and (self._caught_up or room >= max(1, self.cfg.max_inflight // 4)):
                batch = self.store.fetch(self._cursor, room)
                older = [m for m in batch if m.seq <= self._split] if self._split else batch
                self._caught_up = len(batch) < room
                self._cursor = self._send(client, older, self._cursor)
                sent = sent or bool(older)
                if len(older) < len(batch):  # the backlog is out (what is above was committed after it)
                    self._cursor, self._split = self._live_cursor, 0  # one stream again, in seq order
                    self._wake.set()
            if not sent:
                self._progress.set()

    def _send(self, client: mqtt.Client, batch: list[Message], cursor: int) -> int:
        """Hand each row's packets to paho; a row is acknowledged by the PUBACK of its last QoS >= 1
        packet, or of the next one on this connection (the format's marker closes the batch). Returns
        the cursor: the seq of the last row handed over (`cursor` if none)."""
        unconfirmed: list[tuple[int, int]] = []
        for msg in batch:
            last_mid = None
            for p in self.format.data(msg):
                info = client.publish(p.topic, p.payload, qos=p.qos, retain=p.retain)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:  # the connection just went; resend after reconnect
                    return cursor
                if p.qos > 0:
                    last_mid = info.mid
                    self._sent(info.mid)
            unconfirmed.append((msg.seq, msg.size))
            self.store.hold(msg.seq)
            cursor = msg.seq
            self.stats.published += 1
            if last_mid is not None:
                self._inflight[last_mid] = unconfirmed
                unconfirmed = []
        if unconfirmed:
            p = self.format.marker(unconfirmed[-1][0])
            info = client.publish(p.topic, p.payload, qos=p.qos, retain=p.retain)
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                self._inflight[info.mid] = unconfirmed
                self._sent(info.mid)
        return cursor


LOOP_STOP_LIMIT = 3.0  # seconds to wait for paho's network thread to end
SHORT_LIVED = 10.0  # seconds: a connection closed sooner by the broker is a flap (`_connection_loop`)
FLAPS_SAID = 3  # flaps in a row that are said, once
STUCK_AFTER = 5  # connections in a row closed on the same oldest row, none acknowledged: it is refused
ACK_GRACE = 5.0  # seconds by which a packet may be acknowledged after one sent later (a broker that reorders)
LIVE_ROOM = 64  # QoS 1 packets paho may have in flight beyond the window: live messages stop while overdue
ACK_LIMIT = 30.0  # seconds a packet may wait for its acknowledgement (at least the keepalive)
CONNACK_LIMIT = 10.0  # seconds a CONNECT waits for its CONNACK (a broker answers in milliseconds)
SESSION_RETRY = 3.0  # seconds after which a format that is not ready is asked again, commits or not


def _wait_published(info: mqtt.MQTTMessageInfo, timeout: float) -> None:
    try:
        info.wait_for_publish(timeout)
    except (RuntimeError, ValueError):
        pass
