"""The two OPC UA services sent every interval, Read (poll) and Publish (subscribe), without asyncua's
general codec per value.

asyncua encodes every request and decodes every response through its generic dataclass codec:
for a Read of 50 nodes that is 50 ReadValueIds serialized again on every poll, and 50 DataValues,
Variants and datetimes built from each answer; a Publish's answer goes the same way, then through
its Subscription's events and queue. That was most of an OPC UA sample's CPU. A sample needs none
of it: the Read is the same every time but for its header, and of each DataValue it needs the
value, the StatusCode and the SourceTimestamp (OPC 10000-6, 5.2). So:

- `exchange` sends a request whose parameters are already encoded, with a fresh RequestHeader,
  through asyncua's own secure channel: chunking, signing, encryption, request ids and ServiceFaults
  stay asyncua's, as do the session and the services used once per session.
- `ReadCall` encodes its Read once per session; `readings` decodes the answer into `Reading`s.
- `Subscription` creates the subscription and its monitored items through asyncua's codec (once),
  then keeps one Publish waiting at the server; `notifications` decodes each answer.
- The decoders take scalars of the built-in types, null and bad StatusCodes. An answer they do not
  expect (an array, a structure, diagnostics) is decoded by asyncua's codec instead and counted
  (`left_to_asyncua`), so nothing a server may send is misread; truncated or mangled bytes are
  `Unexpected`, never another error.

`exchange` uses attributes of asyncua's socket protocol that are not its public API (asyncua 2.1;
the `[opcua]` extra pins 2.1.x). `fits` says whether the installed asyncua has them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import struct
import time
from typing import Any, NamedTuple

from gateway.logs import visible

# The binary encoding ids used here (OPC 10000-6, the NodeIds of *_Encoding_DefaultBinary).
READ_REQUEST, READ_RESPONSE = 631, 634
CREATE_SUBSCRIPTION_REQUEST, CREATE_MONITORED_ITEMS_REQUEST = 787, 751
PUBLISH_REQUEST, PUBLISH_RESPONSE = 826, 829
DATA_CHANGE, STATUS_CHANGE = 811, 820
_UNIX_EPOCH_TICKS = 116444736000000000  # 1970-01-01 in 100 ns ticks since 1601-01-01 (OPC UA DateTime)

# Built-in scalar types by their Variant type id (OPC 10000-6, Table 1): the numbers a sample keeps.
_NUMBERS = {1: struct.Struct("<?"), 2: struct.Struct("<b"), 3: struct.Struct("<B"), 4: struct.Struct("<h"),
            5: struct.Struct("<H"), 6: struct.Struct("<i"), 7: struct.Struct("<I"), 8: struct.Struct("<q"),
            9: struct.Struct("<Q"), 10: struct.Struct("<f"), 11: struct.Struct("<d")}
# Scalars that are not numbers (not a value for a tag), by the bytes they take: fixed, or Int32-length-prefixed.
_FIXED = {13: 8, 14: 16, 19: 4}  # DateTime, Guid, StatusCode
_SIZED = (12, 15, 16)  # String, ByteString, XmlElement
_I32, _U32, _I64, _U16 = struct.Struct("<i"), struct.Struct("<I"), struct.Struct("<q"), struct.Struct("<H")
_NOT_A_NUMBER = object()  # a scalar the tag cannot hold (a string, a date): counted as "not a number"


class Reading(NamedTuple):
    """What a sample takes from one DataValue."""
    value: Any  # int, float or bool; None when there is none; _NOT_A_NUMBER for a scalar of another type
    status: int  # the StatusCode, 0 for Good
    source_time: float | None  # the SourceTimestamp as UNIX seconds, None when the server gave none

    @property
    def good(self) -> bool:
        return self.status & 0xC0000000 == 0  # the severity bits say Good (OPC 10000-4, 7.39)


class Unexpected(Exception):
    """A response this decoder leaves to asyncua's general one."""


def readings(body: bytes) -> list[Reading]:
    """The Results of a ReadResponse (its TypeId first), or Unexpected. A bad ServiceResult raises asyncua's
    UaStatusCodeError, as `uaclient.read` would."""
    try:
        pos = _skip_response_header(body, READ_RESPONSE)
        count = _I32.unpack_from(body, pos)[0]
        pos += 4
        out = []
        for _ in range(max(count, 0)):
            reading, pos = _datavalue(body, pos)
            out.append(reading)
        if pos + 4 > len(body):  # then DiagnosticInfos
            raise Unexpected("truncated")
        return out
    except (struct.error, IndexError) as err:
        raise Unexpected(f"truncated: {err}") from None


