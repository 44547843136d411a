"""What kind of number each tag is, from where it comes: how it goes out on the wire.

A PLC register says it: a bit or a coil is a Boolean, an unscaled integer register an
integer, a scaled one a number with the resolution its scale gives (`scale: 0.1` → one
decimal: 43.8, never 43.800000000000004), a float32 a number of 7 significant digits (what
a float32 holds: 12.3, never 12.300000190734863). The in-process simulator uses the map of
the simulated PLC, so a `sim` device reads as its Modbus twin. MQTT sensors say nothing
of their types: their numbers go out as they were sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from gateway.modbus_map import BIT_TABLES, Register

INTEGER_TYPES = ("uint16", "int16", "uint32", "int32")
MAX_DECIMALS = 12


@dataclass(frozen=True)
class TagType:
    """`kind` is bool, int or float; a float is rounded to `decimals`, or to `significant` digits."""

    kind: str = "float"
    decimals: int | None = None
    significant: int | None = None

    def shape(self, value: float | None) -> float | int | None:
        """The value as it is published: an int for bool and int tags, a float without noise otherwise."""
        if value is None or value != value or value in (float("inf"), float("-inf")):
            return None
        if self.kind in ("bool", "int"):
            return round(value)
        if self.decimals is not None:
            return round(value, self.decimals)
        if self.significant is not None:
            return float(f"{value:.{self.significant}g}")
        return value


AS_SENT = TagType()


def of_register(reg: Register) -> TagType:
    """The type a register map entry gives its tag."""
    if reg.table in BIT_TABLES or reg.type == "bool" or reg.bit is not None:
        return TagType("bool")
    if reg.type in INTEGER_TYPES:
        if reg.scale == 1 and float(reg.offset).is_integer():
            return TagType("int")
        return TagType(decimals=min(MAX_DECIMALS, max(_decimals(reg.scale), _decimals(reg.offset))))
    if reg.type == "float32":
        return TagType(significant=7)
    return AS_SENT if reg.scale == 1 and reg.offset == 0 else TagType(significant=15)  # float64


def of_device(device: Any) -> dict[str, TagType]:
    """Every tag of a configured device with its type (AS_SENT where nothing says more)."""
    types = dict.fromkeys(device.tags, AS_SENT)
    registers: Iterable[Register] = getattr(device, "registers", ())
    if device.source == "sim":
        from sim.plc import MAPS  # the simulated PLC's map: the same resolution as over Modbus
        registers = MAPS.get(device.profile, ())
    types.update((reg.name, of_register(reg)) for reg in registers if reg.name in types)
    return types


def shape(values: Mapping[str, float | None], types: Mapping[str, TagType]) -> dict[str, float | int | None]:
    return {tag: types.get(tag, AS_SENT).shape(value) for tag, value in values.items()}


def _decimals(x: float) -> int:
    """Decimals of a number as written in the config: 0.1 → 1, 0.25 → 2, 2 → 0, 1e-05 → 5."""
    exponent = Decimal(repr(float(x))).normalize().as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0
