"""Modbus register maps: decode registers to values (and back, for the simulator), and plan reads.

Addresses are 0-based protocol addresses (holding register 40001 is `table: holding,
address: 0`). Multi-register values are big-endian words by default
(`word_order: little` swaps the words, `byte_order: little` swaps the bytes in each word).
value = raw × scale + offset.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Protocol


class Register(Protocol):
    """What a register map entry says (the config's `registers[]`, or the simulated PLC's map)."""

    @property
    def name(self) -> str: ...
    @property
    def table(self) -> str: ...
    @property
    def address(self) -> int: ...
    @property
    def type(self) -> str: ...
    @property
    def word_order(self) -> str: ...
    @property
    def byte_order(self) -> str: ...
    @property
    def bit(self) -> int | None: ...
    @property
    def scale(self) -> float: ...
    @property
    def offset(self) -> float: ...


@dataclass(frozen=True)
class MapEntry:
    """A register map entry written in code (the simulated PLC's own map)."""

    name: str
    table: str
    address: int
    type: str = "uint16"
    scale: float = 1.0
    word_order: str = "big"
    byte_order: str = "big"
    bit: int | None = None
    offset: float = 0.0

WIDTH = {"uint16": 1, "int16": 1, "uint32": 2, "int32": 2, "float32": 2, "float64": 4, "bool": 1}
_FORMAT = {"uint16": "H", "int16": "h", "uint32": "I", "int32": "i", "float32": "f", "float64": "d"}
BIT_TABLES = ("coil", "discrete")
# Protocol limits per request (Modbus application protocol 1.1b3).
MAX_REGISTERS = 125
MAX_BITS = 2000


def width(reg: Register) -> int:
    return 1 if reg.table in BIT_TABLES else WIDTH[reg.type]


def _to_bytes(words: list[int], reg: Register) -> bytes:
    if reg.word_order == "little":
        words = words[::-1]
    data = b"".join(w.to_bytes(2, "big") for w in words)
    if reg.byte_order == "little":
        data = b"".join(data[i + 1:i + 2] + data[i:i + 1] for i in range(0, len(data), 2))
    return data


def decode(words: list[int] | list[bool], reg: Register) -> float | None:
    """The engineering value of one tag from its registers (or its bit); None if not a finite number."""
    if reg.table in BIT_TABLES:
        return float(bool(words[0]))
    if reg.bit is not None:
        return float((words[0] >> reg.bit) & 1)
    raw: float = struct.unpack(">" + _FORMAT[reg.type], _to_bytes(list(words), reg))[0]
    if not math.isfinite(raw):
        return None
    return float(raw * reg.scale + reg.offset)


def encode(value: float, reg: Register) -> list[int]:
    """The registers that hold `value` (the inverse of decode; for the simulated PLC)."""
    raw = (value - reg.offset) / reg.scale
    kind = reg.type
    if kind.startswith(("uint", "int")):
        bits = 16 * WIDTH[kind]
        lo, hi = (0, 2**bits - 1) if kind.startswith("u") else (-2**(bits - 1), 2**(bits - 1) - 1)
        raw = min(hi, max(lo, round(raw)))
    data = struct.pack(">" + _FORMAT[kind], raw)
    if reg.byte_order == "little":
        data = b"".join(data[i + 1:i + 2] + data[i:i + 1] for i in range(0, len(data), 2))
    words = [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]
    return words[::-1] if reg.word_order == "little" else words


@dataclass
class Read:
    """One request: `count` registers (or bits) of `table` from `address`, covering `tags`."""

    table: str
    address: int
    count: int
    tags: list[Register]


def plan(registers: tuple[Register, ...] | list[Register], *, max_gap: int = 10,
         max_per_read: int | None = None) -> list[Read]:
    """Merge tags into as few requests as the protocol (and the PLC) allows.

    Tags of one table are sorted by address; a tag joins the current request if the gap
    to it is at most `max_gap` registers (bits) and the request stays within the limit.
    """
    reads: list[Read] = []
    for table in ("holding", "input", "coil", "discrete"):
        tags = sorted((r for r in registers if r.table == table), key=lambda r: (r.address, width(r)))
        limit = MAX_BITS if table in BIT_TABLES else MAX_REGISTERS
        if max_per_read:
            limit = min(limit, max_per_read if table not in BIT_TABLES else MAX_BITS)
        current: Read | None = None
        for reg in tags:
            end = reg.address + width(reg)
            if current is not None:
                gap = reg.address - (current.address + current.count)
                if gap <= max_gap and end - current.address <= limit:
                    current.count = max(current.count, end - current.address)
                    current.tags.append(reg)
                    continue
            current = Read(table, reg.address, width(reg), [reg])
            reads.append(current)
    return reads
