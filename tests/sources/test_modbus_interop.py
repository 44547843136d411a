"""Modbus against a slave we did not write: npm modbus-serial (tests/interop/modbus_server.js), over TCP
(ServerTCP) and RTU (ServerSerial on one end of a socat pty pair), read by the gateway's own ModbusSource.

Every table (holding, input, coil, discrete), every register type and every word and byte order:
the slave encodes each known value with Node's own Buffer encoders, the gateway must read it back."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.config import parse
from tests.helpers import gateway_config, wait_until
from tests.interop_node import node_script, stop

pytestmark = pytest.mark.slow

VALUES = {"uint16": 51234, "int16": -12345, "uint32": 3_000_000_000, "int32": -2_000_000_000, "float32": 1480.5,
          "float64": -12345.678901234}
WIDE = ("uint32", "int32", "float32", "float64")
COILS = [True, False, True, True, False, False, True, False, True, True, False]


def register_map() -> tuple[list[dict], dict[str, object], str]:
    """The slave's map (JSON entries), the value each tag must read, and the gateway's registers: YAML."""
    entries, expected, yaml = [], {}, []
    for table in ("holding", "input"):
        address = 0
        for kind, value in VALUES.items():
            for word in ("big", "little") if kind in WIDE else ("big",):
                for byte in ("big", "little"):
                    name = f"{table}_{kind}_{word}_{byte}"
                    entries.append({"table": table, "address": address, "type": kind, "word_order": word,
                                    "byte_order": byte, "value": value})
                    expected[name] = value
                    yaml.append(f"      - {{name: {name}, table: {table}, address: {address}, type: {kind}, "
                                f"word_order: {word}, byte_order: {byte}}}")
                    address += {"float64": 4}.get(kind, 2 if kind in WIDE else 1) + 1  # a gap between tags
        # Bits of a 16-bit register: 0b1000_0000_0000_1000.
        entries.append({"table": table, "address": address, "type": "uint16", "value": 0x8008})
        for bit, value in ((3, True), (2, False), (15, True)):
            expected[f"{table}_bit{bit}"] = value
            yaml.append(f"      - {{name: {table}_bit{bit}, table: {table}, address: {address}, type: bool, bit: {bit}}}")
    for table, pattern in (("coil", COILS), ("discrete", [not c for c in COILS])):
        for address, value in enumerate(pattern):
            entries.append({"table": table, "address": 100 + address, "value": value})
            expected[f"{table}{address}"] = value
            yaml.append(f"      - {{name: {table}{address}, table: {table}, address: {100 + address}}}")  # bool implied
    return entries, expected, "\n".join(yaml) + "\n"


def read_all(device_yaml: str, registers: str, tmp_path: Path):
    from gateway.sources import Links, open_source

    cfg = parse(gateway_config(tmp_path / "data", 1883, devices=device_yaml + "    registers:\n" + registers))

    async def run():
        source = open_source(cfg.devices[0], Links())
        try:
            for _ in range(50):  # the first poll may meet a slave still opening its port
                sample = await source.read_once()
                if not sample.failed:
                    return sample
                await asyncio.sleep(0.2)
            return sample
        finally:
            await source.aclose()
    return asyncio.run(run())


def check(sample, expected: dict) -> None:
    assert not sample.failed, sample.problem
    wrong = {name: (sample.values.get(name), value) for name, value in expected.items()
             if sample.values.get(name) != value}
    assert not wrong, wrong  # tag: (read, written)
    assert set(sample.quality.values()) == {"ok"}


def over_tcp(entries: list[dict], registers: str, tmp_path: Path):
    """One sample read by the gateway's ModbusSource from modbus-serial's ServerTCP serving `entries`."""
    from gateway.ports import free_port

    (tmp_path / "map.json").write_text(json.dumps(entries))
    port = free_port()
    proc = node_script("modbus_server.js", [str(tmp_path / "map.json"), "tcp", str(port)], tmp_path / "modbus.log")
    try:
        return read_all(f"""
  - name: plc1
    source: modbus_tcp
    host: 127.0.0.1
    port: {port}
    unit: 3
    timeout: 2s
""", registers, tmp_path)
    finally:
        stop(proc)


def test_every_register_type_and_order_from_modbus_serial_over_tcp(tmp_path):
    entries, expected, registers = register_map()
    sample = over_tcp(entries, registers, tmp_path)
    check(sample, expected)
    assert len(sample.values) == len(expected) == 68


@pytest.mark.skipif(not shutil.which("socat"), reason="socat not installed (./dev test installs it)")
def test_every_register_type_and_order_from_modbus_serial_over_rtu(tmp_path):
    """modbus-serial's ServerSerial (the serialport package) on one end of a socat pty pair, 38400 8N1."""
    entries, expected, registers = register_map()
    (tmp_path / "map.json").write_text(json.dumps(entries))
    a, b = tmp_path / "plc-side", tmp_path / "gateway-side"
    socat = subprocess.Popen(["socat", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = None
    try:
        wait_until(lambda: a.exists() and b.exists(), 10, what="socat's pty pair")
        proc = node_script("modbus_server.js", [str(tmp_path / "map.json"), "rtu", str(a), "38400"],
                           tmp_path / "modbus.log")
        sample = read_all(f"""
  - name: plc1
    source: modbus_rtu
    serial: {{port: {b}, baudrate: 38400, parity: N, stopbits: 1}}
    unit: 7
    timeout: 1s
""", registers, tmp_path)
    finally:
        if proc is not None:
            stop(proc)
        socat.kill()
        socat.wait(10)
    check(sample, expected)
    assert len(sample.values) == len(expected) == 68


def test_a_float_register_holding_nan_is_that_tag_s_error_and_says_so(tmp_path):
    """A PLC's float32 holding NaN (0x7FC00000: a sensor's "no value") or infinity: that tag is an error, the others
    read on, and the problem says why (an attack pass: the device showed as degraded with no reason anywhere)."""
    entries = [{"table": "holding", "address": 0, "type": "uint16", "value": 0x7FC0},
               {"table": "holding", "address": 1, "type": "uint16", "value": 0},
               {"table": "holding", "address": 2, "type": "uint16", "value": 0x7F80},  # +infinity
               {"table": "holding", "address": 3, "type": "uint16", "value": 0},
               {"table": "holding", "address": 4, "type": "uint16", "value": 1234}]
    sample = over_tcp(entries, """      - {name: flow, address: 0, type: float32}
      - {name: level, address: 2, type: float32}
      - {name: count, address: 4, type: uint16}
""", tmp_path)
    assert not sample.failed and sample.values == {"flow": None, "level": None, "count": 1234}
    assert sample.quality == {"flow": "error", "level": "error", "count": "ok"}
    assert sample.problem == "NaN or infinity in the registers of flow, level"
