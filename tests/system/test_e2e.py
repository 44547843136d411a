"""The gateway as a user runs it, against real brokers (mosquitto and amqtt)."""

from __future__ import annotations

import re

import pytest

from tests.helpers import gateway_config, wait_until

pytestmark = pytest.mark.slow  # it starts processes: the gateway, brokers, the installer

RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
PUMP_TAGS = {"motor_rpm", "bearing_temp_c", "oil_pressure_bar", "vibration_mm_s", "flow_l_min",
             "suction_pressure_bar", "discharge_pressure_bar", "motor_current_a", "casing_temp_c", "ambient_temp_c"}
ROOT = "edge/lab/test-gw"


def test_telemetry_contract_seq_status_and_last_will(broker, gateway, subscribe, tmp_path):
    sub = subscribe(broker.port, topic=f"{ROOT}/#")
    gw = gateway(gateway_config(tmp_path / "data", broker.port)).start()
    wait_until(lambda: len(sub.on("/pump1/telemetry")) >= 10 and sub.on("/line1/counters"), 20,
               what="telemetry and counters upstream")

    tele = sub.on("/pump1/telemetry")[-1]
    assert set(tele) >= {"seq", "ts", "device", "values"}
    assert tele["device"] == "pump1"
    assert set(tele["values"]) == PUMP_TAGS
    assert all(isinstance(v, float) for v in tele["values"].values())
    assert RFC3339_MS.match(tele["ts"]), tele["ts"]
    counters = sub.on("/line1/counters")[-1]
    assert set(counters["counters"]["produced"]) >= {"total", "shift", "shift_id"}

    seqs = sub.seqs()
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "seq must have no gaps"

    status = [p for t, p, _ in sub.messages if t == f"{ROOT}/status"]
    assert status[-1]["state"] == "online"
    assert status[-1]["devices"]["pump1"]["state"] == "ok"

    gw.kill()  # SIGKILL: no goodbye, the broker publishes the Last Will
    wait_until(lambda: [p for t, p, _ in sub.messages if t == f"{ROOT}/status"][-1]["state"] == "offline",
               15 if broker.kind == "mosquitto" else 60, what="the Last Will (offline)")
    # A late subscriber gets the retained offline status.
    late = subscribe(broker.port, topic=f"{ROOT}/status", client_id="late")
    retained = wait_until(lambda: late.messages, 10, what="the retained status")
    assert retained[-1][1]["state"] == "offline" and retained[-1][2] is True


def test_clean_stop_publishes_offline_and_delivers_everything(mosquitto, gateway, subscribe, tmp_path):
    sub = subscribe(mosquitto.port, topic=f"{ROOT}/#")
    gw = gateway(gateway_config(tmp_path / "data", mosquitto.port)).start()
    wait_until(lambda: len(sub.on("/telemetry")) >= 10, 20, what="telemetry")
    assert gw.stop() == 0
    wait_until(lambda: sub.on("/status") and sub.on("/status")[-1]["state"] == "offline", 10, what="offline")
    assert "0 messages kept in the outbox" in gw.logs()
    seqs = sub.seqs()
    assert seqs == list(range(1, len(seqs) + 1))


def test_counter_total_is_exact_across_a_16_bit_wrap(mosquitto, gateway, subscribe, tmp_path):
    sub = subscribe(mosquitto.port, topic=f"{ROOT}/line1/#")
    gw = gateway(gateway_config(tmp_path / "data", mosquitto.port)).start()
    wait_until(lambda: [t for t in sub.on("/telemetry") if t["values"]["produced_raw"] < 100], 30,
               what="the 16-bit raw counter to wrap")
    wait_until(lambda: len(sub.on("/counters")) > 5, 10, what="more counter messages")
    assert gw.stop() == 0
    raw_at = {t["ts"]: t["values"]["produced_raw"] for t in sub.on("/telemetry")}
    first_raw = sub.on("/telemetry")[0]["values"]["produced_raw"]
    assert first_raw > 65000
    for counters in sub.on("/counters"):
        expected = (raw_at[counters["ts"]] - first_raw) % 65536  # what the machine really made
        assert counters["counters"]["produced"]["total"] == expected


def test_restart_continues_seq_and_counter_totals(broker, gateway, subscribe, tmp_path):
    # The in-process simulator restarts with the gateway, like a PLC power-cycled with it: its raw
    # counter starts again from zero, which the gateway must count as a reset, continuing the total.
    devices = """
  - name: line1
    source: sim
    profile: flexo_line
    interval: 100ms
    plc: {counter_bits: 32, rate_per_min: 1200}
    counters: [{name: produced, register: produced_raw, bits: 32}]
"""
    sub = subscribe(broker.port, topic=f"{ROOT}/#")
    config = gateway_config(tmp_path / "data", broker.port, devices=devices)
    first = gateway(config).start()
    wait_until(lambda: [c for c in sub.on("/line1/counters") if c["counters"]["produced"]["total"] >= 20], 30,
               what="the produced counter to count")
    assert first.stop() == 0
    before_seq = max(sub.seqs())
    raw_at = {t["ts"]: t["values"]["produced_raw"] for t in sub.on("/line1/telemetry")}
    first_raw = sub.on("/line1/telemetry")[0]["values"]["produced_raw"]  # the baseline
    before = sub.on("/line1/counters")[-1]
    before_total = before["counters"]["produced"]["total"]
    assert before_total == raw_at[before["ts"]] - first_raw

    second = gateway(config).start()
    wait_until(lambda: max(sub.seqs()) > before_seq + 20, 20, what="messages after the restart")
    assert second.stop() == 0
    seqs = sub.seqs()
    assert seqs == list(range(1, len(seqs) + 1)), "seq continues across the restart: no reset, no gap"
    totals = [c["counters"]["produced"]["total"] for c in sub.on("/line1/counters")]
    assert totals == sorted(totals), "a lifetime total never goes down"
    raw_at = {t["ts"]: t["values"]["produced_raw"] for t in sub.on("/line1/telemetry")}
    last = sub.on("/line1/counters")[-1]
    # Reset rule: after the reset the raw value counts from zero, all of it new production.
    assert last["counters"]["produced"]["total"] == before_total + raw_at[last["ts"]]
    assert "was reset on the PLC" in second.logs()
