"""`edge-gateway sim`: the simulated plant served over Modbus TCP/RTU, OPC UA and/or MQTT, for testing an install."""

from __future__ import annotations

import argparse
import asyncio
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
        units = {}
        for item in args.units.split(","):
            unit, rest = item.split("=")
            profile, seed = rest.split(":")
            units[int(unit)] = (profile, int(seed))
        tcp = mqtt = opcua = None
        if args.opcua:
            host, port = args.opcua.rsplit(":", 1)
            opcua = (host, int(port))
        if args.mqtt:
            host, port = args.mqtt.rsplit(":", 1)
            mqtt = {"host": host, "port": int(port), "username": args.mqtt_user,
                    "password": read_secret(args.mqtt_password_file), "interval": args.mqtt_interval}
        if args.modbus_tcp:
            host, port = args.modbus_tcp.rsplit(":", 1)
            tcp = (host, int(port))
        plant = SimPlant(units, counter_bits=args.counter_bits, counter_near_top=args.start_near_top,
                         base_rate=args.rate_per_min, reset_every=args.reset_every)
        for spec in args.fault:
            unit, kind, *rest = spec.split(":")
            at = float(rest[0]) if rest else None
            duration = float(rest[1]) if len(rest) > 1 else float("inf")
            plant.units[int(unit)].machine.inject(kind, at=at, duration=duration, tag=rest[2] if len(rest) > 2 else None)
        for spec in args.exception:
            unit, code = spec.split(":")
            plant.units[int(unit)].faults.exception = int(code)
        for spec in args.delay:
            unit, seconds = spec.split(":")
            plant.units[int(unit)].faults.delay = float(seconds)
    except (ValueError, KeyError, AttributeError, OSError) as err:
        print(f"edge-gateway sim: bad argument ({err}); see edge-gateway sim --help", file=sys.stderr)
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
    except OSError as err:
        print(f"edge-gateway sim: cannot serve: {err}", file=sys.stderr)
        return EX_UNAVAILABLE
    return EX_OK
