"""The YAML contract, written once: each section a frozen dataclass whose fields carry their check.

A device is a tagged union on `source` (`ModbusTcpDevice | ModbusRtuDevice | MqttDevice |
SimDevice`), each with only its own keys; a key of another source is refused by name.
Cross-field rules live on the section that owns them (`rules`) and report their own
sub-path. Defaults here are the documented defaults (docs/configuration.md is checked
against these classes by a test).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from string import Formatter
from typing import Any, ClassVar, Union
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.config import checks
from gateway.config.checks import (
    INVALID,
    Check,
    Fields,
    Invalid,
    Problem,
    Problems,
    boolean,
    duration,
    found,
    integer,
    items,
    list_of,
    load_section,
    map_of,
    number,
    one_of,
    optional,
    part,
    section,
    setting,
    settings,
    size,
    string,
)
from gateway.modbus_map import WIDTH

DEFAULT_PATH = "/etc/edge-gateway/gateway.yaml"
REGISTER_TYPES = ("uint16", "int16", "uint32", "int32", "float32", "float64", "bool")
TABLES = ("holding", "input", "coil", "discrete")
NAME = re.compile(r"^[a-z0-9_-]{1,64}$")  # part of every topic: 64 at most keeps one far below MQTT's 65,535 bytes
TAG = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
# spBv1.0/STATE/{host} is the primary host's: a group of that name would publish into it.
SPARKPLUG_GROUP = re.compile(r"^(?!STATE$)[^/+#\x00-\x1f\x7f-\x9f]{1,64}$")
# A level of a Sparkplug topic: MQTT forbids NUL in a topic and its brokers refuse control characters (mosquitto
# closed every CONNECT whose Will topic held a tab).
SPARKPLUG_ID = re.compile(r"^[^/+#\x00-\x1f\x7f-\x9f]{1,64}$")
# An MQTT topic filter: levels split by /, each a name without + # or NUL, or + alone; # alone, last; 1,024 at most.
TOPIC_FILTER = re.compile(r"^(?=[\s\S]{1,1024}$)(?:(?:\+|[^/+#\x00-\x1f\x7f-\x9f]*)/)*(?:\+|#|[^/+#\x00-\x1f\x7f-\x9f]*)$")
# Text MQTT carries as a UTF-8 string (a topic, a client id, a user name): mosquitto refuses control characters in
# one (MQTT 1.5.3), and closes the connection that sent it.
MQTT_TEXT = re.compile(r"^[^\x00-\x1f\x7f-\x9f]*$")
MACHINE_STATES = ("running", "idle", "down", "planned_stop")
# The tags each simulated machine yields, in order: the contract of `source: sim` (sim/ implements it;
# tests/test_sim.py holds the two together). Written here so that the config needs nothing of sim/.
SIM_PROFILES: dict[str, tuple[str, ...]] = {
    "pump": ("motor_rpm", "bearing_temp_c", "oil_pressure_bar", "vibration_mm_s", "flow_l_min",
             "suction_pressure_bar", "discharge_pressure_bar", "motor_current_a", "casing_temp_c",
             "ambient_temp_c"),
    "flexo_line": ("machine_status", "line_speed_m_min", "web_tension_n", "dryer_temp_c", "ink_viscosity_s",
                   "produced_raw", "defects_raw", "stop_reason"),
}
PUMP_FAULTS = ("bearing_wear", "cavitation", "seal_leak", "stuck_sensor", "spike", "dropout")


def _one_of_tags(tags: tuple[str, ...], got: str) -> str:
    return f'expected one of this device\'s tags ({", ".join(tags)}), got "{got}"'


def host_name() -> Check:
    """A host to connect to: an IP address, or a name that can be looked up (`_unfit_host`)."""
    text = string()

    def check(value: Any, path: str, problems: Problems) -> Any:
        value = text(value, path, problems)
        if value is not INVALID and (why := _unfit_host(value)) is not None:
            problems.add(path, f"expected {why}, got {found(value)}")
            return INVALID
        return value
    return check


def _unfit_host(host: str) -> str | None:
    """What a HOST must be when it could not be looked up or listened on, else None. Python encodes a name with the
    idna codec first: "gw..plant.local", a label of 64 characters or a U+202E raised UnicodeError at start, after
    check-config had passed it (upstream.host: the uplink task failed, exit 70, at every restart)."""
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return "an IPv6 address in brackets such as [::1]"
        return None
    try:
        ascii_host = host.encode("idna")
    except UnicodeError:
        ascii_host = b""
    labels = ascii_host.removesuffix(b".").split(b".")
    if not ascii_host or len(ascii_host) > 253 or not all(1 <= len(label) <= 63 for label in labels):
        return ("an IP address or a host name whose labels between dots are 1 to 63 characters long (253 in all) "
                "and that IDNA can encode (no control or bidirectional characters)")
    return None


@dataclass(frozen=True)
class GatewaySection:
    id: str = setting(string(NAME, "up to 64 lowercase letters, digits, _ and - (e.g. line3-gw1)"),
                      doc="this gateway's name, unique in the fleet; part of every topic")
    site: str = setting(string(NAME, "up to 64 lowercase letters, digits, _ and - (e.g. plant-a)"), doc="the plant's name")
    data_dir: str = setting(string(), "/var/lib/edge-gateway", doc="the outbox, counters and state file")
    timezone: str = setting(string(), "UTC", doc="IANA time zone; shifts are local time")
    health_interval: float = setting(duration(1, 3600), 10.0, doc="how often health and the state file are written")
    log_level: str = setting(one_of("debug", "info", "warning", "error"), "info", doc="the log's threshold")
    model_dir: str | None = setting(optional(string()), None,
                                    doc="where anomaly models are found (default: the installed models/)")

    @staticmethod
    def rules(v: Fields) -> list[Problem]:
        if not v.ok("timezone"):
            return []
        try:
            ZoneInfo(v["timezone"])
        except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name too long for a file (tzdata)
            return [("timezone", f'expected an IANA time zone such as "Europe/Berlin", got {found(v["timezone"])}')]
        return []


@dataclass(frozen=True)
class TlsSection:
    ca_file: str | None = setting(optional(string()), None, doc="CA certificate(s) the broker's is verified against")
    cert_file: str | None = setting(optional(string()), None, doc="client certificate, with key_file")
    key_file: str | None = setting(optional(string()), None, doc="client key, with cert_file")

    @staticmethod
    def rules(v: Fields) -> list[Problem]:
        if v.ok("cert_file", "key_file") and (v["cert_file"] is None) != (v["key_file"] is None):
            return [("cert_file" if v["cert_file"] is None else "key_file",
                     "required when the other of cert_file/key_file is given")]
        return []


@dataclass(frozen=True)
class ReconnectSection:
    min: float = setting(duration(0.05, 3600), 0.5, doc="shortest wait between attempts")
    down_max: float = setting(duration(0.05, 3600), 2.0,
                              doc="longest wait while the broker cannot be reached at all (refused, unreachable): "
                                  "each wait is drawn evenly up to it, so a fleet returns spread out")
    max: float = setting(duration(0.05, 86400), 60.0,
                         doc="longest wait after the broker refused us, did not finish the handshake, or closed "
                             "the connection within 10 s of accepting it, time after time (exponential)")
    jitter: float = setting(number(0, 1), 0.3, doc="random share of each exponential wait")


@dataclass(frozen=True)
class SparkplugSection:
    group_id: str | None = setting(optional(string(SPARKPLUG_GROUP, "up to 64 characters, no / + # or control "
                                                                    "character, and not STATE")), None,
                                   doc="the Sparkplug group (default: gateway.site)")
    edge_node_id: str | None = setting(optional(string(SPARKPLUG_ID, "up to 64 characters, no / + # or control "
                                                                     "character")), None,
                                       doc="the edge node (default: gateway.id)")
    primary_host_id: str | None = setting(optional(string(SPARKPLUG_ID, "up to 64 characters, no / + # or control "
                                                                        "character")), None,
                                          doc="births and data only while this host application says online (STATE)")


@dataclass(frozen=True)
class UpstreamSection:
    host: str = setting(host_name(), doc="the upstream MQTT broker")
    port: int | None = setting(integer(1, 65535), None, doc="default 8883 with tls, else 1883")
    tls: TlsSection | None = setting(optional(section(TlsSection)), None, doc="TLS with certificate verification")
    username: str | None = setting(optional(string(MQTT_TEXT, "no control character")), None, doc="MQTT user name")
    password_file: str | None = setting(optional(string()), None,
                                        doc="file holding the password (never inline), readable by the service")
    topic_prefix: str = setting(string(re.compile(r"^[^\x00-\x1f\x7f-\x9f]{1,512}$"),
                                       "a topic root of 512 characters at most, no control character"),
                                "edge/{site}/{gateway_id}", doc="the topic root")
    qos: int = setting(one_of(1, 2), 1, doc="QoS of stored messages")
    max_inflight: int = setting(integer(1, 65535), 100, doc="messages published and not yet acknowledged")
    keepalive: float = setting(duration(5, 3600), 30.0, doc="MQTT keepalive")
    client_id: str | None = setting(optional(string(MQTT_TEXT, "no control character")), None, doc="default: gateway.id")
    reconnect: ReconnectSection = setting(section(ReconnectSection), {}, doc="backoff after a lost connection")
    format: str = setting(one_of("json", "sparkplug_b"), "json", doc="json, or sparkplug_b (Sparkplug B 3.0)")
    sparkplug: SparkplugSection | None = setting(optional(section(SparkplugSection)), None,
                                                 doc="group, edge node and primary host, with sparkplug_b")

    @staticmethod
    def rules(v: Fields) -> list[Problem]:
        problems: list[Problem] = []
        prefix = v["topic_prefix"]
        if v.ok("topic_prefix"):
            if not _placeholders_only(prefix, ("site", "gateway_id")):
                problems.append(("topic_prefix", "expected a topic with only {site} and {gateway_id} placeholders, "
                                                 f'got "{prefix}"'))
            if any(c in prefix for c in "+#"):
                problems.append(("topic_prefix", f'expected no MQTT wildcards (+, #), got "{prefix}"'))
        if v.ok("username", "password_file") and v["password_file"] and not v["username"]:
            problems.append(("username", "required when password_file is given"))
        if v.ok("format", "sparkplug") and v["sparkplug"] is not None and v["format"] != "sparkplug_b":
            problems.append(("sparkplug", "only with format: sparkplug_b (the upstream format is json)"))
        return problems

    @property
    def effective_port(self) -> int:
        return self.port or (8883 if self.tls is not None else 1883)


@dataclass(frozen=True)
class OutboxSection:
    max_messages: int = setting(integer(1, 10**9), 1_000_000, doc="messages kept at most")
    max_bytes: int = setting(size, 512 * 1024**2, doc="payload bytes kept at most")
    max_age: float = setting(duration(1), 7 * 86400.0, doc="older messages are dropped")
    when_full: str = setting(one_of("drop_oldest", "drop_newest"), "drop_oldest", doc="which end gives way")
    sync: str = setting(one_of("normal", "full"), "normal", doc="SQLite synchronous: full survives power loss")
    group_commit: bool = setting(boolean, True, doc="commit as soon as a message is staged; false: one "
                                                    "commit every commit_interval (the earlier cadence)")
    max_commit_rate: float = setting(number(0, 10_000), 0.0, doc="commits per second at most, 0: no bound "
                                                                 "(flash wear; a message may wait 1/rate)")
    commit_interval: float = setting(duration(0.001, 1.0), 0.1, doc="state without a message (counter rows, "
                                                                    "acknowledged rows to delete) waits at most this")


@dataclass(frozen=True)
class LocalClientSection:
    """How the gateway itself logs in to the local broker to read `source: mqtt` devices."""
    username: str = setting(string(MQTT_TEXT, "no control character"), doc="the gateway's login on the local broker")
    password_file: str | None = setting(optional(string()), None, doc="file holding its password")


@dataclass(frozen=True)
class LocalBrokerSection:
    enabled: bool = setting(boolean, False, doc="run the broker inside the gateway (else its own service)")
    listen: str = setting(string(re.compile(r"^[^:\s]+:\d{1,5}$"), 'HOST:PORT such as "127.0.0.1:1883"'),
                          "127.0.0.1:1883", doc="where plant sensors connect")
    password_file: str | None = setting(optional(string()), None, doc="users, made with `edge-gateway broker-user`")
    allow_anonymous: bool = setting(boolean, False, doc="let clients in without a login")
    client: LocalClientSection | None = setting(optional(section(LocalClientSection)), None,
                                                doc="the gateway's own login")
    max_message_size: int = setting(size, 256 * 1024, doc="larger sensor messages are refused (by the embedded "
                                                          "broker, and by the gateway before parsing)")

    @staticmethod
    def rules(v: Fields) -> list[Problem]:
        if v.ok("listen") and (why := _unfit_host(v["listen"].rpartition(":")[0])) is not None:
            return [("listen", f"expected HOST:PORT with {why}, got {found(v['listen'])}")]
        if v.ok("max_message_size") and not 1024 <= v["max_message_size"] <= 256 * 1024**2:
            return [("max_message_size", f"expected a size from 1KiB to 256MiB, got {v['max_message_size']} bytes")]
        if v.ok("enabled", "allow_anonymous", "password_file") and v["enabled"] and not v["allow_anonymous"] \
                and not v["password_file"]:
            return [("password_file", "required when the embedded broker is enabled: it refuses anonymous "
                                      "clients (create users with `edge-gateway broker-user`), unless "
                                      "allow_anonymous: true is set")]
        return []

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host, int(port)


@dataclass(frozen=True)
class WebTlsSection:
    cert_file: str = setting(string(), doc="the page's certificate (PEM), with its chain")
    key_file: str = setting(string(), doc="its private key (PEM)")


@dataclass(frozen=True)
class WebSection:
    """The read-only status page, JSON API and /metrics (the [web] extra)."""
    listen: str = setting(string(re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^:\s\[\]]+):[0-9]{1,5}$"),
                                 'HOST:PORT such as "127.0.0.1:8470"'),
                          "127.0.0.1:8470", doc="where the page is served; loopback unless users_file is set")
    users_file: str | None = setting(optional(string()), None,
                                     doc="users (hashed passwords), made with `edge-gateway web-user`; required "
                                         "for a listen address other than loopback")
    tls: WebTlsSection | None = setting(optional(section(WebTlsSection)), None, doc="serve HTTPS")

    @staticmethod
    def rules(v: Fields) -> list[Problem]:
        if not v.ok("listen", "users_file"):
            return []
        host = v["listen"].rpartition(":")[0]
        port = int(v["listen"].rpartition(":")[2])
        if (why := _unfit_host(host)) is not None:
            return [("listen", f"expected HOST:PORT with {why}, got {found(v['listen'])}")]
        if not 1 <= port <= 65535:
            return [("listen", f"expected a port from 1 to 65535, got {port}")]
        if v["users_file"] is None and not loopback(host):
            return [("users_file", f"required when listen is not a loopback address (got {host}): anyone on the "
                                   "network could read the plant's data; create users with `edge-gateway "
                                   "web-user NAME --users FILE`, or listen on 127.0.0.1")]
        return []

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


def loopback(host: str) -> bool:
    """Whether HOST (a name or an address) only reaches this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ShiftSection:
    name: str = setting(string(), doc="the shift's name")
    start: str = setting(string(re.compile(r"^([01]\d|2[0-3]):[0-5]\d$"), 'a local time "HH:MM" such as "06:00"'),
                         doc="local start time; a shift ends where the next begins")