def from_datavalue(dv: Any) -> Reading:
    """A Reading from a DataValue asyncua decoded (a subscription's, or a response left to asyncua)."""
    variant = dv.Value
    value = variant.Value if variant is not None else None
    if value is not None and not isinstance(value, (bool, int, float)):
        value = _NOT_A_NUMBER
    status = dv.StatusCode.value if dv.StatusCode is not None else 0
    stamp = dv.SourceTimestamp  # a datetime in UTC, with or without tzinfo
    if stamp is not None:
        stamp = float((stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.timezone.utc)).timestamp())
    return Reading(value, status, stamp)


def _datavalue(body: bytes, pos: int) -> tuple[Reading, int]:
    """One DataValue (OPC 10000-6, 5.2.2.17): mask, Value, Status, SourceTimestamp, SourcePicoseconds,
    ServerTimestamp, ServerPicoseconds, each present when its bit is set."""
    mask = body[pos]
    pos += 1
    value: Any = None
    status = 0
    stamp: float | None = None
    if mask & 0x01:
        value, pos = _variant(body, pos)
    if mask & 0x02:
        status = _U32.unpack_from(body, pos)[0]
        pos += 4
    if mask & 0x04:
        ticks = _I64.unpack_from(body, pos)[0]
        pos += 8
        stamp = (ticks - _UNIX_EPOCH_TICKS) / 1e7 if ticks > 0 else None  # 0: no time
    if mask & 0x10:
        pos += 2
    if mask & 0x08:
        pos += 8
    if mask & 0x20:
        pos += 2
    return Reading(value, status, stamp), pos


def _variant(body: bytes, pos: int) -> tuple[Any, int]:
    encoding = body[pos]
    pos += 1
    if encoding & 0xC0:  # an array, or dimensions
        raise Unexpected("an array value")
    kind = encoding & 0x3F
    if kind == 0:
        return None, pos
    number = _NUMBERS.get(kind)
    if number is not None:
        return number.unpack_from(body, pos)[0], pos + number.size
    if kind in _FIXED:
        return _NOT_A_NUMBER, pos + _FIXED[kind]
    if kind in _SIZED:  # a length of -1: null
        size = _I32.unpack_from(body, pos)[0]
        return (_NOT_A_NUMBER if size >= 0 else None), pos + 4 + max(size, 0)
    raise Unexpected(f"a value of built-in type {kind}")


def _skip_response_header(body: bytes, kind: int) -> int:
    """Past the TypeId, which must be `kind`, and the ResponseHeader (OPC 10000-4, 7.33). A bad
    ServiceResult raises asyncua's UaStatusCodeError; diagnostics are Unexpected."""
    typeid, pos = _nodeid(body, 0)
    if typeid != kind:
        raise Unexpected(f"a response of type {typeid}, not {kind}")
    service_result = _U32.unpack_from(body, pos + 12)[0]  # after Timestamp, RequestHandle
    if body[pos + 16] != 0:  # ServiceDiagnostics present
        raise Unexpected("diagnostics")
    pos = _skip_strings(body, pos + 17)  # StringTable
    pos = _skip_extension_object(body, pos)  # AdditionalHeader
    if service_result & 0x80000000:
        from asyncua import ua
        ua.StatusCode(service_result).check()
    return pos


def _nodeid(body: bytes, pos: int) -> tuple[int | None, int]:
    """A NodeId (OPC 10000-6, 5.2.2.9): its numeric id if it is one in namespace 0 (else None), and the
    position after it."""
    encoding = body[pos]
    if encoding == 0:  # two bytes: the id (namespace 0)
        namespace, ident, end = 0, body[pos + 1], pos + 2
    elif encoding == 1:  # four bytes: a namespace byte and a UInt16 id
        namespace, ident, end = body[pos + 1], _U16.unpack_from(body, pos + 2)[0], pos + 4
    elif encoding == 2:  # numeric: a UInt16 namespace and a UInt32 id
        namespace, ident, end = _U16.unpack_from(body, pos + 1)[0], _U32.unpack_from(body, pos + 3)[0], pos + 7
    else:
        raise Unexpected(f"a NodeId encoded as {encoding:#x}")
    return (ident if namespace == 0 else None), end


