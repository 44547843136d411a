"""What a local sensor sends, however bad, becomes a Sample or a SourceError: never an exception."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from gateway import config
from gateway.errors import SourceError
from gateway.sample import Sample
from gateway.sources.mqtt import decode

DEVICE = config.parse("""gateway: {id: g, site: s}
upstream: {host: h}
devices:
  - {name: s1, source: mqtt, topic: plant/s1, fields: {temp: t, flow: x.flow}, timestamp_field: ts}
""").devices[0]

WORST = [
    (b"\xff\xfe\x80", "malformed JSON"),
    (b"[" * 10_000 + b"]" * 10_000, "nested too deeply"),
    (b'{"t":' * 10_000 + b"1" + b"}" * 10_000, "nested too deeply"),
    (b"\x00", "malformed JSON"),
    (b"", "malformed JSON"),
    (b"[1, 2]", "expected a JSON object"),
]


@pytest.mark.parametrize("payload,why", WORST, ids=range(len(WORST)))
def test_garbage_is_a_source_error(payload, why):
    result = decode(DEVICE, payload, 1_700_000_000.0)
    assert isinstance(result, SourceError) and why in str(result)
    assert len(str(result)) < 300  # the log line quotes a preview, never the payload


@pytest.mark.parametrize("digits", [4000, 5000])
def test_bad_fields_are_bad_tags_and_the_rest_is_kept(digits):
    """An attack pass: an integer of more digits than Python reads (4,300) failed the whole message as malformed
    JSON, its good fields with it."""
    payload = b'{"t": ' + b"9" * digits + b', "x": {"flow": 12.5}, "ts": 1e300, "pad": "' + b"x" * 10_000_000 + b'"}'
    sample = decode(DEVICE, payload, 1_700_000_000.0)
    assert isinstance(sample, Sample)
    assert sample.values == {"temp": None, "flow": 12.5}
    assert sample.quality == {"temp": "error", "flow": "ok"}
    assert sample.ts == 1_700_000_000.0  # a time past the year 3000 is refused; the arrival time is used
    assert sample.problem == ("field t: expected a number, got an integer too large for a number; "
                              "timestamp field ts not a time: 1e+300; arrival time used")


@pytest.mark.parametrize("ts,expected", [(1_700_000_000, 1_700_000_000.0), (1_700_000_000_500, 1_700_000_000.5),
                                         ("2023-11-14T22:13:20Z", 1_700_000_000.0)])
def test_sample_time_in_seconds_milliseconds_or_rfc3339(ts, expected):
    import json
    sample = decode(DEVICE, json.dumps({"t": 1, "x": {"flow": 2}, "ts": ts}).encode(), 1_700_000_002.0)
    assert isinstance(sample, Sample) and sample.ts == expected and sample.problem is None


@pytest.mark.parametrize("ts,kept", [
    (1_700_000_000 - 12 * 3600, True),  # buffered by the sensor while the broker was away: its own time
    (1_700_000_000 + 30, True),  # a clock a little ahead
    (1, False),  # a clock never set: 1970
    (1_700_000_000 - 2 * 86400, False),
    (1_700_000_000 + 300, False),  # five minutes ahead: a clock set wrong
])
def test_a_sample_time_far_from_the_arrival_is_a_sensor_clock_not_set_and_said(ts, kept):
    """A sensor whose clock was never set (1970) took the device's shifts there: each message closed the running
    shift and sent summaries of 1970's. Its message counts from when it came, and the device says why."""
    sample = decode(DEVICE, json.dumps({"t": 1, "x": {"flow": 2}, "ts": ts}).encode(), 1_700_000_000.0)
    assert isinstance(sample, Sample) and sample.values == {"temp": 1.0, "flow": 2.0}
    if kept:
        assert sample.ts == ts and sample.problem is None
    else:
        assert sample.ts == 1_700_000_000.0
        assert sample.problem.startswith("timestamp field ts far from the arrival time (a sensor clock not set?): ")
        assert sample.problem.endswith("; arrival time used")


def test_sample_times_only_go_forward():
    """A late or reordered message is taken at the last sample's time: the pipeline's clock never goes back."""
    from gateway.sources.mqtt import MqttLink, MqttSource

    async def times() -> list[float]:
        source = MqttSource(DEVICE, MqttLink(config.parse(_LOCAL).local_broker, "g"))
        stream = source.samples()
        for ts in (1_700_000_010, 1_700_000_005, 1_700_000_011):
            source.deliver("plant/s1", json.dumps({"t": 1, "ts": ts}).encode(), 1_700_000_012.0)
        got = [(await anext(stream)).ts for _ in range(3)]
        await stream.aclose()
        return got

    assert asyncio.run(times()) == [1_700_000_010.0, 1_700_000_010.0, 1_700_000_011.0]


@pytest.mark.parametrize("ts", [1e15, 1e20, -1, "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00",
                                "2026-11-24T06:00:00", 10**400, True, "x" * 5000])
def test_a_time_no_clock_can_give_is_the_arrival_time_and_said(ts):
    import json
    payload = json.dumps({"t": 10**400, "x": {"flow": 2}, "ts": ts}).encode()
    sample = decode(DEVICE, payload, 1_700_000_000.0)
    assert isinstance(sample, Sample) and sample.ts == 1_700_000_000.0
    assert sample.values == {"temp": None, "flow": 2.0}
    assert "arrival time used" in sample.problem and len(sample.problem) < 300
    from gateway import contract
    contract.encode(contract.telemetry("s1", sample.ts, sample.values, sample.quality))  # formats, never raises


