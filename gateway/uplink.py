"""The uplink: committed outbox rows to the upstream broker, in seq order, QoS 1.

One paho client per connection (clean session, its own network thread). The
outbox is the only record of what is owed: on every (re)connect the uplink starts
again from the oldest unacknowledged row, keeps at most `max_inflight` messages
in flight, and acknowledges a row to the store only on its PUBACK. Callbacks from
paho's thread are handed to the event loop; all state lives on the loop's thread.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config import UpstreamSection
from gateway.credentials import read_secret
from gateway.errors import UplinkError
from gateway.logs import fields
from gateway.outbox import Message, Outbox
from gateway.retry import backoff, down
from gateway.supervise import in_daemon_thread, run_all, within

log = logging.getLogger("edge_gateway.uplink")


@dataclass
class UplinkStats:
    connected: bool = False
    connects: int = 0
    reconnects: int = 0
    published: int = 0
    acked: int = 0
    last_ack: float | None = None
    last_error: str | None = None


class Uplink:
    def __init__(self, upstream: UpstreamSection, store: Outbox, *, client_id: str, status_topic: str,
                 offline_payload: bytes) -> None:
        self.cfg = upstream
        self.store = store
        self.client_id = client_id
        self.status_topic = status_topic
        self.offline_payload = offline_payload
        self.stats = UplinkStats()
        self.online_payload: bytes = b""  # the retained status, set by the gateway before each connect
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self._inflight: dict[int, tuple[int, int]] = {}  # paho mid -> (seq, size)
        self._cursor = 0  # highest seq handed to paho on this connection
        self._wake = asyncio.Event()
        self._lost = asyncio.Event()
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._connack: asyncio.Future[Any] | None = None
        self._caught_up = True  # the last fetch found no more rows than it asked for
        self._rng = random.Random()
        self._acks: deque[float] = deque(maxlen=10_000)

    # -- public -------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self.stats.connected

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def wake(self) -> None:
        """New rows are committed: send them if there is room in the window."""
        self._wake.set()

    def publish_live(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        """Publish a message that is not stored (status, health); False when not connected."""
        if not self.connected or self._client is None:
            return False
        self._client.publish(topic, payload, qos=1, retain=retain)
        return True

    def publish_rate(self, window: float = 10.0) -> float:
        now = time.monotonic()
        return sum(1 for t in self._acks if now - t <= window) / window

    async def run(self) -> None:
        """The connection loop and the pump, together until cancelled; either failing fails both."""
        self._loop = asyncio.get_running_loop()
        await run_all(**{"uplink-connection": self._connection_loop(), "uplink-pump": self._pump()})

    async def _connection_loop(self) -> None:
        """Connect, deliver, reconnect with jittered backoff; after stop(), wait to be cancelled."""
        attempt = 0
        while not self._stopping:
            try:
                await self._connect()
            except UplinkError as err:
                self._fail(str(err))
                policy = self.cfg.reconnect
                await self._sleep(backoff(attempt, policy.min, policy.max, policy.jitter, self._rng) if err.reached
                                  else down(attempt, policy.min, policy.down_max, self._rng))
                attempt += 1
                continue
            attempt = 0
            await self._lost.wait()
            await self._drop_client()
            if not self._stopping:  # the first attempt after a loss: soon, spread over the fleet
                await self._sleep(down(0, self.cfg.reconnect.min, self.cfg.reconnect.down_max, self._rng))
        await asyncio.Event().wait()  # stopped: the owner cancels us

    async def stop(self, flush_timeout: float = 5.0) -> None:
        """Deliver the backlog while connected (up to `flush_timeout`), publish offline, disconnect."""
        deadline = time.monotonic() + flush_timeout
        self._wake.set()
        while self.connected and not self._drained() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._stopping = True
        self._stop_event.set()
        client = self._client
        if client is not None and self.connected:
            info = self._farewell(client)
            await asyncio.to_thread(_wait_published, info, max(0.5, deadline - time.monotonic()))
            client.disconnect()
        self._lost.set()
        self._wake.set()
        await self._drop_client()

    def _drained(self) -> bool:
        return not self._inflight and not self.store.fetch(self._cursor, 1)

    # -- connection ----------------------------------------------------------------------
    def _new_client(self) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True,
                             protocol=mqtt.MQTTv311, reconnect_on_failure=False)
        client.max_inflight_messages_set(self.cfg.max_inflight + 8)  # room for status and health
        client.max_queued_messages_set(0)
        if self.cfg.username:
            client.username_pw_set(self.cfg.username, read_secret(self.cfg.password_file))
        if self.cfg.tls is not None:
            client.tls_set(ca_certs=self.cfg.tls.ca_file, certfile=self.cfg.tls.cert_file,
                           keyfile=self.cfg.tls.key_file, cert_reqs=ssl.CERT_REQUIRED)
        self._will(client)
        client.on_connect = self._from_thread(self._on_connect)
        client.on_disconnect = self._from_thread(self._on_disconnect)
        client.on_publish = self._from_thread(self._on_publish)
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
        try:
            await asyncio.to_thread(client.connect, self.cfg.host, self.cfg.effective_port,
                                    int(self.cfg.keepalive))
            client.loop_start()
            reason = await within(asyncio.shield(self._connack), max(5.0, self.cfg.keepalive))
        except ssl.SSLCertVerificationError as err:
            await self._drop_client()
            raise UplinkError(f"TLS certificate verification failed for {where}: {err.verify_message}") from None
        except ssl.SSLError as err:
            await self._drop_client()
            raise UplinkError(f"TLS handshake with {where} failed: {err.reason or err}") from None
        except (OSError, asyncio.TimeoutError) as err:
            # Refused, reset, unreachable or no TCP answer: nothing on the broker's side did any work.
            # No CONNACK in time on a connection the broker took is the broker struggling.
            reached = self._connack_missing(client)
            await self._drop_client()
            why = getattr(err, "strerror", None) or str(err) or "no answer in time"
            raise UplinkError(f"cannot connect to {where}: {why}", reached=reached) from None
        if reason is None:
            await self._drop_client()
            raise UplinkError(f"{where} closed the connection before accepting it (no CONNACK)")
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
        self._forget_inflight()
        self._cursor = 0
        self._caught_up = True
        self._session_started(client)
        self._wake.set()

    # -- what a format says at the edges of a session (JSON: the retained status) --------------
    def _will(self, client: mqtt.Client) -> None:
        client.will_set(self.status_topic, self.offline_payload, qos=1, retain=True)

    def _farewell(self, client: mqtt.Client) -> mqtt.MQTTMessageInfo:
        return client.publish(self.status_topic, self.offline_payload, qos=1, retain=True)

    def _session_started(self, client: mqtt.Client) -> None:
        client.publish(self.status_topic, self.online_payload, qos=1, retain=True)

    def _connack_missing(self, client: mqtt.Client) -> bool:
        """Whether the broker took the TCP connection and then gave no CONNACK in time."""
        if self._connack is not None and self._connack.done():
            return False
        sock = client.socket()
        try:
            return sock is not None and getattr(sock, "getpeername", lambda: None)() is not None
        except OSError:
            return False

    def _forget_inflight(self) -> None:
        """The connection is gone: what was in flight is owed again, oldest first, on the next one."""
        self._inflight.clear()
        self.store.release_all()

    def _fail(self, message: str) -> None:
        if self.stats.last_error != message:
            log.error("%s; retrying with backoff", message, extra=fields(event="upstream_lost"))
        self.stats.last_error = message

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        self.stats.connected = False
        self._forget_inflight()
        if client is not None:
            client.disconnect()  # ends paho's network thread if the socket is still open
            await in_daemon_thread(client.loop_stop, LOOP_STOP_LIMIT, "paho's network thread")

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
        if self.stats.connected and not self._stopping:
            self._fail(f"lost the connection to {self.cfg.host}:{self.cfg.effective_port} ({reason})")
        self.stats.connected = False
        self._lost.set()

    def _on_publish(self, client: mqtt.Client, mid: int, reason: Any, properties: Any) -> None:
        if client is not self._client:
            return
        entry = self._inflight.pop(mid, None)
        if entry is None:  # a live message (status, health)
            return
        seq, size = entry
        self.store.ack(seq, size)
        self.stats.acked += 1
        now = time.monotonic()
        self.stats.last_ack = time.time()
        self._acks.append(now)
        self._wake.set()

    # -- delivery --------------------------------------------------------------------------
    async def _pump(self) -> None:
        """Keep the in-flight window full with the oldest unsent committed rows."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            client = self._client
            if client is None or not self.connected or self._stopping:
                continue
            room = self.cfg.max_inflight - len(self._inflight)
            # While a backlog drains, refill in batches rather than one query per acknowledgement.
            if room <= 0 or (not self._caught_up and room < max(1, self.cfg.max_inflight // 4)):
                continue
            batch = self.store.fetch(self._cursor, room)
            self._caught_up = len(batch) < room
            self._send(client, batch)

    def _send(self, client: mqtt.Client, batch: list[Message]) -> None:
        """Hand rows to paho at QoS 1 (or 2); each is acknowledged to the store on its own PUBACK."""
        for msg in batch:
            info = client.publish(msg.topic, msg.payload, qos=self.cfg.qos)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:  # the connection just went; resend after reconnect
                break
            self._inflight[info.mid] = (msg.seq, msg.size)
            self.store.hold(msg.seq)
            self._cursor = msg.seq
            self.stats.published += 1


LOOP_STOP_LIMIT = 3.0  # seconds to wait for paho's network thread to end


def _wait_published(info: mqtt.MQTTMessageInfo, timeout: float) -> None:
    try:
        info.wait_for_publish(timeout)
    except (RuntimeError, ValueError):
        pass
