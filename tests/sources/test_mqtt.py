"""The local broker for plant sensors (amqtt, password required) and `source: mqtt` devices."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from gateway.units import rfc3339
from tests.helpers import ENV, ROOT, NotifySocket, free_port, gateway_config, listening, wait_until

pytestmark = pytest.mark.slow  # it starts processes: the gateway, brokers, the installer

pytest.importorskip("amqtt")


def cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], input=stdin, capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=60)


def connect(port: int, username: str | None = None, password: str | None = None, name: str = "") -> mqtt.Client | str:
    """A connected client, or the reason the broker gave for refusing it."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t{os.getpid()}{username}{password}{name}")
    if username is not None:
        client.username_pw_set(username, password)
    result: list = []
    client.on_connect = lambda c, u, f, reason, p: result.append(reason)
    client.on_disconnect = lambda c, u, f, reason, p: result.append(reason)
    client.connect("127.0.0.1", port, keepalive=10)
    client.loop_start()
    wait_until(lambda: result, 10, what="CONNACK")
    if result[0].is_failure:
        client.loop_stop()
        return str(result[0])
    return client


def make_users(tmp_path) -> tuple[str, str]:
    users = str(tmp_path / "local-broker.users")
    added = cli("broker-user", "sensor1", "--users", users, stdin="s3nsor-secret\n")
    assert added.returncode == 0, added.stderr
    secret = str(tmp_path / "gateway.pass")
    gw = cli("broker-user", "gateway", "--users", users, "--generate", secret)
    assert gw.returncode == 0, gw.stderr
    for path in (users, secret):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    text = Path(users).read_text()
    assert "s3nsor-secret" not in text and Path(secret).read_text().strip() not in text
    assert [line.split(":")[0] for line in text.splitlines()] == ["sensor1", "gateway"]
    return users, secret


def start_with_local_broker(tmp_path, mosquitto, gateway, subscribe, devices, local, users, secret):
    """The gateway with its embedded broker (passwords required) and an upstream subscriber."""
    extra = (f"local_broker: {{enabled: true, listen: \"127.0.0.1:{local}\", password_file: \"{users}\", "
             f"client: {{username: gateway, password_file: \"{secret}\"}}}}")
    up = subscribe(mosquitto.port, topic="edge/lab/test-gw/#")
    gw = gateway(gateway_config(tmp_path / "data", mosquitto.port, devices=devices, extra=extra)).start()
    wait_until(lambda: "local broker listening on" in gw.logs(), 20, what="the embedded broker")
    return up, gw


def test_local_broker_service_refuses_anonymous_and_wrong_passwords(tmp_path):
    users, secret = make_users(tmp_path)
    port = free_port()
    config = (ROOT / "broker_config" / "amqtt.yaml").read_text()
    config = config.replace("127.0.0.1:1883", f"127.0.0.1:{port}").replace("/etc/edge-gateway/local-broker.users",
                                                                          users)
    (tmp_path / "amqtt.yaml").write_text(config)
    notify = NotifySocket(tmp_path / "notify.sock")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "broker", "-c", str(tmp_path / "amqtt.yaml")],
                            env={**ENV, "NOTIFY_SOCKET": notify.path}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: notify.count("READY=1"), 20, what="the broker's READY=1")
        assert connect(port) == "Not authorized"
        assert connect(port, "sensor1", "wrong-password") == "Not authorized"
        assert connect(port, "nobody", "s3nsor-secret") == "Not authorized"
        good = connect(port, "sensor1", "s3nsor-secret")
        assert not isinstance(good, str), good
        good.disconnect()
        good.loop_stop()
        gateway = connect(port, "gateway", Path(secret).read_text().strip())
        assert not isinstance(gateway, str), gateway
        gateway.disconnect()
        gateway.loop_stop()
        # A removed user is refused from the broker's next start.
        assert cli("broker-user", "sensor1", "--users", users, "--delete").returncode == 0
        assert "sensor1" not in Path(users).read_text()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
        notify.close()
    assert proc.returncode == 0, out
    assert "s3nsor-secret" not in out and "wrong-password" not in out