@dataclass(frozen=True)
class SerialSection:
    port: str = setting(string(), doc="e.g. /dev/ttyUSB0")
    baudrate: int = setting(one_of(1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200), 19200, doc="bits/s")
    parity: str = setting(one_of("N", "E", "O"), "E", doc="N, E or O")
    stopbits: int = setting(one_of(1, 2), 1, doc="1 or 2")
    bytesize: int = setting(one_of(7, 8), 8, doc="7 or 8")


@dataclass(frozen=True)
class RegisterSection:
    name: str = setting(string(TAG, "a tag name of letters, digits, _ . -"), doc="the tag")
    table: str = setting(one_of(*TABLES), "holding", doc="holding, input, coil or discrete")
    address: int = setting(integer(0, 65535), doc="0-based protocol address (40001 is holding 0)")
    # Unset (None in the YAML) means what the table implies: bool for coil and discrete, else uint16.
    type: str = setting(optional(one_of(*REGISTER_TYPES)), None,
                        doc="how the registers are read (default: bool for coil and discrete, else uint16)")
    word_order: str = setting(one_of("big", "little"), "big", doc="of multi-register values")
    byte_order: str = setting(one_of("big", "little"), "big", doc="in each register")
    bit: int | None = setting(optional(integer(0, 15)), None, doc="one bit of a 16-bit register")
    scale: float = setting(number(), 1.0, doc="value = raw × scale + offset")
    offset: float = setting(number(), 0.0, doc="value = raw × scale + offset")

    def __post_init__(self) -> None:
        if self.type is None:  # the table implies it
            object.__setattr__(self, "type", "bool" if self.table in ("coil", "discrete") else "uint16")

    @staticmethod
    def rules(v: Fields) -> list[Problem]:
        if not v.ok("table", "type", "bit"):
            return []
        bit_table = v["table"] in ("coil", "discrete")
        kind = v["type"] or ("bool" if bit_table else "uint16")
        if bit_table and kind != "bool":
            return [("type", f'expected bool (or nothing: the table implies it) for table {v["table"]}, '
                             f'got "{kind}"')]
        if v["bit"] is not None and (bit_table or kind not in ("uint16", "int16", "bool")):
            return [("bit", "only for a bit inside a 16-bit holding or input register")]
        if kind == "bool" and not bit_table and v["bit"] is None:
            return [("bit", "required for type bool in a holding or input register (0..15)")]
        return []


