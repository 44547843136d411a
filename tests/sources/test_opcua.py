"""OPC UA devices: the daemon against the simulated plant served by asyncua, and the source in-process against asyncua servers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from gateway.config import parse
from gateway.ports import free_port, listening
from tests.helpers import ENV, ROOT, gateway_config, spawn, wait_until

pytest.importorskip("asyncua")
pytestmark = pytest.mark.slow

TOPIC = "edge/lab/test-gw"


def opcua_server(tmp_path, port: int):
    proc = spawn([sys.executable, "-m", "gateway", "sim", "--opcua", f"127.0.0.1:{port}"], tmp_path / "opcua-sim.log",
                 "a", env=ENV, cwd=ROOT)
    wait_until(lambda: listening(port) or proc.poll() is not None, 30, what="the OPC UA server")
    return proc


def device(port: int, mode: str = "poll", missing: bool = True) -> str:
    return f"""
  - name: press1
    source: opcua
    endpoint: opc.tcp://127.0.0.1:{port}/edge-gateway/sim/
    mode: {mode}
    interval: 200ms
    timeout: 1s
    nodes:
      - {{name: machine_status, node: "ns=2;s=Unit2.machine_status"}}
      - {{name: line_speed_m_min, node: "ns=2;s=Unit2.line_speed_m_min"}}
      - {{name: produced_raw, node: "ns=2;s=Unit2.produced_raw"}}
""" + ('      - {name: missing, node: "ns=2;s=Unit2.no_such_tag"}\n' if missing else "") + """\
    counters: [{name: produced, register: produced_raw, bits: 32}]
"""


@pytest.mark.parametrize("mode", ["poll", "subscribe"])
def test_values_arrive_and_a_server_restart_is_survived(mosquitto, gateway, subscribe, tmp_path, mode):
    """The gateway starts before its server: unreachable at start, so a node the server lacks is
    found later, as that tag's error (a reachable server at start makes it a config error, below)."""
    port = free_port()
    sub = subscribe(mosquitto.port, topic=f"{TOPIC}/#")
    gw = gateway(gateway_config(tmp_path / "data", mosquitto.port, devices=device(port, mode))).start()
    wait_until(lambda: "device press1: read failed" in gw.logs(), 30, what="the device error before the server")
    server = opcua_server(tmp_path, port)
    try:
        wait_until(lambda: len([t for t in sub.on("/press1/telemetry") if t["values"]["produced_raw"] is not None])
                   > 5, 30, what="telemetry over OPC UA")
        last = sub.on("/press1/telemetry")[-1]
        assert last["values"]["machine_status"] in (1, 2, 3, 4) and last["values"]["produced_raw"] >= 0
        assert last["quality"] == {"missing": "error"}  # a node that does not exist: that tag's error
        errors = gw.logs().count("device press1: read failed")
        server.kill()
        server.wait(10)
        wait_until(lambda: gw.logs().count("device press1: read failed") > errors, 30, what="the device error")
        server = opcua_server(tmp_path, port)
        wait_until(lambda: gw.logs().count("connected to opc.tcp") >= 2, 60, what="a fresh session")
        before = len(sub.on("/press1/telemetry"))
        wait_until(lambda: len([t for t in sub.on("/press1/telemetry")[before:]
                                if "line_speed_m_min" not in t.get("quality", {})]) > 3, 30, what="data again")
        assert gw.stop() == 0
        assert "Traceback" not in gw.logs()
    finally:
        server.kill()
        server.wait(10)