def test_local_broker_config_without_authentication_is_refused(tmp_path):
    (tmp_path / "amqtt.yaml").write_text("listeners: {default: {type: tcp, bind: 127.0.0.1:1}}\nplugins: {}\n")
    result = cli("broker", "-c", str(tmp_path / "amqtt.yaml"))
    assert result.returncode == 78
    assert "without an authentication plugin no client can log in" in result.stderr
    (tmp_path / "amqtt.yaml").write_text((ROOT / "broker_config" / "amqtt.yaml").read_text().replace(
        "/etc/edge-gateway/local-broker.users", str(tmp_path / "missing.users")))
    result = cli("broker", "-c", str(tmp_path / "amqtt.yaml"))
    assert result.returncode == 78 and "missing.users (create users with: edge-gateway broker-user" in result.stderr


@pytest.mark.parametrize("data,expected", [
    (b'listeners:\n  default: {type: tcp, bind: "\xff"}\n',
     "amqtt.yaml:2: not UTF-8 text: byte 0xff at offset 41; save the file as UTF-8"),
    (b"listeners: [\n", "amqtt.yaml:2: not valid YAML: expected the node content, but found '<stream end>'"),
    (b"[" * 100_000, "amqtt.yaml: not a config: the YAML is nested too deeply"),
])
def test_any_bytes_in_the_local_broker_config_are_a_config_error(tmp_path, data, expected):
    """Not UTF-8 and nested 100,000 deep were tracebacks; a YAML error now names its line."""
    (tmp_path / "amqtt.yaml").write_bytes(data)
    result = cli("broker", "-c", str(tmp_path / "amqtt.yaml"))
    assert result.returncode == 78 and result.stderr == f"{tmp_path}/{expected}\n", result.stderr


def test_a_users_file_in_another_encoding_is_kept_by_broker_user_and_refused_by_the_broker(tmp_path):
    """amqtt stopped with a traceback on such a file, and broker-user said only "'utf-8' codec can't decode"."""
    users = tmp_path / "local-broker.users"
    users.write_bytes(b"old:\xff\xfe from another editor\n")
    added = cli("broker-user", "sensor1", "--users", str(users), stdin="s3nsor-secret\n")
    assert added.returncode == 0, added.stderr
    kept, new = users.read_bytes().splitlines()
    assert kept == b"old:\xff\xfe from another editor" and new.startswith(b"sensor1:$argon2")
    (tmp_path / "amqtt.yaml").write_text((ROOT / "broker_config" / "amqtt.yaml").read_text().replace(
        "/etc/edge-gateway/local-broker.users", str(users)))
    result = cli("broker", "-c", str(tmp_path / "amqtt.yaml"))
    assert result.returncode == 78 and "Traceback" not in result.stderr
    assert (f'password_file: expected UTF-8 text in "{users}", got byte 0xff on line 1; save it as UTF-8, or make its '
            "users again with edge-gateway broker-user NAME") in result.stderr


def test_embedded_broker_needs_a_password_file_unless_anonymous_is_allowed(tmp_path):
    text = gateway_config(tmp_path / "data", 1883, extra="local_broker: {enabled: true}")
    (tmp_path / "gateway.yaml").write_text(text)
    result = cli("check-config", str(tmp_path / "gateway.yaml"))
    assert result.returncode == 78
    assert "local_broker.password_file: required when the embedded broker is enabled" in result.stderr
    (tmp_path / "gateway.yaml").write_text(text.replace("enabled: true", "enabled: true, allow_anonymous: true"))
    assert cli("check-config", str(tmp_path / "gateway.yaml")).returncode == 0