@dataclass(frozen=True)
class CounterSection:
    name: str = setting(string(TAG, "a counter name of letters, digits, _ . -"), doc="the counter")
    register: str = setting(string(), doc="the tag holding the raw PLC counter")
    bits: int | None = setting(optional(one_of(16, 32)), None,
                               doc="where the raw counter wraps (default: 16 on a 16-bit Modbus register, the "
                                   "simulated PLC's plc.counter_bits, else 32)")
    reset_threshold: float = setting(number(0.0001, 0.9999), 0.1,
                                     doc="a drop larger than this share of the range is a reset, not a wrap")
    kind: str = setting(one_of("total", "good", "defect"), "total", doc="its part in OEE quality")
    max_rate: float | None = setting(optional(number(0.000001, 1e9)), None,
                                     doc="counts per second the machine can make at most; a larger step is a "
                                         "new baseline, not counts (default: half the range at once)")


@dataclass(frozen=True)
class PublishSection:
    interval: float | None = setting(optional(duration(0.01, 86400)), None, doc="publish at most this often")
    on_change: bool = setting(boolean, False, doc="publish when a value moves beyond its deadband")
    deadband: dict[str, float] = setting(map_of(string(), number(0)), {}, doc="per tag, with on_change")
    max_silence: float = setting(duration(1, 86400), 60.0, doc="publish at least this often")

    @staticmethod
    def rules(v: Fields) -> list[Problem]:
        if v.ok("on_change", "interval") and v["on_change"] and v["interval"] is not None:
            return [("on_change", "choose either interval or on_change, not both")]
        if v.ok("on_change", "deadband") and v["deadband"] and not v["on_change"]:
            return [("deadband", "only applies with on_change: true")]
        return []


