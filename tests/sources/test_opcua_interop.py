"""OPC UA against a server we did not write: node-opcua (tests/interop/opcua_server.js), read by the
gateway's own OpcUaSource. Poll and subscribe (with a namespace-0 node), a server restart, a username
login, and an untrusted then trusted server certificate."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway.config import parse
from gateway.errors import SourceError
from gateway.ports import free_port
from tests.helpers import gateway_config
from tests.interop_node import node_script, stop
from tests.sources.test_opcua import make_certificate

pytest.importorskip("asyncua")
pytestmark = pytest.mark.slow

NODES = {"count": "ns=1;s=Count", "temp": "ns=1;s=Temp", "level": "ns=1;s=Level", "running": "ns=1;s=Running",
         "big": "ns=1;s=Big", "small": "ns=1;s=Small", "state": "ns=0;i=2259"}


def server(tmp_path, port: int, *args: str, t0: float | None = None):
    return node_script("opcua_server.js", [str(port), str(tmp_path / "node-pki"), "--t0", str(t0 or time.time()),
                                           *args], tmp_path / "node-opcua.log")


def device(tmp_path, port: int, mode: str, extra: str = "", nodes: dict[str, str] = NODES):
    listed = "".join(f'      - {{name: {name}, node: "{node}"}}\n' for name, node in nodes.items())
    text = gateway_config(tmp_path / "data", 1883, devices=f"""
  - name: press1
    source: opcua
    endpoint: opc.tcp://127.0.0.1:{port}/interop
    mode: {mode}
    interval: 200ms
    timeout: 2s
{extra}    nodes:
{listed}""")
    (tmp_path / "gateway.yaml").write_text(text)
    return parse(text).devices[0]


async def read_until_ok(source, seconds: float = 30):
    """Read every 0.2 s until a sample has every tag good (the source keeps its own backoff)."""
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        sample = await source.read_once()
        if not sample.failed and all(q == "ok" for q in sample.quality.values()):
            return sample
        last = sample.problem
        await asyncio.sleep(0.2)
    raise AssertionError(f"no good sample within {seconds}s: {last}")


@pytest.mark.parametrize("mode", ["poll", "subscribe"])
def test_values_and_source_timestamps_from_node_opcua(tmp_path, mode):
    from gateway.sources.opcua import OpcUaSource

    port, t0 = free_port(), time.time()
    proc = server(tmp_path, port, t0=t0)

    async def run():
        source = OpcUaSource(device(tmp_path, port, mode), str(tmp_path / "pki"))
        try:
            first = await read_until_ok(source)
            await asyncio.sleep(0.5)
            second = await read_until_ok(source)
            # node-opcua's answers were read by the gateway's own decoder, none left to asyncua's
            lean = source._read if mode == "poll" else source._subscription
            assert lean is not None and lean.left_to_asyncua == 0
            return first, second
        finally:
            await source.aclose()
    try:
        first, second = asyncio.run(run())
    finally:
        stop(proc)
    for sample in (first, second):
        values = sample.values
        assert {k: v for k, v in values.items() if k != "count"} == \
            {"temp": 21.5, "level": 12.5, "running": 1, "big": 2**40 + 7, "small": -5, "state": 0}, values
        assert sample.ts >= t0 + values["count"] / 10 - 0.002, (sample.ts, t0, values["count"])
    assert second.values["count"] > first.values["count"]
    # A value changed since the last sample: its time is the newest SourceTimestamp, the moment the counter took
    # its value. (The first sample may follow a read that already saw its count, when node's timer ran late on a
    # busy machine: nothing changed then, and the sample's time is that of the read, as the source documents.)
    assert abs(second.ts - (t0 + second.values["count"] / 10)) < 0.002, (second.ts, t0, second.values["count"])


def test_a_node_opcua_server_restart_is_survived(tmp_path):
    from gateway.sources.opcua import OpcUaSource

    port, t0 = free_port(), time.time()
    proc = server(tmp_path, port, t0=t0)

    async def run():
        nonlocal proc
        source = OpcUaSource(device(tmp_path, port, "subscribe", nodes={"count": NODES["count"]}), str(tmp_path))
        try:
            before = await read_until_ok(source)
            stop(proc)
            deadline = time.monotonic() + 30
            while not (failed := await source.read_once()).failed and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            proc = server(tmp_path, port, t0=t0)
            return before, failed, await read_until_ok(source)
        finally:
            await source.aclose()
    try:
        before, failed, after = asyncio.run(run())
    finally:
        stop(proc)
    assert failed.failed and failed.problem
    assert after.values["count"] > before.values["count"] + 10  # it counted on while its server was down
    assert abs(after.ts - (t0 + after.values["count"] / 10)) < 0.002


def test_a_username_login_against_node_opcua(tmp_path):
    """Over SignAndEncrypt with a pinned server certificate. (Over a session without security
    node-opcua refuses the password that asyncua then sends in plain text: BadIdentityTokenInvalid.)"""
    from gateway.sources.opcua import OpcUaSource

    port = free_port()
    (tmp_path / "right.pass").write_text("s3cret-pw\n")
    (tmp_path / "wrong.pass").write_text("not-it\n")
    server_cert, server_key = make_certificate(tmp_path, "node-server", "urn:edge-gateway:node-opcua", server=True)
    client_cert, client_key = make_certificate(tmp_path, "gateway", "urn:edge-gateway:test-gw", server=False)
    proc = server(tmp_path, port, "--user", "gw", "--password", "s3cret-pw", "--cert", server_cert, "--key", server_key)

    async def run(password_file: str):
        login = (f"    security: {{policy: Basic256Sha256, cert_file: {client_cert}, key_file: {client_key}, "
                 f"server_cert_file: {server_cert}}}\n    username: gw\n    password_file: {password_file}\n")
        source = OpcUaSource(device(tmp_path, port, "poll", login, nodes={"temp": NODES["temp"]}), str(tmp_path))
        try:
            return await source.read()
        except SourceError as err:
            return str(err)
        finally:
            await source.aclose()
    try:
        right = asyncio.run(run(str(tmp_path / "right.pass")))
        wrong = asyncio.run(run(str(tmp_path / "wrong.pass")))
    finally:
        stop(proc)
    assert not isinstance(right, str) and right.values == {"temp": 21.5}, right
    assert isinstance(wrong, str) and "cannot connect" in wrong and "not-it" not in wrong, wrong


def test_node_opcua_certificate_untrusted_then_trusted(tmp_path, capsys, caplog):
    """Basic256Sha256 SignAndEncrypt: node-opcua's certificate is refused (and kept in rejected/) until
    `edge-gateway opcua trust press1`; the server is left unchanged between the two."""
    from gateway.cli import main
    from gateway.sources.opcua import OpcUaSource

    port = free_port()
    server_cert, server_key = make_certificate(tmp_path, "node-server", "urn:edge-gateway:node-opcua", server=True)
    client_cert, client_key = make_certificate(tmp_path, "gateway", "urn:edge-gateway:test-gw", server=False)
    proc = server(tmp_path, port, "--cert", server_cert, "--key", server_key)
    security = f"    security: {{policy: Basic256Sha256, cert_file: {client_cert}, key_file: {client_key}}}\n"

    async def run():
        source = OpcUaSource(device(tmp_path, port, "subscribe", security, nodes={"temp": NODES["temp"]}),
                             str(tmp_path / "data" / "pki"))
        try:
            try:
                await source.read()
            except SourceError as err:
                refused = str(err)
            else:
                raise AssertionError("an untrusted server certificate was accepted")
            assert main(["opcua", "trust", "press1", "-c", str(tmp_path / "gateway.yaml")]) == 0
            return refused, await read_until_ok(source, 60)
        finally:
            await source.aclose()
    try:
        refused, trusted = asyncio.run(run())
    finally:
        stop(proc)
    assert "is not trusted" in refused, refused
    assert [r for r in caplog.records if "edge-gateway opcua trust press1" in r.getMessage()]
    assert trusted.values == {"temp": 21.5}
    assert Path(server_cert).read_bytes() in [p.read_bytes() for p in (tmp_path / "data" / "pki" / "trusted").iterdir()]
    assert "trusted: " in capsys.readouterr().out


def test_a_reload_keeps_an_unchanged_devices_session(tmp_path):
    """A reload closed every OPC UA session and opened it again (a secure channel, a session and its subscription
    each time anything in the config changed). An unchanged device now reads on in its session; a changed one
    opens its own."""
    import psutil

    from gateway import config
    from gateway.app import Gateway
    from tests.test_app import Recorder, wait_for

    port = free_port()
    proc = server(tmp_path, port)
    device(tmp_path, port, "subscribe", nodes={"count": NODES["count"]})
    path = tmp_path / "gateway.yaml"
    path.write_text(path.read_text().replace("port: 1883", f"port: {free_port()}")
                    + "  - {name: sim1, source: sim, profile: pump, seed: 2, interval: 200ms}\n")

    def sessions() -> list[int]:  # this process's local ports towards the server
        return sorted(c.laddr.port for c in psutil.Process().net_connections("tcp")
                      if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)

    async def main() -> None:
        cfg = config.load(str(path))
        async with Gateway(cfg, str(path), Recorder()) as gw:
            shutdown = asyncio.Event()
            run = asyncio.create_task(gw.run(shutdown))
            press = gw.devices[0]
            await wait_for(lambda: press.health.polls > 3 and press.health.state == "ok", "readings", 30)
            before = sessions()
            assert len(before) == 1, before
            path.write_text(path.read_text().replace("seed: 2", "seed: 3"))  # another device changes
            assert await gw.reload()
            assert gw.devices[0].source is press.source and sessions() == before
            polls = press.health.polls
            await wait_for(lambda: press.health.polls > polls + 3, "readings in the same session", 30)
            assert press.health.state == "ok" and sessions() == before
            path.write_text(path.read_text().replace("interval: 200ms\n    timeout: 2s", "interval: 300ms\n"
                                                     "    timeout: 2s"))  # now this one changes
            assert await gw.reload()
            assert gw.devices[0].source is not press.source
            await wait_for(lambda: gw.devices[0].health.polls > 3, "readings in a new session", 30)
            await wait_for(lambda: len(sessions()) == 1 and sessions() != before, "the old session closed", 30)
            shutdown.set()  # (its drain closes the sessions)
            await run
    try:
        asyncio.run(main())
    finally:
        stop(proc)


def test_a_security_mode_the_server_refuses_is_said_and_backed_off(tmp_path):
    """An attack pass: node-opcua answers a security mode it does not offer with an ERR message. asyncua took it for
    a lost connection: the device said "connection lost", was retried every 2 s for ever (an asymmetric handshake
    for the server each time), and asyncua's own CRITICAL line about it reached the journal at every attempt."""
    import subprocess
    import sys

    from gateway.sources.opcua import OpcUaSource
    from tests.helpers import ENV, ROOT

    port = free_port()
    server_cert, server_key = make_certificate(tmp_path, "node-server", "urn:edge-gateway:node-opcua", server=True)
    client_cert, client_key = make_certificate(tmp_path, "gateway", "urn:edge-gateway:test-gw", server=False)
    proc = server(tmp_path, port, "--cert", server_cert, "--key", server_key)  # SignAndEncrypt only
    security = (f"    security: {{policy: Basic256Sha256, mode: Sign, cert_file: {client_cert}, key_file: {client_key}, "
                f"server_cert_file: {server_cert}}}\n")
    press = device(tmp_path, port, "poll", security, nodes={"temp": NODES["temp"]})

    def waits(problems: list[str]) -> list[float]:
        return [float(p.rsplit("next attempt in ", 1)[1].rstrip("s")) for p in problems if "next attempt in" in p]

    async def run() -> list[str]:
        source = OpcUaSource(press, str(tmp_path / "data" / "pki"))
        problems = []
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and max(waits(problems), default=0) <= 2.5:
                sample = await source.read_once()
                problems.append(sample.problem or "")
                await asyncio.sleep(0.1)
            return problems
        finally:
            await source.aclose()
            await asyncio.sleep(0.2)  # (asyncua's refused connections finish closing on the loop)
    try:
        problems = asyncio.run(run())
        # the daemon's journal: the device's line, and none of asyncua's
        daemon = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(tmp_path / "gateway.yaml")],
                                  cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(6)
        daemon.terminate()
        journal = daemon.communicate(timeout=20)[0]
    finally:
        stop(proc)
    assert "the server refused the connection: it does not take security policy Basic256Sha256 in the mode asked " \
           "for (security.mode)" in problems[0], problems[0]
    assert max(waits(problems)) > 2.5, problems  # backing off, as from a server that answers and refuses
    assert problems[-1].split("; next attempt in ")[0].endswith(problems[0].split("cannot connect (", 1)[1]), problems
    assert "device press1: read failed" in journal and "the server refused the connection" in journal, journal[-3000:]
    assert "CRITICAL" not in journal and "asyncua" not in journal and "Traceback" not in journal, journal[-3000:]