def test_a_stalled_subscription_is_noticed_and_made_again(mosquitto, gateway, subscribe, tmp_path):
    """The server process stopped (SIGSTOP): its socket stays open, nothing comes, not even keep-alives."""
    import signal
    import time

    port = free_port()
    server = opcua_server(tmp_path, port)
    try:
        sub = subscribe(mosquitto.port, topic=f"{TOPIC}/#")
        gw = gateway(gateway_config(tmp_path / "data", mosquitto.port, devices=device(port, "subscribe", missing=False))).start()
        wait_until(lambda: len(sub.on("/press1/telemetry")) > 5, 30, what="telemetry")
        server.send_signal(signal.SIGSTOP)
        wait_until(lambda: "delivered nothing, not even a keep-alive" in gw.logs(), 30, what="the stall")
        # before it is given up, its last values are stale, and the device's line says so (it named the tags only)
        assert re.search(r"device press1: bad tags: .* \(the subscription has delivered nothing for \d+s: the last "
                         r"values are stale\)", gw.logs()), gw.logs()
        server.send_signal(signal.SIGCONT)
        time.sleep(0.5)
        before = len(sub.on("/press1/telemetry"))
        wait_until(lambda: len([t for t in sub.on("/press1/telemetry")[before:]
                                if "line_speed_m_min" not in t.get("quality", {})]) > 3, 60, what="data again")
        assert gw.stop() == 0
        assert "Traceback" not in gw.logs()
    finally:
        server.send_signal(signal.SIGCONT)
        server.kill()
        server.wait(10)


def test_a_login_with_a_wrong_password_is_refused_and_the_right_one_reads(mosquitto, gateway, subscribe, tmp_path):
    """Started before its server, the device's first error is "connection refused"; the refused login after it
    is said too, and status shows it (a docs audit: only the first was ever logged, and status said only
    "not connected, next attempt in 31.1s")."""
    port = free_port()
    (tmp_path / "server.pass").write_text("s3cret-pw\n")
    (tmp_path / "wrong.pass").write_text("not-it\n")
    login = "    username: gw\n    password_file: {}\n    nodes:"
    sub = subscribe(mosquitto.port, topic=f"{TOPIC}/#")
    wrong = device(port, missing=False).replace("    nodes:", login.format(tmp_path / "wrong.pass"), 1)
    gw = gateway(gateway_config(tmp_path / "data", mosquitto.port, devices=wrong)).start()
    wait_until(lambda: "device press1: read failed" in gw.logs(), 30, what="the refused connection")
    server = spawn([sys.executable, "-m", "gateway", "sim", "--opcua", f"127.0.0.1:{port}", "--opcua-user", "gw",
                    "--opcua-password-file", str(tmp_path / "server.pass")], tmp_path / "opcua-sim.log", "a", env=ENV,
                   cwd=ROOT)
    try:
        wait_until(lambda: listening(port) or server.poll() is not None, 30, what="the OPC UA server")
        wait_until(lambda: "device press1: cannot connect to opc.tcp://127.0.0.1:" in gw.logs(), 30,
                   what="the refused login, said")
        assert "(BadUserAccessDenied)" in gw.logs()
        assert "not-it" not in gw.logs()

        def last_error() -> str:
            status = subprocess.run([sys.executable, "-m", "gateway", "status", "--json", "-c", str(gw.config)],
                                    capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60)
            return json.loads(status.stdout)["devices"]["press1"]["last_error"] or ""
        wait_until(lambda: "cannot connect (" in (e := last_error()) and "BadUserAccessDenied" in e, 20,
                   what="status to show why it cannot connect")
        assert gw.stop() == 0
        right = device(port, missing=False).replace("    nodes:", login.format(tmp_path / "server.pass"), 1)
        gw = gateway(gateway_config(tmp_path / "data2", mosquitto.port, devices=right)).start()
        wait_until(lambda: [t for t in sub.on("/press1/telemetry") if t["values"]["machine_status"] is not None], 30,
                   what="data with the right password")
        assert gw.stop() == 0 and "s3cret-pw" not in gw.logs()
    finally:
        server.kill()
        server.wait(10)


def make_certificate(tmp_path, name: str, uri: str, server: bool) -> tuple[str, str]:
    """A self-signed application certificate (DER) and its key (PEM), as OPC UA wants them."""
    from asyncua.crypto import cert_gen
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key, name, {"organizationName": "edge-gateway tests"}, [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost")],
        [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH])
    from cryptography.hazmat.primitives import serialization
    cert_path, key_path = tmp_path / f"{name}.der", tmp_path / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return str(cert_path), str(key_path)