@dataclass(frozen=True)
class FaultSection:
    fault: str = setting(one_of(*PUMP_FAULTS), doc="what goes wrong")
    at: float = setting(duration(), 0.0, doc="simulated time it starts")
    severity: float = setting(number(0.01, 1.0), 1.0, doc="0.01 to 1")
    tag: str | None = setting(optional(string()), None, doc="the sensor, for stuck_sensor, spike and dropout")
    ramp: float = setting(duration(), 120.0, doc="time to full severity")
    # Named as in the YAML; the check is reached through the module so that the name shadows nothing.
    duration: float = setting(checks.duration(0.001), math.inf, doc="how long it lasts")


@dataclass(frozen=True)
class PlcSection:
    rate_per_min: float = setting(number(0, 100_000), 120.0, doc="pieces per minute at full speed")
    counter_bits: int = setting(one_of(16, 32), 32, doc="where the raw counters wrap")
    start_near_top: bool = setting(boolean, False, doc="raw counters start just below the wrap")
    reset_every: float | None = setting(optional(duration(1)), None, doc="reset the raw counters this often")


@dataclass(frozen=True)
class OeeSection:
    status_tag: str = setting(string(), doc="the tag holding the machine's state")
    states: dict[int, str] = setting(map_of(integer(), one_of(*MACHINE_STATES)),
                                     doc="status value → running, idle, down or planned_stop")
    ideal_rate: float | None = setting(optional(number(0.000001)), None, doc="pieces per minute at 100 %")
    reason_tag: str | None = setting(optional(string()), None, doc="the tag holding the stop reason code")
    reasons: dict[int, str] = setting(map_of(integer(-2**31, 2**32), string()), {}, doc="stop reason code → text")
    live_interval: float = setting(duration(1, 86400), 60.0, doc="how often the running shift's OEE is sent")

    @staticmethod
    def rules(v: Fields) -> list[Problem]:
        if v.ok("reason_tag", "reasons") and v["reason_tag"] and not v["reasons"]:
            return [("reasons", "required with reason_tag: the text of each stop reason code "
                                "(e.g. {11: web break, 12: ink change})")]
        return []