def test_a_pinned_certificate_that_is_not_the_servers_is_said(tmp_path):
    """An attack pass: pinned (security.server_cert_file) to another certificate than the server's, the device said
    "An internal error occurred.(BadTcpInternalError)": nothing pointed at the pin."""
    from gateway.sources.opcua import OpcUaSource

    port = free_port()
    server_cert, server_key = make_certificate(tmp_path, "node-server", "urn:edge-gateway:node-opcua", server=True)
    client_cert, client_key = make_certificate(tmp_path, "gateway", "urn:edge-gateway:test-gw", server=False)
    other, _ = make_certificate(tmp_path, "other", "urn:edge-gateway:other", server=True)
    proc = server(tmp_path, port, "--cert", server_cert, "--key", server_key)
    security = (f"    security: {{policy: Basic256Sha256, cert_file: {client_cert}, key_file: {client_key}, "
                f"server_cert_file: {other}}}\n")

    async def run() -> str:
        source = OpcUaSource(device(tmp_path, port, "poll", security, nodes={"temp": NODES["temp"]}),
                             str(tmp_path / "data" / "pki"))
        try:
            return (await source.read_once()).problem or ""
        finally:
            await source.aclose()
            await asyncio.sleep(0.2)  # (asyncua's refused connection finishes closing on the loop)
    try:
        problem = asyncio.run(run())
    finally:
        stop(proc)
    assert f"security.server_cert_file pins {other}: is it this server's certificate?" in problem, problem