def test_basic256sha256_sign_and_encrypt_with_generated_certificates(mosquitto, gateway, subscribe, tmp_path):
    port = free_port()
    server_cert, server_key = make_certificate(tmp_path, "server", "urn:edge-gateway:sim", server=True)
    client_cert, client_key = make_certificate(tmp_path, "gateway", "urn:edge-gateway:test-gw", server=False)
    server = spawn([sys.executable, "-m", "gateway", "sim", "--opcua", f"127.0.0.1:{port}", "--opcua-cert", server_cert,
                    server_key], tmp_path / "opcua-sim.log", "a", env=ENV, cwd=ROOT)
    try:
        wait_until(lambda: listening(port) or server.poll() is not None, 30, what="the OPC UA server")
        sub = subscribe(mosquitto.port, topic=f"{TOPIC}/#")
        security = (f"    security: {{policy: Basic256Sha256, mode: SignAndEncrypt, cert_file: {client_cert}, "
                    f"key_file: {client_key}, server_cert_file: {server_cert}}}\n    nodes:")
        text = gateway_config(tmp_path / "data", mosquitto.port,
                              devices=device(port, "subscribe", missing=False).replace("    nodes:", security, 1))
        gw = gateway(text).start()
        wait_until(lambda: [t for t in sub.on("/press1/telemetry") if t["values"]["machine_status"] is not None], 30,
                   what="data over an encrypted session")
        assert gw.stop() == 0 and "Traceback" not in gw.logs()
        # Without security the same server refuses the session: the data above came encrypted.
        plain = gateway(gateway_config(tmp_path / "data2", mosquitto.port, devices=device(port, "poll", missing=False))).start()
        wait_until(lambda: "cannot connect" in plain.logs(), 30, what="the refused plain session")
        assert plain.stop() == 0
    finally:
        server.kill()
        server.wait(10)


COUNTING_SERVER = """
import asyncio, datetime, sys, time
from asyncua import Server, ua
async def main(port, t0):
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/line/")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    idx = await server.register_namespace("urn:test:line")
    raw = await server.nodes.objects.add_variable(ua.NodeId("Line.produced_raw", idx), "produced_raw",
                                                  ua.Variant(0, ua.VariantType.UInt32))
    async with server:
        while True:  # the PLC's counter: 20 a second since t0, whether or not this server runs
            count = int((time.time() - t0) * 20)
            stamp = datetime.datetime.fromtimestamp(t0 + count / 20, datetime.timezone.utc)  # when it counted
            await raw.write_value(ua.DataValue(ua.Variant(count, ua.VariantType.UInt32), SourceTimestamp=stamp))
            await asyncio.sleep(0.05)
asyncio.run(main(int(sys.argv[1]), float(sys.argv[2])))
"""


def test_counters_stay_exact_across_a_server_restart_while_the_plc_counts_on(mosquitto, gateway, subscribe, tmp_path):
    import time

    port, t0 = free_port(), time.time()

    def server():
        proc = spawn([sys.executable, "-c", COUNTING_SERVER, str(port), str(t0)], tmp_path / "line.log", "a", env=ENV,
                     cwd=ROOT)
        wait_until(lambda: listening(port) or proc.poll() is not None, 30, what="the counting server")
        return proc

    devices = f"""
  - name: line1
    source: opcua
    endpoint: opc.tcp://127.0.0.1:{port}/line/
    mode: poll
    interval: 200ms
    nodes: [{{name: produced_raw, node: "ns=2;s=Line.produced_raw"}}]
    counters: [{{name: produced, register: produced_raw, bits: 32}}]
"""
    proc = server()
    try:
        sub = subscribe(mosquitto.port, topic=f"{TOPIC}/line1/#")
        gw = gateway(gateway_config(tmp_path / "data", mosquitto.port, devices=devices)).start()
        wait_until(lambda: len(sub.on("/telemetry")) > 5, 30, what="counts")
        proc.kill()
        proc.wait(10)
        time.sleep(2)  # the PLC counts on while its OPC UA server is down
        proc = server()
        before = len(sub.on("/telemetry"))
        wait_until(lambda: len([t for t in sub.on("/telemetry")[before:] if "quality" not in t]) > 5, 60,
                   what="counts again")
        assert gw.stop() == 0
    finally:
        proc.kill()
        proc.wait(10)
    telemetry = [t for t in sub.on("/telemetry") if "quality" not in t]
    raw_at = {t["ts"]: t["values"]["produced_raw"] for t in telemetry}
    last = sub.on("/counters")[-1]
    assert last["counters"]["produced"]["total"] == raw_at[last["ts"]] - telemetry[0]["values"]["produced_raw"]
    assert last["counters"]["produced"]["total"] > 60  # the counts made while the server was down are in it
    assert "was reset" not in gw.logs() and "jumped" not in gw.logs()
    # The sample time is the server's SourceTimestamp: the moment of each count, to the millisecond.
    from gateway.anomaly.recording import parse_time
    for t in telemetry:
        assert abs(parse_time(t["ts"]) - (t0 + t["values"]["produced_raw"] / 20)) < 0.002, t