SEVERITIES = ("low", "medium", "high", "critical")
# An alarm without `clear` ends this share of its limit back from it: the 1-5 % of span that
# ISA-18.2 (and EEMUA 191) recommend, so that a value wavering at the limit does not chatter.
DEFAULT_DEADBAND = 0.02


@dataclass(frozen=True)
class AlarmSection:
    """A limit on a tag: raised above (or below) it, after `for`, cleared past `clear`."""
    name: str = setting(string(TAG, "an alarm name of letters, digits, _ . -"), doc="the alarm")
    tag: str = setting(string(), doc="the tag it watches")
    above: float | None = setting(optional(number()), None, doc="raised when the value is above this")
    below: float | None = setting(optional(number()), None, doc="raised when the value is below this")
    delay: float = setting(duration(0, 86400), 0.0, doc="the condition must hold this long (sample clock)",
                           key="for")
    clear: float | None = setting(optional(number()), None,
                                  doc="cleared only past this (hysteresis); default the limit ∓ 2 % of it (a deadband)")
    severity: str = setting(one_of(*SEVERITIES), "medium", doc="low, medium, high or critical")
    with_anomaly: bool = setting(boolean, False, doc="raised only while the device's anomaly event is active")

    @staticmethod
    def rules(v: Fields) -> list[Problem]:
        if not v.ok("above", "below", "clear"):
            return []
        above, below, clear = v["above"], v["below"], v["clear"]
        if (above is None) == (below is None):
            return [("above", "give exactly one of above or below")]
        if clear is not None and above is not None and clear > above:
            return [("clear", f"expected at most the limit (above: {above:g}): an alarm above a limit clears "
                              f"below it, got {clear:g}")]
        if clear is not None and below is not None and clear < below:
            return [("clear", f"expected at least the limit (below: {below:g}): an alarm below a limit clears "
                              f"above it, got {clear:g}")]
        return []

    @property
    def limit(self) -> float:
        return self.above if self.above is not None else float(self.below)  # type: ignore[arg-type]

    @property
    def clear_at(self) -> float:
        """Where the alarm ends: `clear`, else the limit less a deadband of 2 % of it (ISA-18.2 practice)."""
        if self.clear is not None:
            return self.clear
        band = DEFAULT_DEADBAND * abs(self.limit)
        return self.limit - band if self.above is not None else self.limit + band


@dataclass(frozen=True)
class HistorySection:
    """Raw samples kept on the box (data_dir/history.db) to train and check anomaly models."""
    keep: float = setting(duration(60, 3650 * 86400), 14 * 86400.0, doc="older samples are deleted")
    max_bytes: int = setting(size, 256 * 1024**2, doc="this device's samples take at most this much; oldest go first")


@dataclass(frozen=True)
class DeviceBase:
    """The keys every device takes."""
    name: str = setting(string(NAME, "up to 64 lowercase letters, digits, _ and - (e.g. pump1)"), doc="the device's name")
    source: str = setting(string(), doc="modbus_tcp, modbus_rtu, opcua, mqtt or sim")
    interval: float = setting(duration(0.01, 86400), 1.0, doc="time between samples")
    timeout: float = setting(duration(0.01, 600), 0.5, doc="one request's time limit")
    counters: tuple[CounterSection, ...] = setting(list_of(section(CounterSection)), [],
                                                   doc="exact cumulative counters")
    model: str | None = setting(optional(string(NAME, "a model name such as pump-ae")), None,
                                doc="the anomaly model scoring this device")
    publish: PublishSection = setting(section(PublishSection), {}, doc="when a sample becomes telemetry")
    oee: OeeSection | None = setting(optional(section(OeeSection)), None, doc="machine states for OEE")
    history: HistorySection | None = setting(optional(section(HistorySection)), None,
                                             doc="keep raw samples on the box (for `model train`)")
    alarms: tuple[AlarmSection, ...] = setting(list_of(section(AlarmSection)), [], doc="limit alarms on tags")

    SOURCE: ClassVar[str] = ""
    TYPES_AT_CONNECT: ClassVar[bool] = False  # its tags' types are learnt from the machine once connected

    @property
    def tags(self) -> tuple[str, ...]:
        """The tag names this device produces, in order."""
        return _tags(type(self), self.__dict__)

    @classmethod
    def rules(cls, v: Fields) -> list[Problem]:
        """Rules that tie a device's fields to its tags; they run on the part that parsed."""
        problems: list[Problem] = []
        tags = _tags(cls, v)
        for i, counter in enumerate(items(v["counters"])):
            register = part(counter, "register")
            if tags and register is not None and register not in tags:
                problems.append((f"counters[{i}].register", _one_of_tags(tags, register)))
        oee = v["oee"]
        status_tag = part(oee, "status_tag") if oee is not None else None
        if tags and status_tag is not None and status_tag not in tags:
            problems.append(("oee.status_tag", _one_of_tags(tags, status_tag)))
        reason_tag = part(oee, "reason_tag") if oee is not None else None
        if tags and reason_tag is not None and reason_tag not in tags:
            problems.append(("oee.reason_tag", _one_of_tags(tags, reason_tag)))
        problems += _duplicate_names(items(v["alarms"]), "alarms", "alarm")
        for i, alarm in enumerate(items(v["alarms"])):
            tag = part(alarm, "tag")
            if tags and tag is not None and tag not in tags:
                problems.append((f"alarms[{i}].tag", _one_of_tags(tags, tag)))
            if part(alarm, "with_anomaly") and v["model"] is None and v.ok("model"):
                problems.append((f"alarms[{i}].with_anomaly", "needs an anomaly model on this device (model:)"))
        deadband = part(v["publish"], "deadband")
        for tag in deadband if isinstance(deadband, Mapping) else ():
            if tags and tag not in tags:
                problems.append((f"publish.deadband.{tag}", f"expected one of this device's tags ({', '.join(tags)})"))
        return problems


