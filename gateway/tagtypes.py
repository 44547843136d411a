"""What kind of number each tag is, from where it comes: how it goes out on the wire.

A PLC register says it: a bit or a coil is a Boolean, an unscaled integer register an
integer, a scaled one a number with the resolution its scale gives (`scale: 0.1` → one
decimal: 43.8, never 43.800000000000004), a float32 the shortest number that reads back as the
same float32 (7 to 9 significant digits: 12.3, never 12.300000190734863; 16777215, never 16777220).
An OPC UA node says it by its DataType (`sources/opcua.py:tag_type`, learned at connect). The
simulated source gives the types of the simulated PLC's map (`sources/sim.py`), so a `sim` device
reads as its Modbus twin. MQTT sensors say nothing of their types: their numbers go out as they
were sent.

This is the one rule: `sources.tag_types` asks each source for its tags' types, the JSON
telemetry is shaped by them and Sparkplug B declares `datatype` (its name for the type: Boolean,
Int16 ... UInt64, Float, Double) from them. This module knows no source: it is the vocabulary.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gateway.modbus_map import BIT_TABLES, Register

INTEGER_TYPES = ("uint16", "int16", "uint32", "int32")
MAX_DECIMALS = 12
# A register's integer type by its Sparkplug name.
REGISTER_DATATYPES = {"uint16": "UInt16", "int16": "Int16", "uint32": "UInt32", "int32": "Int32"}


@dataclass(frozen=True)
class TagType:
    """`kind` is bool, int or float; a float is rounded to `decimals`, or to `significant` digits.
    `datatype` is the type by its Sparkplug B name (Boolean, Int16, UInt16, Int32, UInt32, Int64, UInt64,
    Float, Double); None when nothing says it (a number as sent: Sparkplug takes it from the value)."""

    kind: str = "float"
    decimals: int | None = None
    significant: int | None = None
    datatype: str | None = None

    def shape(self, value: float | None) -> float | int | None:
        """The value as it is published: an int for bool and int tags, a float without noise otherwise."""
        if value is None or value != value or value in (float("inf"), float("-inf")):
            return None
        if self.kind in ("bool", "int"):
            return value if type(value) is int else round(value)
        if self.decimals is not None:
            return round(value, self.decimals)
        if self.datatype == "Float":
            return _float32(value)
        if self.significant is not None:
            return float(f"{value:.{self.significant}g}")
        return value


AS_SENT = TagType()
BOOLEAN = TagType("bool", datatype="Boolean")
FLOAT = TagType(significant=7, datatype="Float")  # what a float32 holds
DOUBLE = TagType(datatype="Double")


# The values an integer or Boolean datatype holds (a Float or Double holds any finite number).
RANGES = {"Boolean": (0, 1), "Int8": (-2**7, 2**7 - 1), "UInt8": (0, 2**8 - 1), "Int16": (-2**15, 2**15 - 1),
          "UInt16": (0, 2**16 - 1), "Int32": (-2**31, 2**31 - 1), "UInt32": (0, 2**32 - 1),
          "Int64": (-2**63, 2**63 - 1), "UInt64": (0, 2**64 - 1)}


def fits(value: float | int, kind: TagType) -> bool:
    """Whether a value read is one its tag's datatype holds: a whole number within its range for an integer or a
    Boolean (a node that says Int32 and serves 2.5, or a Boolean serving 7, is not read as 2 or 7)."""
    if kind.datatype not in RANGES:
        return True
    if isinstance(value, float) and not value.is_integer():
        return False
    low, high = RANGES[kind.datatype]
    return low <= value <= high


def integer(datatype: str) -> TagType:
    """An integer tag of a Sparkplug integer datatype (Int16 ... UInt64)."""
    return TagType("int", datatype=datatype)


def of_register(reg: Register) -> TagType:
    """The type a register map entry gives its tag."""
    if reg.table in BIT_TABLES or reg.type == "bool" or reg.bit is not None:
        return BOOLEAN
    if reg.type in INTEGER_TYPES:
        if reg.scale == 1 and float(reg.offset).is_integer() and \
                (datatype := _holding(REGISTER_DATATYPES[reg.type], int(reg.offset))) is not None:
            return integer(datatype)
        return TagType(decimals=min(MAX_DECIMALS, max(_decimals(reg.scale), _decimals(reg.offset))), datatype="Double")
    if reg.type == "float32":
        return FLOAT if reg.scale == 1 and reg.offset == 0 else TagType(significant=7, datatype="Double")
    return DOUBLE if reg.scale == 1 and reg.offset == 0 else TagType(significant=15, datatype="Double")  # float64


def _holding(datatype: str, offset: int) -> str | None:
    """The narrowest integer datatype that holds every value of `datatype` plus `offset` (a uint16 with `offset: -40`
    reads -40 to 65495: an Int32; as UInt16, -30 went out as 4294967266); None if none does."""
    low, high = RANGES[datatype]
    return next((name for name in (datatype, "UInt16", "Int16", "UInt32", "Int32", "UInt64", "Int64")
                 if RANGES[name][0] <= low + offset and high + offset <= RANGES[name][1]), None)


def of_registers(tags: Iterable[str], registers: Iterable[Register]) -> dict[str, TagType]:
    """Every tag with the type its register gives it (AS_SENT for a tag no register names)."""
    types = dict.fromkeys(tags, AS_SENT)
    types.update((reg.name, of_register(reg)) for reg in registers if reg.name in types)
    return types


def shape(values: Mapping[str, float | None], types: Mapping[str, TagType]) -> dict[str, float | int | None]:
    return {tag: types.get(tag, AS_SENT).shape(value) for tag, value in values.items()}


_F32 = struct.Struct("<f")


def _float32(value: float) -> float:
    """The shortest decimal (7 to 9 significant digits) that reads back as the same float32: 12.3, never
    12.300000190734863; a totaliser's 16777215, never the 16777220 that 7 digits give (another float32)."""
    try:
        exact = _F32.pack(value)
    except OverflowError:  # beyond float32 (a scaled or mistyped value): as it is
        return value
    for digits in (7, 8):
        text = float(f"{value:.{digits}g}")
        try:
            if _F32.pack(text) == exact:
                return text
        except OverflowError:  # 3.4028235e38 at 7 digits rounds past the largest float32
            pass
    return float(f"{value:.9g}")  # 9 digits always read back


def _decimals(x: float) -> int:
    """Decimals of a number as written in the config: 0.1 → 1, 0.25 → 2, 2 → 0, 1e-05 → 5."""
    mantissa, _, exponent = repr(float(x)).partition("e")  # the shortest repr that round-trips; not `decimal`:
    return max(0, len(mantissa.partition(".")[2].rstrip("0")) - int(exponent or 0))  # 0.4 MiB in every daemon
