"""The lean ReadResponse decoder (gateway.sources.opcua_wire) against asyncua's encoder and decoder: every
built-in scalar type, bad and missing parts, and what it leaves to asyncua (arrays, structures,
diagnostics) or refuses (truncated or mangled bytes)."""

from __future__ import annotations

import datetime as dt
import random
import struct

import pytest

from gateway.sources.opcua_wire import Reading, Unexpected, from_datavalue, notifications, readings

ua = pytest.importorskip("asyncua").ua
from asyncua.common.utils import Buffer  # noqa: E402
from asyncua.ua.ua_binary import struct_from_binary, struct_to_binary  # noqa: E402

T = dt.datetime(2026, 12, 6, 10, 0, 0, 123456, tzinfo=dt.timezone.utc)
SCALARS = [(ua.VariantType.Boolean, True), (ua.VariantType.SByte, -7), (ua.VariantType.Byte, 250),
           (ua.VariantType.Int16, -30000), (ua.VariantType.UInt16, 65535), (ua.VariantType.Int32, -2**31),
           (ua.VariantType.UInt32, 2**32 - 1), (ua.VariantType.Int64, -2**63), (ua.VariantType.UInt64, 2**64 - 1),
           (ua.VariantType.Float, 12.5), (ua.VariantType.Double, 1e300), (ua.VariantType.String, "öl"),
           (ua.VariantType.String, None), (ua.VariantType.DateTime, T), (ua.VariantType.ByteString, b"\x00\x01"),
           (ua.VariantType.Guid, ua.Guid("72962B91-FA75-4AE6-8D28-B404DC7DAF63")),
           (ua.VariantType.StatusCode, ua.StatusCode(0))]


def response(*values, header=None) -> bytes:
    r = ua.ReadResponse()
    if header is not None:
        r.ResponseHeader = header
    r.Results = list(values)
    return struct_to_binary(r)


def is_number(value) -> bool:
    return isinstance(value, (bool, int, float))


def asyncua_says(body: bytes) -> list[Reading]:
    return [from_datavalue(dv) for dv in struct_from_binary(ua.ReadResponse, Buffer(body)).Results]


def test_every_builtin_scalar_reads_as_asyncua_reads_it():
    values = [ua.DataValue(ua.Variant(v, t), SourceTimestamp=T, ServerTimestamp=T) for t, v in SCALARS]
    body = response(*values)
    ours = readings(body)
    assert ours == asyncua_says(body)
    numbers = [r.value for r in ours if is_number(r.value)]
    assert numbers == [True, -7, 250, -30000, 65535, -2**31, 2**32 - 1, -2**63, 2**64 - 1, 12.5, 1e300]
    assert all(r.source_time == T.timestamp() and r.good for r in ours)
    assert [is_number(r.value) for r in ours[11:]] == [False, False, False, False, False, False]


def test_bad_status_missing_value_null_variant_and_no_timestamps():
    bad = ua.DataValue(StatusCode=ua.StatusCode(ua.StatusCodes.BadNodeIdUnknown))
    bare = ua.DataValue(ua.Variant(3, ua.VariantType.UInt32))
    null = ua.DataValue(ua.Variant(None, ua.VariantType.Null), SourceTimestamp=T)
    uncertain = ua.DataValue(ua.Variant(1.5, ua.VariantType.Double),
                             StatusCode=ua.StatusCode(ua.StatusCodes.UncertainLastUsableValue))
    body = response(bad, bare, null, uncertain)
    ours = readings(body)
    assert ours == asyncua_says(body)
    assert [r.good for r in ours] == [False, True, True, False]
    assert ours[0].status == ua.StatusCodes.BadNodeIdUnknown and ours[0].value is None
    assert ours[1] == Reading(3, 0, None)
    assert ours[2].value is None


def test_picoseconds_are_skipped_in_the_specifications_order():
    """OPC 10000-6, Table 16: Value, Status, SourceTimestamp, SourcePicoseconds, ServerTimestamp,
    ServerPicoseconds (asyncua 2.1 writes the server timestamp before the source picoseconds)."""
    ticks = (T - dt.datetime(1601, 1, 1, tzinfo=dt.timezone.utc)) // dt.timedelta(microseconds=1) * 10
    value = (bytes([0x3F]) + bytes([11]) + struct.pack("<d", 7.25) + struct.pack("<I", 0) + struct.pack("<q", ticks)
             + struct.pack("<H", 123) + struct.pack("<q", ticks + 5) + struct.pack("<H", 456))
    body = response()[:-8] + struct.pack("<i", 2) + value + value + struct.pack("<i", -1)
    assert readings(body) == [Reading(7.25, 0, T.timestamp())] * 2


def test_a_bad_service_result_raises_as_asyncua_does():
    header = ua.ResponseHeader()
    header.ServiceResult = ua.StatusCode(ua.StatusCodes.BadTooManyOperations)
    with pytest.raises(ua.UaStatusCodeError, match="BadTooManyOperations"):
        readings(response(header=header))


def test_a_string_table_and_an_additional_header_are_skipped():
    header = ua.ResponseHeader()
    header.StringTable = ["one", "two"]
    header.AdditionalHeader = ua.ExtensionObject(ua.NodeId(5000, 2), b"opaque")
    body = response(ua.DataValue(ua.Variant(4.0, ua.VariantType.Double)), header=header)
    assert readings(body) == asyncua_says(body) == [Reading(4.0, 0, None)]


