"""The YAML contract through the real CLI: good files load, bad files exit 78 naming every problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway import config
from tests.helpers import ENV, ROOT

BASE = """\
gateway: {id: line3-gw1, site: plant-a, data_dir: /tmp/edge-gw-test, timezone: Europe/Berlin}
upstream: {host: mqtt.example.com, port: 8883, qos: 1, max_inflight: 100}
outbox: {max_messages: 1000000, max_bytes: 512MiB, max_age: 7d, when_full: drop_oldest, sync: normal}
shifts: [{name: A, start: "06:00"}, {name: B, start: "14:00"}, {name: C, start: "22:00"}]
devices:
  - {name: pump1, source: sim, profile: pump, seed: 1, interval: 1s, publish: {interval: 1s}}
  - name: line1
    source: sim
    profile: flexo_line
    seed: 2
    plc: {counter_bits: 16, start_near_top: true}
    counters: [{name: produced, register: produced_raw, bits: 16}]
    publish: {on_change: true, deadband: {line_speed_m_min: 0.5}}
"""

MODBUS = """\
  - name: pump2
    source: modbus_tcp
    host: 192.0.2.10
    registers:
      - {name: motor_rpm, table: holding, address: 0, type: uint16}
      - {name: bearing_temp_c, table: holding, address: 1, type: %s, scale: 0.1}
