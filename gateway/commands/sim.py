"""`edge-gateway sim`: the simulated plant served over Modbus TCP/RTU, OPC UA and/or MQTT, for testing an install."""

from __future__ import annotations

import argparse
import asyncio
import math
import sys

from gateway import logs
from gateway.commands.common import Subparsers
from gateway.errors import EX_OK, EX_UNAVAILABLE, EX_USAGE


def add_to(sub: Subparsers) -> None:
    parser = sub.add_parser("sim", help="serve the simulated plant over Modbus TCP/RTU (read-only) and/or MQTT")
    parser.add_argument("--modbus-tcp", metavar="HOST:PORT", help="e.g. 127.0.0.1:5020")
    parser.add_argument("--modbus-rtu", metavar="DEVICE", help="serial device, e.g. /dev/ttyUSB0 or a pty")
    parser.add_argument("--opcua", metavar="HOST:PORT", help="serve the units as an OPC UA server "
                          "(opc.tcp://HOST:PORT/edge-gateway/sim/, nodes ns=2;s=UnitN.tag; the [opcua] extra)")
    parser.add_argument("--opcua-user", metavar="NAME", help="with --opcua: only this login opens a session")
    parser.add_argument("--opcua-password-file", metavar="FILE", help="its password")
    parser.add_argument("--opcua-cert", nargs=2, metavar=("CERT", "KEY"),
                          help="with --opcua: Basic256Sha256 SignAndEncrypt only, with this certificate and key")
    parser.add_argument("--mqtt", metavar="HOST:PORT", help="also publish every unit's readings as JSON to "
                          "sim/unit{N}/state on this broker, like plant sensors")
    parser.add_argument("--mqtt-user", help="MQTT user name (e.g. one made with edge-gateway broker-user)")
    parser.add_argument("--mqtt-password-file", help="file holding that user's password")
    parser.add_argument("--mqtt-interval", type=float, default=1.0, help="seconds between messages")
    parser.add_argument("--baudrate", type=int, default=19200)
    parser.add_argument("--parity", choices=("N", "E", "O"), default="E")
    parser.add_argument("--stopbits", type=int, choices=(1, 2), default=1)
    parser.add_argument("--units", default="1=pump:1,2=flexo_line:2,3=pump:3",
                          help="UNIT=PROFILE:SEED,... (default %(default)s)")
    parser.add_argument("--counter-bits", type=int, choices=(16, 32), default=32, help="flexo raw counter width")
    parser.add_argument("--start-near-top", action="store_true", help="flexo raw counters start just below the wrap")
    parser.add_argument("--rate-per-min", type=float, default=120.0, help="flexo pieces per minute at 100 %%")
    parser.add_argument("--reset-every", type=float, metavar="SECONDS",
                          help="reset the flexo raw counters on this schedule (kill -USR1 resets them now)")
    parser.add_argument("--fault", action="append", default=[], metavar="UNIT:KIND[:AT[:DURATION[:TAG]]]",
                          help="inject a pump fault, e.g. 1:bearing_wear:60 (seconds); repeatable")
    parser.add_argument("--exception", action="append", default=[], metavar="UNIT:CODE",
                          help="the PLC answers every request to UNIT with this exception code, e.g. 2:6")
    parser.add_argument("--truth", metavar="FILE", help="write the flexo lines' true counts here (JSON, every step)")
    parser.add_argument("--delay", action="append", default=[], metavar="UNIT:SECONDS",
                          help="the PLC answers UNIT this slowly")
    parser.set_defaults(main=simulate)


def simulate(args: argparse.Namespace) -> int:
    """`edge-gateway sim`: the simulated plant as Modbus PLCs, for testing an install without hardware."""
    from gateway.credentials import read_secret
    from sim.plc import SimPlant
    from sim.serve import serve

    if not (args.modbus_tcp or args.modbus_rtu or args.mqtt or args.opcua):
        print("edge-gateway sim: give --modbus-tcp HOST:PORT, --modbus-rtu DEVICE, --opcua HOST:PORT and/or "
              "--mqtt HOST:PORT", file=sys.stderr)
        return EX_USAGE
    try:
        units = _units(args.units)
        tcp = _endpoint("--modbus-tcp", args.modbus_tcp)
        opcua = _endpoint("--opcua", args.opcua)
        endpoint = _endpoint("--mqtt", args.mqtt)
        for option, value in (("--mqtt-interval", args.mqtt_interval), ("--rate-per-min", args.rate_per_min),
                              ("--reset-every", args.reset_every)):
            if value is not None and not 0 < value < math.inf:
                raise _Bad(f"{option} {value:g}: expected a number above 0")
        mqtt = None if endpoint is None else {
            "host": endpoint[0], "port": endpoint[1], "username": args.mqtt_user,
            "password": read_secret(args.mqtt_password_file), "interval": args.mqtt_interval}
        plant = SimPlant(units, counter_bits=args.counter_bits, counter_near_top=args.start_near_top,
                         base_rate=args.rate_per_min, reset_every=args.reset_every)
        for spec in args.fault:
            unit, kind, at, duration, tag = _fault(spec, units)
            plant.units[unit].machine.inject(kind, at=at, duration=duration, tag=tag)
        for spec in args.exception:
            unit, code = _per_unit("--exception", spec, units, "CODE")
            if code not in EXCEPTION_CODES:
                raise _Bad(f"--exception {spec}: a Modbus exception code is one of "
                           f"{', '.join(map(str, EXCEPTION_CODES))}")
            plant.units[unit].faults.exception = int(code)
        for spec in args.delay:
            unit, seconds = _per_unit("--delay", spec, units, "SECONDS")
            if not 0 <= seconds < math.inf:
                raise _Bad(f"--delay {spec}: expected seconds from 0")
            plant.units[unit].faults.delay = seconds
    except _Bad as err:
        print(f"edge-gateway sim: {err}; see edge-gateway sim --help", file=sys.stderr)
        return EX_USAGE
    except OSError as err:  # a password file
        print(f"edge-gateway sim: {err}", file=sys.stderr)
        return EX_USAGE
    logs.setup("warning")
    where = ", ".join(x for x in (f"Modbus TCP {args.modbus_tcp}" if tcp else "",
                                   f"Modbus RTU {args.modbus_rtu} {args.baudrate} 8{args.parity}{args.stopbits}"
                                   if args.modbus_rtu else "",
                                   f"MQTT {args.mqtt} (sim/unitN/state)" if mqtt else "",
                                   f"OPC UA opc.tcp://{args.opcua}/edge-gateway/sim/ (ns=2;s=UnitN.tag)"
                                   if opcua else "") if x)
    print(f"simulated plant on {where}; units: " +
          ", ".join(f"{u}={p}" for u, (p, _) in units.items()), flush=True)
    try:
        asyncio.run(serve(plant, tcp=tcp, rtu=args.modbus_rtu, baudrate=args.baudrate, parity=args.parity,
                          stopbits=args.stopbits, truth_path=args.truth, mqtt=mqtt, opcua=opcua,
                          opcua_login=(args.opcua_user, read_secret(args.opcua_password_file) or "")
                          if args.opcua_user else None, opcua_cert=tuple(args.opcua_cert) if args.opcua_cert else None))
    except KeyboardInterrupt:
        pass
    except RuntimeError as err:  # pymodbus cannot open the serial device
        print(f"edge-gateway sim: cannot serve Modbus RTU on {args.modbus_rtu}: {err}", file=sys.stderr)
        return EX_UNAVAILABLE
    except OSError as err:
        print(f"edge-gateway sim: cannot serve: {err}", file=sys.stderr)
        return EX_UNAVAILABLE
    return EX_OK


