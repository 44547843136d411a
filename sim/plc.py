"""The simulated plant as PLCs: each unit id is a PLC in front of one simulated machine (served by serve.py).

Read-only (writes are answered with ILLEGAL_FUNCTION). Register map, 0-based protocol
addresses (holding register 40001 = address 0):

pump (default unit ids 1 and 3)
    holding 0   motor_rpm               uint16  × 0.1
    holding 1   bearing_temp_c          int16   × 0.01
    holding 2   casing_temp_c           int16   × 0.01
    holding 3   ambient_temp_c          int16   × 0.01
    holding 4   oil_pressure_bar        uint16  × 0.001
    holding 5   vibration_mm_s          uint16  × 0.001
    holding 10  running (bit 0), alarm (bit 1: a fault is active)
    input   0   flow_l_min              float32 (big-endian words)
    input   2   suction_pressure_bar    float32 (little-endian words)
    input   4   discharge_pressure_bar  float32
    input   6   motor_current_a         float32 (bytes swapped in each word)

flexo_line (default unit id 2)
    holding 0   machine_status          uint16  1 running, 2 idle, 3 down, 4 maintenance
    holding 1   line_speed_m_min        uint16  × 0.1
    holding 2   web_tension_n           uint16  × 0.1
    holding 3   dryer_temp_c            int16   × 0.01
    holding 4   ink_viscosity_s         uint16  × 0.01
    holding 10  produced_raw            uint32  (wraps at 2^counter_bits)
    holding 12  defects_raw             uint32
    holding 14  stop_reason             uint16  0 running, 11 web break, 12 ink change, 21 no material, 31 electrical fault
    input   0   runtime_h               float64 (hours in state running)

A NaN in the simulation (a dropout fault) reads as 0x7FC0 0x0000 in float registers and
as the value's register minimum (e.g. 0x8000 for int16) elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import sim
from gateway.modbus_map import WIDTH, MapEntry, encode

IMAGE_SIZE = 256  # registers per table and unit


_reg = MapEntry


PUMP_MAP = (
    _reg("motor_rpm", "holding", 0, scale=0.1),
    _reg("bearing_temp_c", "holding", 1, "int16", 0.01),
    _reg("casing_temp_c", "holding", 2, "int16", 0.01),
    _reg("ambient_temp_c", "holding", 3, "int16", 0.01),
    _reg("oil_pressure_bar", "holding", 4, scale=0.001),
    _reg("vibration_mm_s", "holding", 5, scale=0.001),
    _reg("running", "holding", 10, "bool", bit=0),
    _reg("alarm", "holding", 10, "bool", bit=1),
    _reg("flow_l_min", "input", 0, "float32"),
    _reg("suction_pressure_bar", "input", 2, "float32", word_order="little"),
    _reg("discharge_pressure_bar", "input", 4, "float32"),
    _reg("motor_current_a", "input", 6, "float32", byte_order="little"),
)
FLEXO_MAP = (
    _reg("machine_status", "holding", 0),
    _reg("line_speed_m_min", "holding", 1, scale=0.1),
    _reg("web_tension_n", "holding", 2, scale=0.1),
    _reg("dryer_temp_c", "holding", 3, "int16", 0.01),
    _reg("ink_viscosity_s", "holding", 4, scale=0.01),
    _reg("produced_raw", "holding", 10, "uint32"),
    _reg("defects_raw", "holding", 12, "uint32"),
    _reg("runtime_h", "input", 0, "float64"),
    _reg("stop_reason", "holding", 14),
)
MAPS = {"pump": PUMP_MAP, "flexo_line": FLEXO_MAP}
DEFAULT_UNITS = {1: ("pump", 1), 2: ("flexo_line", 2), 3: ("pump", 3)}


@dataclass
class UnitFaults:
    """Faults of the PLC itself (not of the machine): answer with an exception code, or slowly."""

    exception: int | None = None
    delay: float = 0.0


@dataclass
class Unit:
    profile: str
    machine: Any  # sim.Pump or sim.FlexoLine
    image: dict[str, list[int]] = field(default_factory=lambda: {"holding": [0] * IMAGE_SIZE,
                                                                  "input": [0] * IMAGE_SIZE})
    faults: UnitFaults = field(default_factory=UnitFaults)
    last: dict = field(default_factory=dict)  # the latest readings, for the MQTT publisher


class SimPlant:
    """Simulated machines behind Modbus unit ids; `step()` advances them and refreshes the registers."""

    def __init__(self, units: dict[int, tuple[str, int]] | None = None, **flexo_options) -> None:
        self.units: dict[int, Unit] = {}
        for unit_id, (profile, seed) in (units or DEFAULT_UNITS).items():
            options = flexo_options if profile == "flexo_line" else {}
            self.units[unit_id] = Unit(profile, sim.make(profile, seed, **options))
        self.requests: Counter[int] = Counter()  # requests received, per unit id
        self.step(1.0)

    def step(self, dt: float) -> None:
        for unit in self.units.values():
            values = unit.machine.step(dt)
            if unit.profile == "pump":
                values["running"] = 1.0
                values["alarm"] = float(any(f.active(unit.machine.t) for f in unit.machine.faults))
            else:
                values["runtime_h"] = unit.machine.time_in_state["running"] / 3600.0
            write_image(unit.image, MAPS[unit.profile], values)
            unit.last = values

    async def action(self, unit_id: int, function_code: int, start_address: int, address: int, count: int,
                     registers: list[int], set_values) -> int | None:
        """pymodbus calls this for every request to a unit: serve the current image, or a fault."""
        from pymodbus.constants import ExcCodes

        self.requests[unit_id] += 1
        unit = self.units[unit_id]
        if unit.faults.delay:
            await asyncio.sleep(unit.faults.delay)
        if unit.faults.exception:
            return ExcCodes(unit.faults.exception)
        if set_values is not None:
            return ExcCodes.ILLEGAL_FUNCTION  # a read-only PLC
        table = "input" if function_code == 4 else "holding"
        offset = address - start_address
        registers[offset:offset + count] = unit.image[table][address:address + count]
        return None

    def devices(self) -> list:
        from pymodbus.simulator import DataType, SimData, SimDevice

        def block(kind):
            return [SimData(0, count=IMAGE_SIZE, values=0, datatype=kind)]
        return [SimDevice(id=unit_id, simdata=(block(DataType.BITS), block(DataType.BITS),
                                               block(DataType.REGISTERS), block(DataType.REGISTERS)),
                          action=partial(self.action, unit_id))
                for unit_id in self.units]

    def truth(self) -> dict:
        """Ground truth for tests: each flexo line's true counts and the raw register values shown now."""
        out = {}
        for unit_id, unit in self.units.items():
            if unit.profile == "flexo_line":
                line = unit.machine
                out[str(unit_id)] = {**line.truth(), "produced_raw": line.produced_counter.read(line.produced),
                                     "defects_raw": line.defects_counter.read(line.defects), "t": line.t}
        return out

    async def run(self, tick: float = 0.1, truth_path: str | None = None) -> None:
        """Advance the machines in real time (and write the ground truth after every step)."""
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            self.step(now - last)
            last = now
            if truth_path:
                with open(truth_path + ".tmp", "w", encoding="utf-8") as fh:
                    json.dump(self.truth(), fh)
                os.replace(truth_path + ".tmp", truth_path)


