"""OPC UA servers (asyncua, the `[opcua]` extra; imported only when a device uses it). Read-only.

A value becomes the device's Sample like any other source, typed by its node's DataType (read
at connect; `tag_type`): integers as exact ints (Int64/UInt64 too), a Boolean as 1/0, a Float to
the 7 significant digits a float32 holds, a Double as it is; a bad StatusCode as that tag's
quality `error`.

- `mode: poll` reads every node of the device in one Read request per interval.
- `mode: subscribe` (the default) asks for a subscription publishing every `interval`
  (keep-alive at least every 3) and still makes one Sample per interval, from the last values
  received (an unchanged value is current while the subscription lives). Each node is a
  monitored item whose handle is its position. Quiet for 3 intervals, the values
  are `stale`; for 5 (at least 2 timeouts), not even a keep-alive, the subscription has stalled
  and the session is dropped and made again.
- The session, its security and the services used once per session (DataType, CreateSubscription,
  CreateMonitoredItems) are asyncua's; the Read and the Publish, every interval, are encoded once
  and decoded straight from the bytes by `opcua_wire` (asyncua's general codec was most of the CPU).
- A sample's time (`_time_of`), in both modes: the newest SourceTimestamp when a value changed
  since the last sample, so a counter at `ts` is the server's count at `ts`; while nothing
  changes (or the newest is older than a few intervals), the time of the read, so the
  sample clock moves on while a machine stands still. Never backwards.

Server certificates (with `security:`): one pinned by `server_cert_file` is the only one
accepted; else the trust store decides (`opcua_trust`: `<pki_dir>/trusted/`), and an unknown
one is refused and written to `rejected/` with one line saying how to trust it. Without
`security:` (or `security: none`) the session is neither signed nor encrypted, which is logged
once at start.

A failure stays with the device: an endpoint that cannot be reached, a session lost, a read that
times out. Each reconnect makes a fresh client (a broken one is never reused), after a jittered
backoff (`retry.down` while the server cannot be reached at all, exponential when it refuses).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import shlex
import time
from collections.abc import Mapping, Sequence
from typing import Any

from gateway import tagtypes
from gateway.config import DEFAULT_PATH, OpcUaDevice
from gateway.credentials import read_secret
from gateway.errors import SourceError
from gateway.logs import fields
from gateway.retry import backoff, down
from gateway.sample import ERROR, OK, STALE, Sample
from gateway.sources.opcua_trust import Untrusted, fingerprint, pki_dir, reject, trusted
from gateway.sources.opcua_wire import Ended, ReadCall, Reading, Subscription, fits, keep_server_errors, server_refusal, why
from gateway.sources.poll import PolledSource
from gateway.supervise import within

log = logging.getLogger("edge_gateway.sources.opcua")
MAX_REASONS_SAID = 10  # kinds of connect failure logged before a session is made


class OpcUaSource(PolledSource):
    def __init__(self, device: OpcUaDevice, pki: str | None = None, config_path: str | None = None) -> None:
        super().__init__(device.name, device.tags, device.interval, 2 * device.timeout + 0.5)
        self.device = device
        self.pki = pki or pki_dir(device, ".")
        self._started = False
        self._told: set[str] = set()  # the rejected certificates whose how-to-trust line was logged
        self._trust_command = f"edge-gateway opcua trust {device.name}" + (
            f" -c {shlex.quote(config_path)}" if config_path and config_path != DEFAULT_PATH else "")
        self._client: Any = None
        self._attempt = 0
        self._retry_at = 0.0
        self._failure = ""  # why the last connect failed: said with each "not connected" until the next attempt
        self._reasons: set[str] = set()  # the kinds of connect failure logged (each once, until connected)
        self._rng = random.Random()
        self._read: ReadCall | None = None  # the Read of every node, encoded once per session (mode: poll)
        self._subscription: Subscription | None = None  # mode: subscribe
        self._publishing: asyncio.Task[str] | None = None  # the subscription's Publish loop: why it ended
        self._types: dict[str, tagtypes.TagType] = {}  # tag -> its type, from its node's DataType
        self._newest_seen: float | None = None  # the newest SourceTimestamp of any sample so far
        self._last_ts: float | None = None  # the time of the last sample
        self._mute = 0  # sessions in a row whose subscription never published: the next waits, doubling

    def _say_failure(self, reason: str) -> None:
        """Each kind of connect failure, once until a session is made: the device's health logs only its first
        error, and a server coming up behind a key the client cannot read would otherwise show only that one
        ("connection refused") while the retries fail for another reason."""
        kind = re.sub(r"\d+", "#", reason)[:200]
        if kind not in self._reasons and len(self._reasons) < MAX_REASONS_SAID:
            self._reasons.add(kind)
            if len(self._reasons) > 1:  # (the first is the device's own error line)
                log.warning("device %s: cannot connect to %s: %s", self.device.name, self.device.endpoint, reason,
                            extra=fields(self.device.name, "device_error"))

    @property
    def learned_types(self) -> Mapping[str, tagtypes.TagType]:
        return self._types

    async def _connected(self) -> Any:
        if self._client is not None:
            return self._client
        now = time.monotonic()
        if now < self._retry_at:
            raise SourceError(f"{self.device.endpoint}: cannot connect ({self._failure}); next attempt in "
                              f"{self._retry_at - now:.1f}s")
        device = self.device
        if not self._started:
            self._started = True
            if device.security is None:
                log.warning("device %s: %s without security (security: none): the session is neither signed nor "
                            "encrypted; give security: a policy and certificates to protect it", device.name,
                            device.endpoint)
        client = _client(device)
        try:
            await _connect(client, device, self.pki, self._told, self._trust_command)
        except Exception as err:  # asyncua raises OSError, TimeoutError, ua.UaError and its own on a failed connect
            refusal = server_refusal(client.uaclient)  # (its ERR message comes as a lost connection)
            if refusal is not None and device.security is not None and device.security.server_cert_file:
                # the server could not read what was encrypted for the pinned certificate: another server's
                refusal += (f"; security.server_cert_file pins {device.security.server_cert_file}: is it this "
                            f"server's certificate?")
            reached = refusal is not None or not isinstance(err, (OSError, asyncio.TimeoutError))
            self._retry_at = time.monotonic() + (backoff(self._attempt, 0.5, 30.0, 0.3, self._rng) if reached
                                                 else down(self._attempt, 0.5, 2.0, self._rng))
            self._attempt += 1
            await _close(client)
            self._failure = refusal or why(err)
            self._say_failure(self._failure)
            raise SourceError(f"{device.endpoint}: cannot connect ({self._failure})") from None
        if not fits(client.uaclient):
            await _close(client)
            self._retry_at = time.monotonic() + 30.0
            raise SourceError(f"{device.endpoint}: cannot read with asyncua {_asyncua_version()}: this gateway "
                              "works with asyncua 2.1 (install edge-gateway[opcua] to get it)")
        self._attempt, self._reasons = 0, set()
        self._client = client
        self._read = ReadCall(client.uaclient, _read_all(device)) if device.mode == "poll" else None
        await self._learn_types(client)
        if device.mode == "subscribe":
            try:
                await self._subscribe(client)
            except Exception as err:  # the server refused the subscription or a node: a fresh try later
                await self.aclose()
                self._retry_at = time.monotonic() + backoff(self._attempt, 0.5, 30.0, 0.3, self._rng)
                self._attempt += 1
                raise SourceError(f"{device.endpoint}: cannot subscribe ({why(err)})") from None
        # Said once; again only after a session that published (a server that never does is reconnected, backing
        # off, without a line each time: 1,000 an hour before).
        (log.debug if self._mute else log.info)("device %s: connected to %s", device.name, device.endpoint)
        return client

    async def _learn_types(self, client: Any) -> None:
        """Each tag's type from its node's DataType attribute (one Read); a node that says none keeps its
        value's own type."""
        from asyncua import ua

        params = _read_all(self.device, ua.AttributeIds.DataType)  # type: ignore[attr-defined]
        try:
            results = await within(client.uaclient.read(params), self.device.timeout)
        except Exception as err:  # any failure here: the values are still read, with their own types
            log.warning("device %s: cannot read the DataType of its nodes (%s): values keep their own types",
                        self.device.name, why(err))
            return
        self._types = {node.name: tag_type(dv.Value.Value if dv.Value is not None else None)
                       for node, dv in zip(self.device.nodes, results, strict=False)}

    async def _subscribe(self, client: Any) -> None:
        """A subscription publishing every interval (a keep-alive at least every 3, alive for 30), and its
        Publish loop; returns when every node has its first value, or after the timeout."""
        from asyncua import ua

        device = self.device
        # Parsed, never compared as text: the server may write `ns=0;i=2259` as `i=2259`.
        nodeids = [ua.NodeId.from_string(n.node) for n in device.nodes]
        subscription = Subscription(client.uaclient, nodeids, device.interval, keepalive=3, lifetime=30)
        await within(subscription.open(device.timeout), device.timeout + 1.0)
        self._subscription = subscription
        self._publishing = asyncio.get_running_loop().create_task(_publish(subscription))
        deadline = time.monotonic() + device.timeout  # the initial values come with the first publish
        while None in subscription.latest and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def read(self) -> Sample:
        await self._connected()
        device = self.device
        if self._subscription is not None:
            return self._from_subscription(self._subscription)
        read = self._read
        assert read is not None  # connected: the session's Read is made
        try:
            results = await within(read(device.timeout), device.timeout)
        except Exception as err:  # the session or the connection is gone: a fresh client next time
            await self.aclose()
            raise SourceError(f"{device.endpoint}: read failed ({why(err)}); reconnecting") from None
        return self._sample(results)

    def _from_subscription(self, sub: Subscription) -> Sample:
        device = self.device
        quiet = max(5 * device.interval, 2 * device.timeout)
        last = sub.last_publish_at
        quiet_for = time.monotonic() - last if last is not None else 0.0
        publishing = self._publishing
        ended = publishing is not None and publishing.done()  # the subscription ended under us
        if ended or quiet_for > quiet:
            asyncio.get_running_loop().create_task(self.aclose())
            if not sub.published:  # this session's subscription never published: the server accepts, stays mute
                self._retry_at = time.monotonic() + backoff(self._mute, 0.5, 30.0, 0.3, self._rng)
                self._mute += 1
            why = (f"the subscription ended ({publishing.result()})" if publishing is not None and ended else
                   f"the subscription delivered nothing, not even a keep-alive, for {quiet:g}s")
            raise SourceError(f"{device.endpoint}: {why}; reconnecting")
        if sub.published:
            self._mute = 0
        return self._sample(sub.latest, stale=quiet_for if quiet_for > 3 * device.interval else None)

    def _sample(self, results: Sequence[Reading | None], stale: float | None = None) -> Sample:
        """`stale`: for how long the subscription has delivered nothing (None: it is current)."""
        device = self.device
        values: dict[str, float | None] = {}
        quality: dict[str, str] = {}
        problems: list[str] = []
        newest: float | None = None
        for node, reading in zip(device.nodes, results, strict=False):
            if reading is None:  # subscribed, no value yet
                problems.append(f"{node.name} ({node.node}): no value yet")
                values[node.name], quality[node.name] = None, ERROR
                continue
            kind = self._types.get(node.name, tagtypes.AS_SENT)
            value = _typed(reading.value, kind)
            if not reading.good or value is None:
                why = _status_name(reading.status) if not reading.good else _unfit(reading.value, kind)
                problems.append(f"{node.name} ({node.node}): {why}")
                values[node.name], quality[node.name] = None, ERROR
                continue
            values[node.name], quality[node.name] = value, OK
            ts = reading.source_time
            if ts is not None:
                newest = ts if newest is None else max(newest, ts)
            if stale is not None:  # the subscription has gone quiet: the last values, not current ones
                quality[node.name] = STALE
        if problems and len(problems) == len(device.nodes):
            raise SourceError(f"{device.endpoint}: " + "; ".join(problems))
        if STALE in quality.values():
            problems.append(f"the subscription has delivered nothing for {stale:.0f}s: the last values are stale")
        return Sample(device.name, self._time_of(newest), values, quality, "; ".join(problems) or None)

    def _time_of(self, newest: float | None) -> float:
        """A sample's time. When a value changed since the last sample, the newest SourceTimestamp: the
        values are known as of then (a counter at `ts` is the server's count at `ts`). When none did, or
        the newest is older than a few intervals (a value unchanged since the weekend), the time of
        this read (keep the server's clock and ours on NTP): the values still stand then, and the sample clock (publish interval,
        max_silence, shifts) moves on while a machine stands still. Never before the last sample. A SourceTimestamp
        ahead of our clock by more than that is not taken at all: since no sample goes back, one from a server clock
        set wrong (or the year 30000 a DateTime can say) held every later sample there, past what a message can carry."""
        now = time.time()
        slack = max(3 * self.device.interval, 5.0)
        if newest is not None and newest - now > slack:
            newest = None
        changed = newest is not None and (self._newest_seen is None or newest > self._newest_seen)
        if newest is not None:
            self._newest_seen = newest if self._newest_seen is None else max(self._newest_seen, newest)
        recent = newest is not None and now - newest <= slack
        ts = newest if changed and recent and newest is not None else now
        if self._last_ts is not None:
            ts = max(ts, self._last_ts)
        self._last_ts = ts
        return ts

    async def aclose(self) -> None:
        client, self._client = self._client, None
        publishing, self._publishing = self._publishing, None
        self._read = None
        self._subscription = None
        if publishing is not None:
            publishing.cancel()
        if client is not None:
            await _close(client)