EXCEPTION_CODES = (1, 2, 3, 4, 5, 6, 7, 8, 10, 11)  # Modbus's, as pymodbus's ExcCodes
MAX_UNIT = 247  # Modbus unit ids 1 to 247 (0 is broadcast, which a PLC serves too)


class _Bad(Exception):
    """An argument that cannot be used, said as the user wrote it."""


def _endpoint(option: str, text: str | None) -> tuple[str, int] | None:
    if text is None:
        return None
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise _Bad(f"{option} {text!r}: expected HOST:PORT with a port from 0 to 65535, e.g. 127.0.0.1:5020")
    return host, int(port)


def _units(text: str) -> dict[int, tuple[str, int]]:
    """`1=pump:1,2=flexo_line:2` → {1: ("pump", 1), 2: ("flexo_line", 2)}."""
    from sim import PROFILES

    units: dict[int, tuple[str, int]] = {}
    for item in text.split(","):
        unit, _, rest = item.partition("=")
        profile, _, seed = rest.partition(":")
        if not (unit.strip().isdigit() and int(unit) <= MAX_UNIT and profile in PROFILES and seed.strip().isdigit()):
            raise _Bad(f"--units {item!r}: expected UNIT=PROFILE:SEED, a unit from 0 to {MAX_UNIT}, a profile of "
                       f"{', '.join(PROFILES)} and a whole seed, e.g. 1=pump:1")
        if int(unit) in units:
            raise _Bad(f"--units names unit {int(unit)} twice")
        units[int(unit)] = (profile, int(seed))
    return units


def _per_unit(option: str, spec: str, units: dict[int, tuple[str, int]], what: str) -> tuple[int, float]:
    """`UNIT:NUMBER` for a unit --units serves."""
    unit, _, value = spec.partition(":")
    try:
        number = float(value)
    except ValueError:
        raise _Bad(f"{option} {spec!r}: expected UNIT:{what}") from None
    if not unit.isdigit() or int(unit) not in units:
        raise _Bad(f"{option} {spec!r}: no unit {unit} (the units are {', '.join(map(str, units))})")
    return int(unit), number


def _fault(spec: str, units: dict[int, tuple[str, int]]) -> tuple[int, str, float | None, float, str | None]:
    """`UNIT:KIND[:AT[:DURATION[:TAG]]]` for a pump unit."""
    from sim import PUMP_FAULTS
    from sim.pump import TAGS

    parts = spec.split(":")
    unit, kind, rest = parts[0], parts[1] if len(parts) > 1 else "", parts[2:]
    if not unit.isdigit() or units.get(int(unit), ("", 0))[0] != "pump":
        raise _Bad(f"--fault {spec!r}: unit {unit} is not a pump unit (faults are a pump's)")
    if kind not in PUMP_FAULTS or len(rest) > 3:
        raise _Bad(f"--fault {spec!r}: expected UNIT:KIND[:AT[:DURATION[:TAG]]], KIND one of {', '.join(PUMP_FAULTS)}")
    try:
        at = float(rest[0]) if rest else None
        duration = float(rest[1]) if len(rest) > 1 else math.inf
    except ValueError:
        raise _Bad(f"--fault {spec!r}: AT and DURATION are seconds") from None
    if (at is not None and not 0 <= at < math.inf) or not 0 < duration <= math.inf:
        raise _Bad(f"--fault {spec!r}: AT needs seconds from 0, DURATION above 0")
    tag = rest[2] if len(rest) > 2 else None
    if tag is not None and tag not in TAGS:
        raise _Bad(f"--fault {spec!r}: a pump has no tag {tag} (it has {', '.join(TAGS)})")
    return int(unit), kind, at, duration, tag