"""


def check(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return subprocess.run([sys.executable, "-m", "gateway", "check-config", str(path)], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=60)


def line_of(text: str, snippet: str) -> int:
    """The 1-based line of the file on which the last `snippet` starts."""
    return text[:text.rindex(snippet)].count("\n") + 1


def test_the_examples_are_valid(tmp_path):
    result = check(tmp_path, BASE)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
    for example in sorted((ROOT / "examples").glob("*.yaml")):
        cfg = config.load(str(example))
        assert cfg.devices


def test_defaults_and_units():
    cfg = config.parse(BASE)
    assert cfg.outbox.max_bytes == 512 * 1024**2
    assert cfg.outbox.max_age == 7 * 86400
    assert cfg.outbox.commit_interval == 0.1
    assert cfg.topic_root == "edge/plant-a/line3-gw1"
    assert cfg.upstream.effective_port == 8883
    assert cfg.devices[1].publish.deadband == {"line_speed_m_min": 0.5}
    assert cfg.devices[0].tags[0] == "motor_rpm"


BAD = [
    # (what to change in BASE, the exact message expected)
    ("  - {name: pump1, source: sim, profile: pump, seed: 1, interval: 1s, publish: {interval: 1s}}\n",
     "  - {name: pump1, source: sim, profile: pump, seed: 1, intervall: 1s}\n",
     'devices[0].intervall: unknown key (did you mean "interval"?)'),
    ("interval: 1s, publish", "interval: 1 sec, publish",
     'devices[0].interval: expected a duration such as "250ms", "10s", "5m", "2h", "7d", got "1 sec"'),
    ("max_bytes: 512MiB", "max_bytes: lots", 'outbox.max_bytes: expected a size such as "512MiB", "10MB" or a '
                                             'number of bytes up to 1PiB, got "lots"'),
    ("when_full: drop_oldest", "when_full: drop_all",
     'outbox.when_full: expected one of drop_oldest, drop_newest, got "drop_all"'),
    ("id: line3-gw1", "id: Line 3", 'gateway.id: expected up to 64 lowercase letters, digits, _ and - (e.g. line3-gw1), '
                                    'got "Line 3"'),
    ("timezone: Europe/Berlin", "timezone: Europe/Springfield",
     'gateway.timezone: expected an IANA time zone such as "Europe/Berlin", got "Europe/Springfield"'),
    ("port: 8883", "port: 70000", "upstream.port: expected an integer from 1 to 65535, got 70000"),
    ('start: "14:00"', 'start: "25:00"', 'shifts[1].start: expected a local time "HH:MM" such as "06:00", got "25:00"'),
    ("register: produced_raw", "register: producd_raw",
     'devices[1].counters[0].register: expected one of this device\'s tags (machine_status, line_speed_m_min, '
     'web_tension_n, dryer_temp_c, ink_viscosity_s, produced_raw, defects_raw, stop_reason), got "producd_raw"'),
    ("bits: 16}]", "bits: 24}]", "devices[1].counters[0].bits: expected one of 16, 32, got 24"),
    ("name: line1", "name: pump1", 'devices[1].name: duplicate device name "pump1"'),
    ("profile: pump,", "profile: boiler,", 'devices[0].profile: expected one of pump, flexo_line, got "boiler"'),
    ("upstream: {host: mqtt.example.com, ", "upstream: {", "upstream.host: required, but missing"),
    ("qos: 1", "qos: 0", "upstream.qos: expected one of 1, 2, got 0"),
    ("    publish: {on_change: true,", "    oee: {status_tag: machine_status, states: {x1: running}}\n"
                                     "    publish: {on_change: true,",  # was a traceback: TypeError, unhashable
     'devices[1].oee.states.x1: expected an integer, got "x1"'),
    # Attack passes: each passed check-config, then failed the daemon (exit 70 at the first publish or CONNECT, for
    # ever under systemd; a broker closing every connection; a traceback), or check-config itself.
    ("qos: 1", "qos: 1.0", "upstream.qos: expected one of 1, 2, got 1.0"),
    ("bits: 16}]", "bits: 16.0}]", "devices[1].counters[0].bits: expected one of 16, 32, got 16.0"),
    ("qos: 1,", 'qos: 1, client_id: "gw\\0one",',
     'upstream.client_id: expected text without NUL characters, got "gw\\x00one"'),
    ("qos: 1,", 'qos: 1, topic_prefix: "edge/\\ud800/{site}",',
     'upstream.topic_prefix: expected text that is UTF-8 (a lone surrogate such as \\ud800 is not), got '
     '"edge/\\ud800/{site}"'),
    ("qos: 1,", f"qos: 1, username: {'u' * 70_000},",
     f'upstream.username: expected text of at most 65535 bytes, got "{"u" * 40}…" (70000 characters)'),
]


@pytest.mark.parametrize("old,new,message", BAD, ids=[b[2].split(":")[0] for b in BAD])
def test_a_bad_file_exits_78_and_names_the_path(tmp_path, old, new, message):
    assert old in BASE
    text = BASE.replace(old, new)
    result = check(tmp_path, text)
    assert result.returncode == 78
    line = line_of(text, new.strip())
    assert f"{tmp_path / 'gateway.yaml'}:{line}: {message}" in result.stderr.splitlines(), result.stderr
    assert "Traceback" not in result.stderr


def test_every_problem_is_reported_at_once(tmp_path):
    text = BASE + MODBUS % "unit16"
    text = text.replace("when_full: drop_oldest", "when_full: drop_all").replace("seed: 1,", "sede: 1,")
    result = check(tmp_path, text)
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    file = tmp_path / "gateway.yaml"
    assert f'{file}:{line_of(text, "type: unit16")}: devices[2].registers[1].type: expected one of uint16, int16, ' \
           f'uint32, int32, float32, float64, bool, got "unit16"' in lines
    assert f'{file}:3: outbox.when_full: expected one of drop_oldest, drop_newest, got "drop_all"' in lines
    assert f'{file}:6: devices[0].sede: unknown key (did you mean "seed"?)' in lines
    assert len(lines) == 3


def test_checks_that_tie_fields_together_run_beside_a_broken_field():
    """A misspelled counter register is reported even when the same device has a type typo elsewhere."""
    text = BASE.replace("register: produced_raw", "register: producd_raw").replace("bits: 16}]", "bits: 16}]\n"
                                                                                   "    interval: soon")
    with pytest.raises(config.ConfigError) as caught:
        config.parse(text, "g.yaml")
    paths = [path for path, _ in caught.value.problems]
    assert paths == ["devices[1].interval", "devices[1].counters[0].register"], caught.value


def test_any_bytes_give_a_config_error_never_a_traceback():
    for data in (b"\xff\xfe\x00garbage", b"gateway: {id: \x80}", b"[" * 10_000, b"a: &a [*a]",
                 b"devices: !!python/object:os.system {}", b"- just\n- a list", b"", b"\t:\t",
                 BASE.encode().replace(b"sim", b"s\xc3\x28m")):
        with pytest.raises(config.ConfigError) as caught:
            config.parse(data, "g.yaml")
        assert str(caught.value).startswith("g.yaml"), (data[:20], str(caught.value))


def test_a_control_character_is_said_at_its_line():
    """An attack pass: a NUL in the file was "not valid YAML: unacceptable character #x0000 ... position 16", naming
    no line."""
    with pytest.raises(config.ConfigError) as caught:
        config.parse(b"gateway: {id: gw1,\n  site: pl\x00ant}\n", "g.yaml")
    assert str(caught.value) == ("g.yaml: line 2, column 11: not valid YAML: the character \\x00 is not allowed (no "
                                 "control character but tab and line ends)")


def test_a_key_given_twice_is_an_error():
    with pytest.raises(config.ConfigError) as caught:
        config.parse(BASE.replace("upstream: {host: mqtt.example.com,", "upstream: {host: a, host: mqtt.example.com,"))
    assert str(caught.value) == "<config>:2: upstream.host: this key is given twice in one mapping; the first " \
                                "would be ignored"


def test_mqtt_device_keys_are_checked(tmp_path):
    mqtt = "  - {name: sensor1, source: mqtt, topic: sensors/1, fields: {temp_c: t}, registers: []}\n"
    assert check(tmp_path, BASE + mqtt).returncode == 0
    result = check(tmp_path, BASE + "  - {name: sensor1, source: mqtt, fields: {temp_c: t}, host: x}\n")
    assert result.returncode == 78
    assert "devices[2].host: not used by source mqtt (it takes: fields, timestamp_field, topic)" in result.stderr
    assert "devices[2].topic: required for source mqtt, but missing" in result.stderr


@pytest.mark.parametrize("snippet,expected", [
    # paho raised ValueError in on_connect at every attempt, and no mqtt device got a message.
    ("topic: plant/#/x", 'topic: expected an MQTT topic filter: + alone in a level, # alone in the last '
                         '(e.g. plant/+/state), got "plant/#/x"'),
    ("topic: plant/a+/x", "topic: expected an MQTT topic filter"),
    ("topic: plant/+/state", None),
    ("topic: '#'", None),
    # A topic beyond MQTT's 65,535 bytes: the uplink raised at every start (a crash loop), its message waiting.
    ("name: " + "s" * 65, "name: expected up to 64 lowercase letters, digits, _ and - (e.g. pump1)"),
])
def test_what_mqtt_cannot_carry_is_a_config_error(snippet, expected):
    text = BASE + "  - {name: sensor1, source: mqtt, topic: sensors/1, fields: {temp_c: t}}\n"
    key = snippet.split(":")[0]
    text = text.replace(f"{key}: sensor1" if key == "name" else "topic: sensors/1", snippet)
    if expected is None:
        config.parse(text)
        return
    with pytest.raises(config.ConfigError) as err:
        config.parse(text)
    assert f"devices[2].{expected}" in str(err.value)


def test_a_counter_on_a_16_bit_register_wraps_at_16_bits_and_32_is_refused():
    """A fuzzing pass: `counters: [{register: <a uint16>}]` took 32 bits, so the PLC's wrap from 65533 to 2 was
    taken for a reset, and 5 counts became 2. Without `bits` it is now the register's width; 32 is refused."""
    counter = "    counters: [{name: made, register: motor_rpm%s}]\n"
    device = config.parse(BASE + MODBUS % "int16" + counter % "").devices[2]
    assert config.counter_bits(device, device.counters[0]) == 16
    assert config.counter_bits(config.parse(BASE).devices[1], config.parse(BASE).devices[1].counters[0]) == 16
    with pytest.raises(config.ConfigError) as err:
        config.parse(BASE + MODBUS % "int16" + counter % ", bits: 32")
    assert ("devices[2].counters[0].bits: expected 16 (or no bits: the register's width): its register motor_rpm is "
            "a uint16 of 16 bits; at 32 each of its wraps would be taken for a reset and its counts lost"
            ) in str(err.value)