def test_a_node_the_reachable_server_lacks_is_a_config_error_at_start(tmp_path):
    import subprocess

    port = free_port()
    server = opcua_server(tmp_path, port)
    try:
        (tmp_path / "gateway.yaml").write_text(gateway_config(tmp_path / "data", free_port(), devices=device(port)))
        result = subprocess.run([sys.executable, "-m", "gateway", "run", "-c", str(tmp_path / "gateway.yaml")],
                                capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60)
        assert result.returncode == 78, result.stderr
        assert "devices[0].nodes[3].node: device press1: opc.tcp://127.0.0.1:" in result.stderr
        assert 'has no node "ns=2;s=Unit2.no_such_tag" (BadNodeIdUnknown)' in result.stderr
        # check-config does not need the server: the syntax is right, so it passes.
        check = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(tmp_path / "gateway.yaml")],
                               capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60)
        assert check.returncode == 0, check.stderr
    finally:
        server.kill()
        server.wait(10)


# In-process: an asyncua server and the gateway's own OpcUaSource in one event loop.

def opcua_device(port: int, nodes: str, mode: str = "subscribe", extra: str = "", data_dir=ROOT / "unused"):
    return parse(opcua_config(port, nodes, mode, extra, data_dir)).devices[0]


def opcua_config(port: int, nodes: str, mode: str = "subscribe", extra: str = "", data_dir=ROOT / "unused") -> str:
    return gateway_config(data_dir, 1883, devices=f"""
  - name: press1
    source: opcua
    endpoint: opc.tcp://127.0.0.1:{port}/t/
    mode: {mode}
    interval: 200ms
    timeout: 2s
{extra}    nodes:
{nodes}""")


def with_server(body, cert: tuple[str, str] | None = None):
    """Run `body(server, variables, port)` against an asyncua server with ns=2;s=T.a and ns=2;s=T.b (UInt32);
    with `cert` (certificate, key), Basic256Sha256 SignAndEncrypt only."""
    import asyncio

    from asyncua import Server, ua

    async def main():
        port = free_port()
        server = Server()
        await server.init()
        server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/t/")
        if cert is None:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        else:
            await server.load_certificate(cert[0])
            await server.load_private_key(cert[1])
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
        idx = await server.register_namespace("urn:test")
        variables = [await server.nodes.objects.add_variable(ua.NodeId(f"T.{n}", idx), n, ua.Variant(0, ua.VariantType.UInt32))
                     for n in ("a", "b")]
        async with server:
            return await body(server, variables, port)
    return asyncio.run(main())


def test_a_namespace_0_node_written_with_ns_0_gets_its_value_in_subscribe_mode():
    """asyncua hands a subscribed node back as `i=2259`; the config says `ns=0;i=2259` (both are one NodeId)."""
    from gateway.sources.opcua import OpcUaSource

    async def body(server, variables, port):
        source = OpcUaSource(opcua_device(port, '      - {name: state, node: "ns=0;i=2259"}\n'
                                                '      - {name: a, node: "ns=2;s=T.a"}\n'))
        try:
            return await source.read()
        finally:
            await source.aclose()
    sample = with_server(body)
    assert sample.quality == {"state": "ok", "a": "ok"}, sample.problem
    assert sample.values["state"] == 0  # ServerState Running