async def unknown_nodes(config: Any) -> list[tuple[str, str]]:
    """At start: the node ids that a reachable server says it does not have (a config error: 78).

    A server that cannot be reached now is not a config problem: its device starts in error and
    a node it lacks becomes that tag's error, logged once, when it can be reached."""
    async def check(i: int, device: Any) -> list[tuple[str, str]]:
        client = _client(device)
        try:
            await _connect(client, device, pki_dir(device, config.gateway.data_dir))
        except Exception:  # unreachable, refusing or untrusted now: the device's own loop will say so
            await _close(client)
            return []
        try:
            results = await within(client.uaclient.read(_read_all(device)), device.timeout)
        except Exception:
            return []
        finally:
            await _close(client)
        return [(f"devices[{i}].nodes[{j}].node", f'device {device.name}: {device.endpoint} has no node "{node.node}" '
                                                  f"({dv.StatusCode.name})")
                for j, (node, dv) in enumerate(zip(device.nodes, results, strict=False))
                if dv.StatusCode is not None and dv.StatusCode.name in ("BadNodeIdUnknown", "BadNodeIdInvalid")]

    found = await asyncio.gather(*(check(i, d) for i, d in enumerate(config.devices) if d.source == "opcua"))
    return [problem for problems in found for problem in problems]


