"""Store-and-forward under real faults: brokers killed, the gateway killed -9, a full disk, a corrupt file.

Every test here is bounded in time; every process it starts is killed by a fixture.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime

import pytest

from tests.helpers import ENV, BrokerProcess, gateway_config, wait_until
from tests.helpers import ROOT as REPO

pytestmark = pytest.mark.slow  # it starts processes: the gateway, brokers, the installer

ROOT = "edge/lab/test-gw"
FAST_DEVICES = """
  - {name: pump1, source: sim, profile: pump, seed: 3, interval: 50ms}
  - name: line1
    source: sim
    profile: flexo_line
    interval: 50ms
    plc: {counter_bits: 16, rate_per_min: 3000}
    counters: [{name: produced, register: produced_raw, bits: 16}]
"""
MAX_INFLIGHT = 20
OUTAGE = 4.0  # seconds: some 240 messages pile up (12 in-flight windows); the reconnect backoff reaches its 1 s cap


def assert_every_seq_in_order(seqs: list[int], first: int = 1, window: int = MAX_INFLIGHT) -> None:
    """Every seq from `first` to the last, none missing; first arrivals in order; duplicates only
    from the in-flight window resent after a reconnect."""
    assert seqs, "nothing arrived"
    seen: set[int] = set()
    highest = 0
    order = []
    for seq in seqs:
        if seq in seen:
            assert highest - seq < window, f"duplicate {seq} is older than the in-flight window (highest {highest})"
            continue
        seen.add(seq)
        order.append(seq)
        highest = max(highest, seq)
    missing = sorted(set(range(first, max(seen) + 1)) - seen)
    assert not missing, f"{len(missing)} seqs never arrived: {missing[:20]}"
    assert order == sorted(order), "first arrivals out of seq order"


def upstream(gate_port: int, extra: str = "") -> str:
    return f", max_inflight: {MAX_INFLIGHT}{extra}"


def sampled_after(sub, t: float) -> bool:
    """Telemetry sampled after wall time t has arrived. JSON goes out as one stream in seq order, so every
    row committed before t (a backlog) went out before it."""
    return any(datetime.fromisoformat(p["ts"].replace("Z", "+00:00")).timestamp() > t
               for p in sub.on("/telemetry")[-50:])


def state_since(data_dir, t: float) -> dict | None:
    """The gateway's state file (written every health_interval), if an instance wrote it after wall time t."""
    try:
        state = json.loads((data_dir / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return state if datetime.fromisoformat(state["ts"].replace("Z", "+00:00")).timestamp() > t else None


def test_repeated_broker_outages_lose_nothing(broker, gate, gateway, subscribe, tmp_path):
    g = gate(broker.port)
    sub = subscribe(broker.port, topic=f"{ROOT}/+/+")
    config = gateway_config(tmp_path / "data", g.port, devices=FAST_DEVICES, upstream=upstream(g.port))
    gw = gateway(config).start()
    wait_until(lambda: len(sub.seqs()) > 50, 20, what="traffic before the first outage")
    for outage in range(2):
        g.is_open = False  # after the restart the subscriber goes first
        # The network drops first, then the broker is killed -9. A broker sends PUBACK before it has
        # written the message on to its subscribers, so killing it mid-stream can lose messages it had
        # acknowledged: that is the broker's durability, which no publisher can repair. Cutting the
        # link first means every acknowledged message had reached the subscriber, so a gap could only be
        # the gateway's loss; the messages in flight at the cut got no PUBACK and must be resent.
        g.cut()
        time.sleep(0.5)
        broker.kill()  # SIGKILL: the broker process is gone
        time.sleep(OUTAGE)  # the gateway keeps sampling into its outbox
        assert gw.proc.poll() is None, "the gateway must survive the outage"
        subscribed = sub.subscriptions
        broker.start()
        wait_until(lambda: sub.subscriptions > subscribed, 15, what="the subscriber to subscribe again")
        g.is_open = True
        reopened = time.time()
        wait_until(lambda: sampled_after(sub, reopened), 30, what=f"the backlog of outage {outage + 1} to drain")
    assert gw.stop() == 0
    assert_every_seq_in_order(sub.seqs())
    assert gw.logs().count("connected to upstream") >= 3
    assert "lost the connection" in gw.logs()


def test_a_network_that_swallows_data_and_heals_without_a_cut_is_noticed_within_seconds(mosquitto, gate, gateway,
                                                                                        subscribe, tmp_path):
    """A blackhole (the proxy reads and discards, both ways; the TCP connection stays): the in-flight
    window fills with messages that never arrive, so nothing more is sent whose PUBACK would show it.
    The gateway probes with the retained status: once the network carries data again the probe's PUBACK
    comes while older messages still have none, and the gateway reconnects and resends them. Without
    the probe only the keepalive bound (30 s) noticed."""
    g = gate(mosquitto.port)
    sub = subscribe(mosquitto.port, topic=f"{ROOT}/+/+")
    gw = gateway(gateway_config(tmp_path / "data", g.port, devices=FAST_DEVICES, upstream=upstream(g.port))).start()
    wait_until(lambda: len(sub.seqs()) > 50, 20, what="traffic before the partition")
    g.dropping = True
    time.sleep(7)  # the window fills (20 in flight at 40 messages/s), and probes are lost too
    g.dropping = False
    healed = time.monotonic()
    wait_until(lambda: "never acknowledged (the network lost them)" in gw.logs(), 10, what="the loss to be noticed")
    noticed = time.monotonic() - healed
    wait_until(lambda: gw.logs().count("connected to upstream") >= 2, 15, what="the reconnect")
    last = max(sub.seqs()) + 100
    wait_until(lambda: max(sub.seqs()) > last, 20, what="the backlog to drain")
    assert gw.stop() == 0
    assert noticed < 10 and "no acknowledgement from the broker for" not in gw.logs()
    assert_every_seq_in_order(sub.seqs())


def test_kill_9_during_a_burst_and_while_the_broker_is_down(mosquitto, gate, gateway, subscribe, tmp_path):
    g = gate(mosquitto.port)
    sub = subscribe(mosquitto.port, topic=f"{ROOT}/+/+")
    config = gateway_config(tmp_path / "data", g.port, devices=FAST_DEVICES, upstream=upstream(g.port))
    first = gateway(config).start()
    wait_until(lambda: len(sub.seqs()) > 100, 20, what="a burst")
    first.kill()  # kill -9 while publishing
    g.is_open = False
    subscribed = sub.subscriptions
    mosquitto.kill()
    data = tmp_path / "data"
    started = time.time()
    second = gateway(config).start()  # restarts with the broker down: samples pile up in the outbox
    wait_until(lambda: (s := state_since(data, started)) and min(d["polls"] for d in s["devices"].values()) >= 20,
               20, what="the second instance to store a second of samples")
    second.kill()  # kill -9 while the broker is down
    started = time.time()
    third = gateway(config).start()
    wait_until(lambda: state_since(data, started), 20, what="the third instance to run with the broker down")
    mosquitto.start()
    wait_until(lambda: sub.subscriptions > subscribed, 15, what="the subscriber to subscribe again")
    g.is_open = True
    reopened = time.time()
    wait_until(lambda: sampled_after(sub, reopened), 30, what="the backlog to drain")
    assert third.stop() == 0
    assert_every_seq_in_order(sub.seqs())
    # Everything committed arrived: the outbox is empty and the last seq matches what was sent.
    out = subprocess.run([*gateway_cli(), "outbox", "--json", "-c", str(third.config)], capture_output=True,
                         text=True, timeout=30)
    info = json.loads(out.stdout)
    assert info["messages"] == 0
    assert info["next_seq"] - 1 == max(sub.seqs())


def gateway_cli() -> list[str]:
    import sys
    return [sys.executable, "-m", "gateway"]


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
def test_bounded_outbox_counts_every_drop(policy, mosquitto, gate, gateway, subscribe, tmp_path):
    g = gate(mosquitto.port)
    g.is_open = False  # the upstream is unreachable from the start
    sub = subscribe(mosquitto.port, topic=f"{ROOT}/#")
    extra = f"outbox: {{max_messages: 50, when_full: {policy}}}"
    gw = gateway(gateway_config(tmp_path / "data", g.port, devices=FAST_DEVICES, extra=extra,
                                upstream=upstream(g.port))).start()
    wait_until(lambda: "outbox full" in gw.logs(), 20, what="the outbox to fill")
    time.sleep(1)
    g.is_open = True
    wait_until(lambda: len(sub.on("/health")) >= 2, 20, what="health upstream")
    assert gw.stop() == 0
    seqs = sorted(set(sub.seqs()))
    dropped = seqs[-1] - len(seqs)  # every seq below the last that never arrived was dropped
    health = sub.on("/health")[-1]
    assert health["dropped"] == dropped > 0
    if policy == "drop_oldest":
        missing = sorted(set(range(1, seqs[-1] + 1)) - set(seqs))
        assert missing[:seqs[0] - 1] == list(range(1, seqs[0])), "the oldest were dropped"
        # While the backlog drains the outbox may still be full: then the oldest rows not in flight go,
        # i.e. a few just after the in-flight window (all counted: the health check above).
        later = missing[seqs[0] - 1:]
        assert all(m > seqs[0] for m in later) and len(later) <= 50
    else:
        assert seqs[:50] == list(range(1, 51)), "the first 50 kept, the newest dropped"
        gap_end = seqs[50] - 1
        assert f"dropped seq 51..{gap_end}" in gw.logs()
    # Once per episode, not once per message. While the backlog drains, a slow moment may fill the
    # outbox again: a second episode, logged at its start and its end like the first.
    logs = gw.logs()
    episodes, ended = logs.count("outbox full"), logs.count("drop episode over")
    assert 1 <= episodes <= 3 and ended <= episodes <= ended + 1 and dropped > 3 * episodes, (episodes, ended, dropped)


@contextmanager
def full_disk(tmp_path, gate, gateway, port: int):
    """A gateway whose data_dir is a 320 KiB tmpfs, the upstream cut off (the gate), once the disk is full:
    (data dir, gate, gateway). Unmounted after."""
    data = tmp_path / "data"
    data.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(data)]).returncode:
        pytest.skip("needs root to mount a small tmpfs as data_dir")
    try:
        g = gate(port)
        g.is_open = False
        gw = gateway(gateway_config(data, g.port, devices=FAST_DEVICES, upstream=upstream(g.port))).start()
        wait_until(lambda: "outbox write failed" in gw.logs(), 60, what="the disk to fill")
        yield data, g, gw
    finally:
        subprocess.run(["umount", "-l", str(data)])


