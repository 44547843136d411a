"""The publish policy: which samples become telemetry (every sample, every `interval`, or on a change
beyond a tag's deadband, and at least every `max_silence`), on the sample clock."""

from __future__ import annotations

from gateway import config
from gateway.pipeline.stages import PublishPolicy
from gateway.sample import ERROR, OK, Sample

HEAD = """\
gateway: {id: gw1, site: plant-a, data_dir: /tmp/edge-gw-policy, timezone: UTC}
upstream: {host: 127.0.0.1, port: 1883}
devices:
  - name: m1
    source: mqtt
    topic: plant/m1
    interval: 1s
    fields: {temp: temp, rpm: rpm}
"""


def policy(publish: str = "") -> PublishPolicy:
    text = HEAD + (f"    publish: {publish}\n" if publish else "")
    return PublishPolicy(config.parse(text).devices[0])


def sample(ts: float, temp: float | None, rpm: float | None = 1000.0) -> Sample:
    return Sample.from_readings("m1", ts, {"temp": temp, "rpm": rpm})


def published(p: PublishPolicy, samples: list[Sample]) -> list[float]:
    return [s.ts for s in samples if p.wants(s)]


def test_by_default_every_sample_is_published():
    p = policy()
    assert published(p, [sample(t, 20.0) for t in range(5)]) == [0, 1, 2, 3, 4]


def test_interval_publishes_at_most_that_often_and_tolerates_poll_jitter():
    p = policy("{interval: 5s}")
    # polls at 1 s with a little jitter: 4.95 s after the last published one is taken (2 % tolerance),
    # 4.85 s is not (9.8), so the next is 4.95 s later again (9.9) and not 10.2
    times = [0.0, 1.0, 2.0, 3.0, 4.0, 4.95, 6.0, 9.0, 9.8, 9.9, 10.2]
    assert published(p, [sample(t, 20.0) for t in times]) == [0.0, 4.95, 9.9]


def test_on_change_publishes_only_moves_beyond_the_deadband_measured_from_the_last_published_value():
    p = policy("{on_change: true, deadband: {temp: 0.5}}")
    temps = [20.0, 20.3, 20.5, 20.6, 19.9, 20.2, 21.2]
    # 20.3 and 20.5 are within 0.5 of 20.0 (not beyond it); 20.6 is; then 19.9 is 0.7 below 20.6;
    # 20.2 is 0.3 above 19.9; 21.2 is 1.3 above it. A creeping drift is caught: the reference stays put.
    assert published(p, [sample(t, v) for t, v in enumerate(temps)]) == [0, 3, 4, 6]


def test_on_change_without_a_deadband_publishes_any_change_of_a_tag():
    p = policy("{on_change: true}")
    rpm = [1000.0, 1000.0, 1001.0, 1001.0]
    assert published(p, [sample(t, 20.0, r) for t, r in enumerate(rpm)]) == [0, 2]


def test_on_change_publishes_a_change_of_quality_and_a_value_going_missing_or_coming_back():
    p = policy("{on_change: true, deadband: {temp: 100}}")
    samples = [sample(0, 20.0), sample(1, None), sample(2, None), sample(3, 20.0)]
    assert samples[1].quality["temp"] == ERROR and samples[3].quality["temp"] == OK
    assert published(p, samples) == [0, 1, 3]


def test_max_silence_publishes_an_unchanged_value_again():
    p = policy("{on_change: true, max_silence: 10s}")
    assert published(p, [sample(t, 20.0) for t in range(0, 31)]) == [0, 10, 20, 30]


def test_a_flapping_device_is_said_once_then_when_it_settles(caplog):
    """An attack pass: a sensor sending good and bad messages in turn logged a line per message ("read failed",
    "recovered", ...: 2,700 lines in 10 s at 300 messages a second). Beyond 10 changes a minute, one line says the
    state flaps; the next, once it has held one state for a minute."""
    import logging

    from gateway.pipeline.health import FLAP_WINDOW, DeviceHealth

    now = [1000.0]
    changes = []
    health = DeviceHealth("s1", ("t",), on_change=lambda: changes.append(now[0]), clock=lambda: now[0])
    with caplog.at_level(logging.INFO):
        for i in range(3000):  # 300 a second for 10 s
            now[0] += 1 / 300
            if i % 2:
                health.sampled(now[0], [], None)
            else:
                health.failed("malformed JSON on plant/s1: Expecting value")
            if i % 300 == 150:
                health.settle()  # the health loop, once a second
        assert health.state == "ok"  # (the last one was good): the current state, always
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 11 and "its state changed 11 times in" in lines[-1], lines
        assert len(changes) <= 11 + 10  # the status upstream is not published at every change either, but the
        told = len(changes)           # health loop's call tells it the state it is in (an attack pass: it said
        now[0] += FLAP_WINDOW - 1     # "degraded" a minute after the device was back)
        health.settle()
        assert len(caplog.records) == 11 and len(changes) == told + 1
        health.settle()
        assert len(changes) == told + 1  # (nothing new to tell)
        now[0] += 1
        health.settle()
        assert caplog.records[-1].getMessage() == "device s1: held one state for 60s, after 2989 more changes: ok"
        health.failed("malformed JSON on plant/s1: Expecting value")  # and changes are logged again
        assert caplog.records[-1].getMessage().startswith("device s1: read failed: malformed JSON") and \
            len(changes) == told + 3
