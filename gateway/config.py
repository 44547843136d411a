"""The YAML contract: load, validate in full, and report every problem with its path.

Each section is a frozen dataclass whose fields carry their own check, so the
schema is written once. `load()` walks the YAML tree, collects every problem as
`path: what was expected, what was found`, and raises one `ConfigError` listing
them all: a controls engineer fixes the file in one go, not one error per start.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from gateway.units import parse_duration, parse_size

DEFAULT_PATH = "/etc/edge-gateway/gateway.yaml"
SOURCES = ("modbus_tcp", "modbus_rtu", "mqtt", "sim")
# What this version can run. A valid config that needs more is refused by name.
AVAILABLE_SOURCES = ("modbus_tcp", "modbus_rtu", "mqtt", "sim")
REGISTER_TYPES = ("uint16", "int16", "uint32", "int32", "float32", "float64", "bool")
TABLES = ("holding", "input", "coil", "discrete")
NAME = re.compile(r"^[a-z0-9_-]+$")
TAG = re.compile(r"^[A-Za-z0-9_.-]+$")


class ConfigError(Exception):
    """A config file with one or more problems; `str()` lists them, one per line."""

    def __init__(self, file: str, problems: list[tuple[str, str]]) -> None:
        self.file = file
        self.problems = problems
        super().__init__("\n".join(f"{file}: {path}: {msg}" if path else f"{file}: {msg}" for path, msg in problems))


class _Problems:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, path: str, msg: str) -> None:
        self.items.append((path, msg))


INVALID = object()
REQUIRED = object()
Check = Callable[[Any, str, _Problems], Any]


def _found(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if value is None:
        return "nothing"
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return repr(value)


# -- checks: each takes (value, path, problems) and returns the parsed value or INVALID ----------
def string(pattern: re.Pattern[str] | None = None, what: str = "") -> Check:
    def check(value, path, problems):
        if not isinstance(value, str) or not value:
            problems.add(path, f"expected a non-empty string, got {_found(value)}")
            return INVALID
        if pattern and not pattern.match(value):
            problems.add(path, f"expected {what or pattern.pattern}, got {_found(value)}")
            return INVALID
        return value
    return check


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    def check(value, path, problems):
        if isinstance(value, bool) or not isinstance(value, int):
            problems.add(path, f"expected an integer, got {_found(value)}")
            return INVALID
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            problems.add(path, f"expected an integer from {lo} to {hi}, got {value}")
            return INVALID
        return value
    return check


def number(lo: float | None = None, hi: float | None = None) -> Check:
    def check(value, path, problems):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.add(path, f"expected a number, got {_found(value)}")
            return INVALID
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            problems.add(path, f"expected a number from {lo} to {hi}, got {value}")
            return INVALID
        return float(value)
    return check


def boolean(value, path, problems):
    if not isinstance(value, bool):
        problems.add(path, f"expected true or false, got {_found(value)}")
        return INVALID
    return value


def one_of(*choices: Any) -> Check:
    def check(value, path, problems):
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            names = ", ".join(str(c) for c in choices)
            problems.add(path, f"expected one of {names}, got {_found(value)}")
            return INVALID
        return value
    return check


def duration(lo: float = 0.0, hi: float = math.inf) -> Check:
    def check(value, path, problems):
        try:
            seconds = parse_duration(value) if isinstance(value, str) else None
        except ValueError:
            seconds = None
        if seconds is None:
            problems.add(path, f'expected a duration such as "250ms", "10s", "5m", "2h", "7d", got {_found(value)}')
            return INVALID
        if not lo <= seconds <= hi:
            problems.add(path, f"expected a duration from {lo:g}s to {hi:g}s, got {_found(value)}")
            return INVALID
        return seconds
    return check


def size(value, path, problems):
    try:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError
        parsed = parse_size(value)
    except ValueError:
        problems.add(path, f'expected a size such as "512MiB", "10MB" or a number of bytes, got {_found(value)}')
        return INVALID
    if parsed <= 0:
        problems.add(path, f"expected a size above zero, got {_found(value)}")
        return INVALID
    return parsed


def readable_file(value, path, problems):
    if string()(value, path, problems) is INVALID:
        return INVALID
    if not os.path.isfile(value) or not os.access(value, os.R_OK):
        problems.add(path, f'expected a readable file, got "{value}" (missing or not readable)')
        return INVALID
    return value


def optional(check: Check) -> Check:
    def opt(value, path, problems):
        return None if value is None else check(value, path, problems)
    return opt


def list_of(check: Check) -> Check:
    def check_list(value, path, problems):
        if value is None:
            return ()
        if not isinstance(value, list):
            problems.add(path, f"expected a list, got {_found(value)}")
            return INVALID
        items = tuple(check(item, f"{path}[{i}]", problems) for i, item in enumerate(value))
        return INVALID if INVALID in items else items
    return check_list


def map_of(key: Check, val: Check) -> Check:
    def check_map(value, path, problems):
        if value is None:
            return {}
        if not isinstance(value, dict):
            problems.add(path, f"expected a mapping, got {_found(value)}")
            return INVALID
        out = {key(k, f"{path}.{k}", problems): val(v, f"{path}.{k}", problems) for k, v in value.items()}
        return INVALID if INVALID in out or INVALID in out.values() else out
    return check_map


def section(cls: type) -> Check:
    def check(value, path, problems):
        return _load_section(cls, value, path, problems)
    return check


def setting(check: Check, default: Any = REQUIRED) -> Any:
    """A dataclass field that knows how to check its YAML value."""
    if isinstance(default, (dict, list)):  # a YAML default, checked like a value the user wrote
        return field(default=None, metadata={"check": check, "required": False, "node_default": default})
    return field(default=None if default is REQUIRED else default,
                 metadata={"check": check, "required": default is REQUIRED})


def _load_section(cls: type, node: Any, path: str, problems: _Problems) -> Any:
    if node is None:
        node = {}
    if not isinstance(node, dict):
        problems.add(path, f"expected a mapping, got {_found(node)}")
        return INVALID
    known = {f.name: f for f in fields(cls)}
    for key in node:
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            suggestion = f' (did you mean "{hint[0]}"?)' if hint else f" (expected one of {', '.join(known)})"
            problems.add(_join(path, str(key)), f"unknown key{suggestion}")
    values, ok = {}, True
    for name, f in known.items():
        sub = _join(path, name)
        if name not in node:
            if f.metadata["required"]:
                problems.add(sub, "required, but missing")
                ok = False
            elif "node_default" in f.metadata:
                values[name] = f.metadata["check"](f.metadata["node_default"], sub, problems)
            continue
        value = f.metadata["check"](node[name], sub, problems)
        if value is INVALID:
            ok = False
        else:
            values[name] = value
    if not ok:
        return INVALID
    try:
        return cls(**values)
    except _Invalid as err:  # cross-field rules raise this from __post_init__
        for sub, msg in err.problems:
            problems.add(_join(path, sub), msg)
        return INVALID


def _join(path: str, key: str) -> str:
    if not key:
        return path
    if key.startswith("["):
        return path + key
    return f"{path}.{key}" if path else key


class _Invalid(Exception):
    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems


# -- the contract ------------------------------------------------------------------------------
@dataclass(frozen=True)
class GatewaySection:
    id: str = setting(string(NAME, "lowercase letters, digits, _ and - (e.g. line3-gw1)"))
    site: str = setting(string(NAME, "lowercase letters, digits, _ and - (e.g. plant-a)"))
    data_dir: str = setting(string(), "/var/lib/edge-gateway")
    timezone: str = setting(string(), "UTC")
    health_interval: float = setting(duration(1, 3600), 10.0)
    log_level: str = setting(one_of("debug", "info", "warning", "error"), "info")
    model_dir: str | None = setting(optional(string()), None)  # default: models/ beside the package, /opt/...

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise _Invalid([("timezone", f'expected an IANA time zone such as "Europe/Berlin", got "{self.timezone}"')])


@dataclass(frozen=True)
class TlsSection:
    ca_file: str | None = setting(optional(readable_file), None)
    cert_file: str | None = setting(optional(readable_file), None)
    key_file: str | None = setting(optional(readable_file), None)

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise _Invalid([("cert_file" if self.cert_file is None else "key_file",
                             "required when the other of cert_file/key_file is given")])


@dataclass(frozen=True)
class ReconnectSection:
    min: float = setting(duration(0.05, 3600), 1.0)
    max: float = setting(duration(0.05, 86400), 60.0)
    jitter: float = setting(number(0, 1), 0.3)


@dataclass(frozen=True)
class UpstreamSection:
    host: str = setting(string())
    port: int | None = setting(integer(1, 65535), None)
    tls: TlsSection | None = setting(optional(section(TlsSection)), None)
    username: str | None = setting(optional(string()), None)
    password_file: str | None = setting(optional(readable_file), None)
    topic_prefix: str = setting(string(), "edge/{site}/{gateway_id}")
    qos: int = setting(one_of(1, 2), 1)
    max_inflight: int = setting(integer(1, 65535), 100)
    keepalive: float = setting(duration(5, 3600), 30.0)
    client_id: str | None = setting(optional(string()), None)
    reconnect: ReconnectSection = setting(section(ReconnectSection), {})

    def __post_init__(self) -> None:
        problems = []
        try:
            self.topic_prefix.format(site="s", gateway_id="g")
        except (KeyError, IndexError, ValueError):
            problems.append(("topic_prefix", "expected a topic with only {site} and {gateway_id} placeholders, "
                                             f'got "{self.topic_prefix}"'))
        if any(c in self.topic_prefix for c in "+#"):
            problems.append(("topic_prefix", f'expected no MQTT wildcards (+, #), got "{self.topic_prefix}"'))
        if self.password_file and not self.username:
            problems.append(("username", "required when password_file is given"))
        if problems:
            raise _Invalid(problems)

    @property
    def effective_port(self) -> int:
        return self.port or (8883 if self.tls is not None else 1883)


@dataclass(frozen=True)
class OutboxSection:
    max_messages: int = setting(integer(1, 10**9), 1_000_000)
    max_bytes: int = setting(size, 512 * 1024**2)
    max_age: float = setting(duration(1), 7 * 86400.0)
    when_full: str = setting(one_of("drop_oldest", "drop_newest"), "drop_oldest")
    sync: str = setting(one_of("normal", "full"), "normal")
    commit_interval: float = setting(duration(0.001, 1.0), 0.1)


@dataclass(frozen=True)
class LocalClientSection:
    """How the gateway itself logs in to the local broker to read `source: mqtt` devices."""
    username: str = setting(string())
    password_file: str | None = setting(optional(readable_file), None)


@dataclass(frozen=True)
class LocalBrokerSection:
    enabled: bool = setting(boolean, False)  # embedded in the gateway (else: edge-gateway-broker.service)
    listen: str = setting(string(re.compile(r"^[^:\s]+:\d{1,5}$"), 'HOST:PORT such as "127.0.0.1:1883"'),
                          "127.0.0.1:1883")
    password_file: str | None = setting(optional(readable_file), None)  # users: `edge-gateway broker-user`
    allow_anonymous: bool = setting(boolean, False)
    client: LocalClientSection | None = setting(optional(section(LocalClientSection)), None)

    def __post_init__(self) -> None:
        if self.enabled and not self.allow_anonymous and not self.password_file:
            raise _Invalid([("password_file", "required when the embedded broker is enabled: it refuses anonymous "
                                              "clients (create users with `edge-gateway broker-user`), unless "
                                              "allow_anonymous: true is set")])

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host, int(port)


@dataclass(frozen=True)
class ShiftSection:
    name: str = setting(string())
    start: str = setting(string(re.compile(r"^([01]\d|2[0-3]):[0-5]\d$"), 'a local time "HH:MM" such as "06:00"'))


@dataclass(frozen=True)
class SerialSection:
    port: str = setting(string())
    baudrate: int = setting(one_of(1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200), 19200)
    parity: str = setting(one_of("N", "E", "O"), "E")
    stopbits: int = setting(one_of(1, 2), 1)
    bytesize: int = setting(one_of(7, 8), 8)


@dataclass(frozen=True)
class RegisterSection:
    name: str = setting(string(TAG, "a tag name of letters, digits, _ . -"))
    table: str = setting(one_of(*TABLES), "holding")
    address: int = setting(integer(0, 65535))
    type: str = setting(one_of(*REGISTER_TYPES), "uint16")
    word_order: str = setting(one_of("big", "little"), "big")
    byte_order: str = setting(one_of("big", "little"), "big")
    bit: int | None = setting(optional(integer(0, 15)), None)
    scale: float = setting(number(), 1.0)
    offset: float = setting(number(), 0.0)

    def __post_init__(self) -> None:
        bit_table = self.table in ("coil", "discrete")
        if bit_table and self.type != "bool":
            raise _Invalid([("type", f'expected bool for table {self.table}, got "{self.type}"')])
        if self.bit is not None and (bit_table or self.type not in ("uint16", "int16", "bool")):
            raise _Invalid([("bit", "only for a bit inside a 16-bit holding or input register")])
        if self.type == "bool" and not bit_table and self.bit is None:
            raise _Invalid([("bit", "required for type bool in a holding or input register (0..15)")])


@dataclass(frozen=True)
class CounterSection:
    name: str = setting(string(TAG, "a counter name of letters, digits, _ . -"))
    register: str = setting(string())
    bits: int = setting(one_of(16, 32), 32)
    reset_threshold: float = setting(number(0.0001, 0.9999), 0.1)
    kind: str = setting(one_of("total", "good", "defect"), "total")


@dataclass(frozen=True)
class PublishSection:
    interval: float | None = setting(optional(duration(0.01, 86400)), None)
    on_change: bool = setting(boolean, False)
    deadband: dict = setting(map_of(string(), number(0)), {})
    max_silence: float = setting(duration(1, 86400), 60.0)

    def __post_init__(self) -> None:
        if self.on_change and self.interval is not None:
            raise _Invalid([("on_change", "choose either interval or on_change, not both")])
        if self.deadband and not self.on_change:
            raise _Invalid([("deadband", "only applies with on_change: true")])


@dataclass(frozen=True)
class FaultSection:
    fault: str = setting(one_of("bearing_wear", "cavitation", "seal_leak", "stuck_sensor", "spike", "dropout"))
    at: float = setting(duration(), 0.0)
    severity: float = setting(number(0.01, 1.0), 1.0)
    tag: str | None = setting(optional(string()), None)
    ramp: float = setting(duration(), 120.0)
    duration: float = setting(duration(0.001), math.inf)  # last: the name shadows the check below it


@dataclass(frozen=True)
class PlcSection:
    rate_per_min: float = setting(number(0, 100_000), 120.0)
    counter_bits: int = setting(one_of(16, 32), 32)
    start_near_top: bool = setting(boolean, False)
    reset_every: float | None = setting(optional(duration(1)), None)


MACHINE_STATES = ("running", "idle", "down", "planned_stop")


@dataclass(frozen=True)
class OeeSection:
    status_tag: str = setting(string())
    states: dict = setting(map_of(integer(), one_of(*MACHINE_STATES)))
    ideal_rate: float | None = setting(optional(number(0.000001)), None)  # pieces per minute at 100 %


# Keys each source takes beyond the common ones; anything else set is an error.
_SOURCE_KEYS = {
    "modbus_tcp": {"host", "port", "unit", "registers", "max_gap", "max_registers_per_read"},
    "modbus_rtu": {"serial", "unit", "registers", "max_gap", "max_registers_per_read"},
    "mqtt": {"topic", "fields", "timestamp_field"},
    "sim": {"profile", "seed", "faults", "plc", "time_scale"},
}
_SOURCE_REQUIRED = {"modbus_tcp": ("host", "registers"), "modbus_rtu": ("serial", "registers"),
                    "mqtt": ("topic", "fields"), "sim": ("profile",)}
_COMMON_KEYS = {"name", "source", "interval", "timeout", "counters", "model", "publish", "oee"}


@dataclass(frozen=True)
class DeviceSection:
    name: str = setting(string(NAME, "lowercase letters, digits, _ and - (e.g. pump1)"))
    source: str = setting(one_of(*SOURCES))
    interval: float = setting(duration(0.01, 86400), 1.0)
    timeout: float = setting(duration(0.01, 600), 0.5)
    # modbus
    host: str | None = setting(optional(string()), None)
    port: int | None = setting(optional(integer(1, 65535)), None)
    unit: int | None = setting(optional(integer(0, 255)), None)
    serial: SerialSection | None = setting(optional(section(SerialSection)), None)
    registers: tuple = setting(list_of(section(RegisterSection)), [])
    max_gap: int | None = setting(optional(integer(0, 124)), None)
    max_registers_per_read: int | None = setting(optional(integer(1, 125)), None)
    # mqtt
    topic: str | None = setting(optional(string()), None)
    fields: dict = setting(map_of(string(TAG, "a tag name"), string()), {})
    timestamp_field: str | None = setting(optional(string()), None)
    # sim
    profile: str | None = setting(optional(one_of("pump", "flexo_line")), None)
    seed: int | None = setting(optional(integer(0, 2**31)), None)
    faults: tuple = setting(list_of(section(FaultSection)), [])
    plc: PlcSection | None = setting(optional(section(PlcSection)), None)
    time_scale: float | None = setting(optional(number(0.01, 1000)), None)  # simulated seconds per real second
    counters: tuple = setting(list_of(section(CounterSection)), [])
    model: str | None = setting(optional(string(NAME, "a model name such as pump-ae")), None)
    publish: PublishSection = setting(section(PublishSection), {})
    oee: OeeSection | None = setting(optional(section(OeeSection)), None)

    def __post_init__(self) -> None:
        problems = []
        allowed = _COMMON_KEYS | _SOURCE_KEYS[self.source]
        for f in fields(self):
            value = getattr(self, f.name)
            is_set = value not in (None, (), {})
            if is_set and f.name not in allowed:
                problems.append((f.name, f"not used by source {self.source} (it takes: "
                                         f"{', '.join(sorted(_SOURCE_KEYS[self.source]))})"))
        for key in _SOURCE_REQUIRED[self.source]:
            if getattr(self, key) in (None, (), {}):
                problems.append((key, f"required for source {self.source}, but missing"))
        tags = self.tags
        seen: set[str] = set()
        for i, reg in enumerate(self.registers):
            if reg.name in seen:
                problems.append((f"registers[{i}].name", f'duplicate tag name "{reg.name}"'))
            seen.add(reg.name)
        for i, counter in enumerate(self.counters):
            if tags and counter.register not in tags:
                problems.append((f"counters[{i}].register", f"expected one of this device's tags "
                                                            f"({', '.join(tags)}), got \"{counter.register}\""))
        if self.oee is not None and tags and self.oee.status_tag not in tags:
            problems.append(("oee.status_tag", f"expected one of this device's tags ({', '.join(tags)}), "
                                               f"got \"{self.oee.status_tag}\""))
        for tag in self.publish.deadband:
            if tags and tag not in tags:
                problems.append((f"publish.deadband.{tag}", f"expected one of this device's tags ({', '.join(tags)})"))
        for i, fault in enumerate(self.faults):
            if self.profile != "pump":
                problems.append((f"faults[{i}]", "faults can be injected into the pump profile only"))
            elif fault.fault in ("stuck_sensor", "spike", "dropout") and fault.tag not in tags:
                problems.append((f"faults[{i}].tag", f"expected one of the pump's tags ({', '.join(tags)}), "
                                                     f"got {_found(fault.tag)}"))
        if self.plc is not None and self.profile != "flexo_line":
            problems.append(("plc", "only the flexo_line profile has PLC counters"))
        if problems:
            raise _Invalid(problems)

    @property
    def tags(self) -> tuple[str, ...]:
        """The tag names this device produces, in order."""
        if self.source == "sim" and self.profile:
            import sim
            return tuple(sim.PROFILES[self.profile].tags)
        if self.source == "mqtt":
            return tuple(self.fields)
        return tuple(reg.name for reg in self.registers)


@dataclass(frozen=True)
class Config:
    gateway: GatewaySection = setting(section(GatewaySection))
    upstream: UpstreamSection = setting(section(UpstreamSection))
    outbox: OutboxSection = setting(section(OutboxSection), {})
    local_broker: LocalBrokerSection = setting(section(LocalBrokerSection), {})
    shifts: tuple = setting(list_of(section(ShiftSection)), [])
    devices: tuple = setting(list_of(section(DeviceSection)))

    def __post_init__(self) -> None:
        problems = []
        names: set[str] = set()
        for i, device in enumerate(self.devices):
            if device.name in names:
                problems.append((f"devices[{i}].name", f'duplicate device name "{device.name}"'))
            names.add(device.name)
        starts = [s.start for s in self.shifts]
        for i, shift in enumerate(self.shifts):
            if starts.index(shift.start) != i:
                problems.append((f"shifts[{i}].start", f'two shifts start at "{shift.start}"'))
        if problems:
            raise _Invalid(problems)

    @property
    def topic_root(self) -> str:
        return self.upstream.topic_prefix.format(site=self.gateway.site, gateway_id=self.gateway.id)


def _not_available(config: Config) -> list[tuple[str, str]]:
    """Valid settings this version cannot run: refused by name rather than ignored; models that do not fit."""
    problems = []
    models: dict = {}
    for i, device in enumerate(config.devices):
        if device.source not in AVAILABLE_SOURCES:
            problems.append((f"devices[{i}].source", f"{device.source} is not available in this version "
                                                     f"(available: {', '.join(AVAILABLE_SOURCES)})"))
        if device.model is not None:
            problems.extend((f"devices[{i}].model", f"device {device.name}: {why}")
                            for why in _model_problems(device, config.gateway.model_dir, models))
    if config.local_broker.enabled:
        import importlib.util
        if importlib.util.find_spec("amqtt") is None:
            problems.append(("local_broker.enabled", "the embedded broker needs amqtt: "
                                                     "pip install 'edge-gateway[broker]' (install.sh does)"))
    return problems


def _model_problems(device, model_dir: str | None, cache: dict) -> list[str]:
    try:
        from gateway import anomaly  # numpy and the TFLite runtime only when a model is configured
    except ImportError as err:
        return [f"anomaly models need numpy and a TFLite runtime ({err}): pip install 'edge-gateway[anomaly]'"]
    if device.model not in cache:
        try:
            cache[device.model] = anomaly.load(device.model, anomaly.model_dir(model_dir))
        except anomaly.ModelError as err:
            cache[device.model] = f"model {device.model}: {err}"
    model = cache[device.model]
    if isinstance(model, str):
        return [model]
    return anomaly.check_device(model, device.tags, device.interval * (device.time_scale or 1.0))


def load_models(config: Config) -> dict:
    """The models the devices name, loaded once each (after `load()` has validated them)."""
    names = {d.model for d in config.devices if d.model}
    if not names:
        return {}  # numpy and the runtime are not even imported
    from gateway import anomaly

    directory = anomaly.model_dir(config.gateway.model_dir)
    return {name: anomaly.load(name, directory) for name in names}


def parse(text: str, file: str = "<config>") -> Config:
    """Validate YAML text against the contract; raise ConfigError listing every problem."""
    try:
        node = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(file, [(where, f"not valid YAML: {getattr(err, 'problem', None) or err}")]) from None
    problems = _Problems()
    config = _load_section(Config, node, "", problems)
    if config is not INVALID:
        problems.items.extend(_not_available(config))
    if problems.items:
        raise ConfigError(file, problems.items)
    return config


def load(path: str) -> Config:
    """Read and validate a config file."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as err:
        raise ConfigError(path, [("", f"cannot read the file: {err.strerror}")]) from None
    return parse(text, path)