def test_a_reload_after_broker_user_restarts_the_embedded_broker_with_its_users(tmp_path, mosquitto, gateway,
                                                                                 subscribe):
    """A fuzzing pass: with the embedded broker, a user added with broker-user was refused after the reload, and a
    deleted one still logged in: amqtt reads its users once, and the broker restarted only on a changed section."""
    import signal

    users, secret = make_users(tmp_path)
    local = free_port()
    devices = "\n  - {name: pump1, source: sim, profile: pump, seed: 3, interval: 100ms}\n"
    _, gw = start_with_local_broker(tmp_path, mosquitto, gateway, subscribe, devices, local, users, secret)
    first = wait_until(lambda: (c := connect(local, "sensor1", "s3nsor-secret")) and not isinstance(c, str) and c,
                       20, what="sensor1 to log in")
    first.disconnect()
    first.loop_stop()
    assert cli("broker-user", "sensor2", "--users", users, stdin="an0ther-secret\n").returncode == 0
    assert cli("broker-user", "sensor1", "--users", users, "--delete").returncode == 0
    gw.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "the broker restarts with it" in gw.logs() and gw.logs().count("local broker listening") == 2,
               20, what="the broker to restart")
    second = wait_until(lambda: (c := connect(local, "sensor2", "an0ther-secret")) and not isinstance(c, str) and c,
                        20, what="sensor2 to log in")
    second.disconnect()
    second.loop_stop()
    assert connect(local, "sensor1", "s3nsor-secret") == "Not authorized"
    gw.proc.send_signal(signal.SIGHUP)  # nothing changed: the broker and its sensors are left alone
    wait_until(lambda: gw.logs().count("config reloaded") == 2, 20, what="the second reload")
    assert gw.logs().count("local broker listening") == 2
    assert gw.stop() == 0
    assert "an0ther-secret" not in gw.logs()