def registers_yaml(regmap, indent: str = "      ") -> str:
    """A register map as the `registers:` list of a gateway config (flow style, one tag a line)."""
    lines = []
    for reg in regmap:
        fields = {"name": reg.name, "table": reg.table, "address": reg.address, "type": reg.type}
        for key, default in (("bit", None), ("word_order", "big"), ("byte_order", "big"), ("scale", 1.0)):
            if getattr(reg, key) != default:
                fields[key] = getattr(reg, key)
        lines.append(indent + "- {" + ", ".join(f"{k}: {v:g}" if isinstance(v, float) else f"{k}: {v}"
                                                for k, v in fields.items()) + "}")
    return "\n".join(lines)


def write_image(image: dict[str, list[int]], regmap, values: dict[str, float | None]) -> None:
    status_words: dict[int, int] = {}
    for reg in regmap:
        value = values.get(reg.name)
        if reg.bit is not None:
            word = status_words.get(reg.address, 0)
            status_words[reg.address] = word | (int(bool(value)) << reg.bit)
            continue
        n = WIDTH[reg.type]
        if value is None or not math.isfinite(value):
            words = encode(math.nan, reg) if reg.type.startswith("float") else \
                [0x8000 if reg.type.startswith("int") else 0xFFFF] + [0] * (n - 1)
        else:
            words = encode(value, reg)
        image[reg.table][reg.address:reg.address + n] = words
    for address, word in status_words.items():
        image["holding"][address] = word