async def _publish(subscription: Subscription) -> str:
    """The subscription's Publish loop, until it or the connection ends: why (the device's next read says it)."""
    try:
        await subscription.run()
    except Ended as err:  # the server ended it
        return str(err)
    except Exception as err:  # the connection ended; never a traceback in the log
        return why(err)
    return "its Publish loop stopped"


def _asyncua_version() -> str:
    from importlib.metadata import version
    return version("asyncua")


def _status_name(code: int) -> str:
    """A StatusCode's name, as the server's log and the specification write it (BadNodeIdUnknown)."""
    from asyncua import ua
    return ua.StatusCode(code).name  # type: ignore[arg-type]


def _client(device: OpcUaDevice) -> Any:
    """A fresh asyncua client for the device, with its login (a broken client is never reused)."""
    from asyncua.client.client import Client

    keep_server_errors()
    # asyncua probes the server's state every `watchdog_intervall` (1 s by default): a second Read per
    # second beside ours. Our own reads and Publishes notice a dead connection every interval
    # (`read`, `_from_subscription`) and keep the session alive, so its probe can be rare.
    client = Client(device.endpoint, timeout=device.timeout, watchdog_intervall=30.0)
    # Its check of the subscriptions it made, every 0.5 s, has none to check (opcua_wire makes ours).
    client._stale_check_interval = 30.0
    if device.username and device.password_file:
        client.set_user(device.username)
        client.set_password(read_secret(device.password_file) or "")
    return client


