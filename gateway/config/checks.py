"""The validation library: checks that turn YAML values into typed values, collecting every problem.

A check takes `(value, path, problems)` and returns the parsed value, or an `Invalid`
holding whatever part of it could be parsed. A section is a frozen dataclass whose
fields carry their own check (`setting`); its cross-field rules (`rules`) run on the
fields that did parse, even when others did not, so one run reports every problem:
a misspelled counter register is reported beside a type typo on the same device.

Nothing here touches the world (files, models, imports): that is `preflight`.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields
from typing import Any

from gateway.logs import visible
from gateway.units import parse_duration, parse_size

Problem = tuple[str, str]  # (YAML path, what was expected and what was found)


class Problems:
    """The problems found so far, in the order of the file."""

    def __init__(self) -> None:
        self.items: list[Problem] = []

    def add(self, path: str, msg: str) -> None:
        self.items.append((path, msg))


@dataclass(frozen=True)
class Invalid:
    """A value that did not pass; `values` holds the fields of a section that did."""

    values: Mapping[str, Any] = field(default_factory=dict)


INVALID = Invalid()
REQUIRED: Any = object()
Check = Callable[[Any, str, Problems], Any]


class Written(float):
    """A number written with an exponent and no dot (`1e3`): YAML 1.1 read it as text, YAML 1.2 as a number (`load`).
    A number where a number is expected; where text is, the text as written (an id or a name `7e1` that loaded before)."""

    text: str

    def __new__(cls, text: str) -> Written:
        number = super().__new__(cls, text.replace("_", ""))
        number.text = text
        return number


MAX_TEXT_BYTES = 65535  # MQTT's longest string (a user name, a client id: longer, the first CONNECT failed, exit 70)


def unfit_text(value: str) -> str | None:
    """Why a string cannot be a setting: what no path, name, topic or login can hold (they failed later, at the
    first use: a NUL in a path, a lone surrogate `"\\ud800"` written to the outbox, a NUL in a topic that the broker
    answers by closing the connection, for ever); None when it can."""
    if "\0" in value:
        return "without NUL characters"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "that is UTF-8 (a lone surrogate such as \\ud800 is not)"
    return f"of at most {MAX_TEXT_BYTES} bytes" if size > MAX_TEXT_BYTES else None


def found(value: Any) -> str:
    """How a YAML value is named in a message."""
    if isinstance(value, Written):
        return value.text if len(value.text) <= 60 else f"{value.text[:40]}… ({len(value.text)} characters)"
    if isinstance(value, str):
        return f'"{visible(value)}"' if len(value) <= 60 else f'"{visible(value[:40])}…" ({len(value)} characters)'
    if value is None:
        return "nothing"
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}… ({len(text)} characters)"


def part(item: Any, name: str) -> Any:
    """Field `name` of a parsed section, or of the parsed part of an invalid one (None if absent).

    A field that did not parse at all is None too; one that parsed in part stays an `Invalid`."""
    value = item.values.get(name) if isinstance(item, Invalid) else getattr(item, name, None)
    return None if isinstance(value, Invalid) and not value.values else value


def join(path: str, key: str) -> str:
    if not key:
        return path
    if key.startswith("["):
        return path + key
    return f"{path}.{key}" if path else key


# -- checks ---------------------------------------------------------------------------------------
def string(pattern: re.Pattern[str] | None = None, what: str = "") -> Check:
    def check(value: Any, path: str, problems: Problems) -> Any:
        value = value.text if isinstance(value, Written) else value
        if not isinstance(value, str) or not value:
            problems.add(path, f"expected a non-empty string, got {found(value)}")
            return INVALID
        if (bad := unfit_text(value)) is not None:
            problems.add(path, f"expected text {bad}, got {found(value)}")
            return INVALID
        if pattern and not pattern.fullmatch(value):  # (match: "$" also before a last "\n")
            problems.add(path, f"expected {what or pattern.pattern}, got {found(value)}")
            return INVALID
        return value
    return check


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    def check(value: Any, path: str, problems: Problems) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.add(path, f"expected an integer, got {found(value)}")
            return INVALID
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            problems.add(path, f"expected an integer from {lo} to {hi}, got {value}")
            return INVALID
        return value
    return check


def number(lo: float | None = None, hi: float | None = None) -> Check:
    def check(value: Any, path: str, problems: Problems) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.add(path, f"expected a number, got {found(value)}")
            return INVALID
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            problems.add(path, f"expected a number from {lo} to {hi}, got {value}")
            return INVALID
        return float(value)
    return check


def boolean(value: Any, path: str, problems: Problems) -> Any:
    if not isinstance(value, bool):
        problems.add(path, f"expected true or false, got {found(value)}")
        return INVALID
    return value


def one_of(*choices: Any) -> Check:
    def check(value: Any, path: str, problems: Problems) -> Any:
        # bool is an int in Python: `true` must not pass as 1, nor 1 as `true`; and 1.0 == 1, but a QoS or a bit
        # count of 1.0 passed on as a float failed later (paho's `qos << 1`: exit 70 at the first publish).
        if isinstance(value, (dict, list)) or value not in choices or \
                not any(type(value) is type(c) for c in choices if c == value):
            problems.add(path, f"expected one of {', '.join(str(c) for c in choices)}, got {found(value)}")
            return INVALID
        return value
    return check


MAX_DURATION = 10 * 365 * 86400.0  # ten years: no setting needs more, and time arithmetic stays finite


def duration(lo: float = 0.0, hi: float = MAX_DURATION) -> Check:
    def check(value: Any, path: str, problems: Problems) -> Any:
        try:
            seconds = parse_duration(value) if isinstance(value, str) else None
        except ValueError:
            seconds = None
        if seconds is None:
            problems.add(path, f'expected a duration such as "250ms", "10s", "5m", "2h", "7d", got {found(value)}')
            return INVALID
        if not lo <= seconds <= hi:
            problems.add(path, f"expected a duration from {lo:g}s to {hi:g}s, got {found(value)}")
            return INVALID
        return seconds
    return check


def size(value: Any, path: str, problems: Problems) -> Any:
    try:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError
        parsed = parse_size(value)
    except ValueError:
        problems.add(path, f'expected a size such as "512MiB", "10MB" or a number of bytes up to 1PiB, '
                           f'got {found(value)}')
        return INVALID
    if parsed <= 0:
        problems.add(path, f"expected a size above zero, got {found(value)}")
        return INVALID
    return parsed


def optional(check: Check) -> Check:
    def opt(value: Any, path: str, problems: Problems) -> Any:
        return None if value is None else check(value, path, problems)
    return opt


def list_of(check: Check) -> Check:
    """A list; an item that fails stays in the list as its `Invalid`, for the rules that read it."""
    def check_list(value: Any, path: str, problems: Problems) -> Any:
        if value is None:
            return ()
        if not isinstance(value, list):
            problems.add(path, f"expected a list, got {found(value)}")
            return INVALID
        items = tuple(check(item, f"{path}[{i}]", problems) for i, item in enumerate(value))
        return Invalid({"items": items}) if any(isinstance(i, Invalid) for i in items) else items
    return check_list


def items(value: Any) -> tuple[Any, ...]:
    """The items of a parsed list, or those of a list with bad items (each item parsed or Invalid)."""
    if isinstance(value, Invalid):
        return tuple(value.values.get("items", ()))
    return tuple(value or ())


def map_of(key: Check, val: Check) -> Check:
    def check_map(value: Any, path: str, problems: Problems) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            problems.add(path, f"expected a mapping, got {found(value)}")
            return INVALID
        # (pairs first: a key that is not one is INVALID, which cannot be a key of a dict)
        pairs = [(key(k, f"{path}.{k}", problems), val(v, f"{path}.{k}", problems)) for k, v in value.items()]
        return INVALID if any(isinstance(x, Invalid) for pair in pairs for x in pair) else dict(pairs)
    return check_map


def section(cls: type) -> Check:
    def check(value: Any, path: str, problems: Problems) -> Any:
        return load_section(cls, value, path, problems)
    return check


def setting(check: Check, default: Any = REQUIRED, doc: str = "", key: str | None = None) -> Any:
    """A dataclass field that knows how to check its YAML value (and, in `doc`, what it is for).

    `key`: the YAML key when it cannot be the field's name (`for`, a Python keyword)."""
    meta = {"check": check, "required": default is REQUIRED, "doc": doc, "key": key}
    if isinstance(default, (dict, list)):  # a YAML default, checked like a value the user wrote
        return field(default=None, metadata={**meta, "node_default": default})
    return field(default=None if default is REQUIRED else default, metadata=meta)