def test_full_disk_is_survived_and_recovered_from(mosquitto, gate, gateway, subscribe, tmp_path):
    """Also the history: a reload on the full disk adds one, which cannot be opened; once the disk has space it
    opens by itself (before, it stayed off until the next reload)."""
    sub = subscribe(mosquitto.port, topic=f"{ROOT}/#")
    with full_disk(tmp_path, gate, gateway, mosquitto.port) as (data, g, gw):
        time.sleep(2)
        assert gw.proc.poll() is None, "a full disk must not stop the gateway"
        # status shows the state of now, not the last one written before the disk filled (its rewrite in place)
        state = subprocess.run([sys.executable, "-m", "gateway", "status", "--json", "-c", str(gw.config)],
                               capture_output=True, text=True, env=ENV, cwd=REPO, timeout=60)
        assert state.stdout and json.loads(state.stdout)["age_s"] < 5, (state.stdout[:300], state.stderr[-500:])
        gw.config.write_text(gw.config.read_text().replace(
            "interval: 50ms}", "interval: 50ms, history: {keep: 1h, max_bytes: 1MiB}}", 1))
        gw.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "history.db cannot be opened" in gw.logs(), 20, what="the history refused by the disk")
        # Some space comes back, a couple of MB: the WAL that filled the disk is checkpointed and cut (before, it
        # grew to SQLite's 4 MB checkpoint first, filled the disk again, and delivery stopped for good).
        subprocess.run(["mount", "-o", "remount,size=2m", str(data)], check=True)
        wait_until(lambda: "outbox writes work again" in gw.logs(), 20, what="recovery")
        g.is_open = True
        wait_until(lambda: len(sub.on("/health")) >= 1, 20, what="health")
        delivered = len(sub.seqs())
        time.sleep(15)  # well past 2 MB of WAL at these rates
        assert len(sub.seqs()) > delivered + 100
        assert gw.stop() == 0
        assert_every_seq_in_order(sub.seqs())
        assert sub.on("/health")[-1]["store_errors"] > 0
        assert gw.logs().count("outbox write failed") == 1
        assert gw.logs().count("history.db cannot be opened") == 1
        assert "history.db opened: samples are recorded again" in gw.logs()
        export = subprocess.run([sys.executable, "-m", "gateway", "history", "export", "pump1", "-c", str(gw.config),
                                 "--csv", str(tmp_path / "pump1.csv")], capture_output=True, text=True, env=ENV,
                                cwd=REPO, timeout=60)
        assert export.returncode == 0, export.stderr
        assert len((tmp_path / "pump1.csv").read_text().splitlines()) > 20