def _duplicate_names(entries: tuple[Any, ...], field: str, what: str) -> list[Problem]:
    """`{field}[i].name` for each entry whose name an earlier entry already has."""
    problems: list[Problem] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        name = part(entry, "name")
        if name is not None and name in seen:
            problems.append((f"{field}[{i}].name", f'duplicate {what} name "{name}"'))
        if name is not None:
            seen.add(name)
    return problems


def _placeholders_only(text: str, names: tuple[str, ...]) -> bool:
    """Whether `text` formats with exactly these bare placeholders: no `{site.x}`, `{0}`, `{site!r:>9}`."""
    try:
        return all(name is None or (name in names and not spec and not conversion)
                   for _, name, spec, conversion in Formatter().parse(text))
    except ValueError:  # an unmatched brace
        return False


def _tags(cls: type, v: Any) -> tuple[str, ...]:
    """The tags of a device of class `cls` from its (possibly partial) fields."""
    if cls is SimDevice:
        return SIM_PROFILES.get(v.get("profile") or "", ())
    if cls is MqttDevice:
        return tuple(v.get("fields") or {})
    if isinstance(cls, type) and issubclass(cls, ModbusDevice):
        return tuple(n for r in items(v.get("registers")) if (n := part(r, "name")) is not None)
    if cls is OpcUaDevice:
        return tuple(n for r in items(v.get("nodes")) if (n := part(r, "name")) is not None)
    return ()


def _register_rules(v: Fields) -> list[Problem]:
    regs = items(v["registers"])
    problems = _duplicate_names(regs, "registers", "tag")
    placed = [(i, r) for i, r in enumerate(regs) if isinstance(r, RegisterSection)]
    for i, reg in placed:
        first, last = _span(reg)
        if last > 65535:
            problems.append((f"registers[{i}].address", f"a {reg.type} at {reg.address} takes {last - first + 1} "
                                                        "registers and runs past the last address (65535)"))
        for j, other in placed[:placed.index((i, reg))]:
            if _overlap(reg, other):
                problems.append((f"registers[{i}].address",
                                 f"{reg.table} {first}..{last} ({reg.name}, {reg.type}) overlaps {other.name} "
                                 f"({other.type} at {other.address}, registers[{j}]); only bits of one register "
                                 "(bit:) may share it"))
    return problems


def counter_bits(device: DeviceBase, counter: CounterSection) -> int:
    """Where a counter's raw value wraps: its `bits`, else its register's width (16 for a 16-bit Modbus register, the
    simulated PLC's `counter_bits`, else 32). With 32 on a 16-bit register, each wrap was taken for a reset and its counts lost."""
    if counter.bits is not None:
        return counter.bits
    plc = getattr(device, "plc", None)  # the simulated line's PLC: its counters wrap where it says
    if plc is not None:
        return int(plc.counter_bits)
    for reg in getattr(device, "registers", ()):
        if reg.name == counter.register and reg.type in ("uint16", "int16") and reg.bit is None:
            return 16
    return 32


def _counter_widths(v: Fields) -> list[Problem]:
    """A counter given 32 bits on a 16-bit register took its wrap at 65535 for a reset and lost the counts at
    every wrap: a counter's bits must not exceed its register's."""
    regs = {r.name: r for r in items(v["registers"]) if isinstance(r, RegisterSection)}
    problems: list[Problem] = []
    for i, counter in enumerate(items(v["counters"])):
        reg = regs.get(part(counter, "register"))
        bits = part(counter, "bits")
        if reg is not None and reg.type in ("uint16", "int16") and reg.bit is None and isinstance(bits, int) \
                and bits > 16:
            problems.append((f"counters[{i}].bits", f"expected 16 (or no bits: the register's width): its "
                                                    f"register {reg.name} is a {reg.type} of 16 bits; at {bits} each "
                                                    f"of its wraps would be taken for a reset and its counts lost"))
    return problems


def _span(reg: RegisterSection) -> tuple[int, int]:
    """The first and last address a register entry reads."""
    return reg.address, reg.address + (1 if reg.table in ("coil", "discrete") else WIDTH[reg.type]) - 1


def _overlap(a: RegisterSection, b: RegisterSection) -> bool:
    """Whether two entries read the same address, other than as distinct bits of one register."""
    if a.table != b.table:
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    if a1 < b0 or b1 < a0:
        return False
    if a.bit is not None and b.bit is not None:
        return a.bit == b.bit  # the same bit under two names
    return a.bit is None and b.bit is None  # a bit of a register that another tag reads whole is fine


