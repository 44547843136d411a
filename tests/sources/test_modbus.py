"""Modbus: decoding, coalescing counted at a real pymodbus server, TCP and RTU end to end, mbpoll as a
third-party client of the simulated plant, and the faults a plant has (server gone, exception, slow)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from gateway.config import RegisterSection, parse
from gateway.modbus_map import decode, encode, plan
from gateway.ports import free_port, listening
from sim.plc import FLEXO_MAP, PUMP_MAP, SimPlant, registers_yaml
from sim.serve import serve
from tests.helpers import ENV, ROOT, device_yaml, gateway_config, spawn, wait_until

TOPIC = "edge/lab/test-gw"


def reg(type="uint16", **kw) -> RegisterSection:
    kw.setdefault("table", "holding")
    return RegisterSection(name=kw.pop("name", "t"), address=kw.pop("address", 0), type=type, **kw)


# -- decoding ----------------------------------------------------------------------------------
@pytest.mark.parametrize("words,spec,expected", [
    ([0x44B9, 0x1000], reg("float32"), 1480.5),
    ([0x1000, 0x44B9], reg("float32", word_order="little"), 1480.5),
    ([0xB944, 0x0010], reg("float32", byte_order="little"), 1480.5),
    ([0x0010, 0xB944], reg("float32", word_order="little", byte_order="little"), 1480.5),
    ([0x4097, 0x2000, 0, 0], reg("float64"), 1480.0),
    ([0, 0, 0x2000, 0x4097], reg("float64", word_order="little"), 1480.0),
    ([0xFFFF], reg("int16"), -1),
    ([0xFF85], reg("int16", scale=0.1), -12.3),
    ([0xFFFF], reg("uint16"), 65535),
    ([0xFFFF, 0xFFFE], reg("int32"), -2),
    ([0xFFFE, 0xFFFF], reg("int32", word_order="little"), -2),
    ([0x0001, 0x0000], reg("uint32"), 65536),
    ([0x0000, 0x0001], reg("uint32", word_order="little"), 65536),
    ([0x0102], reg("uint16", byte_order="little"), 0x0201),
    ([1000], reg("uint16", scale=0.1, offset=-40), 60.0),
    ([0b0100], reg("bool", bit=2), 1.0),
    ([0b0100], reg("uint16", bit=1), 0.0),
])
def test_decode(words, spec, expected):
    assert decode(words, spec) == pytest.approx(expected)
    if spec.bit is None:
        assert decode(encode(expected, spec), spec) == pytest.approx(expected)


def test_nan_and_infinity_decode_to_none():
    assert decode([0x7FC0, 0x0000], reg("float32")) is None
    assert decode([0x7F80, 0x0000], reg("float32")) is None  # +inf
    assert decode([0xFFF8, 0, 0, 0], reg("float64")) is None
    assert math.isnan(decode(encode(math.nan, reg("float32")), reg("float32")) or math.nan)


def test_coils_and_discrete_inputs():
    assert decode([True], reg("bool", table="coil")) == 1.0
    assert decode([False], reg("bool", table="discrete")) == 0.0


def test_coil_and_discrete_imply_bool_and_refuse_another_type(tmp_path):
    from gateway.config import ConfigError

    def device(registers: str) -> str:
        return gateway_config(tmp_path, 1883, devices=f"""
  - name: plc1
    source: modbus_tcp
    host: 127.0.0.1
    registers:
{registers}""")
    cfg = parse(device("      - {name: run, table: coil, address: 0}\n"
                       "      - {name: door, table: discrete, address: 3}\n"
                       "      - {name: speed, address: 0}\n"))
    assert [r.type for r in cfg.devices[0].registers] == ["bool", "bool", "uint16"]
    with pytest.raises(ConfigError) as err:
        parse(device("      - {name: run, table: coil, address: 0, type: uint16}\n"))
    assert 'devices[0].registers[0].type: expected bool (or nothing: the table implies it) for table coil, got ' \
           '"uint16"' in str(err.value)


def test_plan_merges_within_gap_and_limits():
    regs = [reg(name=f"r{a}", address=a) for a in (0, 1, 2, 10, 30)] + [reg("float32", name="f", address=31)]
    assert [(r.address, r.count) for r in plan(regs, max_gap=10)] == [(0, 11), (30, 3)]
    assert [(r.address, r.count) for r in plan(regs, max_gap=0)] == [(0, 3), (10, 1), (30, 3)]
    assert [(r.address, r.count) for r in plan(regs, max_gap=100)] == [(0, 33)]
    assert [(r.address, r.count) for r in plan(regs, max_gap=100, max_per_read=8)] == [(0, 3), (10, 1), (30, 3)]
    wide = [reg(name=f"w{a}", address=a) for a in range(0, 300, 2)]
    reads = plan(wide, max_gap=10)
    assert all(r.count <= 125 for r in reads) and len(reads) == 3
    bits = [reg("bool", table="coil", name=f"c{a}", address=a) for a in range(0, 2500, 50)]
    assert [r.count for r in plan(bits, max_gap=100)] == [1951, 451]


# -- a simulated PLC in this process, for counting the requests it receives -------------------------
class PlantThread:
    def __init__(self, units=None) -> None:
        self.port = free_port()
        self.plant = SimPlant(units)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wait_until(lambda: listening(self.port), 10, what="the pymodbus server")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.task = self.loop.create_task(serve(self.plant, tcp=("127.0.0.1", self.port)))
        try:
            self.loop.run_until_complete(self.task)
        except asyncio.CancelledError:
            pass
        finally:
            self.loop.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(10)




@pytest.mark.parametrize("extra,expected", [("", 2), ("    max_gap: 0\n", 3), ("    max_registers_per_read: 2\n", 8)])
def test_coalescing_counted_at_the_server(extra, expected):
    from gateway.sources import Links, open_source

    plc = PlantThread()
    try:
        cfg = parse(gateway_config(Path("/tmp/unused"), 1883, devices=device_yaml("pump1", plc.port, 1, PUMP_MAP, extra)))
        source = open_source(cfg.devices[0], Links())

        async def poll_10():
            samples = [await source.read() for _ in range(10)]
            await source.aclose()
            return samples
        samples = asyncio.run(poll_10())
        assert plc.plant.requests[1] == 10 * expected
        assert all(q == "ok" for q in samples[-1].quality.values())
        assert 1440 < samples[-1].values["motor_rpm"] < 1500
        assert samples[-1].values["running"] == 1.0
    finally:
        plc.stop()


# -- the daemon against the simulator served by `edge-gateway sim` ------------------------------------
class SimServer:
    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.port = free_port()
        self.args = args
        self.log = tmp_path / f"sim-{self.port}.log"
        self.proc = None

    def start(self) -> SimServer:
        self.proc = spawn([sys.executable, "-m", "gateway", "sim", "--modbus-tcp", f"127.0.0.1:{self.port}", *self.args],
                          self.log, env=ENV, cwd=ROOT)
        wait_until(lambda: listening(self.port) or self.proc.poll() is not None, 20, what="edge-gateway sim")
        assert self.proc.poll() is None, self.log.read_text()
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def sim_server(tmp_path):
    servers = []

    def make(*args: str) -> SimServer:
        server = SimServer(tmp_path, *args).start()
        servers.append(server)
        return server
    yield make
    for server in servers:
        server.kill()


def test_example_config_reads_exactly_the_documented_map():
    cfg = yaml.safe_load((ROOT / "examples" / "sim-plant.yaml").read_text())
    maps = {1: PUMP_MAP, 2: FLEXO_MAP, 3: PUMP_MAP}
    for device in cfg["devices"]:
        expected = [{k: v for k, v in vars(r).items() if v is not None} for r in maps[device["unit"]]]
        got = [vars(RegisterSection(**r)) for r in device["registers"]]
        assert [{k: v for k, v in g.items() if v is not None} for g in got] == expected


def test_gateway_reads_the_simulated_plant_over_tcp(sim_server, mosquitto, gateway, subscribe, tmp_path):
    server = sim_server("--counter-bits", "16", "--start-near-top", "--rate-per-min", "1200")
    text = (ROOT / "examples" / "sim-plant.yaml").read_text().replace("port: 5020", f"port: {server.port}")
    text = text.replace("port: 1883", f"port: {mosquitto.port}").replace("interval: 1s", "interval: 200ms")
    text = text.replace("data_dir: /tmp/edge-gateway-sim-plant", f"data_dir: {tmp_path / 'data'}")
    text = text.replace("bits: 32", "bits: 16")
    sub = subscribe(mosquitto.port, topic="edge/lab/sim-gw/#")
    gw = gateway(text).start()
    wait_until(lambda: [c for c in sub.on("/line1/counters") if c["counters"]["produced"]["total"] > 60], 30,
               what="the 16-bit counter to wrap and count on")
    assert gw.stop() == 0
    pump = sub.on("/pump1/telemetry")[-1]
    assert "quality" not in pump, pump
    assert 1440 < pump["values"]["motor_rpm"] < 1500 and 300 < pump["values"]["flow_l_min"] < 1300
    assert pump["values"]["discharge_pressure_bar"] > pump["values"]["suction_pressure_bar"] > 0.3
    assert 10 < pump["values"]["motor_current_a"] < 100  # byte-swapped float decodes right
    assert sub.on("/pump2/telemetry")[-1]["values"]["motor_rpm"] > 1400  # a third unit on the same connection
    raws = [t["values"]["produced_raw"] for t in sub.on("/line1/telemetry")]
    assert max(raws) > 65000 and min(raws) < 100  # the raw counter wrapped
    first, last = raws[0], sub.on("/line1/counters")[-1]
    raw_at = {t["ts"]: t["values"]["produced_raw"] for t in sub.on("/line1/telemetry")}
    assert last["counters"]["produced"]["total"] == (raw_at[last["ts"]] - first) % 65536
    # What the register map says, on the wire: integers as integers, scaled values at their resolution.
    decimals = {r.name: len(repr(r.scale).split(".")[1]) for r in PUMP_MAP + FLEXO_MAP if r.scale != 1}
    for t in sub.on("/pump1/telemetry") + sub.on("/line1/telemetry"):
        for tag, value in t["values"].items():
            if tag in decimals and isinstance(value, float):  # no 43.800000000000004
                assert len(repr(value).split(".")[1]) <= decimals[tag], (tag, value)
        assert "simulated" not in t  # a real (Modbus) device, whatever serves it
    line = sub.on("/line1/telemetry")[-1]["values"]
    assert all(type(line[tag]) is int for tag in ("machine_status", "produced_raw", "defects_raw"))
    assert type(pump["values"]["running"]) is int and type(pump["values"]["bearing_temp_c"]) is float
    # The example's events: the line's state (its stop reason register read over Modbus) and live OEE.
    assert sub.on("/line1/state")[0]["state"] == "running" and sub.on("/line1/oee")
    assert "stop_reason" in line


@pytest.mark.skipif(not shutil.which("mbpoll"), reason="mbpoll not installed")
def test_mbpoll_reads_the_documented_map(sim_server):
    server = sim_server()

    def mbpoll(unit: int, ref: int, count: int, kind: str, *extra: str) -> list[float]:
        # mbpoll counts references from 1: protocol address 0 is reference 1.
        out = subprocess.run(["mbpoll", "-m", "tcp", "-p", str(server.port), "-a", str(unit), "-r", str(ref + 1),
                              "-c", str(count), "-t", kind, *extra, "-1", "127.0.0.1"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr
        return [float(v) for v in re.findall(r"^\[\d+\]:\s+(-?[\d.e+-]+)", out.stdout, re.M)]

    rpm, bearing, casing, ambient, oil, vib = mbpoll(1, 0, 6, "4")
    assert 14400 < rpm < 15000  # × 0.1
    assert 2000 < bearing < 8000 and 1500 < casing < 6000 and 1000 < ambient < 4000  # × 0.01 °C
    assert 1500 < oil < 3500 and 500 < vib < 5000  # × 0.001
    status, = mbpoll(1, 10, 1, "4")
    assert status == 1  # running, no alarm
    flow, = mbpoll(1, 0, 1, "3:float", "-B")  # big-endian words
    suction, = mbpoll(1, 2, 1, "3:float")  # mbpoll's default word order is little-endian
    assert 300 < flow < 1300 and 0.5 < suction < 2.0
    machine_status, speed = mbpoll(2, 0, 2, "4")
    assert machine_status in (1, 2, 3, 4) and 0 <= speed <= 2600
    produced, defects = mbpoll(2, 10, 2, "4:int", "-B")  # uint32, big-endian words
    assert produced >= defects >= 0


def test_faults_server_gone_exception_slow_are_isolated(sim_server, mosquitto, gateway, subscribe, tmp_path):
    healthy = sim_server()
    doomed = sim_server()
    busy = sim_server("--exception", "2:6")
    slow = sim_server("--delay", "1:2")
    devices = (device_yaml("good", healthy.port, 1, PUMP_MAP) + device_yaml("doomed", doomed.port, 1, PUMP_MAP)
               + device_yaml("busy", busy.port, 2, FLEXO_MAP) + device_yaml("slow", slow.port, 1, PUMP_MAP, timeout="300ms"))
    sub = subscribe(mosquitto.port, topic=f"{TOPIC}/#")
    gw = gateway(gateway_config(tmp_path / "data", mosquitto.port, devices=devices)).start()
    wait_until(lambda: len(sub.on("/doomed/telemetry")) > 5, 20, what="the doomed device to publish")
    doomed.kill()
    time.sleep(3)
    good_before = len(sub.on("/good/telemetry"))
    time.sleep(2)
    assert len(sub.on("/good/telemetry")) > good_before + 5, "the other devices keep publishing"
    last = sub.on("/doomed/telemetry")[-1]
    assert set(last["quality"].values()) == {"error"} and set(last["values"].values()) == {None}
    doomed.start()  # the same port again: the device recovers by itself
    wait_until(lambda: "device doomed: recovered" in gw.logs(), 40, what="recovery after the server restart")
    status = [s for s in sub.on("/status") if s.get("state") == "online"]
    assert status[-1]["devices"]["busy"]["state"] == "error"
    busy.kill()  # an attack pass: the PLC that answered with an exception is switched off: news, said once
    wait_until(lambda: re.search(r"device busy: read failed: 127\.0\.0\.1:\d+: (connection lost|cannot connect)",
                                 gw.logs()), 20, what="the busy PLC's new trouble in the log")
    time.sleep(3)  # (its attempts to reconnect say "not connected, next attempt in ..." meanwhile: not news)
    assert gw.stop() == 0
    logs = gw.logs()
    assert re.search(r"device busy: read failed: 127\.0\.0\.1:\d+: unit 2: SLAVE_DEVICE_BUSY \(code 6\)", logs)
    assert re.search(r"device slow: read failed: .*no response within 0.3s", logs)
    assert logs.count("device doomed: read failed") == 1, "logged once per state change, not per poll"
    assert logs.count("device busy: read failed") == 2, "and again when the kind of failure changes"
    assert logs.count("device slow: read failed") == 1, "a slow PLC stays in error: no late answer is taken"
    assert "Traceback" not in logs
    health = sub.on("/health")[-1]
    assert health["devices"]["busy"]["errors"] > 3 and health["devices"]["good"]["state"] == "ok"


def test_a_reload_keeps_the_connection_of_unchanged_devices_and_shares_it_with_one_added(
        sim_server, mosquitto, gateway, subscribe, tmp_path):
    """A reload closed every device's connection and opened it again: each PLC saw its gateway hang up and
    reconnect whenever a device was added anywhere. Unchanged devices now read on over their connection, a device
    added behind the same endpoint shares it, and the last device taken out of an endpoint closes it."""
    import psutil

    server = sim_server()
    pump1, pump2 = device_yaml("pump1", server.port, 1, PUMP_MAP), device_yaml("pump2", server.port, 3, PUMP_MAP)
    line1 = device_yaml("line1", server.port, 2, FLEXO_MAP)
    other = "\n  - {name: sim1, source: sim, profile: pump, seed: 2, interval: 200ms}"
    sub = subscribe(mosquitto.port, topic=f"{TOPIC}/#")
    gw = gateway(gateway_config(tmp_path / "data", mosquitto.port, devices=pump1 + pump2 + other)).start()

    def connections() -> list[int]:  # the gateway's local ports towards the PLC
        return sorted(c.laddr.port for c in psutil.Process(gw.proc.pid).net_connections("tcp")
                      if c.raddr and c.raddr.port == server.port and c.status == psutil.CONN_ESTABLISHED)
    wait_until(lambda: len(sub.on("/pump1/telemetry")) > 3 and len(sub.on("/pump2/telemetry")) > 3, 20,
               what="both units read")
    before = connections()
    assert len(before) == 1, before  # the two units share one connection
    gw.config.write_text(gw.config.read_text().replace(pump2, pump2.replace("interval: 200ms", "interval: 300ms"))
                         .replace(other, line1 + other))
    gw.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "config reloaded" in gw.logs() and len(sub.on("/line1/telemetry")) > 3, 20,
               what="the reload, and the added device read")
    assert connections() == before, (before, connections())  # not closed and opened again
    assert "config reloaded: 4 devices (2 unchanged, 1 with their connections kept)" in gw.logs()  # (sim1: none)
    read = len(sub.on("/pump1/telemetry"))
    wait_until(lambda: len(sub.on("/pump1/telemetry")) > read + 3, 10, what="pump1 read on")
    gw.config.write_text(gw.config.read_text().replace(pump1, "").replace(pump2.replace(
        "interval: 200ms", "interval: 300ms"), "").replace(line1, ""))
    gw.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: gw.logs().count("config reloaded") == 2, 20, what="the second reload")
    wait_until(lambda: not connections(), 10, what="the endpoint's connection closed with its last device")
    assert gw.stop() == 0
    assert "Traceback" not in gw.logs()


@contextmanager
def rtu_line(tmp_path: Path, *sim_args: str):
    """The simulated plant on one end of a socat pty pair (38400 8N1); yields the gateway's end.

    8N1: Linux pseudo-terminals refuse parity settings (EINVAL); a real RS-485 adapter takes E."""
    a, b = tmp_path / "plc-side", tmp_path / "gateway-side"
    socat = subprocess.Popen(["socat", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = None
    try:
        wait_until(lambda: a.exists() and b.exists(), 10, what="socat's pty pair")
        server = spawn([sys.executable, "-m", "gateway", "sim", "--modbus-rtu", str(a), "--baudrate", "38400", "--parity",
                        "N", *sim_args], tmp_path / "rtu-sim.log", "w", env=ENV, cwd=ROOT)
        wait_until(lambda: holds_open(server.pid, a), 20, what="the simulated plant to open its end of the line")
        yield b
    finally:
        for proc in (server, socat):
            if proc is not None:
                proc.kill()
                proc.wait(10)


def holds_open(pid: int, path: Path) -> bool:
    """Whether process `pid` has `path` (a symlink to a pty) open now."""
    target = os.path.realpath(path)
    try:
        return any(os.path.realpath(fd) == target for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:  # it exited, or a descriptor closed while we looked
        return False


def rtu_devices(port: Path, units, interval: str, timeout: str) -> str:
    return "".join(f"""
  - name: {name}
    source: modbus_rtu
    serial: {{port: {port}, baudrate: 38400, parity: N, stopbits: 1}}
    unit: {unit}
    interval: {interval}
    timeout: {timeout}
    registers:
""" + registers_yaml(regmap) for name, unit, regmap in units)


@pytest.mark.skipif(not shutil.which("socat"), reason="socat not installed")
def test_rtu_over_a_pseudo_terminal_pair(mosquitto, gateway, subscribe, tmp_path):
    with rtu_line(tmp_path) as line:
        devices = rtu_devices(line, (("pump1", 1, PUMP_MAP), ("line1", 2, FLEXO_MAP)), "300ms", "500ms")
        sub = subscribe(mosquitto.port, topic=f"{TOPIC}/#")
        gw = gateway(gateway_config(tmp_path / "data", mosquitto.port, devices=devices)).start()
        wait_until(lambda: len(sub.on("/pump1/telemetry")) > 5 and len(sub.on("/line1/telemetry")) > 5, 40,
                   what="telemetry over RTU from two units on one line")
        assert gw.stop() == 0
    pump = [t for t in sub.on("/pump1/telemetry") if "quality" not in t]
    assert pump and 1440 < pump[-1]["values"]["motor_rpm"] < 1500
    assert [t for t in sub.on("/line1/telemetry") if "quality" not in t]


def test_garbage_answers_are_an_error_not_a_crash(sim_server, mosquitto, gateway, subscribe, tmp_path):
    import socket

    garbage = socket.create_server(("127.0.0.1", 0))
    port = garbage.getsockname()[1]
    stop = threading.Event()

    def serve_garbage():  # answers every request with random bytes, like a PLC on a noisy line
        garbage.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = garbage.accept()
            except OSError:
                continue
            conn.settimeout(0.2)
            while not stop.is_set():
                try:
                    if not conn.recv(256):
                        break
                    conn.sendall(os.urandom(9))
                except socket.timeout:
                    continue
                except OSError:
                    break
            conn.close()
    threading.Thread(target=serve_garbage, daemon=True).start()
    healthy = sim_server()
    try:
        devices = device_yaml("noisy", port, 1, PUMP_MAP, timeout="300ms") + device_yaml("good", healthy.port, 1, PUMP_MAP)
        sub = subscribe(mosquitto.port, topic=f"{TOPIC}/#")
        gw = gateway(gateway_config(tmp_path / "data", mosquitto.port, devices=devices)).start()
        wait_until(lambda: len(sub.on("/good/telemetry")) > 20 and sub.on("/noisy/telemetry"), 20,
                   what="telemetry from both")
        assert gw.stop() == 0
    finally:
        stop.set()
        garbage.close()
    noisy = sub.on("/noisy/telemetry")
    assert all(set(t["quality"].values()) == {"error"} for t in noisy), "garbage is never a value"
    assert "device noisy: read failed" in gw.logs() and "Traceback" not in gw.logs()
    assert "pymodbus" not in gw.logs(), "one line per state change, not a hex dump per poll"
    assert all("quality" not in t for t in sub.on("/good/telemetry")[5:])


def test_plc_counter_reset_on_demand_is_counted_as_a_reset(sim_server, mosquitto, gateway, subscribe, tmp_path):
    server = sim_server("--units", "2=flexo_line:4", "--rate-per-min", "3000")
    devices = device_yaml("line1", server.port, 2, FLEXO_MAP).replace(
        "    registers:", "    counters: [{name: produced, register: produced_raw, bits: 32}]\n    registers:")
    sub = subscribe(mosquitto.port, topic=f"{TOPIC}/line1/#")
    gw = gateway(gateway_config(tmp_path / "data", mosquitto.port, devices=devices)).start()
    wait_until(lambda: [t for t in sub.on("/telemetry") if t["values"]["produced_raw"] > 200], 20, what="counts")
    server.proc.send_signal(signal.SIGUSR1)  # a technician resets the PLC counter
    wait_until(lambda: "was reset on the PLC" in gw.logs(), 10, what="the reset to be seen")
    time.sleep(1)
    assert gw.stop() == 0
    telemetry = sub.on("/telemetry")
    raws = [t["values"]["produced_raw"] for t in telemetry]
    drop = next(i for i in range(1, len(raws)) if raws[i] < raws[i - 1])
    # Counted: everything up to the reset, then the new raw value from zero, all of it new production.
    expected = (raws[drop - 1] - raws[0]) + raws[-1]
    last = sub.on("/counters")[-1]
    assert last["ts"] == telemetry[-1]["ts"]
    assert last["counters"]["produced"]["total"] == expected


async def read_from_slave(slave, count: int, regmap=PUMP_MAP[:2]) -> list:
    """`count` polls of a device on a slave served by `slave(reader, writer)` on a free port (timeout 300 ms)."""
    from gateway.sources import Links, open_source

    handlers = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())
        await slave(reader, writer)
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = parse(gateway_config(Path("/tmp/unused"), 1883, devices=device_yaml("plc", port, 1, regmap, timeout="300ms")))
    source = open_source(cfg.devices[0], Links())
    try:
        return [await source.read_once() for _ in range(count)]
    finally:
        await source.aclose()
        server.close()
        await server.wait_closed()
        await asyncio.wait(handlers, timeout=5)  # each ends when the gateway has hung up


def test_a_plc_that_stops_answering_mid_frame_is_a_failed_read(caplog):
    """Half a response, then silence: the poll fails with a clear reason, the connection is dropped,
    and nothing is logged with a traceback."""
    async def half_frame(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read(12)
        writer.write(request[:2] + b"\x00\x00\x00")  # transaction id and half the MBAP header
        await writer.drain()
        await reader.read()  # then nothing more, until the gateway hangs up
        writer.close()
        await writer.wait_closed()
    with caplog.at_level(logging.DEBUG):
        samples = asyncio.run(read_from_slave(half_frame, 2))
    assert all(s.failed and "no response within 0.3s" in s.problem for s in samples), [s.problem for s in samples]
    assert not [r for r in caplog.records if r.exc_info]


def wrong_answer(kind: str, request: bytes) -> bytes:
    """The answer of a slave that gets Modbus TCP wrong in one way, to a read request."""
    import struct
    tid, _, _, unit, function, _, count = struct.unpack(">HHHBBHH", request[:12])
    words = [(i * 7) % 65536 for i in range(count + 4)]  # the filler a too-long answer carries
    if kind == "too_long":
        pdu = bytes([function, 2 * (count + 4)]) + struct.pack(f">{count + 4}H", *words)
    elif kind == "too_short":
        pdu = bytes([function, 2 * (count - 1)]) + struct.pack(f">{count - 1}H", *words[:count - 1])
    elif kind == "byte_count":  # says more bytes than it sends
        pdu = bytes([function, 2 * count + 6]) + struct.pack(f">{count}H", *words[:count])
    elif kind == "function":  # a function code that exists in no standard
        pdu = bytes([0x55, 4, 1, 2, 3, 4])
    else:  # the answer to another function (read coils)
        pdu = bytes([1, 1, 0xFF])
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


@pytest.mark.parametrize("kind", ["too_long", "too_short", "byte_count", "function", "other_function"])
def test_an_answer_that_does_not_match_its_request_is_a_device_error_never_data(kind, caplog):
    connections = []

    async def liar(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while request := await reader.read(12):
                writer.write(wrong_answer(kind, request))
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()
    with caplog.at_level(logging.DEBUG):
        samples = asyncio.run(read_from_slave(liar, 3, PUMP_MAP[:3]))
    problems = [s.problem for s in samples]
    assert all(s.failed for s in samples), problems  # never the filler as values
    assert all(set(s.values.values()) == {None} for s in samples)
    assert all("does not match the request" in p or "malformed answer" in p for p in problems), problems
    # The unit is then left alone (1 s doubling), as one that gives no valid answer: polls in between fail at
    # once with the same words, and it is not reconnected at each (a fuzzing pass: 99 connections in 20 s).
    assert len(connections) == 1 and problems[1] == problems[2] == problems[0], (connections, problems)
    # pymodbus's own warnings are silenced by the daemon (logs.setup); asyncio's "Fatal error" is gone.
    logged = [r for r in caplog.records if (r.levelno >= logging.WARNING and not r.name.startswith("pymodbus"))
              or r.exc_info]
    assert not logged, [(r.name, r.getMessage()[:200]) for r in logged]


@pytest.mark.skipif(not shutil.which("socat"), reason="socat not installed")
def test_a_dead_slave_on_a_shared_rs485_line_does_not_stall_the_others(mosquitto, gateway, subscribe, tmp_path):
    """Units 1 and 2 answer over a socat pty pair; unit 7 is on the configuration but not on the line."""
    with rtu_line(tmp_path, "--units", "1=pump:1,2=flexo_line:2") as line:
        devices = rtu_devices(line, (("pump1", 1, PUMP_MAP[:6]), ("line1", 2, FLEXO_MAP[:5]), ("ghost", 7, PUMP_MAP[:6])),
                              "200ms", "1s")
        sub = subscribe(mosquitto.port, topic=f"{TOPIC}/#")
        gw = gateway(gateway_config(tmp_path / "data", mosquitto.port, devices=devices)).start()
        wait_until(lambda: len(sub.on("/pump1/telemetry")) > 80 and len(sub.on("/line1/telemetry")) > 80, 60,
                   what="telemetry from the two units that answer")
        state = json.loads((tmp_path / "data" / "state.json").read_text())["devices"]
        assert gw.stop() == 0
    for name in ("pump1", "line1"):
        assert all("quality" not in t for t in sub.on(f"/{name}/telemetry")), name  # never an error for them
        # They keep their rate: the dead unit takes a timeout (1 s, 5 of their ticks) of the line only now
        # and then (its own backoff), not on each of its polls (that would skip most of their ticks).
        assert state[name]["errors"] == 0 and state[name]["skipped_ticks"] < state[name]["polls"] // 2, state[name]
    assert all(set(t["quality"].values()) == {"error"} for t in sub.on("/ghost/telemetry"))
    assert gw.logs().count("device ghost: read failed") == 1
    assert "device pump1: read failed" not in gw.logs() and "device line1: read failed" not in gw.logs()


def waits_asked_for(port: int, attempts: int) -> tuple[list[float], list[str]]:
    """The waits a Link asks for before each reconnect to 127.0.0.1:port, and the errors it gave.

    The clock is the test's: it jumps past each wait, so nothing here sleeps for it."""
    from gateway.errors import SourceError
    from gateway.modbus_map import Read
    from gateway.sources.modbus import Link, link_for

    now = [1000.0]
    cfg = parse(gateway_config(Path("/tmp/unused"), 1883, devices=f"""
  - name: plc1
    source: modbus_tcp
    host: 127.0.0.1
    port: {port}
    timeout: 200ms
    registers: [{{name: a, address: 0}}]
"""))
    real = link_for(cfg.devices[0], {})
    link = Link(real.name, real._make_client, clock=lambda: now[0])

    async def run() -> tuple[list[float], list[str]]:
        waits, errors = [], []
        try:
            for _ in range(attempts):
                try:
                    await link.read(Read("holding", 0, 1, []), 1, 0.2)
                except SourceError as err:
                    errors.append(str(err))
                waits.append(link.last_wait)
                now[0] += link.last_wait + 0.001
        finally:
            link.close()
        return waits, errors
    return asyncio.run(run())