async def _connect(client: Any, device: OpcUaDevice, pki: str, told: set[str] | None = None,
                   trust_command: str | None = None) -> None:
    """Security (naming the client by its certificate's URI, checking the server's), then the session,
    within the timeout. `told`: the certificates already logged as rejected (None: log none)."""
    if device.security is not None:
        sec = device.security
        client.application_uri = _application_uri(sec.cert_file) or client.application_uri
        if not sec.server_cert_file:  # not pinned: the trust store decides
            client.certificate_validator = _validator(device.name, pki, told, trust_command)
        await within(client.set_security_string(f"{sec.policy},{sec.mode},{sec.cert_file},{sec.key_file}"
                                                + (f",{sec.server_cert_file}" if sec.server_cert_file else "")),
                     device.timeout + 1.0)
    await within(client.connect(), device.timeout + 1.0)


def _validator(device: str, pki: str, told: set[str] | None, trust_command: str | None = None) -> Any:
    """asyncua's certificate check at CreateSession: the server's certificate must be in `trusted/`.

    The device's error says it is not trusted (logged once per state change, as any); the one
    line saying how to trust it is logged once per certificate."""
    from cryptography.hazmat.primitives.serialization import Encoding

    async def validate(cert: Any, app: Any) -> None:
        der = cert.public_bytes(Encoding.DER)
        if trusted(der, pki):
            return
        how = reject(der, device, pki, cert.subject.rfc4514_string()[:80], trust_command)
        if told is not None and fingerprint(der) not in told:
            told.add(fingerprint(der))
            log.warning("device %s: %s", device, how, extra=fields(device, "opcua_untrusted_certificate"))
        raise Untrusted(f"the server's certificate (SHA-256 {fingerprint(der)[:16]}…) is not trusted: "
                        f"see {os.path.join(pki, 'rejected')}/")
    return validate