def _skip_strings(body: bytes, pos: int) -> int:
    count = _I32.unpack_from(body, pos)[0]
    pos += 4
    for _ in range(max(count, 0)):
        pos += 4 + max(_I32.unpack_from(body, pos)[0], 0)
    return pos


def _skip_uint32s(body: bytes, pos: int) -> int:
    count: int = _I32.unpack_from(body, pos)[0]
    return pos + 4 + 4 * max(count, 0)


def _skip_extension_object(body: bytes, pos: int) -> int:
    _, pos = _nodeid(body, pos)
    encoding = body[pos]
    pos += 1
    if encoding:  # a body: ByteString or XmlElement, both Int32-length-prefixed
        pos += 4 + max(_I32.unpack_from(body, pos)[0], 0)
    return pos


def fits(uaclient: Any) -> bool:
    """Whether this asyncua's socket protocol has what `exchange` uses (the source says so when not)."""
    protocol = getattr(uaclient, "protocol", None)
    return (all(hasattr(protocol, name) for name in ("_setup_request_header", "revolve_security_token", "_request_id",
                                                     "_callbackmap", "transport", "check_answer", "pre_request_hook"))
            and hasattr(getattr(protocol, "_connection", None), "message_to_binary")
            and hasattr(uaclient, "_request_semaphore"))


async def exchange(uaclient: Any, typeid: int, params: bytes, timeout: float) -> bytes:
    """One request, its parameters already encoded, through asyncua's secure channel (its request ids,
    chunks, signing and encryption); the response's body, its TypeId first. A ServiceFault raises as
    asyncua's own services raise it. `timeout` 0: as long as the server takes (a Publish)."""
    from asyncua import ua
    from asyncua.ua.ua_binary import nodeid_to_binary, struct_to_binary

    async with uaclient._request_semaphore:
        protocol = uaclient.protocol
        if protocol is None or protocol.transport is None:
            raise ConnectionError("Connection is not open")
        if protocol.pre_request_hook is not None:  # a failure of asyncua's own background tasks
            await protocol.pre_request_hook()
        header = ua.RequestHeader()
        protocol._setup_request_header(header, timeout)
        request = b"".join((nodeid_to_binary(ua.FourByteNodeId(typeid)),  # type: ignore[arg-type]
                            struct_to_binary(header), params))
        protocol.revolve_security_token()
        request_id = protocol._request_id + 1
        message = protocol._connection.message_to_binary(request, message_type=ua.MessageType.SecureMessage,
                                                         request_id=request_id)
        protocol._request_id = request_id
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        protocol._callbackmap[request_id] = answer
        protocol.transport.write(message)
        data = await (asyncio.wait_for(answer, timeout) if timeout else answer)
    protocol.check_answer(data, f" in response to request {typeid}")
    return bytes(data)


def decoded(kind: Any, body: bytes) -> Any:
    """A response by asyncua's general codec, its ServiceResult checked (a bad one raises)."""
    from asyncua.common.utils import Buffer
    from asyncua.ua.ua_binary import struct_from_binary

    response = struct_from_binary(kind, Buffer(body))
    response.ResponseHeader.ServiceResult.check()
    return response


class ReadCall:
    """One session's Read of a fixed list of nodes, its parameters encoded once."""

    def __init__(self, uaclient: Any, params: Any) -> None:
        from asyncua.ua.ua_binary import struct_to_binary

        self._uaclient = uaclient
        self._count = len(params.NodesToRead)
        self._encoded = struct_to_binary(params)
        self.left_to_asyncua = 0  # responses this decoder did not expect, decoded by asyncua's codec

    async def __call__(self, timeout: float) -> list[Reading]:
        from asyncua import ua

        body = await exchange(self._uaclient, READ_REQUEST, self._encoded, timeout)
        try:
            results = readings(body)
        except Unexpected:
            self.left_to_asyncua += 1
            results = [from_datavalue(dv) for dv in decoded(ua.ReadResponse, body).Results]
        if len(results) != self._count:
            raise Unexpected(f"the server answered {len(results)} values for {self._count} nodes")
        return results


class Ended(Exception):
    """The server ended the subscription (its lifetime ran out, the session closed): make a new one."""