def test_fuzzed_payloads_are_a_sample_or_a_source_error_and_always_encode():
    """Seeded: odd JSON values in every field, then bytes flipped and payloads cut anywhere."""
    import random

    from gateway import contract

    rng = random.Random(2026)
    atoms = [b"1", b"-0", b"1e308", b"1e309", b"-1e400", b"NaN", b"Infinity", b"true", b"null", b'"x"', b"9" * 5000,
             b"[]", b"{}", b'"2026-11-24T06:00:00Z"', b'"9999-12-31T23:59:59-14:00"', b"1e15", b'"\\ud800"', b"0.1"]
    for _ in range(3000):
        payload = b'{"t": %s, "x": {"flow": %s}, "ts": %s}' % (rng.choice(atoms), rng.choice(atoms), rng.choice(atoms))
        if rng.random() < 0.3:
            flipped = bytearray(payload)
            for _ in range(rng.randrange(1, 5)):
                flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            payload = bytes(flipped)
        if rng.random() < 0.1:
            payload = payload[:rng.randrange(len(payload))]
        result = decode(DEVICE, payload, 1_700_000_000.0)
        assert isinstance(result, (Sample, SourceError)), payload
        if isinstance(result, Sample):
            contract.encode(contract.telemetry("s1", result.ts, result.values, result.quality))


def test_a_flood_beyond_the_queue_drops_the_oldest_counted_and_said_once_each_way(caplog):
    """Messages that come faster than the pipeline takes them: the oldest waiting are dropped, counted
    (health's `dropped`), said once when it starts and once when the device has caught up."""
    from gateway.sources.mqtt import QUEUE_LIMIT, MqttLink, MqttSource

    async def flood() -> list[float]:
        source = MqttSource(DEVICE, MqttLink(config.parse(_LOCAL).local_broker, "g"))
        taken: list[float] = []
        stream = source.samples()
        for rounds in range(2):
            for i in range(QUEUE_LIMIT + 25):  # paho's thread delivers while the pipeline is busy
                source.deliver("plant/s1", json.dumps({"t": i, "x": {"flow": 1}}).encode(), 1_700_000_000.0 + i)
            for _ in range(QUEUE_LIMIT):
                taken.append((await anext(stream)).values["temp"])
        await stream.aclose()
        assert source.dropped == 50
        return taken

    with caplog.at_level(logging.INFO, logger="edge_gateway.sources.mqtt"):
        taken = asyncio.run(flood())
    assert taken[:2] == [25.0, 26.0] and taken[QUEUE_LIMIT - 1] == QUEUE_LIMIT + 24  # the newest kept
    said = [r.getMessage() for r in caplog.records]
    assert sum("arrive faster than they are processed" in m for m in said) == 2  # once per flood
    assert sum("caught up with its messages" in m for m in said) == 2
    assert "(50 dropped so far)" in said[-1]


_LOCAL = """gateway: {id: g, site: s}
upstream: {host: h}
local_broker: {listen: "127.0.0.1:1883", client: {username: gw, password_file: /dev/null}}
devices:
  - {name: s1, source: mqtt, topic: plant/s1, fields: {temp: t}}
"""


def test_a_burst_from_pahos_thread_wakes_the_loop_once_not_per_message():
    """Each wake-up is a byte in asyncio's self-pipe: a flood filled it, and a SIGTERM's or SIGHUP's byte was lost
    (with a traceback on stderr). Messages handed over while the loop is busy go in one wake-up, in order."""
    import threading

    from gateway.sources.mqtt import MqttLink, MqttSource

    async def burst() -> tuple[list[float], int]:
        loop = asyncio.get_running_loop()
        link = MqttLink(config.parse(_LOCAL).local_broker, "g")
        source = MqttSource(DEVICE, link)
        wakeups = 0
        real = loop.call_soon_threadsafe

        def counted(*args):
            nonlocal wakeups
            wakeups += 1
            return real(*args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        payloads = [json.dumps({"t": i}).encode() for i in range(900)]
        sender = threading.Thread(target=lambda: [link._hand_over(loop, source.deliver, ("plant/s1", p, 1.7e9))
                                                  for p in payloads])
        sender.start()
        await asyncio.to_thread(sender.join)
        stream = source.samples()
        got = [(await anext(stream)).values["temp"] for _ in range(900)]
        await stream.aclose()
        return got, wakeups

    got, wakeups = asyncio.run(burst())
    assert got == [float(i) for i in range(900)]
    assert wakeups < 300  # one per burst the loop had not yet taken up: one per message (900) before


def test_while_the_local_broker_refuses_the_gateway_its_devices_say_why_not_only_that_they_are_silent():
    """The refusal (a wrong password) was said once, then overwritten by 'no message on ... for 3s' in health's
    last_error, hiding why while the broker kept refusing."""
    from gateway.sources.mqtt import MqttLink, MqttSource
    fast = config.parse(_LOCAL.replace("fields: {temp: t}}", "fields: {temp: t}, interval: 10ms, timeout: 10ms}"))

    async def silent() -> str | None:
        link = MqttLink(fast.local_broker, "g")
        source = MqttSource(fast.devices[0], link)
        link.last_error = "local broker 127.0.0.1:1883: the local broker refused the connection: Not authorized"
        stream = source.samples()
        sample = await anext(stream)
        await stream.aclose()
        return sample.problem

    assert asyncio.run(silent()) == ("local broker 127.0.0.1:1883: the local broker refused the connection: Not "
                                     "authorized (no message on plant/s1 for 0.03s)")