def test_the_subscribe_sample_time_is_the_newest_source_timestamp():
    import asyncio
    import datetime as dt

    from asyncua import ua

    from gateway.sources.opcua import OpcUaSource

    # a counter that changed 1 s ago (b) and one that changes while we watch (a, stamped 4 s ahead); the times are
    # taken once the server is up (its start took seconds in a full run on a busy machine: "1 s ago" was 6 s)
    t0 = dt.datetime.fromtimestamp(0, dt.timezone.utc)

    async def body(server, variables, port):
        nonlocal t0
        t0 = dt.datetime.fromtimestamp(round(time.time()) - 4, dt.timezone.utc)
        a, b = variables
        await a.write_value(ua.DataValue(ua.Variant(7, ua.VariantType.UInt32), SourceTimestamp=t0))
        await b.write_value(ua.DataValue(ua.Variant(8, ua.VariantType.UInt32), SourceTimestamp=t0 + dt.timedelta(seconds=3)))
        source = OpcUaSource(opcua_device(port, '      - {name: a, node: "ns=2;s=T.a"}\n'
                                                '      - {name: b, node: "ns=2;s=T.b"}\n'))
        try:
            first = await source.read()
            await a.write_value(ua.DataValue(ua.Variant(9, ua.VariantType.UInt32), SourceTimestamp=t0 + dt.timedelta(seconds=8)))
            for _ in range(100):
                await asyncio.sleep(0.05)
                second = await source.read()
                if second.values["a"] == 9:
                    break
            return first, second
        finally:
            await source.aclose()
    first, second = with_server(body)
    assert (first.values, first.ts) == ({"a": 7, "b": 8}, t0.timestamp() + 3)
    assert (second.values, second.ts) == ({"a": 9, "b": 8}, t0.timestamp() + 8)


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
def test_while_nothing_changes_the_sample_time_moves_on_and_an_old_source_timestamp_is_not_taken(mode):
    """A value unchanged since last week is current now: samples are stamped with the server's time of
    the read and advance, so publish intervals, max_silence and shifts go on while a machine stands still."""
    import asyncio
    import datetime as dt

    from asyncua import ua

    from gateway.sources.opcua import OpcUaSource

    last_week = dt.datetime.fromtimestamp(time.time() - 7 * 86400, dt.timezone.utc)

    async def body(server, variables, port):
        for v in variables:
            await v.write_value(ua.DataValue(ua.Variant(3, ua.VariantType.UInt32), SourceTimestamp=last_week))
        source = OpcUaSource(opcua_device(port, '      - {name: a, node: "ns=2;s=T.a"}\n'
                                                '      - {name: b, node: "ns=2;s=T.b"}\n', mode=mode))
        try:
            samples = []
            for _ in range(4):
                samples.append(await source.read())
                await asyncio.sleep(0.3)
            return samples
        finally:
            await source.aclose()
    before = time.time()
    samples = with_server(body)
    assert all(s.values == {"a": 3, "b": 3} for s in samples)
    times = [s.ts for s in samples]
    assert times[0] >= before - 5, "a week-old SourceTimestamp is not the time of a value read now"
    assert times[-1] <= time.time()
    assert all(b > a for a, b in zip(times, times[1:])), times


def test_a_source_timestamp_from_a_server_clock_far_ahead_is_not_taken_and_does_not_hold_later_samples():
    """A server whose clock says 2200 (or any time ahead of ours by more than a few intervals): its SourceTimestamp
    became the sample time, and since a sample never goes back, every later one stayed in 2200 too, even after the
    server's clock was set right. Now such a time is not taken: the sample is stamped with the read."""
    import datetime as dt

    from asyncua import ua

    from gateway.sources.opcua import OpcUaSource

    ahead = dt.datetime(2200, 1, 1, tzinfo=dt.timezone.utc)

    async def body(server, variables, port):
        source = OpcUaSource(opcua_device(port, '      - {name: a, node: "ns=2;s=T.a"}\n', mode="poll"))
        try:
            samples = []
            for i in range(3):
                await variables[0].write_value(ua.DataValue(ua.Variant(i, ua.VariantType.UInt32), SourceTimestamp=ahead))
                samples.append(await source.read())
            right = dt.datetime.now(dt.timezone.utc)
            await variables[0].write_value(ua.DataValue(ua.Variant(7, ua.VariantType.UInt32), SourceTimestamp=right))
            samples.append(await source.read())
            return samples, right.timestamp()
        finally:
            await source.aclose()
    before = time.time()
    samples, right = with_server(body)
    assert [s.values["a"] for s in samples] == [0, 1, 2, 7]
    assert all(before - 1 <= s.ts <= time.time() + 1 for s in samples), [s.ts for s in samples]
    assert samples[-1].ts == pytest.approx(right, abs=1e-3)  # the server's clock set right: its time is taken again