class Subscription:
    """A subscription to the Value of a fixed list of nodes, each node's latest value in `latest` (by its
    position). CreateSubscription and CreateMonitoredItems go through asyncua's codec, once; then
    `run` keeps one Publish waiting at the server, each acknowledging the notifications before it,
    and decodes the answers straight from the bytes (`notifications`)."""

    def __init__(self, uaclient: Any, nodeids: list[Any], interval: float, keepalive: int, lifetime: int) -> None:
        self._uaclient = uaclient
        self._nodeids = nodeids
        self._interval, self._keepalive, self._lifetime = interval, keepalive, lifetime
        self.id = 0
        self.latest: list[Reading | None] = [None] * len(nodeids)
        self.last_publish_at: float | None = None  # time.monotonic() of the last answer, a keep-alive too
        self.published = False  # any Publish answered (the subscription's creation sets last_publish_at too)
        self.left_to_asyncua = 0

    async def open(self, timeout: float) -> None:
        from asyncua import ua
        from asyncua.ua.ua_binary import struct_to_binary

        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = self._interval * 1000.0
        params.RequestedMaxKeepAliveCount = self._keepalive
        params.RequestedLifetimeCount = self._lifetime
        params.PublishingEnabled = True
        body = await exchange(self._uaclient, CREATE_SUBSCRIPTION_REQUEST, struct_to_binary(params), timeout)
        self.id = decoded(ua.CreateSubscriptionResponse, body).Parameters.SubscriptionId
        self.last_publish_at = time.monotonic()
        items = ua.CreateMonitoredItemsParameters()
        items.SubscriptionId = self.id
        items.TimestampsToReturn = ua.TimestampsToReturn.Both
        for handle, nodeid in enumerate(self._nodeids):
            item = ua.MonitoredItemCreateRequest()
            item.ItemToMonitor = ua.ReadValueId(NodeId=nodeid, AttributeId=ua.AttributeIds.Value)  # type: ignore[attr-defined]
            item.MonitoringMode = ua.MonitoringMode.Reporting
            item.RequestedParameters = ua.MonitoringParameters(ClientHandle=handle, SamplingInterval=50.0,
                                                               QueueSize=0, DiscardOldest=True)
            items.ItemsToCreate.append(item)
        body = await exchange(self._uaclient, CREATE_MONITORED_ITEMS_REQUEST, struct_to_binary(items), timeout)
        for handle, result in enumerate(decoded(ua.CreateMonitoredItemsResponse, body).Results):
            if not result.StatusCode.is_good():  # the server refused the node: that tag's error, for good
                self.latest[handle] = Reading(None, result.StatusCode.value, None)

    async def run(self) -> None:
        """Publish until the subscription ends (raises Ended) or the connection does (asyncua's error)."""
        from asyncua import ua
        from asyncua.ua.uaerrors import BadTimeout, UaStatusCodeError

        acks: list[int] = []
        while True:
            try:
                body = await exchange(self._uaclient, PUBLISH_REQUEST, _acknowledgements(self.id, acks), 0)
                try:
                    subscription, sequence, changes, status = notifications(body)
                except Unexpected:
                    self.left_to_asyncua += 1
                    subscription, sequence, changes, status = _from_publish(decoded(ua.PublishResponse, body))
            except BadTimeout:  # the server's limit on how long a Publish waits
                continue
            except UaStatusCodeError as err:
                raise Ended(why(err)) from None
            if subscription != self.id:
                raise Ended(f"the server publishes subscription {subscription}, not {self.id}")
            self.last_publish_at = time.monotonic()
            self.published = True
            acks = [sequence] if sequence is not None else []
            for handle, reading in changes:
                if 0 <= handle < len(self.latest):
                    self.latest[handle] = reading
            if status is not None and status & 0x80000000:  # e.g. BadTimeout: its lifetime ran out
                raise Ended(ua.StatusCode(status).name)  # type: ignore[arg-type]