def test_a_refused_connection_is_tried_again_within_2s_not_exponentially():
    """A PLC that is off or rebooting (the kernel refuses): a wait drawn up to 2 s each time, so a
    10 s outage gives about 10 s of errors, not 19."""
    waits, errors = waits_asked_for(free_port(), 12)
    assert all("cannot connect" in e for e in errors) and len(errors) == 12, errors
    assert all(0.5 <= w <= 2.0 for w in waits), waits


def test_a_plc_that_accepts_and_drops_the_connection_is_backed_off_exponentially():
    """Its connection slots are taken: it accepts and hangs up. Each attempt costs it a slot."""
    import socket

    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def refuse() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.close()
    thread = threading.Thread(target=refuse, name="slots-full")
    thread.start()
    port = server.getsockname()[1]
    try:
        waits, errors = waits_asked_for(port, 8)
    finally:
        stop.set()
        thread.join()
        server.close()
    assert len(errors) == 8 and all(e.startswith(f"127.0.0.1:{port}: ") for e in errors), errors
    assert waits[-1] > 20, waits  # doubling to 30 s (±30 %)
    assert all(b > a for a, b in zip(waits[:5], waits[1:6], strict=False)), waits


def test_a_link_changed_one_device_per_reload_takes_the_new_settings(sim_server, tmp_path):
    """An attack pass on the connections a reload keeps: two devices on one endpoint, their timeout raised one
    reload at a time. The unchanged one kept the link alive at each, the changed one joined it, and the endpoint
    kept its first timeout for ever (a PLC answering in 1 s: no good reading, while the config said 3 s)."""
    from gateway import config
    from gateway.app import Gateway
    from tests.test_app import Recorder, wait_for

    server = sim_server()
    d1, d2 = device_yaml("d1", server.port, 1, PUMP_MAP[:2]), device_yaml("d2", server.port, 3, PUMP_MAP[:2])
    path = tmp_path / "gateway.yaml"
    path.write_text(gateway_config(tmp_path / "data", free_port(), devices=d1 + d2))

    async def main() -> None:
        async with Gateway(config.load(str(path)), str(path), Recorder()) as gw:
            shutdown = asyncio.Event()
            run = asyncio.create_task(gw.run(shutdown))
            await wait_for(lambda: all(r.health.polls > 2 for r in gw.devices), "readings")
            for changed in (d2, d1):  # one device a reload
                path.write_text(path.read_text().replace(changed, changed.replace("timeout: 1s", "timeout: 3s")))
                assert await gw.reload()
            assert [r.source.link.spec[2] for r in gw.devices] == [3.0, 3.0]
            assert gw.devices[0].source.link is gw.devices[1].source.link  # one connection, as at a start
            polls = [r.health.polls for r in gw.devices]
            await wait_for(lambda: all(r.health.polls > p + 2 and r.health.state == "ok"
                                       for r, p in zip(gw.devices, polls)), "readings with the new link")
            shutdown.set()  # (its drain closes the connections)
            await run
    asyncio.run(main())