def test_a_stop_while_the_disk_is_full_says_how_many_messages_are_lost(mosquitto, gate, gateway, tmp_path):
    """A fuzzing pass: stopped while the disk was full, the messages held in memory were thrown away and the log
    said only '0 messages kept in the outbox'."""
    with full_disk(tmp_path, gate, gateway, mosquitto.port) as (_, _, gw):
        time.sleep(1)
        assert gw.stop() == 0
        assert re.search(r"\d+ messages held in memory could not be written \(database or disk is full\) and are "
                         r"lost; their seqs are a gap upstream", gw.logs()), gw.logs()[-2000:]


def test_corrupt_outbox_at_start_is_moved_aside(broker, gateway, subscribe, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "gateway.db").write_bytes(b"this is not sqlite" * 1000)
    sub = subscribe(broker.port, topic=f"{ROOT}/+/+")
    gw = gateway(gateway_config(data, broker.port)).start()
    wait_until(lambda: len(sub.seqs()) > 10, 20, what="telemetry despite the corrupt file")
    assert gw.stop() == 0
    assert "is unreadable" in gw.logs() and "moved aside" in gw.logs()
    assert [p for p in os.listdir(data) if p.startswith("gateway.db.corrupt-")]


def test_second_instance_on_the_same_data_dir_is_refused(gateway, tmp_path):
    port = BrokerProcess("mosquitto", tmp_path).port  # nothing listens: the first keeps retrying
    config = gateway_config(tmp_path / "data", port)
    first = gateway(config).start()
    wait_until(lambda: "started" in first.logs(), 20, what="the first instance")
    second = subprocess.run([*gateway_cli(), "run", "-c", str(first.config)], capture_output=True, text=True,
                            timeout=30)
    assert second.returncode == 69
    assert "another edge-gateway is running with data_dir" in second.stderr