@dataclass(frozen=True)
class ModbusDevice(DeviceBase):
    """What Modbus TCP and RTU devices share: a unit id and a register map."""
    unit: int | None = setting(optional(integer(0, 255)), None, doc="unit (slave) id, default 1")
    registers: tuple[RegisterSection, ...] = setting(list_of(section(RegisterSection)), doc="the register map")
    max_gap: int | None = setting(optional(integer(0, 124)), None,
                                  doc="unused registers a read may span to join two (default 10)")
    max_registers_per_read: int | None = setting(optional(integer(1, 125)), None, doc="for PLCs that take fewer")

    @classmethod
    def rules(cls, v: Fields) -> list[Problem]:
        return _register_rules(v) + _counter_widths(v) + super().rules(v)


@dataclass(frozen=True)
class ModbusTcpDevice(ModbusDevice):
    host: str = setting(host_name(), doc="the PLC or Modbus gateway")
    port: int | None = setting(optional(integer(1, 65535)), None, doc="default 502")

    SOURCE: ClassVar[str] = "modbus_tcp"


@dataclass(frozen=True)
class ModbusRtuDevice(ModbusDevice):
    serial: SerialSection = setting(section(SerialSection), doc="the serial line")

    SOURCE: ClassVar[str] = "modbus_rtu"


@dataclass(frozen=True)
class MqttDevice(DeviceBase):
    topic: str = setting(string(TOPIC_FILTER, "an MQTT topic filter: + alone in a level, # alone in the last "
                                              "(e.g. plant/+/state)"),
                         doc="the sensor's topic on the local broker (wildcards allowed)")
    fields: dict[str, str] = setting(map_of(string(TAG, "a tag name"), string()), doc="tag: JSON field (dotted path)")
    timestamp_field: str | None = setting(optional(string()), None,
                                          doc="JSON field with the sample time (epoch s/ms or RFC 3339); taken when at most a "
                                              "day before the message arrived and a minute (or 3 intervals) after, "
                                              "never before the device's last sample")

    SOURCE: ClassVar[str] = "mqtt"


NODE_ID = re.compile(r"^(ns=\d+;)?(i=\d+|s=.+|g=[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}|"
                     r"b=[A-Za-z0-9+/]+=*)$")


@dataclass(frozen=True)
class OpcUaNodeSection:
    name: str = setting(string(TAG, "a tag name of letters, digits, _ . -"), doc="the tag")
    node: str = setting(string(NODE_ID, 'an OPC UA node id such as "ns=2;s=Press1.MotorRPM" or "ns=2;i=1005"'),
                        doc="the variable's node id")


@dataclass(frozen=True)
class OpcUaSecuritySection:
    policy: str = setting(one_of("Basic256Sha256", "Aes128Sha256RsaOaep", "Aes256Sha256RsaPss"),
                          doc="the security policy")
    mode: str = setting(one_of("Sign", "SignAndEncrypt"), "SignAndEncrypt", doc="Sign or SignAndEncrypt")
    cert_file: str = setting(string(), doc="the gateway's certificate (PEM or DER)")
    key_file: str = setting(string(), doc="its private key")
    server_cert_file: str | None = setting(optional(string()), None,
                                           doc="the server's certificate, pinned (else the trust store decides)")
    pki_dir: str | None = setting(optional(string()), None,
                                  doc="the trust store: trusted/ and rejected/ server certificates "
                                      "(default: <data_dir>/pki)")


def _security(value: Any, path: str, problems: Problems) -> Any:
    """`security:` a mapping, or `none` (as no `security:`: a session without signing or encryption)."""
    if value is None or value == "none":
        return None
    if not isinstance(value, dict):
        problems.add(path, f"expected none or a mapping (policy, mode, cert_file, key_file), got {found(value)}")
        return Invalid()
    return section(OpcUaSecuritySection)(value, path, problems)


@dataclass(frozen=True)
class OpcUaDevice(DeviceBase):
    endpoint: str = setting(string(re.compile(r"^opc\.tcp://[^/\s:]+(:\d{1,5})?(/\S*)?$"),
                                   'an endpoint such as "opc.tcp://192.0.2.20:4840"'), doc="the server")
    mode: str = setting(one_of("subscribe", "poll"), "subscribe", doc="subscribe (default) or poll")
    security: OpcUaSecuritySection | None = setting(_security, None,
                                                    doc="none (the default, logged at start) or a policy, "
                                                        "mode and certificates")
    username: str | None = setting(optional(string()), None, doc="with password_file")
    password_file: str | None = setting(optional(string()), None, doc="the password, never inline")
    nodes: tuple[OpcUaNodeSection, ...] = setting(list_of(section(OpcUaNodeSection)), doc="tag: node id")

    SOURCE: ClassVar[str] = "opcua"
    TYPES_AT_CONNECT: ClassVar[bool] = True  # each node's DataType

    @classmethod
    def rules(cls, v: Fields) -> list[Problem]:
        problems = _duplicate_names(items(v["nodes"]), "nodes", "tag")
        if v.ok("endpoint") and (why := _unfit_host(v["endpoint"][len("opc.tcp://"):].split("/")[0].split(":")[0])):
            problems.append(("endpoint", f"expected an endpoint whose host is {why}, got {found(v['endpoint'])}"))
        if v.ok("username", "password_file") and bool(v["username"]) != bool(v["password_file"]):
            problems.append(("password_file" if v["username"] else "username",
                             "username and password_file go together"))
        return problems + super().rules(v)