def test_mqtt_device_fed_garbage_then_good_data(tmp_path, mosquitto, gateway, subscribe):
    users, secret = make_users(tmp_path)
    local = free_port()
    devices = """
  - {name: pump1, source: sim, profile: pump, seed: 3, interval: 100ms}
  - name: pump7
    source: mqtt
    topic: plant/pump7/state
    interval: 1s
    fields: {motor_rpm: rpm, bearing_temp_c: bearing.temp_c}
    timestamp_field: ts
"""
    up, gw = start_with_local_broker(tmp_path, mosquitto, gateway, subscribe, devices, local, users, secret)
    sensor = wait_until(lambda: (c := connect(local, "sensor1", "s3nsor-secret")) and not isinstance(c, str) and c,
                        20, what="the sensor to log in")
    assert connect(local) == "Not authorized"
    wait_until(lambda: "connected to the local broker" in gw.logs(), 20, what="the gateway to subscribe")

    def send(payload: bytes) -> None:
        sensor.publish("plant/pump7/state", payload, qos=1).wait_for_publish(5)

    def pump7():
        return up.on("/pump7/telemetry")

    # Garbage: every tag error, said once however often it comes.
    for _ in range(5):
        send(b"\x00\xff\xe2\x80\xae{not json")  # (a bidi override, shown escaped: it cannot rewrite the line)
    wait_until(lambda: len([p for p in pump7() if p["values"]["motor_rpm"] is None]) >= 5, 20, what="error samples")
    bad = pump7()[-1]
    assert bad["values"] == {"motor_rpm": None, "bearing_temp_c": None}
    assert bad["quality"] == {"motor_rpm": "error", "bearing_temp_c": "error"}
    assert gw.logs().count("malformed JSON on plant/pump7/state") == 1
    assert '(payload "\\u0000\ufffd\\u202e{not json")' in gw.logs() and "\u202e" not in gw.logs()
    # Another kind of garbage, each payload different: said once too.
    for i in range(5):
        send(f"[{i}]".encode())
    wait_until(lambda: len([p for p in pump7() if p["values"]["motor_rpm"] is None]) >= 10, 20,
               what="the arrays as error samples")
    assert gw.logs().count("expected a JSON object") == 1

    # A wrong type and a missing field: only those tags are bad.
    for _ in range(3):
        send(json.dumps({"rpm": "fast", "bearing": {"temp_c": 41.5}}).encode())
    wait_until(lambda: pump7()[-1]["values"] == {"motor_rpm": None, "bearing_temp_c": 41.5}, 20, what="one bad tag")
    assert pump7()[-1]["quality"] == {"motor_rpm": "error"}
    assert gw.logs().count('bad tags: motor_rpm (field rpm: expected a number, got "fast"') == 1
    send(json.dumps({"rpm": 1480}).encode())
    wait_until(lambda: pump7()[-1]["quality"] == {"bearing_temp_c": "error"}, 20, what="a missing field")

    # Good data: its own timestamp, all tags ok, the recovery said once.
    # (a sensor's clock may run ahead a little; never before the device's last sample, the error samples' time)
    t = round(time.time()) + 20
    send(json.dumps({"rpm": 1481.5, "bearing": {"temp_c": 42.25}, "ts": rfc3339(t + 0.25)}).encode())
    send(json.dumps({"rpm": 1482, "bearing": {"temp_c": 42.5}, "ts": (t + 1) * 1000 + 123}).encode())
    wait_until(lambda: pump7()[-1]["values"] == {"motor_rpm": 1482.0, "bearing_temp_c": 42.5}, 20, what="good data")
    good = pump7()[-2:]
    assert [p["ts"] for p in good] == [rfc3339(t + 0.25), rfc3339(t + 1.123)]
    assert all("quality" not in p for p in good)
    assert "device pump7: recovered, all tags ok" in gw.logs()

    # The other device and the uplink never stopped; seq has no gap.
    before = len(up.on("/pump1/telemetry"))
    wait_until(lambda: len(up.on("/pump1/telemetry")) > before + 5, 10, what="pump1 to go on")
    seqs = up.seqs()
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    # The state file is written every health_interval (1 s): wait for one written after the errors.
    state = tmp_path / "data" / "state.json"
    wait_until(lambda: state.exists() and json.loads(state.read_text())["devices"]["pump7"]["errors"] >= 9, 10,
               what="the state file to count the errors")
    assert json.loads(state.read_text())["devices"]["pump7"]["dropped"] == 0  # all taken: none dropped
    sensor.disconnect()
    sensor.loop_stop()
    assert gw.stop() == 0
    assert Path(secret).read_text().strip() not in gw.logs()


def test_mqtt_device_silent_sensor_is_an_error(tmp_path, mosquitto, gateway, subscribe):
    local = free_port()
    devices = """
  - {name: temp1, source: mqtt, topic: plant/temp1, interval: 200ms, timeout: 600ms, fields: {t: t}}
"""
    extra = f'local_broker: {{enabled: true, listen: "127.0.0.1:{local}", allow_anonymous: true}}'
    up = subscribe(mosquitto.port, topic="edge/lab/test-gw/#")
    gw = gateway(gateway_config(tmp_path / "data", mosquitto.port, devices=devices, extra=extra)).start()
    wait_until(lambda: up.on("/temp1/telemetry"), 20, what="an error sample for the silent sensor")
    assert up.on("/temp1/telemetry")[0]["quality"] == {"t": "error"}
    assert "device temp1: read failed: no message on plant/temp1 for 0.6s" in gw.logs()
    assert gw.stop() == 0