def test_keys_of_another_source_are_refused(tmp_path):
    result = check(tmp_path, BASE.replace("profile: pump, seed: 1,", "profile: pump, host: plc1,"))
    assert result.returncode == 78
    assert "devices[0].host: not used by source sim (it takes: faults, plc, profile, seed, time_scale)" in result.stderr


def test_yaml_syntax_error_and_missing_file(tmp_path):
    result = check(tmp_path, "gateway: {id: x\n  site: [\n")
    assert result.returncode == 78
    assert "not valid YAML" in result.stderr and "line " in result.stderr
    missing = subprocess.run([sys.executable, "-m", "gateway", "run", "-c", str(tmp_path / "nope.yaml")],
                             capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60)
    assert missing.returncode == 78
    assert f"{tmp_path / 'nope.yaml'}: cannot read the file: No such file or directory" in missing.stderr


def test_usage_error_exits_64():
    result = subprocess.run([sys.executable, "-m", "gateway", "frobnicate"], capture_output=True, env=ENV,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 64


def test_secret_files_must_exist(tmp_path):
    text = BASE.replace("qos: 1,", f"qos: 1, username: gw, password_file: {tmp_path}/missing.pass,")
    result = check(tmp_path, text)
    assert result.returncode == 78
    # Found by preflight, after parsing, and still reported at its line.
    assert f'gateway.yaml:2: upstream.password_file: expected a readable file, got "{tmp_path}/missing.pass"' \
        in result.stderr


def test_every_config_key_is_documented_as_the_schema_says():
    from gateway.config import reference

    doc = (ROOT / "docs" / "configuration.md").read_text()
    begin, end = doc.index(reference.BEGIN), doc.index(reference.END) + len(reference.END)
    assert doc[begin:end] + "\n" == reference.reference(), \
        "docs/configuration.md is out of date: paste the output of `python -m gateway.config.reference`"


def test_registers_that_read_the_same_address_are_refused_unless_bits_of_one_register(tmp_path):
    regs = """
      - {name: total, address: 0, type: uint32}
      - {name: speed, address: 1, type: uint16}
      - {name: energy, address: 0, type: float64}
      - {name: status, address: 10, type: uint16}
      - {name: running, address: 10, type: bool, bit: 0}
      - {name: fault, address: 10, type: bool, bit: 1}
      - {name: alarm, address: 10, type: bool, bit: 1}
      - {name: temp, table: input, address: 1, type: int16}
      - {name: last, address: 65535, type: uint32}
"""
    text = BASE + MODBUS.split("    registers:")[0] + "    registers:" + regs
    with pytest.raises(config.ConfigError) as caught:
        config.parse(text, "g.yaml")
    messages = str(caught.value).splitlines()
    assert messages == [
        f"g.yaml:{line_of(text, '{name: speed')}: devices[2].registers[1].address: holding 1..1 (speed, uint16) "
        "overlaps total (uint32 at 0, registers[0]); only bits of one register (bit:) may share it",
        f"g.yaml:{line_of(text, '{name: energy')}: devices[2].registers[2].address: holding 0..3 (energy, float64) "
        "overlaps total (uint32 at 0, registers[0]); only bits of one register (bit:) may share it",
        f"g.yaml:{line_of(text, '{name: energy')}: devices[2].registers[2].address: holding 0..3 (energy, float64) "
        "overlaps speed (uint16 at 1, registers[1]); only bits of one register (bit:) may share it",
        f"g.yaml:{line_of(text, '{name: alarm')}: devices[2].registers[6].address: holding 10..10 (alarm, bool) "
        "overlaps fault (bool at 10, registers[5]); only bits of one register (bit:) may share it",
        f"g.yaml:{line_of(text, '{name: last')}: devices[2].registers[8].address: a uint32 at 65535 takes 2 "
        "registers and runs past the last address (65535)",
    ]


def test_sparkplug_settings_only_with_the_sparkplug_format():
    group = "expected up to 64 characters, no / + # or control character, and not STATE"
    for value, expected in (("{group_id: a/b}", f'upstream.sparkplug.group_id: {group}, got "a/b"'),
                            # an attack pass: mosquitto closed every CONNECT whose Will held a tab; a group STATE
                            # published into the primary host's namespace
                            ('{group_id: "a\\tb"}', f'upstream.sparkplug.group_id: {group}, got "a\\x09b"'),
                            ("{group_id: STATE}", f'upstream.sparkplug.group_id: {group}, got "STATE"'),
                            ('{edge_node_id: "x\\u0085"}', "upstream.sparkplug.edge_node_id: expected up to 64 "
                                                           'characters, no / + # or control character, got "x\\x85"'),
                            ("{group_id: plant-a}", "upstream.sparkplug: only with format: sparkplug_b (the upstream "
                                                    "format is json)")):
        with pytest.raises(config.ConfigError) as caught:
            config.parse(BASE.replace("max_inflight: 100}", f"max_inflight: 100, sparkplug: {value}}}"), "g.yaml")
        assert str(caught.value) == f"g.yaml:2: {expected}"
    cfg = config.parse(BASE.replace("max_inflight: 100}", "max_inflight: 100, format: sparkplug_b, "
                                    "sparkplug: {primary_host_id: scada-1, group_id: STATEs}}"))
    assert cfg.upstream.format == "sparkplug_b" and cfg.upstream.sparkplug.primary_host_id == "scada-1"


def test_text_mqtt_carries_holds_no_control_character():
    """An attack pass: a tab in a topic, client id or user name makes mosquitto close the connection that sends it,
    for ever (MQTT 1.5.3): a config error, not an uplink that never delivers."""
    for field, value in (("topic_prefix", '"edge/a\\tb"'), ("client_id", '"gw\\x7f"'), ("username", '"u\\nv"')):
        with pytest.raises(config.ConfigError) as caught:
            config.parse(BASE.replace("max_inflight: 100}", f"max_inflight: 100, {field}: {value}}}"), "g.yaml")
        assert str(caught.value).startswith(f"g.yaml:2: upstream.{field}: expected ") and "control character" in \
            str(caught.value), str(caught.value)


def test_check_config_reports_a_bad_node_id_and_a_missing_certificate_at_once(tmp_path, capsys):
    """The files are checked on the document even when the schema refused it (they were only once it passed)."""
    from gateway.cli import main

    text = BASE.replace("devices:\n", """devices:
  - name: press1
    source: opcua
    endpoint: opc.tcp://192.0.2.20:4840
    security: {policy: Basic256Sha256, cert_file: /nonexistent/gw.der, key_file: /nonexistent/gw.pem}
    nodes:
      - {name: speed, node: "ns=2;x=Press1.Speed"}
""", 1)
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    assert main(["check-config", str(path)]) == 78
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"{path}:{line_of(text, 'security:')}: devices[0].security.cert_file: expected a readable file, got "
        '"/nonexistent/gw.der" (missing or not readable)',
        f"{path}:{line_of(text, 'security:')}: devices[0].security.key_file: expected a readable file, got "
        '"/nonexistent/gw.pem" (missing or not readable)',
        f"{path}:{line_of(text, 'ns=2;x=')}: devices[0].nodes[0].node: expected an OPC UA node id such as "
        '"ns=2;s=Press1.MotorRPM" or "ns=2;i=1005", got "ns=2;x=Press1.Speed"'], err