def settings(cls: type) -> dict[str, Field[Any]]:
    """The YAML keys of a section, each with its field."""
    return {f.metadata["key"] or f.name: f for f in fields(cls) if "check" in f.metadata}


def unknown_keys(node: Mapping[Any, Any], known: Mapping[str, Any], path: str, problems: Problems,
                 elsewhere: Callable[[str], str | None] = lambda key: None) -> None:
    """Report every key that is not a setting: what it might have been, or who else takes it."""
    for key in node:
        if key in known:
            continue
        why = elsewhere(str(key))
        if why is None:
            hint = difflib.get_close_matches(str(key), list(known), n=1)
            why = f'unknown key (did you mean "{hint[0]}"?)' if hint else \
                f"unknown key (expected one of {', '.join(known)})"
        problems.add(join(path, str(key)), why)


def load_section(cls: Any, node: Any, path: str, problems: Problems,
                 elsewhere: Callable[[str], str | None] = lambda key: None,
                 required_for: Callable[[str], str] = lambda key: "") -> Any:
    """A section from a YAML mapping; its rules run on whatever fields parsed.

    `elsewhere(key)` may say who else takes an unknown key; `required_for(key)` why a key is required.
    """
    if node is None:
        node = {}
    if not isinstance(node, dict):
        problems.add(path, f"expected a mapping, got {found(node)}")
        return INVALID
    known = settings(cls)
    unknown_keys(node, known, path, problems, elsewhere)
    values: dict[str, Any] = {}
    ok = True
    for key, f in known.items():
        name, sub = f.name, join(path, key)
        if key in node:
            value = f.metadata["check"](node[key], sub, problems)
        elif f.metadata["required"]:
            problems.add(sub, f"required{required_for(key)}, but missing")
            ok = False
            continue
        elif "node_default" in f.metadata:
            value = f.metadata["check"](f.metadata["node_default"], sub, problems)
        else:
            continue
        values[name] = value
        ok = ok and not isinstance(value, Invalid)
    rules = getattr(cls, "rules", None)
    broken = rules(Fields(values, {f.name: f for f in known.values()})) if rules is not None else []
    for sub, msg in broken:
        problems.add(join(path, sub), msg)
    if not ok or broken:
        return Invalid(values)
    return cls(**values)


class Fields(Mapping[str, Any]):
    """What a section's rules read: a field's parsed value, its default, or None when it did not parse."""

    def __init__(self, values: dict[str, Any], known: Mapping[str, Field[Any]]) -> None:
        self._values = values
        self._known = known

    def __getitem__(self, name: str) -> Any:
        if name in self._values:
            value = self._values[name]
            return None if value is INVALID else value
        return self._known[name].default

    def ok(self, *names: str) -> bool:
        """Whether these fields all parsed (or took their defaults)."""
        return not any(isinstance(self._values.get(n), Invalid) or
                       (n not in self._values and self._known[n].metadata["required"]) for n in names)

    def __iter__(self) -> Any:
        return iter(self._known)

    def __len__(self) -> int:
        return len(self._known)