def test_simulated_pump_published_over_mqtt_is_read_as_a_device(tmp_path, mosquitto, gateway, subscribe):
    """`edge-gateway sim --mqtt` plays a plant sensor; the gateway reads it through its embedded broker."""
    users, secret = make_users(tmp_path)
    (tmp_path / "sensor.pass").write_text("s3nsor-secret\n")
    local = free_port()
    devices = """
  - name: pump9
    source: mqtt
    topic: sim/unit1/state
    interval: 200ms
    fields: {motor_rpm: motor_rpm, bearing_temp_c: bearing_temp_c, alarm: alarm}
    timestamp_field: ts
"""
    up, gw = start_with_local_broker(tmp_path, mosquitto, gateway, subscribe, devices, local, users, secret)
    sim = subprocess.Popen([sys.executable, "-m", "gateway", "sim", "--units", "1=pump:5", "--mqtt",
                            f"127.0.0.1:{local}", "--mqtt-user", "sensor1", "--mqtt-password-file",
                            str(tmp_path / "sensor.pass"), "--mqtt-interval", "0.2"],
                           env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        good = wait_until(lambda: [p for p in up.on("/pump9/telemetry") if "quality" not in p], 30,
                          what="the simulated pump upstream")
        assert 1400 < good[-1]["values"]["motor_rpm"] < 1600 and good[-1]["values"]["alarm"] == 0.0
    finally:
        sim.terminate()
        sim.communicate(timeout=10)
    assert gw.stop() == 0


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


def test_a_message_above_max_message_size_is_refused_by_the_broker_and_by_the_gateway(
        tmp_path, mosquitto, gateway, subscribe):
    # The local broker service (amqtt.yaml with our max_message_size) disconnects the sender of a
    # 10 MB message and stays small; a message below the limit passes.
    port = free_port()
    config = (ROOT / "broker_config" / "amqtt.yaml").read_text()
    assert "max_message_size: 256KiB" in config
    config = config.replace("127.0.0.1:1883", f"127.0.0.1:{port}").replace("max_message_size: 256KiB",
                                                                          "max_message_size: 64KiB")
    config = config.replace("allow_anonymous: false", "allow_anonymous: true")
    (tmp_path / "amqtt.yaml").write_text(config.split("  amqtt.plugins.authentication.FileAuthPlugin")[0])
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "broker", "-c", str(tmp_path / "amqtt.yaml")],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: listening(port) or proc.poll() is not None, 20, what="the broker to listen")
        listener = connect(port, name="listener")
        got: list = []
        listener.on_message = lambda c, u, m: got.append(len(m.payload))
        listener.subscribe("plant/#", qos=1)
        before = rss_mib(proc.pid)
        sender = connect(port)
        sender.publish("plant/big", b"x" * 10_000_000, qos=0)
        wait_until(lambda: not sender.is_connected(), 20, what="the broker to disconnect the sender")
        sender.loop_stop()
        sender = connect(port)
        sender.publish("plant/ok", b"y" * 60_000, qos=1).wait_for_publish(10)
        wait_until(lambda: got == [60_000], 20, what="the message below the limit")
        assert rss_mib(proc.pid) < before + 8  # never read into memory
        for client in (sender, listener):
            client.disconnect()
            client.loop_stop()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert "refused a packet of 10000" in out and "Traceback" not in out

    # A broker without that bound (mosquitto here): the gateway refuses to parse the message itself,
    # an error of its device, counted; the next good message is read.
    devices = "\n  - {name: temp1, source: mqtt, topic: plant/temp1, interval: 1s, fields: {t: t}}\n"
    extra = f'local_broker: {{listen: "127.0.0.1:{mosquitto.port}", max_message_size: 64KiB}}'
    up = subscribe(mosquitto.port, topic="edge/lab/test-gw/#")
    gw = gateway(gateway_config(tmp_path / "data", mosquitto.port, devices=devices, extra=extra)).start()
    wait_until(lambda: "connected to the local broker" in gw.logs(), 20, what="the gateway to subscribe")
    sensor = connect(mosquitto.port, name="sensor")
    for pad in (70_000, 80_000):  # two sizes, one kind of error: logged once
        sensor.publish("plant/temp1", json.dumps({"t": 1, "pad": "x" * pad}).encode(), qos=1).wait_for_publish(10)
    sensor.publish("plant/temp1", json.dumps({"t": 2}).encode(), qos=1).wait_for_publish(10)
    wait_until(lambda: [p["values"]["t"] for p in up.on("/temp1/telemetry")][:3] == [None, None, 2], 20,
               what="the refused messages as error samples, then the good one")
    assert gw.logs().count("a message above local_broker.max_message_size (65536 bytes) on plant/temp1: "
                           "70019 bytes on plant/temp1, dropped") == 1
    assert "80019 bytes" not in gw.logs()
    state = tmp_path / "data" / "state.json"
    wait_until(lambda: state.exists() and json.loads(state.read_text())["devices"]["temp1"]["errors"] >= 1, 30,
               what="the error counted in health")
    sensor.disconnect()
    sensor.loop_stop()
    assert gw.stop() == 0
    assert "Traceback" not in gw.logs()