def test_opcua_security_is_none_or_a_mapping():
    from gateway.config import ConfigError, parse

    def with_security(value: str) -> str:
        return BASE.replace("devices:\n", f"""devices:
  - name: press1
    source: opcua
    endpoint: opc.tcp://192.0.2.20:4840
    security: {value}
    nodes: [{{name: speed, node: "ns=2;s=Press1.Speed"}}]
""", 1)
    assert parse(with_security("none")).devices[0].security is None
    with pytest.raises(ConfigError) as err:
        parse(with_security("nope"))
    assert 'devices[0].security: expected none or a mapping (policy, mode, cert_file, key_file), got "nope"' in \
        str(err.value)


def test_a_counter_on_the_simulated_plc_wraps_where_the_plc_does_unless_given_bits():
    """A docs audit: with plc: {counter_bits: 16} and a counter without bits, each wrap at 65535 was taken for a
    PLC reset and its counts lost (17 of them in the audit's run)."""
    from gateway.config import counter_bits

    text = BASE.replace("counters: [{name: produced, register: produced_raw, bits: 16}]",
                        "counters: [{name: produced, register: produced_raw}]")
    assert text != BASE
    line = next(d for d in config.parse(text).devices if d.name == "line1")
    assert counter_bits(line, line.counters[0]) == 16