@pytest.mark.slow  # socat and the simulated plant, processes
@pytest.mark.skipif(not shutil.which("socat"), reason="socat not installed")
def test_a_request_cancelled_on_a_serial_line_never_answers_the_next(tmp_path):
    """An attack pass: a reload cancelled a poll whose request was on the line; the slave's late answer (the same
    unit, function and length) was taken as the answer to the next device's request, and published as its data:
    11 of 19 samples wrong, and nothing said. The next request now waits until the cancelled one's answer is due."""
    import dataclasses

    from gateway.sources import Links, open_source
    from sim.plc import PUMP_MAP

    rpm = PUMP_MAP[0]  # about 1480 rpm
    other = dataclasses.replace(PUMP_MAP[1], name="bearing_raw", type="uint16", scale=0.1)  # about 400 this way

    async def run(port: Path) -> list[float]:
        cfg = parse(gateway_config(Path("/tmp/unused"), 1883, devices=rtu_devices(
            port, [("a", 1, [rpm]), ("b", 1, [other])], "1s", "1s")))
        links = Links()
        a, b = (open_source(d, links) for d in cfg.devices)
        seen = []
        try:
            for _ in range(3):
                polling = asyncio.create_task(a.read_once())
                await asyncio.sleep(0.1)  # the request is on the line; the slave answers after 0.4 s
                polling.cancel()
                await asyncio.gather(polling, return_exceptions=True)
                sample = await b.read_once()
                assert not sample.failed, sample.problem
                seen.append(sample.values["bearing_raw"])
        finally:
            await a.aclose()
            await b.aclose()
        return seen

    with rtu_line(tmp_path, "--delay", "1:0.4") as port:
        seen = asyncio.run(run(port))
    assert all(v < 1000 for v in seen), seen  # never the rpm's answer