def test_an_unknown_server_certificate_is_refused_until_trusted_and_a_pinned_one_works(tmp_path, capsys, caplog):
    """The trust store as Ignition and Kepware keep it: refused and written to rejected/ with the
    words to trust it; `edge-gateway opcua trust DEVICE` moves it to trusted/ and the next attempt reads."""
    import logging

    from gateway.cli import main
    from gateway.errors import SourceError
    from gateway.sources.opcua import OpcUaSource

    server_cert = make_certificate(tmp_path, "server", "urn:edge-gateway:sim", server=True)
    other_cert = make_certificate(tmp_path, "other", "urn:edge-gateway:other", server=True)
    client_cert, client_key = make_certificate(tmp_path, "gateway", "urn:edge-gateway:test-gw", server=False)
    nodes = '      - {name: a, node: "ns=2;s=T.a"}\n'
    security = (f"    security: {{policy: Basic256Sha256, cert_file: {client_cert}, key_file: {client_key}"
                "PIN}\n")
    data = tmp_path / "data"
    pki = str(data / "pki")

    async def body(server, variables, port):
        text = opcua_config(port, nodes, "poll", security.replace("PIN", ""), data)
        (tmp_path / "gateway.yaml").write_text(text)
        device = parse(text).devices[0]
        source = OpcUaSource(device, pki)
        try:
            with pytest.raises(SourceError) as refused:
                await source.read()
            source._retry_at = 0.0
            with pytest.raises(SourceError):
                await source.read()  # refused again: not logged again
            assert main(["opcua", "trust", "press1", "-c", str(tmp_path / "gateway.yaml")]) == 0
            source._retry_at = 0.0  # the next attempt now, not after the backoff
            trusted = await source.read()
        finally:
            await source.aclose()
        results = [str(refused.value), trusted]
        for pin in (server_cert[0], other_cert[0]):  # pinned: the trust store is not asked
            pinned = OpcUaSource(opcua_device(port, nodes, "poll", security.replace("PIN", f", server_cert_file: {pin}")),
                                 str(tmp_path / "empty-pki"))
            try:
                results.append(await pinned.read())
            except SourceError as err:
                results.append(str(err))
            finally:
                await pinned.aclose()
        return results
    with caplog.at_level(logging.WARNING):
        refused, trusted, pinned, wrong_pin = with_server(body, cert=server_cert)
    rejected = sorted((data / "pki" / "trusted").iterdir())
    assert len(rejected) == 1 and rejected[0].name.startswith("press1-") and not list((data / "pki" / "rejected").iterdir())
    assert f"is not trusted: see {pki}/rejected/" in refused
    # One line says how to trust it, however many attempts are refused.
    how = [r.getMessage() for r in caplog.records if "opcua trust" in r.getMessage()]
    assert len(how) == 1, how
    assert how[0].startswith("device press1: the server's certificate (O=edge-gateway tests,CN=server, SHA-256 "), how
    assert "is not trusted; it was written to " + str(data / "pki" / "rejected" / rejected[0].name) in how[0]
    assert "trust it with `edge-gateway opcua trust press1` or move the file to " + pki + "/trusted/" in how[0]
    assert f"trusted: {rejected[0]}" in capsys.readouterr().out
    assert trusted.quality == {"a": "ok"} and pinned.quality == {"a": "ok"}
    assert isinstance(wrong_pin, str) and "cannot connect" in wrong_pin
    assert not list((tmp_path / "empty-pki").glob("*/*"))
    assert not [r for r in caplog.records if "without security" in r.getMessage()]