def test_a_number_in_exponent_notation_is_a_number():
    """YAML 1.1 reads `1e9` as text (its floats need a dot): an alarm limit so written was refused."""
    alarms = "\n    alarms: [{name: high, tag: motor_rpm, above: 1e4}, {name: low, tag: motor_rpm, below: -2.5E-1}]"
    cfg = config.parse(BASE.replace("  - name: line1", "  - name: pump3\n    source: sim\n    profile: pump" + alarms
                                    + "\n  - name: line1"))
    pump3 = next(d for d in cfg.devices if d.name == "pump3")
    assert [(a.name, a.limit) for a in pump3.alarms] == [("high", 1e4), ("low", -0.25)]
    # Where text is expected, the text as written: an id or a name that loaded before still does.
    cfg = config.parse(BASE.replace("id: line3-gw1", "id: 7e1").replace("name: pump1", "name: 2e2"))
    assert (cfg.gateway.id, cfg.devices[0].name) == ("7e1", "2e2")
    with pytest.raises(config.ConfigError, match="upstream.port: expected an integer, got 1e3"):
        config.parse(BASE.replace("port: 8883", "port: 1e3"))


def test_a_shift_start_written_without_quotes_is_a_time():
    """YAML 1.1 reads `14:00` as the base-60 number 840 (and `06:00` as text): a shift so written was refused."""
    cfg = config.parse(BASE.replace('start: "14:00"', "start: 14:00").replace('start: "22:00"', "start: 22:30"))
    assert [s.start for s in cfg.shifts] == ["06:00", "14:00", "22:30"]


