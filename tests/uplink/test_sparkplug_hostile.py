"""Hostile input from the network, in process: what a broken or malicious peer sends is refused,
counted and logged once, and changes nothing. The same against real processes (mosquitto, the
daemon, its web server): tests/test_hostile_daemon.py."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

pytest.importorskip("google.protobuf")

from gateway import config, sources  # noqa: E402
from gateway.uplink.sparkplug import sparkplug_b_pb2 as pb  # noqa: E402
from gateway.uplink.sparkplug.uplink import BIRTH_WAIT, MAX_REFUSALS_LOGGED, SparkplugFormat  # noqa: E402

CONFIG = """
gateway: {id: gw1, site: plant-a}
upstream: {host: 127.0.0.1, format: sparkplug_b, sparkplug: {primary_host_id: scada-1}}
devices: [{name: pump1, source: sim, profile: pump}]
"""
STATE = "spBv1.0/STATE/scada-1"
NCMD, DCMD = "spBv1.0/plant-a/NCMD/gw1", "spBv1.0/plant-a/DCMD/gw1/pump1"
NOW_MS = 1_795_500_000_000
SPARKPLUG_LOG = "edge_gateway.uplink.sparkplug.uplink"  # (not a line another test's thread left behind)


def online(tmp_path: Path) -> SparkplugFormat:
    """A Sparkplug session whose primary host said online, births sent."""
    cfg = config.parse(CONFIG)
    types = {d.name: sources.tag_types(d) for d in cfg.devices}
    now = [NOW_MS / 1000]
    fmt = SparkplugFormat(cfg, state_path=str(tmp_path / "sparkplug.json"), scored={}, types_of=types.__getitem__,
                          clock=lambda: now[0])
    fmt.connect_answered()
    assert fmt.received(STATE, json.dumps({"online": True, "timestamp": NOW_MS}).encode()).resend
    assert fmt.session_started(lambda: []) == []  # waiting for the device's first reading
    now[0] += BIRTH_WAIT
    assert fmt.session_started(lambda: []) and fmt.ready
    return fmt


def command(**metric: object) -> bytes:
    payload = pb.Payload(timestamp=1)
    m = payload.metrics.add()
    for key, value in metric.items():
        setattr(m, key, value)
    return payload.SerializeToString()


REBIRTH = command(name="Node Control/Rebirth", datatype=pb.Boolean, boolean_value=True)
BAD_STATES = [b"", b"\xff\xfe", b"not json", b"[]", b"null", b"1", b'"online"', b"{" * 100_000,
              b"[" * 100_000 + b"]" * 100_000,
              b'{"online": true, "timestamp": 1e400}', b'{"online": true, "timestamp": Infinity}',
              b'{"online": true, "timestamp": NaN}', b'{"online": true, "timestamp": -1}',
              b'{"online": true, "timestamp": 1.5e12}', b'{"online": true, "timestamp": "1795500000001"}',
              b'{"online": true, "timestamp": [1]}', b'{"online": true, "timestamp": true}',
              b'{"online": true, "timestamp": 1' + b"0" * 30 + b"}",
              # a wrong type must neither end the session (offline) nor, by a far-future time, hide the next
              b'{"online": "false", "timestamp": 99999999999999}', b'{"online": 0, "timestamp": 99999999999999}',
              b'{"timestamp": 99999999999999}', b'{"online": null}']


def test_a_bad_state_is_refused_and_changes_nothing_then_the_hosts_next_good_one_counts(tmp_path, caplog):
    fmt = online(tmp_path)
    with caplog.at_level(logging.INFO):
        for body in BAD_STATES:
            reaction = fmt.received(STATE, body)
            assert (reaction.packets, reaction.reconnect, reaction.resend) == ([], False, False), body[:60]
            assert fmt.ready, body[:60]
        # an old STATE (a stale retained one) is ignored too
        assert not fmt.received(STATE, json.dumps({"online": False, "timestamp": NOW_MS - 1}).encode()).reconnect
    assert fmt.refused == len(BAD_STATES) + 1
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage() and r.name == SPARKPLUG_LOG]
    assert len(refusals) == 2 and "Traceback" not in caplog.text, refusals  # each kind once
    off = fmt.received(STATE, json.dumps({"online": False, "timestamp": NOW_MS + 1}).encode())
    assert off.reconnect and [p.topic for p in off.packets] == ["spBv1.0/plant-a/NDEATH/gw1"]


def test_a_host_whose_clock_ran_ahead_and_was_set_right_is_heard_again(tmp_path):
    """A fuzzing pass: one STATE an hour ahead (the host's clock), then the host's clock set right: every later
    STATE was taken as stale, and the node waited for an online that never counted, storing, until a restart."""
    fmt = online(tmp_path)
    assert fmt.received(STATE, json.dumps({"online": False, "timestamp": NOW_MS + 3_600_000}).encode()).reconnect
    fmt.connect_answered()
    back = fmt.received(STATE, json.dumps({"online": True, "timestamp": NOW_MS + 5_000}).encode())
    assert back.resend and fmt.host_online
    # a STATE from before the ahead one's arrival is still stale
    assert not fmt.received(STATE, json.dumps({"online": False, "timestamp": NOW_MS - 1}).encode()).reconnect


def test_bad_commands_are_refused_counted_and_logged_once_per_kind_never_a_rebirth(tmp_path, caplog):
    fmt = online(tmp_path)
    rng = random.Random(7)
    garbage = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(300)]
    truncated = [REBIRTH[:i] for i in range(1, len(REBIRTH))]
    wrong = [command(name="Node Control/Rebirth", datatype=pb.Int32, int_value=1),
             command(name="Node Control/Rebirth", datatype=pb.String, string_value="true"),
             command(name="Node Control/Rebirth", datatype=pb.Boolean, boolean_value=False),
             command(name="Node Control/Rebirth", datatype=pb.Boolean, is_null=True),
             command(alias=2**63, datatype=pb.Boolean, boolean_value=True)]
    huge = [b"\x0a" + b"\xff" * 2_000_000, command(name="x" * 2_000_000, datatype=pb.String, string_value="y")]
    names = [command(name=f"Plant/Write{i}", datatype=pb.Double, double_value=i) for i in range(5000)]
    sent = 0
    with caplog.at_level(logging.INFO):
        for payload in garbage + truncated + wrong + huge + names:
            for topic in (NCMD, DCMD):
                sent += 1
                reaction = fmt.received(topic, payload)
                assert (reaction.packets, reaction.reconnect) == ([], False)
        assert fmt.received(DCMD, REBIRTH).packets == []  # a rebirth is a node command
        assert fmt.received(NCMD, REBIRTH).packets  # and still obeyed on NCMD
    assert sent - len(garbage) * 2 <= fmt.refused <= sent + 1  # garbage may decode as an empty payload
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage() and r.name == SPARKPLUG_LOG]
    assert len(lines) == MAX_REFUSALS_LOGGED + 1 and "counted, not logged" in lines[-1]
    assert max(len(line) for line in lines) < 400  # the 2 MB name is not echoed
    assert "Traceback" not in caplog.text


def test_rebirths_by_the_thousand_are_one_set_of_births_and_one_log_line(tmp_path, caplog):
    """A fuzzing pass: one NCMD of 250,000 Rebirth metrics built the births 250,000 times (51 s without the
    watchdog: systemd would have killed the daemon); 900 NCMDs a second gave 8,974 NBIRTHs and as many INFO lines."""
    fmt = online(tmp_path)
    payload = pb.Payload(timestamp=1)
    for _ in range(50_000):
        m = payload.metrics.add()
        m.name, m.datatype, m.boolean_value = "Node Control/Rebirth", pb.Boolean, True
    with caplog.at_level(logging.INFO):
        births = fmt.received(NCMD, payload.SerializeToString()).packets
        assert [p.topic for p in births] == ["spBv1.0/plant-a/NBIRTH/gw1", "spBv1.0/plant-a/DBIRTH/gw1/pump1"]
        storm = [fmt.received(NCMD, REBIRTH).packets for _ in range(1000)]
    assert storm == [[]] * 1000  # the births of a moment ago answer them (at most one set a second)
    assert len([r for r in caplog.records if "rebirth requested" in r.getMessage()]) == 1


@pytest.mark.parametrize("saved", [b'{"bdSeq": 1e400}', b'{"bdSeq": Infinity}', b'{"bdSeq": NaN}', b"[" * 100_000,
                                   b"\xff\xfe", b'{"bdSeq": [7]}', b"null"])
def test_a_damaged_session_file_starts_a_new_session_from_bdseq_0(tmp_path, saved):
    """sparkplug.json is the gateway's own, but a disk or a hand can damage it: 1e400 (Infinity) raised OverflowError
    and nesting 100,000 deep RecursionError at start, a crash loop under systemd. Now: bdSeq from 0, as new."""
    (tmp_path / "sparkplug.json").write_bytes(saved)
    cfg = config.parse(CONFIG)
    types = {d.name: sources.tag_types(d) for d in cfg.devices}
    fmt = SparkplugFormat(cfg, state_path=str(tmp_path / "sparkplug.json"), scored={}, types_of=types.__getitem__)
    death = pb.Payload.FromString(fmt.will().payload)
    assert [(m.name, m.long_value) for m in death.metrics] == [("bdSeq", 0)]


DAMAGED_ROWS = [b"not json", b"\x00\xff", b"[1, 2]", b"null", b'{"seq": 1}', b'{"values": [1]}',
                b'{"values": {"motor_rpm": "fast"}}', b'{"values": {"motor_rpm": [1]}}',
                b'{"values": {"motor_rpm": 1}, "quality": 5}', b"[" * 100_000]


def test_outbox_rows_the_gateway_never_writes_are_not_sent_said_once_and_the_session_goes_on(tmp_path, caplog):
    """A damaged or hand-edited outbox row (not JSON, not the contract's shape, a value its metric cannot carry) was
    an exception in the uplink at every start: a crash loop under systemd (exit 70). Through `data` and through the
    births' newest rows, it is now sent as nothing, logged once, counted; good rows around it go out as before."""
    from gateway.contract import Topics
    from gateway.store.outbox import Message

    fmt = online(tmp_path)
    topic = Topics("edge/plant-a/gw1").telemetry("pump1")
    good = Message(1, topic, json.dumps({"values": {"motor_rpm": 1480.0}}).encode(), NOW_MS / 1000 + 10)
    assert [p.topic for p in fmt.data(good)] == ["spBv1.0/plant-a/DDATA/gw1/pump1"]
    for seq, payload in enumerate(DAMAGED_ROWS, 2):
        assert fmt.data(Message(seq, topic, payload, NOW_MS / 1000 + seq + 10)) == [], payload[:40]
    again = Message(99, topic, json.dumps({"values": {"motor_rpm": 1490.0}}).encode(), NOW_MS / 1000 + 200)
    assert [p.topic for p in fmt.data(again)] == ["spBv1.0/plant-a/DDATA/gw1/pump1"]
    assert fmt.damaged == len(DAMAGED_ROWS)
    said = [r.getMessage() for r in caplog.records if "not what the gateway writes" in r.getMessage()]
    assert said == ["outbox message 2 (edge/plant-a/gw1/pump1/telemetry) is not what the gateway writes (its file "
                    "damaged or edited by hand): not sent as Sparkplug; any more are counted (health: "
                    "upstream.damaged)"]
    # The next session's births read the newest rows: a damaged one among them is passed over.
    fmt.lost()
    fmt.connect_answered()
    assert fmt.received(STATE, json.dumps({"online": True, "timestamp": NOW_MS + 1}).encode()).resend
    births = fmt.session_started(lambda: [Message(100, topic, b'{"values": {"motor_rpm": "x"}}', NOW_MS / 1000 + 300)])
    assert births and fmt.damaged == len(DAMAGED_ROWS) + 1
    dbirth = next(pb.Payload.FromString(p.payload) for p in births if "/DBIRTH/" in p.topic)
    assert next(m.double_value for m in dbirth.metrics if m.name == "motor_rpm") == 1490.0