@dataclass(frozen=True)
class SimDevice(DeviceBase):
    profile: str = setting(one_of(*SIM_PROFILES), doc="pump or flexo_line")
    seed: int | None = setting(optional(integer(0, 2**31)), None, doc="the same seed gives the same series")
    faults: tuple[FaultSection, ...] = setting(list_of(section(FaultSection)), [], doc="pump faults to inject")
    plc: PlcSection | None = setting(optional(section(PlcSection)), None, doc="the flexo line's PLC counters")
    time_scale: float | None = setting(optional(number(0.01, 1000)), None, doc="simulated seconds per real second")

    SOURCE: ClassVar[str] = "sim"

    @classmethod
    def rules(cls, v: Fields) -> list[Problem]:
        problems = super().rules(v)
        tags = _tags(cls, v)
        for i, fault in enumerate(items(v["faults"])):
            if v["profile"] != "pump":
                if v.ok("profile"):
                    problems.append((f"faults[{i}]", "faults can be injected into the pump profile only"))
            elif part(fault, "fault") in ("stuck_sensor", "spike", "dropout") and part(fault, "tag") not in tags:
                problems.append((f"faults[{i}].tag", f"expected one of the pump's tags ({', '.join(tags)}), "
                                                     f"got {found(part(fault, 'tag'))}"))
        if v["plc"] is not None and v.ok("profile") and v["profile"] != "flexo_line":
            problems.append(("plc", "only the flexo_line profile has PLC counters"))
        return problems


Device = Union[ModbusTcpDevice, ModbusRtuDevice, MqttDevice, OpcUaDevice, SimDevice]
DEVICE_CLASSES: dict[str, type[DeviceBase]] = {c.SOURCE: c for c in (ModbusTcpDevice, ModbusRtuDevice, MqttDevice,
                                                                       OpcUaDevice, SimDevice)}


def device(node: Any, path: str, problems: Problems) -> Any:
    """One `devices[]` entry: the class its `source` names; a key of another source is refused by name."""
    source = node.get("source") if isinstance(node, dict) else None
    cls = DEVICE_CLASSES.get(source) if isinstance(source, str) else None
    if cls is None:
        if not isinstance(node, dict):
            problems.add(path, f"expected a mapping, got {found(node)}")
            return Invalid()
        if "source" not in node:
            problems.add(f"{path}.source", "required, but missing")
        else:
            problems.add(f"{path}.source", f"expected one of {', '.join(DEVICE_CLASSES)}, got {found(source)}")
        # The keys every device takes are still checked; the rest cannot be judged without a source.
        common = settings(DeviceBase)
        sub = Problems()
        load_section(DeviceBase, {k: v for k, v in node.items() if k in common and k != "source"} | {"source": "?"},
                     path, sub)
        problems.items.extend(sub.items)
        return Invalid({"name": node.get("name")})
    own = settings(cls)
    takes = ", ".join(sorted(set(own) - set(settings(DeviceBase))))
    # An empty key of another source (`registers: []` on an mqtt device) sets nothing: tolerated, as always.
    node = {k: v for k, v in node.items() if k in own or v not in (None, [], {})}

    def elsewhere(key: str) -> str | None:
        if any(key in settings(other) for other in DEVICE_CLASSES.values()):
            return f"not used by source {source} (it takes: {takes})"
        return None
    common = settings(DeviceBase)
    return load_section(cls, node, path, problems, elsewhere,
                        required_for=lambda key: "" if key in common else f" for source {source}")


@dataclass(frozen=True)
class Config:
    gateway: GatewaySection = setting(section(GatewaySection), doc="who and where this gateway is")
    upstream: UpstreamSection = setting(section(UpstreamSection), doc="the MQTT broker results go to")
    outbox: OutboxSection = setting(section(OutboxSection), {}, doc="the durable store-and-forward queue")
    local_broker: LocalBrokerSection = setting(section(LocalBrokerSection), {}, doc="the broker for plant sensors")
    shifts: tuple[ShiftSection, ...] = setting(list_of(section(ShiftSection)), [], doc="shift start times")
    devices: tuple[Device, ...] = setting(list_of(device), doc="the machines read")
    web: WebSection | None = setting(optional(section(WebSection)), None,
                                     doc="the read-only status page, API and /metrics (`web: {}` for the defaults)")

    @staticmethod
    def rules(v: Fields) -> list[Problem]:
        problems = _duplicate_names(items(v["devices"]), "devices", "device")
        starts: list[str] = []
        for i, shift in enumerate(items(v["shifts"])):
            start = part(shift, "start")
            if start is not None and start in starts:
                problems.append((f"shifts[{i}].start", f'two shifts start at "{start}"'))
            starts.append(start)
        if part(v["upstream"], "format") == "sparkplug_b":
            for i, dev in enumerate(items(v["devices"])):
                # Sparkplug declares a device's machine state as the metric State: a tag of that name beside it
                # would be two metrics of one name in its DBIRTH (tags cannot hold the other metrics' "/")
                if part(dev, "oee") is not None and "State" in (getattr(dev, "tags", None) or ()):
                    problems.append((f"devices[{i}].oee", 'a tag named "State" beside oee: with sparkplug_b, State is '
                                                          "the machine state's metric; rename the tag"))
        return problems

    @property
    def topic_root(self) -> str:
        return self.upstream.topic_prefix.format(site=self.gateway.site, gateway_id=self.gateway.id)


def validate(node: Any, problems: Problems) -> Any:
    """The Config for a YAML document, or an Invalid; every problem is added to `problems`."""
    return load_section(Config, node, "", problems)