def test_an_address_with_leading_zeros_is_decimal():
    """YAML 1.1 reads `0012` as octal 10 (and `0019` as text): an address copied from a register list with its
    leading zeros read another register, without a word."""
    text = BASE + MODBUS.replace("address: 0,", "address: 0012,").replace("address: 1,", "address: 0019,") % "int16"
    registers = next(d for d in config.parse(text).devices if d.name == "pump2").registers
    assert [r.address for r in registers] == [12, 19]


def test_files_and_numbers_no_config_holds_are_exit_78_not_a_traceback_or_a_hang(tmp_path):
    """Attack passes: a hexadecimal number of 300 digits (its digits are letters: past the length guard) was a
    traceback; /dev/zero as the config read until the memory ran out; a password file longer than MQTT's limit
    passed check-config, then the first CONNECT failed (exit 70, for ever under systemd)."""
    result = check(tmp_path, BASE.replace("max_messages: 1000000", "max_messages: 0x" + "f" * 300))
    assert result.returncode == 78 and "not valid YAML: a number of 302 digits is not a setting" in result.stderr
    zero = subprocess.run([sys.executable, "-m", "gateway", "check-config", "/dev/zero"], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=60)
    assert zero.returncode == 78 and "/dev/zero: larger than 64 MiB: not a config this reads" in zero.stderr
    password = tmp_path / "gw.pass"
    password.write_text("p" * 70_000)
    result = check(tmp_path, BASE.replace("qos: 1,", f"qos: 1, username: gw, password_file: {password},"))
    assert result.returncode == 78 and f'upstream.password_file: expected a password of at most 65535 bytes, got ' \
        f'"{password}" of 70000' in result.stderr
    assert "Traceback" not in result.stderr + zero.stderr