def notifications(body: bytes) -> tuple[int, int | None, list[tuple[int, Reading]], int | None]:
    """A PublishResponse (OPC 10000-4, 5.13.5): its SubscriptionId; the SequenceNumber to acknowledge (None
    for a keep-alive); each data change as (ClientHandle, Reading), oldest first; a
    StatusChangeNotification's status, if one came. Unexpected for what it leaves to asyncua."""
    try:
        pos = _skip_response_header(body, PUBLISH_RESPONSE)
        subscription = _U32.unpack_from(body, pos)[0]
        pos = _skip_uint32s(body, pos + 4) + 1  # AvailableSequenceNumbers, MoreNotifications
        sequence = _U32.unpack_from(body, pos)[0]
        pos += 12  # SequenceNumber, PublishTime
        count = _I32.unpack_from(body, pos)[0]
        pos += 4
        changes: list[tuple[int, Reading]] = []
        status = None
        for _ in range(max(count, 0)):
            kind, pos = _nodeid(body, pos)
            if body[pos] != 1:  # not a binary body
                raise Unexpected("a notification not in binary")
            size = _I32.unpack_from(body, pos + 1)[0]
            start, pos = pos + 5, pos + 5 + max(size, 0)
            if kind == DATA_CHANGE:
                items = _I32.unpack_from(body, start)[0]
                at = start + 4
                for _ in range(max(items, 0)):
                    handle = _U32.unpack_from(body, at)[0]
                    reading, at = _datavalue(body, at + 4)
                    changes.append((handle, reading))
                if at > pos:
                    raise Unexpected("a data change longer than its body")
            elif kind == STATUS_CHANGE:
                status = _U32.unpack_from(body, start)[0]
            # Events (EventNotificationList) and other kinds: not subscribed to, skipped.
        pos = _skip_uint32s(body, pos)  # Results (of the acknowledgements)
        if pos + 4 > len(body):  # then DiagnosticInfos
            raise Unexpected("truncated")
        return subscription, (sequence if count > 0 else None), changes, status
    except (struct.error, IndexError) as err:
        raise Unexpected(f"truncated: {err}") from None


def _from_publish(response: Any) -> tuple[int, int | None, list[tuple[int, Reading]], int | None]:
    """`notifications` from a PublishResponse asyncua decoded."""
    from asyncua import ua

    result = response.Parameters
    message = result.NotificationMessage
    changes: list[tuple[int, Reading]] = []
    status = None
    for notification in message.NotificationData or []:
        if isinstance(notification, ua.DataChangeNotification):
            changes.extend((item.ClientHandle, from_datavalue(item.Value)) for item in notification.MonitoredItems)
        elif isinstance(notification, ua.StatusChangeNotification):
            status = notification.Status.value
    return result.SubscriptionId, (message.SequenceNumber if message.NotificationData else None), changes, status


def _acknowledgements(subscription: int, sequences: list[int]) -> bytes:
    """PublishRequest's parameters: the SubscriptionAcknowledgements, each (SubscriptionId, SequenceNumber)."""
    return _I32.pack(len(sequences)) + b"".join(struct.pack("<II", subscription, n) for n in sequences)


def keep_server_errors() -> None:
    """asyncua takes an ERR message from the server (a security mode or policy it refuses, a certificate it cannot
    use) for a lost connection: its awaiters get "connection lost", and the reason goes only to its own log at
    CRITICAL. Each socket protocol now keeps the last one (`server_refusal`), so that the device says why and is
    retried as a server that answers and refuses (backing off), not one that is down. Idempotent."""
    from asyncua import ua
    from asyncua.client.ua_client import UASocketProtocol

    process = UASocketProtocol._process_received_message
    if getattr(process, "keeps_server_errors", False):
        return

    def keeping(self: Any, msg: Any) -> None:
        if isinstance(msg, ua.ErrorMessage):
            self.server_error = msg
        process(self, msg)
    keeping.keeps_server_errors = True  # type: ignore[attr-defined]
    UASocketProtocol._process_received_message = keeping  # type: ignore[method-assign]


def server_refusal(uaclient: Any) -> str | None:
    """What the server said in its ERR message on this client's connection (`keep_server_errors`), if it sent one."""
    msg = getattr(getattr(uaclient, "protocol", None), "server_error", None)
    if msg is None:
        return None
    status = getattr(msg, "Error", None)
    reason = visible(str(getattr(msg, "Reason", "") or "")[:200])  # the server's words: never to rewrite the line
    if reason.startswith(POLICY_URI):  # (node-opcua sends it with a status that is not one)
        return (f"the server refused the connection: it does not take security policy {reason[len(POLICY_URI):]} "
                f"in the mode asked for (security.mode)")
    name = getattr(status, "name", "?") if getattr(status, "is_bad", lambda: False)() else None
    return "the server refused the connection: " + ": ".join(filter(None, (name, reason))) if name or reason else \
        "the server refused the connection"


POLICY_URI = "http://opcfoundation.org/UA/SecurityPolicy#"


def why(err: BaseException) -> str:
    """An error as one short line for the device's message (its type when it says nothing)."""
    return visible((str(err) or type(err).__name__)[:200])