def _read_all(device: OpcUaDevice, attribute: int | None = None) -> Any:
    """One Read request for the value (or another attribute) of every node of the device."""
    from asyncua import ua

    params = ua.ReadParameters()
    for node in device.nodes:
        rv = ua.ReadValueId()
        rv.NodeId = ua.NodeId.from_string(node.node)
        rv.AttributeId = ua.AttributeIds.Value if attribute is None else attribute  # type: ignore[attr-defined]
        params.NodesToRead.append(rv)
    return params


async def _close(client: Any) -> None:
    try:
        await within(client.disconnect(), 2.0)
    except Exception:  # a broken session may not close cleanly; the client is dropped anyway
        pass


def _application_uri(cert_file: str) -> str | None:
    """The URI in the gateway's certificate: the client must name itself by it (OPC 10000-4, 6.1.3)."""
    from cryptography import x509

    with open(cert_file, "rb") as fh:
        data = fh.read()
    cert = x509.load_pem_x509_certificate(data) if data.startswith(b"-----") else x509.load_der_x509_certificate(data)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


# The built-in DataTypes (namespace 0) by their numeric id, as Sparkplug B names them.
DATATYPES = {1: "Boolean", 2: "Int8", 3: "UInt8", 4: "Int16", 5: "UInt16", 6: "Int32", 7: "UInt32",
             8: "Int64", 9: "UInt64", 10: "Float", 11: "Double"}


def tag_type(datatype: Any) -> tagtypes.TagType:
    """The type a node's DataType (a NodeId) gives its tag; a type not built in (Number, an enumeration)
    leaves the value its own type."""
    name = DATATYPES.get(datatype.Identifier) if getattr(datatype, "NamespaceIndex", None) == 0 else None
    if name == "Boolean":
        return tagtypes.BOOLEAN
    if name == "Float":
        return tagtypes.FLOAT
    if name == "Double":
        return tagtypes.DOUBLE
    return tagtypes.integer(name) if name is not None else tagtypes.AS_SENT


def _typed(value: Any, kind: tagtypes.TagType) -> float | None:
    """A value as its tag's type says (an exact int for an integer); None for what is not a finite number, or
    not one the node's DataType holds (the type is learned at connect; a server may serve another since)."""
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, float) and (value != value or abs(value) == float("inf")):
        return None
    if not isinstance(value, (int, float)) or not tagtypes.fits(value, kind):
        return None
    return value if isinstance(value, int) else kind.shape(value)


def _unfit(value: Any, kind: tagtypes.TagType) -> str:
    """Why a good reading's value is not taken."""
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, (int, float)) and value == value and abs(value) != float("inf"):
        return f"{value:.10g} does not fit the node's DataType, {kind.datatype}"
    return "not a number"