def test_a_reload_keeps_the_local_broker_link_and_subscribes_a_sensor_added(tmp_path, mosquitto, gateway, subscribe):
    """A reload closed the link to the local broker and made it again: what sensors sent meanwhile was lost. It now
    stays connected while the gateway keeps mqtt devices: a sensor added is subscribed on it, one changed is taken
    again, and the link closes with its last device."""
    import signal

    import psutil

    def sensor_yaml(name: str, interval: str = "1s") -> str:
        return f"\n  - {{name: {name}, source: mqtt, topic: plant/{name}, interval: {interval}, fields: {{t: t}}}}"
    temp1, temp2, temp3 = sensor_yaml("temp1"), sensor_yaml("temp2"), sensor_yaml("temp3")
    extra = f'local_broker: {{listen: "127.0.0.1:{mosquitto.port}"}}'
    up = subscribe(mosquitto.port, topic="edge/lab/test-gw/#")
    gw = gateway(gateway_config(tmp_path / "data", mosquitto.port, devices=temp1 + temp2, extra=extra)).start()
    wait_until(lambda: "connected to the local broker" in gw.logs(), 20, what="the gateway to subscribe")
    sensor = connect(mosquitto.port, name="sensors")
    sending = threading.Event()

    def send() -> None:
        n = 0
        while not sending.is_set():
            n += 1
            for name in ("temp1", "temp2", "temp3"):
                sensor.publish(f"plant/{name}", json.dumps({"t": n}).encode())
            time.sleep(0.05)
    sender = threading.Thread(target=send, daemon=True)
    sender.start()

    def links() -> list[int]:  # the gateway's local ports towards the broker: its uplink and its local link
        return sorted(c.laddr.port for c in psutil.Process(gw.proc.pid).net_connections("tcp")
                      if c.raddr and c.raddr.port == mosquitto.port and c.status == psutil.CONN_ESTABLISHED)
    try:
        wait_until(lambda: up.on("/temp1/telemetry") and up.on("/temp2/telemetry"), 20, what="both sensors read")
        before = links()
        assert len(before) == 2, before
        gw.config.write_text(gw.config.read_text().replace(temp2, sensor_yaml("temp2", "2s") + temp3))
        gw.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "config reloaded" in gw.logs() and up.on("/temp3/telemetry"), 20,
                   what="the reload, and the added sensor read")
        count = len(up.on("/temp2/telemetry"))
        wait_until(lambda: len(up.on("/temp2/telemetry")) > count, 20, what="the changed sensor read again")
        assert links() == before, (before, links())  # neither the uplink nor the local link made again
        assert "config reloaded: 3 devices (1 unchanged, their connections kept)" in gw.logs()
        gw.config.write_text(gw.config.read_text().replace(temp1, "").replace(sensor_yaml("temp2", "2s"), "")
                             .replace(temp3, "\n  - {name: sim1, source: sim, profile: pump, seed: 2, interval: 1s}"))
        gw.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: gw.logs().count("config reloaded") == 2, 20, what="the second reload")
        wait_until(lambda: len(links()) == 1, 10, what="the local link closed with its last sensor")
    finally:
        sending.set()
        sender.join(5)
        sensor.disconnect()
        sensor.loop_stop()
    assert gw.stop() == 0
    assert "Traceback" not in gw.logs()
