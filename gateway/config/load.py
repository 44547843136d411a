"""Reading a config: bytes → YAML nodes (with their lines) → the schema. Pure: touches no other file.

`parse(text)` validates text; `load(path)` reads a file. Whatever the bytes, the outcome is a
Config or a ConfigError naming the file, the line, the YAML path and what was expected —
never another exception: not for bytes that are not UTF-8, nor for nesting 10,000 deep.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from gateway.config.checks import Invalid, Problems, Written, join
from gateway.config.schema import Config, validate
from gateway.errors import ConfigError
from gateway.logs import visible


def parse(text: str | bytes, file: str = "<config>") -> Config:
    """Validate YAML text against the contract; raise ConfigError listing every problem."""
    if isinstance(text, bytes):
        data = text
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data[:err.start].count(b"\n") + 1
            raise ConfigError(file, [(f"line {line}", f"not UTF-8 text: byte 0x{data[err.start]:02x} at offset "
                                                      f"{err.start}; save the file as UTF-8")]) from None
    try:
        node, lines, duplicates = _compose(text)
    except yaml.reader.ReaderError as err:  # a character YAML does not take: its reader knows only its position
        at = err.position
        where = f"line {text.count(chr(10), 0, at) + 1}, column {at - text.rfind(chr(10), 0, at)}"
        what = visible(chr(err.character)) if isinstance(err.character, int) else repr(err.character)
        raise ConfigError(file, [(where, f"not valid YAML: the character {what} is not allowed (no control "
                                         f"character but tab and line ends)")]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(file, [(where, f"not valid YAML: {getattr(err, 'problem', None) or err}")]) from None
    except RecursionError:
        raise ConfigError(file, [("", "not a config: the YAML is nested too deeply")]) from None
    problems = Problems()
    for path in duplicates:
        problems.add(path, "this key is given twice in one mapping; the first would be ignored")
    try:
        config = validate(node, problems)
    except RecursionError:  # a YAML alias that contains itself
        raise ConfigError(file, [("", "not a config: the YAML refers to itself (a recursive alias)")]) from None
    if problems.items or isinstance(config, Invalid):
        raise ConfigError(file, problems.items or [("", "not a valid config")], lines)
    assert isinstance(config, Config)
    return config


def load(path: str) -> Config:
    """Read and validate a config file."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE + 1)  # not all: /dev/zero, or a stream, has no end
    except OSError as err:
        raise ConfigError(path, [("", f"cannot read the file: {err.strerror}")]) from None
    if len(data) > MAX_FILE:
        raise ConfigError(path, [("", f"larger than {MAX_FILE >> 20} MiB: not a config this reads")])
    return parse(data, path)


MAX_FILE = 64 << 20  # a plant of thousands of devices is a few MiB


def lines_of(path: str) -> dict[str, int]:
    """The line of every YAML path in the file at `path` ({} when it cannot be read or parsed).

    For problems found after parsing (preflight): kept by no Config, since a plant-sized file has
    hundreds of thousands of paths and the lines are wanted only to report a problem.
    """
    try:
        with open(path, "rb") as fh:
            return _compose(fh.read(MAX_FILE).decode("utf-8"))[1]
    except (OSError, ValueError, yaml.YAMLError, RecursionError):
        return {}


def document(path: str) -> Any:
    """The YAML document in the file at `path`, unchecked (None when it cannot be read or parsed).

    For the checks that touch the world to run on a file the schema refused, so that one run
    reports every problem."""
    try:
        with open(path, "rb") as fh:
            return _compose(fh.read(MAX_FILE).decode("utf-8"))[0]
    except (OSError, ValueError, yaml.YAMLError, RecursionError):
        return None


class _Loader(yaml.SafeLoader):
    """SafeLoader whose values that cannot be built (`!!float 1e999x`, an integer of 4,300+ digits,
    `!!timestamp` of day 32) are YAML errors with their line, not a ValueError from deep inside."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        digits = sum(c.isalnum() for c in str(node.value)) if node.tag in NUMBERS else 0  # (hex digits are letters)
        if digits > MAX_DIGITS:
            raise yaml.constructor.ConstructorError(None, None, f"a number of {digits} digits is not a setting",
                                                    node.start_mark)
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError, TypeError) as err:
            raise yaml.constructor.ConstructorError(None, None, f"cannot read this value ({err})",
                                                    node.start_mark) from None


def _number_as_yaml12(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    """A number as YAML 1.2 (and an engineer) reads it, where YAML 1.1 reads it otherwise:
    - `14:00` is text, a time, not the base-60 number 840 (`06:00`, with its leading zero, was text already): a
      shift's start so written was refused as "expected a non-empty string, got 840";
    - `0012` is 12, not the octal 10 (and `0019` a number, not text): an address copied from a register list
      with its leading zeros read another register."""
    text = node.value
    if ":" in text:
        return text
    if node.tag.endswith(":int") and _LEADING_ZEROS.match(text):
        return int(text.replace("_", ""), 10)
    if _EXPONENT.match(text):  # (text where YAML 1.1 read text: see Written)
        return Written(text)
    return (yaml.SafeLoader.construct_yaml_int if node.tag.endswith(":int") else
            yaml.SafeLoader.construct_yaml_float)(loader, node)


_LEADING_ZEROS = re.compile(r"^[-+]?0[0-9_]+$")
_Loader.add_constructor("tag:yaml.org,2002:int", _number_as_yaml12)
_Loader.add_constructor("tag:yaml.org,2002:float", _number_as_yaml12)
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", _LEADING_ZEROS, list("-+0"))
# YAML 1.1 (PyYAML) reads `1e9` and `5E-3` as text: a float there needs a dot. YAML 1.2, and an engineer, read a
# number; a limit written so was refused as "expected a number, got \"1e9\"".
_EXPONENT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT, list("-+0123456789"))
NUMBERS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
MAX_DIGITS = 40  # more than any count, size or time a config needs (2**64 has 20 digits)


def _compose(text: str) -> tuple[Any, dict[str, int], list[str]]:
    """The document, the line of every YAML path in it, and the paths of keys given twice."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    lines: dict[str, int] = {}
    duplicates: list[str] = []
    if node is not None:
        _walk(node, "", lines, duplicates, set())
    return data, lines, duplicates


def _walk(node: yaml.Node, path: str, lines: dict[str, int], duplicates: list[str], seen: set[int]) -> None:
    if id(node) in seen:  # an alias: its lines were recorded where it was defined
        return
    seen.add(id(node))
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        keys: set[str] = set()
        for key, value in node.value:
            sub = join(path, str(key.value))
            if isinstance(key.value, str) and key.value in keys:
                duplicates.append(sub)
            keys.add(str(key.value))
            lines[sub] = key.start_mark.line + 1
            _walk(value, sub, lines, duplicates, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, f"{path}[{i}]", lines, duplicates, seen)