def test_a_session_without_security_says_so_once(caplog):
    import logging

    from gateway.sources.opcua import OpcUaSource

    async def body(server, variables, port):
        source = OpcUaSource(opcua_device(port, '      - {name: a, node: "ns=2;s=T.a"}\n', "poll",
                                          "    security: none\n"))
        try:
            return [await source.read() for _ in range(3)]
        finally:
            await source.aclose()
    with caplog.at_level(logging.WARNING):
        samples = with_server(body)
    assert all(s.quality == {"a": "ok"} for s in samples)
    said = [r.getMessage() for r in caplog.records if "without security" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("device press1: opc.tcp://127.0.0.1:"), said


def test_the_daemon_refuses_an_unknown_server_certificate_until_the_cli_trusts_it(mosquitto, gateway, subscribe,
                                                                                  tmp_path):
    """End to end: the trust store under gateway.data_dir, one how-to line in the daemon's log, and
    `edge-gateway opcua trust` as a user runs it while the daemon keeps trying."""
    import subprocess

    port = free_port()
    server_cert, server_key = make_certificate(tmp_path, "server", "urn:edge-gateway:sim", server=True)
    client_cert, client_key = make_certificate(tmp_path, "gateway", "urn:edge-gateway:test-gw", server=False)
    server = spawn([sys.executable, "-m", "gateway", "sim", "--opcua", f"127.0.0.1:{port}", "--opcua-cert", server_cert,
                    server_key], tmp_path / "opcua-sim.log", "a", env=ENV, cwd=ROOT)
    try:
        wait_until(lambda: listening(port) or server.poll() is not None, 30, what="the OPC UA server")
        sub = subscribe(mosquitto.port, topic=f"{TOPIC}/#")
        security = f"    security: {{policy: Basic256Sha256, cert_file: {client_cert}, key_file: {client_key}}}\n    nodes:"
        gw = gateway(gateway_config(tmp_path / "data", mosquitto.port,
                                    devices=device(port, "subscribe", missing=False).replace("    nodes:", security, 1)))
        gw.start()
        wait_until(lambda: "opcua trust press1" in gw.logs(), 30, what="the how-to-trust line")
        rejected = list((tmp_path / "data" / "pki" / "rejected").iterdir())
        assert len(rejected) == 1
        # The command as the log gives it, with this config's -c (a docs audit: it left -c out)
        command = f"edge-gateway opcua trust press1 -c {gw.config}"
        assert f"trust it with `{command}`" in gw.logs()
        trust = subprocess.run([sys.executable, "-m", "gateway", *command.split()[1:]],
                               capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60)
        assert trust.returncode == 0, trust.stderr
        wait_until(lambda: [t for t in sub.on("/press1/telemetry") if t["values"]["machine_status"] is not None], 60,
                   what="data once the certificate is trusted")
        assert gw.stop() == 0
        assert gw.logs().count("opcua trust press1") == 1 and "Traceback" not in gw.logs()
    finally:
        server.kill()
        server.wait(10)


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
def test_values_the_lean_decoder_leaves_to_asyncua_still_read_and_the_other_tags_too(mode):
    """An array and a text node (answers the gateway's own decoder leaves to asyncua's codec): those
    tags are `not a number`, the others read on, in both modes."""
    import asyncio

    from asyncua import ua

    from gateway.sources.opcua import OpcUaSource

    async def body(server, variables, port):
        idx = await server.get_namespace_index("urn:test")
        await server.nodes.objects.add_variable(ua.NodeId("T.arr", idx), "arr", ua.Variant([1.0, 2.0], ua.VariantType.Double))
        await server.nodes.objects.add_variable(ua.NodeId("T.text", idx), "text", ua.Variant(ua.LocalizedText("x")))
        await variables[0].write_value(ua.Variant(41, ua.VariantType.UInt32))
        source = OpcUaSource(opcua_device(port, '      - {name: a, node: "ns=2;s=T.a"}\n'
                                                '      - {name: arr, node: "ns=2;s=T.arr"}\n'
                                                '      - {name: text, node: "ns=2;s=T.text"}\n', mode))
        try:
            first = await source.read()
            await variables[0].write_value(ua.Variant(42, ua.VariantType.UInt32))
            for _ in range(100):
                await asyncio.sleep(0.05)
                second = await source.read()
                if second.values["a"] == 42:
                    break
            lean = source._read if mode == "poll" else source._subscription
            return first, second, lean.left_to_asyncua
        finally:
            await source.aclose()
    first, second, left = with_server(body)
    for sample in (first, second):
        assert sample.quality == {"a": "ok", "arr": "error", "text": "error"}, sample.problem
        assert "arr (ns=2;s=T.arr): not a number" in sample.problem and "text (ns=2;s=T.text): not a number" in sample.problem
    assert (first.values["a"], second.values["a"]) == (41, 42)
    assert left >= 1


def test_a_subscription_the_server_deletes_is_made_again():
    import asyncio

    from asyncua import ua

    from gateway.errors import SourceError
    from gateway.sources.opcua import OpcUaSource

    async def body(server, variables, port):
        source = OpcUaSource(opcua_device(port, '      - {name: a, node: "ns=2;s=T.a"}\n'))
        try:
            before = await source.read()
            service = server.iserver.subscription_service
            await service.delete_subscriptions(list(service.subscriptions))
            await variables[0].write_value(ua.Variant(5, ua.VariantType.UInt32))
            problems, after = [], None
            for _ in range(300):
                await asyncio.sleep(0.05)
                try:
                    sample = await source.read()
                except SourceError as err:
                    problems.append(str(err))
                    continue
                if problems and sample.values["a"] == 5 and sample.quality["a"] == "ok":
                    after = sample
                    break
            return before, problems, after
        finally:
            await source.aclose()
    before, problems, after = with_server(body)
    assert before.values == {"a": 0}
    assert problems and "reconnecting" in problems[0], problems
    assert after is not None, problems[-3:]


def test_an_asyncua_without_the_parts_the_gateway_uses_is_named_not_a_traceback(monkeypatch):
    """Another asyncua release may move what opcua_wire uses: the device says which asyncua it needs."""
    from gateway.errors import SourceError
    from gateway.sources import opcua
    from gateway.sources.opcua_wire import fits

    monkeypatch.setattr(opcua, "fits", lambda uaclient: False)

    async def body(server, variables, port):
        source = opcua.OpcUaSource(opcua_device(port, '      - {name: a, node: "ns=2;s=T.a"}\n', "poll"))
        try:
            await source.read()
        except SourceError as err:
            return str(err)
        finally:
            await source.aclose()
    said = with_server(body)
    assert "this gateway works with asyncua 2.1" in said, said
    assert not fits(object())


def test_a_server_that_accepts_a_subscription_and_never_publishes_is_backed_off_and_said_once(monkeypatch, caplog):
    """A fuzzing pass: such a server got a new session every ~3.5 s for ever, each with an INFO 'connected' line
    (1,000 an hour). Sessions in a row whose subscription never published now wait, 0.5 s doubling to 30 s, and
    'connected' is said once."""
    import asyncio
    import logging

    from asyncua.server import uaprocessor

    from gateway.errors import SourceError
    from gateway.sources.opcua import OpcUaSource

    async def nothing(self, *args, **kwargs):
        return None
    monkeypatch.setattr(uaprocessor.UaProcessor, "forward_publish_response", nothing)  # every Publish swallowed
    monkeypatch.setattr(uaprocessor.UaProcessor, "_send_publish_request_timeout", lambda self, *args: None)

    async def body(server, variables, port):
        source = OpcUaSource(parse(opcua_config(port, '      - {name: a, node: "ns=2;s=T.a"}\n').replace(
            "timeout: 2s", "timeout: 300ms")).devices[0])
        sessions = 0
        try:
            ends = asyncio.get_running_loop().time() + 12.0
            while asyncio.get_running_loop().time() < ends:
                before = len(server.iserver.subscription_service.subscriptions)
                try:
                    await source.read()
                except SourceError:
                    pass
                sessions += len(server.iserver.subscription_service.subscriptions) > before
                await asyncio.sleep(0.2)
            return sessions
        finally:
            await source.aclose()

    with caplog.at_level(logging.DEBUG, logger="edge_gateway.sources.opcua"):
        sessions = with_server(body)
    connected = [r for r in caplog.records if "connected to" in r.getMessage() and r.levelno >= logging.INFO]
    assert len(connected) == 1, [r.getMessage() for r in connected]
    assert sessions <= 5, sessions  # 0.5, 1, 2, 4 s waits in 12 s; every ~1.5 s before (8 here)