@pytest.mark.parametrize("value", [
    ua.Variant([1.0, 2.0], ua.VariantType.Double),  # an array
    ua.Variant(ua.LocalizedText("x"), ua.VariantType.LocalizedText),
    ua.Variant(ua.NodeId(5, 1), ua.VariantType.NodeId),
])
def test_what_it_does_not_expect_is_left_to_asyncua(value):
    with pytest.raises(Unexpected):
        readings(response(ua.DataValue(value)))


def test_diagnostics_are_left_to_asyncua():
    header = ua.ResponseHeader()
    header.ServiceDiagnostics = ua.DiagnosticInfo(SymbolicId=3)
    with pytest.raises(Unexpected):
        readings(response(header=header))


def truncated_and_mangled(decode, body: bytes, seed: int) -> None:
    """Every cut of `body` is Unexpected; 2,000 with a few bytes changed decode or raise Unexpected or a
    bad ServiceResult, never another error."""
    for cut in range(len(body)):
        with pytest.raises(Unexpected):
            decode(body[:cut])
    rng = random.Random(seed)
    for _ in range(2000):
        mangled = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            mangled[rng.randrange(len(mangled))] = rng.randrange(256)
        try:
            decode(bytes(mangled))
        except (Unexpected, ua.UaStatusCodeError):
            pass


def test_truncated_or_mangled_bytes_are_unexpected_never_another_error():
    truncated_and_mangled(readings, response(*[ua.DataValue(ua.Variant(v, t), SourceTimestamp=T) for t, v in SCALARS]), 7)


def publish(subscription: int, sequence: int, *data) -> bytes:
    r = ua.PublishResponse()
    r.Parameters.SubscriptionId = subscription
    r.Parameters.AvailableSequenceNumbers = [sequence - 1, sequence]
    r.Parameters.NotificationMessage.SequenceNumber = sequence
    r.Parameters.NotificationMessage.PublishTime = T
    r.Parameters.NotificationMessage.NotificationData = list(data)
    r.Parameters.Results = [ua.StatusCode(0)]
    return struct_to_binary(r)


def changes(*items) -> ua.DataChangeNotification:
    return ua.DataChangeNotification(MonitoredItems=[ua.MonitoredItemNotification(ClientHandle=h, Value=dv)
                                                     for h, dv in items])


def test_a_publish_response_gives_each_change_by_its_handle_in_order():
    first = ua.DataValue(ua.Variant(1.5, ua.VariantType.Double), SourceTimestamp=T)
    later = ua.DataValue(ua.Variant(2.5, ua.VariantType.Double), SourceTimestamp=T)
    bad = ua.DataValue(StatusCode=ua.StatusCode(ua.StatusCodes.BadCommunicationError))
    events = ua.EventNotificationList(Events=[ua.EventFieldList(ClientHandle=9, EventFields=[ua.Variant("x")])])
    body = publish(7, 12, changes((0, first), (3, bad)), events, changes((0, later)))
    subscription, sequence, got, status = notifications(body)
    assert (subscription, sequence, status) == (7, 12, None)
    assert got == [(0, Reading(1.5, 0, T.timestamp())), (3, Reading(None, ua.StatusCodes.BadCommunicationError, None)),
                   (0, Reading(2.5, 0, T.timestamp()))]


def test_a_keep_alive_acknowledges_nothing_and_a_status_change_is_told():
    assert notifications(publish(7, 13)) == (7, None, [], None)
    ended = ua.StatusChangeNotification(Status=ua.StatusCode(ua.StatusCodes.BadTimeout))
    assert notifications(publish(7, 14, ended)) == (7, 14, [], ua.StatusCodes.BadTimeout)


def test_a_publish_response_it_does_not_expect_is_left_to_asyncua():
    array = ua.DataValue(ua.Variant([1, 2], ua.VariantType.Int32))
    with pytest.raises(Unexpected):
        notifications(publish(7, 15, changes((0, array))))
    with pytest.raises(Unexpected):
        notifications(response(ua.DataValue(ua.Variant(1.0))))  # a ReadResponse is not a PublishResponse
    truncated_and_mangled(notifications, publish(7, 16, changes((0, ua.DataValue(ua.Variant(1.0))),
                                                               (1, ua.DataValue(ua.Variant(2.0))))), 8)


def test_a_servers_refusal_cannot_rewrite_the_log_line():
    """An attack pass: the server's own words in its ERR message (asyncua's ErrorMessage) went into the device's line
    as sent, a bidi override or a line break included."""
    from types import SimpleNamespace

    from asyncua import ua

    from gateway.sources.opcua_wire import server_refusal, why

    msg = ua.ErrorMessage()
    msg.Error, msg.Reason = ua.StatusCode(ua.StatusCodes.BadTcpInternalError), "x\u202ey\nINFO forged line"
    said = server_refusal(SimpleNamespace(protocol=SimpleNamespace(server_error=msg)))
    assert said == "the server refused the connection: BadTcpInternalError: x\\u202ey\\x0aINFO forged line"
    assert why(ConnectionError("reset\r\nby peer")) == "reset\\x0d\\x0aby peer"