def test_a_tag_named_state_beside_oee_is_refused_with_sparkplug_only():
    """An attack pass: with sparkplug_b, the tag State and the machine state's metric State were one name in the
    DBIRTH; the first telemetry went as damaged, every state change after it failed."""
    device = """
  - name: line1
    source: modbus_tcp
    host: 127.0.0.1
    registers: [{name: State, address: 0}]
    oee: {status_tag: State, states: {1: running}, ideal_rate: 10}
"""
    text = ("gateway: {id: gw1, site: plant-a}\nupstream: {host: 127.0.0.1, format: sparkplug_b}\ndevices:"
            + device)
    with pytest.raises(config.ConfigError) as caught:
        config.parse(text, "g.yaml")
    assert str(caught.value) == ('g.yaml:8: devices[0].oee: a tag named "State" beside oee: with sparkplug_b, State '
                                 "is the machine state's metric; rename the tag")
    assert config.parse(text.replace(", format: sparkplug_b", "")).devices[0].tags == ("State",)  # JSON: no clash


def test_a_name_with_a_last_line_break_is_refused():
    """An attack pass: the patterns were matched with `re.match`, whose `$` also matches before a last line break, so
    `site: "plant-a\\n"` passed and went into every topic (and a model named "pump\\n" into a file name)."""
    with pytest.raises(config.ConfigError) as caught:
        config.parse(BASE.replace("site: plant-a", 'site: "plant-a\\n"'), "g.yaml")
    assert str(caught.value).startswith('g.yaml:1: gateway.site: expected ') and 'got "plant-a\\x0a"' in \
        str(caught.value), str(caught.value)


@pytest.mark.parametrize("where,text,path", [
    ("upstream.host", BASE.replace("host: mqtt.example.com", 'host: "gw..plant.local"'), "upstream.host"),
    ("a PLC", BASE + MODBUS.replace("host: 192.0.2.10", f"host: {'x' * 64}.plant") % "int16", "devices[2].host"),
    ("an OPC UA server", BASE + "  - {name: press1, source: opcua, endpoint: \"opc.tcp://a\\u202eb:4840\", "
     "nodes: [{name: t, node: \"ns=2;i=1\"}]}\n", "devices[2].endpoint"),
    ("the local broker", BASE + "local_broker: {listen: \"a..b:1883\"}\n", "local_broker.listen"),
])
def test_a_host_name_that_cannot_be_looked_up_is_a_config_error(where, text, path):
    """An attack pass: `upstream.host: gw..plant.local` passed check-config, then the uplink task failed on the idna
    codec's UnicodeError at every start (exit 70, a restart loop under systemd)."""
    with pytest.raises(config.ConfigError) as caught:
        config.parse(text, "g.yaml")
    assert len(str(caught.value).splitlines()) == 1 and f": {path}: expected " in str(caught.value) \
        and "IDNA can encode" in str(caught.value), str(caught.value)


def test_a_negative_stop_reason_code_can_be_named():
    """A PLC's INT reason register often says -1 for "none given": the shift book keeps it as a code (a27f499), and
    `reasons` may name it (its keys were 0 to 2^32)."""
    text = BASE + MODBUS % "int16" + (
        "    oee: {status_tag: motor_rpm, states: {1: running}, ideal_rate: 10, reason_tag: bearing_temp_c,\n"
        "          reasons: {-1: no reason given, 7: jam}}\n")
    assert config.parse(text).devices[2].oee.reasons == {-1: "no reason given", 7: "jam"}
